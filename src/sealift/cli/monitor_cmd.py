"""`sealift monitor`: per-VM signals and verdicts of an agent's monitors (rich, --json, --watch)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sealift.agent.client import AgentClient
from sealift.cli.common import agent_command, client

_SIGNALS = (("cpu", "CPU"), ("dirty_bps", "dirty"), ("rx_bps", "in"), ("tx_bps", "out"))
_VERDICT_STYLE = {"attacker": "bold red", "victim": "bold yellow", "anomalous": "magenta"}


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="live per-VM signals and attacker/victim/reliability verdicts")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    agent_command(p, lambda args: cmd_monitor(args, client(args)))


def cmd_monitor(args: argparse.Namespace, agent: AgentClient) -> int:
    def snapshot() -> dict:
        return agent.request("monitor.snapshot")["monitor"]

    if args.json and not args.watch:
        sys.stdout.write(json.dumps(snapshot(), indent=2, default=str) + "\n")
        return 0
    if args.json:  # --json --watch: one JSON object per line
        while True:
            sys.stdout.write(json.dumps(snapshot(), default=str) + "\n")
            sys.stdout.flush()
            time.sleep(max(0.1, args.interval))
    if not args.watch:
        from sealift.cli.render import out

        out.print(render(snapshot()))
        return 0
    with Live(render(snapshot()), refresh_per_second=4) as live:
        while True:
            time.sleep(max(0.1, args.interval))
            live.update(render(snapshot()))


def render(snap: dict) -> Group:
    """The snapshot as tables: VMs with their signals and verdicts, then the port watch."""
    now = float(snap.get("now", 0.0))
    vms = Table(title=f"monitors on {snap['host']} (every {snap['period_s']:g} s, {snap['rounds']} rounds)")
    for header in ("VM", "status", *(label for _, label in _SIGNALS), "verdict", "reliability"):
        vms.add_column(header, overflow="fold")
    for row in snap["vms"]:
        cells: list[str | Text] = [str(row["vm"]), f"{row['status']}{'' if row['warm'] else ' (learning)'}"]
        for signal, _ in _SIGNALS:
            cells.append(_signal_cell(signal, row["signals"].get(signal)))
        verdict = row["verdict"]
        if verdict:
            age = max(0.0, now - float(verdict["since"]))
            text = Text(f"{verdict['kind']} ({age:.0f} s)\n", style=_VERDICT_STYLE.get(verdict["kind"], ""))
            text.append(verdict["reason"], style="dim")
            if row.get("recommendation"):
                text.append(f"\n→ {row['recommendation']}", style="yellow")
        else:
            text = Text("normal", style="green")
        cells_rel = "\n".join(r["reason"] for r in row["reliability"]) or (
            f"{row['restarts']} restarts" if row["restarts"] else "ok"
        )
        vms.add_row(*cells, text, cells_rel)
    parts: list = [vms]
    if snap["peers"]:
        peers = Table(title="migration port watch")
        for header in ("peer", "score", "blocked", "events"):
            peers.add_column(header)
        for peer in snap["peers"]:
            blocked = f"[bold red]{peer['blocked_for_s']:.0f} s[/]" if peer["blocked_for_s"] else "-"
            events = ", ".join(f"{k} {v}" for k, v in sorted(peer["counts"].items()))
            peers.add_row(str(peer["peer"]), f"{peer['score']:.0f}", blocked, events)
        parts.append(peers)
    return Group(*parts)


def _signal_cell(signal: str, data: dict | None) -> Text:
    if data is None:
        return Text("-", style="dim")  # absent (no NIC) or not measured yet
    value = _fmt(signal, float(data["value"]))
    text = Text(value, style="bold red" if data["anomalous"] else "")
    text.append(f"\n~{_fmt(signal, float(data['normal']))} z={data['z']:.1f}", style="dim")
    return text


def _fmt(signal: str, value: float) -> str:
    if signal == "cpu":
        return f"{value * 100:.0f}%"
    for unit, size in (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B/s"
