"""The lab's network: hosts as network namespaces, with an attacker in the path.

    source ──mig0── [attacker: to-src | to-dst] ──mig0── destination      migration network
      │ br0                                               │ br0
      └──vm0──────────────── [switch: vmbr] ─────────vm0──┘                VM network
                                  │
                               client (eth0)

- The *migration network* is two routed links through the attacker, who
  forwards between them (IP forwarding on), so every migration packet
  crosses the attacker's interfaces: it can capture them (T1), and, as a
  proxy on its own address, change or cut them (T2, T8, T11). The agents
  listen only there.
- The *VM network* is one layer-2 segment: a bridge in a switch namespace
  joined to a bridge `br0` on each host. A QEMU guest's tap sits on its
  host's `br0`, so it keeps its address when it moves, and QEMU's
  announce-self after the switchover teaches the bridges where it went. The
  client probes guests there.

Everything lives in namespaces named after a per-run tag and is removed by
`down()`: on exit, on SIGTERM/SIGINT, and by `remove_stale()` for runs that
were killed outright. This kernel has no netfilter tooling, kernel IPsec or
kTLS: an attacker that rewrites bytes does it as a proxy on its own address
(as ARP or DNS spoofing would give it) rather than by transparent
interception, which is what a real in-path box would do.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sealift.errors import SealiftError
from sealift.lab.netns import NETNS_DIR, NetnsError, netns_argv, run_in

__all__ = ["HOSTS", "LinkShape", "Testbed", "TestbedError", "remove_stale"]

HOSTS = ("source", "destination", "attacker", "client", "switch")
_TAG_RE = re.compile(r"^[a-z0-9]{1,8}$")
_SEQUENCE = itertools.count(1)
_PREFIX = "slab"

# Migration network: two /24 links routed through the attacker.
SOURCE_IP = "10.77.1.1"
ATTACKER_SOURCE_SIDE_IP = "10.77.1.254"
DESTINATION_IP = "10.77.2.1"
ATTACKER_DESTINATION_SIDE_IP = "10.77.2.254"
# VM network: one /24 segment.
VM_PREFIX = 24
SOURCE_VM_IP = "10.78.0.1"
DESTINATION_VM_IP = "10.78.0.2"
CLIENT_IP = "10.78.0.100"
GUEST_IPS = tuple(f"10.78.0.{n}" for n in range(10, 60))


class TestbedError(SealiftError):
    """The testbed could not be built (not root, no iproute2, a kernel feature missing)."""

    code = "testbed_error"


@dataclass(frozen=True)
class LinkShape:
    """The migration links' MTU and, optionally, a rate limit (tc tbf) and delay (netem)."""

    mtu: int = 1500
    rate: str | None = None  # tc syntax: "1gbit", "100mbit"
    delay: str | None = None  # tc syntax: "1ms"


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class, despite the name
    tag: str = field(default_factory=lambda: f"t{next(_SEQUENCE)}")
    link: LinkShape = field(default_factory=LinkShape)
    _up: bool = False
    _signals_installed: bool = False
    # Every testbed's fixed addresses; the attacker's is on the source's link, where a spoofed peer route points.
    source_ip: ClassVar[str] = SOURCE_IP
    destination_ip: ClassVar[str] = DESTINATION_IP
    attacker_ip: ClassVar[str] = ATTACKER_SOURCE_SIDE_IP
    client_ip: ClassVar[str] = CLIENT_IP

    def __post_init__(self) -> None:
        if not _TAG_RE.match(self.tag):
            raise TestbedError(f"bad testbed tag {self.tag!r}: 1-8 lowercase letters or digits")

    # -- names and addresses --------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace of `host` (one of HOSTS)."""
        if host not in HOSTS:
            raise TestbedError(f"unknown lab host {host!r}; one of {HOSTS}")
        # The owner's pid is in the name so that remove_stale() can tell a
        # killed run's namespaces from a live one's.
        return f"{_PREFIX}-{os.getpid():x}-{self.tag}-{host}"

    # -- commands ---------------------------------------------------------------

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return netns_argv(self.ns(host), argv)

    def run(
        self, host: str, argv: list[str], timeout: float = 20.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run_in(self.ns(host), argv, timeout=timeout, check=check)

    def popen(self, host: str, argv: list[str], **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), **kwargs)  # type: ignore[call-overload]  # Popen's own keywords, passed on

    def ping(self, host: str, address: str, count: int = 1, timeout_s: int = 2) -> bool:
        done = self.run(
            host,
            ["ping", "-c", str(count), "-W", str(timeout_s), "-q", address],
            check=False,
            timeout=count * timeout_s + 5,
        )
        return done.returncode == 0

    # -- life cycle ---------------------------------------------------------------

    def up(self) -> Testbed:
        if os.geteuid() != 0:
            raise TestbedError("the lab needs root (network namespaces)")
        remove_stale()
        self._install_teardown()
        try:
            for host in HOSTS:
                _ip("netns", "add", self.ns(host))
                self.run(host, ["ip", "link", "set", "lo", "up"])
            self._up = True
            self._migration_network()
            self._vm_network()
            self.shape(self.link)
        except (NetnsError, TestbedError, subprocess.TimeoutExpired) as exc:
            self.down()
            raise TestbedError(f"could not build the lab network: {exc}") from exc
        return self

    def down(self) -> None:
        """Remove every namespace of this run (and so every interface in it). Idempotent."""
        for host in HOSTS:
            name = self.ns(host)
            if (NETNS_DIR / name).exists():
                _kill_processes_in(name)
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20, check=False)
        self._up = False

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _install_teardown(self) -> None:
        atexit.register(self.down)
        if self._signals_installed:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(sig: int, frame: object, previous: object = previous) -> None:
                self.down()
                if callable(previous):
                    previous(sig, frame)
                raise SystemExit(128 + sig)

            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: atexit and remove_stale still clean up
                return
        self._signals_installed = True

    # -- the networks ---------------------------------------------------------------

    def _veth(self, a_host: str, a_name: str, b_host: str, b_name: str) -> None:
        _ip(
            "link",
            "add",
            a_name,
            "netns",
            self.ns(a_host),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            self.ns(b_host),
        )

    def _migration_network(self) -> None:
        self._veth("source", "mig0", "attacker", "to-src")
        self._veth("destination", "mig0", "attacker", "to-dst")
        self._address("source", "mig0", f"{SOURCE_IP}/24")
        self._address("destination", "mig0", f"{DESTINATION_IP}/24")
        self._address("attacker", "to-src", f"{ATTACKER_SOURCE_SIDE_IP}/24")
        self._address("attacker", "to-dst", f"{ATTACKER_DESTINATION_SIDE_IP}/24")
        self.run("source", ["ip", "route", "add", "10.77.2.0/24", "via", ATTACKER_SOURCE_SIDE_IP])
        self.run("destination", ["ip", "route", "add", "10.77.1.0/24", "via", ATTACKER_DESTINATION_SIDE_IP])
        self.run("attacker", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def _vm_network(self) -> None:
        self.run("switch", ["ip", "link", "add", "vmbr", "type", "bridge"])
        self.run("switch", ["ip", "link", "set", "vmbr", "up"])
        for host, address in (("source", SOURCE_VM_IP), ("destination", DESTINATION_VM_IP)):
            port = f"sw-{host[:3]}"
            self._veth(host, "vm0", "switch", port)
            self.run("switch", ["ip", "link", "set", port, "master", "vmbr", "up"])
            self.run(host, ["ip", "link", "add", "br0", "type", "bridge"])
            self.run(host, ["ip", "link", "set", "vm0", "master", "br0", "up"])
            self._address(host, "br0", f"{address}/{VM_PREFIX}")
        self._veth("client", "eth0", "switch", "sw-cli")
        self.run("switch", ["ip", "link", "set", "sw-cli", "master", "vmbr", "up"])
        self._address("client", "eth0", f"{CLIENT_IP}/{VM_PREFIX}")

    def _address(self, host: str, ifname: str, cidr: str) -> None:
        self.run(host, ["ip", "addr", "add", cidr, "dev", ifname])
        self.run(host, ["ip", "link", "set", ifname, "up"])

    def shape(self, link: LinkShape) -> None:
        """Set the migration links' MTU and rate/delay (all four ends)."""
        ends = (("source", "mig0"), ("attacker", "to-src"), ("attacker", "to-dst"), ("destination", "mig0"))
        for host, ifname in ends:
            self.run(host, ["ip", "link", "set", ifname, "mtu", str(link.mtu)])
            self.run(host, ["tc", "qdisc", "del", "dev", ifname, "root"], check=False)
            if link.delay:
                netem = ["tc", "qdisc", "add", "dev", ifname, "root", "netem", "delay", link.delay]
                self.run(host, netem + (["rate", link.rate] if link.rate else []))
            elif link.rate:
                self.run(
                    host,
                    [
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        ifname,
                        "root",
                        "tbf",
                        "rate",
                        link.rate,
                        "burst",
                        "1mb",
                        "latency",
                        "50ms",
                    ],
                )
        self.link = link

    # -- guests on the VM network ---------------------------------------------------------

    def add_tap(self, host: str, tap: str) -> None:
        """A tap device on `host`'s br0 (QEMU attaches with script=no)."""
        self.run(host, ["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        self.run(host, ["ip", "link", "set", tap, "master", "br0", "up"])

    def add_tap_everywhere(self, tap: str) -> None:
        """The same tap on both hosts: a guest keeps its NIC name wherever it runs."""
        for host in ("source", "destination"):
            self.add_tap(host, tap)


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    except FileNotFoundError as exc:
        raise TestbedError("`ip` is not installed (Debian package iproute2)") from exc
    if done.returncode != 0:
        raise TestbedError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _kill_processes_in(name: str) -> None:
    """Processes still inside a namespace keep its interfaces alive: end them first."""
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_stale() -> list[str]:
    """Remove lab namespaces left by runs whose process is gone (killed outright)."""
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in NETNS_DIR.iterdir():
        match = re.match(rf"^{_PREFIX}-([0-9a-f]+)-", entry.name)
        if not match:
            continue
        if _owner_alive(int(match.group(1), 16)):
            continue
        _kill_processes_in(entry.name)
        subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=20, check=False)
        removed.append(entry.name)
    return removed


def _owner_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
