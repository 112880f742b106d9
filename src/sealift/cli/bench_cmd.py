"""`sealift bench`: migrations over every transport on the lab testbed, side by side (issue 6)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from sealift.cli.common import CliError, print_failure_json
from sealift.host.config import parse_size

QUICK_QEMU_MIB = 160
QUICK_BUILTIN_MIB = 128
QUICK_FILL_MIB = 24  # what the quick QEMU guest's workload writes...
QUICK_RATE_MIB = 4  # ...and rewrites per second (user-space IPsec moves ~15 MB/s here)
# The Debian guest's root file system is 1 GiB with ~250 MB used: half a GiB of writes leaves room.
DEBIAN_DISK_FILL_MIB = 512


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from sealift.bench.results import ALL_TRANSPORTS, DEFAULT_TRANSPORTS, WORKLOADS

    p = sub.add_parser(
        "bench",
        help="benchmark sealift against plain TCP, QEMU TLS, SSH and IPsec (root; lab namespaces)",
        description="Migrate guests over every transport on the lab testbed (network namespaces), "
        "interleaved, and write medians, a Table-4-style Markdown table, JSON and plots.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI mode: one run per transport, a {QUICK_QEMU_MIB} MiB QEMU guest and a "
        f"{QUICK_BUILTIN_MIB} MiB built-in VM, moderate workload",
    )
    p.add_argument("--runs", type=int, default=3, help="repetitions per transport (default 3)")
    p.add_argument(
        "--backends",
        default="qemu,builtin",
        help="of qemu, builtin, debian (the Debian guest with its disk, serving a client; "
        "transports plain, qemu-tls, ssh, ssh-aesgcm, sealift; MTU 1500) (default qemu,builtin)",
    )
    p.add_argument("--sizes", default="256M,1G,4G", help="guest sizes (default 256M,1G,4G)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)} (default all)")
    p.add_argument(
        "--transports",
        default=",".join(DEFAULT_TRANSPORTS),
        help=f"of {', '.join(ALL_TRANSPORTS)} (default: {', '.join(DEFAULT_TRANSPORTS)})",
    )
    p.add_argument(
        "--disk-fill",
        type=int,
        default=DEBIAN_DISK_FILL_MIB,
        help=f"debian: MiB the guest writes to its disk before it moves (default {DEBIAN_DISK_FILL_MIB})",
    )
    p.add_argument("--mtu", default="1500", help="migration link MTU(s), e.g. 1500,9000 (default 1500)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds the guest runs before each migration")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a QEMU-driven migration may take before it counts as not converging (default 300)",
    )
    p.add_argument("--out", help="results folder (default bench/results/alternatives-<UTC time>)")
    p.add_argument("--json", action="store_true", help='print {"runs": [...]} (one object per run) on stdout')
    p.set_defaults(func=cmd_bench)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_plan(args: argparse.Namespace):  # -> Plan
    from sealift.bench.harness import BenchError, Cell, Plan
    from sealift.bench.results import BACKENDS, DEBIAN_WORKLOAD, WORKLOADS

    transports = _csv(args.transports)
    unknown = set(_csv(args.backends)) - set(BACKENDS)
    if unknown:
        raise BenchError(f"unknown backend(s) {', '.join(sorted(unknown))}: use qemu, builtin, debian")
    if args.quick:
        # A light workload: quick mode checks that every transport works, it does not compare them.
        cells = [
            Cell("qemu", QUICK_QEMU_MIB, "moderate", 1500, fill_mib=QUICK_FILL_MIB, rate_mib=QUICK_RATE_MIB),
            Cell("builtin", QUICK_BUILTIN_MIB, "moderate", 1500),
        ]
        backends = set(_csv(args.backends))
        return Plan(
            [c for c in cells if c.backend in backends],
            transports,
            repetitions=1,
            warmup_s=0.5,
            timeout_s=min(args.timeout, 120.0),
        )
    workloads = _csv(args.workloads)
    for workload in workloads:
        if workload not in WORKLOADS:
            raise BenchError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    sizes = [parse_size(size) >> 20 for size in _csv(args.sizes)]
    mtus = [int(mtu) for mtu in _csv(args.mtu)]
    if args.runs < 1:
        raise BenchError("--runs must be at least 1")
    chosen = _csv(args.backends)
    cells = [
        Cell(backend, size, workload, mtu)
        for mtu in mtus
        for backend in chosen
        if backend != "debian"
        for size in sizes
        for workload in workloads
    ]
    if "debian" in chosen:
        if 1500 not in mtus:
            raise BenchError("the Debian guest runs at MTU 1500 only (its lab's link): add 1500 to --mtu")
        if args.disk_fill < 0:
            raise BenchError("--disk-fill must not be negative")
        # Its workload is the client (reads and writes every 10 ms), not the test guest's memory writer.
        cells += [Cell("debian", size, DEBIAN_WORKLOAD, 1500, fill_mib=args.disk_fill) for size in sizes]
    return Plan(cells, transports, repetitions=args.runs, warmup_s=args.warmup, timeout_s=args.timeout)


def canonical_command(args: argparse.Namespace) -> str:
    """The command with every choice spelled out, as the results record it (defaults included)."""
    argv = ["sealift", "bench"]
    if args.quick:
        argv += ["--quick", "--backends", args.backends, "--transports", args.transports]
    else:
        argv += [
            "--runs",
            str(args.runs),
            "--backends",
            args.backends,
            "--sizes",
            args.sizes,
            "--workloads",
            args.workloads,
            "--transports",
            args.transports,
            "--mtu",
            args.mtu,
            *(["--disk-fill", str(args.disk_fill)] if "debian" in _csv(args.backends) else []),
            "--warmup",
            f"{args.warmup:g}",
            "--timeout",
            f"{args.timeout:g}",
        ]
    return shlex.join(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    from sealift.bench.harness import BenchError, run_plan
    from sealift.bench.output import write_results
    from sealift.bench.results import fill_ratios

    if os.geteuid() != 0:
        refusal = CliError("sealift bench needs root (it builds network namespaces)")
        print(f"error: {refusal}", file=sys.stderr)
        print_failure_json(args, refusal)
        return 2
    try:
        plan = build_plan(args)
    except (BenchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print_failure_json(args, exc)
        return 2
    command = canonical_command(args)
    started = time.monotonic()
    out = (
        Path(args.out)
        if args.out
        else Path("bench/results") / time.strftime("alternatives-%Y%m%dT%H%M%SZ", time.gmtime())
    )

    def save_so_far(runs: list) -> None:  # results.json and results.md after every run: a stopped run keeps them
        fill_ratios(runs)
        write_results(out, runs, {}, command, plan.transports, plots=False)

    try:
        outcome = run_plan(plan, progress=lambda line: print(line, file=sys.stderr, flush=True), on_run=save_so_far)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print_failure_json(args, exc)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print(f"interrupted: the runs finished so far are in {out}", file=sys.stderr)
        return 130
    written = write_results(out, outcome.runs, outcome.skipped, command, plan.transports)
    print(
        f"{len(outcome.runs)} runs in {time.monotonic() - started:.0f} s; wrote {', '.join(str(p) for p in written)}",
        file=sys.stderr,
    )
    if args.json:
        sys.stdout.write(json.dumps({"runs": [r.to_brief_json() for r in outcome.runs]}, indent=2) + "\n")
    else:
        from sealift.bench.output import markdown_report

        sys.stdout.write(markdown_report(outcome.runs, outcome.skipped, command, plan.transports) + "\n")
    return 0 if all(r.ok for r in outcome.runs) else 1
