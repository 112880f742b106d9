"""Benchmark: the same built-in VM migration with two source trees, side by side (a refactor's regression check).

Runs bench/builtin_migration.py of each tree with that tree's `src` first on
the path, alternating trees round by round (this machine is shared and noisy:
both trees see the same noise), and quotes the medians of the secure (tls)
and plain runs per tree and the new/old ratio.

    .venv/bin/python bench/refactor_regression.py --old /work/wt-old --new . --rounds 3 --size 1G --workload db
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

METRICS = ("total_time_s", "downtime_ms", "source_cpu_s", "destination_cpu_s")


def run_tree(tree: Path, size: str, workload: str, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(tree / "bench" / "builtin_migration.py"), "--sizes", size, "--workloads", workload]
    command += ["--runs", str(runs), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout)["cases"][0]["raw"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the tree before (its src/ and bench/)")
    parser.add_argument("--new", type=Path, required=True, help="the tree after")
    parser.add_argument("--rounds", type=int, default=3, help="alternations old/new")
    parser.add_argument("--runs", type=int, default=2, help="secure+plain pairs per round and tree")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--workload", default="db")
    args = parser.parse_args()
    rows: dict[str, dict[str, list[dict]]] = {"old": {"tls": [], "plain": []}, "new": {"tls": [], "plain": []}}
    for round_index in range(args.rounds):
        order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
        for name in order:
            raw = run_tree(getattr(args, name).resolve(), args.size, args.workload, args.runs)
            for transport in ("tls", "plain"):
                rows[name][transport] += raw[transport]
            print(f"round {round_index + 1} {name}: done", file=sys.stderr)
    print(
        f"| {args.size} {args.workload} | transport | " + " | ".join(f"{m} old | new | new/old" for m in METRICS) + " |"
    )
    print("|---|---|" + "---|---|---|" * len(METRICS))
    for transport in ("tls", "plain"):
        cells = []
        for metric in METRICS:
            old = statistics.median(r[metric] for r in rows["old"][transport])
            new = statistics.median(r[metric] for r in rows["new"][transport])
            cells.append(f"{old:.3g} | {new:.3g} | {new / old:.2f}" if old else f"{old} | {new} | -")
        count = len(rows["new"][transport])
        print(f"| medians of {count} runs each | {transport} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
