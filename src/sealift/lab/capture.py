"""Packet captures on the lab's links (tshark) and searches through them.

A secret can straddle two TCP segments, so searching the raw pcap file is
not enough: `tcp_streams()` puts each direction of each TCP connection back
in sequence order, and `find_in_capture()` searches both the raw file (to
quote file offsets, as a Wireshark user would) and the reassembled streams.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealift.errors import SealiftError
from sealift.lab.netns import netns_argv

__all__ = [
    "Capture",
    "CaptureError",
    "Finding",
    "dropped_note",
    "dropped_packets",
    "find_in_capture",
    "ip_protocols",
    "tcp_streams",
]

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
ETHERTYPE_IPV4 = 0x0800
IPPROTO_TCP = 6
SETTLE_S = 1.0
# dumpcap's kernel buffer (tshark -B, MiB; default 2). A QEMU stream in clear crosses the link at
# hundreds of MB/s: with 2 MiB, a capture process that waits for a busy CPU drops segments, and a
# positive control can miss the very page that holds the secret.
CAPTURE_BUFFER_MIB = 64
_DROPPED = re.compile(r"(\d+) packets? dropped")


class CaptureError(SealiftError):
    """tshark is missing, did not start, or the capture file is unreadable."""

    code = "capture_error"


@dataclass
class Capture:
    """tshark capturing on one interface of one namespace into a pcap file."""

    netns: str | None
    interface: str
    path: Path
    snaplen: int = 0  # whole packets
    process: subprocess.Popen | None = field(default=None, repr=False)
    dropped: int | None = None  # packets the capture lost, as tshark reports when it stops

    def start(self, timeout: float = 15.0) -> Capture:
        argv = [
            "tshark",
            "-q",
            "-n",
            "-i",
            self.interface,
            "-B",
            str(CAPTURE_BUFFER_MIB),
            "-F",
            "pcap",
            "-w",
            str(self.path),
        ]
        if self.snaplen:
            argv += ["-s", str(self.snaplen)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen(
                netns_argv(self.netns, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        except FileNotFoundError as exc:
            raise CaptureError("tshark is not installed (Debian package tshark)") from exc
        self._await_capturing(timeout)
        return self

    def _await_capturing(self, timeout: float) -> None:
        # tshark says "Capturing on 'IFACE'" once its capture is open; packets
        # sent before that would be missed.
        assert self.process is not None and self.process.stderr is not None
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            seen.append(line.strip())
            if "Capturing on" in line:
                self._settle(deadline)
                return
        self.stop()
        raise CaptureError(f"tshark did not start capturing on {self.interface}: {' | '.join(seen[-5:])}")

    def _settle(self, deadline: float) -> None:
        # tshark prints "Capturing on" before its capture process (dumpcap) has
        # the interface open (measured: packets of the first ~0.5 s are lost).
        # Wait for the file's header, then a margin.
        while time.monotonic() < deadline and not (self.path.exists() and self.path.stat().st_size >= 24):
            time.sleep(0.05)
        time.sleep(SETTLE_S)

    def stop(self, timeout: float = 15.0) -> Path:
        """Stop and flush; returns the pcap path."""
        if self.process is not None and self.process.poll() is None:
            time.sleep(0.3)  # the last packets are still in tshark's ring buffer
            self.process.send_signal(signal.SIGINT)
            try:
                _, rest = self.process.communicate(timeout=timeout)
                self.dropped = dropped_packets(rest or "")
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.path

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dropped_packets(stderr: str) -> int:
    """What tshark says it lost when it stops ("12 packets dropped from vethX"); 0 if it says nothing."""
    return sum(int(count) for count in _DROPPED.findall(stderr))


def dropped_note(dropped: int | None) -> str:
    """For evidence: a capture that lost packets proves less by not finding something."""
    return f" (the capture lost {dropped} packets)" if dropped else ""


# -- reading pcap files -------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    file_offset: int  # where the packet's bytes start in the pcap file
    data: bytes  # the link-layer frame


def read_packets(path: Path) -> list[Packet]:
    raw = path.read_bytes()
    if len(raw) < 24:
        raise CaptureError(f"{path} is not a pcap file (too short)")
    magic = struct.unpack("<I", raw[:4])[0]
    endian = "<" if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    if struct.unpack(endian + "I", raw[:4])[0] not in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        raise CaptureError(f"{path} is not a classic pcap file (write it with `tshark -F pcap`)")
    linktype = struct.unpack(endian + "I", raw[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise CaptureError(f"{path}: link type {linktype} is not Ethernet")
    packets = []
    offset = 24
    while offset + 16 <= len(raw):
        incl_len = struct.unpack(endian + "I", raw[offset + 8 : offset + 12])[0]
        start = offset + 16
        packets.append(Packet(start, raw[start : start + incl_len]))
        offset = start + incl_len
    return packets


def _ipv4(frame: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """(protocol, source, destination, payload) of an IPv4 frame, else None."""
    if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETHERTYPE_IPV4:
        return None
    ip = frame[14:]
    header_len = (ip[0] & 0x0F) * 4
    total_len = struct.unpack("!H", ip[2:4])[0]
    return ip[9], ip[12:16], ip[16:20], ip[header_len:total_len]


def ip_protocols(path: Path) -> dict[int, int]:
    """How many IPv4 packets of each IP protocol number the capture holds (6 TCP, 17 UDP, 50 ESP)."""
    counts: dict[int, int] = {}
    for packet in read_packets(path):
        parsed = _ipv4(packet.data)
        if parsed is not None:
            counts[parsed[0]] = counts.get(parsed[0], 0) + 1
    return counts


FlowKey = tuple[str, int, str, int]


def tcp_streams(path: Path) -> dict[FlowKey, bytes]:
    """Each direction of each TCP connection, payload reassembled by sequence number."""
    segments: dict[FlowKey, dict[int, bytes]] = {}
    for packet in read_packets(path):
        parsed = _ipv4(packet.data)
        if parsed is None or parsed[0] != IPPROTO_TCP or len(parsed[3]) < 20:
            continue
        _, src, dst, tcp = parsed
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            key = (_dotted(src), sport, _dotted(dst), dport)
            segments.setdefault(key, {}).setdefault(seq, payload)  # first copy wins over retransmits
    return {key: _in_order(parts) for key, parts in segments.items()}


def _in_order(parts: dict[int, bytes]) -> bytes:
    out = bytearray()
    base = min(parts)
    for seq in sorted(parts, key=lambda s: (s - base) & 0xFFFFFFFF):
        relative = (seq - base) & 0xFFFFFFFF
        if relative >= len(out):
            out += b"\0" * (relative - len(out)) + parts[seq]  # a gap: lost from the capture
        else:
            tail = parts[seq][len(out) - relative :]
            out += tail
    return bytes(out)


def _dotted(address: bytes) -> str:
    return ".".join(str(b) for b in address)


@dataclass(frozen=True)
class Finding:
    """Where a needle was seen: raw file offsets, and the TCP flows it is in."""

    file_offsets: list[int]
    flows: list[str]

    @property
    def found(self) -> bool:
        return bool(self.file_offsets or self.flows)


def find_in_capture(path: Path, needle: bytes, limit: int = 10) -> Finding:
    raw = path.read_bytes()
    offsets: list[int] = []
    position = raw.find(needle)
    while position >= 0 and len(offsets) < limit:
        offsets.append(position)
        position = raw.find(needle, position + 1)
    flows = [f"{s}:{sp} -> {d}:{dp}" for (s, sp, d, dp), data in tcp_streams(path).items() if needle in data]
    return Finding(offsets, flows)
