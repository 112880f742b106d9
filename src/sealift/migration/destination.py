"""The destination side of a migration: the coordinator of the handover, for every backend.

The destination checks before it accepts (is the Hello for this host, from
the host that authenticated, with a valid order, can we hold the VM?),
receives through its backend's driver, which verifies the guest against the
source's signed manifest, and promises ("prepared") only once that is on
disk. It starts the guest only on Commit. A tampered record, a digest
mismatch, a dead peer or a timeout before the promise discards what came:
the source still has the VM. After the promise, a failure holds the guest
unstarted until the source's decision is known (migration/recovery.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from sealift.host.config import AgentConfig
from sealift.host.transport import ControlChannel
from sealift.migration import gate, records
from sealift.migration.authority import Authority
from sealift.migration.documents import DocumentError, channel_binding
from sealift.migration.drivers import DestinationDriver
from sealift.migration.errors import AdmissionError, IncomingRefused, failure_code
from sealift.migration.phases import Event, Phase, Role
from sealift.migration.session import DestinationSession
from sealift.security.audit import Kinds
from sealift.security.errors import SecurityError
from sealift.security.orders import VerifiedOrder
from sealift.security.psk import PskSession, psk_channel_binding
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Abort, Accept, Commit, Hello, Manifest, Receipt, Refuse

log = logging.getLogger(__name__)

SOURCE_REASON_WAIT_S = 2.0  # how long a destination whose stream broke waits for the source's Abort and reason


class DestinationCoordinator:
    def __init__(self, session: DestinationSession, driver: DestinationDriver) -> None:
        self.session = session
        self.driver = driver
        self._config = session.config
        self._store = session.context.store

    def run(self) -> None:
        s, hello = self.session, self.session.hello
        try:
            self.driver.admit()
        except (IncomingRefused, AdmissionError, SecurityError) as exc:  # a refusal (Refuse), not a failure
            self._refuse(exc)
            return
        except Exception as exc:  # a bug in a check: still refuse (nothing was taken), and say so, with its traceback
            log.exception("admission of migration %s failed unexpectedly", hello.migration_id)
            self._refuse(exc)
            return
        cpu_started = time.process_time()
        prepared = False
        handed_over = False  # libvirt handed the guest over, then the handover was cut before our promise
        try:
            records.create(
                self._store,
                hello.migration_id,
                hello.vm_name,
                Role.DESTINATION,
                hello.source_host,
                hello.memory_bytes,
                self.driver.backend,
            )
            self.driver.prepare()
            self._accept()
            manifest = self.driver.take_stream()
            s.context.authority.final_check(s.flight)  # a newly revoked source or operator: discard, never promise
            s.enter(Event.STREAM_VERIFIED)  # durable before we promise
            prepared = True
            receipt = self._receipt(manifest, "prepared")
            s.channel.send(Receipt(hello.migration_id, "prepared", receipt))
            # The source's guest is stopped until our running receipt: the promise (STREAM_VERIFIED, above)
            # is the durable write it waits for; the audit entries are written while the source decides.
            s.flush_audits()  # the manifest's digest check (the driver's)
            s.audit(Kinds.RECEIPT, stage="prepared", receipt=receipt)
            self._await_commit()
            s.lab_pause("commit-received")
            self._start_guest(manifest, cpu_started)
        except Exception as exc:
            handed_over = not prepared and self._in_doubt()
            if prepared:
                self._hold_in_doubt(exc)  # the source may have committed: keep what we have and ask it
            elif handed_over:
                self._hold_handed_over(exc)
            else:
                self._discard(exc)
        finally:
            try:
                s.flush_audits()  # a failure before the prepared receipt went out: its entries are still written
            except Exception:  # noqa: BLE001 - the migration's outcome stands; the log says what is missing
                log.exception("could not write the audit entries of %s", hello.migration_id)
            s.context.authority.forget(s.flight)
            if s.psk is not None:
                s.psk.close()  # an uncommitted ratchet stays pending: never a lock-out
            s.context.sessions.finish(s.session_id)
            self.driver.release(prepared or handed_over)

    def _refuse(self, exc: BaseException) -> None:
        s, hello = self.session, self.session.hello
        s.context.authority.forget(s.flight)  # it may rely on its peer already: nothing to stop any more
        code = failure_code(exc)
        s.error_code = code
        where = f"{self.driver.backend} migration {hello.migration_id} of {hello.vm_name} from {hello.source_host}"
        log.warning("refused %s (%s): %s", where, code, exc)
        s.audit("migration.refused", vm=hello.vm_name, source=hello.source_host, reason=str(exc), code=code)
        if s.psk is not None:
            s.psk.close()
        s.channel.send(Refuse(hello.migration_id, str(exc)[:1000], code))

    def _accept(self) -> None:
        s, hello = self.session, self.session.hello
        s.context.sessions.expect(s.session_id)
        s.binding = channel_binding(s.channel, hello.nonce, s.nonce, hello.migration_id)
        psk_proof = None
        if s.psk is not None:
            psk_proof = s.psk.make_proof(s.psk_binding, hello.nonce, s.nonce)
        s.channel.send(Accept(hello.migration_id, s.nonce, s.session_id, psk_proof))
        s.audit(
            "migration.accepted",
            vm=hello.vm_name,
            source=hello.source_host,
            **self.driver.accept_audit,
            memory_bytes=hello.memory_bytes,
        )

    def _receipt(self, manifest: Mapping[str, object], stage: str, **extra: object) -> str:
        s, hello = self.session, self.session.hello
        payload = {
            "migration_id": hello.migration_id,
            "vm": hello.vm_name,
            "source": hello.source_host,
            "destination": self._config.name,
            "image_digest": manifest.get("image_digest"),
            "state_digest": manifest.get("state_digest"),
            "stage": stage,
            "channel_binding": s.binding,
            "signed_at": time.time(),
            **extra,
        }
        return s.signer.sign(payload, "receipt")

    def _await_commit(self) -> None:
        s = self.session
        reply = s.channel.recv(self._config.step_timeout_s)
        if isinstance(reply, Abort):
            raise IncomingRefused(f"the source aborted: {reply.reason}", code=reply.code)
        assert isinstance(reply, Commit)
        # Only now does this host know the source checked our Accept and holds the new key.
        if s.psk is not None:
            try:
                if s.psk.commit():
                    s.audit(Kinds.KEY_CHANGED, what="psk ratcheted", peer=s.hello.source_host, epoch=s.psk.epoch)
            except SecurityError as exc:  # the handover matters more than this session's ratchet
                log.error("PSK ratchet with %s not committed: %s", s.hello.source_host, exc)

    def _start_guest(self, manifest: Mapping[str, object], cpu_started: float) -> None:
        s, hello = self.session, self.session.hello
        s.enter(Event.RECEIVE_COMMIT)
        s.lab_pause("committed")
        pid, counter_at_resume = self.driver.start_guest(manifest)
        if manifest.get("postcopy") is not True:  # post-copy: the driver went through postcopy-active to running
            s.enter(Event.START_GUEST)  # before the receipt: whoever asks after the source's report sees "running"
        receipt = self._receipt(
            manifest,
            "running",
            counter_at_resume=counter_at_resume,
            pid=pid,
            cpu_s=round(time.process_time() - cpu_started, 3),
            **s.receipt_extra,
        )
        # The receipt before the audit entry: the source's stopped window ends with the receipt.
        try:
            s.channel.send(Receipt(hello.migration_id, "running", receipt))
        except OSError as exc:
            # The guest runs here and the source has committed: it will learn by asking.
            log.warning("could not send the running receipt for %s: %s", hello.migration_id, exc)
        try:
            s.audit(Kinds.MIGRATION_HANDOVER, decision="committed", vm=hello.vm_name, pid=pid, receipt=receipt)
        except Exception:  # noqa: BLE001 - never hold a guest that runs and whose source may have let go
            log.exception("%s runs here, but its audit entry could not be written", hello.vm_name)

    def _hold_in_doubt(self, exc: BaseException) -> None:
        self._keep_unstarted(exc, "after prepare", fail=True)

    def _in_doubt(self) -> bool:
        """Did the driver put the record in doubt (libvirt: its switchover was done when the handover broke)?"""
        record = self._store.migration(self.session.hello.migration_id)
        return record is not None and record.phase == Phase.IN_DOUBT

    def _hold_handed_over(self, exc: BaseException) -> None:
        """The hypervisor handed the guest over before our promise, then the handover broke: it may be the only
        copy. Keep it unstarted and busy; the resolver starts it once the source says it committed."""
        self._keep_unstarted(exc, "after the hypervisor's switchover", fail=False)

    def _keep_unstarted(self, exc: BaseException, when: str, fail: bool) -> None:
        """In doubt: the guest stays here unstarted and busy while the resolver asks the source for its decision.
        `fail`: record the failure (the driver has not put the record in doubt itself)."""
        s, hello = self.session, self.session.hello
        log.warning(
            "%s migration %s in doubt %s (%s): %s kept unstarted; asking %s",
            self.driver.backend,
            hello.migration_id,
            when,
            exc,
            hello.vm_name,
            hello.source_host,
        )
        s.error_code = failure_code(exc)
        if fail:
            s.enter(Event.FAIL, error=str(exc))
        self.driver.hold()

    def _cause(self, exc: BaseException) -> tuple[str, str]:
        """Why this migration failed, and its code: the source's word when the failure is only its symptom."""
        reason, code = str(exc) or type(exc).__name__, failure_code(exc)
        if not _source_may_know(exc):
            return reason, code
        try:
            abort = self.session.channel.abort_within(SOURCE_REASON_WAIT_S)
        except (OSError, ProtocolError):
            return reason, code
        if abort is None:
            return reason, code
        return f"the source aborted: {abort.reason} (here: {reason})", abort.code

    def _discard(self, exc: BaseException) -> None:
        """The failure on record (store, audit) and told to the source with its code, whatever state either is in."""
        s, hello = self.session, self.session.hello
        reason, code = self._cause(exc)
        s.error_code = code
        if code == "internal_error":  # a bug, not a peer's doing: keep its traceback for whoever fixes it
            log.error("%s migration %s failed unexpectedly", self.driver.backend, hello.migration_id, exc_info=exc)
        log.warning(
            "%s migration %s of %s from %s failed (%s): %s",
            self.driver.backend,
            hello.migration_id,
            hello.vm_name,
            hello.source_host,
            code,
            reason,
        )
        # The source first: it is waiting with a broken stream and no reason, and resuming its guest
        # is safe (nothing was promised here). Then what we received goes, and the record says why.
        try:
            s.channel.send(Abort(hello.migration_id, reason[:1000], code))
        except Exception:  # noqa: BLE001 - the conversation may already be over or the peer gone
            pass
        try:
            self.driver.discard(reason)
        finally:
            try:
                if self._store.migration(hello.migration_id) is not None:
                    s.enter(Event.FAIL, error=reason)
            except Exception:  # noqa: BLE001 - recording must not stop the abort
                log.exception("could not record the abort of %s", hello.migration_id)
            s.audit("migration.aborted", vm=hello.vm_name, source=hello.source_host, reason=reason, code=code)


def _source_may_know(exc: BaseException) -> bool:
    """A stream that the source closed or let go silent: the cause is the source's (its Abort says which).

    Not a record that failed authentication or a malformed one: that is what
    this host found, and it tells the source, not the other way round.
    """
    return isinstance(exc, (ConnectionError, TimeoutError))


def verify_manifest(session: DestinationSession, expected: Mapping[str, object], wording: str) -> tuple[dict, str]:
    """The source's signed manifest, checked against what this host knows and received; (manifest, envelope).

    `expected` holds the backend's own fields (digests, sizes); the handover's
    are checked for every backend. `wording` says how a mismatch is worded
    ("expected" or "received").
    """
    hello = session.hello
    reply = session.channel.recv(session.config.step_timeout_s)
    if isinstance(reply, Abort):
        raise IncomingRefused(f"the source aborted: {reply.reason}", code=reply.code)
    assert isinstance(reply, Manifest)
    manifest = session.signer.verify(reply.envelope, "manifest", hello.source_host, session.channel)
    common = {
        "migration_id": hello.migration_id,
        "vm": hello.vm_name,
        "source": hello.source_host,
        "destination": session.config.name,
        "memory_bytes": hello.memory_bytes,
        "channel_binding": session.binding,  # made for this very session, not replayed from another
        "order_id": session.order_id,
    }
    for key, value in {**common, **expected}.items():
        if manifest.get(key) != value:
            raise DocumentError(f"manifest {key} is {manifest.get(key)!r}, {wording} {value!r}")
    return manifest, reply.envelope


def admit_hello(session: DestinationSession) -> None:
    """Incoming migration control and the PSK second factor, for every backend (before its own checks)."""
    verified = verify_hello(session.config, session.channel, session.hello, session.context.authority)
    session.order_id = verified.order.id
    rely_on_source(session, verified)
    if session.channel.secure:
        session.psk, session.psk_binding = check_source_psk(session.context.authority, session.channel, session.hello)


def rely_on_source(session: DestinationSession, verified: VerifiedOrder) -> None:
    """From here until this host promises, a newly revoked source host or operator stops the migration."""
    authority, flight = session.context.authority, session.flight
    authority.rely_on(flight, f"the certificate of operator {verified.operator.name!r}", verified.issuer_certificate)
    if session.channel.secure:
        certificate = session.channel.tls.peer_certificate
        authority.rely_on(flight, f"host certificate of {session.hello.source_host}", certificate)


def check_source_psk(authority: Authority, channel: ControlChannel, hello: Hello) -> tuple[PskSession | None, bytes]:
    """The optional second factor, for both backends: if we share a PSK with the source, it must prove it.

    Returns the session (to prove ourselves in Accept and ratchet on commit)
    and its channel binding; a failed proof closes the session and raises.
    """
    psk = authority.psk_session(hello.source_host, "destination")
    if psk is None:
        return None, b""
    binding = psk_channel_binding(channel.tls)
    try:
        psk.check_peer_proof(hello.psk_proof, binding, hello.nonce)
    except BaseException:
        psk.close()
        raise
    authority.record_psk_verified(hello.migration_id, hello.source_host, psk)
    return psk, binding


def verify_hello(config: AgentConfig, channel: ControlChannel, hello: Hello, authority: Authority) -> VerifiedOrder:
    """Incoming migration control, for every backend: who asks, over what, with which order.

    Cheap checks first; the order (signature, validity, policy, replay cache)
    last. Raises IncomingRefused or a SecurityError with the reason to send back.
    """
    if hello.destination_host != config.name:
        raise IncomingRefused(f"this host is {config.name}, not {hello.destination_host}")
    if channel.secure:
        if channel.peer_name != hello.source_host:
            raise IncomingRefused(
                f"the source authenticated as {channel.peer_name} but claims to be {hello.source_host}"
            )
        if not hello.secure:
            raise IncomingRefused("an authenticated channel must carry a protected data stream")
        authority.check_peer(channel.tls.peer_certificate, hello.source_host)
    else:
        if not config.allow_insecure:
            raise IncomingRefused("plaintext migrations are disabled on this host (allow_insecure = false)")
        if hello.secure:
            raise IncomingRefused("a protected migration needs the TLS control channel")
    gate.check_incoming(config.name, hello.vm_name, hello.source_host)  # T12: no attacker VM comes in
    # A valid, unused order naming this peer and this host.
    return authority.authorize_incoming(hello.order, hello.vm_name, hello.source_host)
