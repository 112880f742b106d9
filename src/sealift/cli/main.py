"""The `sealift` command: the top-level parser built from the command groups, dispatch, and error reporting."""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from sealift import __version__
from sealift.agent.client import AgentRequestFailed, AgentUnavailable
from sealift.cli import (
    agent_cmd,
    audit_cmd,
    bench_cmd,
    ca_cmd,
    demo_cmd,
    image_cmd,
    lab_cmd,
    migrate_cmd,
    monitor_cmd,
    order_cmd,
    psk_cmd,
    vm_cmd,
)
from sealift.cli.common import CliError, print_failure_json
from sealift.cli.render import console, setup_logging
from sealift.host.config import ConfigError
from sealift.security.errors import SecurityError

# What a command may fail with and still get a one-line message (exit 2) rather than a traceback.
REPORTED_ERRORS = (CliError, ConfigError, AgentUnavailable, AgentRequestFailed, SecurityError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sealift", description="Secure live migration of virtual machines.")
    parser.add_argument("--version", action="version", version=f"sealift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # In this order: it is the order `sealift --help` lists them in.
    agent_cmd.add_agent_parser(sub)
    ca_cmd.add_ca_parser(sub)
    vm_cmd.add_vm_parser(sub)
    migrate_cmd.add_migrate_parser(sub)
    order_cmd.add_order_parser(sub)
    migrate_cmd.add_place_parser(sub)
    psk_cmd.add_psk_parser(sub)
    audit_cmd.add_audit_parser(sub)
    migrate_cmd.add_migrations_parser(sub)
    agent_cmd.add_status_parser(sub)
    monitor_cmd.add_monitor_parser(sub)
    image_cmd.add_image_parser(sub)
    demo_cmd.add_demo_parser(sub)
    lab_cmd.add_lab_parser(sub)
    bench_cmd.add_bench_parser(sub)
    return parser


def report_failure(args: argparse.Namespace, exc: BaseException) -> int:
    """Say why the command failed: on stderr, and with --json also as one JSON object on stdout."""
    # One line whatever its length (soft_wrap), and the message printed as it is: it may quote
    # what a peer or a file said, brackets included (escape, not rich markup).
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
    print_failure_json(args, exc)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.func(args))
    except REPORTED_ERRORS as exc:
        return report_failure(args, exc)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
