"""Benchmark: a real QEMU guest migrated between two agents, per transport.

Two real agents on localhost (allow_insecure so that the plaintext baselines
can run), a fresh guest per run booted on host-a with a memory-writing
workload, migrated to host-b, stopped. Transports alternate within each run
(the machine is shared and noisy); the summary gives medians.

    .venv/bin/python bench/qemu_migration.py --memory 256M --runs 1          # quick check
    .venv/bin/python bench/qemu_migration.py --memory 1G --runs 3 --markdown # the docs/benchmarks.md table

Transports: `sealift` (QEMU's stream as AEAD records on the agents' data
stream), `qemu-tls` (QEMU's native TLS straight to the destination QEMU),
`plain` (QEMU over TCP in clear), `sealift-plain` (the agents' data stream
without encryption), `sealift-multifd` (sealift with QEMU's multifd, 2
channels, each on a data stream of its own). `--multifd-channels N` applies
to qemu-tls and plain.

`total_time_s` is the agent's (order check to running receipt); `downtime_ms`
runs from QEMU's STOP event on the source to the destination's running
receipt (so it includes the pre-switchover check, the manifest, the prepared
receipt, the durable commit decision and `cont`); `qemu_downtime_ms` is
QEMU's own figure on the source (stop to completion of the stream);
`guest_ok_after` says whether the guest still ran and counted 3 s after
the migration (QEMU 7.2 under TCG loses pages when a migration needs a
second live pass; see docs/architecture.md); `transferred_mib` is what went on the wire (AEAD records for sealift, QEMU's
own count for the direct transports). CPU seconds are read from /proc for
every process involved, from the migration request to its report: both
agents and both QEMUs (a TCG QEMU also burns CPU running its guest, the same
for every transport).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from sealift.bench.harness import warm_guest_image
from sealift.cluster import LocalCluster

VM = "bench"
TRANSPORTS = {
    "sealift": {"secure": True, "transport": "sealift"},
    "qemu-tls": {"secure": True, "transport": "qemu-tls"},
    "plain": {"secure": False, "transport": "plain"},
    "sealift-plain": {"secure": False, "transport": "sealift-plain"},
    # multifd through the agents' channel: QEMU's 2 multifd channels, each on a data stream of its own
    "sealift-multifd": {"secure": True, "transport": "sealift", "multifd_channels": 2},
}
DIRECT = ("qemu-tls", "plain")
GUEST_CHECK_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


class CpuSampler:
    """Samples the CPU time of the agents and of every QEMU under the cluster's VM directory.

    A source QEMU exits right after the migration: its last sample is kept.
    """

    INTERVAL_S = 0.1

    def __init__(self, agents: dict[str, int], vm_root: Path) -> None:
        self._needle = str(vm_root).encode()
        self.roles: dict[int, str] = {pid: f"agent_{host}" for host, pid in agents.items()}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._find_qemus(initial=True)
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _find_qemus(self, initial: bool = False) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self.roles:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and self._needle in cmdline:
                host = "host-a" if b"/host-a/" in cmdline else "host-b"
                self.roles[int(entry.name)] = f"qemu_{host}"
                if not initial:
                    self.first[int(entry.name)] = 0.0  # born during the migration: all its CPU counts

    def _sample(self) -> None:
        for pid in self.roles:
            value = cpu_seconds(pid)
            if value is not None:
                self.first.setdefault(pid, value)
                self.last[pid] = value

    def _run(self) -> None:
        rounds = 0
        while not self._stop.wait(self.INTERVAL_S):
            if rounds % 3 == 0:
                self._find_qemus()
            self._sample()
            rounds += 1

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        used: dict[str, float] = {}
        for pid, role in self.roles.items():
            if pid in self.last:
                used[role] = round(used.get(role, 0.0) + self.last[pid] - self.first.get(pid, 0.0), 2)
        used["total"] = round(sum(used.values()), 2)
        return used


def _still_running(cluster: LocalCluster, host: str, seconds: float) -> bool:
    """Whether the migrated guest still runs and counts a few seconds later (QEMU 7.2 TCG can lose pages)."""
    first = cluster.client(host).request("vm.info", name=VM)["vm"]
    time.sleep(seconds)
    last = cluster.client(host).request("vm.info", name=VM)["vm"]
    return last["status"] == "running" and (last.get("counter") or 0) > (first.get("counter") or 0)


def _wait_counter(cluster: LocalCluster, host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (cluster.client(host).request("vm.info", name=VM)["vm"].get("counter") or 0) > 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"guest did not boot within {timeout:.0f} s")


def migrate_once(
    cluster: LocalCluster, memory: str, transport: str, cmdline: str, warmup_s: float, multifd: int
) -> dict:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    src.request("vm.start", name=VM, backend="qemu", memory=memory, cmdline=cmdline)
    options = dict(TRANSPORTS[transport])
    if multifd and transport in DIRECT:
        options["multifd_channels"] = multifd
    try:
        _wait_counter(cluster, "host-a", 120)
        time.sleep(warmup_s)
        agents = {h: a.process.pid for h, a in cluster.agents.items() if a.process is not None}
        sampler = CpuSampler(agents, cluster.vm_root)
        try:
            report = cluster.migrate(VM, "host-a", "host-b", options=options)
        finally:
            cpu = sampler.stop()
        guest_ok = _still_running(cluster, "host-b", GUEST_CHECK_S)
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
        "transferred_mib": round(report["bytes_sent"] / 2**20, 1),
        "rounds": report["rounds"],
        "cpu_s": cpu,
        "guest_ok_after": guest_ok,
        "stop_reason": report["stop_reason"],
        "downtime_breakdown_ms": report.get("downtime_breakdown_ms") or {},  # the handover's steps since the pause
    }


def summarize(results: list[dict]) -> dict:
    roles = sorted({role for r in results for role in r["cpu_s"]})
    return {
        "runs": len(results),
        "total_time_s": statistics.median(r["total_time_s"] for r in results),
        "downtime_ms": statistics.median(r["downtime_ms"] for r in results),
        "qemu_downtime_ms": statistics.median(r["qemu_downtime_ms"] or 0 for r in results),
        "transferred_mib": statistics.median(r["transferred_mib"] for r in results),
        "guest_ok_after": sum(1 for r in results if r["guest_ok_after"]),
        "cpu_s": {role: round(statistics.median(r["cpu_s"].get(role, 0.0) for r in results), 2) for role in roles},
        "results": results,
    }


def markdown(memory: str, summary: dict[str, dict], multifd: int) -> str:
    lines = [
        f"QEMU guest {memory} (TCG), medians of {max(s['runs'] for s in summary.values())}"
        + (f", multifd {multifd} channels on the direct transports" if multifd else ""),
        "",
        "| transport | total s | downtime ms | QEMU downtime ms | transferred MiB | CPU s agents (a/b) | CPU s QEMU (a/b) | CPU s total | guest alive after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for transport, s in summary.items():
        cpu = s["cpu_s"]
        lines.append(
            f"| {transport} | {s['total_time_s']:.2f} | {s['downtime_ms']:.0f} | {s['qemu_downtime_ms']:.0f} | "
            f"{s['transferred_mib']:.0f} | {cpu.get('agent_host-a', 0):.2f} / {cpu.get('agent_host-b', 0):.2f} | "
            f"{cpu.get('qemu_host-a', 0):.2f} / {cpu.get('qemu_host-b', 0):.2f} | {cpu.get('total', 0):.2f} | "
            f"{s['guest_ok_after']}/{s['runs']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transports", default="sealift,qemu-tls,plain")
    parser.add_argument("--cmdline", help="guest workload settings (default: half the memory, 32 MiB/s)")
    parser.add_argument("--multifd-channels", type=int, default=0, help="for qemu-tls and plain")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    args = parser.parse_args()
    transports = [t for t in args.transports.split(",") if t]
    unknown = [t for t in transports if t not in TRANSPORTS]
    if unknown:
        parser.error(f"unknown transports {unknown}; use {sorted(TRANSPORTS)}")
    from sealift.host.config import parse_size

    memory_mib = parse_size(args.memory) >> 20
    cmdline = args.cmdline or f"sealift.mem_mib={memory_mib // 2} sealift.rate_mib=32"
    results: dict[str, list[dict]] = {t: [] for t in transports}
    cluster = LocalCluster(allow_insecure=True)
    try:
        cluster.start()
        warm_guest_image(cluster, "host-b")  # else the first migration pays the destination's image lookup (~1.2 s)
        for run in range(args.runs):
            order = transports if run % 2 == 0 else list(reversed(transports))
            for transport in order:
                result = migrate_once(cluster, args.memory, transport, cmdline, args.warmup, args.multifd_channels)
                results[transport].append(result)
                if not args.json:
                    print(
                        f"run {run} {transport:13s} total {result['total_time_s']:.2f} s, downtime "
                        f"{result['downtime_ms']:.0f} ms (QEMU {result['qemu_downtime_ms']} ms), "
                        f"{result['transferred_mib']:.0f} MiB, CPU {result['cpu_s']}, guest ok {result['guest_ok_after']}",
                        file=sys.stderr,
                    )
    finally:
        cluster.cleanup()
    summary = {t: summarize(rs) for t, rs in results.items() if rs}
    if args.json:
        print(
            json.dumps(
                {
                    "memory": args.memory,
                    "cmdline": cmdline,
                    "multifd_channels": args.multifd_channels,
                    "transports": summary,
                },
                indent=2,
            )
        )
    elif args.markdown:
        print(markdown(args.memory, summary, args.multifd_channels))
    else:
        for t, s in summary.items():
            print(
                f"{args.memory} {t:13s}: total {s['total_time_s']:.2f} s, downtime {s['downtime_ms']:.0f} ms "
                f"(QEMU {s['qemu_downtime_ms']:.0f} ms), {s['transferred_mib']:.0f} MiB, "
                f"CPU {s['cpu_s']}, median of {s['runs']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
