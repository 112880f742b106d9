"""Who may do what on this host: orders, policy, revocation, replay, audit.

Every migration needs a migration order signed by an operator of the cluster
CA. The source checks it before anything leaves (outgoing migration control)
and the destination before it accepts anything (incoming migration control),
each against its own policy file, its own revocation list and its own replay
cache, and each decision goes into the host's signed, hash-chained audit log.
Checks run cheapest first: size and syntax, issuer and signature, validity,
hosts, policy, and the replay cache last (it writes).

Live revocation: the CRL and the policy file are read again when they change
(polled about once a second) or on SIGHUP (`request_reload`). A new file
that fails its checks is refused and audited, and the one in force stays:
never fall open. A newly loaded CRL is also checked against every migration
under way (`rely_on`): one whose peer host or operator it revokes is marked,
and its coordinator aborts it before the commit decision.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealift.host.config import AgentConfig
from sealift.security.audit import AuditLog, Kinds
from sealift.security.errors import (
    CertificateError,
    CrlError,
    MalformedOrderError,
    OrderError,
    PolicyFileError,
    SecurityError,
)
from sealift.security.identity import HostIdentity
from sealift.security.orders import VerifiedOrder, verify_order
from sealift.security.policy import Policy
from sealift.security.psk import PskRole, PskSession, PskStore, psk_fingerprint, wrap_key_from_private_key
from sealift.security.reload import FileStamp, InFlightTrust
from sealift.security.replay import ReplayCache
from sealift.security.revocation import RevocationList

log = logging.getLogger(__name__)

RELOAD_POLL_S = 1.0  # how often the CRL and policy files are looked at for a change


class Authority:
    def __init__(self, config: AgentConfig, identity: HostIdentity) -> None:
        self._config = config
        self._host = config.name
        self.ca_certificate = identity.ca_certificate()
        self.audit = AuditLog.for_host(config.state_dir, config.name, identity.private_key())
        self.replay = ReplayCache(config.state_dir / "replay.sqlite3")
        # The optional second factor (seed 002, done safely): keys at rest under the host key.
        self.psk = PskStore(config.state_dir / "psk.sqlite3", wrap_key_from_private_key(identity.private_key()))
        # Guards `revocations` against the in-flight migrations' registrations (`rely_on`).
        self._lock = threading.Lock()
        self._flights: set[InFlightTrust] = set()
        self._reload_lock = threading.Lock()  # one reload at a time (watcher thread, tests)
        self._reload_requested = threading.Event()
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        # Stamps are taken before reading: a change while we read is seen at the next poll.
        self._policy_stamp = FileStamp.of(config.policy_path)
        self.policy = self._load_policy()
        self._crl_stamp = FileStamp.of(config.crl_path)
        self.revocations = self._load_revocations()
        self.audit.append(Kinds.AGENT_STARTED, host=config.name)

    # -- loading ------------------------------------------------------------

    def _load_policy(self) -> Policy:
        path = self._config.policy_path
        if path is None or not path.exists():
            self.audit.append(Kinds.POLICY_LOADED, path=str(path), rules=0, note="no policy file: deny all")
            log.warning("no policy file (%s): every migration order will be refused", path)
            return Policy.deny_all()
        policy, digest = _read_policy(path)
        self.audit.append(Kinds.POLICY_LOADED, path=str(path), sha256=digest, rules=len(policy.rules))
        return policy

    def _load_revocations(self) -> RevocationList:
        path = self._config.crl_path
        if path is None or not path.exists():
            return RevocationList.disabled()
        revocations = RevocationList.load(path, self.ca_certificate)
        self.audit.append(Kinds.CRL_LOADED, path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        return revocations

    # -- peers ----------------------------------------------------------------

    def check_peer(self, certificate: x509.Certificate, peer: str) -> None:
        """A revoked host is refused even though its certificate still verifies."""
        try:
            self.revocations.check(certificate, what=f"host certificate of {peer}")
        except CertificateError as exc:
            self.audit.append(Kinds.PEER_REFUSED, peer=peer, reason=str(exc))
            raise

    # -- migrations in flight ---------------------------------------------------

    def rely_on(self, flight: InFlightTrust, what: str, certificate: x509.Certificate) -> None:
        """`flight` relies on `certificate` from now on: checked now, and against every CRL loaded later.

        Under the lock, so that no reload slips between the check and the registration.
        """
        with self._lock:
            self.revocations.check(certificate, what)
            flight.rely_on(what, certificate)
            self._flights.add(flight)

    def final_check(self, flight: InFlightTrust) -> None:
        """The last check before a point of no return: raise if revoked; from then on later CRLs leave it be.

        Under the lock: a CRL loaded after this finds the migration past its decision, not half-way.
        """
        with self._lock:
            self._flights.discard(flight)
            flight.check()

    def forget(self, flight: InFlightTrust) -> None:
        """The migration is over (or past its commit decision): later CRLs no longer concern it."""
        with self._lock:
            self._flights.discard(flight)

    # -- orders ---------------------------------------------------------------

    def authorize_outgoing(self, envelope: str | None, vm: str, destination: str) -> VerifiedOrder:
        """Outgoing migration control: may this VM leave for that host?"""
        return self._authorize(envelope, vm, source=self._host, destination=destination, role="source")

    def authorize_incoming(self, envelope: str | None, vm: str, source: str) -> VerifiedOrder:
        """Incoming migration control: may this authenticated peer push this VM here?"""
        return self._authorize(envelope, vm, source=source, destination=self._host, role="destination")

    def _authorize(self, envelope: str | None, vm: str, source: str, destination: str, role: str) -> VerifiedOrder:
        self.audit.append(
            Kinds.ORDER_RECEIVED, side=role, vm=vm, source=source, destination=destination, size=len(envelope or "")
        )
        try:
            if envelope is None:
                raise MalformedOrderError("no migration order: every migration needs one signed by an operator")
            verified = verify_order(
                envelope,
                self.ca_certificate,
                revocations=self.revocations,
                expect_source=source,
                expect_destination=destination,
            )
            order = verified.order
            if order.vm != vm:
                raise MalformedOrderError(
                    f"order {order.short_id} is for VM {order.vm!r}, not {vm!r}", order_id=order.id
                )
            # Labels come from our own records, never from the order itself.
            self.policy.authorize(verified.operator, vm, None, order.source, order.destination).require(order.id)
            self.replay.use_once(order.id, order.expires)
        except OrderError as refusal:
            self.audit.append(Kinds.ORDER_REFUSED, side=role, vm=vm, **refusal.audit_fields())
            raise
        except SecurityError as refusal:  # refused by another security check: on record with its own code
            self.audit.append(
                Kinds.ORDER_REFUSED, side=role, vm=vm, order_id=None, code=refusal.code, reason=str(refusal)
            )
            raise
        except Exception as exc:
            # A check that broke refuses the order (fail closed), and that refusal is on record like any.
            log.exception("checking the migration order of %s failed", vm)
            unchecked = OrderError(f"the migration order could not be checked: {str(exc) or type(exc).__name__}")
            self.audit.append(Kinds.ORDER_REFUSED, side=role, vm=vm, **unchecked.audit_fields())
            raise unchecked from exc
        self.audit.append(Kinds.ORDER_ACCEPTED, side=role, **verified.audit_fields())
        return verified

    # -- live reload ----------------------------------------------------------

    def start_watching(self, interval_s: float = RELOAD_POLL_S) -> None:
        """Reload the CRL and the policy when their files change, and at once on `request_reload`."""
        self._watcher = threading.Thread(target=self._watch, args=(interval_s,), name="trust-reload", daemon=True)
        self._watcher.start()

    def request_reload(self) -> None:
        """Reload both files now (SIGHUP). Safe in a signal handler: the watcher thread does the work."""
        self._reload_requested.set()

    def _watch(self, interval_s: float) -> None:
        while not self._stop_watching.is_set():
            requested = self._reload_requested.wait(interval_s)
            self._reload_requested.clear()
            if self._stop_watching.is_set():
                return
            try:
                self.reload(trigger="sighup" if requested else "file changed", only_changed=not requested)
            except Exception:  # a bug must not end the watching: the next change or SIGHUP tries again
                log.exception("reloading the CRL and policy failed; the previous ones stay in force")

    def reload(self, *, trigger: str = "sighup", only_changed: bool = False) -> None:
        """Read the CRL and the policy file again; a file that fails its checks is refused, the old one stays.

        `only_changed`: only the files whose stamp moved since they were last read (the watcher's poll).
        """
        with self._reload_lock:
            crl_stamp = FileStamp.of(self._config.crl_path)
            if not only_changed or crl_stamp != self._crl_stamp:
                self._crl_stamp = crl_stamp
                self._reload_revocations(trigger)
            policy_stamp = FileStamp.of(self._config.policy_path)
            if not only_changed or policy_stamp != self._policy_stamp:
                self._policy_stamp = policy_stamp
                self._reload_policy(trigger)

    def _reload_revocations(self, trigger: str) -> None:
        path = self._config.crl_path
        if path is None or (not self.revocations.enabled and not path.exists()):
            return  # still no CRL: nothing to reload (a CRL in force that vanishes is refused below)
        try:
            new = RevocationList.load(path, self.ca_certificate)
            self._check_not_older(new)
        except CrlError as exc:
            self._refuse_reload(Kinds.CRL_REFUSED, "revocation list", path, exc, trigger)
            return
        with self._lock:
            self.revocations = new
            stopped = [(flight, revoked) for flight in self._flights if (revoked := flight.recheck(new)) is not None]
        assert new.crl is not None
        digest = hashlib.sha256(new.crl.public_bytes(serialization.Encoding.DER)).hexdigest()
        self.record(
            Kinds.CRL_RELOADED,
            path=str(path),
            number=new.number,
            sha256=digest,
            entries=len(new.entries),
            trigger=trigger,
        )
        log.info("revocation list %s reloaded (%s): number %s, %d entries", path, trigger, new.number, len(new.entries))
        for flight, revoked in stopped:
            self.record(
                Kinds.MIGRATION_REVOKED, migration_id=flight.migration_id, reason=str(revoked), code=revoked.code
            )
            log.warning("migration %s is being stopped: %s", flight.migration_id, revoked)

    def _check_not_older(self, new: RevocationList) -> None:
        """Refuse a rollback: an older CRL, or another one under the same number, cannot replace the one in force."""
        number = self.revocations.number
        if number is None or new.number is None:
            return
        if new.number < number:
            raise CrlError(f"revocation list {new.path} is number {new.number}, older than number {number} in force")
        if new.number == number and new.entries != self.revocations.entries:
            raise CrlError(f"revocation list {new.path} has the number {number} of the one in force but other entries")

    def _reload_policy(self, trigger: str) -> None:
        path = self._config.policy_path
        if path is None:
            return
        if not path.exists():
            # What a start without the file would do: deny all (stricter, never open).
            self.policy = Policy.deny_all()
            self.record(
                Kinds.POLICY_RELOADED, path=str(path), rules=0, note="no policy file: deny all", trigger=trigger
            )
            log.warning("policy file %s is gone: every migration order will be refused", path)
            return
        try:
            policy, digest = _read_policy(path)
        except PolicyFileError as exc:
            self._refuse_reload(Kinds.POLICY_REFUSED, "policy file", path, exc, trigger)
            return
        self.policy = policy
        self.record(Kinds.POLICY_RELOADED, path=str(path), sha256=digest, rules=len(policy.rules), trigger=trigger)
        log.info("policy %s reloaded (%s): %d rules", path, trigger, len(policy.rules))

    def _refuse_reload(self, kind: str, what: str, path: Path, exc: CrlError | PolicyFileError, trigger: str) -> None:
        self.record(kind, path=str(path), reason=str(exc), code=exc.code, trigger=trigger)
        log.error("new %s %s refused, the previous one stays in force: %s", what, path, exc)

    # -- migration steps ------------------------------------------------------

    def record(self, kind: str, **fields: Any) -> None:
        try:
            self.audit.append(kind, **fields)
        except Exception:  # the audit log must never be the reason a VM is lost
            log.exception("could not write audit entry %s", kind)

    # -- dynamic PSK ------------------------------------------------------------

    def psk_session(self, peer: str, role: PskRole) -> PskSession | None:
        """A PSK session if this host shares a key with `peer`; the key is then required."""
        return PskSession(self.psk, peer, role) if self.psk.has_peer(peer) else None

    def record_psk_verified(self, migration_id: str, peer: str, psk: PskSession) -> None:
        """The peer proved the pair's PSK: at which epoch, and whether a ratchet is under way (both roles)."""
        self.record("psk.verified", migration_id=migration_id, peer=peer, epoch=psk.epoch, ratcheting=psk.ratcheting)

    def provision_psk(self, peer: str, key: bytes) -> str:
        self.psk.provision(peer, key, replace=True)
        fingerprint = psk_fingerprint(key)
        self.audit.append(Kinds.KEY_CHANGED, what="psk provisioned", peer=peer, fingerprint=fingerprint)
        return fingerprint

    def close(self) -> None:
        self._stop_watching.set()
        self._reload_requested.set()  # wakes the watcher now
        if self._watcher is not None:
            self._watcher.join(5)
        self.psk.close()
        self.replay.close()
        self.audit.close()


def _read_policy(path: Path) -> tuple[Policy, str]:
    """The policy in `path` and the SHA-256 of the very bytes it was parsed from."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"cannot read policy file {path}: {exc}") from None
    return Policy.parse(text, source=str(path)), hashlib.sha256(data).hexdigest()
