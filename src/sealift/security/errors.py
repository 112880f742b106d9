"""Error types of the security layer.

Every error carries a message an operator can act on: what was refused, why,
and where relevant which file or peer is involved.
"""

from __future__ import annotations


class SecurityError(Exception):
    """Base class: something was refused for a security reason."""


class CertificateError(SecurityError):
    """A key or certificate is missing, malformed, unreadable or not acceptable."""


class PeerIdentityError(SecurityError):
    """The peer authenticated, but as a different host than the one expected."""


class SignatureError(SecurityError):
    """A signed document is malformed, of the wrong kind or signer, or forged."""


class HandshakeError(SecurityError):
    """The TLS handshake failed or did not complete in time."""
