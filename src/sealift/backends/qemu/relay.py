"""Carrying QEMU's migration stream through the agents' data streams (the `sealift` transports).

Source: QEMU migrates to a private unix socket; each connection it opens
(the main channel first, then one per multifd channel) is copied by a pump
thread into OPAQUE records on a data stream of its own. Destination: one
feeder per data stream writes the records' bytes into its own connection to
the destination QEMU's unix socket, connected in the same order (QEMU takes
its first connection as the main channel). Each data stream has its own
keys (`stream_label`), so no two streams ever share an AES-GCM nonce.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

from blake3 import blake3

from sealift.host import relaycore
from sealift.host.transport import recv_exactly_into
from sealift.migration.errors import MigrationError
from sealift.wire.datastream import DataStreamReader, DataStreamWriter

QEMU_CONNECT_TIMEOUT_S = 10.0
PAGE = 4096
POLL_S = 0.02  # query-migrate period: also the precision of the pre-switchover stop
# What a unix socket between QEMU and a relay may queue. Linux's default
# (net.core.wmem_default, 208 KiB) is less than one record: the writer then
# blocks until the reader drains it, and QEMU and the relay take turns
# instead of running side by side (1 GiB guest here: 1.7x plain's time with
# the default on both sockets, 1.1x with this). The kernel doubles
# the figure for its bookkeeping: 4 MiB of queue, as deep as TCP's own.
RELAY_SOCKET_BUFFER = 2 * 1024 * 1024
# Python's socket module does not name SO_SNDBUFFORCE; 32 is its number on
# Linux (asm-generic, x86 and arm). Without it the size is capped at
# net.core.wmem_max, 208 KiB on a stock kernel: no wider than the default.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform == "linux" else None)


def private_dir(prefix: str) -> Path:
    """A mode 0700 directory with a short path for QEMU's unix sockets (their paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def widen_send_buffer(sock: socket.socket, size: int = RELAY_SOCKET_BUFFER) -> None:
    """Let `sock` queue `size` bytes before a send blocks (root may exceed net.core.wmem_max)."""
    if SO_SNDBUFFORCE is not None and os.geteuid() == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
            return
        except OSError:
            pass  # no CAP_NET_ADMIN in this namespace: the capped option below still helps
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def stream_label(migration_id: str, index: int) -> str:
    """What keys data stream `index` of a migration: stream 0 keeps the migration's own keys."""
    return migration_id if index == 0 else f"{migration_id}/stream-{index}"


# -- records -----------------------------------------------------------------------


def read_record(data: socket.socket, reader: DataStreamReader, header: bytearray | None = None) -> object:
    """One record off the data stream, opened; `header`, if given, receives its header bytes."""
    header = header if header is not None else bytearray(DataStreamReader.HEADER_SIZE)
    recv_exactly_into(data, memoryview(header))
    reader.read_header(header)
    recv_exactly_into(data, reader.payload_buffer())
    return reader.finish_record()


def send_opaque(
    data: socket.socket, writer: DataStreamWriter, payload: bytes, digest: StreamDigest | None = None
) -> None:
    buf = writer.opaque_buffer()
    buf[: len(payload)] = payload
    sealed = writer.finish_opaque(len(payload))
    if digest is not None:
        digest.update(payload, sealed[len(sealed) - digest.tag_size :])
    data.sendall(sealed)


# -- digest -----------------------------------------------------------------------


class StreamDigest:
    """What both agents hash to show they carried the same QEMU stream (checked against the signed manifest).

    Under AEAD every record's GCM tag already authenticates its bytes under
    the session key, and the sequence nonces fix their order, so BLAKE3 over
    the tags (16 bytes a record) commits to the whole stream for a fraction
    of the CPU of hashing every byte again (about 0.4 CPU-s per GiB on each
    side here, which on 2 cores the QEMUs need). Without protection
    (`sealift-plain`) there are no tags: the plaintext is hashed.
    """

    def __init__(self, tag_size: int) -> None:
        self._hasher = blake3()
        self.tag_size = tag_size
        self.label = "blake3-tags" if tag_size > 0 else "blake3"

    def update(self, plaintext: bytes | memoryview, tag: bytes | memoryview) -> None:
        self._hasher.update(tag if self.tag_size > 0 else plaintext)

    def absorb_native(self, digest_input: bytes) -> None:
        """What the native relay handed back for its records, hashed once: their tags, in order.

        Without protection the native relay never looks at QEMU's bytes
        (hashing them cost as much CPU as the copy), so it hands back the
        records' headers instead; the label says so. Nothing protects such a
        stream anyway, and TCP's checksum and the END totals still apply.
        """
        if self.tag_size == 0:
            self.label = "blake3-framing"
        self._hasher.update(digest_input)

    def hexdigest(self) -> str:
        return f"{self.label}:{self._hasher.hexdigest()}"


def combined_digest(digests: list[StreamDigest]) -> str:
    """One digest over every data stream of a migration, in stream order."""
    if len(digests) == 1:
        return digests[0].hexdigest()
    joined = "\n".join(d.hexdigest() for d in digests).encode()
    return f"{digests[0].label}-x{len(digests)}:{blake3(joined).hexdigest()}"


# -- source ----------------------------------------------------------------------------


class _StreamThread:
    """One data stream's copying thread, at either end: what it reports (index, digest, QEMU bytes, error)."""

    def __init__(self, index: int, digest: StreamDigest, timeout: float, thread_name: str) -> None:
        self.index = index
        self.digest = digest
        self._timeout = timeout
        self.error: BaseException | None = None  # what ended the thread, handed to the coordinator
        self._thread = threading.Thread(target=self._run, name=f"{thread_name}-{index}", daemon=True)

    def _run(self) -> None:
        raise NotImplementedError


class SourcePump(_StreamThread):
    """Copies one QEMU connection into OPAQUE records on one data stream (its own thread)."""

    def __init__(
        self, index: int, writer: DataStreamWriter, data: socket.socket, timeout: float, digest: StreamDigest
    ) -> None:
        super().__init__(index, digest, timeout, "qemu-pump-out")
        self._writer = writer
        self._data = data
        self.done = threading.Event()
        self._conn: socket.socket | None = None
        self._wire_before = writer.wire_bytes  # the guest description, sealed in Python
        self._progress = relaycore.Progress()  # what the native core has moved so far, read live

    @property
    def stream_bytes(self) -> int:
        """QEMU bytes carried so far (payload), live while the stream runs."""
        return self._progress.plaintext_bytes

    @property
    def wire_bytes(self) -> int:
        return self._wire_before + self._progress.wire_bytes

    def start(self, conn: socket.socket) -> None:
        self._conn = conn
        self._thread.start()

    def _run(self) -> None:
        assert self._conn is not None
        conn = self._conn
        try:
            conn.settimeout(self._timeout)  # QEMU silent that long: something is wrong
            # The native core seals until QEMU closes its end, then sends END (host/relaycore.py).
            outcome = relaycore.seal_stream(conn, self._data, self._writer, progress=self._progress)
            self.digest.absorb_native(outcome.digest_input)
            if outcome.error is not None:
                raise outcome.error
        except BaseException as exc:  # handed to the coordinator thread, which decides
            self.error = exc
        finally:
            conn.close()
            self.done.set()

    def stop(self) -> None:
        """Break QEMU's connection: a source QEMU still migrating then fails and keeps the guest."""
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class SourcePumps:
    """Takes QEMU's connections in the order it opens them (main channel, then multifd's), one per pump.

    `first` is the main channel when QEMU was handed a socket of ours
    (``fd:``) instead of connecting to `listener` (``unix:``, which multifd
    needs: QEMU opens each channel itself).
    """

    def __init__(
        self, pumps: list[SourcePump], listener: socket.socket | None = None, first: socket.socket | None = None
    ) -> None:
        if listener is None and (first is None or len(pumps) > 1):
            raise ValueError("QEMU's connections need a listener, but for a main channel given as `first`")
        self._listener = listener
        self._first = first
        self.pumps = pumps
        self._accept_error: BaseException | None = None
        self._acceptor = threading.Thread(target=self._accept_all, name="qemu-accept", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def _accept_all(self) -> None:
        try:
            waiting = self.pumps
            if self._first is not None:
                self.pumps[0].start(self._first)
                waiting = self.pumps[1:]
            if waiting:
                listener = self._listener
                assert listener is not None  # checked in __init__
                listener.settimeout(QEMU_CONNECT_TIMEOUT_S)
                for pump in waiting:
                    conn, _ = listener.accept()
                    pump.start(conn)
        except BaseException as exc:
            self._accept_error = exc

    @property
    def error(self) -> BaseException | None:
        if self._accept_error is not None:
            return self._accept_error
        return next((p.error for p in self.pumps if p.error is not None), None)

    @property
    def stream_bytes(self) -> int:
        return sum(p.stream_bytes for p in self.pumps)

    @property
    def wire_bytes(self) -> int:
        return sum(p.wire_bytes for p in self.pumps)

    def digest(self) -> str:
        return combined_digest([p.digest for p in self.pumps])

    def stop(self) -> None:
        for pump in self.pumps:
            pump.stop()

    def wait(self, timeout: float) -> None:
        self._acceptor.join(timeout)
        for pump in self.pumps:
            if self.error is None and not pump.done.wait(timeout):
                raise MigrationError(f"QEMU stream {pump.index} did not finish within {timeout:.0f} s of completion")
        if self.error is not None:
            raise MigrationError(f"sending the QEMU stream failed: {self.error}") from self.error


# -- destination ------------------------------------------------------------------------


def feed_qemu(data: socket.socket, reader: DataStreamReader, qemu: socket.socket, digest: StreamDigest) -> int:
    """Write one data stream's OPAQUE records into QEMU until END; the bytes fed.

    The native core opens them (host/relaycore.py): each record is
    authenticated before its bytes reach QEMU, and the stream counts as
    complete only with a valid END.
    """
    outcome = relaycore.open_stream(data, qemu, reader)
    digest.absorb_native(outcome.digest_input)
    if outcome.error is not None:
        raise outcome.error
    return outcome.plaintext_bytes


class StreamFeeder(_StreamThread):
    """A multifd channel's data stream into its QEMU connection, in a thread of its own.

    On failure it breaks the main data stream, so that the coordinator's
    thread (feeding the main channel) stops at once and reports this error.
    """

    def __init__(
        self,
        index: int,
        wait_stream,
        reader: DataStreamReader,
        qemu: socket.socket,
        digest: StreamDigest,
        main_data: socket.socket,
        timeout: float,
    ) -> None:
        super().__init__(index, digest, timeout, "qemu-feed")
        self.stream_bytes = 0  # QEMU bytes fed (payload), once the stream has ended
        self._wait_stream = wait_stream
        self._reader = reader
        self._qemu = qemu
        self._main_data = main_data

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        data: socket.socket | None = None
        try:
            data = self._wait_stream()
            data.settimeout(self._timeout)
            self.stream_bytes = feed_qemu(data, self._reader, self._qemu, self.digest)
        except BaseException as exc:
            self.error = exc
            try:
                self._main_data.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            if data is not None:
                data.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise MigrationError(f"multifd stream {self.index} did not end within {timeout:.0f} s of the main stream")
        if self.error is not None:
            raise MigrationError(f"multifd stream {self.index} failed: {self.error}") from self.error
