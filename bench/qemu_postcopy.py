"""Benchmark: a QEMU guest that dirties memory faster than the link, pre-copy against post-copy.

Two real agents on localhost, a fresh guest per run on host-a rewriting
32 MiB at 64 MiB/s, migrated to host-b through the `sealift` transport under
a 16 MiB/s bandwidth limit (so pre-copy cannot converge), then stopped.
Modes alternate within each run (the machine is shared and noisy); the
summary gives medians of the runs that completed.

    .venv/bin/python bench/qemu_postcopy.py --runs 3 [--markdown]

Modes: `precopy` (QEMU's pre-copy with a 40 s completion timeout: the
baseline, expected to give up), `precopy-autoconverge` (pre-copy with
QEMU's auto-converge throttling the guest until it fits), `postcopy-stall`
(switch when the guest outruns the link for 3 passes) and
`postcopy-first-pass` (switch after the first pass). `downtime_ms` is QEMU's
own figure on the source (stop to the end of what it sends while stopped);
`postcopy_s` the time from the switch to the last page.

    .venv/bin/python bench/qemu_postcopy.py --versus-plain --runs 3 [--markdown]

compares `postcopy-first-pass` through sealift with the same post-copy over
plain TCP (`postcopy-first-pass-plain-tcp`): two bare QEMUs on loopback, no
agents, no encryption, QEMU's own return path on its TCP connection, the
same guest, limit (`max-bandwidth` and `max-postcopy-bandwidth`) and switch
after the first pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sealift.agent.client import AgentRequestFailed
from sealift.backends.qemu.image import build_image, default_cache_dir
from sealift.backends.qemu.postcopy import FIRST_PASS_DONE
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.bench.harness import warm_guest_image
from sealift.cluster import LocalCluster, free_port

VM = "pcbench"
CMDLINE = "sealift.mem_mib=32 sealift.rate_mib=64"
LIMIT = 16 << 20
MODES: dict[str, dict[str, object]] = {
    "precopy": {"completion_timeout_s": 40},
    "precopy-autoconverge": {"auto_converge": True, "completion_timeout_s": 40},
    "postcopy-stall": {"postcopy": "on-stall"},
    "postcopy-first-pass": {"postcopy": "after-precopy"},
}
PLAIN = "postcopy-first-pass-plain-tcp"  # bare QEMU to QEMU over TCP (--versus-plain)


def one_run(cluster: LocalCluster, mode: str, memory: str) -> dict[str, object]:
    src = cluster.client("host-a")
    src.request("vm.start", name=VM, backend="qemu", memory=memory, cmdline=CMDLINE)
    deadline = time.monotonic() + 90
    while (src.request("vm.info", name=VM)["vm"].get("counter") or 0) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    options = {"bandwidth_limit_bps": LIMIT, **MODES[mode]}
    started = time.monotonic()
    try:
        report = src.request(
            "migrate", vm=VM, to="host-b", options=options, order=cluster.order(VM, "host-a", "host-b")
        )["report"]
        host = "host-b"
    except AgentRequestFailed as exc:
        report = {"status": "failed", "error": str(exc)[:160], "total_time_s": round(time.monotonic() - started, 1)}
        host = "host-a"
    cluster.client(host).request("vm.stop", name=VM)
    postcopy = report.get("postcopy") or {}
    qemu_downtime = None
    if "stop_reason" in report:
        qemu_downtime = _qemu_downtime(str(report["stop_reason"]))
    return {
        "mode": mode,
        "status": report["status"],
        "total_time_s": report["total_time_s"],
        "passes": report.get("rounds"),
        "downtime_ms": qemu_downtime,
        "postcopy_s": postcopy.get("postcopy_s"),
        "page_requests": postcopy.get("postcopy_requests"),
        "error": report.get("error"),
    }


def plain_run(memory: str) -> dict[str, object]:
    """The same post-copy between two bare QEMUs over plain TCP on loopback (no agents, no encryption)."""
    mib = int(memory.rstrip("Mm"))
    image = build_image(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="slq-pcplain-") as tmp:
        src = QemuVM.start(Path(tmp) / "a", VM, mib, image, extra_cmdline=CMDLINE)
        dst: QemuVM | None = None
        try:
            src.wait_counter(20, 90)
            dst = QemuVM.start(Path(tmp) / "b", VM, mib, image, incoming="defer", extra_cmdline=CMDLINE)
            for vm in (src, dst):
                vm.set_migration_capabilities({"postcopy-ram": True})
            src.set_migration_parameters({"max-bandwidth": LIMIT, "max-postcopy-bandwidth": LIMIT})
            port = free_port()
            dst.migrate_incoming(f"tcp:127.0.0.1:{port}")
            started = time.monotonic()
            src.migrate(f"tcp:127.0.0.1:{port}")
            switched_at: float | None = None
            passes = 0
            while True:
                info = src.query_migrate()
                status = str(info.get("status"))
                passes = int(info.get("ram", {}).get("dirty-sync-count", passes))
                if switched_at is None and status == "active" and passes >= FIRST_PASS_DONE:
                    src.qmp("migrate-start-postcopy")
                    switched_at = time.monotonic()
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() - started > 120:
                    raise QemuError(f"plain post-copy {status}: {src.log_tail()}")
                time.sleep(0.05)
            total = time.monotonic() - started
            done_at = time.monotonic()
            assert switched_at is not None
            counter = dst.wait_counter(0, 30)  # the guest runs on at the destination
            return {
                "mode": PLAIN,
                "status": "completed" if counter else "failed",
                "total_time_s": round(total, 3),
                "passes": passes,
                "downtime_ms": info.get("downtime"),
                "postcopy_s": round(done_at - switched_at, 3),
                "page_requests": info.get("ram", {}).get("postcopy-requests"),
                "error": None,
            }
        finally:
            for vm in (src, dst):
                if vm is not None:
                    try:
                        vm.kill()
                    except QemuError:
                        pass


def _qemu_downtime(stop_reason: str) -> float | None:
    marker = "downtime "
    if marker not in stop_reason:
        return None
    text = stop_reason.split(marker, 1)[1].split(" ", 1)[0]
    return float(text) if text.replace(".", "", 1).isdigit() else None


def summary(results: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for mode in dict.fromkeys(str(r["mode"]) for r in results):
        runs = [r for r in results if r["mode"] == mode]
        done = [r for r in runs if r["status"] == "completed"]

        def median(key: str, rows: list[dict[str, object]] = done) -> float | None:
            values = [float(r[key]) for r in rows if r.get(key) is not None]  # type: ignore[arg-type]
            return round(statistics.median(values), 3) if values else None

        out[mode] = {
            "completed": f"{len(done)}/{len(runs)}",
            "total_time_s": median("total_time_s"),
            "passes": median("passes"),
            "downtime_ms": median("downtime_ms"),
            "postcopy_s": median("postcopy_s"),
            "page_requests": median("page_requests"),
            "failed_after_s": median("total_time_s", [r for r in runs if r["status"] != "completed"]),
        }
    return out


def markdown(table: dict[str, dict[str, object]]) -> str:
    keys = ["completed", "total_time_s", "passes", "downtime_ms", "postcopy_s", "page_requests", "failed_after_s"]
    lines = ["| mode | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for mode, row in table.items():
        lines.append(f"| {mode} | " + " | ".join("" if row[k] is None else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--versus-plain", action="store_true", help="post-copy through sealift beside plain TCP")
    args = parser.parse_args()
    modes_of_run = ["postcopy-first-pass", PLAIN] if args.versus_plain else list(MODES)
    cluster = LocalCluster(extra_config="step_timeout_s = 20")
    results: list[dict[str, object]] = []
    try:
        cluster.start()
        warm_guest_image(cluster, "host-a")
        for run in range(args.runs):
            modes = modes_of_run if run % 2 == 0 else list(reversed(modes_of_run))
            for mode in modes:
                result = plain_run(args.memory) if mode == PLAIN else one_run(cluster, mode, args.memory)
                print(json.dumps(result), file=sys.stderr, flush=True)
                results.append(result)
    finally:
        cluster.stop_guests()
        cluster.cleanup()
    table = summary(results)
    print(markdown(table) if args.markdown else json.dumps({"runs": results, "summary": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
