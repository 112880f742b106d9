"""`sealift agent` (run the per-host agent) and `sealift status` (ask it how it is)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sealift.cli.common import add_agent_flags, client, show_fields
from sealift.host.config import load_config


def add_agent_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the per-host agent")
    p.add_argument("--config", required=True, help="agent config file (TOML)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_agent)


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="agent status")
    add_agent_flags(p)
    p.set_defaults(func=cmd_status)


def cmd_agent(args: argparse.Namespace) -> int:
    from sealift.agent.daemon import Agent

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Agent(load_config(Path(args.config))).serve_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return show_fields(args, client(args).request("status")["status"])
