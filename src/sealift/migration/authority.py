"""Who may do what on this host: orders, policy, revocation, replay, audit.

Every migration needs a migration order signed by an operator of the cluster
CA. The source checks it before anything leaves (outgoing migration control)
and the destination before it accepts anything (incoming migration control),
each against its own policy file, its own revocation list and its own replay
cache, and each decision goes into the host's signed, hash-chained audit log.
Checks run cheapest first: size and syntax, issuer and signature, validity,
hosts, policy, and the replay cache last (it writes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

from cryptography import x509

from sealift.host.config import AgentConfig
from sealift.security.audit import AuditLog, Kinds
from sealift.security.errors import CertificateError, SecurityError
from sealift.security.identity import HostIdentity
from sealift.security.orders import MalformedOrderError, OrderError, VerifiedOrder, verify_order
from sealift.security.policy import Policy
from sealift.security.psk import PskRole, PskSession, PskStore, psk_fingerprint, wrap_key_from_private_key
from sealift.security.replay import ReplayCache
from sealift.security.revocation import RevocationList

log = logging.getLogger(__name__)


class Authority:
    def __init__(self, config: AgentConfig, identity: HostIdentity) -> None:
        self._config = config
        self._host = config.name
        self.ca_certificate = identity.ca_certificate()
        self.audit = AuditLog.for_host(config.state_dir, config.name, identity.private_key())
        self.replay = ReplayCache(config.state_dir / "replay.sqlite3")
        # The optional second factor (seed 002, done safely): keys at rest under the host key.
        self.psk = PskStore(config.state_dir / "psk.sqlite3", wrap_key_from_private_key(identity.private_key()))
        self._lock = threading.Lock()
        self.policy = self._load_policy()
        self.revocations = self._load_revocations()
        self.audit.append(Kinds.AGENT_STARTED, host=config.name)

    # -- loading ------------------------------------------------------------

    def _load_policy(self) -> Policy:
        path = self._config.policy_path
        if path is None or not path.exists():
            self.audit.append(Kinds.POLICY_LOADED, path=str(path), rules=0, note="no policy file: deny all")
            log.warning("no policy file (%s): every migration order will be refused", path)
            return Policy.deny_all()
        policy = Policy.load(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
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
            self.audit.append("peer.refused", peer=peer, reason=str(exc))
            raise

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

    def provision_psk(self, peer: str, key: bytes) -> str:
        self.psk.provision(peer, key, replace=True)
        fingerprint = psk_fingerprint(key)
        self.audit.append(Kinds.KEY_CHANGED, what="psk provisioned", peer=peer, fingerprint=fingerprint)
        return fingerprint

    def close(self) -> None:
        self.psk.close()
        self.replay.close()
        self.audit.close()
