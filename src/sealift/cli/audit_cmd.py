"""`sealift audit`: read an agent's signed, hash-chained audit log, and verify it (online or from an export)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sealift.cli.common import CliError, agent_command, client, print_json
from sealift.cli.render import out


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the agent's signed, hash-chained audit log").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit.add_parser("show", help="recent audit entries")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--kind", help="only entries of this kind, e.g. order.refused")
    agent_command(p, cmd_audit_show)
    p = audit.add_parser("verify", help="check the chain and every signature; names any tampered entry")
    p.add_argument("--file", help="verify an exported log (JSONL) offline instead of asking the agent")
    p.add_argument("--certificate", help="with --file: the host certificate whose key signed the log")
    agent_command(p, cmd_audit_verify)


def cmd_audit_show(args: argparse.Namespace) -> int:
    entries = client(args).request("audit.show", limit=args.limit, kind=args.kind)["entries"]
    if args.json:
        print_json(entries)
        return 0
    from rich.table import Table

    table = Table(title="audit log")
    for col in ("seq", "time", "kind", "fields"):
        table.add_column(col)
    for entry in entries:
        fields = {k: v for k, v in (entry.get("fields") or {}).items() if k not in ("receipt", "manifest")}
        table.add_row(
            str(entry.get("seq")),
            str(entry.get("time", entry.get("timestamp", ""))),
            str(entry.get("kind")),
            json.dumps(fields)[:120],
        )
    out.print(table)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.file:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        from sealift.security.audit import verify_export

        key = x509.load_pem_x509_certificate(Path(args.certificate).read_bytes()).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CliError(f"{args.certificate}: not a host certificate (its key is not an elliptic-curve key)")
        with open(args.file) as lines:
            result = verify_export(lines, key)
        verification: dict = {  # the same fields as the agent's JSON answer below
            "ok": result.ok,
            "entries": result.entries,
            "problems": [{"seq": p.seq, "what": p.what} for p in result.problems],
        }
    else:
        verification = client(args).request("audit.verify")["verification"]
    if args.json:
        print_json(verification)
    elif verification["ok"]:
        out.print(f"[green]audit log intact[/green]: {verification['entries']} entries, chain and signatures verify")
    else:
        out.print(f"[bold red]audit log TAMPERED[/bold red]: {len(verification['problems'])} problem(s)")
        for problem in verification["problems"]:
            out.print(f"  entry #{problem['seq']}: {problem['what']}")
    return 0 if verification["ok"] else 1
