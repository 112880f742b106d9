"""Error types of the security layer.

Every error carries a message an operator can act on: what was refused, why,
and where relevant which file or peer is involved.
"""

from __future__ import annotations

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
