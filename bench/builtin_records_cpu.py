"""Would the native core pay for the built-in VM's page records? Their CPU per GiB, split.

The built-in VM's sender builds PAGES records in Python from the VM's
memory (numpy: index the dirty pages, copy them into the writer's staging
buffer) and seals each with the wheel's AES-256-GCM (`cryptography`);
the receiver opens and parses them. The native relay core moves a byte
stream between two sockets and cannot build these records, so moving them
would mean a new C path that does the gathering too. What it could save at
most is the Python share of this work: measured here, in one thread, with
no sockets, against the parts it cannot avoid (the page copy, AES-GCM):

- `records`: begin_pages / fill / finish_pages (256 pages = 1 MiB a record), AEAD
- `open`: DataStreamReader over those records (header, open, parse), AEAD
- `copy`: the same page gathers into the staging buffer, no record, no cipher
- `aes`: AESGCM.encrypt of 1 MiB buffers (the wheel's, what the records use)

    .venv/bin/python bench/builtin_records_cpu.py --gib 1 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealift.wire.datastream import HEADER_SIZE, MAX_PAGES_PER_RECORD, PAGE_SIZE, DataStreamReader, DataStreamWriter
from sealift.wire.records import AeadProtection

KEY, IV = os.urandom(32), os.urandom(12)
MEMORY_PAGES = 1 << 16  # a 256 MiB VM, walked again and again
GiB = 1 << 30


def cpu(work: Callable[[], None]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def page_batches(gib: float) -> list[np.ndarray]:
    """Page index batches of one record each, scattered like dirty pages (every other page)."""
    rng = np.random.default_rng(1)
    count = int(gib * GiB) // (PAGE_SIZE * MAX_PAGES_PER_RECORD)
    return [
        np.sort(rng.choice(MEMORY_PAGES, MAX_PAGES_PER_RECORD, replace=False)).astype(np.uint32) for _ in range(count)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    memory = np.frombuffer(os.urandom(MEMORY_PAGES * PAGE_SIZE), dtype=np.uint8).reshape(MEMORY_PAGES, PAGE_SIZE)
    batches = page_batches(args.gib)
    gib = len(batches) * MAX_PAGES_PER_RECORD * PAGE_SIZE / GiB
    wire: list[bytes] = []

    def records(keep: bool = False) -> None:
        """As the sender does; the sealed record is a view it would send (kept, copied, only for `open`)."""
        writer = DataStreamWriter(AeadProtection(KEY, IV), MEMORY_PAGES)
        for batch in batches:
            index, data = writer.begin_pages(len(batch))
            index[:] = batch
            np.take(memory, batch, axis=0, out=np.frombuffer(data, dtype=np.uint8).reshape(len(batch), PAGE_SIZE))
            sealed = writer.finish_pages(len(batch))
            if keep:
                wire.append(bytes(sealed))

    records(keep=True)  # the records `open` reads, made once, untimed

    def open_records() -> None:
        reader = DataStreamReader(AeadProtection(KEY, IV), MEMORY_PAGES)
        for record in wire:
            reader.read_header(record[:HEADER_SIZE])
            reader.payload_buffer()[:] = record[HEADER_SIZE:]
            reader.finish_record()

    staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)

    def copy() -> None:
        for batch in batches:
            np.take(memory, batch, axis=0, out=staging)

    aead, block = AESGCM(KEY), os.urandom(MAX_PAGES_PER_RECORD * PAGE_SIZE)

    def aes() -> None:
        for _ in batches:
            aead.encrypt(IV, block, None)

    parts = {"records": records, "open": open_records, "copy": copy, "aes": aes}
    raw: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.runs):
        for name, work in parts.items():  # interleaved: the same noise for each part
            raw[name].append(cpu(work) / gib)
    medians = {name: round(statistics.median(v), 3) for name, v in raw.items()}
    python_share = round(medians["records"] - medians["copy"] - medians["aes"], 3)
    print(
        json.dumps(
            {"gib": gib, "runs": args.runs, "cpu_s_per_gib": medians, "raw": raw, "sender_python_share": python_share},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
