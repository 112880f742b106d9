"""Replay recorded UDP datagrams verbatim, with their original (spoofed) source address.

Run inside the attacker's namespace: `python replay_udp.py < packets.json`, where
the JSON is a list of {"src", "dst", "sport", "dport", "payload" (hex)}. The
code lives in sealift.ipsec.replay (the attack lab replays IKE the same way).
"""

from __future__ import annotations

from sealift.ipsec.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
