"""The ways QEMU's stream can cross the migration network when QEMU drives it itself.

For the baselines QEMU does not secure by itself the harness drives both
QEMUs over QMP, as libvirt does for plain and tunnelled migrations:
`migrate-incoming tcp:...` on the destination, `migrate tcp:...` on the
source. A transport says where the destination QEMU listens, what it sets
up around the stream (a per-migration SSH tunnel, a standing IPsec SA) and
which extra processes burn CPU for it. QEMU's native TLS is not here: sealift
drives it (certificates, orders) as its `qemu-tls` transport, through the agents.
"""

from __future__ import annotations

import importlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sealift.bench.sampling import Role
from sealift.bench.sshtunnel import AES_GCM, SshServer, SshTunnel
from sealift.lab.testbed import DESTINATION_IP, SOURCE_IP

MIGRATION_PORT = 7610  # where the destination QEMU listens (IPsec selects this flow)
SSH_LOCAL_PORT = 7611  # the source end of an SSH tunnel


@dataclass
class Hosts:
    """The two hosts' namespaces and the lab's long-lived helpers the transports share."""

    source_ns: str
    destination_ns: str
    ssh_server: SshServer | None = None
    static_psk: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # the VPN's one configured key
    _charons: tuple[Any, Any] | None = None
    _wireguard: Any = None
    workdir: Path | None = None

    def wireguard(self) -> Any:
        """wireguard-go on both hosts, started once (a VPN runs all the time)."""
        if self._wireguard is None:
            from sealift.bench.wireguard import WireguardTunnel

            assert self.workdir is not None
            self._wireguard = WireguardTunnel(
                self.source_ns, SOURCE_IP, self.destination_ns, DESTINATION_IP, self.workdir
            ).start()
        return self._wireguard

    def charons(self) -> tuple[Any, Any]:
        """strongSwan's charon on both hosts, started once (a VPN daemon runs all the time)."""
        if self._charons is None:
            from sealift.ipsec.charon import Charon, detect_backend

            backend = detect_backend()
            source = Charon(self.source_ns, backend)
            source.start()
            destination = Charon(self.destination_ns, backend)
            try:
                destination.start()
            except BaseException:
                source.stop()
                raise
            self._charons = (source, destination)
        return self._charons

    def stop(self) -> None:
        if self._wireguard is not None:
            self._wireguard.stop()
            self._wireguard = None
        if self._charons is not None:
            for charon in self._charons:
                charon.stop()
            self._charons = None
        if self.ssh_server is not None:
            self.ssh_server.stop()
            self.ssh_server = None


class DirectTransport(Protocol):
    name: str

    def listen_host(self) -> str: ...
    def before_run(self, hosts: Hosts) -> None: ...  # standing set-up, outside the timed window
    def source_target(self, hosts: Hosts) -> tuple[str, int]: ...  # per-migration set-up, timed
    def roles(self) -> list[Role]: ...
    def detail(self) -> dict[str, Any]: ...
    def after_run(self) -> None: ...


@dataclass
class PlainTransport:
    """QEMU's `tcp:` in clear, routed through the attacker: the insecure baseline."""

    name: str = "plain"

    def listen_host(self) -> str:
        return DESTINATION_IP

    def before_run(self, hosts: Hosts) -> None:
        pass

    def source_target(self, hosts: Hosts) -> tuple[str, int]:
        return (DESTINATION_IP, MIGRATION_PORT)

    def roles(self) -> list[Role]:
        return []

    def detail(self) -> dict[str, Any]:
        return {}

    def after_run(self) -> None:
        pass


@dataclass
class SshTransport(PlainTransport):
    """`ssh -N -L` opened for this migration (as Proxmox and libvirt's tunnelled mode do), sshd standing."""

    name: str = "ssh"
    cipher: str | None = None  # None: OpenSSH's default
    _tunnel: SshTunnel | None = None

    def listen_host(self) -> str:
        return "127.0.0.1"  # only sshd, on the destination itself, reaches it

    def source_target(self, hosts: Hosts) -> tuple[str, int]:
        assert hosts.ssh_server is not None
        self._tunnel = SshTunnel(hosts.ssh_server, hosts.source_ns, SSH_LOCAL_PORT, MIGRATION_PORT, self.cipher)
        self._tunnel.start()
        return ("127.0.0.1", SSH_LOCAL_PORT)

    def roles(self) -> list[Role]:
        roles = []
        if self._tunnel is not None and self._tunnel.process is not None:
            roles.append(Role("ssh", self._tunnel.process.pid))
            server = self._tunnel.server.process
            if server is not None:
                roles.append(Role("sshd", server.pid, tree=True))  # sshd forks a child per connection
        return roles

    def detail(self) -> dict[str, Any]:
        return {"cipher": self._tunnel.negotiated_cipher() if self._tunnel else None}

    def after_run(self) -> None:
        if self._tunnel is not None:
            self._tunnel.stop()
            self._tunnel = None


def ssh_aesgcm() -> SshTransport:
    return SshTransport(name="ssh-aesgcm", cipher=AES_GCM)


@dataclass
class IpsecTransport(PlainTransport):
    """A strongSwan SA between the hosts (IKEv2, one static PSK, ESP AES-256-GCM), the dissertation's VPN
    model: charon runs on both hosts for the whole benchmark, the SA is brought up before the clock starts."""

    name: str = "ipsec"
    _tunnel: Any = None
    _charons: tuple[Any, Any] | None = None  # the hosts' charons (Hosts.charons), for the CPU roles
    info: dict[str, Any] = field(default_factory=dict)

    def before_run(self, hosts: Hosts) -> None:
        from sealift.ipsec.tunnel import TunnelHost, static_psk_tunnel

        charons = hosts.charons()
        tunnel = static_psk_tunnel(
            TunnelHost(hosts.source_ns, SOURCE_IP, "host-a"),
            TunnelHost(hosts.destination_ns, DESTINATION_IP, "host-b"),
            MIGRATION_PORT,
            hosts.static_psk,
            name="bench",
            charons=charons,
        )
        tunnel.__enter__()
        self._tunnel, self._charons = tunnel, charons
        self.info = {
            "ipsec_backend": str(getattr(tunnel.backend, "value", tunnel.backend)),
            "esp": tunnel.esp_algorithm,
        }

    def roles(self) -> list[Role]:
        roles = []
        for label, charon in zip(("charon-src", "charon-dst"), self._charons or ()):
            if charon.pid is not None:
                roles.append(Role(label, charon.pid))
        return roles

    def detail(self) -> dict[str, Any]:
        return dict(self.info)

    def after_run(self) -> None:
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            tunnel.__exit__(None, None, None)


@dataclass
class WireguardTransport(PlainTransport):
    """A standing WireGuard tunnel (wireguard-go in user space): QEMU migrates to the destination's tunnel address."""

    name: str = "wireguard"
    _tunnel: Any = None

    def listen_host(self) -> str:
        from sealift.bench.wireguard import TUNNEL_PREFIX

        return f"{TUNNEL_PREFIX}.2"

    def before_run(self, hosts: Hosts) -> None:
        self._tunnel = hosts.wireguard()

    def source_target(self, hosts: Hosts) -> tuple[str, int]:
        return (self.listen_host(), MIGRATION_PORT)

    def roles(self) -> list[Role]:
        return [Role(label, pid) for label, pid in (self._tunnel.pids() if self._tunnel else [])]


def ipsec_available() -> str | None:
    """None if the IPsec transport can run here, else why not."""
    try:
        importlib.import_module("sealift.ipsec.tunnel")
    except ImportError as exc:
        return f"sealift.ipsec is not available: {exc}"
    return None


DIRECT_TRANSPORTS = ("plain", "ssh", "ssh-aesgcm", "ipsec", "wireguard")  # qemu-tls: through the agents (harness.py)


def make_direct(name: str) -> DirectTransport:
    if name == "plain":
        return PlainTransport()
    if name == "ssh":
        return SshTransport()
    if name == "ssh-aesgcm":
        return ssh_aesgcm()
    if name == "ipsec":
        return IpsecTransport()
    if name == "wireguard":
        return WireguardTransport()
    raise ValueError(f"unknown direct transport {name!r}")
