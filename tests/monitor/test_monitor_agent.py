"""Real agents (separate processes) with their monitors: a write storm is flagged and held; a port scan is blocked.

Each agent samples every 0.5 s and judges after a 10-sample warm-up, so a
test needs seconds, not minutes; everything else is the shipped behaviour.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from monitor_testlib import audit_fields, vm_row, wait_for
from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster, free_port

VM = "storm1"
METRICS_PORT = free_port()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    # Top-level keys first: the [monitor] table runs to the next table header.
    monitor = "step_timeout_s = 8\nhandshake_timeout_s = 3\n[monitor]\nperiod_s = 0.5\nwarmup_samples = 10\nclear_after_samples = 6\n"
    cluster = LocalCluster(
        host_config={
            "host-a": monitor + f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n',
            "host-b": monitor + "ids_block_s = 30\n",
        },
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


audit_kinds = audit_fields


@pytest.mark.timeout(150)
def test_a_write_storm_is_flagged_attacker_and_its_migration_refused_until_it_calms(cluster: LocalCluster) -> None:
    a = cluster.client("host-a")
    a.request("vm.start", name=VM, memory="64M", workload="web")
    row = wait_for("a warm baseline", lambda: (r := vm_row(a, VM)) and r["warm"] and r["samples"] >= 16 and r, 30)
    assert row["verdict"] is None, row  # type: ignore[index]
    assert row["signals"]["rx_bps"] is None, "the built-in VM has no NIC: network signals are absent"  # type: ignore[index]
    counter_before = a.request("vm.info", name=VM)["vm"]["counter"]

    # The lab's knob: the same guest, now writing all of its memory as fast as it can.
    switched = a.request("vm.workload", name=VM, profile="stress")["vm"]
    assert switched["profile"] == "stress" and switched["pid"] != switched["previous_pid"]
    assert switched["counter"] >= counter_before, "the guest continues from its counter"

    flagged = wait_for("an attacker verdict", lambda: (r := vm_row(a, VM)) and r["verdict"] and r, 20)
    verdict = flagged["verdict"]  # type: ignore[index]
    assert verdict["kind"] == "attacker", verdict
    signals = {d["signal"]: d for d in verdict["deviations"]}
    assert (
        {"cpu", "dirty_bps"} <= set(signals) and signals["dirty_bps"]["z"] >= 4 and signals["dirty_bps"]["ratio"] >= 2
    )
    assert flagged["reliability"] == [], "an announced workload switch is not a restart problem"  # type: ignore[index]

    with pytest.raises(AgentRequestFailed, match="vm_flagged_attacker"):
        cluster.migrate(VM, "host-a", "host-b")
    info = a.request("vm.info", name=VM)["vm"]
    assert info["alive"] and not info["paused"] and not info["migrating"], "the VM keeps running where it is"
    assert VM not in [v["name"] for v in cluster.client("host-b").request("vm.list")["vms"]]

    verdicts = audit_kinds(a, "monitor.verdict")
    assert any(v["vm"] == VM and v["verdict"] == "attacker" and v["deviations"] for v in verdicts)
    refusals = audit_kinds(a, "monitor.migration_refused")
    assert refusals and refusals[-1]["code"] == "vm_flagged_attacker" and refusals[-1]["direction"] == "outgoing"
    assert any(f["action"] == "hold_migrations" for f in audit_kinds(a, "monitor.action"))

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    assert f'sealift_vm_verdict{{kind="attacker",vm="{VM}"}} 1.0' in metrics
    assert f'sealift_vm_signal_zscore{{signal="dirty_bps",vm="{VM}"}}' in metrics

    cli = subprocess.run(
        [sys.executable, "-m", "sealift", "monitor", "--json", "--socket", str(cluster.agents["host-a"].socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["vms"][0]["verdict"]["kind"] == "attacker"
    table = subprocess.run(
        [sys.executable, "-m", "sealift", "monitor", "--socket", str(cluster.agents["host-a"].socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert table.returncode == 0 and "attacker" in table.stdout, table.stdout + table.stderr

    # Calm again: the verdict clears and the same VM may move.
    a.request("vm.workload", name=VM, profile="web")
    wait_for(
        "the verdict to clear", lambda: (r := vm_row(a, VM)) and r["verdict"] is None and r["status"] == "running", 40
    )
    report = cluster.migrate(VM, "host-a", "host-b")
    assert report["status"] == "completed", report
    assert VM in [v["name"] for v in cluster.client("host-b").request("vm.list")["vms"]]
    assert any(f["vm"] == VM and f["verdict"] == "attacker" for f in audit_kinds(a, "monitor.cleared"))


@pytest.mark.timeout(90)
def test_the_destination_refuses_a_vm_its_operator_flagged_attacker(cluster: LocalCluster) -> None:
    a, b = cluster.client("host-a"), cluster.client("host-b")
    a.request("vm.start", name=VM, memory="32M", workload="web")
    b.request("monitor.flag", vm=VM, kind="attacker", reason="quarantined: flagged on another host")
    with pytest.raises(AgentRequestFailed, match="vm_flagged_attacker"):
        cluster.migrate(VM, "host-a", "host-b")
    refusals = audit_kinds(b, "monitor.migration_refused")
    assert refusals and refusals[-1]["direction"] == "incoming" and refusals[-1]["peer"] == "host-a"
    info = a.request("vm.info", name=VM)["vm"]
    assert info["alive"] and not info["paused"]
    b.request("monitor.unflag", vm=VM)
    cluster.migrate(VM, "host-a", "host-b")
    assert VM in [v["name"] for v in b.request("vm.list")["vms"]]


def _scan(target: tuple[str, int], source_ip: str, count: int) -> int:
    """Connect and hang up `count` times from `source_ip` (a port scan); returns how many connected."""
    connected = 0
    for _ in range(count):
        with socket.socket() as sock:
            sock.bind((source_ip, 0))
            sock.settimeout(2)
            try:
                sock.connect(target)
                connected += 1
            except OSError:
                pass
        time.sleep(0.05)
    return connected


def _served(target: tuple[str, int], source_ip: str) -> bool:
    """Whether the port keeps a connection from `source_ip` open (a blocked peer is hung up on at once)."""
    with socket.socket() as sock:
        sock.bind((source_ip, 0))
        sock.settimeout(1.0)
        sock.connect(target)
        try:
            return sock.recv(1) != b""
        except TimeoutError:
            return True  # still open: served (waiting for our first bytes)
        except ConnectionResetError:
            return False


@pytest.mark.timeout(90)
def test_a_port_scan_and_a_handshake_flood_get_their_peers_blocked_and_audited(cluster: LocalCluster) -> None:
    b = cluster.client("host-b")
    target = cluster.addresses["host-b"]
    started = time.monotonic()
    assert _scan(target, "127.0.0.5", 50) > 0
    assert time.monotonic() - started < 10, "the scan must be a burst (50 connections in under 10 s)"
    wait_for("a block of the scanner", lambda: audit_kinds(b, "monitor.peer_blocked"), 5)
    blocked = audit_kinds(b, "monitor.peer_blocked")[-1]
    assert blocked["peer"] == "127.0.0.5" and blocked["seconds"] == 30 and blocked["counts"].get("silent", 0) > 0
    assert not _served(target, "127.0.0.5"), "a blocked peer is hung up on before a byte is read"
    assert _served(target, "127.0.0.7"), "other peers are still served"

    # A handshake flood: TLS ClientHellos without a client certificate, from another address.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for _ in range(25):
        with socket.socket() as raw:
            raw.bind(("127.0.0.6", 0))
            raw.settimeout(3)
            try:
                raw.connect(target)
                with context.wrap_socket(raw) as tls:
                    tls.recv(1)  # TLS 1.3: the server's refusal of our missing certificate arrives here
            except (OSError, ssl.SSLError):
                pass
    wait_for(
        "a block of the handshake flooder",
        lambda: any(f["peer"] == "127.0.0.6" for f in audit_kinds(b, "monitor.peer_blocked")),
        5,
    )
    flooder = [f for f in audit_kinds(b, "monitor.peer_blocked") if f["peer"] == "127.0.0.6"][-1]
    assert flooder["counts"].get("handshake_failed", 0) > 0, flooder

    snapshot = b.request("monitor.snapshot")["monitor"]
    peers = {p["peer"]: p for p in snapshot["peers"]}
    assert peers["127.0.0.5"]["blocked_for_s"] > 0 and peers["127.0.0.6"]["blocked_for_s"] > 0
    assert b.request("audit.verify")["verification"]["ok"]

    # The honest peer (host-a on 127.0.0.1) still migrates.
    cluster.client("host-a").request("vm.start", name="honest", memory="32M", workload="idle")
    cluster.migrate("honest", "host-a", "host-b")
    assert "honest" in [v["name"] for v in b.request("vm.list")["vms"]]
