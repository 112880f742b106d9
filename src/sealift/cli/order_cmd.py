"""`sealift order`: sign a migration order, or show what one says."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sealift.cli.common import add_operator_flags, operator, parse_duration, print_json, show_fields
from sealift.cli.render import out


def add_order_parser(sub: argparse._SubParsersAction) -> None:
    order = sub.add_parser("order", help="signed migration orders").add_subparsers(dest="order_command", required=True)
    p = order.add_parser("create", help="sign an order: VM, source, destination, expiry")
    p.add_argument("vm")
    p.add_argument("--from", dest="source", required=True, help="source host")
    p.add_argument("--to", required=True, help="destination host")
    p.add_argument("--ttl", default="5m", help="how long the order is valid, e.g. 90s, 5m, 2h (default 5m)")
    p.add_argument("--out", help="write the order here (default: print it)")
    p.add_argument("--json", action="store_true", help="print the order's fields as JSON")
    add_operator_flags(p)
    p.set_defaults(func=cmd_order_create)
    p = order.add_parser("show", help="show an order's fields (without verifying it)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_order_show)


def cmd_order_create(args: argparse.Namespace) -> int:
    from sealift.security.orders import create_order, describe_order

    envelope = create_order(operator(args), args.vm, args.source, args.to, ttl_s=parse_duration(args.ttl))
    if args.out:
        Path(args.out).write_text(envelope)
    if args.json or not args.out:
        sys.stdout.write(envelope + "\n") if not args.json else print_json(describe_order(envelope))
    else:
        order = describe_order(envelope)
        out.print(
            f"[green]order {order['order_id']}[/green]: {args.vm} {args.source} → {args.to}, "
            f"expires {order['expires']} → {args.out}"
        )
    return 0


def read_order_file(path: str) -> str:
    """The text of an order file; MalformedOrderError (one line, code "malformed") if it is not UTF-8."""
    from sealift.security.errors import MalformedOrderError

    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedOrderError(f"order file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def cmd_order_show(args: argparse.Namespace) -> int:
    from sealift.security.orders import describe_order

    return show_fields(args, describe_order(read_order_file(args.file)))
