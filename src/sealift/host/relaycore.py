"""The native relay core: one data stream moved between two sockets by compiled code (_relaycore.c).

Python does everything that decides: it authenticates the peers, checks
the order, derives the stream's keys and writes or reads the first records
(the QEMU guest description, the ready record) with the sans-IO writer
and reader of wire/datastream.py, which stay the protocol's reference.
Then it hands the two sockets and the key state to `seal_stream` (socket
bytes -> records, then END) or `open_stream` (records -> socket bytes, up to
a verified END), which run with the GIL released until the stream ends, one
call (one thread) per direction, no Python per record. They seal and open
exactly the records the Python writer and reader do (same nonces, tags,
framing, rekeying and END totals; tests/host/test_relaycore.py checks both
ways), and hand back the counts and the digest input: the OPAQUE records'
GCM tags in order, or, without protection, their headers.

Generic on purpose: any stream of OPAQUE records uses it: QEMU's main
channel and multifd channels, post-copy's forward feed and return path,
and the duplex streams (a disk's NBD connection, a libvirt connection),
which run one seal_stream and one open_stream on the same data socket in
two threads: TCP keeps the two directions apart, and each has its own key.
"""

from __future__ import annotations

import errno
import os
import socket
from array import array
from dataclasses import dataclass

from sealift.errors import SealiftError
from sealift.wire.datastream import MAX_OPAQUE, DataStreamReader, DataStreamWriter
from sealift.wire.errors import ProtocolError, RecordAuthError
from sealift.wire.records import ProtectionState

from . import _relaycore

# Status codes of _relaycore.c (enum status).
_OK, _OS, _TIMEOUT, _CLOSED, _PROTOCOL, _AUTH = 0, 1, 2, 3, 4, 5
_STOPPED = 8


class NativeRelayError(SealiftError):
    """The native relay core failed inside (memory, the cipher library): nothing a peer sent, the stream ends."""

    code = "native_relay_failed"


class StreamStopped(SealiftError):
    """The caller stopped a native stream with its StopSignal (not a peer's doing)."""

    code = "stream_stopped"


class StopSignal:
    """Stops a native stream that may wait without a deadline (post-copy's return path idles for minutes).

    Closing a socket another thread polls does not wake that thread, and a
    shutdown of the data stream would end it for the peer too; the core
    polls this pipe beside each socket instead, and ends with StreamStopped
    once it is readable.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:
            pass  # already set (the pipe is full of stops)

    def close(self) -> None:
        """Only once no stream uses it any more."""
        os.close(self._read)
        os.close(self._write)


class Progress:
    """A native stream's counts while it runs: the core stores them after each record; any thread may read them."""

    def __init__(self) -> None:
        self.counts = array("Q", [0, 0])  # plaintext bytes moved, wire bytes (END included once sent)

    @property
    def plaintext_bytes(self) -> int:
        return self.counts[0]

    @property
    def wire_bytes(self) -> int:
        return self.counts[1]


@dataclass(frozen=True)
class RelayOutcome:
    """What one native stream moved, and what ended it (None: the stream ended as the protocol says)."""

    plaintext_bytes: int  # the socket side's bytes (QEMU's)
    records: int  # OPAQUE records, END not counted
    payload_bytes: int
    wire_bytes: int  # record bytes on the data stream, END included
    digest_input: bytes  # the OPAQUE records' GCM tags in order (16 bytes each), or their 8-byte headers
    error: BaseException | None


def seal_stream(
    source: socket.socket,
    data: socket.socket,
    writer: DataStreamWriter,
    max_record: int = MAX_OPAQUE,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
    wait_forever: bool = False,
) -> RelayOutcome:
    """Seal everything `source` sends into OPAQUE records on `data`, then END; the writer's keys go native.

    Each socket's timeout (None: wait forever) bounds each wait on it, as in Python.
    `progress`, if given, shows the counts while the stream runs (for progress events and metrics);
    `stop`, if given, ends the stream early (StreamStopped) once set;
    `wait_forever` ignores both sockets' timeouts (a stream idle by design, ended by `stop`).
    """
    state = writer.hand_over()
    result = _relaycore.seal_stream(
        source.fileno(),
        data.fileno(),
        *_key_args(state),
        writer.records,
        writer.pages_sent,
        writer.payload_bytes,
        max_record,
        _timeout_ms(source, wait_forever),
        _timeout_ms(data, wait_forever),
        (progress or Progress()).counts,
        -1 if stop is None else stop.fileno(),
    )
    outcome = _outcome(result)
    writer.account(outcome.records, outcome.payload_bytes, outcome.wire_bytes)
    return outcome


def open_stream(
    data: socket.socket,
    sink: socket.socket,
    reader: DataStreamReader,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
    wait_forever: bool = False,
) -> RelayOutcome:
    """Open OPAQUE records from `data` into `sink` up to an authenticated END; the reader's keys go native.

    Every record is authenticated before its bytes reach `sink`; any other
    record type, a bad length, a tampered record or a missing END ends the
    stream with the error the Python reader gives. `stop` and `wait_forever` as for seal_stream.
    """
    state = reader.hand_over()
    result = _relaycore.open_stream(
        data.fileno(),
        sink.fileno(),
        *_key_args(state),
        reader.records,
        reader.pages_received,
        reader.payload_bytes,
        MAX_OPAQUE,
        _timeout_ms(data, wait_forever),
        _timeout_ms(sink, wait_forever),
        (progress or Progress()).counts,
        -1 if stop is None else stop.fileno(),
    )
    outcome = _outcome(result)
    reader.account(outcome.records, outcome.payload_bytes, ended=outcome.error is None)
    return outcome


def _key_args(state: ProtectionState | None) -> tuple[bytes | None, bytes | None, int, int, int, int, int]:
    if state is None:
        return None, None, 0, 0, 0, 1, 1
    return (
        state.key,
        state.iv,
        state.sequence,
        state.epoch_records,
        state.epoch_bytes,
        state.rekey_interval,
        state.rekey_bytes,
    )


def _timeout_ms(sock: socket.socket, wait_forever: bool) -> int:
    """The socket's timeout in ms for each wait on it (-1: none), as Python's socket methods would wait."""
    timeout = None if wait_forever else sock.gettimeout()
    return -1 if timeout is None else max(1, round(1000 * timeout))


def _outcome(result: tuple[int, int, str, int, int, int, int, bytes]) -> RelayOutcome:
    status, err, message, plaintext, records, payload, wire, digest_input = result
    return RelayOutcome(plaintext, records, payload, wire, digest_input, _error(status, err, message))


def _error(status: int, err: int, message: str) -> BaseException | None:
    """The exception Python's own relay raises for the same event."""
    if status == _OK:
        return None
    if status == _OS:
        return OSError(err, f"{message}: {errno.errorcode.get(err, err)}")  # OSError picks the subclass by errno
    if status == _TIMEOUT:
        return TimeoutError(message)
    if status == _CLOSED:
        return ConnectionError(message)
    if status == _AUTH:
        return RecordAuthError()
    if status == _PROTOCOL:
        return ProtocolError(message)
    if status == _STOPPED:
        return StreamStopped(message)
    return NativeRelayError(message)
