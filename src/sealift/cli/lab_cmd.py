"""`sealift lab run`: the attack lab (as root) — every threat of THREATS.md against real agents."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from sealift.cli.common import print_failure_json

if TYPE_CHECKING:
    from sealift.lab.session import Backend

BACKENDS: tuple[Backend, ...] = ("builtin", "qemu")  # the default run
CHOICES: tuple[Backend, ...] = (*BACKENDS, "libvirt")  # libvirt's rows (T1) run when asked: --backend libvirt


def add_lab_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the attack lab: replay the threat catalog against agents in network namespaces")
    commands = lab.add_subparsers(dest="lab_command", required=True)
    p = commands.add_parser("run", help="run the attacks (root); exits non-zero if any gets through")
    p.add_argument("--only", help="comma-separated threats or attack groups to run, e.g. T3,T5 or ipsec (default: all)")
    p.add_argument(
        "--skip",
        help="comma-separated threats or attack groups to leave out, e.g. T11 (with --only: --only ipsec --skip T4)",
    )
    p.add_argument("--backend", choices=CHOICES, help="only this backend (default: builtin and qemu)")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} on stdout')
    p.add_argument("--out", default="lab-results", help="results folder (default ./lab-results); one subfolder per run")
    p.add_argument("--keep", action="store_true", help="keep the agents' state and logs under the results folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: T11 tries each failure once and each phase once (3 scenarios, not 9); "
        "the IPsec transport's rows run only when named (--only ipsec)",
    )
    p.set_defaults(func=cmd_lab_run)


def parse_only(text: str | None, flag: str = "--only") -> set[str] | None:
    if not text:
        return None
    threats = {part.strip().upper() for part in text.split(",") if part.strip()}
    groups = attack_groups()
    bad = sorted(t for t in threats if not (t.startswith("T") and t[1:].isdigit()) and t not in groups)
    if bad:
        raise ValueError(
            f"{flag} takes threat ids such as T1,T3 or attack groups ({', '.join(sorted(groups)).lower()}), "
            f"not {', '.join(bad)}"
        )
    return threats


def attack_groups() -> set[str]:
    """The attack groups `--only` accepts besides threat ids: the attack modules' names, upper-case (IPSEC, ...)."""
    import sealift.lab.attacks  # noqa: F401  (registers the attacks)
    from sealift.lab.attacks.base import ATTACKS

    return {attack.run.__module__.rsplit(".", 1)[-1].upper() for attack in ATTACKS}


def cmd_lab_run(args: argparse.Namespace) -> int:
    from sealift.lab.report import exit_code, public_json, rich_table, write_report
    from sealift.lab.runner import LabRun
    from sealift.lab.testbed import TestbedError

    progress = Console(stderr=True)
    if os.geteuid() != 0:
        progress.print("[bold red]error:[/bold red] the lab needs root (network namespaces, taps, tshark)")
        return 2
    try:
        only = parse_only(args.only)
        skip = parse_only(args.skip, "--skip") or set()
    except ValueError as exc:
        progress.print(f"[bold red]error:[/bold red] {exc}")
        print_failure_json(args, exc)
        return 2
    backends = (args.backend,) if args.backend else BACKENDS

    def on_result(result) -> None:  # noqa: ANN001
        mark = "[green]blocked[/green]" if result.defended else "[bold red]NOT BLOCKED[/bold red]"
        progress.print(
            f"  {result.threat} {escape(f'[{result.backend}]')} {escape(result.attack)}: "
            f"baseline {result.baseline}, sealift {mark}, copies {result.vm_running_copies}"
        )

    try:
        with progress.status("building the lab network") as status:

            def say(message: str) -> None:
                status.update(escape(message))
                progress.print(f"[dim]{escape(message)}[/dim]")

            with LabRun(Path(args.out), keep=args.keep, quick=args.quick, say=say) as lab:
                results = lab.run(only, backends, on_result=on_result, skip=skip)
                meta: dict[str, object] = {"only": sorted(only or []), "skip": sorted(skip), "backends": list(backends)}
                markdown, json_path = write_report(results, lab.results_dir, meta)
    except TestbedError as exc:
        progress.print(f"[bold red]error:[/bold red] {exc}")
        print_failure_json(args, exc)
        return 2
    if not results:
        progress.print("[bold red]error:[/bold red] no attack matched --only/--skip/--backend")
    if args.json:
        sys.stdout.write(json.dumps(public_json(results), indent=2) + "\n")
    else:
        Console().print(rich_table(results))
    progress.print(f"report: {markdown} and {json_path}")
    return exit_code(results)
