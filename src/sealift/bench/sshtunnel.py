"""An SSH tunnel for QEMU's migration stream, the way Xen's `xl migrate`, Proxmox and libvirt's
tunnelled migrations use SSH: sshd on the destination, `ssh -N -L` on the source.

Everything is throwaway and private to one benchmark: host key, user key,
authorized_keys, known_hosts and sshd's config live in a mode-0700
directory; sshd listens only on the destination's migration address; the
client checks the host key strictly (no trust on first use).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sealift.errors import SealiftError
from sealift.lab.netns import netns_argv

SSHD_PORT = 2222
AES_GCM = "aes128-gcm@openssh.com"
_CIPHER_RE = re.compile(r"kex: client->server cipher: (\S+)")


class SshError(SealiftError):
    """sshd or the tunnel would not come up."""

    code = "ssh_tunnel_error"


def listening(pid: int, port: int) -> bool:
    """Whether TCP `port` is listening in the namespace of process `pid` (its /proc/PID/net/tcp)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    wanted = f":{port:04X}"
    return any(parts[1].endswith(wanted) and parts[3] == "0A" for parts in (line.split() for line in lines))


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a helper daemon, then kill it if it has not gone within 5 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _wait(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise SshError(f"{what} exited ({process.returncode}): {log.read_text(errors='replace')[-800:]}")
        if time.monotonic() > deadline:
            raise SshError(f"{what} not ready within {timeout:.0f} s: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.02)


class SshServer:
    """sshd in the destination's namespace with its own keys, for the benchmark's tunnels."""

    def __init__(self, netns: str, address: str, port: int = SSHD_PORT) -> None:
        self.netns, self.address, self.port = netns, address, port
        self.dir = Path(tempfile.mkdtemp(prefix="sl-bssh-", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        self.user_key = self.dir / "user_key"
        self.known_hosts = self.dir / "known_hosts"
        self.log = self.dir / "sshd.log"

    def start(self) -> SshServer:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise SshError("sshd is not installed (Debian package openssh-server)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        host_key = self.dir / "host_key"
        for key in (host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=20)
        (self.dir / "authorized_keys").write_text(self.user_key.with_suffix(".pub").read_text())
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {host_key.with_suffix('.pub').read_text()}")
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress {self.address}\nHostKey {host_key}\nPidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nAllowTcpForwarding local\nX11Forwarding no\nPermitTTY no\n"
            "PrintMotd no\nLogLevel ERROR\n"
        )
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                netns_argv(self.netns, [sshd, "-D", "-e", "-f", str(config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = self.process
        _wait(lambda: listening(process.pid, self.port), "sshd", process, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class SshTunnel:
    """`ssh -N -L 127.0.0.1:local_port:127.0.0.1:remote_port` from the source's namespace."""

    def __init__(self, server: SshServer, netns: str, local_port: int, remote_port: int, cipher: str | None) -> None:
        self.server, self.netns = server, netns
        self.local_port, self.remote_port, self.cipher = local_port, remote_port, cipher
        self.process: subprocess.Popen[bytes] | None = None
        self.log = server.dir / f"ssh-{local_port}.log"

    def argv(self) -> list[str]:
        s = self.server
        argv = [
            "ssh",
            "-N",
            "-v",
            "-F",
            "/dev/null",
            "-i",
            str(s.user_key),
            "-p",
            str(s.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={s.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "Compression=no",
            "-L",
            f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}",
        ]
        if self.cipher:
            argv += ["-c", self.cipher]
        return argv + [f"root@{s.address}"]

    def start(self) -> SshTunnel:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                netns_argv(self.netns, self.argv()), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        process = self.process
        _wait(lambda: listening(process.pid, self.local_port), "ssh -L", process, self.log)
        return self

    def negotiated_cipher(self) -> str | None:
        match = _CIPHER_RE.search(self.log.read_text(errors="replace")) if self.log.exists() else None
        return match.group(1) if match else None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
