"""The data stream's record protection for one migration, from its authenticated control channel."""

from __future__ import annotations

from sealift.host.transport import ControlChannel
from sealift.security.keys import channel_secret, derive_session_keys
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection


def stream_protections(
    channel: ControlChannel, secure: bool, nonce_source: bytes, nonce_dest: bytes, label: str
) -> tuple[RecordProtection, RecordProtection]:
    """(source -> destination, destination -> source) protection of a data stream.

    The keys come from the TLS exporter of the control channel, both nonces
    and `label` (the migration id, or one per extra stream), so each stream
    of each migration has keys of its own; an insecure migration has none.
    """
    if not secure:
        return NoProtection(), NoProtection()
    secret = channel_secret(channel.tls, nonce_source, nonce_dest, label)
    keys = derive_session_keys(secret, nonce_source, nonce_dest, label)
    return (
        AeadProtection(keys.source_to_dest_key, keys.source_to_dest_iv),
        AeadProtection(keys.dest_to_source_key, keys.dest_to_source_iv),
    )
