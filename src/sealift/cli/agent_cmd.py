"""`sealift agent` (run the per-host agent) and `sealift status` (ask it how it is)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from sealift.cli.common import DEFAULT_CONFIG, agent_command, client, print_json, show_fields
from sealift.cli.render import out, setup_logging
from sealift.host.checkup import check_agent_config
from sealift.host.config import load_config


def add_agent_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the per-host agent")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--check-config",
        action="store_true",
        help="check the config, the identity files, the policy, the CRL and the directories, "
        "then exit (0: all good) without starting the agent",
    )
    p.add_argument("--json", action="store_true", help="with --check-config: print the checks as JSON")
    p.set_defaults(func=cmd_agent)


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="agent status")
    agent_command(p, cmd_status)


def cmd_agent(args: argparse.Namespace) -> int:
    if args.check_config:
        return check_config(Path(args.config), args.json)
    from sealift.agent.daemon import Agent

    setup_logging(args.log_level.upper())
    Agent(load_config(Path(args.config))).serve_forever()
    return 0


def check_config(path: Path, as_json: bool) -> int:
    """One line per check (✓/✗); exit status 0 only if every check passed."""
    checks = check_agent_config(path)
    ok = all(c.ok for c in checks)
    if as_json:
        print_json({"status": "ok" if ok else "failed", "config": str(path), "checks": [c.to_dict() for c in checks]})
    else:
        for c in checks:
            mark = "[green]✓[/green]" if c.ok else "[red]✗[/red]"
            # soft_wrap: one line per check even in a narrow terminal or a file (the journal, grep)
            out.print(f"{mark} [bold]{c.name}[/bold]: {escape(c.detail)}", highlight=False, soft_wrap=True)
        failed = sum(not c.ok for c in checks)
        out.print("[green]config OK[/green]" if ok else f"[red]{failed} check(s) failed[/red]")
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    return show_fields(args, client(args).request("status")["status"])
