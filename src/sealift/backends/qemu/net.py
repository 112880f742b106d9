"""How a QEMU guest is networked, and the guest-side addresses that go with it.

Three shapes:

- ``none``: no NIC (the guest still runs and counts; nothing can probe it);
- ``user``: QEMU's user-mode network (slirp) with a host UDP port forwarded
  to the guest's probe service, for tests on one machine (no root network
  set-up; each VM needs its own host port);
- ``tap``: a tap device on an existing bridge, the lab's VM network. The
  guest keeps its address and MAC across a migration, and QEMU's
  announce-self after the switchover tells the switches where it went.
  Either the operator made the tap (``tap=``), or the agent makes its own
  on a named ``bridge`` (``own_tap_name``) on each host the guest runs on,
  and deletes it when the guest leaves.

The MAC is derived from the VM's name, so the source and the destination
of a migration present the same NIC without having to agree on anything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["NetConfig", "NetError", "create_tap", "delete_tap", "mac_for", "own_tap_name", "run_ip"]

# QEMU's default user network: the guest is 10.0.2.15, the virtual gateway 10.0.2.2.
USER_GUEST_IP = "10.0.2.15/24"
USER_GATEWAY = "10.0.2.2"
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class NetError(Exception):
    """A network configuration is invalid, or a tap device could not be made."""


def mac_for(name: str) -> str:
    """A stable, locally administered MAC for VM ``name`` (QEMU's 52:54:00 prefix)."""
    digest = hashlib.sha256(b"sealift-vm-mac:" + name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True)
class NetConfig:
    mode: Literal["none", "user", "tap"]
    host_port: int | None = None  # user: the host UDP port forwarded to the guest's service
    tap: str | None = None  # tap: the tap device (already on its bridge)
    guest_ip: str = USER_GUEST_IP  # the guest's eth0 address, with prefix length
    gateway: str | None = USER_GATEWAY
    bridge: str | None = None  # tap: the agent made the tap itself, on this bridge (and deletes it)

    @classmethod
    def none(cls) -> NetConfig:
        return cls("none")

    @classmethod
    def user(cls, host_port: int) -> NetConfig:
        return cls("user", host_port=host_port).validated()

    @classmethod
    def tap_device(cls, tap: str, guest_ip: str, gateway: str | None = None) -> NetConfig:
        return cls("tap", tap=tap, guest_ip=guest_ip, gateway=gateway).validated()

    def validated(self) -> NetConfig:
        if self.mode == "user" and not (self.host_port and 0 < self.host_port < 65536):
            raise NetError(f"user networking needs a host UDP port in 1..65535, not {self.host_port}")
        if self.mode == "tap" and self.bridge is not None and self.tap is None:
            pass  # the agent names and makes the tap on the bridge when the guest starts
        elif self.mode == "tap" and not (self.tap and _IFNAME_RE.match(self.tap)):
            raise NetError(f"tap networking needs a valid interface name, not {self.tap!r}")
        if self.bridge is not None and not (self.mode == "tap" and _IFNAME_RE.match(self.bridge)):
            raise NetError(f"a bridge goes with tap networking and needs a valid name, not {self.bridge!r}")
        if self.mode != "none":
            try:
                ipaddress.ip_interface(self.guest_ip)
                if self.gateway:
                    ipaddress.ip_address(self.gateway)
            except ValueError as exc:
                raise NetError(f"bad guest address: {exc}") from exc
        return self

    def qemu_args(
        self, vm_name: str, service_port: int, mac: str | None = None, pci_addr: str | None = None
    ) -> list[str]:
        """QEMU's -netdev/-device arguments for this network (none for ``none``).

        ``mac`` and ``pci_addr``: a fixed MAC and PCI slot (the Debian guest's saved machine), else
        the MAC derived from the VM's name and the slot QEMU picks.
        """
        if self.mode == "none":
            return []
        if self.mode == "user":
            netdev = f"user,id=net0,hostfwd=udp:127.0.0.1:{self.host_port}-:{service_port}"
        else:
            # script=no: the caller made the tap and put it on its bridge.
            netdev = f"tap,id=net0,ifname={self.tap},script=no,downscript=no"
        # romfile= (none): the guest boots its kernel directly, PXE would only cost boot time.
        device = f"virtio-net-pci,netdev=net0,mac={mac or mac_for(vm_name)},romfile="
        if pci_addr is not None:
            device += f",bus=pcie.0,addr={pci_addr}"
        return ["-netdev", netdev, "-device", device]

    def kernel_args(self) -> str:
        """The guest init's network settings (see guest/init.sh)."""
        if self.mode == "none":
            return "sealift.ip=none"
        return f"sealift.ip={self.guest_ip} sealift.gw={self.gateway or 'none'}"

    def probe_address(self, service_port: int) -> tuple[str, int] | None:
        """Where a UDP probe from this host reaches the guest's service, if anywhere."""
        if self.mode == "user" and self.host_port is not None:
            return ("127.0.0.1", self.host_port)
        if self.mode == "tap":
            return (str(ipaddress.ip_interface(self.guest_ip).ip), service_port)
        return None

    def to_json(self) -> dict[str, object]:
        # Every field, in declaration order; all are plain values.
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> NetConfig:
        mode = data.get("mode")
        if mode not in ("none", "user", "tap"):
            raise NetError(f"unknown network mode {mode!r}")
        host_port = data.get("host_port")
        tap = data.get("tap")
        gateway = data.get("gateway")
        bridge = data.get("bridge")
        return cls(
            mode=mode,
            host_port=int(host_port) if isinstance(host_port, int) else None,
            tap=str(tap) if tap is not None else None,
            guest_ip=str(data.get("guest_ip", USER_GUEST_IP)),
            gateway=str(gateway) if gateway is not None else None,
            bridge=str(bridge) if bridge is not None else None,
        )


def own_tap_name(host: str, vm: str) -> str:
    """The tap an agent makes for guest `vm` on its bridge: per host and guest (15 characters at most)."""
    return "sls" + hashlib.sha256(f"sealift-tap:{host}/{vm}".encode()).hexdigest()[:9]


def run_ip(*args: str, error: type[Exception] = NetError, timeout: float = 10) -> None:
    """Run ``ip ARGS``; a missing iproute2 or a failure raises ``error`` with ip's own message.

    ``error`` and ``timeout`` let the lab's testbed (lab/testbed.py) use it for its own network.
    """
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise error("`ip` is not installed (Debian package iproute2)") from exc
    if done.returncode != 0:
        raise error(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def create_tap(tap: str, bridge: str, netns: str | None = None) -> None:
    """Create tap device ``tap`` on the existing ``bridge`` and bring it up (root only).

    ``netns``: create it inside that network namespace (the lab's hosts).
    """
    if not _IFNAME_RE.match(tap) or not _IFNAME_RE.match(bridge):
        raise NetError(f"bad interface name: {tap!r} or {bridge!r}")
    prefix = ["-n", netns] if netns else []
    run_ip(*prefix, "tuntap", "add", "dev", tap, "mode", "tap")
    try:
        run_ip(*prefix, "link", "set", tap, "master", bridge)
        run_ip(*prefix, "link", "set", tap, "up")
    except NetError:
        delete_tap(tap, netns)
        raise


def delete_tap(tap: str, netns: str | None = None) -> None:
    prefix = ["-n", netns] if netns else []
    run_ip(*prefix, "link", "delete", tap)
