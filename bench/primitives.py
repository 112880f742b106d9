"""Speeds of the primitives sealift's data path is built from, on this machine.

    .venv/bin/python bench/primitives.py [--json]

Medians of 5 runs each; figures in GiB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1 << 20


def rate(work: Callable[[], int], runs: int = 5) -> float:
    """Median GiB/s of `work`, which returns the bytes it processed."""
    speeds = []
    for _ in range(runs):
        started = time.perf_counter()
        done = work()
        speeds.append(done / (time.perf_counter() - started) / (1 << 30))
    return statistics.median(speeds)


def aes_gcm(bits: int) -> Callable[[], int]:
    aead, nonce = AESGCM(os.urandom(bits // 8)), os.urandom(12)
    data, out = bytearray(MiB), bytearray(MiB + 16)

    def work() -> int:
        for _ in range(200):
            aead.encrypt_into(nonce, data, None, out)
        return 200 * MiB

    return work


def hash_blocks(hasher: Callable[[memoryview], object], block: int) -> Callable[[], int]:
    data = memoryview(os.urandom(64 * MiB))

    def work() -> int:
        for offset in range(0, len(data), block):
            hasher(data[offset : offset + block])
        return len(data)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {
        "AES-256-GCM encrypt_into, 1 MiB": rate(aes_gcm(256)),
        "AES-128-GCM encrypt_into, 1 MiB": rate(aes_gcm(128)),
        "BLAKE3, 64 KiB blocks": rate(hash_blocks(lambda b: blake3.blake3(b).digest(), 64 * 1024)),
        "SHA-256, 1 MiB": rate(hash_blocks(lambda b: hashlib.sha256(b).digest(), MiB)),
        "SHA-256, 4 KiB": rate(hash_blocks(lambda b: hashlib.sha256(b).digest(), 4096)),
    }
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=2))
    else:
        for name, value in results.items():
            print(f"| {name} | {value:.2f} GiB/s |")


if __name__ == "__main__":
    main()
