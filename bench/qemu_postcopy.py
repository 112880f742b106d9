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

    .venv/bin/python bench/qemu_postcopy.py --matrix [--guests 1G:stress:3,4G:heavy:1] [--runs 3] [--markdown]

is issue 20's comparison: for each guest (a 1 GiB `stress` guest: 60 % of its
memory written, then rewritten at 128 MiB/s; a 4 GiB `heavy` one: the same
at 128 MiB/s over 60 % of 4 GiB), pre-copy and post-copy, each through
sealift and over plain TCP (bare QEMUs), under one 64 MiB/s limit, so that
the guest outruns the link. Pre-copy gives up at its completion timeout
(the bound); post-copy switches after the first pass. Besides total time,
QEMU's downtime and the post-copy seconds, each run gives the guest's
slowdown during post-copy from its own progress: the workload's counter
rate (ticks of 10 ms of work) from the switch to the last page, divided by
its rate measured for 3 s before the migration. The workload catches up on
up to 1 s of ticks it fell behind on (the downtime's included), so a ratio
near or above 1 means the guest kept up; below, it lost that share of its
work during post-copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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


# -- issue 20's matrix: pre-copy and post-copy, through sealift and over plain TCP ----------------------------

MATRIX_LIMIT = 64 << 20  # both paths: QEMU's max-bandwidth (and max-postcopy-bandwidth)
GUEST_RATE_MIB = {"stress": 128, "heavy": 128}  # the workload's dirty rate: twice the limit
GUEST_FILL = 0.6  # of the guest's memory, written and then rewritten in turn (bench/harness.py's QEMU cells)
RATE_SAMPLE_S = 3.0
MATRIX_MODES = ("precopy-sealift", "precopy-plain", "postcopy-sealift", "postcopy-plain")


def guest_cmdline(memory: str, kind: str) -> str:
    mib = _mib(memory)
    return f"sealift.mem_mib={int(mib * GUEST_FILL)} sealift.rate_mib={GUEST_RATE_MIB[kind]}"


def completion_timeout_s(memory: str) -> float:
    """Pre-copy's bound: about four passes over the written memory at the limit, at least 60 s."""
    return max(60.0, 4 * _mib(memory) * GUEST_FILL * (1 << 20) / MATRIX_LIMIT)


def _mib(memory: str) -> int:
    text = memory.upper().rstrip("B")
    return int(text[:-1]) * 1024 if text.endswith("G") else int(text.rstrip("M"))


def _rate(read: Callable[[], int | None], seconds: float) -> float | None:
    """The workload's counter rate (per second) over `seconds`, read through `read`."""
    first, started = read(), time.monotonic()
    time.sleep(seconds)
    last = read()
    if first is None or last is None:
        return None
    return (last - first) / (time.monotonic() - started)


def matrix_sealift_run(cluster: LocalCluster, memory: str, kind: str, postcopy: bool) -> dict[str, object]:
    """One migration through two agents (`sealift` transport): pre-copy bounded by its timeout, or post-copy."""
    src = cluster.client("host-a")
    src.request("vm.start", name=VM, backend="qemu", memory=memory, cmdline=guest_cmdline(memory, kind))
    deadline = time.monotonic() + 120
    while (src.request("vm.info", name=VM)["vm"].get("counter") or 0) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    before = _rate(lambda: src.request("vm.info", name=VM)["vm"].get("counter"), RATE_SAMPLE_S)
    options: dict[str, object] = {"bandwidth_limit_bps": MATRIX_LIMIT}
    options.update(
        {"postcopy": "after-precopy"} if postcopy else {"completion_timeout_s": completion_timeout_s(memory)}
    )
    switched: list[float] = []
    at_switch: list[int | None] = []

    def on_event(event: dict) -> None:
        # Sent just before migrate-start-postcopy: the counter now is the one at the switch, read as the plain
        # run reads it (the console's last line), and not counter_at_pause, read before the decision's round trip.
        if event.get("phase") == "postcopy-active" and not switched:
            at_switch.append(src.request("vm.info", name=VM)["vm"].get("counter"))
            switched.append(time.monotonic())

    started = time.monotonic()
    try:
        order = cluster.order(VM, "host-a", "host-b")
        report = src.request("migrate", vm=VM, to="host-b", options=options, order=order, on_event=on_event)["report"]
        host = "host-b"
    except AgentRequestFailed as exc:
        report = {"status": "failed", "error": str(exc)[:160], "total_time_s": round(time.monotonic() - started, 1)}
        host = "host-a"
    ended = time.monotonic()
    after = cluster.client(host).request("vm.info", name=VM)["vm"].get("counter")
    cluster.client(host).request("vm.stop", name=VM)
    pc = report.get("postcopy") or {}
    during = None
    if switched and after is not None and at_switch[0] is not None:
        during = (after - at_switch[0]) / (ended - switched[0])
    return _matrix_row(
        memory,
        kind,
        "postcopy-sealift" if postcopy else "precopy-sealift",
        report["status"],
        report["total_time_s"],
        _qemu_downtime(str(report.get("stop_reason", ""))),
        pc.get("postcopy_s"),
        before,
        during,
        report.get("error"),
    )


def matrix_plain_run(memory: str, kind: str, postcopy: bool) -> dict[str, object]:
    """The same migration between two bare QEMUs over TCP on loopback (no agents, no encryption)."""
    mib, cmdline = _mib(memory), guest_cmdline(memory, kind)
    image = build_image(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="slq-pcplain-") as tmp:
        src = QemuVM.start(Path(tmp) / "a", VM, mib, image, extra_cmdline=cmdline)
        dst: QemuVM | None = None
        try:
            src.wait_counter(20, 120)
            before = _rate(src.counter, RATE_SAMPLE_S)
            dst = QemuVM.start(Path(tmp) / "b", VM, mib, image, incoming="defer", extra_cmdline=cmdline)
            for vm in (src, dst):
                vm.set_migration_capabilities({"postcopy-ram": postcopy})
            src.set_migration_parameters({"max-bandwidth": MATRIX_LIMIT, "max-postcopy-bandwidth": MATRIX_LIMIT})
            port = free_port()
            dst.migrate_incoming(f"tcp:127.0.0.1:{port}")
            limit_s = None if postcopy else completion_timeout_s(memory)
            started = time.monotonic()
            src.migrate(f"tcp:127.0.0.1:{port}")
            switched_at: float | None = None
            at_switch: int | None = None
            while True:
                info = src.query_migrate()
                status = str(info.get("status"))
                passes = int(info.get("ram", {}).get("dirty-sync-count", 0))
                if postcopy and switched_at is None and status == "active" and passes >= FIRST_PASS_DONE:
                    at_switch = src.counter()
                    src.qmp("migrate-start-postcopy")
                    switched_at = time.monotonic()
                if status == "completed":
                    break
                if limit_s is not None and time.monotonic() - started > limit_s and status == "active":
                    src.migrate_cancel()  # pre-copy's bound, as the agents' completion timeout
                    return _matrix_row(
                        memory,
                        kind,
                        "precopy-plain",
                        "failed",
                        round(time.monotonic() - started, 3),
                        None,
                        None,
                        before,
                        None,
                        "completion timeout",
                    )
                if status in ("failed", "cancelled") or time.monotonic() - started > 600:
                    raise QemuError(f"plain migration {status}: {src.log_tail()}")
                time.sleep(0.05)
            ended = time.monotonic()
            after = dst.wait_counter(0, 30)
            info = src.query_migrate()
            during = None
            if switched_at is not None and at_switch is not None:
                during = (after - at_switch) / (ended - switched_at)
            return _matrix_row(
                memory,
                kind,
                "postcopy-plain" if postcopy else "precopy-plain",
                "completed",
                round(ended - started, 3),
                info.get("downtime"),
                round(ended - switched_at, 3) if switched_at is not None else None,
                before,
                during,
                None,
            )
        finally:
            for vm in (src, dst):
                if vm is not None:
                    try:
                        vm.kill()
                    except QemuError:
                        pass


def _matrix_row(
    memory: str,
    kind: str,
    mode: str,
    status: str,
    total: object,
    downtime: object,
    postcopy_s: object,
    before: float | None,
    during: float | None,
    error: object,
) -> dict[str, object]:
    return {
        "guest": f"{memory} {kind}",
        "mode": mode,
        "status": status,
        "total_time_s": total,
        "downtime_ms": downtime,
        "postcopy_s": postcopy_s,
        "rate_before": None if before is None else round(before, 1),
        "rate_postcopy": None if during is None else round(during, 1),
        # the guest's own progress during post-copy against before the migration (1.0: not slowed)
        "progress_ratio": None if before is None or during is None or not before else round(during / before, 3),
        "error": error,
    }


def matrix_summary(results: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for key in dict.fromkeys(f"{r['guest']} | {r['mode']}" for r in results):
        runs = [r for r in results if f"{r['guest']} | {r['mode']}" == key]
        done = [r for r in runs if r["status"] == "completed"]

        def median(field: str, rows: list[dict[str, object]] = done) -> float | None:
            values = [float(r[field]) for r in rows if r.get(field) is not None]  # type: ignore[arg-type]
            return round(statistics.median(values), 3) if values else None

        out[key] = {
            "completed": f"{len(done)}/{len(runs)}",
            "total_time_s": median("total_time_s"),
            "downtime_ms": median("downtime_ms"),
            "postcopy_s": median("postcopy_s"),
            "progress_ratio": median("progress_ratio"),
            "gave_up_after_s": median("total_time_s", [r for r in runs if r["status"] != "completed"]),
        }
    for guest in dict.fromkeys(str(r["guest"]) for r in results):  # post-copy: sealift against plain TCP
        ours, plain = out.get(f"{guest} | postcopy-sealift"), out.get(f"{guest} | postcopy-plain")
        if ours and plain and ours["total_time_s"] and plain["total_time_s"]:
            ours["ratio_to_plain"] = round(float(ours["total_time_s"]) / float(plain["total_time_s"]), 3)  # type: ignore[arg-type]
    return out


def matrix_markdown(table: dict[str, dict[str, object]]) -> str:
    keys = ["completed", "total_time_s", "downtime_ms", "postcopy_s", "progress_ratio", "gave_up_after_s"]
    lines = ["| guest | mode | " + " | ".join(keys) + " | x plain |", "|---" * (len(keys) + 3) + "|"]
    for key, row in table.items():
        cells = " | ".join("" if row[k] is None else str(row[k]) for k in keys)
        lines.append(f"| {key} | {cells} | {row.get('ratio_to_plain', '')} |")
    return "\n".join(lines)


def run_matrix(guests: list[tuple[str, str, int]]) -> list[dict[str, object]]:
    """Every mode for every guest, its number of runs, modes alternating their order from run to run."""
    cluster = LocalCluster(extra_config="step_timeout_s = 30")
    results: list[dict[str, object]] = []
    try:
        cluster.start()
        warm_guest_image(cluster, "host-a")
        for memory, kind, runs in guests:
            for run in range(runs):
                modes = MATRIX_MODES if run % 2 == 0 else tuple(reversed(MATRIX_MODES))
                for mode in modes:
                    postcopy = mode.startswith("postcopy")
                    if mode.endswith("plain"):
                        result = matrix_plain_run(memory, kind, postcopy)
                    else:
                        result = matrix_sealift_run(cluster, memory, kind, postcopy)
                    print(json.dumps(result), file=sys.stderr, flush=True)
                    results.append(result)
    finally:
        cluster.stop_guests()
        cluster.cleanup()
    return results


def _guest_spec(text: str, runs: int) -> tuple[str, str, int]:
    parts = text.split(":")
    return parts[0], parts[1], int(parts[2]) if len(parts) > 2 else runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--versus-plain", action="store_true", help="post-copy through sealift beside plain TCP")
    parser.add_argument("--matrix", action="store_true", help="issue 20: pre-copy and post-copy, sealift and plain")
    parser.add_argument(
        "--guests",
        default="1G:stress,4G:heavy",
        help="--matrix: MEMORY:KIND[:RUNS],... (KIND stress or heavy; RUNS default --runs)",
    )
    args = parser.parse_args()
    if args.matrix:
        guests = [_guest_spec(part, args.runs) for part in args.guests.split(",") if part]
        results = run_matrix(guests)
        table = matrix_summary(results)
        print(matrix_markdown(table) if args.markdown else json.dumps({"runs": results, "summary": table}, indent=1))
        return 0
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
