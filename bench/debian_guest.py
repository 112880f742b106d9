"""The Debian guest: restore time, time to first answer, request rates, and the outage a client sees for a pause.

    .venv/bin/python bench/debian_guest.py [--runs 3] [--pauses 0.1,0.3,1.0] [--migrations 3] [--json]

Each run restores a fresh guest from the saved booted state (built first
if needed: `sealift image build --guest debian --saved-state`) onto the
lab's VM network (a tap on the source host's bridge), waits until nginx
and redis answer the lab's client, runs the outage client for 2 s
undisturbed (request rates), then for each pause: client running, QMP
`stop`, sleep, `cont`, 1 s more; it reports the longest gap the client saw
and the acknowledged writes lost. Then (``--migrations N``) live
migrations of a restored guest from the source host's bridge to the
destination's, QEMU to QEMU on a unix socket and one shared disk file (no
agents, no storage migration), with the client running. Needs root. Results: docs/benchmarks.md
("The Debian guest").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sealift.backends.qemu.debian_guest import GuestProcess, SavedState, ensure_saved_state, guest_argv, restore_guest
from sealift.backends.qemu.debian_image import build_debian_image
from sealift.lab.client import OutageClient
from sealift.lab.testbed import Testbed

TAP = "sld-tap0"


def one_run(bed: Testbed, state: SavedState, pauses: list[float]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sld-bench-", dir="/tmp"))
    try:
        started = time.monotonic()
        guest, restore_s = restore_guest(state, workdir, TAP, netns=bed.ns("source"))
        try:
            ip = state.shape.guest_ip.split("/")[0]
            OutageClient(ip, netns=bed.ns("client")).wait_ready(30.0)
            first_answer_s = time.monotonic() - started
            steady = OutageClient(ip, netns=bed.ns("client"))
            steady.start()
            time.sleep(2.0)
            quiet = steady.stop()
            paused: list[dict[str, Any]] = []
            for pause in pauses:
                client = OutageClient(ip, netns=bed.ns("client"))
                client.start()
                time.sleep(1.0)
                guest.qmp("stop")
                time.sleep(pause)
                guest.qmp("cont")
                time.sleep(1.0)
                result = client.stop()
                paused.append(
                    {
                        "pause_ms": round(pause * 1000),
                        "longest_gap_ms": result.longest_gap_ms,
                        "failed": result.http_failed + result.redis_failed,
                        "writes_acked": result.writes_acked,
                        "writes_lost": result.writes_lost,
                    }
                )
        finally:
            guest.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "restore_s": round(restore_s, 2),
        "first_answer_s": round(first_answer_s, 2),
        "http_per_s": round(quiet.http_ok / quiet.duration_s, 1),
        "redis_writes_per_s": round(quiet.writes_acked / quiet.duration_s, 1),
        "quiet_longest_gap_ms": quiet.longest_gap_ms,
        "pauses": paused,
    }


def wait_migrated(guest: GuestProcess, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dict(guest.qmp("query-migrate"))
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.05)
    raise RuntimeError(f"the migration did not end in {timeout:.0f} s")


def one_migration(bed: Testbed, state: SavedState) -> dict[str, Any]:
    """A live migration of a guest between the lab's two hosts (shared disk file, QEMU to QEMU over a
    unix socket), with the outage client running: what a user sees of a migration without the agents."""
    workdir = Path(tempfile.mkdtemp(prefix="sld-benchm-", dir="/tmp"))
    try:
        (workdir / "dst").mkdir()
        src, _ = restore_guest(state, workdir, TAP, netns=bed.ns("source"))
        dst: GuestProcess | None = None
        try:
            argv = guest_argv(
                state.image,
                state.shape,
                disk=workdir / "disk.qcow2",  # the source's overlay: shared storage, as on one machine
                tap=TAP,
                console=workdir / "dst" / "console.log",
                qmp=workdir / "dst" / "qmp.sock",
                incoming="defer",
            )
            dst = GuestProcess.start(argv, workdir / "dst", netns=bed.ns("destination"))
            sock = workdir / "migration.sock"
            dst.qmp("migrate-incoming", {"uri": f"unix:{sock}"})
            ip = state.shape.guest_ip.split("/")[0]
            OutageClient(ip, netns=bed.ns("client")).wait_ready(30.0)
            client = OutageClient(ip, netns=bed.ns("client"))
            client.start()
            time.sleep(1.0)
            src.qmp("migrate-set-parameters", {"max-bandwidth": 8 << 30, "downtime-limit": 300})
            src.qmp("migrate", {"uri": f"unix:{sock}"})
            info = wait_migrated(src)
            dst.wait_restored(30.0)
            time.sleep(1.5)
            result = client.stop()
            dst_status = dst.status()
        finally:
            src.kill()
            if dst is not None:
                dst.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "status": info.get("status"),
        "qemu_total_ms": info.get("total-time"),
        "qemu_downtime_ms": info.get("downtime"),
        "destination": dst_status,
        "longest_gap_ms": result.longest_gap_ms,
        "failed": result.http_failed + result.redis_failed,
        "writes_acked": result.writes_acked,
        "writes_lost": result.writes_lost,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pauses", default="0.1,0.3,1.0", help="pauses in seconds, comma-separated")
    parser.add_argument("--migrations", type=int, default=3, help="live migrations between the lab's hosts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    pauses = [float(p) for p in args.pauses.split(",") if p]
    started = time.monotonic()
    state = ensure_saved_state(build_debian_image())
    prepared_s = time.monotonic() - started
    with Testbed(tag="debb") as bed:
        bed.add_tap_everywhere(TAP)
        runs = [one_run(bed, state, pauses) for _ in range(max(1, min(args.runs, 20)))]
        migrations = [one_migration(bed, state) for _ in range(max(0, min(args.migrations, 20)))]
    report = {
        "image": state.image.key,
        "state": state.key,
        "prepare_s": round(prepared_s, 1),
        "boot_to_ready_s": state.boot_seconds,
        "save_s": state.save_seconds,
        "runs": runs,
        "migrations": migrations,
        "restore_s_median": statistics.median(r["restore_s"] for r in runs),
        "first_answer_s_median": statistics.median(r["first_answer_s"] for r in runs),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"image {report['image']}, saved state {report['state']} (boot to ready {state.boot_seconds} s)")
    print("run  restore_s  first_answer_s  http/s  writes/s  " + "  ".join(f"gap@{p * 1000:.0f}ms" for p in pauses))
    for n, r in enumerate(runs, 1):
        gaps = "  ".join(f"{p['longest_gap_ms']:>9.1f}" for p in r["pauses"])
        print(
            f"{n:>3}  {r['restore_s']:>9}  {r['first_answer_s']:>14}  {r['http_per_s']:>6}  "
            f"{r['redis_writes_per_s']:>8}  {gaps}"
        )
    lost = sum(p["writes_lost"] for r in runs for p in r["pauses"])
    print(f"acknowledged writes lost over all pauses: {lost}")
    for n, m in enumerate(migrations, 1):
        print(
            f"migration {n}: {m['status']}, QEMU total {m['qemu_total_ms']} ms, downtime {m['qemu_downtime_ms']} ms; "
            f"client gap {m['longest_gap_ms']} ms, {m['failed']} failed, {m['writes_lost']} of "
            f"{m['writes_acked']} acknowledged writes lost"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
