"""Storage migration of a QEMU guest's copied disks, through the sealift channel.

The sequence (the one libvirt's --copy-storage-all and Proxmox use):

destination: its QEMU starts (``-incoming defer``) on empty target images
    of the same format and size (definition.create_target); ``nbd-server-start``
    on a private unix socket, ``block-export-add`` (writable) of each target.
source: ``blockdev-add driver=nbd`` per disk on a unix socket of the source
    agent; ``blockdev-mirror sync=full|top copy-mode=write-blocking`` from the
    disk's node into it; wait until every job is ready (the target holds the
    whole disk, and from then every guest write reaches both before it
    completes); only then does the memory migration start.
at the pause (pre-switchover): ``block-job-cancel`` of each ready job (it
    completes cleanly without pivoting: the target is a point-in-time copy of
    the paused guest's disk), then ``migrate-continue``.
after the memory stream: ``blockdev-del`` of the NBD nodes (else the
    destination's export stays in use), the destination's ``nbd-server-stop``,
    and `cont` on Commit as usual.

Each disk's NBD connection crosses the agents in a data stream of its own,
keyed from its own label (`disk_label`): NBD is a dialogue (requests with
write payloads one way, replies with read data the other), so `DiskStream`
carries and seals both directions of the one connection, each direction a
thread in the native relay core (host/relaycore.py) with its own key. The tags of both
directions enter the stream digest in the signed manifest. A record that
does not open (a flipped byte) fails its stream, which breaks the NBD
connection: the source's mirror job fails (the guest's writes to its own
disk are unaffected) and the destination breaks its main stream, so the
migration aborts and the guest runs on at the source with its disk intact;
the destination removes the targets it created.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.backends.qemu import relay
from sealift.backends.qemu.definition import node_name
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.errors import SealiftError
from sealift.host import relaycore
from sealift.migration.errors import MigrationError
from sealift.wire.datastream import DataStreamReader, DataStreamWriter
from sealift.wire.messages import MAX_STREAMS
from sealift.wire.records import RecordProtection
from sealift.wire.vm_definition import VmDefinition

log = logging.getLogger(__name__)

DISK_STREAM_INDEX = MAX_STREAMS - 1  # the index disk streams announce in their STREAM_OPEN (keys: disk_label)
_NBD_CONNECT_TIMEOUT_S = 10.0
_JOB_POLL_S = 0.05


class DiskMirrorError(SealiftError):
    """A disk's mirror failed or did not become ready: the guest keeps running at the source."""

    code = "disk_mirror_failed"


def disk_label(migration_id: str, disk: int) -> str:
    """What keys disk `disk`'s data stream (never the same as a memory stream's label)."""
    return f"{migration_id}/disk-{disk}"


def nbd_node(disk: int) -> str:
    return f"sl-nbd{disk}"


def mirror_job(disk: int) -> str:
    return f"sl-mirror{disk}"


def export_id(disk: int) -> str:
    return f"sl-export{disk}"


# -- one NBD connection on one data stream, both directions ------------------------------


class DiskStream:
    """Carries one NBD connection over one data stream: QEMU's bytes sealed out, the peer's opened in.

    `outgoing` seals what our QEMU writes; `incoming` opens what the peer
    agent sends, which goes to our QEMU. Either direction failing shuts both
    sockets, so the other thread stops too, and `error` keeps the cause.
    """

    def __init__(
        self, disk: int, outgoing: RecordProtection, incoming: RecordProtection, on_error: Callable[[], None]
    ) -> None:
        self.disk = disk
        self._writer = DataStreamWriter(outgoing, 1, None)
        self._reader = DataStreamReader(incoming, 1)
        self.sent_digest = relay.StreamDigest(outgoing.overhead)
        self.received_digest = relay.StreamDigest(incoming.overhead)
        self._out = relaycore.Progress()  # what the native core sealed so far, read live
        self._in = relaycore.Progress()
        self.error: BaseException | None = None
        self._on_error = on_error
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def bytes_out(self) -> int:
        """QEMU's NBD bytes we sent."""
        return self._out.plaintext_bytes

    @property
    def bytes_in(self) -> int:
        """NBD bytes we received for our QEMU."""
        return self._in.plaintext_bytes

    @property
    def wire_bytes_out(self) -> int:
        return self._out.wire_bytes

    def run(self, qemu: socket.socket, data: socket.socket) -> None:
        """Start both directions (each its own thread); the sockets are ours from now on."""
        # Idle is normal (a mirror that is ready and a guest that does not write): no timeouts here;
        # an abort shuts the sockets, and keepalive finds a peer host that died.
        qemu.settimeout(None)
        data.settimeout(None)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self._lock:
            self._sockets = [qemu, data]
            stopped = self.error is not None  # stopped before it started: nothing to carry
        if stopped:
            self.stop()
            return
        for target, name in ((self._seal_out, "out"), (self._open_in, "in")):
            thread = threading.Thread(target=target, args=(qemu, data), name=f"disk{self.disk}-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _seal_out(self, qemu: socket.socket, data: socket.socket) -> None:
        """QEMU's NBD bytes sealed onto the data stream by the native core, END once QEMU closes."""
        try:
            outcome = relaycore.seal_stream(qemu, data, self._writer, progress=self._out)
            self.sent_digest.absorb_native(outcome.digest_input)
            if outcome.error is not None:
                raise outcome.error
        except BaseException as exc:
            self.fail(exc)

    def _open_in(self, qemu: socket.socket, data: socket.socket) -> None:
        """The peer's records opened into QEMU by the native core (each authenticated first), up to END.

        The other direction's thread uses the same data socket at the same
        time: TCP carries each direction's records apart, each with its own key.
        """
        try:
            outcome = relaycore.open_stream(data, qemu, self._reader, progress=self._in)
            self.received_digest.absorb_native(outcome.digest_input)
            if outcome.error is not None:
                raise outcome.error
            self._reader.close()
            qemu.shutdown(socket.SHUT_WR)  # the peer is done: our QEMU sees the end of the connection
        except BaseException as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            first = self.error is None
            if first:
                self.error = exc
        self.stop()
        if first:
            self._on_error()

    def stop(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float) -> None:
        """Both directions ended (END each way) within `timeout`, else an error."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self.stop()
            raise MigrationError(f"disk {self.disk}'s stream did not end within {timeout:.0f} s", code="stream_failed")
        if self.error is not None:
            raise MigrationError(f"disk {self.disk}'s stream failed: {self.error}", code="stream_failed")

    def close(self) -> None:
        self.stop()
        for thread in self._threads:
            thread.join(2.0)
        for sock in self._sockets:
            sock.close()


# -- source ---------------------------------------------------------------------------------


def _carry_when_connected(listener: socket.socket, stream: DiskStream, data: socket.socket) -> threading.Thread:
    """Accept QEMU's NBD connection and start carrying it at once, in a thread.

    QEMU connects and does the NBD handshake inside blockdev-add, holding its
    big lock: the handshake must cross to the destination while we still wait
    for that command's answer.
    """

    def accept() -> None:
        try:
            conn = listener.accept()[0]
        except OSError as exc:
            data.close()
            stream.fail(exc)
            return
        stream.run(conn, data)

    thread = threading.Thread(target=accept, name=f"nbd-accept-{stream.disk}", daemon=True)
    thread.start()
    return thread


@dataclass
class MirrorFigures:
    disks: int = 0
    disk_bytes_sent: int = 0  # sealed bytes of the disk streams, source -> destination
    mirror_time_s: float | None = None  # from the first blockdev-mirror to every job ready


class SourceStorage:
    """The source's half: NBD relays, mirror jobs, their cancel at the pause, and the clean-up."""

    def __init__(self, vm: QemuVM, definition: VmDefinition, timeout: float) -> None:
        self._vm = vm
        self._disks = definition.copied
        self._definition = definition
        self._timeout = timeout
        self._streams: list[DiskStream] = []
        self._dir = relay.private_dir("sl-nbd-")
        self._nodes: list[int] = []  # NBD nodes added (to delete)
        self._jobs: list[int] = []  # mirror jobs started (to cancel and dismiss)
        self.figures = MirrorFigures(disks=len(self._disks))

    @property
    def error(self) -> BaseException | None:
        return next((s.error for s in self._streams if s.error is not None), None)

    def connect(
        self,
        sessions: tuple[bytes, ...],
        protections: Callable[[int], tuple[RecordProtection, RecordProtection]],
        open_stream: Callable[[bytes], socket.socket],
    ) -> None:
        """One NBD node per copied disk, its connection carried to the destination's export."""
        if len(sessions) != len(self._disks):
            raise MigrationError(f"the destination opened {len(sessions)} disk streams for {len(self._disks)} disks")
        self._clear_leftovers()
        for disk, session in zip(self._disks, sessions, strict=True):
            outgoing, incoming = protections(disk)
            stream = DiskStream(disk, outgoing, incoming, on_error=lambda: None)
            self._streams.append(stream)
            path = self._dir / f"nbd{disk}.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(path))
                listener.listen(1)
                listener.settimeout(_NBD_CONNECT_TIMEOUT_S)
                acceptor = _carry_when_connected(listener, stream, open_stream(session))
                try:
                    # QEMU connects and does the NBD handshake inside blockdev-add: our acceptor must run.
                    self._vm.qmp(
                        "blockdev-add",
                        {
                            "driver": "nbd",
                            "node-name": nbd_node(disk),
                            "server": {"type": "unix", "path": str(path)},
                            "export": node_name(disk),
                        },
                        timeout=_NBD_CONNECT_TIMEOUT_S + self._timeout,
                    )
                    self._nodes.append(disk)
                finally:
                    acceptor.join(_NBD_CONNECT_TIMEOUT_S)
                if stream.error is not None:
                    raise DiskMirrorError(f"disk {disk}'s NBD connection failed: {stream.error}")
            except QemuError as exc:
                raise DiskMirrorError(f"disk {disk}: QEMU could not reach the destination's export: {exc}") from exc
            finally:
                listener.close()
                path.unlink(missing_ok=True)

    def mirror(self, progress: Callable[[dict[str, object]], None], check: Callable[[], None]) -> None:
        """Mirror every copied disk and wait until every job is ready; `check` may raise to give up."""
        started = time.monotonic()
        for disk in self._disks:
            sync = "top" if self._definition.disks[disk].backing is not None else "full"
            self._vm.qmp(
                "blockdev-mirror",
                {
                    "job-id": mirror_job(disk),
                    "device": node_name(disk),
                    "target": nbd_node(disk),
                    "sync": sync,
                    "copy-mode": "write-blocking",  # from ready on, a guest write completes only once both have it
                    "auto-dismiss": False,  # we read its outcome, then dismiss it
                },
            )
            self._jobs.append(disk)
        last_seen, last_progress = (-1, -1), time.monotonic()
        while True:
            try:
                jobs = self._job_states()
            except QemuError as exc:  # seen here: a target that stops answering can hold QEMU's main loop
                raise DiskMirrorError(f"QEMU stopped answering during the disk mirror: {exc}") from exc
            done = sum(int(job.get("current-progress", 0)) for job in jobs.values())
            total = sum(int(job.get("total-progress", 0)) for job in jobs.values())
            ready = [disk for disk, job in jobs.items() if job.get("status") == "ready"]
            if (done, len(ready)) != last_seen:  # bytes copied, or one more disk ready: progress
                last_seen, last_progress = (done, len(ready)), time.monotonic()
                progress({"disks": len(self._disks), "ready": len(ready), "bytes_done": done, "bytes_total": total})
            if len(ready) == len(self._disks):
                self.figures.mirror_time_s = round(time.monotonic() - started, 3)
                return
            if time.monotonic() - last_progress > self._timeout:
                raise DiskMirrorError(
                    f"the disk mirror made no progress for {self._timeout:.0f} s "
                    f"({done} of {total} bytes, {len(ready)} of {len(self._disks)} disks ready)"
                )
            check()
            self._vm.wait_event(_JOB_POLL_S)

    def _job_states(self) -> dict[int, dict[str, Any]]:
        """Our mirror jobs by disk; a job that failed raises (with QEMU's reason, or the stream's)."""
        if self.error is not None:
            raise DiskMirrorError(f"a disk stream failed: {self.error}")
        jobs = {str(job.get("id")): job for job in self._vm.qmp("query-jobs")}
        states: dict[int, dict[str, Any]] = {}
        for disk in self._jobs:
            job = jobs.get(mirror_job(disk))
            if job is None:
                raise DiskMirrorError(f"disk {disk}'s mirror job is gone")
            if job.get("status") in ("aborting", "concluded", "null") or "error" in job:
                raise DiskMirrorError(f"disk {disk}'s mirror failed: {job.get('error', job.get('status'))}")
            states[disk] = job
        return states

    def at_switchover(self) -> None:
        """The guest is paused: end every ready job cleanly (no pivot); the targets are complete copies."""
        self._job_states()  # all still ready, none failed
        for disk in self._jobs:
            self._vm.qmp("block-job-cancel", {"device": mirror_job(disk)})
        deadline = time.monotonic() + self._timeout
        pending = set(self._jobs)
        while pending:
            jobs = {str(job.get("id")): job for job in self._vm.qmp("query-jobs")}
            for disk in sorted(pending):
                job = jobs.get(mirror_job(disk), {})
                if job.get("status") == "concluded":
                    if "error" in job:
                        raise DiskMirrorError(f"disk {disk}'s mirror ended with an error: {job['error']}")
                    self._vm.qmp("job-dismiss", {"id": mirror_job(disk)})
                    pending.discard(disk)
            if pending and time.monotonic() > deadline:
                raise DiskMirrorError(f"the mirror jobs of disks {sorted(pending)} did not complete at the pause")
            if pending:
                self._vm.wait_event(_JOB_POLL_S)
        self._jobs = []

    def finish(self) -> list[relay.StreamDigest]:
        """After the memory stream: drop the NBD nodes, wait for both ends of each stream; their digests."""
        self._delete_nodes()
        digests: list[relay.StreamDigest] = []
        for stream in self._streams:
            stream.join(self._timeout)
            digests += [stream.sent_digest, stream.received_digest]  # source -> destination first
        self.figures.disk_bytes_sent = sum(stream.wire_bytes_out for stream in self._streams)
        return digests

    def _delete_nodes(self) -> None:
        for disk in list(self._nodes):
            self._vm.qmp("blockdev-del", {"node-name": nbd_node(disk)})
            self._nodes.remove(disk)

    def abort(self) -> None:
        """Any failure: stop the streams, end our jobs (force), drop the NBD nodes; the source's disk is untouched.

        The streams go first: a job whose target stalls cannot finish its
        in-flight requests, so it would not conclude (nor its node go) while
        the NBD connection lives; broken, the requests fail at once.
        """
        for stream in self._streams:
            stream.stop()
        for disk in self._jobs:
            self._try("block-job-cancel", {"device": mirror_job(disk), "force": True})
            self._wait_concluded(mirror_job(disk))
            self._try("job-dismiss", {"id": mirror_job(disk)})
        self._jobs = []
        for disk in list(self._nodes):
            self._try("blockdev-del", {"node-name": nbd_node(disk)})
            self._nodes.remove(disk)
        self.close()

    def _clear_leftovers(self) -> None:
        """End what an earlier attempt left in this QEMU: its agent was killed before the clean-up (or QEMU
        refused a clean-up step then). A mirror job or an NBD node of the same name would make this
        migration's blockdev-add or blockdev-mirror fail ("Duplicate node name")."""
        jobs = {str(job.get("id")): job for job in self._vm.qmp("query-jobs")}
        for disk in self._disks:
            job = jobs.get(mirror_job(disk))
            if job is None:
                continue
            log.warning("%s: ending the mirror job an earlier migration left (%s)", self._vm.name, job.get("status"))
            if job.get("status") != "concluded":
                self._try("block-job-cancel", {"device": mirror_job(disk), "force": True})
                self._wait_concluded(mirror_job(disk))
            self._try("job-dismiss", {"id": mirror_job(disk)})
        nodes = {str(node.get("node-name")) for node in self._vm.qmp("query-named-block-nodes")}
        for disk in self._disks:
            if nbd_node(disk) in nodes:
                log.warning("%s: deleting the NBD node an earlier migration left (%s)", self._vm.name, nbd_node(disk))
                self._try("blockdev-del", {"node-name": nbd_node(disk)})

    def _wait_concluded(self, job_id: str) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                jobs = {str(job.get("id")): job for job in self._vm.qmp("query-jobs")}
            except QemuError:
                return
            if jobs.get(job_id, {}).get("status", "concluded") == "concluded":
                return
            time.sleep(_JOB_POLL_S)

    def _try(self, command: str, arguments: Mapping[str, object]) -> None:
        try:
            self._vm.qmp(command, arguments)
        except QemuError as exc:
            log.warning("clean-up of the disk mirror: %s: %s", command, exc)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        for leftover in self._dir.glob("*"):
            leftover.unlink(missing_ok=True)
        self._dir.rmdir()


# -- destination ----------------------------------------------------------------------------


class DestinationStorage:
    """The destination's half: the NBD server and exports of its targets, and the streams into them."""

    def __init__(self, definition: VmDefinition, timeout: float) -> None:
        self.disks = self._disks = definition.copied
        self._timeout = timeout
        self._dir = relay.private_dir("sl-nbdin-")
        self._socket = self._dir / "nbd.sock"
        self._streams: list[DiskStream] = []
        self._threads: list[threading.Thread] = []
        self._serving = False

    def serve(self, qemu: QemuVM) -> None:
        """NBD server on a private unix socket; one writable export per copied disk, named like its node."""
        if not self._disks:
            return
        qemu.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self._socket)}}})
        self._serving = True
        for disk in self._disks:
            qemu.qmp(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": export_id(disk),
                    "node-name": node_name(disk),
                    "name": node_name(disk),
                    "writable": True,
                },
            )

    def accept_streams(
        self,
        sessions: tuple[bytes, ...],
        protections: Callable[[int], tuple[RecordProtection, RecordProtection]],
        wait_stream: Callable[[bytes], socket.socket],
        on_error: Callable[[], None],
    ) -> None:
        """A thread per disk: wait for its data stream, connect to our NBD server, carry both ways."""
        for disk, session in zip(self._disks, sessions, strict=True):
            incoming, outgoing = protections(disk)
            stream = DiskStream(disk, outgoing, incoming, on_error)
            self._streams.append(stream)
            thread = threading.Thread(
                target=self._connect, args=(stream, session, wait_stream), name=f"disk{disk}-in", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _connect(self, stream: DiskStream, session: bytes, wait_stream: Callable[[bytes], socket.socket]) -> None:
        data: socket.socket | None = None
        try:
            data = wait_stream(session)
            qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            qemu.settimeout(_NBD_CONNECT_TIMEOUT_S)
            qemu.connect(str(self._socket))
            stream.run(qemu, data)
        except BaseException as exc:
            if data is not None:
                data.close()
            stream.fail(exc)

    @property
    def error(self) -> BaseException | None:
        return next((s.error for s in self._streams if s.error is not None), None)

    def bytes_moved(self) -> int:
        return sum(stream.bytes_in + stream.bytes_out for stream in self._streams)

    def join(self) -> list[relay.StreamDigest]:
        """After the memory stream: every disk stream ended both ways; their digests (as the source lists them)."""
        for thread in self._threads:
            thread.join(self._timeout)
        digests: list[relay.StreamDigest] = []
        for stream in self._streams:
            stream.join(self._timeout)
            digests += [stream.received_digest, stream.sent_digest]  # source -> destination first
        return digests

    def stop_server(self, qemu: QemuVM) -> None:
        if self._serving:
            qemu.qmp("nbd-server-stop")
            self._serving = False

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._socket.unlink(missing_ok=True)
        try:
            self._dir.rmdir()
        except OSError:
            pass


def target_name(vm: str, disk: int, migration_id: str, fmt: str) -> str:
    """The file name of a copied disk's target: it carries the migration's id, so the recovery after a
    crash finds exactly the images that migration created (`incoming_targets`), even without its QEMU."""
    return f"{vm}-disk{disk}-{migration_id}.{fmt}"


def incoming_targets(disk_dir: Path, vm: str, migration_id: str) -> list[Path]:
    """The target images migration `migration_id` of `vm` created in `disk_dir` (target_name's)."""
    if not disk_dir.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(vm)}-disk\d+-{re.escape(migration_id)}\.(qcow2|raw)")
    return sorted(p for p in disk_dir.iterdir() if pattern.fullmatch(p.name))


def remove_targets(paths: list[Path]) -> None:
    """The destination's failure path: the target images it created go (never a disk it did not create)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not remove the target image %s: %s", path, exc)
