"""Replay recorded UDP datagrams verbatim, with their original (spoofed) source address.

Run inside the attacker's namespace: `python replay_udp.py < packets.json`, where
the JSON is a list of {"src", "dst", "sport", "dport", "payload" (hex)}. The
code lives in sealift.lab.ipsec.replay_attack (the attack lab replays IKE the same way).
"""

from __future__ import annotations

from sealift.lab.ipsec.replay_attack import main

if __name__ == "__main__":
    raise SystemExit(main())
