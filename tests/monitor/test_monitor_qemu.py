"""The monitors on real QEMU guests (TCG): dirty rate through QMP, and a flood toward a guest on a tap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor_testlib import bridge_netns
from sealift.backends.qemu.host import QEMU_BINARY
from sealift.backends.qemu.image import GuestImagePaths, build_image, default_cache_dir
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.vm import QemuVM
from sealift.monitor.collectors import QemuCollector

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
BRIDGE_IP = "10.78.0.1"
GUEST_IP = "10.78.0.2/24"

pytestmark = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed")


@pytest.fixture(scope="module")
def guest_image() -> GuestImagePaths:
    return build_image(default_cache_dir())


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="slmon-", dir="/tmp"))  # short: QMP socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


class OneVm:
    def __init__(self, vm: QemuVM) -> None:
        self.vm = vm

    def list(self) -> list[dict[str, object]]:
        return [{"name": self.vm.name, "migrating": False}]

    def get(self, name: str) -> QemuVM:
        return self.vm


@pytest.mark.timeout(180)
def test_the_collector_reports_a_qemu_guests_dirty_rate_from_qmp(guest_image: GuestImagePaths, workdir: Path) -> None:
    rate_mib = 16
    vm = QemuVM.start(
        workdir,
        "dirty",
        160,
        guest_image,
        accel="tcg",
        net=NetConfig.none(),
        extra_cmdline=f"sealift.mem_mib=32 sealift.rate_mib={rate_mib}",
    )
    try:
        vm.wait_counter(0, timeout=90)
        collector = QemuCollector(OneVm(vm))
        samples = []
        for _ in range(7):
            samples += collector.collect()
            time.sleep(1.0)
    finally:
        vm.stop_vm()
    measured = [s.dirty_bps / MiB for s in samples if s.dirty_bps is not None]
    print(f"\nguest dirtying {rate_mib} MiB/s; QMP calc-dirty-rate measured {measured} MiB/s")
    assert len(measured) >= 4, "one measurement per period after the first"
    median = sorted(measured)[len(measured) // 2]
    assert rate_mib / 2 <= median <= rate_mib * 2, measured
    assert all(s.status == "running" and s.errors == () for s in samples)
    assert samples[-1].cpu_seconds > samples[0].cpu_seconds  # type: ignore[operator]
    assert samples[-1].progress > samples[0].progress  # type: ignore[operator]
    assert samples[-1].rx_bytes is None, "no NIC: network signals are absent, not zero"


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    with bridge_netns(f"slmon{os.getpid()}", BRIDGE_IP, "slmtap0") as name:
        yield name


@pytest.mark.timeout(240)
def test_a_flood_toward_a_qemu_guest_on_a_tap_flags_it_victim(
    netns: str, guest_image: GuestImagePaths, workdir: Path
) -> None:
    child = [sys.executable, str(HERE / "tap_flood_child.py"), str(workdir), BRIDGE_IP, GUEST_IP, "slmtap0"]
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *child], capture_output=True, text=True, timeout=220, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nflood -> verdict after {result['seconds_to_verdict']} s: {[v['reason'] for v in result['verdicts']]}")
    before = result["before_flood"]
    assert before["rx_pps"] is not None and before["tx_pps"] is not None, "tap counters are read"
    kinds = [v["kind"] for v in result["verdicts"] if v["kind"] != "reliability"]
    assert kinds == ["victim"], result
    signals = {d["signal"] for d in result["verdicts"][-1]["deviations"]}
    assert signals & {"rx_bps", "rx_pps"}, result


@pytest.mark.timeout(200)
def test_an_agent_monitors_its_qemu_guest_and_holds_it_when_flagged(guest_image: GuestImagePaths) -> None:
    """Inside a real agent: the QEMU guest's dirty rate (QMP) is in the snapshot; a flag holds its migration."""
    from sealift.agent.client import AgentRequestFailed
    from sealift.cluster import LocalCluster

    config = "step_timeout_s = 15\n[monitor]\nperiod_s = 1.0\n"
    cluster = LocalCluster(host_config={"host-a": config, "host-b": config})
    try:
        cluster.start()
        a = cluster.client("host-a")
        a.request(
            "vm.start", name="q1", backend="qemu", memory="160M", cmdline="sealift.mem_mib=32 sealift.rate_mib=16"
        )
        deadline = time.monotonic() + 120
        row = None
        while time.monotonic() < deadline:
            rows = a.request("monitor.snapshot")["monitor"]["vms"]
            row = next((r for r in rows if r["vm"] == "q1"), None)
            if row and row["signals"].get("dirty_bps") and (row["progress"] or 0) > 50:
                break  # the workload has run for 5 s
            time.sleep(1)
        assert row and row["backend"] == "qemu" and row["signals"]["dirty_bps"], row
        readings = []
        for _ in range(5):
            time.sleep(1)
            rows = a.request("monitor.snapshot")["monitor"]["vms"]
            readings.append(next(r for r in rows if r["vm"] == "q1")["signals"]["dirty_bps"]["value"] / MiB)
        assert 8 <= sorted(readings)[2] <= 32, f"guest dirtying 16 MiB/s, agent measured {readings} MiB/s"
        assert row["signals"]["rx_bps"] is None, "user-mode networking: no host interface to count"
        a.request("monitor.flag", vm="q1", kind="attacker", reason="test: flagged by the operator")
        with pytest.raises(AgentRequestFailed, match="vm_flagged_attacker"):
            cluster.migrate("q1", "host-a", "host-b")
        info = a.request("vm.info", name="q1")["vm"]
        assert info["status"] == "running" and not info["migrating"], info
        refusals = [e["fields"] for e in a.request("audit.show", kind="monitor.migration_refused")["entries"]]
        assert refusals and refusals[-1]["vm"] == "q1" and refusals[-1]["direction"] == "outgoing"
    finally:
        cluster.cleanup()
