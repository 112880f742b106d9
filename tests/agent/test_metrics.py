"""The agents' metrics endpoints, scraped during and after real migrations (agent/metrics.py).

host-a serves on the top-level `metrics_listen` with its monitors off;
host-b on the older `[monitor] metrics_listen`, monitors on. Every scrape
must also pass `promtool check metrics` (Debian's `prometheus` package).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster, free_port

VM = "vm-metrics"
PROMTOOL = shutil.which("promtool")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    ports = {"host-a": free_port(), "host-b": free_port()}
    cluster = LocalCluster(
        host_config={
            "host-a": f'metrics_listen = "127.0.0.1:{ports["host-a"]}"\n'
            "step_timeout_s = 8\n[guard]\nmax_connections_per_peer = 2\n[monitor]\nenabled = false\n",
            # host-b holds 1 s after Commit, so the source's phase series is seen leaving pre-copy however
            # loaded the machine is (its stop-and-copy alone can fall between two scrapes).
            "host-b": 'step_timeout_s = 8\nlab_pause_at = "commit-received"\nlab_pause_s = 1\n'
            f'[monitor]\nmetrics_listen = "127.0.0.1:{ports["host-b"]}"\n',
        },
    )
    # host-a takes no migration from host-b: the refused one below, counted at both ends under its code.
    (cluster.root / "host-a" / "policy.toml").write_text(
        '[[rule]]\nroles = ["admin"]\nvms = ["*"]\nfrom = ["host-a"]\nto = ["host-b"]\n'
    )
    cluster.metrics_ports = ports  # type: ignore[attr-defined] # the test's own note on the cluster
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


def scrape_text(cluster: LocalCluster, host: str) -> str:
    port = cluster.metrics_ports[host]  # type: ignore[attr-defined]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def in_flight_phase(samples: Samples) -> str | None:
    for (name, labels), v in samples.items():
        if name == "sealift_migration_phase" and v == 1 and ("vm", VM) in labels:
            return dict(labels)["phase"]
    return None


def promtool_check(text: str) -> None:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus (scripts/run.sh does)"
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(240)
def test_a_migration_moves_its_in_flight_series_forward_and_its_totals_match_the_report(
    cluster: LocalCluster,
) -> None:
    src = cluster.client("host-a")
    src.request("vm.start", name=VM, memory="128M", workload="db")  # a hot quarter rewritten all the time
    time.sleep(0.5)
    outcome: dict = {}

    def run() -> None:
        try:
            # Paced to 48 MiB/s so that it takes a few seconds and several rounds.
            outcome["report"] = cluster.migrate(VM, "host-a", "host-b", {"bandwidth_limit_bps": 48 << 20})
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    seen: list[tuple[float, float, float, str | None]] = []  # processed, progress, round, phase
    during = ""
    while thread.is_alive():
        text = scrape_text(cluster, "host-a")
        samples = parse(text)
        processed = value(samples, "sealift_migration_processed_bytes", vm=VM)
        if processed is not None:
            progress = value(samples, "sealift_migration_progress_ratio", vm=VM) or 0.0
            seen.append(
                (processed, progress, value(samples, "sealift_migration_round", vm=VM) or 0.0, in_flight_phase(samples))
            )
            during = text
        time.sleep(0.1)
    thread.join()
    assert "report" in outcome, outcome
    report = outcome["report"]
    assert report["status"] == "completed" and report["rounds"] >= 2, report

    assert len(seen) >= 5, seen
    for before, after in zip(seen, seen[1:]):
        assert after[0] >= before[0], "processed bytes never decrease"
        assert after[1] >= before[1], "progress never decreases"
        assert after[2] >= before[2], "rounds only go forward"
    assert 0 <= seen[-1][1] <= 1 and seen[-1][0] > 64 << 20
    assert len({phase for *_, phase in seen}) >= 2, "the phase series moved"
    assert max(r for _, _, r, _ in seen) >= 1
    promtool_check(during)

    after_text = scrape_text(cluster, "host-a")
    promtool_check(after_text)
    a = parse(after_text)
    assert value(a, "sealift_migration_processed_bytes", vm=VM) is None, "in-flight series go with the migration"
    kinds = {"backend": "builtin", "transport": "tls"}
    assert value(a, "sealift_migrations_started_total", role="source", **kinds) == 1
    assert value(a, "sealift_migrations_completed_total", role="source", **kinds) == 1
    assert value(a, "sealift_migration_sent_bytes_sum", **kinds) == report["bytes_sent"]
    assert value(a, "sealift_migration_sent_bytes_count", **kinds) == 1
    assert value(a, "sealift_migration_duration_seconds_sum", **kinds) == pytest.approx(report["total_time_s"])
    assert value(a, "sealift_migration_downtime_seconds_sum", **kinds) == pytest.approx(report["downtime_ms"] / 1000)
    assert value(a, "sealift_migration_downtime_seconds_count", **kinds) == 1
    assert value(a, "sealift_handover_commits_total", role="source") == 1

    b_text = scrape_text(cluster, "host-b")
    promtool_check(b_text)
    b = parse(b_text)
    assert value(b, "sealift_migrations_started_total", role="destination", **kinds) == 1
    assert value(b, "sealift_migrations_completed_total", role="destination", **kinds) == 1
    assert value(b, "sealift_handover_commits_total", role="destination") == 1
    connections = value(b, "sealift_port_events_total", kind="connection") or 0
    assert connections >= 2, "the monitor's metrics share host-b's registry (control and data connections)"


@pytest.mark.timeout(120)
def test_a_refused_migration_counts_under_its_reason_at_both_ends_and_guard_refusals_by_reason(
    cluster: LocalCluster,
) -> None:
    if VM not in [vm["name"] for vm in cluster.client("host-b").request("vm.list")["vms"]]:
        cluster.client("host-b").request("vm.start", name=VM, memory="32M", workload="idle")
    with pytest.raises(AgentRequestFailed) as refused:
        cluster.migrate(VM, "host-b", "host-a")
    code = refused.value.code
    assert code == "denied_by_policy", refused.value
    b = parse(scrape_text(cluster, "host-b"))
    kinds = {"backend": "builtin", "transport": "tls"}
    assert value(b, "sealift_migrations_failed_total", role="source", reason=code, **kinds) == 1
    a = parse(scrape_text(cluster, "host-a"))
    assert value(a, "sealift_migrations_failed_total", role="destination", reason=code, **kinds) == 1
    assert value(a, "sealift_migrations_started_total", role="destination", **kinds) == 1

    # Three silent connections from one address: host-a admits two ([guard] max_connections_per_peer = 2).
    address = cluster.addresses["host-a"]
    held = [socket.create_connection(address, timeout=5) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            a_text = scrape_text(cluster, "host-a")
            if value(parse(a_text), "sealift_port_refusals_total", stage="connection", reason="peer_limit"):
                break
            time.sleep(0.1)
        assert value(parse(a_text), "sealift_port_refusals_total", stage="connection", reason="peer_limit") == 1
        promtool_check(a_text)
    finally:
        for sock in held:
            sock.close()


@pytest.mark.timeout(150)
def test_an_in_doubt_handover_is_counted_through_recovery_and_the_resolver() -> None:
    """The destination dies right after reading Commit: in doubt at the source, recovered and resolved after."""
    ports = {"host-a": free_port(), "host-b": free_port()}
    cluster = LocalCluster(
        extra_config="step_timeout_s = 8\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        host_config={
            "host-a": f'metrics_listen = "127.0.0.1:{ports["host-a"]}"\n',
            "host-b": f'metrics_listen = "127.0.0.1:{ports["host-b"]}"\nlab_pause_at = "commit-received"\n',
        },
    )
    cluster.metrics_ports = ports  # type: ignore[attr-defined] # the test's own note on the cluster
    try:
        cluster.start()
        cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
        with pytest.raises(AgentRequestFailed, match="stays paused on host-a"):
            thread = threading.Thread(target=lambda: wait_and_kill(cluster))
            thread.start()
            try:
                cluster.migrate(VM, "host-a", "host-b")
            finally:
                thread.join()
        a = parse(scrape_text(cluster, "host-a"))
        assert value(a, "sealift_handover_commits_total", role="source") == 1
        assert value(a, "sealift_handover_in_doubt_total", role="source") == 1
        cluster.start("host-b")  # recovery holds the prepared record; both resolvers settle it as committed

        def settled() -> bool:
            a, b = parse(scrape_text(cluster, "host-a")), parse(scrape_text(cluster, "host-b"))
            return bool(
                value(a, "sealift_handover_resolved_total", role="source", outcome="committed")
                and value(b, "sealift_handover_resolved_total", role="destination", outcome="committed")
            )

        wait_until(settled, 40)
        b_text = scrape_text(cluster, "host-b")
        promtool_check(b_text)
        assert value(parse(b_text), "sealift_recovery_migrations_total", role="destination", phase="prepared") == 1
    finally:
        cluster.cleanup()


def log_of(cluster: LocalCluster, host: str) -> str:
    return cluster.agents[host].log_path.read_text(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def wait_and_kill(cluster: LocalCluster) -> None:
    wait_until(lambda: "paused at commit-received" in log_of(cluster, "host-b"), 60)
    cluster.kill("host-b", signal.SIGKILL)
