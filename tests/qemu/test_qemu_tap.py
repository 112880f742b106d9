"""The lab's network shape: a guest on a bridge, through a tap, keeps its address across a migration.

Everything happens in a network namespace made for the test: a bridge with
the host side's address, two taps (the source's and the destination's).
The guest migrates from one tap to the other; a probe to the same guest
address is then answered by the destination, and the bridge has learnt the
guest's MAC on the destination's tap (QEMU announces it after migration).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_testlib import short_tmpdir
from sealift.backends.qemu.image import GuestImagePaths
from sealift.backends.qemu.net import create_tap

HERE = Path(__file__).resolve().parent
BRIDGE_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2/24"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("needs root, iproute2 and /dev/net/tun to make a network namespace with taps")
    name = f"slq{os.getpid()}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        ip("-n", name, "link", "set", "br0", "up")
        create_tap("slt0", "br0", netns=name)
        create_tap("slt1", "br0", netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_guest_keeps_its_address_across_a_migration_between_taps(netns: str, guest_image: GuestImagePaths) -> None:
    workdir = short_tmpdir("sl-tap-")
    try:
        child = [sys.executable, str(HERE / "tap_child.py"), str(workdir), BRIDGE_IP, GUEST_IP, "slt0", "slt1"]
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *child], capture_output=True, text=True, timeout=240, check=False
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] is not None, "the guest never answered on the bridge"
    assert result["src_status"] == "postmigrate" and result["dst_status"] == "running"
    assert result["after"] is not None and result["after"] >= result["last_on_source"]
    assert result["mac_learned_on_destination_tap"], result
    assert result["probe_answers"] > 0
    print(
        f"\ntap migration: QEMU downtime {result['qemu_downtime_ms']} ms, total {result['qemu_total_ms']} ms; "
        f"longest silence seen by a 5 ms UDP ping of the guest address: {result['probe_gap_ms']} ms"
    )
