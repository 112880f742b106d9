"""Byte streams for the agent: TLS or plaintext control channels, data streams.

One migration port serves three kinds of connection, told apart by their
first bytes: a TLS ClientHello (0x16) opens an authenticated control channel,
`SLD1` opens a data stream for a session agreed on a control channel, and
`SLC1` opens a plaintext control channel (only when the agent allows the
measured `--insecure` baseline).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sealift.security.identity import HostIdentity
from sealift.security.tls import TlsStream, client_context
from sealift.wire.control import ControlConnection, Role
from sealift.wire.datastream import STREAM_OPEN_SIZE, decode_stream_open, encode_stream_open
from sealift.wire.messages import Abort, Message

INSECURE_CONTROL_MAGIC = b"SLC1"
TLS_HANDSHAKE_BYTE = 0x16
SOCKET_BUFFER = 4 << 20  # bulk data: fewer wake-ups per MiB
INTERRUPT_CHECK_S = 0.1  # how often a data stream wait looks for a reason to stop


class ByteStream(Protocol):
    def sendall(self, data: bytes | memoryview) -> None: ...

    def recv(self, max_bytes: int) -> bytes: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def close(self) -> None: ...


class PlainStream:
    """A plaintext socket with the same face as TlsStream (baseline only)."""

    peer_name: str | None = None

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendall(self, data: bytes | memoryview) -> None:
        self._sock.sendall(data)

    def recv(self, max_bytes: int) -> bytes:
        return self._sock.recv(max_bytes)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def open_tcp(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tune_bulk_socket(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionError if the peer stops early."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise ConnectionError(f"peer closed the data stream after {got} of {total} bytes")
        got += n


class ControlChannel:
    """A control conversation: a byte stream plus the sans-IO ControlConnection."""

    def __init__(self, stream: ByteStream, role: Role, peer_name: str | None) -> None:
        self.stream = stream
        self.peer_name = peer_name  # authenticated host name; None on plaintext
        self._conn = ControlConnection(role)
        self._pending: list[object] = []

    @property
    def secure(self) -> bool:
        return isinstance(self.stream, TlsStream)

    @property
    def tls(self) -> TlsStream:
        """The stream of a secure channel: its peer's certificate, its exporter. AttributeError on plaintext."""
        if not isinstance(self.stream, TlsStream):
            raise AttributeError("a plaintext control channel has no TLS session")
        return self.stream

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        identity: HostIdentity | None,
        expected_peer: str,
        secure: bool,
        timeout: float,
    ) -> ControlChannel:
        sock = open_tcp(address, timeout)
        try:
            if secure:
                if identity is None:
                    raise ValueError("a secure control channel needs a host identity")
                stream: ByteStream = TlsStream.connect(sock, client_context(identity), expected_peer, timeout)
                return cls(stream, Role.CLIENT, expected_peer)
            sock.sendall(INSECURE_CONTROL_MAGIC)
            return cls(PlainStream(sock), Role.CLIENT, None)
        except BaseException:
            sock.close()
            raise

    def send(self, message: Message) -> None:
        self.stream.sendall(self._conn.send(message))

    def recv(self, timeout: float) -> object:
        """The next message from the peer; TimeoutError / ConnectionError / ProtocolError."""
        message = self.peek(timeout)
        if message is None:
            raise TimeoutError(self._silence(timeout))
        return self._pending.pop(0)

    def peek(self, timeout: float) -> object | None:
        """The next message from the peer without taking it (recv takes it), or None if none came in time."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and timeout > 0:
                return None
            self.stream.settimeout(max(remaining, 0.001))
            try:
                data = self.stream.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("peer closed the control connection")
            self._pending.extend(self._conn.receive_data(data))
        return self._pending[0]

    def abort_within(self, timeout: float) -> Abort | None:
        """The peer's Abort, if it sends one within `timeout` (it says why it gave up); None for silence or
        another message (left for recv). ConnectionError / ProtocolError if the peer closed or broke the channel."""
        message = self.peek(timeout)
        return message if isinstance(message, Abort) else None

    def _silence(self, timeout: float) -> str:
        partial = self._conn.buffered
        if partial:
            return f"peer sent {partial} bytes of an incomplete frame, then nothing for {timeout:.0f} s"
        return f"peer sent nothing for {timeout:.0f} s"

    def close(self) -> None:
        self.stream.close()


def open_data_stream(address: tuple[str, int], session_id: bytes, index: int, timeout: float) -> socket.socket:
    sock = open_tcp(address, timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    tune_bulk_socket(sock)
    sock.settimeout(timeout)
    sock.sendall(encode_stream_open(session_id, index))
    return sock


def read_stream_open(sock: socket.socket) -> tuple[bytes, int]:
    buf = bytearray(STREAM_OPEN_SIZE)
    recv_exactly_into(sock, memoryview(buf))
    return decode_stream_open(bytes(buf))


@dataclass
class _PendingStream:
    arrived: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket | None = None


class DataSessions:
    """Data streams that a control channel has announced and now awaits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[bytes, _PendingStream] = {}

    def expect(self, session_id: bytes) -> None:
        with self._lock:
            self._pending[session_id] = _PendingStream()

    def deliver(self, session_id: bytes, sock: socket.socket) -> bool:
        """Hand an arriving stream to its session; False if nobody expects it."""
        with self._lock:
            pending = self._pending.get(session_id)
            if pending is None or pending.sock is not None:
                return False
            pending.sock = sock
        pending.arrived.set()
        return True

    def wait(self, session_id: bytes, timeout: float, interrupt: Callable[[], None] | None = None) -> socket.socket:
        """The session's data stream once it arrives; TimeoutError after `timeout`.

        `interrupt` is called every ~0.1 s while waiting and may raise to stop
        the wait (the destination checks its control channel for an Abort,
        so that an abandoned migration frees what it holds at once).
        """
        with self._lock:
            pending = self._pending[session_id]
        deadline = time.monotonic() + timeout
        while not pending.arrived.wait(min(INTERRUPT_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self.cancel(session_id)
                raise TimeoutError(f"the source did not open its data stream within {timeout:.0f} s")
            if interrupt is not None:
                try:
                    interrupt()
                except BaseException:
                    self.cancel(session_id)
                    raise
        assert pending.sock is not None
        return pending.sock

    def cancel(self, session_id: bytes) -> None:
        with self._lock:
            pending = self._pending.pop(session_id, None)
        if pending is not None and pending.sock is not None:
            pending.sock.close()

    def finish(self, session_id: bytes) -> None:
        with self._lock:
            self._pending.pop(session_id, None)


class PipelinedSink:
    """Sends sealed records from a thread of its own, so sealing the next overlaps sending this one.

    The writer must have a ring of `depth + 2` output buffers: at most `depth`
    records wait in the queue and one is being sent while the writer seals
    into the last, so no buffer is reused before its bytes have left. AES-GCM
    and `sendall` both release the GIL, so on two cores the two really run
    at once. A send error is raised by the next call (and by `flush`).
    """

    def __init__(self, sock: socket.socket, depth: int = 2) -> None:
        self._sock = sock
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="data-sink", daemon=True)
        self._thread.start()

    @staticmethod
    def ring_size(depth: int = 2) -> int:
        return depth + 2

    def __call__(self, record: memoryview) -> None:
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(record, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()  # the thread died: nothing drains the queue

    def flush(self) -> None:
        """Wait until every queued record has been sent; raise the send error if there was one."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the thread (after what is queued, unless sending already failed)."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=5)
            except queue.Full:
                pass
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                if self._error is None:
                    self._sock.sendall(record)
            except BaseException as exc:  # reported to the engine's thread by the next call
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
