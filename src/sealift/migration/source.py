"""The source side of a migration: the coordinator of the handover, for every backend.

Order of events (docs/architecture.md, "Migration protocol"): Hello/Accept on
the control channel, the backend's transfer on the data stream, the signed
manifest, the destination's signed "prepared" receipt, then the durable
commit decision, Commit, and the signed "running" receipt. Until the commit
decision is on disk, any failure resumes the guest here; after it, the VM
stays paused until the destination's word says where it runs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Generic

from sealift.host.transport import ControlChannel
from sealift.migration import gate, records
from sealift.migration.documents import await_receipt, channel_binding
from sealift.migration.drivers import SourceDriver, TransferT, VmT
from sealift.migration.errors import MigrationError, PostcopyDigestMismatch, failure_code
from sealift.migration.phases import Event, Role
from sealift.migration.report import MigrationReport
from sealift.migration.session import SourceSession
from sealift.security.audit import Kinds
from sealift.security.psk import psk_channel_binding
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Abort, Accept, Commit, Manifest, Refuse

log = logging.getLogger(__name__)


PEER_REASON_WAIT_S = 2.0  # how long a failed source waits for the destination's Abort and its reason


def _peer_may_know(exc: BaseException) -> bool:
    """Did the failure come from the connection to the destination (which then knows the cause)?"""
    if isinstance(exc, MigrationError):
        return exc.code == "stream_failed" or isinstance(exc.__cause__, (OSError, ProtocolError))
    return isinstance(exc, (OSError, ProtocolError))


def _await_close(channel: ControlChannel, timeout: float) -> None:
    """Wait until the destination has closed the conversation, i.e. let go of what it held for us.

    It closes only after it has released its reservation, so a retry right
    after this failure is judged on its own merits, not refused as "a VM
    named ... already exists" while the destination still tidies up.
    """
    deadline = time.monotonic() + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            channel.recv(remaining)
    except (OSError, ProtocolError):
        return  # closed (or gone, or silent until the deadline): either way it is done with us


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SourceCoordinator(Generic[VmT, TransferT]):
    def __init__(self, session: SourceSession, driver: SourceDriver[VmT, TransferT]) -> None:
        self.session = session
        self.driver = driver
        self._config = session.config
        self._store = session.context.store
        self._authority = session.context.authority
        self._committed = False  # the durable decision is on disk (decide-commit, or decide-postcopy mid-transfer)
        self._postcopy = False  # the decision was post-copy's: the guest may already run at the destination
        self._paused_at: float | None = None  # the guest's pause, once the stop-and-copy's handover runs
        self._defer_audit = False  # audit entries wait until Commit is sent (the stopped window's path)
        self._deferred_audits: list[tuple[str, dict[str, object]]] = []
        self._handed_over = False  # the hypervisor (libvirt) switched over: our copy has quit

    @property
    def migration_id(self) -> str:
        return self.session.migration_id

    @property
    def report(self) -> MigrationReport:
        return self.session.report

    def run(self) -> MigrationReport:
        s = self.session
        if s.destination == self._config.name:
            raise MigrationError(f"{s.vm_name} already runs on {s.destination}")
        if not s.options.secure:
            log.warning("migrating %s IN CLEAR (--insecure): anyone on the network can read and change it", s.vm_name)
        address = self._config.peer_address(s.destination)
        # Outgoing migration control: nothing happens without a valid, unused order.
        verified = self._authority.authorize_outgoing(s.order, s.vm_name, s.destination)
        gate.check_outgoing(self._config.name, s.vm_name, s.destination)  # T12: hold an attacker VM
        s.report.order_id = verified.order.id
        s.report.operator = verified.operator.name
        self.driver.preflight(address)
        vm, memory_bytes = self.driver.claim()
        s.report.memory_bytes = memory_bytes
        records.create(
            self._store, s.migration_id, vm.name, Role.SOURCE, s.destination, memory_bytes, self.driver.backend
        )
        started = time.monotonic()
        cpu_started = time.process_time()
        channel: ControlChannel | None = None
        try:
            operator = f"the certificate of operator {verified.operator.name!r}"
            self._authority.rely_on(s.flight, operator, verified.issuer_certificate)  # revoked later: aborted
            s.report.counter_before = vm.counter()
            channel = ControlChannel.connect(
                address, s.context.identity, s.destination, s.options.secure, self._config.handshake_timeout_s
            )
            if channel.secure:
                self._authority.check_peer(channel.tls.peer_certificate, s.destination)
                self._authority.rely_on(s.flight, f"host certificate of {s.destination}", channel.tls.peer_certificate)
            self._audit_move(
                "migration.started",
                vm,
                transport=s.report.transport,
                **self.driver.start_audit,
                order_id=verified.order.id,
            )
            # A provisioned PSK is a required second factor on every transport.
            s.psk = self._authority.psk_session(s.destination, "source") if channel.secure else None
            accept = self._hello(channel, vm)
            s.binding = channel_binding(channel, s.nonce, accept.nonce, s.migration_id)
            first = channel  # post-copy's switch is decided on this one, during the transfer
            s.decide_postcopy = lambda fields: self._decide_postcopy(first, vm, memory_bytes, fields)
            s.reconfirm_postcopy = lambda again, fields: self._reconfirm_postcopy(again, vm, memory_bytes, fields)
            s.handed_over = lambda: self._record_handover(vm)
            transfer = self.driver.transfer(channel, accept, address, vm)
            if s.recovered_channel is not None:  # post-copy recovered over a fresh channel: it carries the rest
                channel.close()
                channel, s.recovered_channel = s.recovered_channel, None
            if not self._postcopy:  # else decided and committed during the transfer
                if not self._handed_over:  # after libvirt's switchover a revocation cannot undo it (security.md)
                    s.flight.check()  # revoked while the transfer ran: stop before signing anything
                self._paused_at = transfer.paused_at  # the handover's steps are marked from here (downtime)
                s.mark("stream_sent", transfer.paused_at)
                # The guest is stopped from here to the running receipt: the one durable write on this host's
                # path is the decision. The audit entries (digest, prepared receipt, handover) are written once
                # Commit is on its way, while the destination starts the guest (or, on a failure, in `finally`).
                self._defer_audit = True
                self._manifest_and_prepare(channel, vm, memory_bytes, self.driver.manifest_fields(transfer))
                s.mark("prepared_receipt", transfer.paused_at)
                if not self._handed_over:
                    self._authority.final_check(s.flight)  # a newly revoked destination or operator: abort
                records.transition(self._store, s.migration_id, Event.DECIDE_COMMIT)  # point of no return
                s.mark("commit_decided", transfer.paused_at)
                self._committed = True
                self._audit_move(Kinds.MIGRATION_HANDOVER, vm, decision="committed")
                channel.send(Commit(s.migration_id))
                s.mark("commit_sent", transfer.paused_at)
                self._flush_audits()
                s.progress("phase", {"phase": "committed"})
            self._complete(channel, vm, transfer, started, cpu_started)
            return s.report
        except BaseException as exc:
            raise self._failed(exc, channel, vm, started, cpu_started) from exc
        finally:
            self._tidy_up(vm, channel)

    def resume_postcopy(
        self, vm: VmT, memory_bytes: int, resume: Callable[[], TransferT], started: float
    ) -> MigrationReport:
        """Finish a post-copy that this agent's predecessor decided and then died in (docs/architecture.md).

        The decision is on disk (decide-postcopy) and the guest may already
        run at the destination, so nothing here ever resumes it at the
        source. `resume` is the backend's: it reconnects (a fresh channel and
        keys, the same migration id and signed order), re-confirms the
        handover through `session.reconfirm_postcopy`, resumes its transfer
        and follows it to the end, leaving the new channel in
        `session.recovered_channel`. Then as any post-copy: the running
        receipt on that channel, the stream digest compared, our copy quit.
        `started`: when the migration began (monotonic), before the restart.
        """
        s = self.session
        self._committed = self._postcopy = True
        s.reconfirm_postcopy = lambda again, fields: self._reconfirm_postcopy(again, vm, memory_bytes, fields)
        cpu_started = time.process_time()
        channel: ControlChannel | None = None
        try:
            transfer = resume()
            channel, s.recovered_channel = s.recovered_channel, None
            if channel is None:
                raise MigrationError("the post-copy resumed without a channel for the running receipt (a bug)")
            self._complete(channel, vm, transfer, started, cpu_started)
            return s.report
        except BaseException as exc:
            raise self._failed(exc, channel, vm, started, cpu_started) from exc
        finally:
            self._tidy_up(vm, channel)

    def _tidy_up(self, vm: VmT, channel: ControlChannel | None) -> None:
        """After the migration, whatever its outcome: audit entries still owed, the flight, connections."""
        s = self.session
        try:
            self._flush_audits()  # a failure between the decision and Commit: its entries are still written
        except Exception:  # noqa: BLE001 - the migration's own outcome stands; the log says what is missing
            log.exception("could not write the audit entries of %s", s.migration_id)
        self._authority.forget(s.flight)
        self.driver.cleanup(vm)
        if s.psk is not None:
            s.psk.close()  # an uncommitted ratchet stays pending: never a lock-out
        if channel is not None:
            channel.close()
        if s.recovered_channel is not None:
            s.recovered_channel.close()

    def _complete(
        self, channel: ControlChannel, vm: VmT, transfer: TransferT, started: float, cpu_started: float
    ) -> None:
        """Committed (or switched to post-copy): the destination's running receipt, then our copy quits."""
        s = self.session
        running = self._receipt(channel, "running", None)  # audited after the mark: not part of the downtime
        if self._postcopy:
            self._check_postcopy_digest(running, transfer)
        self._commit_psk()
        # Downtime ends when the destination's guest runs: its receipt says so.
        # (post-copy: the driver's report gives QEMU's own figure: the receipt comes once every page is there)
        s.report.downtime_ms = s.report.downtime_breakdown_ms.get("running_receipt", 0.0)
        # The migration is over when the VM runs there (as QEMU counts it);
        # quitting our paused copy comes after and is not part of it.
        self._finish_report(transfer, running, started, cpu_started)
        self.driver.release(vm)
        records.transition(self._store, s.migration_id, Event.CONFIRM_RUNNING)
        self._audit_move(
            "migration.completed", vm, downtime_ms=s.report.downtime_ms, total_time_s=s.report.total_time_s
        )

    def _failed(
        self, exc: BaseException, channel: ControlChannel | None, vm: VmT, started: float, cpu_started: float
    ) -> MigrationError:
        """The report and the record after a failure, by how far the handover got; the error to raise."""
        s = self.session
        s.report.status = "failed"
        s.report.total_time_s = round(time.monotonic() - started, 3)
        s.report.source_cpu_s = round(time.process_time() - cpu_started, 3)
        if self._postcopy:
            s.report.error = (
                f"{exc}; post-copy had begun, so {vm.name} can never run on {self._config.name} again: it "
                f"waits on {s.destination} for its remaining pages (phase postcopy-paused; "
                f"its source QEMU is kept until the post-copy is recovered or given up)"
            )
            records.transition(self._store, s.migration_id, Event.FAIL, error=str(exc))
        elif self._handed_over and not self._committed:
            s.report.error = (
                f"{exc}; libvirt had already handed {vm.name} over (its copy here has quit), so it can only run "
                f"on {s.destination}, where it waits paused until the agents settle it (`sealift migrations`)"
            )
            records.transition(self._store, s.migration_id, Event.FAIL, error=str(exc))
        elif self._committed:
            s.report.error = (
                f"{exc}; the commit was sent, so {vm.name} stays paused on {self._config.name} until "
                f"{s.destination} confirms it runs there (the agents settle it between them: `sealift migrations`)"
            )
            records.transition(self._store, s.migration_id, Event.FAIL, error=str(exc))
        else:
            self._abort(channel, vm, exc)
        s.report.error_code = s.report.error_code or failure_code(exc)
        self._store.save_report(s.migration_id, s.report.to_dict())
        return MigrationError(s.report.error or str(exc), code=s.report.error_code)

    def _audit_move(self, kind: str, vm: VmT, **fields: object) -> None:
        """An audit entry about moving `vm`: every such entry names the VM and where it goes."""
        self._audit(kind, vm=vm.name, destination=self.session.destination, **fields)

    def _hello(self, channel: ControlChannel, vm: VmT) -> Accept:
        s = self.session
        psk_proof = None
        if s.psk is not None:
            s.psk_binding = psk_channel_binding(channel.tls)
            psk_proof = s.psk.make_proof(s.psk_binding, s.nonce)
        channel.send(self.driver.describe(vm, psk_proof))
        reply = channel.recv(self._config.step_timeout_s)
        if isinstance(reply, (Refuse, Abort)):
            # Either way the destination said no before it took anything: pass its reason (and code) on.
            code = reply.code if isinstance(reply, Refuse) else "peer_aborted"
            raise MigrationError(f"{s.destination} refused the migration: {reply.reason}", code=code)
        if not isinstance(reply, Accept):
            raise MigrationError(f"{s.destination} answered Hello with {type(reply).__name__}, not Accept")
        if s.psk is not None:
            # The destination must prove the pair's current PSK too (mutual second factor).
            s.psk.check_peer_proof(reply.psk_proof, s.psk_binding, s.nonce, reply.nonce)
            self._authority.record_psk_verified(s.migration_id, s.destination, s.psk)
        return reply

    def _manifest_and_prepare(
        self,
        channel: ControlChannel,
        vm: VmT,
        memory_bytes: int,
        backend_fields: tuple[dict[str, object], dict[str, object]],
    ) -> dict:
        """Sign and send the manifest with the backend's (fields, digest audit); the destination's signed
        "prepared" receipt for it."""
        s = self.session
        fields, digest_audit = backend_fields
        manifest = {
            "migration_id": s.migration_id,
            "vm": vm.name,
            "source": self._config.name,
            "destination": s.destination,
            "memory_bytes": memory_bytes,
            **fields,
            "counter_at_pause": s.report.counter_at_pause,
            "nonce_source": s.nonce.hex(),
            "channel_binding": s.binding,
            "order_id": s.report.order_id,
            "signed_at": time.time(),
        }
        envelope = s.signer.sign(manifest, "manifest")
        channel.send(Manifest(s.migration_id, envelope))
        self._mark("manifest_sent")
        self._audit(Kinds.MIGRATION_DIGEST, **digest_audit, manifest_sha256=_sha256(envelope))
        return self._receipt(channel, "prepared", manifest)

    def _decide_postcopy(self, channel: ControlChannel, vm: VmT, memory_bytes: int, fields: dict[str, object]) -> None:
        """Post-copy's point of no return, called by the driver just before it switches (the guest still runs here).

        The same steps as a commit: the signed manifest (without a digest: the
        stream is not over), the destination's signed "prepared" receipt, the
        last revocation check, the durable decision, Commit. Any failure before
        the decision is an ordinary abort: the guest never stopped here.
        """
        s = self.session
        s.flight.check()
        self._manifest_and_prepare(channel, vm, memory_bytes, (fields, {"postcopy": True}))
        self._authority.final_check(s.flight)
        records.transition(self._store, s.migration_id, Event.DECIDE_POSTCOPY)  # point of no return
        self._committed = True
        self._postcopy = True
        self._audit_move(Kinds.MIGRATION_HANDOVER, vm, decision="committed", postcopy=True)
        channel.send(Commit(s.migration_id))
        s.progress("phase", {"phase": "postcopy-active"})

    def _record_handover(self, vm: VmT) -> None:
        """libvirt's switchover is done: the source's copy has quit, the guest waits paused at the destination.

        That is the point of no return, so it is recorded (decision
        "committed") before anything else can fail: from here a failure leaves
        the migration in doubt for the resolver, never aborted, and the source
        copy is never started again. The signed steps still follow (manifest,
        prepared receipt, Commit), and the destination starts the guest only on
        a commit: this one, or the resolver's word.
        """
        s = self.session
        s.enter(Event.HYPERVISOR_HANDED_OVER)
        self._handed_over = True
        self._audit_move(Kinds.MIGRATION_HANDOVER, vm, decision="committed", handed_over_by="libvirt")

    def _reconfirm_postcopy(
        self, channel: ControlChannel, vm: VmT, memory_bytes: int, fields: dict[str, object]
    ) -> None:
        """A post-copy resumed over a fresh channel: the same signed steps as the switch, with no new decision
        (it is on disk): manifest, the destination's "prepared" receipt bound to the new channel, Commit."""
        s = self.session
        s.flight.check()
        self._manifest_and_prepare(channel, vm, memory_bytes, (fields, {"postcopy": True, "resume": True}))
        channel.send(Commit(s.migration_id))

    def _check_postcopy_digest(self, running: dict, transfer: TransferT) -> None:
        """Post-copy: the stream digest is checked only at the end, against the destination's signed running receipt."""
        s = self.session
        ours = self.driver.manifest_fields(transfer)[0].get("image_digest")
        theirs = running.get("stream_digest")
        s.audit(Kinds.MIGRATION_DIGEST, image_digest=ours, received=theirs, verified=ours == theirs, postcopy=True)
        if ours != theirs:
            raise PostcopyDigestMismatch(
                f"{s.destination} received stream {theirs!r}, this host sent {ours!r}: the guest already runs there"
            )

    def _abort(self, channel: ControlChannel | None, vm: VmT, exc: BaseException) -> None:
        """Before the commit decision: the guest resumes here, nothing is lost."""
        s = self.session
        reason, code = self._failure(channel, exc)
        s.report.error_code = code
        if channel is not None:
            try:
                channel.send(Abort(s.migration_id, reason[:1000], code))
            except Exception:  # noqa: BLE001 - the peer may be gone; the abort stands regardless
                pass
            _await_close(channel, PEER_REASON_WAIT_S)
        resumed = False
        try:
            resumed = self.driver.resume(vm)
        finally:
            self.driver.unclaim(vm)
            records.transition(self._store, s.migration_id, Event.FAIL, error=reason)
        where = f"{vm.name} keeps running on {self._config.name}" if resumed else f"{vm.name} could not be resumed"
        s.report.error = f"migration to {s.destination} failed: {reason}; {where}"
        self._audit_move("migration.aborted", vm, reason=reason, code=code, resumed=resumed)
        log.warning("%s (%s)", s.report.error, code)

    def _failure(self, channel: ControlChannel | None, exc: BaseException) -> tuple[str, str]:
        """Why the migration failed, and its code: the destination's word when it has one.

        A data stream that breaks here (a reset, a broken pipe, a stream cut
        short) is only the symptom: the destination closed it because it
        found something wrong (a record that failed authentication, a digest
        mismatch) or because it died. Its Abort, sent right after, names the
        cause; wait a moment for it, or say plainly that it went silent.
        """
        local, code = str(exc) or type(exc).__name__, failure_code(exc)
        if channel is None or not _peer_may_know(exc):
            return local, code
        peer = self.session.destination
        try:
            message = channel.recv(PEER_REASON_WAIT_S)
        except TimeoutError:
            return f"{local} ({peer} gave no reason within {PEER_REASON_WAIT_S:.0f} s)", code
        except (OSError, ProtocolError):
            return f"{local} ({peer} closed the control connection too: its agent died or dropped us)", "peer_gone"
        if isinstance(message, Abort):
            return f"{peer} aborted: {message.reason} (here: {local})", message.code
        return local, code

    def _finish_report(self, transfer: TransferT, running: dict, started: float, cpu_started: float) -> None:
        report = self.session.report
        report.status = "completed"
        report.total_time_s = round(time.monotonic() - started, 3)
        self.driver.fill_report(transfer)
        report.counter_after = running.get("counter_at_resume")
        report.source_cpu_s = round(time.process_time() - cpu_started, 3)
        report.destination_cpu_s = float(running.get("cpu_s", 0.0))
        self._store.save_report(self.session.migration_id, report.to_dict())

    def _receipt(self, channel: ControlChannel, stage: str, manifest: dict | None) -> dict:
        """The destination's signed receipt for `stage` ("prepared": for this manifest; "running"), audited."""
        s = self.session
        receipt, envelope = await_receipt(
            channel,
            s.signer,
            peer=s.destination,
            stage=stage,
            migration_id=s.migration_id,
            binding=s.binding,
            manifest=manifest,
            timeout=self._config.step_timeout_s,
        )
        self._mark(f"{stage}_receipt_in")
        if stage == "running":
            self._mark("running_receipt")  # the downtime's end: the guest runs there
        self._audit(Kinds.RECEIPT, stage=stage, receipt=envelope)
        return receipt

    def _mark(self, step: str) -> None:
        """A handover step's time since the pause, once the stop-and-copy has begun (not in post-copy's switch)."""
        if self._paused_at is not None:
            self.session.mark(step, self._paused_at)

    def _audit(self, kind: str, **fields: object) -> None:
        """An audit entry now, or (while the guest is stopped before Commit is sent) once it is sent."""
        if self._defer_audit:
            self._deferred_audits.append((kind, fields))
        else:
            self.session.audit(kind, **fields)

    def _flush_audits(self) -> None:
        """Write the deferred audit entries, in their order; from now on entries are written at once.

        They are a record for people, not the handover's state (the store's
        decision is, written before Commit): deferring them changes when they
        are written, never whether a copy runs.
        """
        self._defer_audit = False
        entries, self._deferred_audits = self._deferred_audits, []
        for kind, fields in entries:
            self.session.audit(kind, **fields)

    def _commit_psk(self) -> None:
        s = self.session
        if s.psk is not None and s.psk.commit():
            s.audit(Kinds.KEY_CHANGED, what="psk ratcheted", peer=s.destination, epoch=s.psk.epoch)
