"""T12: a VM driven into abnormal behaviour, flagged by the monitors, and held where it is.

The guest on host-a runs a modest workload long enough for host-a's monitor
(sealift.monitor) to learn its normal behaviour; then the lab switches it to
the `stress` profile (every page written as fast as it can: a write storm
that hammers the host's memory, with the CPU to match), as a compromised VM
would behave. The monitor must flag it *attacker* from the outside signals
alone (CPU, dirty rate), audit the verdict, and refuse to move it to another
host (`vm_flagged_attacker`): a compromised VM is not spread.

The baseline is the same storm on agents with the monitor switched off
(`[monitor] enabled = false`: no sampling, no verdicts), as on hosts without
seed 004's monitors: the storming VM migrates like any other.

Both backends, through the same `vm.workload` request: a built-in guest is
restarted with the `stress` profile; a QEMU guest keeps running and its
workload is told to storm over its control channel (the token the agent
gave it at boot; backends/qemu/guest_control.py), so the QEMU process and
its pid stay the same and only its behaviour changes.
"""

from __future__ import annotations

import time

from sealift.cluster import LocalCluster
from sealift.lab.attacks.admission import ask_source, audit_head, audit_since, clip, entry_ref
from sealift.lab.attacks.base import AttackResult, Baseline, attack
from sealift.lab.session import Backend, LabSession

VM = "vm1"
# Sample twice a second and judge after 10 samples, so the attack takes seconds, not minutes;
# everything else is the shipped behaviour. Dotted keys: the lab's top-level keys follow these lines.
FAST_MONITOR = "monitor.period_s = 0.5\nmonitor.warmup_samples = 10\nmonitor.clear_after_samples = 6"
MONITOR_OFF = "monitor.enabled = false"
WARM_SAMPLES = 12
WARM_TIMEOUT_S = 30.0
VERDICT_TIMEOUT_S = 25.0
BASELINE_STORM_S = 2.0  # how long the baseline's VM storms before the migration is tried


def _row(cluster: LocalCluster, host: str, vm: str) -> dict | None:
    rows = cluster.client(host).request("monitor.snapshot")["monitor"]["vms"]
    return next((row for row in rows if row["vm"] == vm), None)


def _wait(predicate, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    return None


def _storm_baseline(run: LabSession, backend: Backend) -> tuple[Baseline, dict]:
    """The storm on agents without monitors: does the VM move? ("succeeded" if it did)."""
    cluster = run.cluster(backend, host_config={"host-a": MONITOR_OFF, "host-b": MONITOR_OFF})
    run.start_vm(cluster, "host-a", VM, backend, workload="web")
    cluster.client("host-a").request("vm.workload", name=VM, profile="stress")
    time.sleep(BASELINE_STORM_S)
    migrated, error = ask_source(cluster, VM, "host-b", cluster.order(VM, "host-a", "host-b"))
    copies = run.copies(cluster, VM)
    cluster.stop()
    outcome: Baseline = "succeeded" if migrated and copies.get("host-b") == "running" else "blocked"
    return outcome, {
        "migrated": migrated,
        "error": error,
        "copies": copies,
        "setup": "the same agents with [monitor] enabled = false",
    }


@attack("T12", "a VM driven into a write storm is flagged attacker and held", backends=("builtin", "qemu"))
def write_storm(run: LabSession, backend: Backend) -> list[AttackResult]:
    baseline, baseline_details = _storm_baseline(run, backend)

    cluster = run.cluster(backend, host_config={"host-a": FAST_MONITOR, "host-b": FAST_MONITOR})
    run.start_vm(cluster, "host-a", VM, backend, workload="web")
    warm = _wait(
        lambda: (r := _row(cluster, "host-a", VM)) and r["warm"] and r["samples"] >= WARM_SAMPLES and r, WARM_TIMEOUT_S
    )
    quiet_verdict = warm.get("verdict") if isinstance(warm, dict) else "never warm"
    head = audit_head(cluster, "host-a")
    switched = cluster.client("host-a").request("vm.workload", name=VM, profile="stress")["vm"]
    started = time.monotonic()
    # The attacker verdict, not the first one: a QEMU guest's dirty rate is measured over a second
    # and reported a round later, so its CPU alone may be judged "anomalous" just before.
    flagged = _wait(
        lambda: (r := _row(cluster, "host-a", VM)) and r["verdict"] and r["verdict"]["kind"] == "attacker" and r,
        VERDICT_TIMEOUT_S,
    )
    flag_s = round(time.monotonic() - started, 1)
    last_row = flagged if isinstance(flagged, dict) else _row(cluster, "host-a", VM)  # what the monitor saw
    verdict = last_row["verdict"] if isinstance(last_row, dict) else None
    migrated, error = ask_source(cluster, VM, "host-b", cluster.order(VM, "host-a", "host-b"))
    copies = run.copies(cluster, VM)
    verdicts = audit_since(cluster, "host-a", head, "monitor.verdict")
    actions = audit_since(cluster, "host-a", head, "monitor.action")
    refusals = audit_since(cluster, "host-a", head, "monitor.migration_refused")
    attacker = bool(verdict and verdict.get("kind") == "attacker")
    held = (
        not migrated and "vm_flagged_attacker" in error and copies.get("host-a") == "running" and "host-b" not in copies
    )
    baseline_said = (
        "migration completed, the storming VM runs on host-b"
        if baseline_details["migrated"]
        else f"migration refused: {clip(str(baseline_details['error']), 100)}"
    )
    deviations = ", ".join(f"{d['signal']} x{d['ratio']} (z={d['z']})" for d in (verdict or {}).get("deviations", []))
    return [
        AttackResult(
            threat="T12",
            attack=f"{VM} switched from 'web' to a write storm ('stress'), then ordered to host-b",
            backend=backend,
            baseline=baseline,
            sealift="blocked" if quiet_verdict is None and attacker and held else "succeeded",
            evidence=(
                f"baseline (no monitor): {baseline_said}; "
                f"sealift: verdict {verdict.get('kind') if verdict else None} after {flag_s} s ({deviations}); "
                f"migration refused: {clip(error, 160)!r}; "
                + "; ".join(entry_ref(e) for e in (verdicts[-1:] + actions[-1:] + refusals[-1:]))
                + f"; VM on {sorted(copies)}"
            ),
            vm_running_copies=run.running_copies(cluster, VM),
            details={
                "baseline": baseline_details,
                "verdict_before_storm": quiet_verdict,
                "verdict": verdict,
                "seconds_to_verdict": flag_s,
                "switched": {
                    "profile": switched.get("profile"),
                    "pid": switched.get("pid"),
                    "previous_pid": switched.get("previous_pid"),
                    "guest": switched.get("guest"),
                },
                "error": error,
                "copies": copies,
                "audit_entries": [entry_ref(e) for e in verdicts + actions + refusals],
                "refusal_code": (refusals[-1]["fields"].get("code") if refusals else None),
                "monitor_row": last_row,
            },
        )
    ]
