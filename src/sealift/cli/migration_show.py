"""`sealift migrations show ID [--plot FILE.png]`: one migration as its agent recorded it."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from rich.table import Table

from sealift.cli.common import CliError, agent_command, client, print_json
from sealift.cli.render import console, out, report_table


def add_show_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="one migration: its record and the report of its rounds",
        description="Show one migration as this agent recorded it. The source host keeps the report "
        "(rounds, downtime); the destination only the record.",
    )
    p.add_argument("id", help="migration id (the first characters are enough, as `sealift migrations` shows them)")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw its rounds over time (bytes, throughput, dirty rate, what is left; switchover and "
        "downtime marked) into a PNG; needs matplotlib (pip install 'sealift[bench]')",
    )
    agent_command(p, cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    record = client(args).request("migration", id=args.id)["migration"]
    report = record.get("report")
    if args.plot:
        if not report:
            raise CliError(
                f"migration {record['id'][:12]} has no saved report here (its role: {record['role']}); "
                "the source host's agent keeps it: ask that one"
            )
        from sealift.cli.migration_plot import write_migration_plot

        path = write_migration_plot(report, Path(args.plot))
        console.print(f"plot written to {path}")
    if args.json:
        print_json(record)
        return 0
    out.print(record_table(record))
    if report:
        out.print(report_table(report))
        out.print(rounds_table(report))
    return 0


def record_table(record: dict) -> Table:
    table = Table(title=f"migration {record['id']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    created = datetime.datetime.fromtimestamp(float(record["created_at"]), datetime.UTC)
    rows = [
        ("vm", str(record["vm"])),
        ("role", f"{record['role']} (peer {record['peer']})"),
        ("phase", str(record["phase"])),
        ("decision", str(record.get("decision") or "-")),
        ("backend", str(record.get("backend") or "-")),
        ("started", f"{created:%Y-%m-%d %H:%M:%S} UTC"),
    ]
    if record.get("error"):
        rows.append(("error", f"[red]{record['error']}[/red]"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def rounds_table(report: dict) -> Table:
    table = Table(title="rounds")
    for col in ("round", "pages", "MiB", "ms", "MiB/s", "dirty left", "decision"):
        table.add_column(col, justify="right" if col != "decision" else "left")
    for r in report.get("round_reports") or []:
        table.add_row(
            "stop-and-copy" if r.get("final") else str(r["round"]),
            str(r["pages_sent"]),
            f"{int(r['bytes_sent']) / 2**20:.1f}",
            f"{float(r['duration_s']) * 1000:.0f}",
            str(r["throughput_mib_s"]),
            str(r["dirty_pages_left"]),
            f"{r['decision']} ({r['reason']})",
        )
    return table
