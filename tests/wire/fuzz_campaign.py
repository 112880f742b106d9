"""Bounded random fuzz campaign against the wire parsers (not collected by pytest).

    .venv/bin/python tests/wire/fuzz_campaign.py --seconds 60 [--seed N] [--save-dir DIR]

Feeds random and mutated inputs to ControlConnection.receive_data,
decode_payload, DataStreamReader.receive_data/close and decode_stream_open.
Each input must either be accepted or raise ProtocolError; anything else,
or an input that takes longer than --hang-seconds, is counted as a finding,
printed and (with --save-dir) saved. Exit status 1 if there were findings.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire_samples as ws
from sealift.wire import (
    AeadProtection,
    MessageType,
    NoProtection,
    ProtocolError,
    Role,
    decode_stream_open,
    encode_stream_open,
)
from sealift.wire.messages import FRAME_HEADER, MESSAGE_CLASSES, canonical_json, decode_payload
from sealift.wire.records import RecordProtection

NPAGES = 16


class Hang(Exception):
    pass


@dataclass
class Tally:
    inputs: int = 0
    accepted: int = 0
    protocol_errors: int = 0
    findings: int = 0
    slowest: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


# -- input generators: each returns (description bytes, callable to run) ---------------

Case = tuple[bytes, Callable[[], Any]]


def control_random_bytes(rng: random.Random) -> Case:
    data = rng.randbytes(rng.randrange(2000))
    if rng.random() < 0.5:  # a plausible header in front
        data = FRAME_HEADER.pack(1, rng.randrange(11), 0, rng.randrange(70000)) + data
    role = rng.choice(list(Role))
    return data, lambda: ws.drive_control(role, [ws.chunked(data, rng)])


def control_mutated_conversation(rng: random.Random) -> Case:
    role = rng.choice(list(Role))
    frames = ws.peer_frames(role)
    for _ in range(rng.randint(1, 2)):
        victim = rng.randrange(len(frames))
        frames[victim] = ws.mutate(frames[victim], rng)
    turns = [ws.chunked(frame, rng) for frame in frames]
    return b"".join(frames), lambda: ws.drive_control(role, turns)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([*ws.INTERESTING_U32, -1, 2**64, 2**1000, 4096 * 10])
    if kind == 3:
        return rng.choice([ws.MID, "11" * 32, "33" * 16, "zstd", "lz4", "qemu", "running", ""])
    if kind == 4:
        return "".join(
            chr(rng.choice([0, 0x1B, 0x41, 0xE9, 0x202E, 0xD800, 0x10FFFF])) for _ in range(rng.randrange(20))
        )
    if kind == 5:
        return "x" * rng.choice([1, 64, 65, 253, 254, 1024, 1025, 16384, 16385, 32768, 32769])
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {str(rng.randrange(5)): random_json(rng, depth + 1) for _ in range(rng.randrange(3))}


def control_random_fields(rng: random.Random) -> Case:
    msg_type = rng.choice(list(MessageType))
    keys = sorted(MESSAGE_CLASSES[msg_type].KEYS)  # type: ignore[attr-defined]
    obj = {k: v for k, v in ws.hello().to_json().items() if k in keys}
    obj.setdefault("migration_id", ws.MID)
    for _ in range(rng.randint(1, 3)):
        obj[rng.choice([*keys, "extra"])] = random_json(rng)
    if rng.random() < 0.1:
        obj.pop(rng.choice(keys), None)
    try:
        payload = canonical_json(obj)
    except ValueError:
        payload = b"{}"
    if rng.random() < 0.2:
        payload = ws.mutate(payload, rng, max_ops=2)
    return payload, lambda: decode_payload(msg_type, payload)


def protection(kind: str) -> RecordProtection:
    return AeadProtection(ws.KEY, ws.IV) if kind == "aead" else NoProtection()


_STREAMS: dict[str, bytes] = {}


def valid_stream(kind: str) -> bytes:
    if kind not in _STREAMS:
        image = ws.page_image(NPAGES, seed=11)
        if kind == "aead":
            send, _ = ws.aead_pair()
            records = ws.stream_records(send, image, "zstd", rounds=2, per_record=3)
        else:
            compression = None if kind == "plain" else kind
            records = ws.stream_records(NoProtection(), image, compression, rounds=2, per_record=3)
        _STREAMS[kind] = b"".join(records)
    return _STREAMS[kind]


KINDS = ["plain", "zstd", "lz4", "aead"]


def data_random_bytes(rng: random.Random) -> Case:
    kind = rng.choice(KINDS)
    data = rng.randbytes(rng.randrange(3000))
    return data, lambda: ws.drive_data(protection(kind), NPAGES, ws.chunked(data, rng))


def data_mutated_stream(rng: random.Random) -> Case:
    kind = rng.choice(KINDS)
    data = ws.mutate(valid_stream(kind), rng)
    return data, lambda: ws.drive_data(protection(kind), NPAGES, ws.chunked(data, rng))


def data_random_records(rng: random.Random) -> Case:
    data = b"".join(ws.random_record(rng, NPAGES) for _ in range(rng.randint(1, 8)))
    return data, lambda: ws.drive_data(NoProtection(), NPAGES, ws.chunked(data, rng))


def stream_open(rng: random.Random) -> Case:
    data = encode_stream_open(rng.randbytes(16), rng.randrange(8))
    data = ws.mutate(data, rng, max_ops=2) if rng.random() < 0.8 else rng.randbytes(rng.randrange(40))
    return data, lambda: decode_stream_open(data)


TARGETS: dict[str, Callable[[random.Random], Case]] = {
    "control/random-bytes": control_random_bytes,
    "control/mutated-conversation": control_mutated_conversation,
    "control/random-fields": control_random_fields,
    "data/random-bytes": data_random_bytes,
    "data/mutated-stream": data_mutated_stream,
    "data/random-records": data_random_records,
    "data/stream-open": stream_open,
}


# -- the campaign ---------------------------------------------------------------------


def _alarm(signum: int, frame: object) -> None:
    raise Hang()


def run_one(name: str, case: Case, tally: Tally, hang_seconds: float, save_dir: Path | None) -> None:
    data, run = case
    tally.inputs += 1
    started = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
    try:
        run()
        tally.accepted += 1
    except ProtocolError as exc:
        tally.protocol_errors += 1
        key = re.sub(r"(?<![A-Za-z-])\d+", "N", exc.reason.split(":")[0])[:60]  # group by kind
        tally.reasons[key] = tally.reasons.get(key, 0) + 1
    except Exception as exc:  # a finding: any other exception, or a hang
        tally.findings += 1
        print(f"FINDING in {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not isinstance(exc, Hang):
            traceback.print_exc(limit=6, file=sys.stderr)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            path = save_dir / f"{name.replace('/', '_')}-{tally.findings}.bin"
            path.write_bytes(data)
            print(f"  input saved to {path}", file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    tally.slowest = max(tally.slowest, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="campaign length")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--hang-seconds", type=float, default=5.0, help="per-input time limit")
    parser.add_argument("--save-dir", type=Path, default=None, help="save findings here")
    parser.add_argument("--top-reasons", type=int, default=3, help="reasons shown per target")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    print(f"wire fuzz campaign: {args.seconds:.0f} s, seed {seed}")
    signal.signal(signal.SIGALRM, _alarm)
    tallies = {name: Tally() for name in TARGETS}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for name, generate in TARGETS.items():
            run_one(name, generate(rng), tallies[name], args.hang_seconds, args.save_dir)

    print(f"{'target':32} {'inputs':>8} {'accepted':>9} {'proto-err':>10} {'findings':>9} {'slowest':>9}")
    for name, t in tallies.items():
        print(f"{name:32} {t.inputs:8} {t.accepted:9} {t.protocol_errors:10} {t.findings:9} {t.slowest * 1000:7.1f}ms")
        top = sorted(t.reasons.items(), key=lambda kv: -kv[1])[: args.top_reasons]
        for reason, count in top:
            print(f"    {count:7}  {reason}")
    total = sum(t.findings for t in tallies.values())
    inputs = sum(t.inputs for t in tallies.values())
    print(f"total: {inputs} inputs, {total} findings (seed {seed})")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
