"""One of libvirt's unix connections carried on one of the agents' data streams, both ways.

libvirt's connections talk both ways (the RPC of the two libvirtds, QEMU's
NBD client and server; the memory stream mostly one way), so a carrier runs
two threads at each end, each running the native relay core
(host/relaycore.py) with the GIL released: `up` seals what its unix connection says into
OPAQUE records (this end's key of the stream), `down` opens the peer's
records into the unix connection (the peer's key). Each data stream has
keys of its own (qemu relay's `stream_label`), so no two streams, and no
two directions, share an AES-GCM key and nonce. A unix connection's end
(EOF) travels as the authenticated END record, which half-closes the
other end's unix connection: a stream cut short never looks like a clean
end.
"""

from __future__ import annotations

import logging
import socket
import threading

from sealift.backends.qemu.relay import StreamDigest
from sealift.host import relaycore
from sealift.wire.datastream import DataStreamReader, DataStreamWriter

log = logging.getLogger(__name__)


class Carrier:
    """Copies `conn` <-> `data` until both directions have ended; `error` is what broke it, if anything."""

    def __init__(
        self,
        index: int,
        kind: str,
        conn: socket.socket,
        data: socket.socket,
        writer: DataStreamWriter,
        reader: DataStreamReader,
        digest_out: StreamDigest,
        digest_in: StreamDigest,
    ) -> None:
        self.index = index
        self.kind = kind
        self._conn = conn
        self._data = data
        self._writer = writer
        self._reader = reader
        self.digest_out = digest_out  # what this end sealed
        self.digest_in = digest_in  # what this end opened
        self._wire_before = writer.wire_bytes  # the kind record, sealed in Python
        self._out = relaycore.Progress()  # what the native core moved so far, read live
        self._in = relaycore.Progress()
        self.error: BaseException | None = None
        self.ended = False  # the peer's authenticated END arrived: its side of the connection ended cleanly
        self._threads = [
            threading.Thread(target=self._up, name=f"libvirt-up-{kind}-{index}", daemon=True),
            threading.Thread(target=self._down, name=f"libvirt-down-{kind}-{index}", daemon=True),
        ]

    @property
    def bytes_out(self) -> int:
        return self._out.plaintext_bytes

    @property
    def bytes_in(self) -> int:
        return self._in.plaintext_bytes

    @property
    def wire_bytes(self) -> int:
        return self._wire_before + self._out.wire_bytes

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _up(self) -> None:
        """The unix connection's bytes sealed by the native core (host/relaycore.py), END once it closes."""
        try:
            outcome = relaycore.seal_stream(self._conn, self._data, self._writer, progress=self._out)
            self.digest_out.absorb_native(outcome.digest_input)
            if outcome.error is not None:
                raise outcome.error
        except BaseException as exc:
            self._fail(exc)

    def _down(self) -> None:
        """The peer's records opened by the native core (each authenticated before it is written), up to END.

        `_up` uses the same data socket at the same time: TCP keeps the two
        directions' records apart, and each has its own key.
        """
        try:
            outcome = relaycore.open_stream(self._data, self._conn, self._reader, progress=self._in)
            self.digest_in.absorb_native(outcome.digest_input)
            if outcome.error is not None:
                raise outcome.error
            self.ended = True
            self._reader.close()
            try:
                self._conn.shutdown(socket.SHUT_WR)  # the peer's connection ended: so does ours, that way
            except OSError:
                pass
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Break both sides at once: libvirt then fails its migration (before the switchover it keeps the source)."""
        if self.error is None:
            self.error = exc
            code = getattr(exc, "code", type(exc).__name__)
            log.warning("libvirt's %s connection (data stream %d) broke (%s): %s", self.kind, self.index, code, exc)
        self.stop()

    def stop(self) -> None:
        for sock in (self._conn, self._data):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float) -> bool:
        """True once both directions ended (cleanly or not) within `timeout`."""
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        self.stop()
        self._conn.close()
        self._data.close()
