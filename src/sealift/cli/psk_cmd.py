"""`sealift psk`: the optional dynamic pre-shared key an agent shares with each peer."""

from __future__ import annotations

import argparse

from sealift.cli.common import agent_command, client, print_json
from sealift.cli.render import out


def add_psk_parser(sub: argparse._SubParsersAction) -> None:
    psk = sub.add_parser("psk", help="the optional dynamic pre-shared key per pair of hosts").add_subparsers(
        dest="psk_command", required=True
    )
    p = psk.add_parser("provision", help="set the PSK shared with a peer (generates one if --key is omitted)")
    p.add_argument("peer")
    p.add_argument("--key", help="64 hex digits; omit to generate")
    agent_command(p, cmd_psk_provision)
    p = psk.add_parser("status", help="epoch and fingerprint per peer (never the key)")
    agent_command(p, cmd_psk_status)


def cmd_psk_provision(args: argparse.Namespace) -> int:
    from sealift.security.psk import new_psk, psk_to_hex

    key = args.key or psk_to_hex(new_psk())
    reply = client(args).request("psk.provision", peer=args.peer, key=key)
    result = {"peer": args.peer, "fingerprint": reply["fingerprint"]}
    if not args.key:
        result["key"] = key  # generated here: give the same key to the peer, then forget it
    if args.json:
        print_json(result)
    else:
        out.print(f"PSK for {args.peer} provisioned (fingerprint {reply['fingerprint']})")
        if not args.key:
            out.print(f"provision the same key on {args.peer}: sealift psk provision <this host> --key {key}")
    return 0


def cmd_psk_status(args: argparse.Namespace) -> int:
    peers = client(args).request("psk.status")["peers"]
    if args.json:
        print_json(peers)
    else:
        for p in peers:
            out.print(
                f"{p['peer']}: epoch {p['epoch']}, fingerprint {p['fingerprint']}"
                f"{', pending ratchet' if p['has_pending'] else ''}"
            )
    return 0
