"""`--nic bridge=BR`: each agent makes the guest's tap on its own bridge, and the guest keeps its address.

Both agents run in a network namespace made for the test (sls-nic<pid>),
holding a bridge with an address of the host side. The source agent makes
its tap for the guest on the bridge at start; after the migration the
destination agent has made its own, the source's is gone, and a probe to
the same guest address is answered by the guest on the destination (QEMU
announced its MAC). Stopping the guest removes the last tap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.backends.qemu.net import own_tap_name
from sealift.backends.qemu.vm import probe_udp
from sealift.cluster import LocalCluster
from sealift.lab.netns import enter_netns

VM = "nvm"
BRIDGE = "sls-br0"
BRIDGE_IP = "10.78.0.1"
GUEST = ("10.78.0.5", 7777)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("needs root, iproute2 and /dev/net/tun to make a network namespace with taps")
    name = f"sls-nic{os.getpid()}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", name, "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        ip("-n", name, "link", "set", BRIDGE, "up")
        yield name
    finally:
        ip("netns", "del", name)


def probe(netns: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    with enter_netns(netns):
        while time.monotonic() < deadline:
            answer = probe_udp(GUEST, 0.5)
            if answer is not None:
                return answer
    return None


def taps(netns: str) -> set[str]:
    """The taps on the bridge."""
    out = ip("-n", netns, "-o", "link", "show", "master", BRIDGE)
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def test_a_guest_on_a_bridge_moves_between_the_agents_own_taps(netns: str, guest_image: object) -> None:
    cluster = LocalCluster(netns={"host-a": netns, "host-b": netns}, extra_config="step_timeout_s = 15")
    cluster.start()
    try:
        src, dst = cluster.client("host-a"), cluster.client("host-b")
        net = {"mode": "tap", "bridge": BRIDGE, "guest_ip": f"{GUEST[0]}/24", "gateway": BRIDGE_IP}
        vm = src.request("vm.start", name=VM, backend="qemu", memory="128M", cmdline="sealift.mem_mib=16", net=net)
        assert vm["vm"]["net"]["tap"] == own_tap_name("host-a", VM)
        assert taps(netns) == {own_tap_name("host-a", VM)}
        assert probe(netns, 90) is not None, "the guest never answered on the bridge"

        report = cluster.migrate(VM, "host-a", "host-b")
        assert report["status"] == "completed", report
        assert taps(netns) == {own_tap_name("host-b", VM)}  # host-a's tap went with its copy of the guest
        assert dst.request("vm.info", name=VM)["vm"]["net"]["bridge"] == BRIDGE
        answer = probe(netns, 20)
        assert answer is not None and answer >= (report["counter_at_pause"] or 0)  # the same address, host-b

        dst.request("vm.stop", name=VM)
        assert taps(netns) == set()
    finally:
        cluster.stop_guests()
        cluster.cleanup()
