"""Valid messages, conversations and data streams for wire tests and the fuzz campaign."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import lz4.block
import numpy as np
import zstandard

from sealift.wire import (
    Abort,
    Accept,
    AeadProtection,
    Commit,
    ControlConnection,
    DataStreamReader,
    DataStreamWriter,
    Hello,
    Manifest,
    Message,
    NoProtection,
    Outcome,
    OutcomeQuery,
    Receipt,
    RecordProtection,
    Refuse,
    Role,
)
from sealift.wire.datastream import END_PAYLOAD, PAGES_FIXED, RECORD_HEADER, ROUND_END_PAYLOAD
from sealift.wire.messages import encode_frame

MID = "0123456789abcdef" * 2
OTHER_MID = "fedcba9876543210" * 2
PAGE = 4096
KEY = bytes(range(32))
IV = bytes(range(100, 112))


def hello(**changes: object) -> Hello:
    base = Hello(
        migration_id=MID,
        vm_name="web-01",
        source_host="host-a.example",
        destination_host="host-b.example",
        nonce=b"\x11" * 32,
        memory_bytes=64 * PAGE,
        page_size=PAGE,
        secure=True,
        compression="zstd",
        streams=2,
        backend="builtin",
        order='{"signed":"order","v":1}',
        psk_proof="ab" * 32,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def accept(**changes: object) -> Accept:
    base = Accept(migration_id=MID, nonce=b"\x22" * 32, session_id=b"\x33" * 16, psk_proof=None)
    return replace(base, **changes)  # type: ignore[arg-type]


def all_messages() -> list[Message]:
    return [
        hello(),
        hello(compression=None, order=None, psk_proof=None, secure=False, backend="qemu"),
        accept(),
        accept(psk_proof="cd" * 32),
        Refuse(MID, "destination is full: 0 of 2 slots free"),
        Manifest(MID, "manifest-envelope é ✓"),
        Receipt(MID, "prepared", "receipt-envelope"),
        Receipt(MID, "running", "receipt-envelope"),
        Commit(MID),
        Abort(MID, "image digest mismatch"),
        OutcomeQuery(MID),
        Outcome(MID, "committed"),
        Outcome(MID, "unknown"),
    ]


def migration_conversation() -> list[tuple[Role, Message]]:
    """The happy path: (sender, message) in order."""
    return [
        (Role.CLIENT, hello()),
        (Role.SERVER, accept()),
        (Role.CLIENT, Manifest(MID, "manifest")),
        (Role.SERVER, Receipt(MID, "prepared", "receipt-1")),
        (Role.CLIENT, Commit(MID)),
        (Role.SERVER, Receipt(MID, "running", "receipt-2")),
    ]


def aead_pair(rekey_interval: int = 2**24) -> tuple[AeadProtection, AeadProtection]:
    return (
        AeadProtection(KEY, IV, rekey_interval=rekey_interval),
        AeadProtection(KEY, IV, rekey_interval=rekey_interval),
    )


def page_image(npages: int, seed: int = 0) -> np.ndarray:
    """A guest memory image: some zero pages, some compressible, some random."""
    rng = np.random.default_rng(seed)
    image = np.zeros((npages, PAGE), dtype=np.uint8)
    for i in range(npages):
        kind = i % 4
        if kind == 1:
            image[i, :64] = rng.integers(0, 256, 64, dtype=np.uint8)  # compressible
        elif kind >= 2:
            image[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)  # incompressible
    return image


def write_pages(writer: DataStreamWriter, image: np.ndarray, pages: np.ndarray) -> bytes:
    """Gather `pages` of `image` straight into the writer's staging buffer."""
    idx, data = writer.begin_pages(len(pages))
    idx[:] = pages
    np.take(image, pages, axis=0, out=np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE))
    return bytes(writer.finish_pages(len(pages)))


def stream_records(
    protection: RecordProtection,
    image: np.ndarray,
    compression: str | None = None,
    rounds: int = 2,
    seed: int = 0,
    per_record: int = 7,
) -> list[bytes]:
    """A complete valid stream, one bytes object per record (END last)."""
    rng = random.Random(seed)
    npages = len(image)
    writer = DataStreamWriter(protection, npages, compression)
    records: list[bytes] = []
    for round_ in range(rounds):
        chosen = sorted(rng.sample(range(npages), k=max(1, npages // (round_ + 1))))
        zero = [p for p in chosen if not image[p].any()]
        data = [p for p in chosen if image[p].any()]
        if zero:
            records.append(bytes(writer.zero_pages(np.array(zero, dtype=np.uint32))))
        for start in range(0, len(data), per_record):
            batch = np.array(data[start : start + per_record], dtype=np.uint32)
            records.append(write_pages(writer, image, batch))
        records.append(bytes(writer.round_end(round_, len(chosen))))
    records.append(bytes(writer.device_state(b"cpu-state:" + bytes(range(40)))))
    records.append(bytes(writer.end()))
    return records


def raw_record(record_type: int, payload: bytes, flags: int = 0, reserved: int = 0) -> bytes:
    """An unprotected record (for NoProtection readers), built by hand."""
    return RECORD_HEADER.pack(record_type, flags, reserved, len(payload)) + payload


def make_protections() -> dict[str, Callable[[], RecordProtection]]:
    return {"plain": NoProtection, "aead": lambda: AeadProtection(KEY, IV)}


# ---------------------------------------------------------------------------
# Fuzzing helpers (shared by test_wire_fuzz.py and fuzz_campaign.py)

# Values that sit on or next to the bounds the parsers check.
INTERESTING_U32 = [
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    12,
    16,
    17,
    24,
    255,
    256,
    257,
    4095,
    4096,
    4097,
    65535,
    65536,
    65537,
    262148,
    1049612,
    1049613,
    2**31 - 1,
    2**31,
    2**32 - 1,
]


def mutate(data: bytes, rng: random.Random, max_ops: int = 4) -> bytes:
    """Apply a few random edits: bit flips, byte sets, inserts, deletes, length pokes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            bit = rng.randrange(len(buf) * 8)
            buf[bit // 8] ^= 1 << (bit % 8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del buf[pos : pos + rng.randint(1, 64)]
        elif op == 4:
            end = pos + rng.randint(1, 64)
            buf[end:end] = buf[pos:end]  # duplicate a range
        elif op == 5:
            value = rng.choice(INTERESTING_U32)
            order = rng.choice(["big", "little"])
            buf[pos : pos + 4] = value.to_bytes(4, order)
        else:
            del buf[pos:]  # truncate
    return bytes(buf)


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        size = rng.choice([1, 2, 3, 8, 9, 64, 500, 5000, 1 << 20])
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def peer_frames(receiver: Role) -> list[bytes]:
    """The frames the other side sends to `receiver` in the happy-path migration, in order."""
    return [encode_frame(m) for s, m in migration_conversation() if s is not receiver]


def drive_control(role: Role, turns: list[list[bytes]]) -> ControlConnection:
    """Feed the peer's turns (each a list of chunks) to one end, which answers between turns.

    The protocol alternates, so a peer's next message only arrives after
    this end answered the previous one.
    """
    conn = ControlConnection(role)
    script = [m for sender, m in migration_conversation() if sender is role]
    if role is Role.CLIENT:
        conn.send(script.pop(0))
    for turn in turns:
        received = []
        for chunk in turn:
            received += conn.receive_data(chunk)
        if received and script and not conn.closed:
            conn.send(script.pop(0))
    return conn


def drive_data(protection: RecordProtection, npages: int, chunks: list[bytes]) -> DataStreamReader:
    reader = DataStreamReader(protection, npages)
    for chunk in chunks:
        reader.receive_data(chunk)
    reader.close()
    return reader


def random_record(rng: random.Random, npages: int) -> bytes:
    """A structurally plausible unprotected record with random contents."""
    kind = rng.randrange(8)
    if kind == 0:  # PAGES, possibly compressed, possibly inconsistent
        count = rng.choice([0, 1, 2, 3, 256, 257, rng.randrange(300)])
        codec = rng.choice([0, 0, 1, 2, 3])
        indexes = [rng.choice([0, 1, npages - 1, npages, rng.randrange(2 * npages)]) for _ in range(min(count, 300))]
        page_data = bytes(PAGE * min(count, 3)) if rng.random() < 0.5 else rng.randbytes(64)
        if codec == 1 and rng.random() < 0.7:
            page_data = zstandard_compress(page_data or b"x")
        elif codec == 2 and rng.random() < 0.7:
            page_data = lz4_compress(page_data or b"x")
        data_len = len(page_data) if rng.random() < 0.8 else rng.choice(INTERESTING_U32)
        payload = (
            PAGES_FIXED.pack(count, codec, data_len) + b"".join(i.to_bytes(4, "little") for i in indexes) + page_data
        )
        rtype = 1
    elif kind == 1:
        count = rng.choice([0, 1, 2, 65536, 65537, rng.randrange(100)])
        indexes = [rng.randrange(2 * npages) for _ in range(min(count, 100))]
        payload = count.to_bytes(4, "little") + b"".join(i.to_bytes(4, "little") for i in indexes)
        rtype = 2
    elif kind == 2:
        payload = ROUND_END_PAYLOAD.pack(rng.randrange(4), rng.randrange(2 * npages))
        rtype = 3
    elif kind == 3:
        payload = rng.randbytes(rng.choice([0, 1, 100, 65536, 65537]))
        rtype = 4
    elif kind == 4:
        payload = END_PAYLOAD.pack(rng.randrange(5), rng.randrange(5), rng.randrange(100))
        rtype = 5
    else:
        rtype = rng.randrange(8)
        payload = rng.randbytes(rng.randrange(64))
    flags = 0 if rng.random() < 0.9 else rng.randrange(256)
    reserved = 0 if rng.random() < 0.9 else rng.randrange(65536)
    return raw_record(rtype, payload, flags, reserved)


def zstandard_compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


def lz4_compress(data: bytes) -> bytes:
    return lz4.block.compress(data, store_size=False)
