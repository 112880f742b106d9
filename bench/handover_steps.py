"""Benchmark: where a QEMU migration's stopped window goes after the stream, two trees side by side.

The source's report marks each handover step in milliseconds since QEMU
paused the guest (`downtime_breakdown_ms`: stream_sent, manifest_sent,
prepared_receipt_in, prepared_receipt, commit_decided, commit_sent,
running_receipt_in, running_receipt; a tree marks only the steps it knows).
This runs bench/qemu_migration.py of each tree (that tree's `src` first on
the path), one sealift run at a time, alternating the trees run by run, so
both see the same noise of this shared machine, and prints the median of
each step, of each step's share (the time since the step before) and of the
handover as a whole (running receipt minus stream sent).

    git archive <before> | tar -x -C /tmp/sl-handover-old
    .venv/bin/python bench/handover_steps.py --old /tmp/sl-handover-old --new . --memory 256M --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STEPS = (
    "switchover_check",  # the source's check at QEMU's pre-switchover stop, done: QEMU sends the rest from here
    "stream_sent",
    "manifest_sent",
    "prepared_receipt_in",
    "prepared_receipt",
    "commit_decided",
    "commit_sent",
    "running_receipt_in",
    "running_receipt",
)


def run_tree(tree: Path, memory: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(tree / "bench" / "qemu_migration.py"), "--memory", memory]
    command += ["--runs", "1", "--transports", "sealift", "--warmup", "0", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=True)
    result = json.loads(done.stdout)["transports"]["sealift"]["results"][0]
    if result.get("error"):
        raise RuntimeError(f"{tree}: the migration failed: {result['error']}")
    return result


def breakdown(result: dict) -> dict[str, float]:
    marks = result.get("downtime_breakdown_ms") or {}
    found = {step: float(marks[step]) for step in STEPS if step in marks}
    if result.get("qemu_downtime_ms") is not None:  # QEMU's own: its stop to its end of the stream
        found["qemu_downtime"] = float(result["qemu_downtime_ms"])
    return found


def medians(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per step: the median time since the pause, and the median time since the step before it."""
    out: dict[str, dict[str, float]] = {}
    for step in STEPS:
        present = [r for r in runs if step in r]
        if not present:
            continue
        shares = []
        for r in present:
            before = [r[s] for s in STEPS[: STEPS.index(step)] if s in r]
            shares.append(r[step] - before[-1] if before else r[step])
        out[step] = {"at": statistics.median(r[step] for r in present), "share": statistics.median(shares)}
    handover = [r["running_receipt"] - r["stream_sent"] for r in runs if "running_receipt" in r and "stream_sent" in r]
    out["handover"] = {"at": statistics.median(handover), "share": statistics.median(handover)}
    qemu = [r["qemu_downtime"] for r in runs if "qemu_downtime" in r]
    if qemu:
        out["qemu_downtime"] = {"at": statistics.median(qemu), "share": statistics.median(qemu)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the tree before the change")
    parser.add_argument("--new", type=Path, required=True, help="the tree with the change")
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    raw: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for round_ in range(args.rounds):
        for tree in trees if round_ % 2 == 0 else reversed(list(trees)):
            marks = breakdown(run_tree(trees[tree], args.memory))
            raw[tree].append(marks)
            print(json.dumps({"round": round_, "tree": tree, **marks}), file=sys.stderr, flush=True)
    summary = {t: medians(runs) for t, runs in raw.items()}
    print(json.dumps({"memory": args.memory, "rounds": args.rounds, "summary": summary, "raw": raw}, indent=2))
    print(
        f"\nQEMU guest {args.memory}, sealift, medians of {args.rounds} runs per tree (ms; at = since the pause, "
        "share = since the step before)\n"
    )
    print("| step | old at | old share | new at | new share |")
    print("|---|---|---|---|---|")
    for step in (*STEPS, "handover", "qemu_downtime"):
        cells = []
        for tree in trees:
            f = summary[tree].get(step)
            cells += [f"{f['at']:.1f}", f"{f['share']:.1f}"] if f else ["-", "-"]
        print(f"| {step} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
