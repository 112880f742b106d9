"""The agent's Prometheus metrics: one registry per agent, served on one HTTP endpoint.

The agent owns the registry and the endpoint (`metrics_listen`, or the older
`[monitor] metrics_listen`), so migration metrics are there also when the
monitors are off; the monitor registers its own metrics into the same
registry (monitor/service.py). Names and meanings: docs/operations.md.

Nothing here runs per record: the in-flight series move on the migration's
progress events (one per round, at most ~10 transfer events a second, one
per phase), the totals once per migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sealift.migration.phases import Phase
from sealift.migration.report import MigrationReport
from sealift.migration.session import ProgressCallback, ProgressEvent

PAGE_SIZE = 4096  # both backends' guest page (the built-in VM's and x86 QEMU's)
RATE_WINDOW_S = 1.0  # throughput is measured over at least this much time between transfer events

# Every phase an outgoing migration can be in, for the 0/1 phase series (an enum, the Prometheus way).
SOURCE_PHASES = tuple(
    p.value
    for p in (
        Phase.STARTED,
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.HANDED_OVER,
        Phase.COMMITTED,
        Phase.IN_DOUBT,
        Phase.COMPLETED,
        Phase.ABORTED,
    )
)

# Buckets: migrations here take from a fraction of a second (a small idle guest) to minutes (a
# write-heavy guest over a slow link); downtime from milliseconds to seconds; images from MiBs to GiBs.
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BYTES_BUCKETS = tuple(float(1 << shift) for shift in range(20, 37, 2))  # 1 MiB .. 64 GiB, x4


class InFlightGauges:
    """The gauges of migrations in progress on this source, one series per VM (see `MigrationProgress`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, ["vm", *extra], registry=registry)

        self.info = gauge(
            "sealift_migration_in_flight_info",
            "1 for each outgoing migration in progress (its id, destination, backend and transport)",
            "migration_id",
            "destination",
            "backend",
            "transport",
        )
        self.phase = gauge("sealift_migration_phase", "1 for the phase the outgoing migration is in, else 0", "phase")
        self.round = gauge("sealift_migration_round", "Pre-copy round the outgoing migration is in (0 = the first)")
        self.processed = gauge(
            "sealift_migration_processed_bytes", "Bytes this migration has sent so far (never decreases)"
        )
        self.remaining = gauge(
            "sealift_migration_remaining_bytes",
            "Estimated bytes still to send (consistent with progress_ratio, see docs/operations.md)",
        )
        self.progress = gauge(
            "sealift_migration_progress_ratio", "processed / (processed + remaining), 0..1, never decreases"
        )
        self.dirty_rate = gauge(
            "sealift_migration_dirty_rate_bytes_per_second", "How fast the guest dirtied memory in the last round"
        )
        self.throughput = gauge(
            "sealift_migration_throughput_bytes_per_second", "Bytes per second sent over the last second or more"
        )
        self.expected_downtime = gauge(
            "sealift_migration_expected_downtime_seconds",
            "How long the guest would stay paused if pre-copy stopped now (dirty bytes / throughput)",
        )
        self.eta = gauge("sealift_migration_eta_seconds", "Estimated seconds until the last byte is sent")
        self._per_vm = (
            self.round,
            self.processed,
            self.remaining,
            self.progress,
            self.dirty_rate,
            self.throughput,
            self.expected_downtime,
            self.eta,
        )

    def remove(self, vm: str, info: tuple[str, str, str, str] | None) -> None:
        """Drop every series of this VM's migration: it is no longer in flight."""
        for gauge in self._per_vm:
            _remove(gauge, vm)
        for phase in SOURCE_PHASES:
            _remove(self.phase, vm, phase)
        if info is not None:
            _remove(self.info, vm, *info)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:  # never set (the migration failed before that value was known)
        pass


class MigrationProgress:
    """One outgoing migration's in-flight series, moved by its progress events.

    `processed` is the largest `wire_bytes` seen, so it never decreases.
    `remaining` is the backend's estimate of what is left (see docs/operations.md:
    unsent pages of the current round plus the pages dirtied since it began),
    clamped so that `progress` = processed / (processed + remaining) never
    decreases: when a round finds more dirty memory than expected, the
    progress waits (and remaining is reported as processed x (1 - p) / p)
    rather than running backwards.
    """

    def __init__(self, gauges: InFlightGauges, vm: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._g = gauges
        self._vm = vm
        self._clock = clock
        self._lock = threading.Lock()  # events come from the driver's and the coordinator's threads
        self._info: tuple[str, str, str, str] | None = None
        self.processed = 0
        self.round = 0
        self.progress = 0.0
        self.remaining = 0.0
        self._throughput = 0.0
        self._rate_mark: tuple[float, int] | None = None  # (time, processed) where the rate window began
        self._dirty_bytes = 0.0  # at the last round's end

    def begin(self, migration_id: str, destination: str, backend: str, transport: str) -> None:
        with self._lock:
            self._info = (migration_id, destination, backend, transport)
            self._rate_mark = (self._clock(), 0)  # the first window starts with the migration
            self._g.info.labels(self._vm, *self._info).set(1)
            self._set_phase(Phase.STARTED.value)

    def observe(self, event: ProgressEvent) -> None:
        with self._lock:
            if event.kind == "phase":
                self._set_phase(str(event.data["phase"]))
            elif event.kind == "transfer":
                self._on_transfer(event.data)
            elif event.kind == "round":
                self._on_round(event.data)

    def end(self) -> None:
        with self._lock:
            self._g.remove(self._vm, self._info)

    # -- events -----------------------------------------------------------------

    def _set_phase(self, phase: str) -> None:
        for name in SOURCE_PHASES:
            self._g.phase.labels(self._vm, name).set(1 if name == phase else 0)

    def _on_transfer(self, data: dict[str, object]) -> None:
        self._set_round(_int(data, "round"))
        self._advance(_int(data, "wire_bytes"))
        if "remaining_bytes" in data:
            left = _int(data, "remaining_bytes")
        else:  # the current round's unsent pages: a backend that does not estimate more
            left = max(0, _int(data, "pages_total") - _int(data, "pages_done")) * PAGE_SIZE
        self._estimate(left)

    def _on_round(self, data: dict[str, object]) -> None:
        duration = float(data.get("duration_s", 0.0) or 0.0)  # type: ignore[arg-type] # RoundReport.to_dict
        dirty = _int(data, "dirty_pages_left") * PAGE_SIZE
        final = bool(data.get("final", False))
        self._set_round(_int(data, "round") + (0 if final else 1))  # a round's end: the next one begins
        if not final and duration > 0:
            self._g.dirty_rate.labels(self._vm).set(dirty / duration)
        self._dirty_bytes = 0.0 if final else float(dirty)
        self._estimate(0 if final else dirty)  # what the next round (or the stop-and-copy) must send

    def _set_round(self, round_no: int) -> None:
        self.round = max(self.round, round_no)  # a late event of the last round must not take it back
        self._g.round.labels(self._vm).set(self.round)

    def _advance(self, wire_bytes: int) -> None:
        if wire_bytes <= self.processed:
            return
        self.processed = wire_bytes
        self._g.processed.labels(self._vm).set(self.processed)
        now = self._clock()
        if self._rate_mark is None:
            self._rate_mark = (now, wire_bytes)
        elif now - self._rate_mark[0] >= RATE_WINDOW_S:
            self._throughput = (wire_bytes - self._rate_mark[1]) / (now - self._rate_mark[0])
            self._rate_mark = (now, wire_bytes)
            self._g.throughput.labels(self._vm).set(self._throughput)

    def _estimate(self, raw_remaining: int) -> None:
        total = self.processed + raw_remaining
        if total > 0:
            self.progress = max(self.progress, self.processed / total)
        if self.progress > 0:
            self.remaining = self.processed * (1.0 - self.progress) / self.progress
        else:
            self.remaining = float(raw_remaining)
        self._g.progress.labels(self._vm).set(self.progress)
        self._g.remaining.labels(self._vm).set(self.remaining)
        if self._throughput > 0:
            self._g.eta.labels(self._vm).set(self.remaining / self._throughput)
            self._g.expected_downtime.labels(self._vm).set(self._dirty_bytes / self._throughput)


def _int(data: dict[str, object], key: str) -> int:
    return int(data.get(key, 0) or 0)  # type: ignore[call-overload] # the events' numbers (session.progress)


class AgentMetrics:
    """Every metric of one agent, in its own registry (two agents in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        kinds = ["role", "backend", "transport"]
        self.started = Counter("sealift_migrations_started", "Migrations begun, by role", kinds, registry=r)
        self.completed = Counter("sealift_migrations_completed", "Migrations completed", kinds, registry=r)
        self.failed = Counter(
            "sealift_migrations_failed", "Migrations failed or refused, by reason code", [*kinds, "reason"], registry=r
        )
        by = ["backend", "transport"]
        self.duration = Histogram(
            "sealift_migration_duration_seconds",
            "Total time of completed outgoing migrations",
            by,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.downtime = Histogram(
            "sealift_migration_downtime_seconds",
            "Downtime of completed outgoing migrations (source pause to the destination's running receipt)",
            by,
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.sent = Histogram(
            "sealift_migration_sent_bytes",
            "Bytes sent by completed outgoing migrations",
            by,
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.in_flight = InFlightGauges(r)
        self.commits = Counter(
            "sealift_handover_commits",
            "Handovers decided commit (source: decision durable; destination: guest started)",
            ["role"],
            registry=r,
        )
        self.in_doubt = Counter(
            "sealift_handover_in_doubt",
            "Migrations left in doubt (failed after prepare or commit)",
            ["role"],
            registry=r,
        )
        self.resolved = Counter(
            "sealift_handover_resolved", "In-doubt migrations the resolver settled", ["role", "outcome"], registry=r
        )
        self.recovered = Counter(
            "sealift_recovery_migrations",
            "Migrations found open at agent start, by role and the phase recovery left them in",
            ["role", "phase"],
            registry=r,
        )
        self.port_refusals = Counter(
            "sealift_port_refusals", "Refusals of the migration port's guard", ["stage", "reason"], registry=r
        )
        self._server: Any = None

    # -- the endpoint -----------------------------------------------------------

    def serve(self, address: tuple[str, int]) -> None:
        self._server, _thread = start_http_server(address[1], addr=address[0], registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- migrations ---------------------------------------------------------------

    def outgoing(self, vm: str) -> MigrationProgress:
        return MigrationProgress(self.in_flight, vm)

    def outgoing_started(self, flight: MigrationProgress, report: MigrationReport, backend: str) -> None:
        self.started.labels("source", backend, report.transport).inc()
        flight.begin(report.migration_id, report.destination, backend, report.transport)

    def outgoing_finished(
        self, flight: MigrationProgress, report: MigrationReport, backend: str, phase: str | None, code: str | None
    ) -> None:
        """Count the end of an outgoing migration (`phase`: its record's, None if it never got one)."""
        flight.end()
        transport = report.transport
        if phase in (Phase.COMMITTED.value, Phase.IN_DOUBT.value, Phase.COMPLETED.value):
            self.commits.labels("source").inc()
        if phase == Phase.IN_DOUBT.value:
            self.in_doubt.labels("source").inc()
        if report.status == "completed":
            self.completed.labels("source", backend, transport).inc()
            self.duration.labels(backend, transport).observe(report.total_time_s)
            self.downtime.labels(backend, transport).observe(report.downtime_ms / 1000.0)
            self.sent.labels(backend, transport).observe(report.bytes_sent)
        else:
            self.failed.labels("source", backend, transport, report.error_code or code or "unknown").inc()

    def incoming_started(self, backend: str, transport: str) -> None:
        self.started.labels("destination", backend, transport).inc()

    def incoming_finished(self, backend: str, transport: str, phase: str | None, code: str | None) -> None:
        """Count an incoming migration once its coordinator returned (`phase`: its record's, None if refused)."""
        if phase == Phase.RUNNING.value:
            self.completed.labels("destination", backend, transport).inc()
            self.commits.labels("destination").inc()
            return
        if phase == Phase.IN_DOUBT.value:
            self.in_doubt.labels("destination").inc()
        self.failed.labels("destination", backend, transport, code or "unknown").inc()

    def handover_resolved(self, role: str, outcome: str) -> None:
        self.resolved.labels(role, outcome).inc()

    def recovered_at_start(self, role: str, phase: str) -> None:
        self.recovered.labels(role, phase).inc()

    def port_refused(self, stage: str, reason: str) -> None:
        self.port_refusals.labels(stage, reason).inc()

    def progress_observer(self, flight: MigrationProgress, then: ProgressCallback | None) -> ProgressCallback:
        """A progress callback that moves `flight` and passes each event on to `then`."""

        def observe(event: ProgressEvent) -> None:
            flight.observe(event)
            if then is not None:
                then(event)

        return observe
