"""A QEMU guest's migration on the agents' metrics endpoints (agent/metrics.py): in flight, then in the totals."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sealift.cluster import LocalCluster, free_port

VM = "qvm-metrics"
PORTS: dict[str, int] = {}


@pytest.fixture
def cluster(guest_image: object) -> Iterator[LocalCluster]:
    PORTS.update({"host-a": free_port(), "host-b": free_port()})
    cluster = LocalCluster(
        extra_config="step_timeout_s = 15\nhandshake_timeout_s = 5",
        host_config={host: f'metrics_listen = "127.0.0.1:{port}"\n' for host, port in PORTS.items()},
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop_guests()  # QEMU outlives its agent by design
        cluster.cleanup()


def scrape(host: str) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORTS[host]}/metrics", timeout=5).read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def wait_counter(cluster: LocalCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (cluster.client("host-a").request("vm.info", name=VM)["vm"].get("counter") or 0) > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{VM} did not start counting within {timeout} s")


@pytest.mark.timeout(240)
def test_a_qemu_migration_is_followed_in_flight_and_counted_by_backend_and_transport(cluster: LocalCluster) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: apt-get install prometheus (scripts/run.sh does)"
    cluster.client("host-a").request(
        "vm.start", name=VM, backend="qemu", memory="128M", cmdline="sealift.mem_mib=32 sealift.rate_mib=8"
    )
    wait_counter(cluster, 90)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(report=cluster.migrate(VM, "host-a", "host-b")))
    thread.start()
    processed: list[float] = []
    while thread.is_alive():
        _, samples = scrape("host-a")
        value = samples.get(("sealift_migration_processed_bytes", frozenset({("vm", VM)})))
        if value is not None:
            processed.append(value)
        time.sleep(0.1)
    thread.join()
    report = outcome["report"]
    assert report["status"] == "completed", report
    assert processed and processed == sorted(processed), processed

    text, a = scrape("host-a")
    kinds = frozenset({("backend", "qemu"), ("transport", "sealift")})
    assert a[("sealift_migrations_completed_total", kinds | {("role", "source")})] == 1
    assert a[("sealift_migration_sent_bytes_sum", kinds)] == report["bytes_sent"]
    assert a[("sealift_migration_downtime_seconds_sum", kinds)] == pytest.approx(report["downtime_ms"] / 1000)
    assert ("sealift_migration_processed_bytes", frozenset({("vm", VM)})) not in a
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    _, b = scrape("host-b")
    at_b = frozenset({("backend", "qemu"), ("transport", "tls"), ("role", "destination")})
    assert b[("sealift_migrations_completed_total", at_b)] == 1
