"""A WireGuard tunnel between the two hosts with wireguard-go (user space, over TUN): the modern VPN baseline.

Each host runs `wireguard-go -f IFACE` in its namespace; it is configured
through its UAPI socket (`/var/run/wireguard/IFACE.sock`, a filesystem
path shared by all namespaces, hence one interface name per host and run) with
fresh Curve25519 keys. The migration then goes to the destination's
tunnel address.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from sealift.bench.sshtunnel import stop_process
from sealift.errors import SealiftError
from sealift.lab.netns import netns_argv, run_in

UAPI_DIR = Path("/var/run/wireguard")
WG_PORT = 51820
TUNNEL_PREFIX = "10.79.0"


class WireguardError(SealiftError):
    """wireguard-go would not start or take its configuration."""

    code = "wireguard_error"


def _keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _uapi_set(iface: str, config: str, timeout: float = 5.0) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(UAPI_DIR / f"{iface}.sock"))
        sock.sendall(f"set=1\n{config}\n".encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    if b"errno=0" not in reply:
        raise WireguardError(f"wireguard-go {iface} refused its configuration: {reply.decode(errors='replace')}")


@dataclass
class WgEnd:
    netns: str
    iface: str
    underlay_ip: str  # the host's migration-network address
    tunnel_ip: str
    private: bytes = b""
    public: bytes = b""
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path("/dev/null"))


class WireguardTunnel:
    """wireguard-go on both hosts, peered with each other; `destination_ip` is where to migrate to."""

    def __init__(self, source_ns: str, source_ip: str, destination_ns: str, destination_ip: str, workdir: Path) -> None:
        # The UAPI socket path is shared by all namespaces: names unique to this process and host.
        tag = f"wg{os.getpid():x}"
        self.ends = (
            WgEnd(source_ns, f"{tag}a", source_ip, f"{TUNNEL_PREFIX}.1"),
            WgEnd(destination_ns, f"{tag}b", destination_ip, f"{TUNNEL_PREFIX}.2"),
        )
        self.workdir = workdir

    @property
    def destination_ip(self) -> str:
        return self.ends[1].tunnel_ip

    def start(self) -> WireguardTunnel:
        binary = shutil.which("wireguard-go")
        if binary is None:
            raise WireguardError("wireguard-go is not installed (Debian package wireguard-go)")
        UAPI_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
        try:
            for end in self.ends:
                end.private, end.public = _keypair()
                end.log = self.workdir / f"{end.iface}.log"
                with open(end.log, "wb") as log:
                    end.process = subprocess.Popen(
                        netns_argv(end.netns, [binary, "-f", end.iface]),
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
            for end in self.ends:
                self._wait_socket(end)
            for end, peer in (self.ends, tuple(reversed(self.ends))):
                _uapi_set(
                    end.iface,
                    f"private_key={end.private.hex()}\nlisten_port={WG_PORT}\nreplace_peers=true\n"
                    f"public_key={peer.public.hex()}\nendpoint={peer.underlay_ip}:{WG_PORT}\n"
                    f"replace_allowed_ips=true\nallowed_ip={peer.tunnel_ip}/32\n",
                )
                run_in(end.netns, ["ip", "addr", "add", f"{end.tunnel_ip}/24", "dev", end.iface])
                run_in(end.netns, ["ip", "link", "set", end.iface, "up"])
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_socket(self, end: WgEnd, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        path = UAPI_DIR / f"{end.iface}.sock"
        while not path.exists():
            if end.process is not None and end.process.poll() is not None:
                raise WireguardError(f"wireguard-go {end.iface} exited: {end.log.read_text(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise WireguardError(f"wireguard-go {end.iface} made no UAPI socket in {timeout:.0f} s")
            time.sleep(0.02)

    def pids(self) -> list[tuple[str, int]]:
        return [
            (f"wireguard-{side}", end.process.pid)
            for side, end in zip(("src", "dst"), self.ends)
            if end.process is not None
        ]

    def stop(self) -> None:
        for end in self.ends:
            if end.process is not None:
                stop_process(end.process)
            (UAPI_DIR / f"{end.iface}.sock").unlink(missing_ok=True)
