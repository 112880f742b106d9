"""How QEMU's migration stream reaches the destination QEMU: one strategy object per transport.

    sealift        QEMU's stream as AEAD records on the agents' data stream (default)
    sealift-plain  the agents' data stream without encryption (--insecure only)
    qemu-tls       QEMU's native TLS straight to the destination QEMU, with the hosts'
                   cluster-CA certificates installed as tls-creds-x509 (direct.py)
    ipsec          QEMU straight to the destination QEMU over TCP inside a per-migration IPsec SA
                   (strongSwan, IKEv2 with a PSK derived per migration from the control channel;
                   ipsec/, "IPsec transport" in docs/architecture.md)
    plain          QEMU straight to the destination QEMU over TCP in clear (--insecure only)

Every transport says whether it is secure and whether it is direct (QEMU's
own TCP connection instead of the agents' data stream); a direct transport
also says what each end's QEMU needs before its stream starts and after it
ends (hooks), and how the destination QEMU listens. The handover itself
(orders, manifest, receipts, commit) is the same on all of them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from sealift.backends.qemu.direct import Hook, QemuTls, TlsMaterial, incoming_port, listen_direct, tcp_uri
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.host.transport import ControlChannel
from sealift.ipsec.charon import CharonError, HostCharon
from sealift.ipsec.sa_key import ipsec_key_id, psk_for_migration
from sealift.ipsec.tunnel import IpsecEndpoint, IpsecError, SaRecord, TunnelHost, migration_endpoint, wait_tcp_closed
from sealift.migration.errors import MigrationError
from sealift.migration.options import MigrationOptions
from sealift.security.identity import HostIdentity
from sealift.security.psk import PskSession
from sealift.wire.qemu_stream import MAX_MULTIFD

log = logging.getLogger(__name__)

SA_CLOSE_WAIT_S = 2.0  # at most this long for QEMU's TCP connection to close before its SA goes

Audit = Callable[..., None]


@dataclass(frozen=True)
class DirectSource:
    """What a direct transport's source end needs from its migration."""

    identity: HostIdentity | None
    migration_id: str
    host: str  # this host's name
    peer: str  # the destination host's name
    channel: ControlChannel
    nonce_source: bytes
    nonce_dest: bytes
    local_address: str  # where we reach the destination agent from: QEMU connects from there
    destination: tuple[str, int]  # the destination QEMU's address
    psk: PskSession | None
    ipsec: HostCharon | None
    step_timeout_s: float
    audit: Audit


@dataclass(frozen=True)
class DirectDestination:
    """What a direct transport's destination end needs from its migration."""

    identity: HostIdentity | None
    migration_id: str
    host: str
    peer: str  # the source host's name
    channel: ControlChannel
    nonce_source: bytes
    nonce_dest: bytes
    listen_address: str  # where our QEMU listens: a concrete local address
    source_address: str
    psk: PskSession | None
    ipsec: HostCharon | None
    audit: Audit


@dataclass
class DirectPlan:
    """A direct transport's set-up for one end: hooks on its QEMU, and the SA it owns, if any."""

    before: list[Hook]
    after: list[Hook]
    sa: AuditedSa | None = None


class QemuTransport:
    """A transport for QEMU guests; the base is the sealift data stream (not direct)."""

    name: str = "sealift"
    secure: bool = True
    direct: bool = False

    def check(self, options: MigrationOptions) -> None:
        """Does this transport fit the options (both agents check it)? ValueError with the reason."""
        if self.secure and not options.secure:
            raise ValueError(f"the {self.name!r} transport is the secure one: drop --insecure, or use 'plain'")
        if not self.secure and options.secure:
            raise ValueError(f"the {self.name!r} transport carries guest memory in clear: it needs --insecure")
        if options.multifd_channels > MAX_MULTIFD and not self.direct:
            raise ValueError(
                f"the {self.name!r} transport carries at most {MAX_MULTIFD} multifd channels, "
                f"not {options.multifd_channels}"
            )

    def preflight(self, peer_address: str, ipsec: HostCharon | None) -> None:
        """Source, before anything is claimed: can this host use the transport at all?"""

    def check_destination(self, local: str | None, peer: str, ipsec: HostCharon | None) -> None:
        """Destination, before its QEMU starts: can this host use the transport? IpsecError-style reason."""

    def source_plan(self, end: DirectSource) -> DirectPlan:
        return DirectPlan([], [])

    def listen(self, end: DirectDestination, qemu: QemuVM) -> tuple[int, DirectPlan]:
        raise NotImplementedError(f"the {self.name!r} transport is not direct")


class SealiftPlain(QemuTransport):
    name, secure = "sealift-plain", False


class Plain(QemuTransport):
    name, secure, direct = "plain", False, True

    def listen(self, end: DirectDestination, qemu: QemuVM) -> tuple[int, DirectPlan]:
        return listen_direct(qemu, end.listen_address, []), DirectPlan([], [])


class QemuNativeTls(QemuTransport):
    name, secure, direct = "qemu-tls", True, True

    def source_plan(self, end: DirectSource) -> DirectPlan:
        tls = QemuTls(tls_material(end.identity), "client", end.peer, end.migration_id[:8])
        return DirectPlan([tls.install], [tls.remove])

    def listen(self, end: DirectDestination, qemu: QemuVM) -> tuple[int, DirectPlan]:
        tls = QemuTls(tls_material(end.identity), "server", end.peer, end.migration_id[:8])
        return listen_direct(qemu, end.listen_address, [tls.install]), DirectPlan([], [tls.remove])


class Ipsec(QemuTransport):
    name, secure, direct = "ipsec", True, True

    def preflight(self, peer_address: str, ipsec: HostCharon | None) -> None:
        try:
            check_ipsec_addresses(None, peer_address)
            running_charon(ipsec)
        except IpsecError as exc:
            raise MigrationError(str(exc)) from exc

    def check_destination(self, local: str | None, peer: str, ipsec: HostCharon | None) -> None:
        check_ipsec_addresses(local, peer)
        running_charon(ipsec)

    def source_plan(self, end: DirectSource) -> DirectPlan:
        sa = _derive_sa(
            end,
            "source",
            local=TunnelHost(None, end.local_address, end.host),
            remote=TunnelHost(None, end.destination[0], end.peer),
            port=end.destination[1],
        )
        timeout = end.step_timeout_s

        def bring_up(vm: QemuVM) -> None:
            sa.bring_up(timeout)

        def take_down(vm: QemuVM) -> None:
            sa.close()

        return DirectPlan([bring_up], [take_down], sa)

    def listen(self, end: DirectDestination, qemu: QemuVM) -> tuple[int, DirectPlan]:
        """The SA's connection, PSK, rules and inbound filter first, then QEMU listens.

        The port is chosen before QEMU listens, so that it is never open
        outside the SA; the source initiates once it has the ready record.
        """
        host = end.listen_address
        port = _free_port(host)
        sa = _derive_sa(
            end,
            "destination",
            local=TunnelHost(None, host, end.host),
            remote=TunnelHost(None, end.source_address, end.peer),
            port=port,
        )
        sa.endpoint.prepare()
        plan = DirectPlan([], [lambda vm: sa.close_logged(end.migration_id)], sa)
        qemu.migrate_incoming(tcp_uri(host, port))
        listening = incoming_port(qemu)
        if listening != port:
            raise QemuError(f"destination QEMU listens on port {listening}, not the SA's port {port}")
        return port, plan


TRANSPORTS: dict[str, QemuTransport] = {
    t.name: t for t in (QemuTransport(), QemuNativeTls(), Ipsec(), Plain(), SealiftPlain())
}


def transport_named(name: str) -> QemuTransport:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r} for a QEMU guest; use one of {tuple(TRANSPORTS)}") from None


def default_transport(secure: bool) -> QemuTransport:
    return TRANSPORTS["sealift" if secure else "plain"]


def tls_material(identity: HostIdentity | None) -> TlsMaterial:
    """This host's certificate and key and the cluster CA, read now (a renewed certificate is used at once)."""
    if identity is None:
        raise MigrationError("the qemu-tls transport needs this host's identity (certificate and key)")
    return TlsMaterial.from_files(identity.ca_path, identity.cert_path, identity.key_path)


def check_ipsec_addresses(local: str | None, peer: str) -> None:
    """The ipsec transport needs two hosts: an SA between an address and itself (loopback) means nothing,
    and two charons in one network namespace would fight over its IKE ports and routing rules."""
    if ipaddress.ip_address(peer).is_loopback or peer == local:
        raise IpsecError(
            f"the 'ipsec' transport needs the two hosts on distinct, non-loopback migration "
            f"addresses (the peer is at {peer})"
        )


def running_charon(ipsec: HostCharon | None) -> None:
    """Can this agent run strongSwan's charon for the ipsec transport? IpsecError with the reason if not."""
    if ipsec is None:
        raise IpsecError("this agent has no IPsec support (no strongSwan charon configured)")
    try:
        ipsec.get()
    except (CharonError, OSError, subprocess.SubprocessError) as exc:
        raise IpsecError(f"cannot run strongSwan's charon on this host: {exc}") from exc


def _free_port(host: str) -> int:
    """A free TCP port on `host`: the ipsec transport protects the port before QEMU listens on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class AuditedSa:
    """One agent's end of the ipsec transport's SA for one migration, with its audit entries.

    The PSK is derived here from the control channel and the pair's dynamic
    PSK, if one is provisioned (psk_for_migration), handed to charon and
    dropped; the audit log gets the SA's SPIs, backend, cipher, key id, PSK
    generation and fingerprint, never the key.
    """

    def __init__(self, endpoint: IpsecEndpoint, audit: Audit, port: int | None = None) -> None:
        self.endpoint = endpoint
        self.port = port  # the destination QEMU's port: QEMU's connection must be closed before the SA goes
        self.record: SaRecord | None = None
        self._audit = audit
        self._closed = False

    @classmethod
    def derive(
        cls,
        ipsec: HostCharon | None,
        *,
        role: str,
        migration_id: str,
        channel: ControlChannel,
        nonce_source: bytes,
        nonce_dest: bytes,
        local: TunnelHost,
        remote: TunnelHost,
        port: int,
        psk_session: PskSession | None,
        audit: Audit,
    ) -> AuditedSa:
        running_charon(ipsec)
        assert ipsec is not None
        # The pair's dynamic PSK at the epoch both proofs agreed on (if one is provisioned) and this
        # connection's TLS exporter: a new key for every migration, even when the epoch did not move.
        psk, epoch = psk_for_migration(
            channel.tls,
            migration_id,
            nonce_source,
            nonce_dest,
            psk_session,
        )
        endpoint = migration_endpoint(
            ipsec.get(),
            role=role,
            migration_id=migration_id,
            local=local,
            remote=remote,
            port=port,
            psk=psk,
            key_id=ipsec_key_id(migration_id, epoch),
            psk_generation=f"epoch {epoch}",
        )
        return cls(endpoint, audit, port)

    def note_installed(self) -> SaRecord | None:
        """Audit the SA once it is installed here; its record (None while it is not up)."""
        if self.record is None:
            child = self.endpoint.installed_child()
            if child is not None:
                self.record = self.endpoint.record(child)
                self._audit("ipsec.sa_up", **self.record.as_dict())
        return self.record

    def bring_up(self, timeout_s: float) -> SaRecord:
        """Source: load, initiate, wait until installed."""
        self.endpoint.prepare()
        self.endpoint.initiate(timeout_s=timeout_s)
        self.endpoint.wait_installed(timeout_s=timeout_s)
        record = self.note_installed()
        if record is None:
            raise IpsecError(f"the SA {self.endpoint.end.name} went away right after it came up")
        return record

    def close(self) -> None:
        """Terminate the SA, unload connection and PSK, check nothing is left (idempotent); audited."""
        if self._closed:
            return
        self._closed = True
        if self.port is not None and not wait_tcp_closed(self.port, SA_CLOSE_WAIT_S):
            log.warning(
                "QEMU's connection on port %d still open %.0f s after the migration; closing the SA anyway",
                self.port,
                SA_CLOSE_WAIT_S,
            )
        fields: dict[str, object] = {
            "name": self.endpoint.end.name,
            "key_id": self.endpoint.key_id,
            "psk_generation": self.endpoint.psk_generation,
            "psk_fingerprint": self.endpoint.psk_fingerprint,
            "spi_in": self.record.spi_in if self.record else None,
            "spi_out": self.record.spi_out if self.record else None,
        }
        try:
            self.endpoint.close()
        except IpsecError as exc:
            self._audit("ipsec.sa_down", **fields, clean=False, error=str(exc))
            raise
        self._audit("ipsec.sa_down", **fields, clean=True)

    def close_logged(self, migration_id: str) -> None:
        """close(), for clean-up paths: a failed tear-down is logged, never raised over the real outcome."""
        try:
            self.close()
        except IpsecError as exc:
            log.error("IPsec tear-down of migration %s: %s", migration_id, exc)


def _derive_sa(
    end: DirectSource | DirectDestination, role: str, *, local: TunnelHost, remote: TunnelHost, port: int
) -> AuditedSa:
    """This end's IPsec SA for the migration, keyed from its channel, nonces and PSK session."""
    return AuditedSa.derive(
        end.ipsec,
        role=role,
        migration_id=end.migration_id,
        channel=end.channel,
        nonce_source=end.nonce_source,
        nonce_dest=end.nonce_dest,
        local=local,
        remote=remote,
        port=port,
        psk_session=end.psk,
        audit=end.audit,
    )
