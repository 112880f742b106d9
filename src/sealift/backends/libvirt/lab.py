"""Simulated libvirt hosts on one machine: one libvirtd (and virtlogd) per host, each in its own namespaces.

libvirt's QEMU driver derives every path it uses (/run/libvirt,
/var/lib/libvirt, /etc/libvirt, /var/log/libvirt, /var/cache/libvirt) from
its install prefix; only the embedded driver takes another root, and an
embedded driver cannot take part in a peer-to-peer migration. So each lab
host's libvirtd runs in a mount namespace of its own (``unshare --mount``)
where private directories are bind-mounted over those five, and, if asked,
in a network namespace (the lab's testbed hosts). Two such hosts are two
libvirt instances that share nothing but the kernel: their own domains,
sockets, images and logs, and the same path (e.g. a migration socket under
/run/libvirt/sealift) names a different file on each, as on two machines.

From outside, a host's files are reached through its backing directory:
``root/run/libvirt-sock`` is what its libvirtd serves as
/run/libvirt/libvirt-sock. The agent of a lab host is configured with both
names (`LibvirtLabHost.agent_settings`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealift.backends.libvirt import paths
from sealift.backends.libvirt.domain import DomainSpec, domain_xml
from sealift.backends.libvirt.errors import LibvirtError
from sealift.backends.libvirt.paths import MOUNTS

SOCKET_DIR = "/run/libvirt/sealift"  # the migration sockets, as libvirt and its QEMUs see them
IMAGES_DIR = "/var/lib/libvirt/images"
START_TIMEOUT_S = 20.0

# The daemon's configuration: unix socket only (started without --listen, so no
# TCP or TLS listener: the destination libvirtd is reached only through the agents), no polkit (no
# polkitd here), QEMU as root without a security driver or cgroups (this
# machine runs no systemd), so the lab needs no relabelling of its files.
LIBVIRTD_CONF = """\
listen_tls = 0
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
"""
VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'
# libvirt daemonizes each QEMU, so a QEMU's parent is init; libvirt's Confirm step then waits, polling
# every 200 ms, until the QEMU it killed is gone, and a zombie is not gone until init reaps it. This
# machine's init reaps orphans ~1.7 s late (a real host's init at once), which kept every libvirt
# migration ~1.7 s longer and, through sealift, the domain paused that long at the destination. With
# `reap_children`, libvirtd runs under this launcher: a child subreaper (PR_SET_CHILD_SUBREAPER, 36)
# that reaps orphaned QEMUs at once, passes SIGTERM on to libvirtd and ends with it.
_SUBREAPER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
daemon = os.fork()
if daemon == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(daemon, signum))
while True:
    pid, status = os.wait()
    if pid == daemon:
        sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class LibvirtLabHost:
    """One simulated host's libvirtd: start() it, use `uri`, stop() it (removes everything)."""

    name: str
    root: Path  # the backing directories live here; removed by stop()
    netns: str | None = None  # run the daemons inside this network namespace (the lab's testbed host)
    extra_conf: str = ""  # more libvirtd.conf lines, overriding the defaults (the benchmark's baselines)
    extra_qemu_conf: str = ""  # more qemu.conf lines, overriding the defaults (the benchmark's TLS baseline)
    reap_children: bool = False  # libvirtd under a subreaper that reaps its QEMUs at once (see _SUBREAPER)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def socket(self) -> Path:
        """libvirtd's read-write socket, as seen from outside the host's mount namespace."""
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def images(self) -> Path:
        """/var/lib/libvirt/images of this host, as seen from outside."""
        return self.root / "lib" / "images"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def local_path(self, inside: str) -> Path:
        """Where a path of this host's libvirt (under one of MOUNTS) is, seen from outside."""
        return paths.local_path(inside, str(self.root))

    def agent_settings(self) -> dict[str, str]:
        """The agent's [libvirt] table for this host."""
        return {
            "uri": self.uri,
            "socket_dir": SOCKET_DIR,
            "local_root": str(self.root),
        }

    def agent_table(self) -> str:
        """agent_settings as dotted keys (`libvirt.uri = ...`): unlike a [libvirt] header, they may stand
        anywhere among an agent.toml's top-level keys (LocalCluster writes more of those after them)."""
        return "".join(f'libvirt.{key} = "{value}"\n' for key, value in self.agent_settings().items())

    def start(self, listen_tcp: bool = False) -> None:
        """Start virtlogd and libvirtd; `listen_tcp` only for a baseline measured without sealift."""
        if self._proc is not None:
            raise LibvirtError(f"lab host {self.name}'s libvirtd already runs")
        for backing in MOUNTS.values():
            (self.root / backing).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(_merge_conf(LIBVIRTD_CONF, self.extra_conf))
        (self.root / "etc" / "qemu.conf").write_text(_merge_conf(QEMU_CONF, self.extra_qemu_conf))
        (self.root / "etc" / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        self.images.mkdir(parents=True, exist_ok=True)
        self.local_path(SOCKET_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        # The mount points must exist (the daemons' own packages create them on a real host).
        binds = " && ".join(
            f"mkdir -p {shlex.quote(mount)} && mount --bind {shlex.quote(str(self.root / b))} {shlex.quote(mount)}"
            for mount, b in MOUNTS.items()
        )
        # virtlogd first (libvirtd hands it QEMU's log), then libvirtd in the foreground:
        # exec keeps one pid from here to libvirtd (or its subreaper, which passes SIGTERM on), so stop()
        # signals the daemon itself.
        launcher = f"{shlex.quote(sys.executable)} -c {shlex.quote(_SUBREAPER)} " if self.reap_children else ""
        script = (
            f"{binds} && virtlogd -d -p {shlex.quote(str(self.root / 'virtlogd.pid'))} "
            f"&& exec {launcher}libvirtd -p {shlex.quote(str(self.root / 'libvirtd.pid'))}"
            + (" --listen" if listen_tcp else "")
        )
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = (self.root / "daemon.out").open("ab")
        try:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import libvirt

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LibvirtError(f"lab host {self.name}'s libvirtd exited: {self.daemon_log()}")
            if self.socket.exists():
                try:
                    libvirt.open(self.uri).close()
                    return
                except libvirt.libvirtError:
                    pass
            time.sleep(0.1)
        raise LibvirtError(f"lab host {self.name}'s libvirtd did not answer within {START_TIMEOUT_S:.0f} s")

    def daemon_log(self, chars: int = 2000) -> str:
        parts = []
        for path in (self.root / "daemon.out", self.root / "log" / "libvirtd.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def kill_domains(self) -> None:
        """Destroy and undefine every domain of this host (its QEMUs die with it)."""
        import libvirt

        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                try:
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                except libvirt.libvirtError:
                    pass
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the domains and both daemons, then remove the host's files."""
        if self._proc is not None:
            self.kill_domains()
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None
        _kill_pidfile(self.root / "virtlogd.pid")
        shutil.rmtree(self.root, ignore_errors=True)


def _merge_conf(base: str, extra: str) -> str:
    """`base` without the settings `extra` sets again, then `extra` (libvirt reads a setting's first line)."""
    overridden = {line.partition("=")[0].strip() for line in extra.splitlines() if "=" in line}
    kept = [line for line in base.splitlines(keepends=True) if line.partition("=")[0].strip() not in overridden]
    return "".join(kept) + extra


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def define_test_domain(
    host: LibvirtLabHost,
    name: str,
    memory_mib: int = 96,
    disk_seed: bytes = b"",
    disk_mib: int = 32,
    start: bool = True,
) -> str:
    """Define (and start) the QEMU test guest as a domain of `host`: its kernel and initramfs
    (backends/qemu/image.py, shared by every lab host like a package), a qcow2 disk of its own in
    the host's images directory holding `disk_seed` at offset 0, a console file; its UUID."""
    from sealift.backends.qemu.image import build_image, default_cache_dir

    image = build_image(default_cache_dir())
    console = f"/var/log/libvirt/{name}.console"
    host.local_path(console).unlink(missing_ok=True)  # a domain of that name before: its counter is not ours
    disk_inside = f"{IMAGES_DIR}/{name}.qcow2"
    disk = host.local_path(disk_inside)
    seed = host.root / f"{name}.seed.raw"
    with seed.open("wb") as raw:
        raw.truncate(disk_mib << 20)
        raw.write(disk_seed)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(seed), str(disk)], check=True)
    seed.unlink()
    spec = DomainSpec(
        name=name,
        memory_mib=memory_mib,
        kernel=image.kernel,
        initrd=image.initramfs,
        cmdline="console=ttyS0 quiet panic=-1 sealift.ip=none",
        disk=Path(disk_inside),
        console_log=Path(console),
    )
    return define_domain(host, spec, start)


def define_debian_domain(
    host: LibvirtLabHost,
    name: str,
    memory_mib: int = 256,
    base_disk: Path | None = None,
    start: bool = True,
) -> str:
    """Define (and start: a cold boot) the Debian guest as a domain of `host`, its NIC on the host's br0
    (the lab's VM network), its disk a qcow2 overlay in the host's images directory over `base_disk`
    (default: the Debian image's disk; the bench gives a fuller one); its UUID."""
    from sealift.backends.libvirt.debian import debian_domain_spec
    from sealift.backends.qemu.debian_guest import GuestShape
    from sealift.backends.qemu.debian_image import build_debian_image

    image = build_debian_image()
    console = f"/var/log/libvirt/{name}.console"
    host.local_path(console).unlink(missing_ok=True)
    disk_inside = f"{IMAGES_DIR}/{name}.qcow2"
    backing = str(base_disk if base_disk is not None else image.disk)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(host.local_path(disk_inside))],
        check=True,
    )
    spec = debian_domain_spec(name, image, Path(disk_inside), Path(console), GuestShape(memory_mib=memory_mib))
    return define_domain(host, spec, start)


def define_domain(host: LibvirtLabHost, spec: DomainSpec, start: bool = True) -> str:
    """Define `spec` on `host`'s libvirtd (persistent) and start it if asked; its UUID."""
    import libvirt

    conn = libvirt.open(host.uri)
    try:
        dom = conn.defineXML(domain_xml(spec))
        if start:
            dom.create()
        return str(dom.UUIDString())
    finally:
        conn.close()
