"""Benchmark: live migration of the built-in VM, secure (TLS + AEAD) vs the plaintext baseline.

Two real agents on localhost, a fresh VM per run, migrated A -> B. Secure and
plain runs are paired and their order alternates (this machine is shared and
noisy, and fresh memory costs vary from run to run), and each pair yields a
ratio; the report quotes medians and min-max.

    .venv/bin/python bench/builtin_migration.py                      # full: 256M,1G,4G x idle,db x 3 runs
    .venv/bin/python bench/builtin_migration.py --sizes 256M --runs 1  # quick
    .venv/bin/python bench/builtin_migration.py --json > results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sealift.cluster import LocalCluster

METRICS = ("total_time_s", "downtime_ms", "rounds", "bytes_sent", "source_cpu_s", "destination_cpu_s")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    memory: str
    workload: str


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others, all CPUs together (/proc/stat): this machine is a shared VM."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / CLOCK_TICKS


def migrate_once(cluster: LocalCluster, case: Case, secure: bool, warmup_s: float, fill: float) -> dict:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    src.request("vm.start", name="bench", memory=case.memory, workload=case.workload, fill_fraction=fill)
    time.sleep(warmup_s)
    stolen = steal_seconds()
    report = cluster.migrate("bench", "host-a", "host-b", options={"secure": secure})
    stolen = steal_seconds() - stolen
    dst.request("vm.stop", name="bench")
    if report["status"] != "completed":
        raise RuntimeError(f"migration failed: {report.get('error')}")
    return {**{key: report[key] for key in METRICS}, "steal_s": round(stolen, 2)}


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_case(cluster: LocalCluster, case: Case, runs: int, warmup_s: float, fill: float) -> dict:
    results: dict[str, list[dict]] = {"tls": [], "plain": []}
    ratios: list[float] = []
    for run in range(runs):
        order = ("tls", "plain") if run % 2 == 0 else ("plain", "tls")
        pair = {}
        for transport in order:
            pair[transport] = migrate_once(cluster, case, transport == "tls", warmup_s, fill)
            results[transport].append(pair[transport])
            print(
                f"  {case.memory:>5} {case.workload:<5} run {run + 1} {transport:<5} "
                f"{pair[transport]['total_time_s']:.3f} s, downtime {pair[transport]['downtime_ms']:.0f} ms, "
                f"rounds {pair[transport]['rounds']}, steal {pair[transport]['steal_s']:.2f} s",
                file=sys.stderr,
            )
        ratios.append(pair["tls"]["total_time_s"] / pair["plain"]["total_time_s"])
    summary = {
        transport: {metric: summarize([r[metric] for r in rows]) for metric in (*METRICS, "steal_s")}
        for transport, rows in results.items()
    }
    return {
        "memory": case.memory,
        "workload": case.workload,
        "runs": runs,
        "summary": summary,
        "ratio_total_time": summarize(ratios),
        "raw": results,
    }


def markdown(cases: list[dict]) -> str:
    lines = [
        "| VM | workload | transport | total time s (min-max) | downtime ms (min-max) | rounds | MiB sent | CPU s src / dst | steal s | secure/plain time (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for transport in ("tls", "plain"):
            s = case["summary"][transport]
            ratio = case["ratio_total_time"]
            ratio_text = (
                f"**{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f})" if transport == "tls" else "1.00"
            )
            lines.append(
                f"| {case['memory']} | {case['workload']} | {transport} | "
                f"{s['total_time_s']['median']:.2f} ({s['total_time_s']['min']:.2f}-{s['total_time_s']['max']:.2f}) | "
                f"{s['downtime_ms']['median']:.0f} ({s['downtime_ms']['min']:.0f}-{s['downtime_ms']['max']:.0f}) | "
                f"{s['rounds']['median']:.0f} | {s['bytes_sent']['median'] / 2**20:.0f} | "
                f"{s['source_cpu_s']['median']:.2f} / {s['destination_cpu_s']['median']:.2f} | "
                f"{s['steal_s']['median']:.2f} | {ratio_text} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256M,1G,4G")
    parser.add_argument("--workloads", default="idle,db")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds the workload runs before migrating")
    parser.add_argument("--fill", type=float, default=0.5, help="share of RAM filled at boot")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [Case(m, w) for m in args.sizes.split(",") for w in args.workloads.split(",")]
    results = []
    started = time.monotonic()
    with LocalCluster(allow_insecure=True, capacity="20G") as cluster:
        for case in cases:
            results.append(run_case(cluster, case, args.runs, args.warmup, args.fill))
    output = {
        "cases": results,
        "runs": args.runs,
        "wall_s": round(time.monotonic() - started, 1),
        "command": " ".join(sys.argv),
    }
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
