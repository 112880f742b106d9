"""A small namespace testbed for the IPsec transport: two hosts and a router between them.

    [ NS-a: eth0 10.91.1.1/24 ] --- [ NS-r: ra 10.91.1.254 | rb 10.91.2.254 ] --- [ NS-b: eth0 10.91.2.1/24 ]

The router namespace forwards between the two links and is where an
on-path attacker sits: it captures on `ra` and can inject packets. Used by
tests/ipsec and bench/ipsec_throughput.py; the attack lab's own testbed
(sealift.lab.testbed) is separate.
"""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class NsHost:
    """One host of the testbed: its namespace, its interface and its address on the migration network."""

    netns: str
    iface: str
    address: str


def run(args: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises with the command's stderr in the message."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def in_netns(
    netns: str, args: list[str], *, check: bool = True, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", netns, *args], check=check, timeout=timeout)


def delete_netns(netns: str) -> None:
    run(["ip", "netns", "del", netns], check=False)


class RoutedPair:
    """Hosts a and b on two subnets joined by router r; everything is removed on exit, also on failure.

    `prefix` must be unique to the caller (e.g. "slips-3f2a"): namespaces
    are machine-wide. Names stay short: an interface name is at most 15 bytes.
    """

    def __init__(self, prefix: str, *, subnet_a: str = "10.91.1", subnet_b: str = "10.91.2", mtu: int = 1500) -> None:
        self.prefix = prefix
        self.a = NsHost(f"{prefix}-a", "eth0", f"{subnet_a}.1")
        self.b = NsHost(f"{prefix}-b", "eth0", f"{subnet_b}.1")
        self.router = f"{prefix}-r"
        self.router_iface_a = "ra"  # the router's side of the link to host a: the capture point
        self.router_iface_b = "rb"
        self._subnets = (subnet_a, subnet_b)
        self._mtu = mtu

    def __enter__(self) -> RoutedPair:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        # Deleting a namespace deletes its veth ends, routes and TUN devices with it.
        for netns in (self.a.netns, self.b.netns, self.router):
            delete_netns(netns)

    def _create(self) -> None:
        for netns in (self.a.netns, self.b.netns, self.router):
            delete_netns(netns)  # a leftover of a killed run
            run(["ip", "netns", "add", netns])
            in_netns(netns, ["ip", "link", "set", "lo", "up"])
        subnet_a, subnet_b = self._subnets
        for host, router_iface, subnet in (
            (self.a, self.router_iface_a, subnet_a),
            (self.b, self.router_iface_b, subnet_b),
        ):
            run(
                [
                    "ip",
                    "link",
                    "add",
                    host.iface,
                    "netns",
                    host.netns,
                    "mtu",
                    str(self._mtu),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    router_iface,
                    "netns",
                    self.router,
                    "mtu",
                    str(self._mtu),
                ]
            )
            in_netns(host.netns, ["ip", "addr", "add", f"{host.address}/24", "dev", host.iface])
            in_netns(host.netns, ["ip", "link", "set", host.iface, "up"])
            in_netns(host.netns, ["ip", "route", "add", "default", "via", f"{subnet}.254"])
            in_netns(self.router, ["ip", "addr", "add", f"{subnet}.254/24", "dev", router_iface])
            in_netns(self.router, ["ip", "link", "set", router_iface, "up"])
        in_netns(self.router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])


class Capture:
    """tshark writing every packet on one interface of a namespace to a (classic) pcap file.

    Waits until tshark says it is capturing and its file exists, so no
    packet sent after __enter__ is missed; on exit it stops tshark (SIGINT: it flushes the file).
    """

    def __init__(self, netns: str, iface: str, path: str, *, timeout_s: float = 15.0) -> None:
        self.netns, self.iface, self.path = netns, iface, path
        self._timeout_s = timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "tshark", "-i", self.iface, "-F", "pcap", "-w", self.path, "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self._process.stderr is not None
        deadline = time.monotonic() + self._timeout_s
        seen = b""
        # "Capturing on" comes before dumpcap has really started; the output file
        # (with its 24-byte header) appears once the interface is open.
        while b"Capturing on" not in seen or not (os.path.exists(self.path) and os.path.getsize(self.path) >= 24):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(
                    f"tshark did not start capturing on {self.iface} in {self.netns}: {seen.decode(errors='replace')}"
                )
            ready, _, _ = select.select([self._process.stderr], [], [], 0.2)
            if ready:
                seen += self._process.stderr.read1(4096)  # type: ignore[attr-defined]  # typeshed: IO[bytes]; a BufferedReader
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            time.sleep(0.3)  # let the last packets reach the capture before stopping it
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


def read_capture(path: str, display_filter: str, fields: list[str]) -> list[list[str]]:
    """Rows of `fields` for the packets of a pcap that match a tshark display filter."""
    args = ["tshark", "-r", path, "-Y", display_filter, "-T", "fields"]
    for field in fields:
        args += ["-e", field]
    result = run(args, timeout=60)
    return [line.split("\t") for line in result.stdout.splitlines() if line]


@dataclass(frozen=True)
class UdpPacket:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


def udp_packets(path: str) -> list[UdpPacket]:
    """The IPv4/UDP packets of a classic pcap file with Ethernet framing (what Capture writes)."""
    data = open(path, "rb").read()
    magic = data[:4]
    if magic not in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        raise ValueError(f"{path} is not a little-endian classic pcap file")
    if struct.unpack_from("<I", data, 20)[0] != 1:
        raise ValueError(f"{path}: link type is not Ethernet")
    packets = []
    offset = 24
    while offset + 16 <= len(data):
        captured = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header_length = (ip[0] & 0x0F) * 4
        if ip[9] != 17 or len(ip) < header_length + 8:
            continue
        total_length = struct.unpack_from("!H", ip, 2)[0]
        sport, dport, udp_length = struct.unpack_from("!HHH", ip, header_length)
        payload = ip[header_length + 8 : min(total_length, header_length + udp_length)]
        packets.append(
            UdpPacket(
                str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20])), sport, dport, payload
            )
        )
    return packets
