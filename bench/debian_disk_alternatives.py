"""Benchmark (issue 18): the Debian guest with its disk, sealift vs plain QEMU vs SSH tunnels vs QEMU's TLS.

    .venv/bin/python bench/debian_disk_alternatives.py [--runs 3] [--memory 1024] [--fill 512] \
        [--variants sealift,plain,ssh-aesgcm,qemu-tls] [--json]

The runs themselves are sealift.bench.debian's (what each variant does and
measures is described there); `sealift bench --backends debian` runs the same
ones inside the benchmark's matrix. This script alternates the variants
within each round, prints medians and the ratio to plain. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from sealift.bench.debian import TRANSPORTS, run_debian, saved_state

KEYS = ("total_ms", "from_mirror_ms", "mirror_ms", "downtime_ms", "disk_mb", "longest_gap_ms", "failed", "writes_lost", "cpu_s",
        "qemu_cpu_s", "fill_s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB (a saved state per size)")
    parser.add_argument("--fill", type=int, default=512, help="MiB the guest writes to its disk before")
    parser.add_argument("--variants", default="sealift,plain,ssh-aesgcm,qemu-tls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in TRANSPORTS for v in variants):
        parser.error(f"variants: {', '.join(TRANSPORTS)}")
    state = saved_state(args.memory)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads: list[float] = []
    for n in range(max(1, min(args.runs, 20))):
        order = variants[n % len(variants) :] + variants[: n % len(variants)]  # rotate who goes first
        for variant in order:
            loads.append(os.getloadavg()[0])
            try:
                result = run_debian(variant, state, args.memory, args.fill)
            except Exception as exc:  # noqa: BLE001 - a failed run is a result too
                result = {"status": f"error: {exc}"[:300]}
            result["load1"] = round(loads[-1], 2)
            runs[variant].append(result)
            print(f"round {n + 1} {variant}: {json.dumps(result)}", file=sys.stderr, flush=True)
    med: dict[str, dict[str, float | None]] = {}
    for variant, results in runs.items():
        ok = [r for r in results if r.get("status") == "completed"]
        med[variant] = {
            k: statistics.median(float(r[k] or 0) for r in ok) if ok and all(k in r for r in ok) else None for k in KEYS
        }
    report = {"memory_mib": args.memory, "fill_mib": args.fill, "runs": runs,
              "medians": med, "load1": [min(loads), max(loads)]}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'median':<16}" + "".join(f"{v:>12}" for v in variants))
    for key in KEYS:
        print(f"{key:<16}" + "".join(f"{'-' if med[v][key] is None else med[v][key]:>12}" for v in variants))
    base = med.get("plain", {}).get("total_ms")
    if base:
        print("total / plain   " + "".join(f"{(med[v]['total_ms'] or 0) / base:>12.2f}" for v in variants))
    for v in variants:
        print(f"{v}: disk checks passed {sum(1 for r in runs[v] if r.get('disk_ok'))} of {len(runs[v])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
