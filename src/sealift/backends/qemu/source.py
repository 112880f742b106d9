# Long file: the QEMU source driver: every transport's transfer, QEMU's follow loop and post-copy's hooks in one place.
"""The source side of a QEMU guest's migration: the QEMU source driver of the one handover.

QEMU migrates either into the agents' data stream (the sealift transports:
QEMU -> a socket of ours -> AEAD records, relay.py) or straight to the
destination QEMU (the direct transports, transports.py). Either way QEMU
stops at `pause-before-switchover` once the guest is paused: the agent
checks the destination is still there, then lets it go on. The first
record of the data stream describes the guest (wire/qemu_stream.py
GuestSpec) so that the destination starts an identical machine; its ready
record says when its QEMU listens.
"""

from __future__ import annotations

import logging
import select
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.backends.qemu import postcopy, postcopy_recovery, relay, storage_hooks
from sealift.backends.qemu.direct import Hook, run_after_hooks, start_direct
from sealift.backends.qemu.qmp import last_event_time
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.transports import AuditedSa, DirectSource, QemuTransport
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.host.transport import ControlChannel, open_data_stream
from sealift.ipsec.charon import HostCharon
from sealift.migration.errors import MigrationError, PostcopyPaused
from sealift.migration.phases import Event
from sealift.migration.report import RoundReport
from sealift.migration.session import SourceSession
from sealift.migration.streams import stream_protections
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Abort, Accept, Hello
from sealift.wire.qemu_stream import GuestSpec, Ready

log = logging.getLogger(__name__)

MiB = 1 << 20
UNCAPPED_BPS = 8 << 30  # QEMU's default max-bandwidth (128 MiB/s) would be the bottleneck
BACKEND = "qemu"


@dataclass
class QemuTransfer:
    paused_at: float
    stream_bytes: int
    digest: str
    qemu: dict[str, int | None]  # QEMU's figures (_qemu_figures); None where QEMU gave none
    wire_bytes: int
    rounds: int
    postcopy: dict[str, object] | None = None  # post-copy's figures when the migration switched (postcopy.py)


class QemuSourceDriver:
    backend = BACKEND
    start_audit: Mapping[str, object] = {"backend": BACKEND}

    def __init__(
        self, session: SourceSession, vms: QemuVmRegistry, transport: QemuTransport, ipsec: HostCharon | None
    ) -> None:
        transport.check(session.options)
        mode, after_s = postcopy.effective_mode(session.options)
        postcopy.check_transport(mode, transport.name)
        self._session = session
        self._vms = vms
        self._transport = transport
        self._ipsec = ipsec  # the host's charon (transport "ipsec")
        self._sa: AuditedSa | None = None
        self._pump: relay.SourcePumps | None = None
        self._digest = relay.StreamDigest(0)  # replaced once the data stream's protection is known (transfer)
        self._after_hooks: list[Hook] = []  # direct transports: clean-up once QEMU's migration is over
        self._channel: ControlChannel | None = None  # this migration's, once transfer() has it
        self._accept: Accept | None = None
        # post-copy: when to switch, and what happened (backends/qemu/postcopy.py); None when off
        self._switch = postcopy.SourceSwitch(postcopy.SwitchTrigger(mode, after_s)) if mode != "off" else None
        self._return_path: postcopy.ReturnPath | None = None
        self._hello: Hello | None = None  # post-copy recovery repeats it, with a fresh nonce
        self._recovery: postcopy_recovery.SourceRecovery | None = None
        self._resumed_data: socket.socket | None = None
        self._disks = storage_hooks.SourceDisks(session)  # storage migration (storage.py): copied and shared disks

    # -- the driver's steps ---------------------------------------------------------------

    def preflight(self, address: tuple[str, int]) -> None:
        self._transport.preflight(address[0], self._ipsec)

    def claim(self) -> tuple[QemuVM, int]:
        vm = self._vms.claim(self._session.vm_name)
        return vm, vm.memory_mib * MiB

    def describe(self, vm: QemuVM, psk_proof: str | None) -> Hello:
        self._hello = self._session.hello(
            vm_name=vm.name,
            backend=BACKEND,
            memory_bytes=vm.memory_mib * MiB,
            page_size=relay.PAGE,
            compression=None,
            psk_proof=psk_proof,
            image_digest=None,
        )
        return self._hello

    def transfer(self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: QemuVM) -> QemuTransfer:
        s = self._session
        # This migration's control channel and the destination's Accept: the extra streams' keys
        # and a direct transport's SA derive from them (a driver serves one migration).
        self._channel, self._accept = channel, accept
        outgoing, incoming = stream_protections(channel, s.options.secure, s.nonce, accept.nonce, s.migration_id)
        npages = vm.memory_mib * MiB // relay.PAGE
        writer = DataStreamWriter(outgoing, npages, None)
        self._digest = relay.StreamDigest(outgoing.overhead)
        # -- storage hook: the definition to send; shared disks get a check file beside their image
        definition = self._disks.prepare(vm, self._transport.name, self._transport.direct)
        if self._switch is not None and self._disks.copied:
            # The mirror's NBD streams end at the switchover, but post-copy's pages are fetched after it:
            # not combined yet (the guest runs on here).
            raise postcopy.PostcopyUnavailable(
                f"{vm.name} has disks to copy: post-copy with storage migration is not supported; "
                "migrate without --postcopy, or with shared disks"
            )
        data = open_data_stream(address, accept.session_id, 0, s.config.step_timeout_s)
        try:
            spec = GuestSpec(
                vm.memory_mib,
                self._vms.extra_cmdline(vm.name),
                vm.net.to_json(),
                self._vms.image_key(vm.name),  # sealift's guest image, or the operator's kernel
                self._transport.name,
                s.options.multifd_channels,
                s.options.xbzrle,
                postcopy=self._switch is not None,
                definition=definition,
            )
            relay.send_opaque(data, writer, spec.encode(), self._digest)
            back = DataStreamReader(incoming, npages)  # post-copy: QEMU's return path continues it
            ready = self._await_destination_ready(channel, data, back)
            self._configure(vm)
            if self._transport.direct:
                if ready.port is None:
                    raise MigrationError(
                        f"{s.destination} reported no QEMU port for the {self._transport.name} transport"
                    )
                return self._transfer_direct(vm, data, writer, (address[0], ready.port))
            multifd, disks = self._disks.split_sessions(ready.extra_sessions)  # -- storage hook
            if len(multifd) != s.options.multifd_channels:
                raise MigrationError(
                    f"{s.destination} opened {len(multifd)} streams for {s.options.multifd_channels} multifd channels"
                )
            return self._transfer_through_channel(vm, data, writer, multifd, address, back, disks)
        finally:
            if self._return_path is not None:
                self._return_path.stop()
            data.close()

    def manifest_fields(self, transfer: QemuTransfer) -> tuple[dict[str, object], dict[str, object]]:
        fields: dict[str, object] = {
            "backend": BACKEND,
            "image_digest": transfer.digest,
            "state_digest": None,
            "stream_bytes": transfer.stream_bytes,
            "transport": self._transport.name,
            "qemu": transfer.qemu,
        }
        return fields, {"image_digest": transfer.digest, "stream_bytes": transfer.stream_bytes}

    def fill_report(self, transfer: QemuTransfer) -> None:
        report = self._session.report
        report.rounds = transfer.rounds
        report.pages_sent = transfer.qemu.get("ram_normal_pages") or 0
        report.bytes_sent = transfer.wire_bytes
        report.image_digest = transfer.digest
        self._disks.fill_report(report)  # -- storage hook
        report.stop_reason = (
            f"qemu: total {transfer.qemu.get('total_time_ms')} ms, downtime "
            f"{transfer.qemu.get('downtime_ms')} ms" + self._feature_note()
        )
        if transfer.postcopy is not None:  # post-copy's phases and figures (postcopy.py)
            report.postcopy = transfer.postcopy
            report.downtime_ms = float(transfer.qemu.get("downtime_ms") or 0)  # QEMU's: stop to device state sent
            report.stop_reason += f"; switched to post-copy {transfer.postcopy['reason']}"

    def resume(self, vm: QemuVM) -> bool:
        if self._pump is not None:
            # A QEMU stuck writing its final state to a stream nobody reads holds its big lock (QMP
            # does not answer) until that connection breaks: break it first, then QEMU fails and answers.
            self._pump.stop()
        self._disks.abort()  # -- storage hook: mirror jobs ended, NBD nodes gone; the source's disk is untouched
        try:
            return resume_source(vm)
        except QemuError as error:
            log.error("could not resume %s after the failed migration: %s", vm.name, error)
            return False

    def unclaim(self, vm: QemuVM) -> None:
        self._vms.unclaim(vm.name)

    def release(self, vm: QemuVM) -> None:
        self._vms.release_migrated(vm.name)

    def cleanup(self, vm: QemuVM) -> None:
        if self._pump is not None:
            self._pump.stop()
        if self._resumed_data is not None:
            self._resumed_data.close()
        self._disks.cleanup()  # -- storage hook: share check files removed, anything left stopped
        run_after_hooks(vm, self._after_hooks)  # after an abort: QEMU's migration has ended either way
        if self._sa is not None:
            self._sa.close_logged(self._session.migration_id)  # normally done by the after hook

    # -- transfer ------------------------------------------------------------------------------

    def _configure(self, vm: QemuVM) -> None:
        options = self._session.options
        capabilities = {  # pause-before-switchover: our chance to check the destination before the switchover
            "pause-before-switchover": True,
            "auto-converge": options.auto_converge,
            "multifd": options.multifd_channels > 0,
            "xbzrle": options.xbzrle,
            "events": True,  # MIGRATION events wake _follow at pre-switchover instead of its next poll
            "postcopy-ram": self._switch is not None,  # both ends: the destination sets it from the GuestSpec
        }
        vm.set_migration_capabilities(capabilities)  # all of them: a VM migrated before may have others set
        parameters: dict[str, object] = {
            "max-bandwidth": options.bandwidth_limit_bps or UNCAPPED_BPS,
            "downtime-limit": options.downtime_limit_ms,
        }
        if options.multifd_channels:
            parameters["multifd-channels"] = options.multifd_channels
        if self._switch is not None:  # the bandwidth limit holds in post-copy too (0: QEMU's "unlimited")
            parameters["max-postcopy-bandwidth"] = options.bandwidth_limit_bps or 0
        if options.xbzrle and options.xbzrle_cache_bytes:
            parameters["xbzrle-cache-size"] = options.xbzrle_cache_bytes
        vm.set_migration_parameters(parameters)

    def _handshake(self) -> tuple[ControlChannel, Accept]:
        """This migration's control channel and the destination's Accept (transfer() keeps them)."""
        assert self._channel is not None and self._accept is not None
        return self._channel, self._accept

    def _transfer_through_channel(
        self,
        vm: QemuVM,
        data: socket.socket,
        writer: DataStreamWriter,
        extra_sessions: tuple[bytes, ...],
        address: tuple[str, int],
        back: DataStreamReader,
        disk_sessions: tuple[bytes, ...],
    ) -> QemuTransfer:
        """QEMU -> unix socket -> OPAQUE records on data streams (the sealift and sealift-plain transports).

        One data stream per QEMU connection: the main channel on the stream
        already open, each multifd channel on one more, keyed on its own.
        """
        s = self._session
        channel, accept = self._handshake()
        # Only multifd needs a listener: QEMU opens those channels itself. The main channel alone goes by fd:.
        sock_dir = relay.private_dir("sl-qout-") if extra_sessions else None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if extra_sessions else None
        timeout = s.config.step_timeout_s
        pumps = [relay.SourcePump(0, writer, data, timeout, self._digest)]
        extra_sockets: list[socket.socket] = []
        try:
            for index, session in enumerate(extra_sessions, 1):
                outgoing, _ = stream_protections(
                    channel, s.options.secure, s.nonce, accept.nonce, relay.stream_label(s.migration_id, index)
                )
                extra_sockets.append(open_data_stream(address, session, index, timeout))
                pumps.append(
                    relay.SourcePump(
                        index,
                        DataStreamWriter(outgoing, vm.memory_mib * MiB // relay.PAGE, None),
                        extra_sockets[-1],
                        timeout,
                        relay.StreamDigest(outgoing.overhead),
                    )
                )
            # -- storage hook: every copied disk mirrored and ready before the memory migration starts
            self._disks.mirror(vm, disk_sessions, channel, accept, address)
            group = self._pump = self._start_pumps(vm, pumps, listener, sock_dir, data, back)
            info, paused_at, group = self._follow_recovering(vm, data, group, address)
            group.wait(timeout)
            disk_digests = self._disks.finish()  # -- storage hook: NBD nodes deleted, disk streams ended
            return self._transfer_figures(vm, info, paused_at, group, disk_digests)
        finally:
            if listener is not None:
                listener.close()
            for sock in extra_sockets:
                sock.close()
            if sock_dir is not None:
                shutil.rmtree(sock_dir, ignore_errors=True)

    def _transfer_figures(
        self,
        vm: QemuVM,
        info: dict[str, Any],
        paused_at: float,
        group: relay.SourcePumps,
        disk_digests: list[relay.StreamDigest],
    ) -> QemuTransfer:
        """What a transfer through the agents returns, from QEMU's final figures and the (last) pumps.

        Called once the pumps have ended (QEMU closed its stream): by then QEMU has its totals."""
        info = _final_figures(vm, info)
        return QemuTransfer(
            postcopy=None if self._switch is None else self._switch.figures(info, self._return_path),
            paused_at=paused_at,
            stream_bytes=group.stream_bytes,
            digest=relay.combined_digest([p.digest for p in group.pumps] + disk_digests),
            qemu=_qemu_figures(info),
            wire_bytes=group.wire_bytes or group.stream_bytes,
            rounds=int(info.get("ram", {}).get("dirty-sync-count", 0)),
        )

    def _start_pumps(
        self,
        vm: QemuVM,
        pumps: list[relay.SourcePump],
        listener: socket.socket | None,
        sock_dir: Path | None,
        data: socket.socket,
        back: DataStreamReader,
    ) -> relay.SourcePumps:
        """Start QEMU migrating into the pumps: one socket of ours (``fd:``), or ``unix:`` for multifd.

        Our own socket gets a deep send buffer, so that QEMU writes on while
        the pump seals and sends; QEMU's multifd channels connect by themselves.
        """
        self._session.enter(Event.BEGIN_PRECOPY)
        if listener is None or sock_dir is None:
            ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            relay.widen_send_buffer(qemus)
            group = relay.SourcePumps(pumps, first=ours)
            if self._switch is not None:  # QEMU's return path: the destination's records into QEMU's socket
                self._return_path = postcopy.ReturnPath.to_qemu(data, back, ours.dup()).start()
            group.start()
            try:
                vm.migrate_to_socket(qemus)
            except BaseException:
                group.stop()
                raise
            finally:
                qemus.close()  # QEMU holds its own copy
            return group
        path = sock_dir / "m.sock"
        listener.bind(str(path))
        listener.listen(len(pumps))
        group = relay.SourcePumps(pumps, listener=listener)
        group.start()
        vm.migrate(f"unix:{path}")
        return group

    def _transfer_direct(
        self, vm: QemuVM, data: socket.socket, writer: DataStreamWriter, destination: tuple[str, int]
    ) -> QemuTransfer:
        """QEMU's own TCP connection(s) straight to the destination QEMU (qemu-tls, ipsec, plain)."""
        s = self._session
        channel, accept = self._handshake()
        plan = self._transport.source_plan(
            DirectSource(
                identity=s.context.identity,
                migration_id=s.migration_id,
                host=s.config.name,
                peer=s.destination,
                channel=channel,
                nonce_source=s.nonce,
                nonce_dest=accept.nonce,
                # Our migration address is the one we reach the destination agent from; QEMU connects exactly there.
                local_address=str(data.getsockname()[0]),
                destination=destination,
                psk=s.psk,
                ipsec=self._ipsec,
                step_timeout_s=s.config.step_timeout_s,
                audit=s.audit,
            )
        )
        self._after_hooks, self._sa = plan.after, plan.sa
        s.enter(Event.BEGIN_PRECOPY)
        start_direct(vm, destination, plan.before)
        info, paused_at = self._follow(vm, data, None)
        data.sendall(writer.end())  # the destination's cue that QEMU's stream is complete
        info = _final_figures(vm, info)
        ram = info.get("ram", {})
        return QemuTransfer(
            paused_at=paused_at,
            stream_bytes=0,
            digest=self._digest.hexdigest(),
            qemu=_qemu_figures(info),
            wire_bytes=int(ram.get("transferred", 0)),
            rounds=int(ram.get("dirty-sync-count", 0)),
        )

    def _await_destination_ready(self, channel: ControlChannel, data: socket.socket, reader: DataStreamReader) -> Ready:
        """Start QEMU's migration only once the destination QEMU listens (its port on a direct transport,
        its extra data streams for multifd on the channel).

        A source QEMU whose stream stalls for its first few hundred ms (the
        destination still starting its QEMU) sometimes produced a stream the
        destination guest crashed on (QEMU 7.2, TCG; ~1 run in 5 in the tests).
        The ready record is sealed with the destination -> source key, so the
        port in it comes from the authenticated destination agent.
        """
        s = self._session
        data.settimeout(s.config.step_timeout_s)
        try:
            event = relay.read_record(data, reader)
        except (OSError, ConnectionError, ProtocolError) as exc:
            abort = _peer_abort(channel)
            if abort is not None:  # its code too: e.g. shared_disk_not_shared, for the report and the operator
                raise MigrationError(f"{s.destination} aborted: {abort.reason}", code=abort.code) from None
            if isinstance(exc, socket.timeout):
                raise MigrationError(
                    f"{s.destination} did not start its QEMU within {s.config.step_timeout_s:.0f} s"
                ) from None
            raise MigrationError(f"{s.destination} closed the data stream before its QEMU was ready: {exc}") from exc
        if not isinstance(event, OpaqueReceived):
            raise MigrationError(f"{s.destination} sent {type(event).__name__} instead of its ready record")
        return Ready.decode(bytes(event.data))

    def _follow(self, vm: QemuVM, data: socket.socket, pump: relay.SourcePumps | None) -> tuple[dict[str, Any], float]:
        """Poll QEMU until the migration completes; handle the pre-switchover stop."""
        s = self._session
        paused_at: float | None = None
        last_bytes, last_progress = -1, time.monotonic()
        last_sync = 0
        round_started = followed_since = time.monotonic()
        while True:
            if pump is not None and pump.error is not None:
                raise self._stream_failure(f"the data stream to {s.destination} failed: {pump.error}")
            self._disks.check()  # -- storage hook: a failed disk stream or mirror job ends the migration
            info = vm.query_migrate()
            status = info.get("status", "none")
            ram = info.get("ram", {})
            if self._switch is not None:  # post-copy hook: the switch, and QEMU's own states after it
                switched = self._postcopy_step(vm, status, ram, time.monotonic() - followed_since)
                paused_at = switched if switched is not None else paused_at
                if self._switch.switched and status == "pre-switchover":
                    self._switch.continue_switchover(vm)
            if status == "failed" and self._switch is not None and self._switch.switched:
                # Not paused: QEMU failed the switch itself (the stream broke before its post-copy began), so
                # nothing can be resumed; the destination QEMU never had the device state to run the guest.
                raise MigrationError(
                    f"QEMU failed the migration at the post-copy switch ({info.get('error-desc', 'no reason')}); "
                    f"the destination QEMU never ran the guest; it is held here for an operator",
                    code="postcopy_paused",
                )
            if status in ("failed", "cancelled", "postcopy-paused"):
                raise self._stream_failure(
                    f"QEMU reported the migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            if paused_at is None and status in ("setup", "active"):
                self._check_completion_timeout(time.monotonic() - followed_since, ram)
                s.flight.check()  # a newly revoked destination or operator: give up, the guest runs on here
            if status == "pre-switchover" and paused_at is None:  # once: QEMU leaves the state asynchronously
                paused_at = stop_time(vm, time.monotonic())
                s.report.counter_at_pause = vm.counter()
                s.enter(Event.PAUSE_GUEST)
                self._check_destination(data)
                self._disks.at_switchover()  # -- storage hook: the mirror jobs end cleanly, no pivot
                vm.migrate_continue("pre-switchover")
                s.mark("switchover_check", paused_at)  # how much of QEMU's downtime our check holds it
            elif status == "completed":
                if paused_at is None:  # too quick to see pre-switchover: take QEMU's stop event
                    paused_at = stop_time(vm, time.monotonic())
                # QEMU's final totals (_final_figures) are read later: the guest is stopped until the handover
                # ends, and the stream's end and the destination's cue come first.
                return info, paused_at
            sync = int(ram.get("dirty-sync-count", 0))
            if sync > last_sync:
                self._on_round(last_sync, ram, round_started)
                last_sync, round_started = sync, time.monotonic()
            transferred = int(ram.get("transferred", 0))
            if transferred != last_bytes:
                last_bytes, last_progress = transferred, time.monotonic()
                s.progress(
                    "transfer",
                    {
                        "round": sync,
                        "pages_done": min(transferred // relay.PAGE, vm.memory_mib * MiB // relay.PAGE),
                        "pages_total": vm.memory_mib * MiB // relay.PAGE,
                        "wire_bytes": pump.stream_bytes if pump is not None else transferred,
                        "remaining_bytes": int(ram.get("remaining", 0)),  # QEMU's own: unsent and dirty RAM
                    },
                )
            elif time.monotonic() - last_progress > s.config.step_timeout_s:
                raise self._stream_failure(
                    f"QEMU's migration made no progress for {s.config.step_timeout_s:.0f} s ({status})"
                )
            vm.wait_event(relay.POLL_S)  # QEMU's MIGRATION events (pre-switchover, completed) end the wait at once

    def _check_completion_timeout(self, elapsed_s: float, ram: dict[str, Any]) -> None:
        """Before the switchover only: past it the guest is already stopped and giving up gains nothing."""
        limit = self._session.options.completion_timeout_s
        if limit is None or elapsed_s <= limit or self._session.options.completion_action == "postcopy":
            return
        dirty_mib_s = float(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", relay.PAGE)) / MiB
        link_mib_s = float(ram.get("mbps", 0.0)) * 1e6 / 8 / MiB
        raise MigrationError(
            f"pre-copy did not reach its switchover within the completion timeout of {limit:g} s "
            f"({int(ram.get('dirty-sync-count', 0))} passes; the guest dirties {dirty_mib_s:.1f} "
            f"MiB/s, the link carries {link_mib_s:.1f} MiB/s)"
        )

    def _check_destination(self, data: socket.socket) -> None:
        """At pre-switchover: is the destination still there? It never writes on the data stream,
        so anything readable there means it closed or reset the connection."""
        if self._return_path is not None:  # the return path reads the data stream: ask it instead
            if self._return_path.alive:
                return
            raise MigrationError(
                f"{self._session.destination} closed the data stream before the switchover "
                f"({self._return_path.error or 'its return path ended'})"
            )
        readable, _, _ = select.select([data], [], [], 0)
        if not readable:
            return  # nothing to read: the connection is open
        try:
            peek = data.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            raise MigrationError(f"{self._session.destination} is gone before the switchover: {exc}") from exc
        raise MigrationError(f"{self._session.destination} closed the data stream before the switchover ({peek!r})")

    def _on_round(self, index: int, ram: dict[str, Any], started: float) -> None:
        duration = max(1e-6, time.monotonic() - started)
        sent = int(ram.get("transferred", 0))
        report = RoundReport(
            round=index,
            pages_sent=int(ram.get("normal", 0)),
            bytes_sent=sent,
            duration_s=round(duration, 3),
            dirty_pages_left=int(ram.get("remaining", 0)) // relay.PAGE,
            throughput_mib_s=round(float(ram.get("mbps", 0.0)) / 8.0, 1),
            decision="continue",
            reason="qemu dirty sync",
        )
        self._session.report.round_reports.append(report)
        self._session.progress("round", report.to_dict())

    # -- post-copy hooks (backends/qemu/postcopy.py holds the logic) ------------------------------

    def _follow_recovering(
        self, vm: QemuVM, data: socket.socket, group: relay.SourcePumps, address: tuple[str, int]
    ) -> tuple[dict[str, Any], float, relay.SourcePumps]:
        """_follow, and after the switch, a recovery each time the post-copy pauses (postcopy_recovery.py)."""
        while True:
            try:
                info, paused_at = self._follow(vm, data, group)
                if self._switch is not None and self._switch.switched_at is not None:
                    paused_at = self._switch.switched_at  # the guest stopped at the switch, however many resumes
                return info, paused_at, group
            except PostcopyPaused as exc:
                if self._switch is None or self._switch.switched_at is None or self._hello is None:
                    raise
                # This stream is done with at both ends: a failure only this side saw (a return-path record that
                # failed authentication here) must reach the destination as a broken stream, whose QEMU then
                # pauses too. First, so that the pumps cannot end it cleanly (END) as they stop.
                _shut_down_quietly(data)
                group.stop()
                if self._return_path is not None:
                    self._return_path.stop()
                if self._recovery is None:
                    self._recovery = postcopy_recovery.SourceRecovery(self._session, vm, address, self._hello)
                self._session.enter(Event.FAIL, error=str(exc))  # postcopy-active -> postcopy-paused
                resumed = self._recovery.recover(exc, postcopy.manifest_fields(self._transport.name))
                group = self._pump = resumed.pumps
                self._return_path, data = resumed.return_path, resumed.data
                if self._resumed_data is not None:
                    self._resumed_data.close()
                self._resumed_data = data
                self._switch.recoveries = self._recovery.count

    def _resume_record(self, hello: Hello) -> dict[str, object]:
        """What a restarted agent needs to resume this post-copy (postcopy_restart.py): the Hello with its
        signed order (re-sent with a fresh nonce), the options and transport, and the report's facts so far."""
        report = self._session.report
        return {
            "hello": hello.to_json(),
            "options": self._session.options.to_dict(),
            "transport": self._transport.name,
            "order_id": report.order_id,
            "operator": report.operator,
            "counter_before": report.counter_before,
            "counter_at_pause": report.counter_at_pause,
        }

    def resume_after_restart(self, vm: QemuVM, address: tuple[str, int], hello: Hello) -> QemuTransfer:
        """A post-copy this agent's predecessor switched to and then died in: resume it, follow it to the end.

        The decision is on disk and the adopted QEMU is postcopy-paused (its
        migration connection died with the old agent), holding every page the
        destination has not received. The recovery is the one after a cut
        link: a fresh channel and keys, the stored Hello (same id, same signed
        order) with a fresh nonce, then `migrate` with resume: true; after it,
        the same follow loop (and recoveries) as any post-copy.
        """
        if self._switch is None:
            raise MigrationError(f"the stored options of {vm.name}'s migration have no post-copy (a bug)")
        self._hello = hello
        self._switch.reason = "resumed after the source agent restarted"
        self._switch.switched_at = time.monotonic()
        self._recovery = postcopy_recovery.SourceRecovery(self._session, vm, address, hello)
        first = PostcopyPaused("the source agent restarted during post-copy")
        resumed = self._recovery.recover(first, postcopy.manifest_fields(self._transport.name))
        self._switch.recoveries = self._recovery.count
        self._pump, self._return_path, self._resumed_data = resumed.pumps, resumed.return_path, resumed.data
        try:
            info, paused_at, group = self._follow_recovering(vm, resumed.data, resumed.pumps, address)
            group.wait(self._session.config.step_timeout_s)
            return self._transfer_figures(vm, info, paused_at, group, [])
        finally:
            if self._return_path is not None:
                self._return_path.stop()

    def _postcopy_step(self, vm: QemuVM, status: str, ram: dict[str, Any], elapsed_s: float) -> float | None:
        """The switch, once its trigger fires: the coordinator decides (receipt, durable decision, Commit) first."""
        assert self._switch is not None
        s = self._session
        if self._switch.decide is None and s.decide_postcopy is not None:
            decide = s.decide_postcopy

            def decide_now() -> None:
                s.report.counter_at_pause = vm.counter()  # the guest's counter as the switch is decided
                if self._hello is not None:  # what a recovery (even by a restarted agent) needs, on disk first
                    s.context.store.save_resume(s.migration_id, self._resume_record(self._hello))
                decide(postcopy.manifest_fields(self._transport.name))

            self._switch.decide = decide_now
        if self._return_path is not None and self._return_path.error is not None:
            raise self._stream_failure(f"QEMU's return path from {s.destination} failed: {self._return_path.error}")
        switched = self._switch.poll(vm, status, ram, elapsed_s)
        if switched is not None:
            s.progress("phase", {"phase": "postcopy-active", "reason": self._switch.reason})
        return switched

    def _stream_failure(self, message: str) -> MigrationError:
        """Before the switch an ordinary failure (the guest resumes here); after it, a paused post-copy."""
        if self._switch is not None and self._switch.switched:
            return PostcopyPaused(message)
        return MigrationError(message, code="stream_failed")

    def _feature_note(self) -> str:
        options = self._session.options
        notes = [f"multifd {options.multifd_channels} channels"] if options.multifd_channels else []
        notes += ["xbzrle"] if options.xbzrle else []
        notes += ["auto-converge"] if options.auto_converge else []
        notes += [f"post-copy {options.postcopy}"] if self._switch is not None else []
        if self._sa is not None and self._sa.record is not None:
            record = self._sa.record
            notes.append(f"ipsec backend {record.backend}, {record.encryption}, {record.dh_group}")
        return "".join(f"; {note}" for note in notes)


def resume_source(vm: QemuVM, timeout: float = 15.0) -> bool:
    """Get the source guest running again after a failed migration; True if it runs."""
    if not vm.alive():
        return False
    status = vm.query_migrate().get("status", "none")
    if status in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
        # QEMU waiting at pre-switchover never notices a dead link by itself.
        vm.migrate_cancel()
        try:
            vm.wait_migration({"cancelled", "failed", "completed"}, timeout=timeout)
        except QemuError:
            pass  # "cancelled" raises in wait_migration when not awaited; either way it ended
    deadline = time.monotonic() + timeout
    while vm.status() in ("finish-migrate", "inmigrate") and time.monotonic() < deadline:
        time.sleep(0.05)
    if vm.status() != "running":
        vm.resume()  # from paused or postmigrate: QEMU allows cont on both
    return vm.status() == "running"


def stop_time(vm: QemuVM, fallback: float) -> float:
    """When the guest stopped (QEMU's STOP event), on our monotonic clock."""
    wall = last_event_time(vm.recent_events(), "STOP")
    if wall is None:
        return fallback
    age = time.time() - wall
    return time.monotonic() - age if 0 <= age < 60 else fallback


def _peer_abort(channel: ControlChannel) -> Abort | None:
    """The destination's Abort, if it sent one (it says why it gave up), within a second."""
    try:
        return channel.abort_within(1.0)
    except (OSError, ProtocolError):
        return None


def _final_figures(vm: QemuVM, info: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """query-migrate once QEMU has filled in its totals.

    QEMU 7.2 reports "completed" a moment before it computes total-time and
    downtime (they read 0 until then).
    """
    deadline = time.monotonic() + timeout
    while not info.get("total-time") and time.monotonic() < deadline:
        time.sleep(0.002)  # a moment, not a poll period: the caller may be inside the guest's downtime
        info = vm.query_migrate()
    return info


def _qemu_figures(info: dict[str, Any]) -> dict[str, int | None]:
    ram = info.get("ram", {})
    return {
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_time_ms": info.get("setup-time"),
        "ram_transferred": ram.get("transferred"),
        "ram_total": ram.get("total"),
        "ram_normal_pages": ram.get("normal"),
        "ram_duplicate_pages": ram.get("duplicate"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
    }


def _shut_down_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
