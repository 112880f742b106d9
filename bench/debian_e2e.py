"""Benchmark: what a client of the Debian guest sees of a secure migration with its disk, beside bare QEMU.

    .venv/bin/python bench/debian_e2e.py [--runs 3] [--json]

sealift: the end-to-end story of lab/debian_migration.py per run (a fresh
lab, two agents, `vm start --guest debian` from the saved state, its own
qcow2 disk copied through the sealed disk stream, the outage client during
the migration). Baseline, side by side: bench/debian_guest.py's
`one_migration` (QEMU to QEMU over a unix socket between the lab's hosts,
one shared disk file, no agents, no encryption, no disk copy), with the
same client. Medians of the client-seen outage, failed requests, writes
lost, QEMU/agent downtime and total time. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from debian_guest import TAP, one_migration  # the baseline (bench/ is on sys.path when run as a script)

from sealift.backends.qemu.debian_guest import ensure_saved_state
from sealift.backends.qemu.debian_image import build_debian_image
from sealift.lab.debian_migration import run_debian_migration
from sealift.lab.testbed import Testbed


def sealift_run() -> dict[str, Any]:
    run = run_debian_migration()
    report, outage = run.report, run.outage
    return {
        "status": report["status"],
        "total_ms": round(report["total_time_s"] * 1000, 1),
        "downtime_ms": report["downtime_ms"],
        "disk_bytes_sent": report["disk_bytes_sent"],
        "longest_gap_ms": outage.longest_gap_ms,
        "failed": outage.http_failed + outage.redis_failed,
        "writes_acked": outage.writes_acked,
        "writes_lost": outage.writes_lost,
        "disk_ok": run.disk.ok,
    }


def baseline_runs(count: int) -> list[dict[str, Any]]:
    state = ensure_saved_state(build_debian_image())
    with Testbed(tag="sleb") as bed:
        bed.add_tap_everywhere(TAP)
        runs = [one_migration(bed, state) for _ in range(count)]
    return [
        {
            "status": r["status"],
            "total_ms": r["qemu_total_ms"],
            "downtime_ms": r["qemu_downtime_ms"],
            "disk_bytes_sent": 0,
            "longest_gap_ms": r["longest_gap_ms"],
            "failed": r["failed"],
            "writes_acked": r["writes_acked"],
            "writes_lost": r["writes_lost"],
            "disk_ok": None,
        }
        for r in runs
    ]


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("total_ms", "downtime_ms", "disk_bytes_sent", "longest_gap_ms", "failed", "writes_lost")
    return {key: statistics.median(float(r[key] or 0) for r in runs) for key in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    count = max(1, min(args.runs, 20))
    ours = [sealift_run() for _ in range(count)]
    bare = baseline_runs(count)
    result = {"sealift": ours, "bare_qemu": bare, "medians": {"sealift": medians(ours), "bare_qemu": medians(bare)}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'median of ' + str(count) + ' runs':<22}{'sealift (disk copied)':>24}{'bare QEMU (shared disk)':>26}")
    for key in medians(ours):
        print(f"{key:<22}{result['medians']['sealift'][key]:>24.1f}{result['medians']['bare_qemu'][key]:>26.1f}")
    print(f"disk checks passed: {sum(1 for r in ours if r['disk_ok'])} of {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
