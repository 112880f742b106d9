"""A TCP relay in the path of a migration: it forwards, records, corrupts and cuts.

This is the attacker of THREATS.md T1/T2/T11 at the transport level: every
byte between two agents passes through it. It records both directions (to
search for the guest's secret), can flip a byte or rewrite a pattern in the
data stream (to tamper with guest memory), and can cut every connection at
once (a link failure). Loopback only; used by the tests and the lab.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sealift.lab.netns import enter_netns

DATA_STREAM_MAGIC = b"SLD1"
_STREAM_INDEX_AT = 4 + 16  # after the magic and the session id
CHUNK = 1 << 20


@dataclass
class Tamper:
    """What to change in the source-to-destination data stream (or, `reverse`, the way back)."""

    flip_offset: int | None = None  # flip one bit of the byte at this stream offset
    replace: tuple[bytes, bytes] | None = None  # rewrite a pattern (same length) wherever seen
    data_stream_only: bool = True  # False: also QEMU's own stream on the plain transport
    stream_index: int | None = None  # only data streams opened with this index (e.g. the disk streams')
    # The destination -> source direction of data streams instead (QEMU's return path in post-copy): flip one
    # bit of the last byte of the first chunk back once the relay forwarded `flip_offset` bytes in all (its
    # `forward_bytes`: the way back is measured by how far the way there went). The return path's records are
    # small and come a few at a time, so that byte is a record's tag. Once only.
    reverse: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Relay:
    def __init__(
        self, listen: tuple[str, int] = ("127.0.0.1", 0), record_limit: int = 1 << 30, netns: str | None = None
    ) -> None:
        self.netns = netns  # listen and connect inside this namespace (the lab's attacker host)
        with enter_netns(netns):
            self._server = socket.create_server(listen)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.target: tuple[str, int] | None = None
        self.tamper: Tamper | None = None
        # Called with each destination-to-source chunk before it is forwarded
        # (the lab's attacker reads the destination's answers, e.g. a port to hijack).
        self.on_reply: Callable[[bytes], None] | None = None
        self._record_limit = record_limit
        self._lock = threading.Lock()
        self._captured = bytearray()
        self.sessions: list[bytearray] = []  # per connection: what the client sent, for replay attacks
        self._sockets: list[socket.socket] = []
        self._cut = False
        self.connections = 0
        self.forward_bytes = 0
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)
        self._thread.start()

    # -- controls ---------------------------------------------------------------

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    def cut(self) -> None:
        """Break every connection and refuse new ones: the link is down."""
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            shut_down(sock)
            sock.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._server.close()

    # -- forwarding ---------------------------------------------------------

    def _accept_loop(self) -> None:
        for client in accepted(self._server):
            with self._lock:
                target = None if self._cut else self.target
            if target is None:
                client.close()
                continue
            try:
                with enter_netns(self.netns):
                    upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
                session = bytearray()
                self.sessions.append(session)
            kind: dict[str, bool] = {}  # the forward pump says whether it is a data stream (its opening tells)
            threading.Thread(target=self._pump, args=(client, upstream, True, session, kind), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, None, kind), daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        forward: bool,
        session: bytearray | None = None,
        kind: dict[str, bool] | None = None,
    ) -> None:
        offset = 0
        is_data_stream: bool | None = None
        stream_index: int | None = None
        try:
            while True:
                chunk = src.recv(CHUNK)
                if not chunk:
                    break
                if forward and is_data_stream is None:
                    is_data_stream = chunk.startswith(DATA_STREAM_MAGIC)
                    if kind is not None:
                        kind["data"] = is_data_stream
                    if is_data_stream and len(chunk) > _STREAM_INDEX_AT:
                        stream_index = chunk[_STREAM_INDEX_AT]  # STREAM_OPEN: magic, session id, index
                tamper = self.tamper
                if not forward and tamper is not None and tamper.reverse and kind is not None and kind.get("data"):
                    chunk = self._tamper_back(chunk, tamper)
                    tamper = None
                if (
                    forward
                    and tamper is not None
                    and not tamper.reverse
                    and (is_data_stream or not tamper.data_stream_only)
                    and tamper.stream_index in (None, stream_index)
                ):
                    chunk = self._apply_tamper(chunk, offset)
                if not forward and self.on_reply is not None:
                    self.on_reply(chunk)
                offset += len(chunk)
                self._record(chunk, forward)
                if session is not None and len(session) < self._record_limit:
                    session += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            shut_down(src, dst)

    def _apply_tamper(self, chunk: bytes, offset: int) -> bytes:
        tamper = self.tamper
        assert tamper is not None
        data = bytearray(chunk)
        if tamper.flip_offset is not None and offset <= tamper.flip_offset < offset + len(data):
            data[tamper.flip_offset - offset] ^= 0x01
            tamper.done.set()
        if tamper.replace is not None:
            old, new = tamper.replace
            position = data.find(old)
            while position >= 0:
                data[position : position + len(old)] = new
                tamper.done.set()
                position = data.find(old, position + len(new))
        return bytes(data)

    def _tamper_back(self, chunk: bytes, tamper: Tamper) -> bytes:
        """The reverse tamper: the last byte of the first chunk back once `flip_offset` bytes went forward."""
        if tamper.done.is_set() or self.forward_bytes < (tamper.flip_offset or 0):
            return chunk
        data = bytearray(chunk)
        data[-1] ^= 0x01
        tamper.done.set()
        return bytes(data)

    def _record(self, chunk: bytes, forward: bool) -> None:
        with self._lock:
            if forward:
                self.forward_bytes += len(chunk)
            if len(self._captured) + len(chunk) <= self._record_limit:
                self._captured += chunk


def accepted(server: socket.socket) -> Iterator[socket.socket]:
    """The connections `server` accepts, until it is closed (accept then fails)."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        yield conn


def shut_down(*sockets: socket.socket) -> None:
    """Shut both directions of each socket, so the threads copying on them stop; one already gone is fine."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
