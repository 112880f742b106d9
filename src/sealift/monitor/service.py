"""The monitor inside the agent: a sampling thread, verdicts, actions, metrics.

Every `period_s` the service asks the collectors (the per-VM monitors) for
one sample per VM, feeds them to the host monitor (`HostMonitor`), and acts
on what changed, by policy:

- every raised or cleared verdict is an audit entry (`monitor.verdict`,
  `monitor.cleared`) and a log line (the alert);
- *attacker*: migrations of the VM are held (refused with
  `vm_flagged_attacker`, audited as `monitor.migration_refused`), so a
  compromised VM is not spread to other hosts;
- *victim*: the VM becomes an evacuation candidate (`monitor.action`,
  action `evacuate_recommended`, with `[monitor] evacuate_victims_to` if set).
  The agent does not start that migration itself: every migration needs an
  operator-signed order, and an agent cannot sign one (by design, T3/T11);
  the operator sees the recommendation in `sealift monitor` and the audit.

The migration-port watch (`PortWatch`) gets the agent's port events; a peer
over the threshold is blocked in the guard and audited
(`monitor.peer_blocked`). The same events feed `FloodWatch`, which notices a
flood spread over many addresses (each under its own threshold): the start
and the end of each episode are audited once (`monitor.port_flood`, code
`port_flood`; `monitor.port_flood_ended`) and exported as metrics.

Metrics: registered into the agent's registry (agent/metrics.py), which
the agent serves on its endpoint; the monitor serves nothing itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sealift.migration import gate
from sealift.migration.gate import VM_FLAGGED_ATTACKER, MonitorRefusal
from sealift.monitor.baseline import BaselineConfig
from sealift.monitor.classify import ClassifierConfig, HostMonitor
from sealift.monitor.portwatch import FloodConfig, FloodReport, FloodWatch, PortWatch, PortWatchConfig
from sealift.monitor.reliability import ReliabilityConfig
from sealift.monitor.signals import SIGNALS, VmSample
from sealift.monitor.verdicts import ATTACKER, VICTIM, MonitorEvent

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

AuditFn = Callable[..., None]
FORGET_AFTER_S = 5.0  # a VM missing from its registry this long has left the host


@dataclass(frozen=True)
class MonitorConfig:
    """`[monitor]` in the agent's TOML config."""

    enabled: bool = True
    period_s: float = 1.0
    # The agent's metrics endpoint, e.g. 127.0.0.1:9464 (still read here; the top-level metrics_listen wins).
    metrics_listen: tuple[str, int] | None = None
    # Defaults: the classifier's and the watches' own, so that each is set in one place.
    warmup_samples: int = BaselineConfig.warmup
    half_life_samples: float = BaselineConfig.half_life
    z_threshold: float = BaselineConfig.z_threshold
    min_ratio: float = BaselineConfig.min_ratio
    confirm_samples: int = ClassifierConfig.confirm
    clear_after_samples: int = ClassifierConfig.clear_after
    stall_after_s: float = ReliabilityConfig.stall_after_s
    refuse_attacker_migrations: bool = True
    evacuate_victims_to: str | None = None
    ids_threshold: float = PortWatchConfig.threshold
    ids_window_s: float = PortWatchConfig.window_s
    ids_block_s: float = PortWatchConfig.block_s
    flood_window_s: float = FloodConfig.window_s
    flood_min_unfinished: int = FloodConfig.min_unfinished
    flood_min_addresses: int = FloodConfig.min_addresses
    flood_min_share: float = FloodConfig.min_share

    def __post_init__(self) -> None:
        if not 0.05 <= self.period_s <= 3600:
            raise ValueError("period_s must be within [0.05, 3600] seconds")
        self.classifier()  # validates the rest
        self.port_watch()
        self.flood_watch()

    def classifier(self) -> ClassifierConfig:
        return ClassifierConfig(
            baseline=BaselineConfig(
                half_life=self.half_life_samples,
                warmup=self.warmup_samples,
                z_threshold=self.z_threshold,
                min_ratio=self.min_ratio,
            ),
            confirm=self.confirm_samples,
            clear_after=self.clear_after_samples,
            reliability=ReliabilityConfig(stall_after_s=self.stall_after_s),
        )

    def port_watch(self) -> PortWatchConfig:
        return PortWatchConfig(threshold=self.ids_threshold, window_s=self.ids_window_s, block_s=self.ids_block_s)

    def flood_watch(self) -> FloodConfig:
        return FloodConfig(
            window_s=self.flood_window_s,
            min_unfinished=self.flood_min_unfinished,
            min_addresses=self.flood_min_addresses,
            min_share=self.flood_min_share,
        )


class Collector(Protocol):
    def collect(self) -> list[VmSample]: ...


class Blocker(Protocol):
    def block(self, peer_ip: str, seconds: float, reason: str) -> None: ...


class MonitorService:
    def __init__(
        self,
        host: str,
        config: MonitorConfig,
        collectors: list[Collector],
        audit: AuditFn,
        blocker: Blocker | None = None,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self._collectors = collectors
        self._audit = audit
        self._blocker = blocker
        self._clock = clock
        self._lock = threading.Lock()
        self.monitor = HostMonitor(config.classifier())
        self.port_watch = PortWatch(config.port_watch(), clock)
        self.flood_watch = FloodWatch(config.flood_watch(), clock)
        self._recommendations: dict[str, str] = {}
        self._absent_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._metrics = _Metrics(registry) if registry is not None else None
        self.rounds = 0
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        gate.install(self.host, self)
        if self.config.enabled:
            self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        gate.uninstall(self.host, self)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_round = self._clock()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:  # the monitor must never take the agent down
                self.last_error = str(exc)
                log.exception("monitor round failed")
            next_round += self.config.period_s
            self._stop.wait(max(0.0, next_round - self._clock()))
            next_round = max(next_round, self._clock() - self.config.period_s)  # no catch-up burst

    # -- sampling ---------------------------------------------------------------

    def sample_once(self) -> list[MonitorEvent]:
        """One round: collect, classify, act. Returns the changes (for tests)."""
        samples = [sample for collector in self._collectors for sample in collector.collect()]
        events: list[MonitorEvent] = []
        with self._lock:
            self._forget_departed({s.vm for s in samples})
            for sample in samples:
                events.extend(self.monitor.observe(sample))
            self.rounds += 1
        for event in events:
            self._act(event)
        self.port_tick()
        if self._metrics is not None:
            self._metrics.update(self.snapshot())
        return events

    def _forget_departed(self, present: set[str]) -> None:
        """Forget VMs gone for `FORGET_AFTER_S` (migrated away, stopped), keeping operator flags.

        Not at once: a VM briefly missing from its registry (a workload switch
        restarting its guest) keeps its baseline.
        """
        now = self._clock()
        for vm in present:
            self._absent_since.pop(vm, None)
        for vm in set(self.monitor.vms()) - present:
            since = self._absent_since.setdefault(vm, now)
            verdict = self.monitor.verdict(vm)
            if now - since >= FORGET_AFTER_S and not (verdict is not None and verdict.manual):
                self.monitor.forget(vm)
                self._recommendations.pop(vm, None)
                del self._absent_since[vm]

    def expect_restart(self, vm: str) -> None:
        with self._lock:
            self.monitor.expect_restart(vm)

    # -- actions ------------------------------------------------------------------

    def _act(self, event: MonitorEvent) -> None:
        verdict = event.verdict
        if event.change == "cleared":
            log.info("monitor: %s no longer %s", verdict.vm, verdict.kind)
            self._audit("monitor.cleared", vm=verdict.vm, verdict=verdict.kind, problem=verdict.problem)
            with self._lock:
                if verdict.kind == VICTIM:
                    self._recommendations.pop(verdict.vm, None)
            return
        log.warning("monitor ALERT: %s is %s: %s", verdict.vm, verdict.kind, verdict.reason)
        fields = verdict.to_dict()
        fields["verdict"] = fields.pop("kind")  # `kind` is the audit entry's own field
        self._audit("monitor.verdict", **fields)
        if self._metrics is not None:
            self._metrics.verdicts.labels(kind=verdict.kind).inc()
        if verdict.kind == ATTACKER and self.config.refuse_attacker_migrations:
            self._audit(
                "monitor.action",
                vm=verdict.vm,
                action="hold_migrations",
                reason="a VM flagged attacker is not moved to other hosts",
            )
        elif verdict.kind == VICTIM:
            target = self.config.evacuate_victims_to
            note = (f"move {verdict.vm} to {target}" if target else f"move {verdict.vm} to another host") + (
                " (needs an operator-signed order: `sealift migrate`)"
            )
            with self._lock:
                self._recommendations[verdict.vm] = note
            self._audit("monitor.action", vm=verdict.vm, action="evacuate_recommended", target=target, note=note)

    # -- the migration gate (migration.gate) -----------------------------------

    def check_outgoing(self, vm: str, destination: str) -> None:
        self._check(vm, "outgoing", destination)

    def check_incoming(self, vm: str, source: str) -> None:
        self._check(vm, "incoming", source)

    def _check(self, vm: str, direction: str, peer: str) -> None:
        if not self.config.refuse_attacker_migrations:
            return
        with self._lock:
            verdict = self.monitor.verdict(vm)
        if verdict is None or verdict.kind != ATTACKER:
            return
        since = _ago(verdict.since, self._clock())
        reason = f"{vm} is flagged as an attacker on {self.host} since {since}: {verdict.reason}"
        self._audit(
            "monitor.migration_refused", vm=vm, direction=direction, peer=peer, code=VM_FLAGGED_ATTACKER, reason=reason
        )
        raise MonitorRefusal(VM_FLAGGED_ATTACKER, reason)

    # -- operator flags -------------------------------------------------------

    def flag(self, vm: str, kind: str, reason: str) -> dict[str, object]:
        with self._lock:
            event = self.monitor.flag(vm, kind, reason, self._clock())
        self._act(event)
        return event.verdict.to_dict()

    def unflag(self, vm: str) -> bool:
        with self._lock:
            event = self.monitor.unflag(vm)
        if event is not None:
            self._act(event)
        return event is not None

    # -- the migration-port watch ----------------------------------------------

    def port_event(self, peer_ip: str, kind: str) -> None:
        """An event on the migration port from `peer_ip` (see portwatch.EVENT_WEIGHTS)."""
        block = self.port_watch.record(peer_ip, kind)
        if self._metrics is not None:
            self._metrics.port_events.labels(kind=kind).inc()
        flood = self.flood_watch.record(peer_ip, kind)
        if flood is not None:
            self._report_flood(flood)
        if block is None:
            return
        log.warning("monitor ALERT: blocking %s for %.0f s: %s", block.peer, block.seconds, block.reason)
        if self._blocker is not None:
            self._blocker.block(block.peer, block.seconds, block.reason)
        self._audit(
            "monitor.peer_blocked",
            peer=block.peer,
            seconds=block.seconds,
            score=block.score,
            counts=block.counts,
            reason=block.reason,
        )
        if self._metrics is not None:
            self._metrics.blocks.inc()

    def port_tick(self) -> None:
        """Time passes on the port: a flood episode ends when no event comes (called each round)."""
        flood = self.flood_watch.tick()
        if flood is not None:
            self._report_flood(flood)
        if self._metrics is not None:
            self._metrics.update_flood(self.flood_watch.snapshot())

    def _report_flood(self, flood: FloodReport) -> None:
        fields: dict[str, object] = {
            "unfinished": flood.unfinished,
            "finished": flood.finished,
            "addresses": flood.addresses,
            "share": round(flood.share, 3),
            "counts": flood.counts,
            "window_s": self.flood_watch.config.window_s,
            "reason": flood.reason,
        }
        if flood.started:
            log.warning("monitor ALERT: flood on the migration port: %s", flood.reason)
            self._audit("monitor.port_flood", code="port_flood", **fields)
            if self._metrics is not None:
                self._metrics.floods.inc()
        else:
            log.warning("monitor: %s", flood.reason)
            self._audit("monitor.port_flood_ended", code="port_flood", duration_s=round(flood.duration_s, 1), **fields)
        if self._metrics is not None:
            self._metrics.update_flood(self.flood_watch.snapshot())

    # -- exposure ---------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            vms = self.monitor.snapshot()
            for row in vms:
                row["recommendation"] = self._recommendations.get(str(row["vm"]))
        return {
            "host": self.host,
            "now": self._clock(),  # the clock of every `since` below
            "period_s": self.config.period_s,
            "rounds": self.rounds,
            "last_error": self.last_error,
            "policy": {
                "refuse_attacker_migrations": self.config.refuse_attacker_migrations,
                "evacuate_victims_to": self.config.evacuate_victims_to,
            },
            "vms": vms,
            "peers": self.port_watch.snapshot(),
            "port_flood": self.flood_watch.snapshot(),
        }


def _ago(since: float, now: float) -> str:
    return f"{max(0.0, now - since):.0f} s"


class _Metrics:
    """The monitor's Prometheus gauges and counters, in the agent's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        self.registry = registry

        def signal_gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["vm", "signal"], registry=self.registry)  # a series per VM and signal

        self.value = signal_gauge("sealift_vm_signal", "Current value of a VM signal (rates per second; cpu in cores)")
        self.normal = signal_gauge("sealift_vm_signal_normal", "The VM's learnt normal level of the signal")
        self.zscore = signal_gauge(
            "sealift_vm_signal_zscore", "Deviation of the signal from normal, in standard deviations"
        )
        self.verdict = Gauge(
            "sealift_vm_verdict", "1 while the VM carries this security verdict", ["vm", "kind"], registry=self.registry
        )
        self.problem = Gauge(
            "sealift_vm_reliability_problem",
            "1 while the VM has this reliability problem",
            ["vm", "problem"],
            registry=self.registry,
        )
        self.verdicts = Counter("sealift_monitor_verdicts", "Verdicts raised", ["kind"], registry=self.registry)
        self.port_events = Counter(
            "sealift_port_events", "Events on the migration port", ["kind"], registry=self.registry
        )
        self.blocks = Counter("sealift_port_blocks", "Peers blocked on the migration port", registry=self.registry)
        self.floods = Counter(
            "sealift_port_floods", "Floods from many addresses noticed on the migration port", registry=self.registry
        )
        self.flood_active = Gauge(
            "sealift_port_flood", "1 while a flood from many addresses is going on", registry=self.registry
        )
        self.unfinished_share = Gauge(
            "sealift_port_unfinished_share",
            "Share of the connections that ended within the flood window without finishing a handshake",
            registry=self.registry,
        )
        self.unfinished_addresses = Gauge(
            "sealift_port_unfinished_addresses",
            "Addresses with a connection that ended unfinished within the flood window",
            registry=self.registry,
        )

    def update_flood(self, flood: dict[str, object]) -> None:
        self.flood_active.set(1 if flood["active"] else 0)
        self.unfinished_share.set(float(flood["share"]))  # type: ignore[arg-type]
        self.unfinished_addresses.set(float(flood["addresses"]))  # type: ignore[arg-type]

    def update(self, snapshot: dict[str, object]) -> None:
        for gauge in (self.value, self.normal, self.zscore, self.verdict, self.problem):
            gauge.clear()  # VMs that left must not linger
        rows = snapshot["vms"]
        assert isinstance(rows, list)  # MonitorService.snapshot: the classifier's rows, JSON-friendly dicts
        for row in rows:
            vm = str(row["vm"])
            for signal in SIGNALS:
                data = row["signals"].get(signal)
                if data:
                    self.value.labels(vm=vm, signal=signal).set(data["value"])
                    self.normal.labels(vm=vm, signal=signal).set(data["normal"])
                    self.zscore.labels(vm=vm, signal=signal).set(data["z"])
            verdict = row["verdict"]
            for kind in ("attacker", "victim", "anomalous"):
                self.verdict.labels(vm=vm, kind=kind).set(1 if verdict and verdict["kind"] == kind else 0)
            for problem in row["reliability"]:
                self.problem.labels(vm=vm, problem=problem["problem"]).set(1)
