"""`sealift migrate` (run a signed migration), `sealift place` (choose a destination), `sealift migrations`."""

from __future__ import annotations

import argparse

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.cli import migration_show
from sealift.cli.common import (
    CliError,
    add_agent_flags,
    add_migration_flags,
    add_operator_flags,
    agent_command,
    client,
    failure_json,
    migration_options,
    operator,
    parse_duration,
    print_json,
    warn_insecure,
)
from sealift.cli.order_cmd import read_order_file
from sealift.cli.render import MigrationProgress, console, out, report_table


def add_migrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="live-migrate a VM to another host (under a signed order)")
    p.add_argument("vm", nargs="?")
    p.add_argument("--to", help="destination host name (from the agent's [peers]), or 'auto' to place it")
    p.add_argument("--order", help="run this signed order (from `sealift order create`)")
    p.add_argument("--ttl", default="5m", help="lifetime of the order signed in one step (default 5m)")
    add_migration_flags(p)
    add_agent_flags(p)
    add_operator_flags(p)
    p.set_defaults(func=cmd_migrate)


def add_place_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="choose a destination for a VM from signed resource adverts")
    p.add_argument("vm")
    agent_command(p, cmd_place)


def add_migrations_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrations", help="recent migrations on an agent (`migrations show ID` for one)")
    p.add_argument("--limit", type=int, default=20)
    agent_command(p, cmd_migrations)
    migration_show.add_show_parser(p.add_subparsers(dest="migrations_command", metavar="{show}"))


def _order_for(args: argparse.Namespace, agent: AgentClient) -> tuple[str, str, str]:
    """The signed order to run, with its VM and destination: from --order, or signed now."""
    from sealift.security.orders import create_order, describe_order

    if args.order:
        envelope = read_order_file(args.order)
        order = describe_order(envelope)
        if args.vm and args.vm != order.get("vm"):
            raise CliError(f"the order is for VM {order.get('vm')!r}, not {args.vm!r}")
        return envelope, str(order.get("vm")), str(order.get("destination"))
    if not args.vm or not args.to:
        raise CliError("name the VM and --to HOST, or pass --order FILE")
    if args.to == "auto":
        placement = agent.request("place", vm=args.vm)["placement"]
        console.print(f"placement: {args.vm} → [bold]{placement['host']}[/bold] ({placement['reason']})")
        args.to = placement["host"]
    source = agent.request("status")["status"]["host"]
    return create_order(operator(args), args.vm, source, args.to, ttl_s=parse_duration(args.ttl)), args.vm, args.to


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.insecure:
        warn_insecure()
    agent = client(args)
    order, vm, destination = _order_for(args, agent)
    args.vm, args.to = vm, destination
    with MigrationProgress(args.vm, args.to, enabled=not args.json) as progress:
        try:
            reply = agent.request(
                "migrate",
                on_event=progress.on_event,
                vm=args.vm,
                to=args.to,
                options=migration_options(args),
                order=order,
            )
        except AgentRequestFailed as exc:
            if args.json:
                print_json(failure_json(exc))
                return 1
            raise CliError(str(exc)) from None
    report = reply["report"]
    if args.json:
        print_json(report)
    else:
        out.print(report_table(report))
    return 0 if report.get("status") == "completed" else 1


def cmd_place(args: argparse.Namespace) -> int:
    placement = client(args).request("place", vm=args.vm)["placement"]
    if args.json:
        print_json(placement)
        return 0
    from rich.table import Table

    table = Table(title=f"placement of {args.vm}: {placement['host']}")
    for col in ("host", "eligible", "believed free", "penalty", "reason"):
        table.add_column(col)
    for a in placement["assessments"]:
        table.add_row(
            a["host"],
            "yes" if a["eligible"] else "no",
            f"{a['effective_free'] >> 20} MiB",
            f"{a['penalty']:.2f}",
            a["reason"],
        )
    out.print(table)
    return 0


def cmd_migrations(args: argparse.Namespace) -> int:
    records = client(args).request("migrations", limit=args.limit)["migrations"]
    if args.json:
        print_json(records)
        return 0
    from rich.table import Table

    table = Table(title="migrations")
    for col in ("id", "vm", "role", "peer", "phase", "error"):
        table.add_column(col)
    for r in records:
        table.add_row(r["id"][:12], r["vm"], r["role"], r["peer"], r["phase"], (r.get("error") or "")[:60])
    out.print(table)
    return 0
