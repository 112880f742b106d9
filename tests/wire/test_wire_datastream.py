"""Data streams: round trips, compression, rekeying, tampering, truncation, bounds."""

from __future__ import annotations

import random
import struct

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.wire import (
    STREAM_OPEN_SIZE,
    AeadProtection,
    DataEvent,
    DataStreamReader,
    DataStreamWriter,
    DeviceStateReceived,
    NoProtection,
    PagesReceived,
    ProtocolError,
    RecordAuthError,
    RecordType,
    RoundEnded,
    StreamEnded,
    ZeroPagesReceived,
    decode_stream_open,
    encode_stream_open,
)
from sealift.wire.datastream import (
    END_PAYLOAD,
    HEADER_SIZE,
    PAGES_FIXED,
    RECORD_HEADER,
    Codec,
)
from wire_samples import (
    IV,
    KEY,
    PAGE,
    aead_pair,
    page_image,
    raw_record,
    stream_records,
    write_pages,
)

NPAGES = 64


def apply(events: list[DataEvent], npages: int) -> tuple[np.ndarray, list[object]]:
    """Rebuild the destination image from events; return it and the non-page events."""
    image = np.full((npages, PAGE), 0xEE, dtype=np.uint8)  # not zero: zero pages must be written
    other: list[object] = []
    for event in events:
        if isinstance(event, PagesReceived):
            image[event.indexes] = np.frombuffer(event.data, dtype=np.uint8).reshape(-1, PAGE)
        elif isinstance(event, ZeroPagesReceived):
            image[event.indexes] = 0
        else:
            other.append(event)
    return image, other


def read_all(reader: DataStreamReader, stream: bytes, seed: int = 0) -> list[DataEvent]:
    """Feed a stream in random chunk sizes, then close."""
    rng = random.Random(seed)
    events: list[DataEvent] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 7, 100, 4096, 70_000, 2_000_000])
        events += reader.receive_data(stream[pos : pos + step])
        pos += step
    reader.close()
    return events


def read_zero_copy(reader: DataStreamReader, stream: bytes) -> list[DataEvent]:
    """The I/O-edge API, as an agent drives it from recv_into."""
    events: list[DataEvent] = []
    view = memoryview(stream)
    pos = 0
    while pos < len(view):
        size = reader.read_header(view[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        buf = reader.payload_buffer()
        assert len(buf) == size
        buf[:] = view[pos : pos + size]
        pos += size
        event = reader.finish_record()
        if isinstance(event, PagesReceived):  # data is only valid until the next record
            event = PagesReceived(event.indexes, memoryview(bytes(event.data)))
        events.append(event)
    reader.close()
    return events


# -- stream open ---------------------------------------------------------------


def test_stream_open_round_trip_and_checks() -> None:
    sid = bytes(range(16))
    opening = encode_stream_open(sid, 3)
    assert len(opening) == STREAM_OPEN_SIZE == 24 and opening.startswith(b"SLD1")
    assert decode_stream_open(opening) == (sid, 3)
    with pytest.raises(ProtocolError, match="magic"):
        decode_stream_open(b"\x16\x03\x01" + opening[3:])  # a TLS ClientHello
    with pytest.raises(ProtocolError):
        decode_stream_open(opening[:-1])
    with pytest.raises(ProtocolError, match="reserved"):
        decode_stream_open(opening[:-1] + b"\x01")
    with pytest.raises(ProtocolError, match="index"):
        decode_stream_open(opening[:20] + b"\x08" + opening[21:])
    with pytest.raises(ProtocolError):
        encode_stream_open(sid[:15], 0)
    with pytest.raises(ProtocolError):
        encode_stream_open(sid, 8)


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "aead"])
def test_round_trip(secure: bool, compression: str | None) -> None:
    image = page_image(NPAGES, seed=1)
    send, recv = aead_pair() if secure else (NoProtection(), NoProtection())
    records = stream_records(send, image, compression, rounds=3)
    events = read_all(DataStreamReader(recv, NPAGES), b"".join(records))
    rebuilt, other = apply(events, NPAGES)
    assert np.array_equal(rebuilt, image)
    assert [type(e) for e in other] == [
        RoundEnded,
        RoundEnded,
        RoundEnded,
        DeviceStateReceived,
        StreamEnded,
    ]
    assert [e.round for e in other[:3]] == [0, 1, 2]  # type: ignore[attr-defined]
    end = other[-1]
    assert isinstance(end, StreamEnded) and end.records == len(records) - 1


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "aead"])
def test_zero_copy_api_round_trip(secure: bool) -> None:
    image = page_image(NPAGES, seed=2)
    send, recv = aead_pair() if secure else (NoProtection(), NoProtection())
    stream = b"".join(stream_records(send, image, "zstd", rounds=2))
    rebuilt, _ = apply(read_zero_copy(DataStreamReader(recv, NPAGES), stream), NPAGES)
    assert np.array_equal(rebuilt, image)


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
def test_many_records_with_rekey_and_full_records(compression: str | None) -> None:
    npages = 2048
    image = page_image(npages, seed=3)
    send, recv = aead_pair(rekey_interval=5)
    records = stream_records(send, image, compression, rounds=3, per_record=256)
    assert len(records) >= 15 and send.epoch >= 3
    rebuilt, _ = apply(read_all(DataStreamReader(recv, npages), b"".join(records)), npages)
    assert np.array_equal(rebuilt, image)
    assert recv.epoch == send.epoch


def test_writer_counters_and_largest_record() -> None:
    writer = DataStreamWriter(AeadProtection(KEY, IV), 512)
    idx, data = writer.begin_pages(256)
    assert idx.dtype == np.uint32 and len(idx) == 256 and len(data) == 256 * PAGE
    idx[:] = np.arange(256, dtype=np.uint32)
    record = bytes(writer.finish_pages(256))
    assert len(record) == HEADER_SIZE + 12 + 256 * 4 + 256 * PAGE + 16
    assert writer.records == 1 and writer.pages_sent == 256 and writer.wire_bytes == len(record)


def test_compression_used_only_when_it_helps() -> None:
    image = page_image(8, seed=5)
    writer = DataStreamWriter(NoProtection(), 8, "zstd")
    random_page = write_pages(writer, image, np.array([2], np.uint32))
    assert PAGES_FIXED.unpack_from(random_page, HEADER_SIZE) == (1, Codec.NONE, PAGE)
    sparse = write_pages(writer, image, np.array([1, 5], np.uint32))
    _, codec, data_len = PAGES_FIXED.unpack_from(sparse, HEADER_SIZE)
    assert codec == Codec.ZSTD and data_len < 2 * PAGE


# -- tampering, truncation, reordering --------------------------------------------


@pytest.fixture(scope="module")
def sealed_stream() -> list[bytes]:
    send, _ = aead_pair()
    return stream_records(send, page_image(16, seed=6), "zstd", rounds=2, per_record=3)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_bit_flip_in_a_sealed_stream_is_detected(sealed_stream: list[bytes], data: st.DataObject) -> None:
    stream = bytearray(b"".join(sealed_stream))
    bit = data.draw(st.integers(0, len(stream) * 8 - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    in_payload = _in_payload(sealed_stream, bit // 8)
    reader = DataStreamReader(AeadProtection(KEY, IV), 16)
    with pytest.raises(ProtocolError) as info:
        reader.receive_data(bytes(stream))
        reader.close()  # a flipped length can leave the reader waiting: truncation
    if in_payload:
        assert isinstance(info.value, RecordAuthError)


def _in_payload(records: list[bytes], offset: int) -> bool:
    for record in records:
        if offset < len(record):
            return offset >= HEADER_SIZE
        offset -= len(record)
    raise AssertionError("offset beyond stream")


def test_reorder_replay_drop_are_auth_errors(sealed_stream: list[bytes]) -> None:
    r = sealed_stream
    variants = {
        "reorder": [r[0], r[2], r[1], *r[3:]],
        "replay": [r[0], r[1], r[1], *r[2:]],
        "drop": [r[0], *r[2:]],
    }
    for name, records in variants.items():
        reader = DataStreamReader(AeadProtection(KEY, IV), 16)
        with pytest.raises(RecordAuthError):
            reader.receive_data(b"".join(records))
        assert reader.failure, name


def test_truncation_is_detected_on_close(sealed_stream: list[bytes]) -> None:
    stream = b"".join(sealed_stream)
    for cut in (0, len(sealed_stream[0]), len(stream) - len(sealed_stream[-1]), len(stream) - 1):
        reader = DataStreamReader(AeadProtection(KEY, IV), 16)
        reader.receive_data(stream[:cut])
        with pytest.raises(ProtocolError, match="stream truncated"):
            reader.close()


def test_dropped_record_without_protection_caught_by_end_totals() -> None:
    records = stream_records(NoProtection(), page_image(16, seed=7), rounds=2, per_record=3)
    for dropped in range(len(records) - 1):
        reader = DataStreamReader(NoProtection(), 16)
        with pytest.raises(ProtocolError):
            reader.receive_data(b"".join(records[:dropped] + records[dropped + 1 :]))


def test_end_totals_mismatch_is_rejected() -> None:
    send, recv = aead_pair()
    writer = DataStreamWriter(send, 16)
    stream = bytes(writer.round_end(0, 0))
    writer.pages_sent += 1  # a sender that claims one page more than it sent
    stream += bytes(writer.end())
    reader = DataStreamReader(recv, 16)
    with pytest.raises(ProtocolError, match="END totals mismatch"):
        reader.receive_data(stream)
    with pytest.raises(ProtocolError, match="already failed"):
        reader.close()


def test_nothing_after_end() -> None:
    send, recv = aead_pair()
    writer = DataStreamWriter(send, 16)
    stream = bytes(writer.end())
    with pytest.raises(ProtocolError):
        writer.round_end(0, 0)
    reader = DataStreamReader(recv, 16)
    assert reader.receive_data(stream) == [StreamEnded(0, 0, 0)]
    reader.close()
    with pytest.raises(ProtocolError, match="after the END"):
        reader.receive_data(b"\x03")


# -- reader bounds and rules (unprotected, so the parser itself is reached) ---------


def plain_reader(npages: int = 16) -> DataStreamReader:
    return DataStreamReader(NoProtection(), npages)


def pages_payload(indexes: list[int], codec: int = 0, data: bytes | None = None, data_len: int | None = None) -> bytes:
    body = data if data is not None else bytes(len(indexes) * PAGE)
    length = len(body) if data_len is None else data_len
    return PAGES_FIXED.pack(len(indexes), codec, length) + struct.pack(f"<{len(indexes)}I", *indexes) + body


@pytest.mark.parametrize(
    "header,reason",
    [
        (RECORD_HEADER.pack(0, 0, 0, 12), "unknown record type 0"),
        (RECORD_HEADER.pack(7, 0, 0, 12), "unknown record type 7"),
        (RECORD_HEADER.pack(3, 1, 0, 12), "flags"),
        (RECORD_HEADER.pack(3, 0, 1, 12), "reserved"),
        (
            RECORD_HEADER.pack(1, 0, 0, 9_000_000),
            "PAGES record length 9000000 exceeds limit 1049612",
        ),
        (RECORD_HEADER.pack(1, 0, 0, 2**32 - 1), "exceeds limit"),
        (RECORD_HEADER.pack(1, 0, 0, 16), "below minimum"),
        (RECORD_HEADER.pack(2, 0, 0, 4 + 4 * 65537), "exceeds limit"),
        (RECORD_HEADER.pack(3, 0, 0, 13), "exceeds limit 12"),
        (RECORD_HEADER.pack(3, 0, 0, 11), "below minimum 12"),
        (RECORD_HEADER.pack(4, 0, 0, 0), "below minimum 1"),
        (RECORD_HEADER.pack(4, 0, 0, 65537), "exceeds limit 65536"),
        (RECORD_HEADER.pack(5, 0, 0, 23), "below minimum 24"),
    ],
)
def test_header_checked_before_payload(header: bytes, reason: str) -> None:
    reader = plain_reader()
    with pytest.raises(ProtocolError, match=reason):
        reader.read_header(header)  # no payload ever offered
    with pytest.raises(ProtocolError, match="already failed"):
        reader.read_header(RECORD_HEADER.pack(3, 0, 0, 12))


def test_aead_bound_includes_the_tag() -> None:
    reader = DataStreamReader(AeadProtection(KEY, IV), 16)
    assert reader.read_header(RECORD_HEADER.pack(3, 0, 0, 28)) == 28
    with pytest.raises(ProtocolError, match="exceeds limit 28"):
        DataStreamReader(AeadProtection(KEY, IV), 16).read_header(RECORD_HEADER.pack(3, 0, 0, 29))


def zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


@pytest.mark.parametrize(
    "payload,reason",
    [
        (PAGES_FIXED.pack(0, 0, 5) + bytes(5), "count 0"),
        (PAGES_FIXED.pack(257, 0, 0) + bytes(257 * 4 + 10), "count 257"),
        (pages_payload([1], data_len=PAGE + 1), "does not match"),
        (pages_payload([1], codec=3), "unknown PAGES codec 3"),
        (pages_payload([16]), "out of range"),
        (pages_payload([3, 3]), "duplicate"),
        (pages_payload([1], data=bytes(PAGE - 8)), "4088 bytes, expected 4096"),
        (pages_payload([1], codec=1, data=bytes(PAGE)), "not smaller"),
        (pages_payload([1], codec=1, data=b"\x28\xb5\x2f\xfd garbage"), "zstd"),
        (pages_payload([1], codec=1, data=zstd_frame(bytes(2 * PAGE))), "declares 8192"),
        (pages_payload([1, 2], codec=1, data=zstd_frame(bytes(PAGE))), "declares 4096"),
        (pages_payload([1], codec=1, data=zstd_frame(bytes(PAGE)) + b"\x00"), "zstd"),
        (
            pages_payload([1], codec=2, data=lz4.block.compress(bytes(2 * PAGE), store_size=False)),
            "lz4",
        ),
        (
            pages_payload([1, 2], codec=2, data=lz4.block.compress(bytes(PAGE), store_size=False)),
            "lz4",
        ),
        (pages_payload([1], codec=2, data=b"\xff" * 100), "lz4"),
    ],
)
def test_bad_pages_records(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        plain_reader().receive_data(raw_record(RecordType.PAGES, payload))


def test_valid_hand_built_compressed_records() -> None:
    page = bytes(100) + b"x" * 10 + bytes(PAGE - 110)
    reader = plain_reader()
    for codec, packed in ((1, zstd_frame(page)), (2, lz4.block.compress(page, store_size=False))):
        (event,) = reader.receive_data(raw_record(1, pages_payload([4], codec, packed)))
        assert isinstance(event, PagesReceived) and bytes(event.data) == page


@pytest.mark.parametrize(
    "records,reason",
    [
        ([raw_record(2, struct.pack("<II", 0, 0))], "ZERO_PAGES count 0"),
        ([raw_record(2, struct.pack("<III", 3, 1, 2))], "does not match count 3"),
        ([raw_record(2, struct.pack("<III", 2, 1, 1))], "duplicate"),
        ([raw_record(2, struct.pack("<II", 1, 99))], "out of range"),
        ([raw_record(3, struct.pack("<IQ", 0, 17))], "claims 17 pages"),
        (
            [raw_record(3, struct.pack("<IQ", 1, 0)), raw_record(3, struct.pack("<IQ", 1, 0))],
            "does not follow",
        ),
        (
            [raw_record(3, struct.pack("<IQ", 2, 0)), raw_record(3, struct.pack("<IQ", 1, 0))],
            "does not follow",
        ),
        ([raw_record(4, b"a"), raw_record(4, b"b")], "second DEVICE_STATE"),
        ([raw_record(5, END_PAYLOAD.pack(1, 0, 0))], "END totals mismatch"),
        (
            [raw_record(5, END_PAYLOAD.pack(0, 0, 0)), raw_record(3, struct.pack("<IQ", 0, 0))],
            "after the END",
        ),
    ],
)
def test_order_and_content_rules(records: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        plain_reader().receive_data(b"".join(records))


def test_zero_copy_api_misuse() -> None:
    reader = plain_reader()
    with pytest.raises(ProtocolError):
        reader.payload_buffer()
    reader = plain_reader()
    with pytest.raises(ProtocolError):
        reader.finish_record()
    reader = plain_reader()
    reader.read_header(RECORD_HEADER.pack(3, 0, 0, 12))
    with pytest.raises(ProtocolError, match="pending"):
        reader.read_header(RECORD_HEADER.pack(3, 0, 0, 12))


def test_pages_event_data_is_a_view_of_the_reader_buffer() -> None:
    writer = DataStreamWriter(NoProtection(), 4)
    reader = plain_reader(4)
    events = []
    for fill in (7, 9):
        idx, data = writer.begin_pages(1)
        idx[0] = 2
        data[:] = bytes([fill]) * PAGE
        record = bytes(writer.finish_pages(1))
        reader.read_header(record[:HEADER_SIZE])
        reader.payload_buffer()[:] = record[HEADER_SIZE:]
        events.append(reader.finish_record())
    first = events[0]
    assert isinstance(first, PagesReceived)
    assert first.indexes.tolist() == [2] and first.indexes.dtype == np.uint32
    # No copy was made: the first event's data now shows the second record.
    assert len(first.data) == PAGE and bytes(first.data[:2]) == b"\x09\x09"


# -- writer misuse -------------------------------------------------------------------


def test_writer_rejects_misuse() -> None:
    writer = DataStreamWriter(NoProtection(), 16)
    with pytest.raises(ProtocolError):
        writer.finish_pages(1)
    with pytest.raises(ProtocolError):
        writer.begin_pages(0)
    with pytest.raises(ProtocolError):
        writer.begin_pages(257)
    idx, _ = writer.begin_pages(2)
    with pytest.raises(ProtocolError):
        writer.finish_pages(3)
    idx, _ = writer.begin_pages(2)
    idx[:] = [1, 16]
    with pytest.raises(ProtocolError, match="out of range"):
        writer.finish_pages(2)
    idx, _ = writer.begin_pages(2)
    idx[:] = [1, 1]
    with pytest.raises(ProtocolError, match="duplicate"):
        writer.finish_pages(2)
    for bad in (
        np.array([], np.uint32),
        np.array([-1]),
        np.array([16]),
        np.array([1.0]),
        np.zeros(65537, np.uint32),
        np.array([[1]]),
    ):
        with pytest.raises(ProtocolError):
            writer.zero_pages(bad)
    writer.round_end(3, 0)
    with pytest.raises(ProtocolError):
        writer.round_end(3, 0)
    with pytest.raises(ProtocolError):
        writer.round_end(4, 17)
    with pytest.raises(ProtocolError):
        writer.device_state(b"")
    with pytest.raises(ProtocolError):
        writer.device_state(bytes(65537))
    writer.device_state(b"x")
    with pytest.raises(ProtocolError):
        writer.device_state(b"x")
    with pytest.raises(ProtocolError):
        DataStreamWriter(NoProtection(), 16, "gzip")
    with pytest.raises(ProtocolError):
        DataStreamReader(NoProtection(), 0)


def test_writer_accepts_numpy_integers_from_local_code() -> None:
    writer = DataStreamWriter(NoProtection(), np.int64(16))  # type: ignore[arg-type]
    idx, _ = writer.begin_pages(np.int64(1))  # type: ignore[arg-type]
    idx[0] = 3
    writer.finish_pages(np.int32(1))  # type: ignore[arg-type]
    writer.round_end(np.uint32(0), np.int64(1))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        writer.round_end(True, 0)
    with pytest.raises(ProtocolError):
        writer.begin_pages(1.0)  # type: ignore[arg-type]


def test_opaque_records_carry_a_hypervisor_stream_intact() -> None:
    """QEMU's own migration stream rides the channel as OPAQUE records, authenticated in order."""
    import os

    from sealift.wire.datastream import MAX_OPAQUE, DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
    from sealift.wire.records import AeadProtection

    key, iv = os.urandom(32), os.urandom(12)
    writer = DataStreamWriter(AeadProtection(key, iv), npages=1)
    reader = DataStreamReader(AeadProtection(key, iv), npages=1)
    payloads = [os.urandom(n) for n in (1, 4096, MAX_OPAQUE, 12345)]
    wire = bytearray()
    for payload in payloads:
        writer.opaque_buffer()[: len(payload)] = payload
        wire += writer.finish_opaque(len(payload))
    wire += writer.end()
    events = reader.receive_data(bytes(wire))
    assert [bytes(e.data) for e in events if isinstance(e, OpaqueReceived)] == payloads
    assert isinstance(events[-1], StreamEnded)
    tampered = bytearray(wire)
    tampered[20] ^= 1
    import pytest

    from sealift.wire.errors import ProtocolError

    with pytest.raises(ProtocolError):
        DataStreamReader(AeadProtection(key, iv), npages=1).receive_data(bytes(tampered))


def test_a_ring_of_output_buffers_keeps_earlier_records_intact() -> None:
    # A sending thread may still hold the last `out_buffers - 1` records while
    # the writer seals the next: those views must not change under it.
    send, recv = aead_pair()
    writer = DataStreamWriter(send, 64, out_buffers=3)
    image = page_image(64, seed=7)
    views, copies = [], []
    for first in range(0, 64, 8):
        idx, data = writer.begin_pages(8)
        idx[:] = np.arange(first, first + 8, dtype=np.uint32)
        data[:] = image[first : first + 8].tobytes()
        views.append(writer.finish_pages(8))
        copies.append(bytes(views[-1]))
        held = views[-3:]  # what a sink with a ring of 3 may still be sending
        assert [bytes(v) for v in held] == copies[-len(held) :]
    copies.append(bytes(writer.end()))
    rebuilt, _ = apply(read_all(DataStreamReader(recv, 64), b"".join(copies)), 64)
    assert np.array_equal(rebuilt, image)


def test_a_single_output_buffer_is_reused_by_the_next_record() -> None:
    writer = DataStreamWriter(NoProtection(), 8)
    first = writer.round_end(0, 0)
    before = bytes(first)
    writer.round_end(1, 0)
    assert bytes(first) != before  # why the pipelined sink needs the ring above


def test_last_tag_is_the_tag_the_writer_sealed() -> None:
    """The QEMU relay's stream digest hashes tags: both ends must see the same 16 bytes per record."""
    writer = DataStreamWriter(AeadProtection(KEY, IV), 16)
    reader = DataStreamReader(AeadProtection(KEY, IV), 16)
    for payload in (b"guest description", bytes(range(256)) * 64):
        writer.opaque_buffer()[: len(payload)] = payload
        sealed = bytes(writer.finish_opaque(len(payload)))
        reader.read_header(sealed[:HEADER_SIZE])
        reader.payload_buffer()[:] = sealed[HEADER_SIZE:]
        event = reader.finish_record()
        assert bytes(event.data) == payload  # type: ignore[union-attr]
        assert bytes(reader.last_tag) == sealed[-16:] and len(reader.last_tag) == 16


def test_last_tag_is_empty_without_protection() -> None:
    writer, reader = DataStreamWriter(NoProtection(), 16), plain_reader()
    writer.opaque_buffer()[:3] = b"abc"
    sealed = bytes(writer.finish_opaque(3))
    reader.read_header(sealed[:HEADER_SIZE])
    reader.payload_buffer()[:] = sealed[HEADER_SIZE:]
    reader.finish_record()
    assert bytes(reader.last_tag) == b""
