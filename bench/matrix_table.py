"""One compact table for a `sealift bench` matrix, and the issue-21 targets counted over it.

`sealift bench` writes results.md with a full table per cell; this reads one
or more of its results.json files (for example the MTU 1500 and the MTU 9000
halves of one matrix) and prints a row per cell: plain's median time, every
other transport's median time and median per-repetition ratio to plain, the
downtime from the source's stop to the guest running (sealift against
plain), and the sealift agents' CPU seconds per GiB on the wire, each side
(the relay's own CPU: the agents do little else during a transfer). Then the
targets: sealift within 1.10x of plain, never above 1.20x, downtime within
plain's + 20 ms, and sealift the fastest of the secure transports.

    .venv/bin/python bench/matrix_table.py bench/results/native-matrix-qemu-1500/results.json \\
        bench/results/native-matrix-qemu-9000/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

GiB = 1 << 30
SECURE = ("qemu-tls", "ssh", "ssh-aesgcm", "ipsec", "wireguard", "sealift", "sealift-ipsec")
Cell = tuple[str, int, str, int]  # backend, MiB, workload, MTU
WORKLOADS = {"idle": 0, "moderate": 1, "heavy": 2}


def load(paths: list[Path]) -> dict[Cell, dict[str, list[dict]]]:
    cells: dict[Cell, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            cell = (run["backend"], run["memory_mib"], run["workload"], run["mtu"])
            cells[cell][run["transport"]].append(run)
    return cells


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ok_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not r.get("error") and r.get("total_time_s")]


def ratio(runs: list[dict], plain: list[dict]) -> float | None:
    """The median of each repetition's time over plain's in the same repetition."""
    by_rep = {r["repetition"]: r["total_time_s"] for r in ok_runs(plain)}
    return _median([r["total_time_s"] / by_rep[r["repetition"]] for r in ok_runs(runs) if r["repetition"] in by_rep])


def cpu_per_gib(runs: list[dict], role: str) -> float | None:
    return _median([r["cpu_by_role"].get(role, 0.0) / (r["bytes"] / GiB) for r in ok_runs(runs) if r.get("bytes")])


def row(cell: Cell, transports: dict[str, list[dict]], order: list[str]) -> tuple[str, dict[str, object]]:
    plain = transports.get("plain", [])
    plain_s = _median([r["total_time_s"] for r in ok_runs(plain)])
    cells = [f"{cell[0]} {cell[1]} MiB {cell[2]} {cell[3]}", f"{plain_s:.2f} s" if plain_s else "failed"]
    ratios: dict[str, float | None] = {}
    for name in order:
        runs = transports.get(name, [])
        good = ok_runs(runs)
        if not runs:
            cells.append("")
            continue
        ratios[name] = ratio(runs, plain)
        failed = len(runs) - len(good)
        text = f"{_median([r['total_time_s'] for r in good]):.2f} s ({ratios[name]:.2f}x)" if good else "not converging"
        if good and failed:
            text += f", {failed} of {len(runs)} not converging"
        cells.append(text)
    sealift = transports.get("sealift", [])
    down_s = _median([r["downtime_to_running_ms"] for r in ok_runs(sealift) if r.get("downtime_to_running_ms")])
    down_p = _median([r["downtime_to_running_ms"] for r in ok_runs(plain) if r.get("downtime_to_running_ms")])
    cells.append(f"{down_s:.0f} vs {down_p:.0f}" if down_s is not None and down_p is not None else "")
    src, dst = cpu_per_gib(sealift, "agent-src"), cpu_per_gib(sealift, "agent-dst")
    cells.append(f"{src:.2f} / {dst:.2f}" if src is not None and dst is not None else "")
    others = [ratios[n] for n in order if n in SECURE and n != "sealift" and n in ratios]
    facts = {
        "ratio": ratios.get("sealift"),
        "downtime_gap_ms": None if down_s is None or down_p is None else down_s - down_p,
        "fastest_secure": ratios.get("sealift") is not None
        and all(o is None or ratios["sealift"] <= o for o in others),
        "compared": bool(others),
    }
    return "| " + " | ".join(cells) + " |", facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of `sealift bench`")
    args = parser.parse_args()
    cells = load(args.results)
    present = {t for transports in cells.values() for t in transports}
    order = [
        t for t in ("qemu-tls", "ssh", "ssh-aesgcm", "ipsec", "wireguard", "sealift-plain", "sealift") if t in present
    ]
    head = ["cell", "plain", *order, "stop to running ms, sealift vs plain", "sealift agents CPU-s/GiB src / dst"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    facts = []
    key = lambda c: (c[0], c[3], c[1], WORKLOADS.get(c[2], 9))  # noqa: E731 - a sort key
    for cell in sorted(cells, key=key):
        line, fact = row(cell, cells[cell], order)
        print(line)
        facts.append(fact)
    ratios = [f["ratio"] for f in facts if f["ratio"] is not None]
    gaps = [f["downtime_gap_ms"] for f in facts if f["downtime_gap_ms"] is not None]
    compared = [f for f in facts if f["compared"]]
    print()
    print(f"- sealift within 1.10x of plain: {sum(r <= 1.10 for r in ratios)} of {len(ratios)} cells")
    print(f"- sealift above 1.20x of plain: {sum(r > 1.20 for r in ratios)} of {len(ratios)} cells")
    print(f"- downtime within plain's + 20 ms: {sum(g <= 20 for g in gaps)} of {len(gaps)} cells")
    if compared:
        print(
            f"- sealift the fastest secure transport: {sum(f['fastest_secure'] for f in compared)} of {len(compared)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
