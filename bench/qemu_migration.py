"""Benchmark: a real QEMU guest migrated between two agents, per transport.

Two real agents on localhost (allow_insecure so that the plaintext baseline
can run), a fresh guest per run booted on host-a, migrated to host-b, stopped.
Transports alternate within each run (the machine is shared and noisy).

    .venv/bin/python bench/qemu_migration.py                       # 256M, 3 runs, sealift and plain
    .venv/bin/python bench/qemu_migration.py --runs 1 --json

`total_time_s` is the agent's (order check to running receipt); `downtime_ms`
runs from QEMU's STOP event on the source to the destination's running
receipt (so it includes the pre-switchover check, the manifest, the prepared
receipt, the durable commit decision and `cont`); `qemu_downtime_ms` is
QEMU's own figure on the source (stop to completion of the stream).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

from sealift.cluster import LocalCluster

VM = "bench"
TRANSPORTS = {"sealift": {"secure": True}, "plain": {"secure": False, "transport": "plain"}}


def _wait_counter(cluster: LocalCluster, host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (cluster.client(host).request("vm.info", name=VM)["vm"].get("counter") or 0) > 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"guest did not boot within {timeout:.0f} s")


def migrate_once(cluster: LocalCluster, memory: str, transport: str, cmdline: str, warmup_s: float) -> dict:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    src.request("vm.start", name=VM, backend="qemu", memory=memory, cmdline=cmdline)
    try:
        _wait_counter(cluster, "host-a", 90)
        time.sleep(warmup_s)
        report = cluster.migrate(VM, "host-a", "host-b", options=TRANSPORTS[transport])
    finally:
        for client in (src, dst):
            if VM in [v["name"] for v in client.request("vm.list")["vms"]]:
                client.request("vm.stop", name=VM)
    qemu_downtime = re.search(r"downtime (\d+) ms", report.get("stop_reason", ""))
    return {
        "transport": report["transport"],
        "total_time_s": report["total_time_s"],
        "downtime_ms": report["downtime_ms"],
        "qemu_downtime_ms": int(qemu_downtime.group(1)) if qemu_downtime else None,
        "bytes_sent": report["bytes_sent"],
        "rounds": report["rounds"],
        "source_cpu_s": report["source_cpu_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transports", default="sealift,plain")
    parser.add_argument("--cmdline", default="sealift.mem_mib=64 sealift.rate_mib=16", help="guest workload settings")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    transports = [t for t in args.transports.split(",") if t]
    results: dict[str, list[dict]] = {t: [] for t in transports}
    cluster = LocalCluster(allow_insecure=True)
    try:
        cluster.start()
        for run in range(args.runs):
            order = transports if run % 2 == 0 else list(reversed(transports))
            for transport in order:
                result = migrate_once(cluster, args.memory, transport, args.cmdline, args.warmup)
                results[transport].append(result)
                if not args.json:
                    print(f"run {run} {transport:8s} total {result['total_time_s']:.2f} s, downtime "
                          f"{result['downtime_ms']:.0f} ms (QEMU {result['qemu_downtime_ms']} ms), "
                          f"{result['bytes_sent'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip
    finally:
        cluster.cleanup()
    summary = {
        t: {
            "runs": len(rs),
            "total_time_s_median": statistics.median(r["total_time_s"] for r in rs),
            "downtime_ms_median": statistics.median(r["downtime_ms"] for r in rs),
            "qemu_downtime_ms_median": statistics.median(r["qemu_downtime_ms"] or 0 for r in rs),
            "results": rs,
        }
        for t, rs in results.items()
        if rs
    }
    if args.json:
        print(json.dumps({"memory": args.memory, "transports": summary}, indent=2))
    else:
        for t, s in summary.items():
            print(f"{args.memory} {t:8s}: total {s['total_time_s_median']:.2f} s, downtime {s['downtime_ms_median']:.0f} ms "
                  f"(QEMU {s['qemu_downtime_ms_median']:.0f} ms), median of {s['runs']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
