"""Attacks on a QEMU post-copy migration: snooping (T1) and tampering (T2) on the post-copy stream and on
QEMU's return path, and either agent killed or the link cut during post-copy (T11).

The guest rewrites a 32 MiB working set at 64 MiB/s, four times what the
16 MiB/s limit lets pre-copy send: it never converges, and after the first
pass the migration switches to post-copy (the guest runs on host-b while
its pages follow, and host-b's QEMU asks for the ones it touches on the
return path). The baselines run the same post-copy through the agents in
clear (`sealift-plain`). Every row ends by checking the guest from outside
(lab/guest_memory.py): exactly one QEMU process in /proc, its counter
going on past where it stopped, and its working set read from the QEMU's
memory, every page whole. Run with `sealift lab run --only postcopy`
(`--quick`, as in CI, leaves these rows to tests/qemu/test_qemu_postcopy.py).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from sealift.cluster import LocalCluster
from sealift.lab.attacks.base import AttackResult, Baseline, attack
from sealift.lab.attacks.channel import SECRET
from sealift.lab.capture import Finding, dropped_note, find_in_capture, tcp_streams
from sealift.lab.guest_memory import MemoryCheck, check_memory, qemu_processes, workload_pages
from sealift.lab.relay import Relay, Tamper
from sealift.lab.session import QEMU_WORKLOADS, Backend, BackgroundMigration, LabSession, MigrationFailed

VM = "vm1"
MiB = 1 << 20
WORKLOAD = "postcopy"
# After the first pass (some 30 MiB left to come in post-copy, ~2 s at the limit).
AFTER_PRECOPY = {"bandwidth_limit_bps": 16 * MiB, "postcopy": "after-precopy"}
# The return-path rows switch after 1 s at twice the limit (about 100 MiB left: several seconds of page
# requests to strike in), as tests/qemu/test_qemu_postcopy.py does.
EARLY = {"bandwidth_limit_bps": 32 * MiB, "postcopy": "after-timeout", "postcopy_after_s": 1}
INTO_POSTCOPY = 12 * MiB  # strike this far (forwarded bytes) past the switch: in post-copy proper
RETURN_MARKER = b"pc.ram"  # the RAM block's name in QEMU's page requests (REQ_PAGES_ID), on the way back
MIGRATION_WAIT_S = 150.0  # a post-copy that cannot be recovered ends after the agents' window (80 s here)
SETTLE_S = 120.0  # a restarted source resumes and finishes on its own: until its record says completed


def _cluster(lab: LabSession, backend: Backend, insecure: bool = False, via: Relay | None = None) -> LocalCluster:
    cluster = lab.cluster(backend, insecure=insecure, via=via)
    lab.start_vm(cluster, "host-a", VM, backend, workload=WORKLOAD)
    return cluster


def _migrate(lab: LabSession, cluster: LocalCluster, secure: bool, options: dict[str, object]) -> BackgroundMigration:
    transport = "sealift" if secure else "sealift-plain"
    return lab.migrate_in_background(cluster, VM, {"secure": secure, **options}, transport=transport)


def _outcome(running: BackgroundMigration) -> tuple[dict, str]:
    """(the report, "completed" or why not)."""
    try:
        return running.wait(MIGRATION_WAIT_S), "completed"
    except MigrationFailed as exc:
        return {}, f"failed: {_short(str(exc), 160)}"
    except TimeoutError:
        return {}, f"still running after {MIGRATION_WAIT_S:.0f} s"


def _in_postcopy(running: BackgroundMigration) -> bool:
    return running.saw(lambda e: e.get("event") == "phase" and e.get("phase") == "postcopy-active")


def _await_postcopy(lab: LabSession, running: BackgroundMigration) -> bool:
    """Until the migration switched to post-copy (True), or ended without (False)."""
    try:
        lab.wait_for(lambda: _in_postcopy(running) or running.done(), 120, "the post-copy switch", interval=0.005)
    except TimeoutError:
        return False
    return _in_postcopy(running)


@dataclass
class _Guest:
    """The guest after a row, seen from outside: processes, copies, progress and memory."""

    qemus: int
    copies: dict[str, str]
    progressing: bool
    memory: MemoryCheck | None

    @property
    def whole(self) -> bool:
        running = [h for h, s in self.copies.items() if s == "running"]
        return self.qemus == 1 and len(running) == 1 and self.progressing and bool(self.memory and self.memory.intact)

    def copies_running(self) -> int:
        return sum(1 for state in self.copies.values() if state == "running")

    def describe(self) -> str:
        where = ", ".join(f"{h}: {s}" for h, s in sorted(self.copies.items())) or "nowhere"
        memory = self.memory.describe() if self.memory is not None else "memory not read (no running guest)"
        progress = "its counter goes on past the pause" if self.progressing else "its counter does NOT go on"
        return f"{self.qemus} QEMU process(es) in /proc; guest {where}; {progress}; {memory}"


def _guest_after(lab: LabSession, cluster: LocalCluster, paused_at: int | None) -> _Guest:
    """Wait (bounded) for one running copy and one QEMU, then look at the guest where it runs."""
    try:
        lab.wait_for(lambda: lab.running_copies(cluster, VM) == 1, 60, "exactly one running copy")
        lab.wait_for(lambda: len(qemu_processes(cluster.vm_root)) == 1, 15, "one QEMU left")
    except TimeoutError:
        pass
    copies = lab.copies(cluster, VM)
    where = next((h for h, s in copies.items() if s == "running"), None)
    progressing, memory = False, None
    if where is not None:
        info = cluster.client(where).request("vm.info", name=VM)["vm"]
        progressing = _counter_passes(cluster, where, paused_at)
        memory = check_memory(info["pid"], info["memory_bytes"], workload_pages(QEMU_WORKLOADS[WORKLOAD]))
    return _Guest(len(qemu_processes(cluster.vm_root)), copies, progressing, memory)


def _counter_passes(cluster: LocalCluster, host: str, paused_at: int | None, timeout: float = 20.0) -> bool:
    """The guest's counter on `host` goes past `paused_at` (or, not known, moves at all) within `timeout`."""
    deadline = time.monotonic() + timeout
    first: int | None = None
    while time.monotonic() < deadline:
        counter = cluster.client(host).request("vm.info", name=VM)["vm"].get("counter")
        if counter is not None:
            floor = paused_at if paused_at is not None else first
            if floor is not None and counter > floor:
                return True
            first = counter if first is None else first
        time.sleep(0.3)
    return False


def _logged(cluster: LocalCluster, host: str, text: str) -> bool:
    path = cluster.agents[host].log_path
    return path.exists() and text in path.read_text(errors="replace")


# -- T1: snooping on the post-copy stream and on the return path ------------------------------------------


def _back_flows(pcap_hits: Finding, destination_ip: str) -> list[str]:
    """The flows of a finding that run from the destination back to the source (QEMU's return path)."""
    return [flow for flow in pcap_hits.flows if flow.startswith(f"{destination_ip}:")]


@attack("T1", "passive snooping of a post-copy migration and its return path", backends=("qemu",))
def postcopy_snooping(lab: LabSession, backend: Backend) -> list[AttackResult]:
    destination_ip = lab.testbed.destination_ip
    plain = _cluster(lab, backend, insecure=True)
    capture = lab.capture("T1-postcopy-plain")
    plain_report, plain_outcome = _outcome(_migrate(lab, plain, False, AFTER_PRECOPY))
    plain_pcap = capture.stop()
    plain_dropped = capture.dropped
    plain_secret = find_in_capture(plain_pcap, SECRET)
    plain_back = _back_flows(find_in_capture(plain_pcap, RETURN_MARKER), destination_ip)
    lab.finish(plain)

    secure = _cluster(lab, backend)
    capture = lab.capture("T1-postcopy-sealift")
    report, outcome = _outcome(_migrate(lab, secure, True, AFTER_PRECOPY))
    pcap = capture.stop()
    secret = find_in_capture(pcap, SECRET)
    marker = find_in_capture(pcap, RETURN_MARKER)
    back_bytes = sum(len(data) for key, data in tcp_streams(pcap).items() if key[0] == destination_ip)
    postcopy = report.get("postcopy") or {}
    size_mib = pcap.stat().st_size / MiB
    # The capture must hold a post-copy with page requests on the way back, or "not found" proves nothing.
    saw = size_mib >= 8 and int(postcopy.get("return_path_bytes") or 0) > 0 and back_bytes > 0
    blocked = outcome == "completed" and saw and not secret.found and not marker.found
    baseline: Baseline = "succeeded" if plain_secret.found or plain_back else "blocked"
    evidence = (
        f"baseline (sealift-plain post-copy, {plain_outcome}): secret {_found(plain_secret)}, "
        f"page requests ('pc.ram') in clear on {len(plain_back)} flow(s) back from host-b"
        f"{dropped_note(plain_dropped)}; "
        f"sealift (post-copy {postcopy.get('reason', 'not reached')}, {outcome}): secret {_found(secret)}, "
        f"'pc.ram' {_found(marker)} in {size_mib:.0f} MiB ({back_bytes >> 10} KiB back from host-b, "
        f"{postcopy.get('postcopy_requests')} page requests, {postcopy.get('return_path_bytes')} return-path "
        f"bytes){dropped_note(capture.dropped)}"
    )
    return [
        AttackResult(
            "T1",
            "passive snooping: the post-copy stream and its return path in the capture",
            backend,
            baseline,
            "blocked" if blocked else "succeeded",
            evidence,
            lab.running_copies(secure, VM),
            details={"baseline_pcap": str(plain_pcap), "sealift_pcap": str(pcap), "postcopy": postcopy},
        )
    ]


def _found(finding: Finding) -> str:
    return f"found ({len(finding.file_offsets)} hits)" if finding.found else "not found"


# -- T2: tampering with the post-copy stream and with the return path ----------------------------------------


@attack("T2", "active manipulation of a post-copy stream and its return path", backends=("qemu",))
def postcopy_tampering(lab: LabSession, backend: Backend) -> list[AttackResult]:
    return [_tamper_row(lab, backend, reverse=False), _tamper_row(lab, backend, reverse=True)]


@dataclass
class _TamperRun:
    outcome: str  # "completed" or why not
    flipped: bool  # the relay flipped its bit (in post-copy proper)
    recoveries: int  # post-copies resumed over a fresh channel (the source's report)
    auth_failed: bool  # the agent that opens the flipped record logged its authentication failure
    guest: _Guest


def _tamper_once(lab: LabSession, backend: Backend, secure: bool, reverse: bool) -> _TamperRun:
    """One post-copy with one bit flipped in post-copy proper, forward or on the way back."""
    relay = lab.relay()
    cluster = _cluster(lab, backend, insecure=not secure, via=relay)
    running = _migrate(lab, cluster, secure, EARLY if reverse else AFTER_PRECOPY)
    if _await_postcopy(lab, running):
        relay.tamper = Tamper(reverse=reverse, flip_offset=relay.forward_bytes + INTO_POSTCOPY)
    report, outcome = _outcome(running)
    guest = _guest_after(lab, cluster, report.get("counter_at_pause"))
    opener = "host-a" if reverse else "host-b"
    run = _TamperRun(
        outcome,
        relay.tamper is not None and relay.tamper.done.is_set(),
        int((report.get("postcopy") or {}).get("recoveries") or 0),
        _logged(cluster, opener, "record failed authentication"),
        guest,
    )
    lab.finish(cluster)
    return run


def _tamper_row(lab: LabSession, backend: Backend, reverse: bool) -> AttackResult:
    what = "the return path (host-b's page requests)" if reverse else "the post-copy stream"
    opener = "host-a" if reverse else "host-b"
    plain = _tamper_once(lab, backend, secure=False, reverse=reverse)
    run = _tamper_once(lab, backend, secure=True, reverse=reverse)
    # In clear nothing checks the bit: the attack succeeds unless the guest still came through whole.
    spoiled = not (plain.outcome == "completed" and plain.guest.whole)
    baseline: Baseline = "succeeded" if plain.flipped and spoiled else "blocked"
    blocked = run.flipped and run.outcome == "completed" and run.auth_failed and run.recoveries >= 1 and run.guest.whole
    evidence = (
        f"baseline (sealift-plain): one bit of {what} flipped {'in' if plain.flipped else 'NOT in'} post-copy, "
        f"nothing checked it; migration {plain.outcome}; {plain.guest.describe()}; sealift: flipped "
        f"{'in' if run.flipped else 'NOT in'} post-copy; {opener} found the record failing authentication: "
        f"{'yes' if run.auth_failed else 'NO'}; migration {run.outcome} after {run.recoveries} recovery(ies) over a "
        f"fresh channel; {run.guest.describe()}"
    )
    return AttackResult(
        "T2",
        f"active manipulation: flip a bit of {what} in post-copy",
        backend,
        baseline,
        "blocked" if blocked else "succeeded",
        evidence,
        run.guest.copies_running(),
        details={
            "outcome": run.outcome,
            "baseline_outcome": plain.outcome,
            "recoveries": run.recoveries,
            "memory": run.guest.memory.describe() if run.guest.memory else None,
            "baseline_memory": plain.guest.memory.describe() if plain.guest.memory else None,
        },
    )


# -- T11: either agent killed, or the link cut, during post-copy ------------------------------------------------

STRIKES = ("kill the source agent", "kill the destination agent", "cut the link")


@attack("T11", "kill either agent or cut the link during post-copy", backends=("qemu",))
def postcopy_failures(lab: LabSession, backend: Backend) -> list[AttackResult]:
    return [_strike_row(lab, backend, action) for action in STRIKES]


def _strike(cluster: LocalCluster, relay: Relay, action: str) -> str:
    """The failure, and the failed part coming back; '' or why it could not."""
    if action == "cut the link":
        relay.cut()
        time.sleep(2.0)
        relay.restore()
        return ""
    host = "host-a" if action == "kill the source agent" else "host-b"
    cluster.kill(host, signal.SIGKILL)
    try:
        cluster.start(host)
    except (RuntimeError, TimeoutError) as exc:
        return f"{host}'s agent did not restart: {_short(str(exc), 120)}"
    return ""


def _strike_row(lab: LabSession, backend: Backend, action: str) -> AttackResult:
    relay = lab.relay()
    cluster = _cluster(lab, backend, via=relay)
    running = _migrate(lab, cluster, True, AFTER_PRECOPY)
    struck, restart_failure = False, ""
    if _await_postcopy(lab, running):
        beyond = relay.forward_bytes + INTO_POSTCOPY
        try:
            lab.wait_for(lambda: relay.forward_bytes >= beyond or running.done(), 60, "post-copy proper", 0.005)
        except TimeoutError:
            pass
        if not running.done():
            restart_failure = _strike(cluster, relay, action)
            struck = True
    report, outcome = _outcome(running)
    records = _settled_records(lab, cluster)
    saved = _source_report(cluster, records.get("id"))
    paused_at = report.get("counter_at_pause", saved.get("counter_at_pause"))
    guest = _guest_after(lab, cluster, paused_at)
    completed = records.get("host-a") == "completed" and records.get("host-b") == "running"
    blocked = struck and completed and guest.whole and not restart_failure
    recoveries = (report.get("postcopy") or saved.get("postcopy") or {}).get("recoveries")
    evidence = (
        (f"struck {_short(action)} {INTO_POSTCOPY >> 20} MiB into post-copy" if struck else "not struck in post-copy")
        + f"; the operator's migrate call: {outcome}"
        + f"; records: host-a {records.get('host-a')}, host-b {records.get('host-b')}; recoveries {recoveries}"
        + f"; {guest.describe()}"
        + (f"; {restart_failure}" if restart_failure else "")
    )
    lab.finish(cluster)
    return AttackResult(
        "T11",
        f"{action} during post-copy",
        backend,
        "n/a",
        "blocked" if blocked else "succeeded",
        evidence,
        guest.copies_running(),
        details={"outcome": outcome, "records": records, "restart_failure": restart_failure},
    )


def _settled_records(lab: LabSession, cluster: LocalCluster) -> dict[str, str]:
    """Both agents' records of the migration, once the source's is final (a restarted source resumes it on its
    own, after the operator's call has failed with the killed agent): {"id", "host-a": phase, "host-b": phase}."""

    def phases() -> dict[str, str]:
        found: dict[str, str] = {}
        for host in ("host-a", "host-b"):
            try:
                latest = cluster.client(host).request("migrations", limit=1)["migrations"]
            except Exception:  # noqa: BLE001 - an agent still restarting: ask again
                continue
            if latest:
                found["id"], found[host] = latest[0]["id"], latest[0]["phase"]
        return found

    try:
        lab.wait_for(lambda: phases().get("host-a") in ("completed", "aborted"), SETTLE_S, "the source's record final")
    except TimeoutError:
        pass
    return phases()


def _source_report(cluster: LocalCluster, migration_id: str | None) -> dict:
    """The report the source agent saved (a restarted source saves the one the operator's call never got)."""
    if migration_id is None:
        return {}
    try:
        return cluster.client("host-a").request("migration", id=migration_id)["migration"].get("report") or {}
    except Exception:  # noqa: BLE001 - no report is evidence in itself
        return {}


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
