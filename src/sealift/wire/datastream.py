# Long file: the data stream's record types, writer and reader are one sans-IO protocol, tested as one.
"""Bulk data stream: sans-IO writer and reader of protected records.

A data stream is a TCP connection that starts with a clear STREAM_OPEN
(magic, session id, stream index) and then carries records:

    header  = type u8, flags u8 (0), reserved u16 (0), length u32   (network order)
    payload = protection(plaintext), `length` bytes

Plaintext payloads (little-endian, so page index arrays are native uint32
on the hosts we run on and can be filled and read without conversion):

    PAGES         count u32 (1..256), codec u32, data_len u32,
                  count x u32 page index, data (raw count*4096, or compressed)
    ZERO_PAGES    count u32 (1..65536), count x u32 page index
    ROUND_END     round u32, pages_in_round u64
    DEVICE_STATE  raw bytes (1..65536)
    END           records_before_end u64, pages_total u64, payload_bytes_total u64

END is authenticated like every record and states what came before it, so
truncation, deletion and (with AEAD) reordering or replay are detected.
Writer and reader preallocate their buffers for the largest record once;
the reader checks every length against the bound for its record type
before reading it, and never sizes anything from an unchecked peer value.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn, TypeAlias

import lz4.block
import numpy as np
import zstandard

from .errors import ProtocolError
from .messages import MAX_STREAMS, PAGE_SIZE, SESSION_ID_SIZE
from .records import ProtectionState, RecordProtection

STREAM_MAGIC = b"SLD1"
STREAM_OPEN = struct.Struct("!4s16sB3x")
STREAM_OPEN_SIZE = STREAM_OPEN.size

RECORD_HEADER = struct.Struct("!BBHI")
HEADER_SIZE = RECORD_HEADER.size

MAX_PAGES_PER_RECORD = 256
MAX_ZERO_PAGES_PER_RECORD = 65536
MAX_DEVICE_STATE = 65536
MAX_OPAQUE = 1 << 20
MAX_NPAGES = (1 << 40) // PAGE_SIZE  # 1 TiB of guest memory
MAX_ROUND = 2**32 - 1

PAGES_FIXED = struct.Struct("<III")  # count, codec, data_len
ZERO_PAGES_FIXED = struct.Struct("<I")  # count
ROUND_END_PAYLOAD = struct.Struct("<IQ")  # round, pages_in_round
END_PAYLOAD = struct.Struct("<QQQ")  # records_before_end, pages_total, payload_bytes_total

_INDEX_DTYPE = np.dtype("<u4")
_ZSTD_LEVEL = 1  # fast: on 2 cores compression competes with the guest
_ZSTD_MAX_WINDOW = 1 << 21  # our frames hold at most 1 MiB


class RecordType(IntEnum):
    PAGES = 1
    ZERO_PAGES = 2
    ROUND_END = 3
    DEVICE_STATE = 4
    END = 5
    OPAQUE = 6  # bytes of a hypervisor's own migration stream (QEMU), carried as they are


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1
    LZ4 = 2


_RECORD_TYPES = frozenset(int(t) for t in RecordType)
_CODEC_BY_NAME = {None: Codec.NONE, "zstd": Codec.ZSTD, "lz4": Codec.LZ4}

MAX_PAGES_PLAINTEXT = PAGES_FIXED.size + MAX_PAGES_PER_RECORD * (4 + PAGE_SIZE)
# (min, max) plaintext size per record type, checked from the header alone.
PLAINTEXT_BOUNDS: dict[RecordType, tuple[int, int]] = {
    RecordType.PAGES: (PAGES_FIXED.size + 4 + 1, MAX_PAGES_PLAINTEXT),
    RecordType.ZERO_PAGES: (
        ZERO_PAGES_FIXED.size + 4,
        ZERO_PAGES_FIXED.size + 4 * MAX_ZERO_PAGES_PER_RECORD,
    ),
    RecordType.ROUND_END: (ROUND_END_PAYLOAD.size, ROUND_END_PAYLOAD.size),
    RecordType.DEVICE_STATE: (1, MAX_DEVICE_STATE),
    RecordType.END: (END_PAYLOAD.size, END_PAYLOAD.size),
    RecordType.OPAQUE: (1, MAX_OPAQUE),
}
MAX_PLAINTEXT = max(high for _, high in PLAINTEXT_BOUNDS.values())


# ---------------------------------------------------------------------------
# Stream opening


def encode_stream_open(session_id: bytes, index: int) -> bytes:
    """The clear preamble a connecting side sends first on a data stream."""
    if type(session_id) is not bytes or len(session_id) != SESSION_ID_SIZE:
        raise ProtocolError(f"session id must be {SESSION_ID_SIZE} bytes")
    if type(index) is not int or not 0 <= index < MAX_STREAMS:
        raise ProtocolError(f"stream index {index!r} is outside 0..{MAX_STREAMS - 1}")
    return STREAM_OPEN.pack(STREAM_MAGIC, session_id, index)


def decode_stream_open(data: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """Parse a STREAM_OPEN; returns (session_id, stream_index)."""
    if len(data) != STREAM_OPEN_SIZE:
        raise ProtocolError(f"stream open must be {STREAM_OPEN_SIZE} bytes, got {len(data)}")
    raw = bytes(data)
    magic, session_id, index = STREAM_OPEN.unpack(raw)
    if magic != STREAM_MAGIC:
        raise ProtocolError(f"not a sealift data stream (magic {magic!r}, expected {STREAM_MAGIC!r})")
    if raw[-3:] != b"\0\0\0":
        raise ProtocolError("stream open reserved bytes must be zero")
    if index >= MAX_STREAMS:
        raise ProtocolError(f"stream index {index} is outside 0..{MAX_STREAMS - 1}")
    return session_id, index


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, eq=False, slots=True)
class PagesReceived:
    indexes: np.ndarray  # uint32, owned by the event
    data: memoryview  # count*4096 bytes; from finish_record, valid until the next record


@dataclass(frozen=True, eq=False, slots=True)
class ZeroPagesReceived:
    indexes: np.ndarray  # uint32, owned by the event


@dataclass(frozen=True, slots=True)
class RoundEnded:
    round: int
    pages: int


@dataclass(frozen=True, slots=True)
class DeviceStateReceived:
    blob: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    records: int
    pages: int
    payload_bytes: int


@dataclass(frozen=True, eq=False, slots=True)
class OpaqueReceived:
    data: memoryview  # from finish_record, valid until the next record


DataEvent: TypeAlias = (
    PagesReceived | ZeroPagesReceived | RoundEnded | DeviceStateReceived | StreamEnded | OpaqueReceived
)


# ---------------------------------------------------------------------------
# Shared checks


def _local_int(name: str, value: object, low: int, high: int) -> int:
    """An integer argument from local code (numpy integers welcome, bool not)."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]  # any object: TypeError below if no integer
    except TypeError:
        raise ProtocolError(f"{name} must be an integer, got {type(value).__name__}") from None
    if isinstance(value, (bool, np.bool_)) or not low <= number <= high:
        raise ProtocolError(f"{name} {value!r} is outside {low}..{high}")
    return number


def _check_npages(npages: int) -> int:
    return _local_int("npages", npages, 1, MAX_NPAGES)


def _check_indexes(indexes: np.ndarray, npages: int) -> None:
    """Every index names a page of this VM, and none twice in one record."""
    highest = int(indexes.max())
    if highest >= npages:
        raise ProtocolError(f"page index {highest} out of range (the VM has {npages} pages)")
    if indexes.size > 1:
        ordered = np.sort(indexes)
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ProtocolError("duplicate page index within one record")


def _check_round(round_: int, previous: int | None) -> None:
    if previous is not None and round_ <= previous:
        raise ProtocolError(f"round {round_} does not follow round {previous}")


# ---------------------------------------------------------------------------
# Writer


class DataStreamWriter:
    """Builds protected records into one preallocated output buffer.

    Every method returns a memoryview of the bytes to send, valid until the
    next call on this writer (the next `out_buffers` calls with a ring). Misuse (wrong order, bad index) raises
    ProtocolError, mirroring what the reader would reject.
    """

    def __init__(
        self, protection: RecordProtection, npages: int, compression: str | None = None, out_buffers: int = 1
    ) -> None:
        npages = _check_npages(npages)
        if compression not in _CODEC_BY_NAME:
            raise ProtocolError(f"unknown compression {compression!r}")
        self._protection = protection
        self._npages = npages
        self._codec = _CODEC_BY_NAME[compression]
        self._zstd = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=False)
        self._staging = bytearray(MAX_PLAINTEXT)
        self._staging_view = memoryview(self._staging)
        self._index_area = np.frombuffer(
            self._staging, dtype=_INDEX_DTYPE, count=MAX_PAGES_PER_RECORD, offset=PAGES_FIXED.size
        )
        if not 1 <= out_buffers <= 16:
            raise ProtocolError(f"out_buffers {out_buffers} is outside 1..16")
        # A ring of output buffers: a record stays valid for `out_buffers - 1`
        # further calls, so a sending thread can still be sending it while the
        # next records are sealed (see agent.transport.PipelinedSink).
        self._outs = [bytearray(HEADER_SIZE + MAX_PLAINTEXT + protection.overhead) for _ in range(out_buffers)]
        self._next_out = 0
        self._out = self._outs[0]
        self._out_view = memoryview(self._out)
        self._last_tag = memoryview(b"")
        self._pending_pages: int | None = None
        self._last_round: int | None = None
        self._device_state_sent = False
        self._ended = False
        self.records = 0
        self.pages_sent = 0
        self.payload_bytes = 0
        self.wire_bytes = 0

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def last_tag(self) -> memoryview:
        """The authentication tag of the record just sealed (empty without protection); valid as long as that record."""
        return self._last_tag

    def begin_pages(self, count: int) -> tuple[np.ndarray, memoryview]:
        """Index and data views inside the staging buffer, for the caller to fill in place."""
        self._check_open()
        count = _local_int("page count", count, 1, MAX_PAGES_PER_RECORD)
        self._pending_pages = count
        data_offset = PAGES_FIXED.size + 4 * count
        data = self._staging_view[data_offset : data_offset + count * PAGE_SIZE]
        return self._index_area[:count], data

    def finish_pages(self, count: int) -> memoryview:
        """Seal the PAGES record filled through begin_pages(count)."""
        self._check_open()
        count = _local_int("page count", count, 1, MAX_PAGES_PER_RECORD)
        if self._pending_pages is None or count != self._pending_pages:
            raise ProtocolError(f"finish_pages({count!r}) without a matching begin_pages")
        self._pending_pages = None
        _check_indexes(self._index_area[:count], self._npages)
        data_offset = PAGES_FIXED.size + 4 * count
        raw_len = count * PAGE_SIZE
        codec, data_len = self._compress(data_offset, raw_len)
        PAGES_FIXED.pack_into(self._staging, 0, count, codec, data_len)
        record = self._seal(RecordType.PAGES, data_offset + data_len)
        self.pages_sent += count
        return record

    def zero_pages(self, indexes: np.ndarray) -> memoryview:
        """A ZERO_PAGES record: these pages are all zeros (1..65536 indexes)."""
        self._check_open()
        self._pending_pages = None  # the staging area is reused below
        values = np.asarray(indexes)
        count = values.size
        if values.ndim != 1 or not 1 <= count <= MAX_ZERO_PAGES_PER_RECORD:
            raise ProtocolError(f"zero page count {count} is outside 1..{MAX_ZERO_PAGES_PER_RECORD}")
        if values.dtype.kind not in "iu" or int(values.min()) < 0:
            raise ProtocolError("zero page indexes must be non-negative integers")
        if int(values.max()) >= self._npages:
            raise ProtocolError(f"page index {int(values.max())} out of range")
        ZERO_PAGES_FIXED.pack_into(self._staging, 0, count)
        staged = np.frombuffer(self._staging, dtype=_INDEX_DTYPE, count=count, offset=ZERO_PAGES_FIXED.size)
        staged[:] = values
        _check_indexes(staged, self._npages)
        record = self._seal(RecordType.ZERO_PAGES, ZERO_PAGES_FIXED.size + 4 * count)
        self.pages_sent += count
        return record

    def round_end(self, round: int, pages: int) -> memoryview:
        """A ROUND_END record: round numbers strictly increase."""
        self._check_open()
        self._pending_pages = None
        round = _local_int("round", round, 0, MAX_ROUND)
        pages = _local_int("pages in round", pages, 0, self._npages)
        _check_round(round, self._last_round)
        self._last_round = round
        ROUND_END_PAYLOAD.pack_into(self._staging, 0, round, pages)
        return self._seal(RecordType.ROUND_END, ROUND_END_PAYLOAD.size)

    def device_state(self, blob: bytes) -> memoryview:
        """The DEVICE_STATE record (1..65536 bytes), at most once per stream."""
        self._check_open()
        self._pending_pages = None
        if self._device_state_sent:
            raise ProtocolError("device state already sent on this stream")
        size = len(blob)
        if not 1 <= size <= MAX_DEVICE_STATE:
            raise ProtocolError(f"device state of {size} bytes is outside 1..{MAX_DEVICE_STATE}")
        self._device_state_sent = True
        self._staging_view[:size] = blob
        return self._seal(RecordType.DEVICE_STATE, size)

    def opaque_buffer(self) -> memoryview:
        """Where the caller puts up to MAX_OPAQUE bytes of an opaque stream (e.g. recv_into)."""
        self._check_open()
        self._pending_pages = None
        return self._staging_view[:MAX_OPAQUE]

    def finish_opaque(self, size: int) -> memoryview:
        """Seal the first `size` bytes put into opaque_buffer() as one OPAQUE record."""
        self._check_open()
        size = _local_int("opaque size", size, 1, MAX_OPAQUE)
        return self._seal(RecordType.OPAQUE, size)

    def end(self) -> memoryview:
        """The authenticated END record; nothing may follow it."""
        self._check_open()
        self._pending_pages = None
        END_PAYLOAD.pack_into(self._staging, 0, self.records, self.pages_sent, self.payload_bytes)
        record = self._seal(RecordType.END, END_PAYLOAD.size)
        self._ended = True
        return record

    # -- the native relay (host/relaycore.py) carries on from here ---------

    def hand_over(self) -> ProtectionState | None:
        """The key state for the native relay, which writes the rest of the stream and its END.

        This writer writes nothing more (it counts as ended, and its
        protection refuses to seal: see AeadProtection.hand_over).
        """
        self._check_open()
        self._ended = True
        return self._protection.hand_over()

    def account(self, records: int, payload_bytes: int, wire_bytes: int) -> None:
        """Add what the native relay sent after hand_over (END not counted in `records`, as here)."""
        self.records += records
        self.payload_bytes += payload_bytes
        self.wire_bytes += wire_bytes

    def _check_open(self) -> None:
        if self._ended:
            raise ProtocolError("data stream already ended")

    def _compress(self, data_offset: int, raw_len: int) -> tuple[Codec, int]:
        """Compress the staged page data in place when configured and smaller."""
        if self._codec is Codec.NONE:
            return Codec.NONE, raw_len
        raw = self._staging_view[data_offset : data_offset + raw_len]
        if self._codec is Codec.ZSTD:
            packed = self._zstd.compress(raw)
        else:
            packed = lz4.block.compress(raw, store_size=False)
        if len(packed) >= raw_len:
            return Codec.NONE, raw_len
        self._staging_view[data_offset : data_offset + len(packed)] = packed
        return self._codec, len(packed)

    def _seal(self, record_type: RecordType, plain_len: int) -> memoryview:
        if len(self._outs) > 1:
            self._out = self._outs[self._next_out]
            self._out_view = memoryview(self._out)
            self._next_out = (self._next_out + 1) % len(self._outs)
        length = plain_len + self._protection.overhead
        RECORD_HEADER.pack_into(self._out, 0, record_type, 0, 0, length)
        header = bytes(self._out_view[:HEADER_SIZE])
        sealed = self._protection.seal_into(
            header,
            self._staging_view[:plain_len],
            self._out_view[HEADER_SIZE : HEADER_SIZE + length],
        )
        if sealed != length:
            raise ProtocolError(f"record protection produced {sealed} bytes, expected {length}")
        self.records += 1
        self.payload_bytes += plain_len
        self.wire_bytes += HEADER_SIZE + length
        self._last_tag = self._out_view[HEADER_SIZE + length - self._protection.overhead : HEADER_SIZE + length]
        return self._out_view[: HEADER_SIZE + length]


# ---------------------------------------------------------------------------
# Reader


class DataStreamReader:
    """Validates and opens records. Zero-copy at the I/O edge:

        size = reader.read_header(header_bytes)      # checks before reading on
        sock.recv_into(reader.payload_buffer())      # exactly `size` bytes
        event = reader.finish_record()

    After any ProtocolError the reader is failed and refuses further input.
    """

    HEADER_SIZE = HEADER_SIZE

    def __init__(self, protection: RecordProtection, npages: int) -> None:
        npages = _check_npages(npages)
        self._protection = protection
        self._overhead = protection.overhead
        self._npages = npages
        self._zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._payload = bytearray(MAX_PLAINTEXT + self._overhead)
        self._payload_view = memoryview(self._payload)
        self._plain = bytearray(MAX_PLAINTEXT)
        self._plain_view = memoryview(self._plain)
        self._header: bytes | None = None  # header of the record being read
        self._type = RecordType.END
        self._length = 0
        self._last_round: int | None = None
        self._device_state_seen = False
        self._ended = False
        self._failure: str | None = None
        self._rx = bytearray()  # receive_data's buffer
        self._rx_pos = 0
        self.records = 0
        self.pages_received = 0
        self.payload_bytes = 0

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def failure(self) -> str | None:
        return self._failure

    # -- zero-copy API ----------------------------------------------------

    def read_header(self, hdr: bytes | bytearray | memoryview) -> int:
        """Validate a record header; returns how many payload bytes to read next."""
        self._check_usable()
        try:
            return self._read_header(hdr)
        except ProtocolError as exc:
            self._fail(exc)

    def payload_buffer(self) -> memoryview:
        """The preallocated buffer for the current record's payload, exactly its length."""
        self._check_usable()
        if self._header is None:
            self._fail(ProtocolError("payload_buffer() called before read_header()"))
        return self._payload_view[: self._length]

    def finish_record(self) -> DataEvent:
        """Authenticate, parse and check the payload now in payload_buffer()."""
        self._check_usable()
        try:
            return self._finish_record()
        except ProtocolError as exc:
            self._fail(exc)

    @property
    def last_tag(self) -> memoryview:
        """The authentication tag of the record just finished (empty without protection).

        Valid until the next read_header(); a transcript of tags commits to the
        whole stream under the session key (agent.qemu_migration.StreamDigest).
        """
        return self._payload_view[self._length - self._overhead : self._length]

    def close(self) -> None:
        """Raises ProtocolError unless the stream ended with a valid END record."""
        self._check_usable()
        if not self._ended or self._header is not None:
            self._fail(
                ProtocolError(
                    f"stream truncated: no END record after {self.records} records and {self.pages_received} pages"
                )
            )

    # -- the native relay (host/relaycore.py) carries on from here --------

    def hand_over(self) -> ProtectionState | None:
        """The key state for the native relay, which reads the rest of the stream up to END.

        Its protection refuses to open anything more here (AeadProtection.hand_over).
        """
        self._check_usable()
        if self._header is not None or self._ended:
            self._fail(ProtocolError("hand_over() inside a record or after END"))
        return self._protection.hand_over()

    def account(self, records: int, payload_bytes: int, ended: bool) -> None:
        """Add what the native relay read after hand_over; `ended`: it verified the END record."""
        self.records += records
        self.payload_bytes += payload_bytes
        self._ended = ended

    # -- convenience API (tests, fuzzers): arbitrary chunks, copies -------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[DataEvent]:
        """Feed arbitrary chunks; returns the events they complete. Page data is copied."""
        self._check_usable()
        self._rx += data
        events: list[DataEvent] = []
        try:
            while True:
                available = len(self._rx) - self._rx_pos
                if self._header is None:
                    if self._ended and available:
                        raise ProtocolError("data received after the END record")
                    if available < HEADER_SIZE:
                        break
                    self._read_header(self._rx[self._rx_pos : self._rx_pos + HEADER_SIZE])
                    self._rx_pos += HEADER_SIZE
                    continue
                if available < self._length:
                    break
                end = self._rx_pos + self._length
                self._payload_view[: self._length] = self._rx[self._rx_pos : end]
                self._rx_pos = end
                events.append(_detach(self._finish_record()))
        except ProtocolError as exc:
            self._fail(exc)
        finally:
            del self._rx[: self._rx_pos]  # once per call, never per record
            self._rx_pos = 0
        return events

    # -- internals --------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise ProtocolError(f"data stream already failed: {self._failure}")

    def _fail(self, exc: ProtocolError) -> NoReturn:
        """Record the failure (the stream is unusable from now on) and raise it."""
        self._failure = exc.reason
        self._rx.clear()
        self._rx_pos = 0
        raise exc

    def _read_header(self, hdr: bytes | bytearray | memoryview) -> int:
        if self._header is not None:
            raise ProtocolError("read_header() called while a record payload is pending")
        if self._ended:
            raise ProtocolError("data received after the END record")
        if len(hdr) != HEADER_SIZE:
            raise ProtocolError(f"record header must be {HEADER_SIZE} bytes, got {len(hdr)}")
        header = bytes(hdr)
        type_code, flags, reserved, length = RECORD_HEADER.unpack(header)
        if type_code not in _RECORD_TYPES:
            raise ProtocolError(f"unknown record type {type_code}")
        if flags != 0:
            raise ProtocolError(f"record flags 0x{flags:02x} are not supported (must be 0)")
        if reserved != 0:
            raise ProtocolError(f"record reserved field is {reserved}, must be 0")
        record_type = RecordType(type_code)
        low, high = PLAINTEXT_BOUNDS[record_type]
        low, high = low + self._overhead, high + self._overhead
        if length > high:
            raise ProtocolError(f"{record_type.name} record length {length} exceeds limit {high}")
        if length < low:
            raise ProtocolError(f"{record_type.name} record length {length} is below minimum {low}")
        self._header = header
        self._type = record_type
        self._length = int(length)
        return self._length

    def _finish_record(self) -> DataEvent:
        header = self._header
        if header is None:
            raise ProtocolError("finish_record() called before read_header()")
        self._header = None
        record_type, length = self._type, self._length
        plain_len = length - self._overhead
        opened = self._protection.open_into(header, self._payload_view[:length], self._plain_view[:plain_len])
        if opened != plain_len:
            raise ProtocolError(f"record opened to {opened} bytes, expected {plain_len}")
        plain = self._plain_view[:plain_len]
        if record_type is RecordType.END:
            return self._parse_end(plain)
        event = self._parse(record_type, plain)
        self.records += 1
        self.payload_bytes += plain_len
        return event

    def _parse(self, record_type: RecordType, plain: memoryview) -> DataEvent:
        if record_type is RecordType.PAGES:
            return self._parse_pages(plain)
        if record_type is RecordType.ZERO_PAGES:
            return self._parse_zero_pages(plain)
        if record_type is RecordType.ROUND_END:
            return self._parse_round_end(plain)
        if record_type is RecordType.OPAQUE:
            return OpaqueReceived(data=plain)
        return self._parse_device_state(plain)

    def _parse_pages(self, plain: memoryview) -> PagesReceived:
        count, codec, data_len = PAGES_FIXED.unpack_from(plain, 0)
        if not 1 <= count <= MAX_PAGES_PER_RECORD:
            raise ProtocolError(f"PAGES count {count} is outside 1..{MAX_PAGES_PER_RECORD}")
        data_offset = PAGES_FIXED.size + 4 * count
        if data_offset + data_len != len(plain):
            raise ProtocolError(
                f"PAGES record of {len(plain)} bytes does not match count {count} and data length {data_len}"
            )
        raw_len = count * PAGE_SIZE
        indexes = _read_indexes(plain, PAGES_FIXED.size, count)
        _check_indexes(indexes, self._npages)
        packed = plain[data_offset:]
        if codec == Codec.NONE:
            if data_len != raw_len:
                raise ProtocolError(f"PAGES data of {data_len} bytes, expected {raw_len}")
            data = packed
        elif codec in (Codec.ZSTD, Codec.LZ4):
            if data_len >= raw_len:
                raise ProtocolError(f"compressed PAGES data of {data_len} bytes is not smaller")
            data = memoryview(self._decompress(Codec(codec), packed, raw_len))
        else:
            raise ProtocolError(f"unknown PAGES codec {codec}")
        self.pages_received += count
        return PagesReceived(indexes=indexes, data=data)

    def _decompress(self, codec: Codec, packed: memoryview, expected: int) -> bytes:
        """Decompress to exactly `expected` bytes, never allocating more (no bombs)."""
        try:
            if codec is Codec.ZSTD:
                # The frame's declared size is what zstd allocates: check it first.
                declared = zstandard.frame_content_size(packed)
                if declared != expected:
                    raise ProtocolError(f"zstd frame declares {declared} bytes, expected {expected}")
                raw = self._zstd.decompress(packed, max_output_size=expected, allow_extra_data=False)
            else:
                raw = lz4.block.decompress(packed, uncompressed_size=expected)
        except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
            raise ProtocolError(f"{codec.name.lower()} data is corrupt: {exc}") from None
        if len(raw) != expected:
            raise ProtocolError(f"{codec.name.lower()} data decompressed to {len(raw)} bytes, expected {expected}")
        return raw

    def _parse_zero_pages(self, plain: memoryview) -> ZeroPagesReceived:
        (count,) = ZERO_PAGES_FIXED.unpack_from(plain, 0)
        if not 1 <= count <= MAX_ZERO_PAGES_PER_RECORD:
            raise ProtocolError(f"ZERO_PAGES count {count} is outside 1..{MAX_ZERO_PAGES_PER_RECORD}")
        if ZERO_PAGES_FIXED.size + 4 * count != len(plain):
            raise ProtocolError(f"ZERO_PAGES record of {len(plain)} bytes does not match count {count}")
        indexes = _read_indexes(plain, ZERO_PAGES_FIXED.size, count)
        _check_indexes(indexes, self._npages)
        self.pages_received += count
        return ZeroPagesReceived(indexes=indexes)

    def _parse_round_end(self, plain: memoryview) -> RoundEnded:
        round_, pages = ROUND_END_PAYLOAD.unpack_from(plain, 0)
        _check_round(round_, self._last_round)
        if pages > self._npages:
            raise ProtocolError(f"round {round_} claims {pages} pages, the VM has {self._npages}")
        self._last_round = round_
        return RoundEnded(round=round_, pages=pages)

    def _parse_device_state(self, plain: memoryview) -> DeviceStateReceived:
        if self._device_state_seen:
            raise ProtocolError("second DEVICE_STATE record on one stream")
        self._device_state_seen = True
        return DeviceStateReceived(blob=bytes(plain))

    def _parse_end(self, plain: memoryview) -> StreamEnded:
        records, pages, payload_bytes = END_PAYLOAD.unpack_from(plain, 0)
        claimed = (records, pages, payload_bytes)
        received = (self.records, self.pages_received, self.payload_bytes)
        if claimed != received:
            raise ProtocolError(
                "stream END totals mismatch: sender says "
                f"{records} records / {pages} pages / {payload_bytes} bytes, received "
                f"{self.records} / {self.pages_received} / {self.payload_bytes}"
            )
        self._ended = True
        return StreamEnded(records=records, pages=pages, payload_bytes=payload_bytes)


def _read_indexes(plain: memoryview, offset: int, count: int) -> np.ndarray:
    # A copy: the event owns its indexes, the plaintext buffer is reused.
    return np.frombuffer(plain, dtype=_INDEX_DTYPE, count=count, offset=offset).astype(np.uint32)


def _detach(event: DataEvent) -> DataEvent:
    """Copy page data out of the reusable buffer (receive_data returns many events)."""
    if isinstance(event, PagesReceived):
        return PagesReceived(indexes=event.indexes, data=memoryview(bytes(event.data)))
    if isinstance(event, OpaqueReceived):
        return OpaqueReceived(data=memoryview(bytes(event.data)))
    return event
