"""The source side of a migration: the coordinator of the handover.

Order of events (docs/architecture.md, "Migration protocol"): Hello/Accept on
the control channel, pre-copy rounds and stop-and-copy on the data stream,
the signed manifest, the destination's signed "prepared" receipt, then the
durable commit decision, Commit, and the signed "running" receipt. Until the
commit decision is on disk, any failure resumes the guest here.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from sealift.agent.config import AgentConfig
from sealift.agent.store import AgentStore
from sealift.agent.transport import ControlChannel, PipelinedSink, open_data_stream
from sealift.backends.builtin.registry import BuiltinGuestMemory, VmRegistry
from sealift.backends.builtin.vm import BuiltinVM
from sealift.migration.options import MigrationOptions
from sealift.migration.report import MigrationReport, RoundReport
from sealift.backends.builtin.sender import PrecopyResult, PrecopySender, TransferProgress
from sealift.security.identity import HostIdentity
from sealift.security.keys import channel_secret, derive_session_keys
from sealift.migration.authority import Authority
from sealift.migration.documents import DocumentSigner, await_receipt, channel_binding
from sealift.monitor import gate as monitor_gate
from sealift.security.audit import Kinds
from sealift.security.psk import PskSession, psk_channel_binding
from sealift.wire.datastream import DataStreamWriter
from sealift.wire.messages import Abort, Accept, Commit, Hello, Manifest, Refuse
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection

log = logging.getLogger(__name__)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class MigrationError(Exception):
    """A migration failed; the message says why and where the VM runs now."""


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # "round" | "transfer" | "phase"
    data: dict[str, object]


ProgressCallback = Callable[[ProgressEvent], None]


class SourceCoordinator:
    """The source's side of the handover, for every backend: order, Hello, manifest, commit, receipts.

    A backend supplies its own steps: `_claim` (the VM and its memory),
    `_describe` (its Hello), `_transfer` (the guest's state to the
    destination; returns something with `paused_at`), `_manifest_fields`,
    `_fill_report`, `_resume_source` and, optionally, `_preflight` and
    `_cleanup`. Until the commit decision is on disk any failure resumes the
    guest here; after it, the VM stays paused until the resolver learns
    where it runs.
    """

    migration_id: str
    report: MigrationReport
    _config: AgentConfig
    _identity: HostIdentity | None
    _store: AgentStore
    _authority: Authority
    _signer: DocumentSigner
    _vm_name: str
    _destination: str
    _options: MigrationOptions
    _order: str | None
    _binding: str
    _nonce: bytes
    _psk: PskSession | None
    _psk_binding: bytes
    _progress: ProgressCallback
    _vms: Any  # the backend's registry: claim, unclaim, release_migrated

    IN_DOUBT_PHASE = "committed"  # the phase a failure after the commit decision leaves the record in
    START_AUDIT: dict[str, object] = {}

    def run(self) -> MigrationReport:
        if self._destination == self._config.name:
            raise MigrationError(f"{self._vm_name} already runs on {self._destination}")
        if not self._options.secure:
            log.warning("migrating %s IN CLEAR (--insecure): anyone on the network can read and change it", self._vm_name)
        address = self._config.peer_address(self._destination)
        # Outgoing migration control: nothing happens without a valid, unused order.
        verified = self._authority.authorize_outgoing(self._order, self._vm_name, self._destination)
        monitor_gate.check_outgoing(self._config.name, self._vm_name, self._destination)  # T12: hold an attacker VM
        self.report.order_id = verified.order.id
        self.report.operator = verified.operator.name
        self._preflight(address)
        vm, memory_bytes = self._claim()
        self.report.memory_bytes = memory_bytes
        self._store.create_migration(self.migration_id, vm.name, "source", self._destination, "started", memory_bytes)
        started = time.monotonic()
        cpu_started = time.process_time()
        committed = False
        channel: ControlChannel | None = None
        try:
            self.report.counter_before = vm.counter()
            channel = ControlChannel.connect(
                address, self._identity, self._destination, self._options.secure, self._config.handshake_timeout_s
            )
            if channel.secure:
                self._authority.check_peer(channel.stream.peer_certificate, self._destination)  # type: ignore[attr-defined]
            self._audit("migration.started", vm=vm.name, destination=self._destination, transport=self.report.transport,
                        **self.START_AUDIT, order_id=verified.order.id)  # fmt: skip
            # A provisioned PSK is a required second factor on every transport.
            self._psk = self._authority.psk_session(self._destination, "source") if channel.secure else None
            accept = self._hello(channel, vm)
            transfer = self._transfer(channel, accept, address, vm)
            self._mark("stream_sent", transfer.paused_at)
            self._manifest_and_prepare(channel, vm, memory_bytes, transfer)
            self._mark("prepared_receipt", transfer.paused_at)
            self._store.decide(self.migration_id, "committed")  # point of no return
            committed = True
            self._audit(Kinds.MIGRATION_HANDOVER, decision="committed", vm=vm.name, destination=self._destination)
            channel.send(Commit(self.migration_id))
            self._mark("commit_sent", transfer.paused_at)
            self._phase("committed")
            running = self._await_running(channel)
            self._mark("running_receipt", transfer.paused_at)
            self._commit_psk()
            # Downtime ends when the destination's guest runs: its receipt says so.
            self.report.downtime_ms = self.report.downtime_breakdown_ms["running_receipt"]
            # The migration is over when the VM runs there (as QEMU counts it);
            # quitting our paused copy comes after and is not part of it.
            self._finish_report(transfer, running, started, cpu_started)
            self._vms.release_migrated(vm.name)
            self._store.set_phase(self.migration_id, "completed")
            self._audit("migration.completed", vm=vm.name, destination=self._destination,
                        downtime_ms=self.report.downtime_ms, total_time_s=self.report.total_time_s)  # fmt: skip
            return self.report
        except BaseException as exc:
            self.report.status = "failed"
            self.report.total_time_s = round(time.monotonic() - started, 3)
            self.report.source_cpu_s = round(time.process_time() - cpu_started, 3)
            if committed:
                self.report.error = (
                    f"{exc}; the commit was sent, so {vm.name} stays paused on {self._config.name} until "
                    f"{self._destination} confirms it runs there (the agents settle it between them: `sealift migrations`)"
                )  # fmt: skip
                self._store.set_phase(self.migration_id, self.IN_DOUBT_PHASE, error=str(exc))
            else:
                self._abort(channel, vm, exc)
            self._store.save_report(self.migration_id, self.report.to_dict())
            raise MigrationError(self.report.error) from exc
        finally:
            self._cleanup(vm)
            if self._psk is not None:
                self._psk.close()  # an uncommitted ratchet stays pending: never a lock-out
            if channel is not None:
                channel.close()

    # -- shared steps ------------------------------------------------------------------

    def _hello(self, channel: ControlChannel, vm: Any) -> Accept:
        psk_proof = None
        if self._psk is not None:
            self._psk_binding = psk_channel_binding(channel.stream)  # type: ignore[arg-type]
            psk_proof = self._psk.make_proof(self._psk_binding, self._nonce)
        channel.send(self._describe(vm, psk_proof))
        reply = channel.recv(self._config.step_timeout_s)
        if isinstance(reply, (Refuse, Abort)):
            # Either way the destination said no before it took anything: pass its reason on.
            raise MigrationError(f"{self._destination} refused the migration: {reply.reason}")
        if not isinstance(reply, Accept):
            raise MigrationError(f"{self._destination} answered Hello with {type(reply).__name__}, not Accept")
        if self._psk is not None:
            # The destination must prove the pair's current PSK too (mutual second factor).
            self._psk.check_peer_proof(reply.psk_proof, self._psk_binding, self._nonce, reply.nonce)
            self._audit("psk.verified", peer=self._destination, epoch=self._psk.epoch, ratcheting=self._psk.ratcheting)
        return reply

    def _manifest_and_prepare(self, channel: ControlChannel, vm: Any, memory_bytes: int, transfer: Any) -> dict:
        """Sign and send the manifest; the destination's signed "prepared" receipt for it."""
        fields, digest_audit = self._manifest_fields(transfer)
        manifest = {
            "migration_id": self.migration_id, "vm": vm.name, "source": self._config.name,
            "destination": self._destination, "memory_bytes": memory_bytes, **fields,
            "counter_at_pause": self.report.counter_at_pause, "nonce_source": self._nonce.hex(),
            "channel_binding": self._binding, "order_id": self.report.order_id, "signed_at": time.time(),
        }  # fmt: skip
        envelope = self._signer.sign(manifest, "manifest")
        channel.send(Manifest(self.migration_id, envelope))
        self._audit(Kinds.MIGRATION_DIGEST, **digest_audit, manifest_sha256=_sha256(envelope))
        receipt, envelope = await_receipt(
            channel, self._signer, peer=self._destination, stage="prepared", migration_id=self.migration_id,
            binding=self._binding, manifest=manifest, timeout=self._config.step_timeout_s,
        )  # fmt: skip
        self._audit(Kinds.RECEIPT, stage="prepared", receipt=envelope)
        return receipt

    def _abort(self, channel: ControlChannel | None, vm: Any, exc: BaseException) -> None:
        """Before the commit decision: the guest resumes here, nothing is lost."""
        reason = str(exc) or type(exc).__name__
        if channel is not None:
            try:
                channel.send(Abort(self.migration_id, reason[:1000]))
            except Exception:  # noqa: BLE001 - the peer may be gone; the abort stands regardless
                pass
        resumed = False
        try:
            resumed = self._resume_source(vm)
        finally:
            self._vms.unclaim(vm.name)
            self._store.decide(self.migration_id, "aborted")
            self._store.set_phase(self.migration_id, "aborted", error=reason)
        where = f"{vm.name} keeps running on {self._config.name}" if resumed else f"{vm.name} could not be resumed"
        self.report.error = f"migration to {self._destination} failed: {reason}; {where}"
        self._audit("migration.aborted", vm=vm.name, destination=self._destination, reason=reason, resumed=resumed)
        log.warning("%s", self.report.error)

    def _finish_report(self, transfer: Any, running: dict, started: float, cpu_started: float) -> None:
        report = self.report
        report.status = "completed"
        report.total_time_s = round(time.monotonic() - started, 3)
        self._fill_report(transfer)
        report.counter_after = running.get("counter_at_resume")  # type: ignore[assignment]
        report.source_cpu_s = round(time.process_time() - cpu_started, 3)
        report.destination_cpu_s = float(running.get("cpu_s", 0.0))  # type: ignore[arg-type]
        self._store.save_report(self.migration_id, report.to_dict())

    def _await_running(self, channel: ControlChannel) -> dict:
        receipt, envelope = await_receipt(
            channel, self._signer, peer=self._destination, stage="running", migration_id=self.migration_id,
            binding=self._binding, manifest=None, timeout=self._config.step_timeout_s,
        )
        self._audit(Kinds.RECEIPT, stage="running", receipt=envelope)
        return receipt

    def _mark(self, step: str, paused_at: float) -> None:
        """Milliseconds since the guest paused: where the downtime goes."""
        self.report.downtime_breakdown_ms[step] = round((time.monotonic() - paused_at) * 1000.0, 1)

    def _phase(self, phase: str) -> None:
        self._store.set_phase(self.migration_id, phase)
        self._progress(ProgressEvent("phase", {"phase": phase}))

    def _commit_psk(self) -> None:
        if self._psk is not None and self._psk.commit():
            self._audit(Kinds.KEY_CHANGED, what="psk ratcheted", peer=self._destination, epoch=self._psk.epoch)

    def _audit(self, kind: str, **fields: object) -> None:
        self._authority.record(kind, migration_id=self.migration_id, **fields)

    # -- the backend's steps -------------------------------------------------------------

    def _preflight(self, address: tuple[str, int]) -> None:
        """Checks of the backend's own before anything is claimed (nothing by default)."""

    def _claim(self) -> tuple[Any, int]:
        raise NotImplementedError

    def _describe(self, vm: Any, psk_proof: bytes | None) -> Hello:
        raise NotImplementedError

    def _transfer(self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: Any) -> Any:
        raise NotImplementedError

    def _manifest_fields(self, transfer: Any) -> tuple[dict[str, object], dict[str, object]]:
        """(the backend's manifest fields, the digest fields for the audit)."""
        raise NotImplementedError

    def _fill_report(self, transfer: Any) -> None:
        raise NotImplementedError

    def _resume_source(self, vm: Any) -> bool:
        raise NotImplementedError

    def _cleanup(self, vm: Any) -> None:
        """Always, at the end (nothing by default)."""


class OutgoingMigration(SourceCoordinator):
    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        vms: VmRegistry,
        vm_name: str,
        destination: str,
        options: MigrationOptions,
        authority: Authority,
        order: str | None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self._config = config
        self._authority = authority
        self._order = order
        self._identity = identity
        self._signer = DocumentSigner(config.name, identity if options.secure else None)
        self._store = store
        self._vms = vms
        self._vm_name = vm_name
        self._destination = destination
        self._options = options
        self._progress = progress or (lambda event: None)
        self.migration_id = secrets.token_hex(16)
        self._nonce = secrets.token_bytes(32)
        self._psk: PskSession | None = None
        self._psk_binding = b""
        self.report = MigrationReport(
            migration_id=self.migration_id,
            vm=vm_name,
            source=config.name,
            destination=destination,
            transport="tls" if options.secure else "plain",
        )

    # -- steps --------------------------------------------------------------

    def _claim(self) -> tuple[BuiltinVM, int]:
        vm = self._vms.claim(self._vm_name)
        return vm, vm.memory_bytes

    def _describe(self, vm: BuiltinVM, psk_proof: bytes | None) -> Hello:
        return Hello(
            migration_id=self.migration_id,
            vm_name=vm.name,
            source_host=self._config.name,
            destination_host=self._destination,
            nonce=self._nonce,
            memory_bytes=vm.memory_bytes,
            page_size=4096,
            secure=self._options.secure,
            compression=self._options.compression,
            streams=1,
            backend="builtin",
            order=self._order,
            psk_proof=psk_proof,
            image_digest=self._options.image_digest if self._options.secure else None,
        )

    def _protection(self, channel: ControlChannel, accept: Accept) -> RecordProtection:
        if not self._options.secure:
            return NoProtection()
        secret = channel_secret(channel.stream, self._nonce, accept.nonce, self.migration_id)  # type: ignore[arg-type]
        keys = derive_session_keys(secret, self._nonce, accept.nonce, self.migration_id)
        return AeadProtection(keys.source_to_dest_key, keys.source_to_dest_iv)

    def _transfer(self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: BuiltinVM) -> PrecopyResult:
        protection = self._protection(channel, accept)
        self._binding = channel_binding(channel, self._nonce, accept.nonce, self.migration_id)
        data = open_data_stream(address, accept.session_id, 0, self._config.step_timeout_s)
        sink = PipelinedSink(data)
        try:
            writer = DataStreamWriter(protection, vm.image.npages, self._options.compression,
                                      out_buffers=PipelinedSink.ring_size())  # fmt: skip
            self._phase("precopy")
            sender = PrecopySender(
                BuiltinGuestMemory(vm),
                writer,
                sink,
                self._options,
                on_round=self._on_round,
                with_digest=self._options.secure,
                on_transfer=self._on_transfer,
            )
            result = sender.run()  # leaves the guest paused
            sink.flush()
            self.report.counter_at_pause = vm.counter()
            self._phase("stop-and-copy")
            return result
        finally:
            try:
                data.shutdown(socket.SHUT_RDWR)  # wakes the sink's thread if it is stuck in sendall
            except OSError:
                pass
            sink.close()
            data.close()

    def _manifest_fields(self, result: PrecopyResult) -> tuple[dict[str, object], dict[str, object]]:
        fields = {"image_digest": result.image_digest, "state_digest": result.state_digest,
                  "pages_sent": result.pages_sent, "rounds": len(result.rounds), "wire_bytes": result.wire_bytes}  # fmt: skip
        return fields, {"image_digest": result.image_digest, "state_digest": result.state_digest}

    def _resume_source(self, vm: BuiltinVM) -> bool:
        vm.set_throttle(0)  # auto-converge must not outlive the migration
        if vm.is_paused:
            vm.resume()
        return vm.is_alive

    # -- reporting ----------------------------------------------------------

    def _on_round(self, report: RoundReport) -> None:
        self.report.round_reports.append(report)
        self._audit(Kinds.MIGRATION_ROUND, round=report.round, pages=report.pages_sent, bytes=report.bytes_sent,
                    dirty_left=report.dirty_pages_left, decision=report.decision)
        self._progress(ProgressEvent("round", report.to_dict()))

    def _on_transfer(self, progress: TransferProgress) -> None:
        self._progress(
            ProgressEvent(
                "transfer",
                {
                    "round": progress.round,
                    "pages_done": progress.pages_done,
                    "pages_total": progress.pages_total,
                    "wire_bytes": progress.wire_bytes,
                },
            )
        )

    def _fill_report(self, result: PrecopyResult) -> None:
        report = self.report
        report.rounds = len(result.rounds)
        report.pages_sent = result.pages_sent
        report.bytes_sent = result.wire_bytes
        report.image_digest = result.image_digest or None
        report.stop_reason = result.stop_reason
