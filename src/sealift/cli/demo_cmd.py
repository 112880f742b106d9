"""`sealift demo`: migrate a running VM between two local agents, securely, in one command."""

from __future__ import annotations

import argparse

from sealift.cli.common import add_migration_flags, migration_options, print_json, warn_insecure


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="migrate a running VM (built-in, QEMU or libvirt) between two local agents, securely"
    )
    p.add_argument("--backend", default="builtin", choices=["builtin", "qemu", "libvirt"])
    p.add_argument(
        "--guest",
        default=None,
        choices=["sealift", "debian"],
        help="sealift: the test guest (default with --backend qemu), or debian: Debian 12 with nginx and redis on "
        "its own disk, on the lab's network with a client writing through the migration (default with --backend "
        "libvirt; root; the image is built once)",
    )
    p.add_argument("--memory", default="256M")
    p.add_argument("--workload", default="db", choices=["idle", "web", "db", "stress"])
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true")
    add_migration_flags(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from sealift.demo import DemoOptions, run_demo

    guest = args.guest or ("debian" if args.backend == "libvirt" else "sealift")
    if guest == "debian" and (args.backend not in ("qemu", "libvirt") or args.insecure):
        raise SystemExit(
            "--guest debian goes with --backend qemu or libvirt, and migrates securely (its disk travels sealed)"
        )
    if args.insecure:
        warn_insecure()
    result = run_demo(
        DemoOptions(
            memory=args.memory,
            workload=args.workload,
            insecure=args.insecure,
            show_progress=not args.json,
            keep=args.keep,
            migration=migration_options(args),
            backend=args.backend,
            guest=guest,
        )
    )
    if args.json:
        print_json(result)
    # The Debian guest's story fails too if an acknowledged write was lost or the disks disagree.
    disk_check = result.get("disk_check")
    checks_ok = result.get("writes_lost") in (None, 0) and (not isinstance(disk_check, dict) or disk_check["ok"])
    return 0 if result.get("status") == "completed" and checks_ok else 1
