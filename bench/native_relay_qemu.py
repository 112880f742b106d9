"""Benchmark: QEMU migrations with the Python relay (a tree before the native core) and the native one, side by side.

Runs bench/qemu_migration.py of each tree (that tree's `src` first on the
path) one run at a time, alternating the trees round by round and, inside
each run, sealift and plain (qemu_migration.py alternates those itself), so
both trees see the same noise of this shared machine. Quotes medians per
tree and transport, and the sealift/plain ratio of each tree.

    git archive 58b8c26 | tar -x -C /tmp/sln-base     # the tree before the native core
    .venv/bin/python bench/native_relay_qemu.py --old /tmp/sln-base --new . --memory 1G --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run_tree(tree: Path, memory: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(tree / "bench" / "qemu_migration.py"), "--memory", memory]
    command += ["--runs", "1", "--transports", "sealift,plain", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=True)
    transports = json.loads(done.stdout)["transports"]
    return {name: summary["results"][0] for name, summary in transports.items()}


def figures(runs: list[dict]) -> dict[str, float]:
    def median(pick: Callable[[dict], float]) -> float:
        return float(statistics.median(pick(r) for r in runs))

    return {
        "total_time_s": median(lambda r: r["total_time_s"]),
        "downtime_ms": median(lambda r: r["downtime_ms"]),
        "qemu_downtime_ms": median(lambda r: r["qemu_downtime_ms"] or 0),
        "agent_a_cpu_s": median(lambda r: r["cpu_s"].get("agent_host-a", 0.0)),
        "agent_b_cpu_s": median(lambda r: r["cpu_s"].get("agent_host-b", 0.0)),
        "transferred_mib": median(lambda r: r["transferred_mib"]),
        "guest_ok": sum(1 for r in runs if r["guest_ok_after"]),
        "runs": len(runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the tree with the Python relay")
    parser.add_argument("--new", type=Path, required=True, help="the tree with the native relay")
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    trees = {"python": args.old.resolve(), "native": args.new.resolve()}
    raw: dict[str, dict[str, list[dict]]] = {t: {"sealift": [], "plain": []} for t in trees}
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for tree in order:
            for transport, result in run_tree(trees[tree], args.memory).items():
                raw[tree][transport].append(result)
                print(json.dumps({"round": round_, "tree": tree, "transport": transport, **result}), file=sys.stderr)
    summary = {t: {tr: figures(runs) for tr, runs in per.items()} for t, per in raw.items()}
    pairs = {
        t: [s["total_time_s"] / p["total_time_s"] for s, p in zip(raw[t]["sealift"], raw[t]["plain"])] for t in trees
    }
    print(json.dumps({"memory": args.memory, "rounds": args.rounds, "summary": summary, "raw": raw}, indent=2))
    lines = [
        f"QEMU guest {args.memory}, medians of {args.rounds} runs per tree and transport",
        "",
        "| relay | transport | total s | downtime ms | QEMU downtime ms | agent CPU s a / b | sealift/plain total "
        "(median of per-run ratios) |",
        "|---|---|---|---|---|---|---|",
    ]
    for tree in trees:
        for transport in ("sealift", "plain"):
            f = summary[tree][transport]
            ratio = f"{statistics.median(pairs[tree]):.2f}x" if transport == "sealift" else "1.00"
            lines.append(
                f"| {tree} | {transport} | {f['total_time_s']:.2f} | {f['downtime_ms']:.0f} | "
                f"{f['qemu_downtime_ms']:.0f} | {f['agent_a_cpu_s']:.2f} / {f['agent_b_cpu_s']:.2f} | {ratio} |"
            )
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
