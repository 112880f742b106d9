"""The Debian guest: built (or cached), restored from its saved booted state onto the lab's VM network.

Real QEMU under TCG, a real Debian 12 with systemd, nginx and redis, and
the outage client in the lab's client namespace reaching the guest through
the lab's bridges (a tap on the source host's br0). The first run on a
machine builds the image with debootstrap (it needs the Debian mirror) and
boots it once to save it; later runs restore in seconds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_testlib import short_tmpdir
from sealift.backends.qemu.debian_guest import GuestProcess, SavedState, ensure_saved_state, restore_guest
from sealift.backends.qemu.debian_image import REDIS_SECRET_KEY, build_debian_image
from sealift.backends.qemu.image import DEFAULT_SECRET
from sealift.lab.client import OutageClient
from sealift.lab.testbed import Testbed

TAP = "sld-tap0"


@dataclass
class RunningGuest:
    state: SavedState
    guest: GuestProcess
    netns_client: str
    ip: str
    restore_s: float
    first_answer_s: float

    def client(self) -> OutageClient:
        return OutageClient(self.ip, netns=self.netns_client)


@pytest.fixture(scope="module")
def saved_state() -> SavedState:
    # Not root: skip, like the other tests that make namespaces. A missing debootstrap or mirror is an
    # error (DebianGuestError says which), as for the busybox guest's image.
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, network namespaces, taps)")
    started = time.monotonic()
    state = ensure_saved_state(build_debian_image())
    print(f"\nDebian image and saved state ready in {time.monotonic() - started:.1f} s (boot {state.boot_seconds} s)")
    return state


@pytest.fixture(scope="module")
def lab() -> Iterator[Testbed]:
    with Testbed(tag="deb") as bed:
        bed.add_tap("source", TAP)
        yield bed


@pytest.fixture
def running(lab: Testbed, saved_state: SavedState) -> Iterator[RunningGuest]:
    workdir = short_tmpdir("sld-deb-")
    try:
        started = time.monotonic()
        guest, restore_s = restore_guest(saved_state, workdir, TAP, netns=lab.ns("source"))
        try:
            ip = saved_state.shape.guest_ip.split("/")[0]
            OutageClient(ip, netns=lab.ns("client")).wait_ready(30.0)
            first_answer_s = time.monotonic() - started
            print(
                f"\nrestored in {restore_s:.2f} s; nginx and redis answered {first_answer_s:.2f} s after QEMU started"
            )
            yield RunningGuest(saved_state, guest, lab.ns("client"), ip, restore_s, first_answer_s)
        finally:
            guest.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def file_contains(path: Path, needle: bytes, chunk: int = 16 << 20) -> bool:
    """Whether the file holds ``needle`` (read in chunks that overlap by len(needle) - 1)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-(len(needle) - 1) :]
    return False


def test_restored_guest_serves_clients_and_holds_the_secret(running: RunningGuest) -> None:
    client = running.client()
    client.start()
    time.sleep(1.0)
    result = client.stop()
    assert result.http_ok > 0 and result.redis_ok > 0, result.to_dict()
    assert result.writes_acked == result.redis_ok and result.writes_found == result.writes_acked
    assert result.writes_lost == 0
    assert running.guest.status() == "running"
    # The secret: in redis's memory, in the file on the image's disk, and in redis's append-only file
    # (written at the boot, so in the saved overlay).
    assert client.redis_get(REDIS_SECRET_KEY) == DEFAULT_SECRET.encode()
    assert file_contains(running.state.image.disk, DEFAULT_SECRET.encode())
    assert file_contains(running.state.overlay, DEFAULT_SECRET.encode())
    # The cloud kernel (LZ4) was unpacked for PVH boot, sparing its decompressor under TCG.
    assert running.state.image.kernel.read_bytes()[:4] == b"\x7fELF"
    print(f"\n1 s of client traffic: {result.http_ok} pages, {result.writes_acked} writes acknowledged")


def test_client_sees_a_pause_as_an_outage_and_loses_no_write(running: RunningGuest) -> None:
    pause_s = 0.3
    client = running.client()
    client.start()
    time.sleep(1.0)
    running.guest.qmp("stop")
    time.sleep(pause_s)
    running.guest.qmp("cont")
    time.sleep(1.0)
    result = client.stop()
    assert result.longest_gap_ms >= pause_s * 1000, result.to_dict()
    assert result.writes_acked > 0 and result.writes_lost == 0, result.to_dict()
    assert result.http_ok > 0
    print(f"\npaused {pause_s * 1000:.0f} ms: the client saw {result.longest_gap_ms} ms without an answer")


def test_client_counts_the_writes_a_rollback_loses(running: RunningGuest, lab: Testbed) -> None:
    """The negative control: a guest replaced by a fresh copy of the saved state has lost what it acknowledged."""
    client = running.client()
    client.start()
    time.sleep(1.0)
    running.guest.kill()  # the same address and MAC come back from the saved state, without this run's writes
    workdir = short_tmpdir("sld-deb-")
    try:
        replacement, _ = restore_guest(running.state, workdir, TAP, netns=lab.ns("source"))
        try:
            time.sleep(2.0)
            result = client.stop()
        finally:
            replacement.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.writes_lost > 0 and result.writes_found < result.writes_acked, result.to_dict()
