"""Errors raised by the wire protocol.

Every malformed, oversized, unknown or out-of-order input becomes a
`ProtocolError`; callers close the connection and log `reason`.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer (or the local caller) broke the protocol; the connection must end."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordAuthError(ProtocolError):
    """An AEAD record did not authenticate: tampered, reordered, replayed or wrong key."""

    def __init__(self, reason: str = "record failed authentication: tampered or wrong key") -> None:
        super().__init__(reason)
