"""The socket side of the migration port's admission: the opening deadline, and evicting a connection.

Two pieces the guard (agent/guard.py, sans-IO) needs from the sockets:

- `peek_opening`: wait, without consuming anything, until the connection's
  opening has arrived: the whole first TLS record (the ClientHello, a few
  hundred bytes that an honest client sends at once) or the 4-byte magic of
  the other protocols. The daemon gives this a short deadline
  (`hello_timeout_s`), so a client that stalls before or inside its
  ClientHello loses its slot in about a second or two rather than at the
  whole handshake's deadline.
- `PortConnection.evict`: close a connection whose slot the guard gave to
  another, from the accept thread, while the connection's own thread is
  blocked reading it.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

from sealift.agent.guard import Slot
from sealift.host.transport import TLS_HANDSHAKE_BYTE
from sealift.wire.errors import ProtocolError

TLS_RECORD_HEADER = 5
MAX_TLS_PLAINTEXT = 1 << 14  # RFC 8446 5.1: a plaintext record's length never exceeds 2^14
MAGIC_LENGTH = 4  # STREAM_MAGIC, INSECURE_CONTROL_MAGIC
_RETRY_S = 0.01


class StalledOpening(TimeoutError):
    """The opening did not arrive by the deadline; `received` bytes of it had."""

    def __init__(self, received: int, needed: int) -> None:
        super().__init__(f"client sent {received} of the {needed} bytes of its opening before the deadline")
        self.received = received
        self.needed = needed


def opening_length(prefix: bytes) -> int:
    """How many bytes the opening that starts with `prefix` has (sans-IO).

    Grows as the prefix does: 1 (nothing yet), 4 for a magic, 5 for a TLS
    record's header, then 5 + the record's length.
    """
    if not prefix:
        return 1
    if prefix[0] != TLS_HANDSHAKE_BYTE:
        return MAGIC_LENGTH
    if len(prefix) < TLS_RECORD_HEADER:
        return TLS_RECORD_HEADER
    length = int.from_bytes(prefix[3:5], "big")
    if not 0 < length <= MAX_TLS_PLAINTEXT:
        raise ProtocolError(f"first TLS record claims {length} bytes (1 to {MAX_TLS_PLAINTEXT} allowed)")
    return TLS_RECORD_HEADER + length


def peek_opening(sock: socket.socket, deadline: float) -> bytes:
    """The connection's opening, left unread in the socket (see the module text).

    Raises StalledOpening at `deadline`, ConnectionError if the client closes
    (or the connection is evicted) first, ProtocolError for an impossible
    record length. Sleeps in the kernel, not in a polling loop: SO_RCVLOWAT
    makes the socket readable only once the bytes still missing have arrived,
    so a client trickling its ClientHello costs one wake-up per step.
    """
    data = b""
    try:
        while True:
            needed = opening_length(data)
            if len(data) >= needed:
                return data
            data = _peek_at_least(sock, needed, deadline, len(data))
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # the TLS layer reads byte streams
        except OSError:
            pass  # closed meanwhile


def _peek_at_least(sock: socket.socket, count: int, deadline: float, have: int) -> bytes:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StalledOpening(_waiting(sock, count, have), count)
        sock.settimeout(remaining)
        try:
            data = sock.recv(count, socket.MSG_PEEK)
        except TimeoutError:
            raise StalledOpening(_waiting(sock, count, have), count) from None
        if not data:
            raise ConnectionError("client closed before sending its opening")
        if len(data) >= count:
            return data
        # Fewer bytes than the low-water mark: the client half-closed, or the kernel woke us early.
        if _peer_hung_up(sock):
            raise ConnectionError(f"client closed after {len(data)} bytes of its opening")
        have = len(data)
        time.sleep(_RETRY_S)


def _waiting(sock: socket.socket, count: int, have: int) -> int:
    """How many bytes of the opening sit in the socket now (for the report; at least `have`)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        sock.settimeout(0.0)  # look, do not wait: the deadline has passed
        return max(have, len(sock.recv(count, socket.MSG_PEEK)))
    except OSError:
        return have


def _peer_hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))


class PortConnection:
    """An admitted connection, and the means to evict it from another thread.

    Closing a socket does not wake a thread blocked reading it (on Linux), and
    its descriptor number can be reused at once by the next accept(), so the
    accept thread never closes another thread's socket. It shuts down a
    duplicate descriptor instead: shutdown acts on the connection, so the
    owner's recv sees end-of-file and its poll a hang-up, and the duplicate
    keeps the number from being reused until `settle()` closes it under the
    same lock. The owner then fails, closes its socket and releases its slot
    (a no-op: the guard freed the slot when it chose to evict it).
    """

    def __init__(self, sock: socket.socket, address: tuple[Any, ...], slot: Slot) -> None:
        self.sock = sock
        self.address = address
        self.slot = slot
        self._lock = threading.Lock()
        self._handle: socket.socket | None = sock.dup()

    @property
    def peer_ip(self) -> str:
        return str(self.address[0])

    def evict(self) -> None:
        with self._lock:
            if self._handle is None:
                return  # settled: the connection is past the point where it could be evicted
            try:
                self._handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def settle(self) -> None:
        """No eviction from now on (idempotent): the owner keeps or hands over the socket."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class PortTable:
    """The connections on the migration port that may still be evicted, by slot id. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[int, PortConnection] = {}

    def add(self, sock: socket.socket, address: tuple[Any, ...], slot: Slot) -> PortConnection:
        connection = PortConnection(sock, address, slot)
        with self._lock:
            self._connections[slot.id] = connection
        return connection

    def evict(self, slots: tuple[Slot, ...]) -> list[PortConnection]:
        """Shut down the connections of `slots` (the guard freed them); returns those still here."""
        with self._lock:
            victims = [c for c in (self._connections.pop(s.id, None) for s in slots) if c is not None]
        for connection in victims:
            connection.evict()
        return victims

    def remove(self, connection: PortConnection) -> None:
        """The owner is done with the connection's pre-authentication phase, or with the connection."""
        with self._lock:
            self._connections.pop(connection.slot.id, None)
        connection.settle()

    def __len__(self) -> int:
        with self._lock:
            return len(self._connections)
