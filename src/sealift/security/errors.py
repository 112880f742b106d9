"""Error types of the security layer, all of them: one hierarchy under SecurityError.

    SealiftError
    └── SecurityError
        ├── CertificateError
        │   ├── MalformedCertificateError
        │   ├── CertificateRevokedError
        │   └── CrlError
        ├── PeerIdentityError, SignatureError, HandshakeError
        ├── AuditError, PolicyFileError
        └── OrderError (an order was refused; its code goes to the audit log)
            ├── MalformedOrderError
            │   └── OrderTooLargeError
            ├── UntrustedIssuerError
            │   └── IssuerRevokedError
            ├── OrderSignatureError, OrderExpiredError, OrderNotYetValidError
            ├── WrongSourceError, WrongDestinationError, OrderReplayedError
            └── PolicyDeniedError

The modules that raise them (orders, revocation, policy, replay, audit) import them from here.

Every error carries a message an operator can act on: what was refused, why,
and where relevant which file or peer is involved.
"""

from __future__ import annotations

from typing import Any

from sealift.errors import SealiftError


class SecurityError(SealiftError):
    """Base class: something was refused for a security reason."""

    code = "security_error"


class CertificateError(SecurityError):
    """A key or certificate is missing, malformed, unreadable or not acceptable."""

    code = "certificate_error"


class MalformedCertificateError(CertificateError):
    """A certificate whose outer encoding loads but whose inside (a name, an extension, the key) does not parse."""

    code = "malformed_certificate"


class PeerIdentityError(SecurityError):
    """The peer authenticated, but as a different host than the one expected."""

    code = "peer_identity_error"


class SignatureError(SecurityError):
    """A signed document is malformed, of the wrong kind or signer, or forged."""

    code = "signature_error"


class HandshakeError(SecurityError):
    """The TLS handshake failed or did not complete in time."""

    code = "handshake_failed"


class CertificateRevokedError(CertificateError):
    """The certificate is on the cluster CA's revocation list."""

    code = "certificate_revoked"


class CrlError(CertificateError):
    """The CRL is missing, unreadable, not from this CA, not yet valid or expired."""

    code = "crl_error"


class AuditError(SecurityError):
    """The audit log cannot be written or read (not: it was tampered with; see verify)."""

    code = "audit_error"


class PolicyFileError(SecurityError):
    """The policy file is missing, not TOML, or breaks the rules of sealift.security.policy."""

    code = "policy_file_error"


# Orders: why an order was refused. Each code goes to the audit log.


class OrderError(SecurityError):
    """An order was refused. `code` is a short machine-readable reason for the audit log."""

    code = "refused"

    def __init__(self, message: str, order_id: str | None = None) -> None:
        super().__init__(message)
        self.order_id = order_id

    def audit_fields(self) -> dict[str, Any]:
        """Fields for an `order.refused` audit entry."""
        return {"order_id": self.order_id, "code": self.code, "reason": str(self)}


class MalformedOrderError(OrderError):
    code = "malformed"


class OrderTooLargeError(MalformedOrderError):
    code = "too_large"


class OrderSignatureError(OrderError):
    code = "bad_signature"


class UntrustedIssuerError(OrderError):
    """The issuer's certificate is not a valid operator certificate of this cluster's CA."""

    code = "untrusted_issuer"


class IssuerRevokedError(UntrustedIssuerError):
    code = "issuer_revoked"


class OrderExpiredError(OrderError):
    code = "expired"


class OrderNotYetValidError(OrderError):
    code = "not_yet_valid"


class WrongSourceError(OrderError):
    code = "wrong_source"


class WrongDestinationError(OrderError):
    code = "wrong_destination"


class OrderReplayedError(OrderError):
    """The order's id was already used on this agent (raised by replay.ReplayCache)."""

    code = "replayed"


class PolicyDeniedError(OrderError):
    """The policy does not allow this operator to order this migration."""

    code = "denied_by_policy"
