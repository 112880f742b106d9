"""Errors raised by the wire protocol.

Every malformed, oversized, unknown or out-of-order input becomes a
`ProtocolError`; callers close the connection and log `reason`.
"""

from __future__ import annotations

from sealift.errors import SealiftError


class ProtocolError(SealiftError):
    """The peer (or the local caller) broke the protocol; the connection must end."""

    code = "protocol_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)  # SealiftError.reason returns it


class RecordAuthError(ProtocolError):
    """An AEAD record did not authenticate: tampered, reordered, replayed or wrong key."""

    code = "record_auth_failed"

    def __init__(self, reason: str = "record failed authentication: tampered or wrong key") -> None:
        super().__init__(reason)
