"""T7 for QEMU guests: `sealift migrate VM --to auto` sizes a QEMU guest from the QEMU registry.

Real agents and a real QEMU guest (TCG). host-c lies plausibly in its signed
adverts (15 GiB free, within the 16 GiB registered) but can hold 64 MiB: the
first `--to auto` picks it, its admission re-check refuses the 128 MiB guest
(QemuDestinationDriver reserves the memory before anything moves), the liar is
down-ranked, and the next `--to auto` migrates the guest to host-b. host-b's
own advert then counts the QEMU guest it runs.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentClient
from sealift.backends.qemu.host import QEMU_BINARY
from sealift.cluster import OPERATOR, LocalCluster
from sealift.host.transport import ControlChannel
from sealift.placement.adverts import verify_advert
from sealift.security.identity import HostIdentity
from sealift.wire.messages import Advert, AdvertQuery

pytestmark = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed")

VM = "qvm"
MiB = 1 << 20
HOST_B_CAPACITY = 1 << 30


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    from sealift.backends.qemu.image import build_image, default_cache_dir

    build_image(default_cache_dir())  # cached after the first build
    cluster = LocalCluster(
        hosts=("host-a", "host-b", "host-c"),
        extra_config="step_timeout_s = 20\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        host_config={
            "host-b": 'memory_capacity = "1G"',
            "host-c": 'memory_capacity = "64M"\nlab_advertise_free_memory = "15G"',
        },
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop_guests()
        cluster.cleanup()


def counter(client: AgentClient) -> int | None:
    value = client.request("vm.info", name=VM)["vm"].get("counter")
    return None if value is None else int(value)


def wait_counter(client: AgentClient, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = counter(client)
        if value is not None and value > above:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{VM}: no counter above {above} within {timeout} s")


def migrate_auto(cluster: LocalCluster) -> subprocess.CompletedProcess:
    """`sealift migrate qvm --to auto --json`, as an operator types it on host-a."""
    argv = [
        sys.executable,
        "-m",
        "sealift",
        "migrate",
        VM,
        "--to",
        "auto",
        "--json",
        "--socket",
        str(cluster.agents["host-a"].socket_path),
        "--operator",
        OPERATOR,
        "--operator-dir",
        str(cluster.operators),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)


def said(result: subprocess.CompletedProcess) -> str:
    """What the CLI told the operator on stderr, unwrapped (the console wraps long lines)."""
    return " ".join(result.stderr.split())


def names(cluster: LocalCluster, host: str) -> list[str]:
    return [vm["name"] for vm in cluster.client(host).request("vm.list")["vms"]]


def advert_of(cluster: LocalCluster, host: str) -> int:
    """The free memory `host` claims in its signed advert, asked as host-a."""
    identity = HostIdentity.load(cluster.pki, "host-a")
    channel = ControlChannel.connect(cluster.addresses[host], identity, host, True, 5)
    try:
        channel.send(AdvertQuery(secrets.token_hex(16)))
        reply = channel.recv(5)
        assert isinstance(reply, Advert)
        key = channel.stream.peer_certificate.public_key()  # type: ignore[attr-defined]
        return verify_advert(reply.envelope, key, host, time.time()).advert.free_memory
    finally:
        channel.close()


@pytest.mark.timeout(300)
def test_migrate_to_auto_places_a_qemu_guest_and_a_liar_is_caught_at_admission(cluster: LocalCluster) -> None:
    source = cluster.client("host-a")
    source.request("vm.start", name=VM, backend="qemu", memory="128M", cmdline="sealift.mem_mib=16 sealift.rate_mib=1")
    wait_counter(source, 0, 90)

    # Placement sizes the QEMU guest from the QEMU registry: 128 MiB.
    placement = source.request("place", vm=VM)["placement"]
    assert placement["host"] == "host-c", placement["reason"]  # the plausible lie wins on paper
    assert "for a 128 MiB VM" in placement["reason"]

    # --to auto follows it; host-c's admission re-check refuses before anything moves.
    refused = migrate_auto(cluster)
    assert refused.returncode != 0
    assert "placement: qvm → host-c" in said(refused), said(refused)
    failure = json.loads(refused.stdout)
    assert failure["status"] == "failed"
    assert "free of 64 MiB" in failure["error"] and "needs 128 MiB" in failure["error"], failure
    assert failure["code"] == "no_memory_capacity", failure  # the destination's reason code, carried in Refuse
    entries = cluster.client("host-c").request("audit.show", kind="migration.refused", limit=10)["entries"]
    reasons = [e["fields"]["reason"] for e in entries]
    assert any("free of 64 MiB" in r for r in reasons), reasons
    assert "no_memory_capacity" in [e["fields"].get("code") for e in entries], entries
    assert names(cluster, "host-c") == [] and names(cluster, "host-a") == [VM]
    before = wait_counter(source, 0, 10)

    # The liar is down-ranked: the next --to auto goes to host-b, and the guest runs on there.
    moved = migrate_auto(cluster)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    report = json.loads(moved.stdout)
    assert report["status"] == "completed" and report["memory_bytes"] == 128 * MiB, report
    assert "placement: qvm → host-b" in said(moved), said(moved)
    assert re.search(r"not chosen: host-c: [^;]*penalty 1\.00 for a false claim", said(moved)), said(moved)
    assert names(cluster, "host-a") == [] and names(cluster, "host-b") == [VM]
    assert wait_counter(cluster.client("host-b"), before, 30) > before

    # host-b's honest advert counts the QEMU guest it now runs.
    assert advert_of(cluster, "host-b") == HOST_B_CAPACITY - 128 * MiB


@pytest.mark.timeout(200)
def test_admission_counts_the_qemu_guests_a_host_already_runs() -> None:
    """host-b (256 MiB) runs a 160 MiB QEMU guest: a 128 MiB guest no longer fits, whatever anyone advertises."""
    from sealift.backends.qemu.image import build_image, default_cache_dir

    build_image(default_cache_dir())
    cluster = LocalCluster(
        extra_config="step_timeout_s = 20\nhandshake_timeout_s = 5", host_config={"host-b": 'memory_capacity = "256M"'}
    )
    try:
        cluster.start()
        cmdline = "sealift.mem_mib=16 sealift.rate_mib=1"
        cluster.client("host-b").request("vm.start", name="resident", backend="qemu", memory="160M", cmdline=cmdline)
        cluster.client("host-a").request("vm.start", name=VM, backend="qemu", memory="128M", cmdline=cmdline)
        wait_counter(cluster.client("host-a"), 0, 90)
        assert advert_of(cluster, "host-b") == 96 * MiB
        report_or_error = ""
        try:
            cluster.migrate(VM, "host-a", "host-b")
        except Exception as exc:  # noqa: BLE001 - the refusal is the point
            report_or_error = str(exc)
        assert "has 96 MiB free of 256 MiB; the VM needs 128 MiB" in report_or_error, report_or_error
        assert names(cluster, "host-a") == [VM] and names(cluster, "host-b") == ["resident"]
    finally:
        cluster.stop_guests()
        cluster.cleanup()
