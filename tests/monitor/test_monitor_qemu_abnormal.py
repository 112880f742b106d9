"""QEMU guests (TCG) driven into abnormal behaviour at run time, judged by a real agent's monitor.

The agent gives each guest a control token at start; `vm.workload` then
tells the running guest's workload what to do (guest_control.py): a write
storm, or an outbound UDP flood from inside the guest. The monitor samples
every 0.5 s and judges after a 10-sample warm-up (as in test_monitor_agent).

- a write storm switched on at run time: attacker (CPU and dirty rate),
  audited, migration refused with vm_flagged_attacker; it clears once calm;
- an outbound flood from the guest toward another address on the VM network
  (a sink in the agent's namespace, over a tap): attacker on the outbound
  signals with the CPU behind them, audited, migrations held;
- modest changes (a somewhat higher dirty rate, a trickle of extra datagrams)
  raise no verdict.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator

import pytest

from monitor_testlib import audit_fields, bridge_netns, vm_row, wait_attacker, wait_for
from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.qemu.host import QEMU_BINARY
from sealift.backends.qemu.image import SERVICE_PORT
from sealift.cluster import LocalCluster, free_port
from sealift.lab.netns import enter_netns

pytestmark = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed")

MiB = 1 << 20
FAST_MONITOR = "[monitor]\nperiod_s = 0.5\nwarmup_samples = 10\nclear_after_samples = 6\n"
BOOT_TIMEOUT_S = 120
# Bridge and guest in the flood test's own namespace (nothing else uses it).
BRIDGE_IP = "10.79.0.1"
GUEST_IP = "10.79.0.2"
SINK_PORT = 9999
TAP = "slmqtap0"
FLOOD_PPS = 8000


def wait_warm(client: AgentClient, vm: str) -> dict:
    """Booted (the counter runs), then a warm baseline of at least 14 samples."""
    wait_for(f"{vm} to boot", lambda: (client.request("vm.info", name=vm)["vm"]["counter"] or 0) > 20, BOOT_TIMEOUT_S)
    warm = wait_for("a warm baseline", lambda: (r := vm_row(client, vm)) and r["warm"] and r["samples"] >= 14 and r, 40)
    return warm  # type: ignore[return-value]


def quiet_for(client: AgentClient, vm: str, samples: int) -> list[dict]:
    """`samples` more monitor rounds; the rows seen (each must carry no verdict)."""
    start = vm_row(client, vm)["samples"]  # type: ignore[index]
    rows: list[dict] = []

    def enough() -> bool:
        row = vm_row(client, vm)
        rows.append(row)  # type: ignore[arg-type]
        assert row and row["verdict"] is None, f"a modest change raised a verdict: {row}"
        return row["samples"] >= start + samples

    wait_for(f"{samples} quiet samples", enough, samples * 0.5 + 15)
    return rows


@pytest.mark.timeout(300)
def test_a_write_storm_in_a_qemu_guest_is_flagged_attacker_and_held() -> None:
    cluster = LocalCluster(
        host_config={"host-a": "step_timeout_s = 15\n" + FAST_MONITOR, "host-b": "step_timeout_s = 15\n" + FAST_MONITOR}
    )
    try:
        cluster.start()
        a = cluster.client("host-a")
        a.request("vm.start", name="qs", backend="qemu", memory="160M", cmdline="sealift.mem_mib=32 sealift.rate_mib=6")
        row = wait_warm(a, "qs")
        assert row["verdict"] is None and row["signals"]["dirty_bps"], row

        # A modest change: 6 -> 8 MiB/s ("db"). Learnt as normal drift, no verdict.
        modest = a.request("vm.workload", name="qs", profile="db")["vm"]
        assert modest["guest"]["rate_mib"] == 8 and not modest["guest"]["storm"], modest
        quiet_for(a, "qs", 8)

        stormy = a.request("vm.workload", name="qs", profile="stress")["vm"]
        assert stormy["guest"]["storm"] and stormy["pid"] == modest["pid"], "the same QEMU, no restart"
        # QEMU measures the dirty rate over a second and reports it a round later: the CPU may be
        # judged alone ("anomalous") just before the verdict escalates to attacker. Within the whole suite a
        # busy machine has made that take over 30 s once (alone: ~10 s), hence the 60 s bound.
        verdict, seconds, deviations = wait_attacker(a, "qs", 60)
        print(f"\nwrite storm -> {verdict['kind']} after {seconds:.1f} s: {verdict['reason']}")
        assert verdict["kind"] == "attacker", verdict
        assert {"cpu", "dirty_bps"} <= set(deviations), verdict
        assert deviations["dirty_bps"]["ratio"] >= 2 and deviations["dirty_bps"]["z"] >= 4
        assert "memory dirty rate" in verdict["reason"] and "CPU" in verdict["reason"]
        assert vm_row(a, "qs")["reliability"] == [], "a storm is not a reliability problem"  # type: ignore[index]

        with pytest.raises(AgentRequestFailed, match="vm_flagged_attacker"):
            cluster.migrate("qs", "host-a", "host-b")
        info = a.request("vm.info", name="qs")["vm"]
        assert info["status"] == "running" and not info["migrating"], info
        assert "qs" not in [v["name"] for v in cluster.client("host-b").request("vm.list")["vms"]]
        assert any(v["vm"] == "qs" and v["verdict"] == "attacker" for v in audit_fields(a, "monitor.verdict"))
        assert any(f["vm"] == "qs" and f["action"] == "hold_migrations" for f in audit_fields(a, "monitor.action"))
        refusals = audit_fields(a, "monitor.migration_refused")
        assert refusals and refusals[-1]["code"] == "vm_flagged_attacker" and refusals[-1]["vm"] == "qs"
        workloads = audit_fields(a, "vm.workload")
        assert [w["profile"] for w in workloads] == ["db", "stress"] and workloads[-1]["backend"] == "qemu"

        # Calm again: the verdict clears.
        restored = a.request("vm.workload", name="qs", profile="restore")["vm"]
        assert not restored["guest"]["storm"] and restored["guest"]["rate_mib"] == 6
        wait_for("the verdict to clear", lambda: (r := vm_row(a, "qs")) and r["verdict"] is None, 40)
        assert any(f["vm"] == "qs" and f["verdict"] == "attacker" for f in audit_fields(a, "monitor.cleared"))

        # What a QEMU guest cannot do is refused clearly.
        with pytest.raises(AgentRequestFailed, match="needs target"):
            a.request("vm.workload", name="qs", profile="flood")
        with pytest.raises(AgentRequestFailed, match="unknown workload profile 'tornado'"):
            a.request("vm.workload", name="qs", profile="tornado")

        # The token lives in the VM's sidecar: a restarted agent (which adopts the running QEMU)
        # still drives the guest, and so does the destination after a migration.
        cluster.kill("host-a")
        cluster.start("host-a")
        a = cluster.client("host-a")
        assert a.request("vm.workload", name="qs", profile="web")["vm"]["guest"]["rate_mib"] == 4
        report = cluster.migrate("qs", "host-a", "host-b")
        assert report["status"] == "completed", report
        b = cluster.client("host-b")
        moved = b.request("vm.workload", name="qs", profile="stress")["vm"]["guest"]
        assert moved["storm"] and moved["rate_mib"] == 4, "the same workload, now driven from host-b"
        assert b.request("vm.workload", name="qs", profile="restore")["vm"]["guest"]["rate_mib"] == 6
    finally:
        cluster.cleanup()


@pytest.fixture
def vm_netns() -> Iterator[str]:
    """A namespace with a bridge (the VM network) and a tap on it, for one agent and its guest."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    with bridge_netns(f"slmq{os.getpid()}", BRIDGE_IP, TAP) as name:
        yield name


def _ping(sock: socket.socket, stop: threading.Event, rate: float) -> None:
    """The guest's normal traffic: a light stream of probes (it answers each)."""
    while not stop.is_set():
        try:
            sock.sendto(b"ping", (GUEST_IP, SERVICE_PORT))
        except OSError:
            pass
        stop.wait(1.0 / rate)


def _sink(sock: socket.socket, stop: threading.Event, got: dict[str, int]) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except OSError:
            continue
        if peer[0] == GUEST_IP:
            got["datagrams"] += 1
            got["bytes"] += len(data)


@pytest.mark.timeout(300)
def test_an_outbound_flood_from_a_qemu_guest_is_flagged_attacker(vm_netns: str) -> None:
    port = free_port()
    cluster = LocalCluster(
        hosts=("host-a",),
        host_config={"host-a": FAST_MONITOR},
        netns={"host-a": vm_netns},
        listen={"host-a": ("127.0.0.1", port)},
    )
    stop = threading.Event()
    got = {"datagrams": 0, "bytes": 0}
    with enter_netns(vm_netns):  # sockets live in the namespace they were made in
        pinger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((BRIDGE_IP, SINK_PORT))
    try:
        cluster.start()
        a = cluster.client("host-a")
        net = {"mode": "tap", "tap": TAP, "guest_ip": f"{GUEST_IP}/24", "gateway": BRIDGE_IP}
        a.request(
            "vm.start",
            name="qf",
            backend="qemu",
            memory="160M",
            net=net,
            cmdline="sealift.mem_mib=16 sealift.rate_mib=2",
        )
        threading.Thread(target=_ping, args=(pinger, stop, 20.0), daemon=True).start()
        threading.Thread(target=_sink, args=(sink, stop, got), daemon=True).start()
        row = wait_warm(a, "qf")
        assert row["verdict"] is None and row["signals"]["tx_pps"] is not None, "the tap's counters are read"

        # A modest change: a trickle of small datagrams on top of the answers. No verdict.
        target = f"{BRIDGE_IP}:{SINK_PORT}"
        trickle = a.request("vm.workload", name="qf", profile="flood", target=target, pps=10, seconds=6, size=64)["vm"]
        assert trickle["guest"]["flood_pps"] == 10, trickle
        quiet_for(a, "qf", 10)
        trickled = got["datagrams"]
        assert trickled >= 30, f"the trickle reached the sink ({trickled} datagrams)"

        # The flood: 8000 datagrams/s of 1000 bytes. Under TCG it costs the guest little CPU (about
        # three times its normal), enough to back the outbound rise (classify.py); the verdict may
        # be "anomalous" for a sample or two before the CPU corroborates it.
        a.request("vm.workload", name="qf", profile="flood", target=target, pps=FLOOD_PPS, seconds=20, size=1000)
        verdict, seconds, deviations = wait_attacker(a, "qf", 20)
        print(f"\noutbound flood -> {verdict['kind']} after {seconds:.1f} s: {verdict['reason']}")
        stopped = a.request("vm.workload", name="qf", profile="restore")["vm"]["guest"]
        assert verdict["kind"] == "attacker", verdict
        assert {"tx_bps", "tx_pps"} & set(deviations) and "cpu" in deviations, verdict
        assert not {"rx_bps", "rx_pps"} & set(deviations), "nothing came in: not a victim"
        assert got["datagrams"] - trickled > FLOOD_PPS and stopped["flood_sent"] > FLOOD_PPS, (got, stopped)
        assert stopped["flood_pps"] == 0
        assert any(v["vm"] == "qf" and v["verdict"] == "attacker" for v in audit_fields(a, "monitor.verdict"))
        assert any(f["vm"] == "qf" and f["action"] == "hold_migrations" for f in audit_fields(a, "monitor.action"))
        floods = [w for w in audit_fields(a, "vm.workload") if w["profile"] == "flood"]
        assert floods[-1]["target"] == target and floods[-1]["pps"] == FLOOD_PPS
    finally:
        stop.set()
        cluster.cleanup()
        pinger.close()
        sink.close()
