"""The agent's metrics without agents: the in-flight estimator and the series' life (agent/metrics.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealift.agent.metrics import AgentMetrics, MigrationProgress
from sealift.host.config import config_from_dict
from sealift.migration.report import MigrationReport
from sealift.migration.session import ProgressEvent

VM = "vm1"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"vm": VM, **labels} if "vm" not in labels else labels)


def transfer(wire: int, remaining: int, round_no: int = 0) -> ProgressEvent:
    return ProgressEvent(
        "transfer",
        {"round": round_no, "pages_done": 0, "pages_total": 0, "wire_bytes": wire, "remaining_bytes": remaining},
    )


def round_end(round_no: int, dirty_pages: int, duration_s: float, final: bool = False) -> ProgressEvent:
    return ProgressEvent(
        "round", {"round": round_no, "dirty_pages_left": dirty_pages, "duration_s": duration_s, "final": final}
    )


def report(**fields: object) -> MigrationReport:
    return MigrationReport(migration_id="m1", vm=VM, source="host-a", destination="host-b", transport="tls", **fields)  # type: ignore[arg-type]


def test_a_round_that_finds_more_dirty_memory_holds_progress_instead_of_running_it_backwards() -> None:
    metrics, clock = AgentMetrics(), Clock()
    flight = MigrationProgress(metrics.in_flight, VM, clock)
    flight.begin("m1", "host-b", "builtin", "tls")
    flight.observe(transfer(0, 100 << 20))
    clock.now = 1.0
    flight.observe(transfer(50 << 20, 50 << 20))
    assert sample(metrics, "sealift_migration_progress_ratio") == 0.5
    assert sample(metrics, "sealift_migration_throughput_bytes_per_second") == 50 << 20
    clock.now = 2.0
    flight.observe(transfer(90 << 20, 10 << 20))
    assert sample(metrics, "sealift_migration_progress_ratio") == 0.9
    # The round ends with 40 MiB dirty: the raw estimate says 90/130, but progress stays at 0.9.
    flight.observe(round_end(0, (40 << 20) // 4096, 2.0))
    assert sample(metrics, "sealift_migration_progress_ratio") == 0.9
    assert sample(metrics, "sealift_migration_remaining_bytes") == pytest.approx(10 << 20)  # processed x (1 - p) / p
    assert sample(metrics, "sealift_migration_round") == 1
    assert sample(metrics, "sealift_migration_dirty_rate_bytes_per_second") == (40 << 20) / 2.0
    assert sample(metrics, "sealift_migration_expected_downtime_seconds") == (40 << 20) / (40 << 20)
    flight.observe(ProgressEvent("phase", {"phase": "precopy"}))
    assert sample(metrics, "sealift_migration_phase", vm=VM, phase="precopy") == 1
    assert sample(metrics, "sealift_migration_phase", vm=VM, phase="started") == 0
    flight.end()
    assert sample(metrics, "sealift_migration_progress_ratio") is None, "the series go with the migration"
    assert sample(metrics, "sealift_migration_phase", vm=VM, phase="precopy") is None
    labels = {"vm": VM, "migration_id": "m1", "destination": "host-b", "backend": "builtin", "transport": "tls"}
    assert metrics.registry.get_sample_value("sealift_migration_in_flight_info", labels) is None


@given(st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 1 << 30), st.booleans()), max_size=40))
def test_processed_and_progress_never_run_backwards(steps: list[tuple[int, int, bool]]) -> None:
    metrics = AgentMetrics()
    flight = MigrationProgress(metrics.in_flight, VM, Clock())
    processed, progress = 0.0, 0.0
    for index, (wire, left, is_round) in enumerate(steps):
        flight.observe(round_end(index, left // 4096, 1.0) if is_round else transfer(wire, left, index))
        now_processed = sample(metrics, "sealift_migration_processed_bytes") or 0.0
        now_progress = sample(metrics, "sealift_migration_progress_ratio") or 0.0
        assert now_processed >= processed and now_progress >= progress and 0.0 <= now_progress <= 1.0
        processed, progress = now_processed, now_progress


def test_totals_count_completed_and_failed_outgoing_migrations_by_reason() -> None:
    metrics = AgentMetrics()
    done = report(status="completed", total_time_s=3.5, downtime_ms=120.0, bytes_sent=200 << 20)
    flight = metrics.outgoing(VM)
    metrics.outgoing_started(flight, done, "builtin")
    metrics.outgoing_finished(flight, done, "builtin", "completed", None)
    failed = report(status="failed", error_code="denied_by_policy")
    flight = metrics.outgoing(VM)
    metrics.outgoing_started(flight, failed, "builtin")
    metrics.outgoing_finished(flight, failed, "builtin", "aborted", "denied_by_policy")
    kinds = {"role": "source", "backend": "builtin", "transport": "tls"}
    get = metrics.registry.get_sample_value
    assert get("sealift_migrations_started_total", kinds) == 2
    assert get("sealift_migrations_completed_total", kinds) == 1
    assert get("sealift_migrations_failed_total", {**kinds, "reason": "denied_by_policy"}) == 1
    by = {"backend": "builtin", "transport": "tls"}
    assert get("sealift_migration_duration_seconds_sum", by) == 3.5
    assert get("sealift_migration_downtime_seconds_sum", by) == 0.12
    assert get("sealift_migration_sent_bytes_count", by) == 1
    assert get("sealift_handover_commits_total", {"role": "source"}) == 1


def test_the_top_level_metrics_listen_wins_and_the_monitor_s_still_works(tmp_path: Path) -> None:
    base = {"name": "h", "listen": "127.0.0.1:7000", "control_socket": "c", "state_dir": "s", "identity_dir": "i"}
    assert config_from_dict(base, tmp_path).metrics_address is None
    legacy = config_from_dict({**base, "monitor": {"metrics_listen": "127.0.0.1:9464"}}, tmp_path)
    assert legacy.metrics_address == ("127.0.0.1", 9464)
    both = config_from_dict(
        {**base, "metrics_listen": "127.0.0.1:9500", "monitor": {"metrics_listen": "127.0.0.1:9464"}}, tmp_path
    )
    assert both.metrics_address == ("127.0.0.1", 9500)
