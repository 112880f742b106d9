"""The source side of a libvirt domain's migration: libvirt migrates, sealift carries every socket.

Once the agents have agreed (order, policy, PSK, admission: the one
coordinator), the source agent serves three unix sockets in a directory
named after the migration under `[libvirt] socket_dir`, the same path on
both hosts (libvirt hands QEMU the same unix:// URI at both ends):

    ctl  the destination libvirtd's RPC (migrateToURI3's dconnuri
         qemu+unix:///system?socket=.../ctl: the source libvirtd drives the
         peer-to-peer migration through it)
    mem  QEMU's memory stream (VIR_MIGRATE_PARAM_URI unix://.../mem)
    nbd  the disks' NBD copy (VIR_MIGRATE_PARAM_DISKS_URI unix://.../nbd)

Each connection libvirt or QEMU opens there is carried on a data stream of
its own (carrier.py) to the destination agent, which connects it to its
libvirtd's socket or to the socket of the same name its libvirt opened. The
destination libvirtd never listens on a network.

libvirt leaves the destination domain paused (VIR_MIGRATE_PAUSED): it runs
only when the destination agent has the Commit. libvirt's own switchover
(its Finish: the source QEMU quits) comes before sealift's signed steps, so
it is the source's point of no return: the moment libvirt says it handed the
domain over (migrateToURI3 succeeded, or the domain is shut off with reason
"migrated"), the coordinator records that decision (phase handed-over),
before anything else can fail. The source keeps its
(stopped) definition until the destination's running receipt, then
undefines it (release), so a migration that fails after libvirt's own
switchover still has the source's definition and disks on record.
"""

from __future__ import annotations

import logging
import select
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import libvirt

from sealift.backends.libvirt.carrier import Carrier
from sealift.backends.libvirt.paths import local_path
from sealift.backends.libvirt.registry import BACKEND, LibvirtDomain, LibvirtRegistry
from sealift.backends.libvirt.spec import Disk, DomainOffer, encode_kind
from sealift.backends.qemu import relay
from sealift.host.transport import ControlChannel, open_data_stream
from sealift.migration.errors import MigrationError
from sealift.migration.phases import Event
from sealift.migration.session import SourceSession
from sealift.migration.streams import stream_protections
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Accept, Hello
from sealift.wire.qemu_stream import Ready

log = logging.getLogger(__name__)

SOCKETS = {"ctl": "control", "mem": "memory", "nbd": "disk"}  # socket file -> the stream kind it carries
POLL_S = 0.05  # libvirt's job is polled this often: also how precisely the switchover's start is seen
END_GRACE_S = 10.0  # after libvirt's migration returned: how long its connections may take to close
# libvirt's job statistics the report keeps (what `virsh domjobinfo --completed` prints)
JOB_FIELDS = (
    "time_elapsed",
    "downtime",
    "setup_time",
    "memory_total",
    "memory_processed",
    "memory_remaining",
    "memory_iteration",
    "memory_dirty_rate",
    "memory_bps",
    "disk_total",
    "disk_processed",
    "disk_bps",
)


@dataclass
class LibvirtTransfer:
    paused_at: float
    digest: str
    stream_bytes: int
    wire_bytes: int
    job: dict[str, int]  # libvirt's completed job statistics (JOB_FIELDS it gave)
    connections: dict[str, int]  # carried connections by kind


def migration_flags(shared_disks: bool, auto_converge: bool) -> int:
    """What sealift asks of libvirt: live, peer to peer, defined and paused at the destination."""
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    flags |= libvirt.VIR_MIGRATE_PAUSED  # it runs there only on sealift's Commit
    if not shared_disks:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    return flags


class LibvirtSourceDriver:
    backend = BACKEND
    start_audit: Mapping[str, object] = {"backend": BACKEND}

    def __init__(self, session: SourceSession, domains: LibvirtRegistry) -> None:
        if session.options.multifd_channels or session.options.xbzrle or session.options.compression:
            raise ValueError("libvirt domains take no multifd, xbzrle or compression option here")
        self._session = session
        self._domains = domains
        self._socket_id = session.migration_id[:16]
        self._carriers: list[Carrier] = []
        self._carriers_lock = threading.Lock()
        self._accept_error: BaseException | None = None
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._dir: Path | None = None
        self._handover_recorded = False

    # -- the driver's steps ---------------------------------------------------------------

    def preflight(self, address: tuple[str, int]) -> None:
        self._domains.connection()  # libvirtd must answer before anything is claimed

    def claim(self) -> tuple[LibvirtDomain, int]:
        domain = self._domains.claim(self._session.vm_name)
        if domain.state() != "running":
            self._domains.unclaim(domain.name)
            raise MigrationError(
                f"libvirt domain {domain.name} is {domain.state()}, not running", code="vm_not_running"
            )
        return domain, domain.memory_bytes

    def describe(self, vm: LibvirtDomain, psk_proof: str | None) -> Hello:
        return self._session.hello(
            vm_name=vm.name,
            backend=BACKEND,
            memory_bytes=vm.memory_bytes,
            page_size=relay.PAGE,
            compression=None,
            psk_proof=psk_proof,
            image_digest=None,
        )

    def transfer(
        self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: LibvirtDomain
    ) -> LibvirtTransfer:
        s = self._session
        outgoing, incoming = stream_protections(channel, s.options.secure, s.nonce, accept.nonce, s.migration_id)
        writer = DataStreamWriter(outgoing, 1, None)
        digest = relay.StreamDigest(outgoing.overhead)
        data = open_data_stream(address, accept.session_id, 0, s.config.step_timeout_s)
        try:
            offer = DomainOffer(vm.name, vm.uuid, self._socket_id, self._disks(vm))
            relay.send_opaque(data, writer, offer.encode(), digest)
            ready = self._await_ready(channel, data, DataStreamReader(incoming, 1))
            self._serve_sockets(channel, accept, address, ready.extra_sessions)
            s.enter(Event.BEGIN_PRECOPY)
            job, paused_at = self._migrate(vm, shared_disks=not offer.disks)  # handed over once it returns
            self._end_carriers()
            data.sendall(writer.end())  # every connection ended: the destination may check the streams
            digests = [digest]
            for carrier in self._sorted_carriers():
                digests += [carrier.digest_out, carrier.digest_in]
            kinds: dict[str, int] = {}
            for carrier in self._sorted_carriers():
                kinds[carrier.kind] = kinds.get(carrier.kind, 0) + 1
            return LibvirtTransfer(
                paused_at=paused_at,
                digest=relay.combined_digest(digests),
                stream_bytes=sum(c.bytes_out + c.bytes_in for c in self._carriers),
                wire_bytes=sum(c.wire_bytes for c in self._carriers),
                job=job,
                connections=kinds,
            )
        finally:
            data.close()

    def manifest_fields(self, transfer: LibvirtTransfer) -> tuple[dict[str, object], dict[str, object]]:
        domain = self._domains.lookup(self._session.vm_name)
        fields: dict[str, object] = {
            "backend": BACKEND,
            "image_digest": transfer.digest,
            "state_digest": None,
            "stream_bytes": transfer.stream_bytes,
            "domain_uuid": domain.uuid if domain is not None else None,
            "libvirt_job": transfer.job,
        }
        return fields, {"image_digest": transfer.digest, "stream_bytes": transfer.stream_bytes}

    def fill_report(self, transfer: LibvirtTransfer) -> None:
        report, job = self._session.report, transfer.job
        report.rounds = job.get("memory_iteration", 0)
        report.pages_sent = job.get("memory_processed", 0) // relay.PAGE
        report.bytes_sent = transfer.wire_bytes
        report.image_digest = transfer.digest
        report.stop_reason = (
            f"libvirt: total {job.get('time_elapsed')} ms, downtime {job.get('downtime')} ms, "
            f"memory {job.get('memory_processed')} B in {job.get('memory_iteration')} passes, "
            f"disks {job.get('disk_processed')} of {job.get('disk_total')} B; "
            f"connections carried: {', '.join(f'{k} {n}' for k, n in sorted(transfer.connections.items()))}"
        )
        self._session.audit("libvirt.job_stats", vm=report.vm, **job)

    def resume(self, vm: LibvirtDomain) -> bool:
        """Before the decision. libvirt resumes the source itself when its migration fails; make sure."""
        self._stop_carriers()
        try:
            self._cancel_job(vm)
            if not vm.dom.isActive():
                # libvirt completed its switchover: the only copy is the destination's, paused. If it did so
                # after we gave up waiting for it, record it now: the record then goes in doubt, not aborted,
                # and the resolver starts the destination's copy.
                log.error("%s: libvirt had already handed the domain over; it is not running here", vm.name)
                if _handed_over(vm):
                    self._record_handover()
                return False
            vm.resume()
            return vm.state() == "running"
        except libvirt.libvirtError as exc:
            log.error("could not resume %s after the failed migration: %s", vm.name, exc)
            return False

    def unclaim(self, vm: LibvirtDomain) -> None:
        self._domains.unclaim(vm.name)

    def release(self, vm: LibvirtDomain) -> None:
        self._domains.release_migrated(vm.name)

    def cleanup(self, vm: LibvirtDomain) -> None:
        self._stop_carriers()
        for listener in self._listeners:
            listener.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- the sockets -----------------------------------------------------------------------

    def _disks(self, vm: LibvirtDomain) -> tuple[Disk, ...]:
        disks = []
        for disk in vm.disks():
            if disk.fmt != "qcow2":
                raise MigrationError(f"{vm.name}'s disk {disk.target} is {disk.fmt}; only qcow2 disks are copied")
            capacity, _allocation, _physical = vm.dom.blockInfo(disk.path)
            disks.append(Disk(disk.target, disk.path, int(capacity)))
        return tuple(disks)

    def _await_ready(self, channel: ControlChannel, data: socket.socket, reader: DataStreamReader) -> Ready:
        s = self._session
        data.settimeout(s.config.step_timeout_s)
        try:
            event = relay.read_record(data, reader)
        except (OSError, ProtocolError) as exc:
            abort = channel.abort_within(1.0)
            if abort is not None:
                raise MigrationError(f"{s.destination} aborted: {abort.reason}", code=abort.code) from None
            raise MigrationError(f"{s.destination} closed the data stream before it was ready: {exc}") from exc
        if not isinstance(event, OpaqueReceived):
            raise MigrationError(f"{s.destination} sent {type(event).__name__} instead of its ready record")
        return Ready.decode(bytes(event.data))

    def _serve_sockets(
        self, channel: ControlChannel, accept: Accept, address: tuple[str, int], sessions: tuple[bytes, ...]
    ) -> None:
        """Listen on ctl, mem and nbd; carry each connection on the next of the destination's data streams."""
        config = self._domains.config
        self._dir = local_path(f"{config.socket_dir}/{self._socket_id}", config.local_root)
        self._dir.mkdir(mode=0o700, parents=True)
        for name in SOCKETS:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self._dir / name))
            listener.listen(4)
            self._listeners.append(listener)
        pool = list(enumerate(sessions, 1))
        threading.Thread(
            target=self._accept_all, args=(channel, accept, address, pool), name="libvirt-accept", daemon=True
        ).start()

    def _accept_all(
        self, channel: ControlChannel, accept: Accept, address: tuple[str, int], pool: list[tuple[int, bytes]]
    ) -> None:
        s = self._session
        kinds = {listener: SOCKETS[name] for listener, name in zip(self._listeners, SOCKETS, strict=True)}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(list(kinds), [], [], POLL_S)
                for listener in readable:
                    conn, _ = listener.accept()
                    if not pool:
                        conn.close()
                        raise MigrationError(f"libvirt opened more connections than {s.destination} offered streams")
                    index, session = pool.pop(0)
                    self._carry(channel, accept, address, index, session, kinds[listener], conn)
        except BaseException as exc:  # handed to the thread following libvirt's job
            if not self._stop.is_set():
                self._accept_error = exc

    def _carry(
        self,
        channel: ControlChannel,
        accept: Accept,
        address: tuple[str, int],
        index: int,
        session: bytes,
        kind: str,
        conn: socket.socket,
    ) -> None:
        s = self._session
        label = relay.stream_label(s.migration_id, index)
        outgoing, incoming = stream_protections(channel, s.options.secure, s.nonce, accept.nonce, label)
        data = open_data_stream(address, session, index, s.config.step_timeout_s)
        data.settimeout(None)  # libvirt's RPC connection may sit idle while QEMU copies
        writer = DataStreamWriter(outgoing, 1, None)
        digest_out = relay.StreamDigest(outgoing.overhead)
        relay.send_opaque(data, writer, encode_kind(kind), digest_out)
        carrier = Carrier(
            index,
            kind,
            conn,
            data,
            writer,
            DataStreamReader(incoming, 1),
            digest_out,
            relay.StreamDigest(incoming.overhead),
        )
        with self._carriers_lock:
            self._carriers.append(carrier)
        carrier.start()
        log.info("%s: carrying libvirt's %s connection on data stream %d", s.migration_id, kind, index)

    def _sorted_carriers(self) -> list[Carrier]:
        with self._carriers_lock:
            return sorted(self._carriers, key=lambda c: c.index)

    def _carrier_error(self) -> BaseException | None:
        if self._accept_error is not None:
            return self._accept_error
        return next((c.error for c in self._sorted_carriers() if c.error is not None), None)

    def _end_carriers(self) -> None:
        """libvirt's migration returned: its connections close; wait for each stream's END both ways."""
        self._stop.set()
        deadline = time.monotonic() + END_GRACE_S
        for carrier in self._sorted_carriers():
            if not carrier.join(max(0.0, deadline - time.monotonic())):
                # libvirt keeps nothing open once migrateToURI3 returned: a lingering one is cut.
                log.warning("%s connection %d still open after the migration; closing it", carrier.kind, carrier.index)
                carrier.stop()
                carrier.join(2.0)
        error = self._carrier_error()
        if error is not None:
            raise MigrationError(f"carrying libvirt's connections failed: {error}", code="stream_failed")

    def _stop_carriers(self) -> None:
        self._stop.set()
        for carrier in self._sorted_carriers():
            carrier.close()

    # -- libvirt's migration -----------------------------------------------------------------

    def _migrate(self, vm: LibvirtDomain, shared_disks: bool) -> tuple[dict[str, int], float]:
        """Run migrateToURI3 in a thread, follow its job; (libvirt's completed job statistics, paused_at)."""
        s, config = self._session, self._domains.config
        base = f"{config.socket_dir}/{self._socket_id}"
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_URI: f"unix://{base}/mem"}
        if not shared_disks:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"unix://{base}/nbd"
        if s.options.bandwidth_limit_bps:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, s.options.bandwidth_limit_bps >> 20)  # MiB/s
        vm.dom.migrateSetMaxDowntime(s.options.downtime_limit_ms)
        s.report.counter_at_pause = None
        outcome: dict[str, BaseException | None] = {}

        def run() -> None:
            try:
                vm.dom.migrateToURI3(
                    f"qemu+unix:///system?socket={base}/ctl",
                    params,
                    migration_flags(shared_disks, s.options.auto_converge),
                )
                outcome["error"] = None
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="libvirt-migrate", daemon=True)
        worker.start()
        started = time.monotonic()
        last: dict[str, int] = {}
        paused_at: float | None = None
        try:
            while worker.is_alive():
                worker.join(POLL_S)
                if paused_at is None and _paused_for_migration(vm):
                    paused_at = time.monotonic()  # libvirt's switchover began: the downtime starts here
                error = self._carrier_error()
                if error is not None:
                    raise MigrationError(f"carrying libvirt's connections failed: {error}", code="stream_failed")
                s.flight.check()  # a newly revoked destination or operator: libvirt cancels, the guest runs on here
                self._check_completion_timeout(time.monotonic() - started)
                last = self._progress(vm) or last
        except BaseException:
            self._cancel_job(vm)
            worker.join(s.config.step_timeout_s)
            # libvirt may have finished its switchover before the cancel reached it: then it is done, not off
            if not worker.is_alive() and _handed_over(vm):
                self._record_handover()
            raise
        returned = time.monotonic()
        error = outcome.get("error")
        if error is None or _handed_over(vm):
            # The source's copy has quit; the only one waits paused at the destination. Recorded before
            # anything else can fail (even an error that libvirt reported after its Finish).
            self._record_handover()
        if error is not None:
            raise MigrationError(f"libvirt's migration failed: {error}", code="libvirt_migration_failed") from error
        s.report.counter_at_pause = vm.counter()
        job = self._completed_job(vm) or last
        if paused_at is None:  # the switchover fell between two polls: libvirt's own downtime places it
            paused_at = returned - job.get("downtime", 0) / 1000.0
        return job, paused_at

    def _record_handover(self) -> None:
        if self._handover_recorded:
            return
        assert self._session.handed_over is not None  # the coordinator sets it before the transfer
        self._session.handed_over()
        self._handover_recorded = True

    def _progress(self, vm: LibvirtDomain) -> dict[str, int]:
        try:
            stats = vm.dom.jobStats()
        except libvirt.libvirtError:
            return {}
        job = {key: int(stats[key]) for key in JOB_FIELDS if key in stats}
        total = job.get("memory_total", 0) // relay.PAGE
        self._session.progress(
            "transfer",
            {
                "round": job.get("memory_iteration", 0),
                "pages_done": min(job.get("memory_processed", 0) // relay.PAGE, total),
                "pages_total": total,
                "wire_bytes": sum(c.wire_bytes for c in self._sorted_carriers()),
                "remaining_bytes": job.get("memory_remaining", 0) + job.get("disk_remaining", 0),
            },
        )
        return job

    def _completed_job(self, vm: LibvirtDomain) -> dict[str, int]:
        """libvirt keeps the finished job's statistics on the (now stopped) source domain."""
        try:
            stats = vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError as exc:
            log.warning("libvirt gave no completed job statistics for %s: %s", vm.name, exc)
            return {}
        return {key: int(stats[key]) for key in JOB_FIELDS if key in stats}

    def _check_completion_timeout(self, elapsed_s: float) -> None:
        limit = self._session.options.completion_timeout_s
        if limit is not None and elapsed_s > limit:
            raise MigrationError(
                f"libvirt's migration did not complete within the completion timeout of {limit:g} s",
                code="completion_timeout",
            )

    def _cancel_job(self, vm: LibvirtDomain) -> None:
        try:
            if vm.dom.isActive() and vm.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                vm.dom.abortJob()
        except libvirt.libvirtError as exc:
            log.info("abortJob on %s: %s", vm.name, exc)


def _handed_over(vm: LibvirtDomain) -> bool:
    """libvirt finished handing the domain over: the source domain is shut off, reason "migrated"."""
    try:
        state, reason = vm.dom.state()
    except libvirt.libvirtError:
        return False  # gone: we cannot tell from here (sealift's domains are persistent, so not expected)
    return bool(state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)


def _paused_for_migration(vm: LibvirtDomain) -> bool:
    """The source domain stopped for libvirt's switchover (its last pass), not by anyone else."""
    try:
        state, reason = vm.dom.state()
    except libvirt.libvirtError:
        return False
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
