"""The host's security and reliability monitors (HSEM/HREM): baselines, verdicts.

Sans-IO: `HostMonitor.observe(sample)` takes one `VmSample` from a per-VM
monitor and returns what changed (a verdict raised, changed or cleared). The
clock is the samples' own time, so tests drive it with synthetic series.

Security classification (seed 004: "when the workload of the VM increases
abnormally, the VM may be a victim or an attacker"), on signals rising past
the VM's own baseline:

- *victim*: inbound traffic rises and outbound does not rise as much (load
  driven from outside);
- *attacker*: outbound traffic or the memory write rate rises together with
  the VM's CPU, and inbound does not explain it (load the VM drives itself:
  a flood toward others, or a write storm that hammers the host's memory).
  The CPU only has to corroborate a signal that is abnormal by itself: at
  least `min_ratio` times normal and `cpu_corroboration_z` (half the
  anomaly threshold by default) from it. Two signals that depart together
  are rarer than either alone, and an efficient flood (a QEMU guest
  sending 8000 packets/s under TCG costs it ~0.3 of a core) lifts a noisy
  CPU signal only about three times;
- *anomalous*: something rises that fits neither pattern (reported, no
  action).

A candidate must hold for `confirm` consecutive samples before it becomes a
verdict, and a verdict clears after `clear_after` quiet samples. Every
verdict names the signals and how far each is from normal.

Reliability (HREM) is judged separately (`reliability.py`) and never changes
the security verdict. Both report in the terms of `verdicts.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sealift.monitor.baseline import BaselineConfig, EwmaBaseline, Score
from sealift.monitor.reliability import ReliabilityConfig, ReliabilityTracker
from sealift.monitor.signals import SIGNAL_SCALES, VmRates, VmSample, rates_between
from sealift.monitor.verdicts import ANOMALOUS, ATTACKER, VICTIM, Deviation, MonitorEvent, Verdict


@dataclass(frozen=True)
class ClassifierConfig:
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    confirm: int = 3  # consecutive abnormal samples before a verdict
    clear_after: int = 10  # consecutive normal samples before it clears
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    cpu_corroboration_z: float | None = None  # None: half the baseline's z_threshold

    def __post_init__(self) -> None:
        if self.confirm < 1 or self.clear_after < 1:
            raise ValueError("confirm and clear_after must be at least 1 sample")
        if self.cpu_corroboration_z is not None and not self.cpu_corroboration_z > 0:
            raise ValueError("cpu_corroboration_z must be positive")

    def corroborates(self, score: Score) -> bool:
        """Whether a CPU score backs an abnormal outbound or dirty-rate signal (see the module doc)."""
        z = self.cpu_corroboration_z if self.cpu_corroboration_z is not None else self.baseline.z_threshold / 2
        return score.anomalous or (score.warm and score.z >= z and score.ratio >= self.baseline.min_ratio)


@dataclass
class _VmState:
    baselines: dict[str, EwmaBaseline]
    reliability: ReliabilityTracker
    last_sample: VmSample | None = None
    last_rates: VmRates | None = None
    last_scores: dict[str, Score] = field(default_factory=dict)
    candidate: str | None = None
    streak: int = 0  # consecutive samples with a candidate
    quiet: int = 0  # consecutive samples without one
    verdict: Verdict | None = None
    samples: int = 0


def classify(scores: dict[str, Score], config: ClassifierConfig | None = None) -> tuple[str | None, list[str]]:
    """The candidate verdict for one sample's scores, and the signals behind it."""
    config = config or ClassifierConfig()
    rising = {signal for signal, score in scores.items() if score.anomalous}
    if not rising:
        return None, []

    def lift(*signals: str) -> float:  # how many times normal, in log units; 0 if absent
        return max((math.log(scores[s].ratio) for s in signals if s in scores), default=0.0)

    inbound = rising & {"rx_bps", "rx_pps"}
    outbound = rising & {"tx_bps", "tx_pps"}
    if inbound and (not outbound or lift("rx_bps", "rx_pps") > lift("tx_bps", "tx_pps")):
        return VICTIM, sorted(rising)
    if (outbound or "dirty_bps" in rising) and "cpu" in scores and config.corroborates(scores["cpu"]):
        return ATTACKER, sorted(rising | {"cpu"})
    return ANOMALOUS, sorted(rising)


class HostMonitor:
    """All VMs of one host. Not thread-safe: the monitor service serialises calls."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        self._vms: dict[str, _VmState] = {}
        self._manual: dict[str, Verdict] = {}

    # -- input ----------------------------------------------------------------

    def observe(self, sample: VmSample) -> list[MonitorEvent]:
        state = self._vms.get(sample.vm)
        if state is None:
            state = self._vms[sample.vm] = _VmState(
                baselines={s: EwmaBaseline(self.config.baseline, scale) for s, scale in SIGNAL_SCALES.items()},
                reliability=ReliabilityTracker(sample.vm, self.config.reliability),
            )
        events = state.reliability.observe(sample, state.last_sample)
        previous = state.last_sample
        rates = rates_between(previous, sample) if previous is not None else None
        state.last_sample = sample
        state.samples += 1
        if rates is None or sample.status != "running" or previous is None or previous.status != "running":
            # Paused, migrating, booting or a new process, now or during the interval (the CPU
            # of a boot or a migration is in it): nothing comparable to learn from.
            return events
        state.last_rates = rates
        state.last_scores = {
            signal: state.baselines[signal].observe(value)
            for signal, value in rates.values.items()
            if value is not None
        }
        candidate, signals = classify(state.last_scores, self.config)
        events.extend(self._settle(state, sample, candidate, signals))
        return events

    def forget(self, vm: str) -> None:
        """The VM left this host (migrated away, stopped)."""
        self._vms.pop(vm, None)

    def expect_restart(self, vm: str) -> None:
        """The next new process of `vm` is intended (a workload switch): not a reliability event."""
        state = self._vms.get(vm)
        if state is not None:
            state.reliability.expect_restart()

    def flag(self, vm: str, kind: str, reason: str, now: float) -> MonitorEvent:
        """An operator's verdict (e.g. a VM quarantined elsewhere); stays until `unflag`."""
        if kind not in (ATTACKER, VICTIM):
            raise ValueError(f"a manual flag is {ATTACKER!r} or {VICTIM!r}, not {kind!r}")
        verdict = Verdict(vm, kind, f"flagged by an operator: {reason}", now, manual=True)
        self._manual[vm] = verdict
        return MonitorEvent("raised", verdict)

    def unflag(self, vm: str) -> MonitorEvent | None:
        verdict = self._manual.pop(vm, None)
        return MonitorEvent("cleared", verdict) if verdict is not None else None

    # -- output ---------------------------------------------------------------

    def verdict(self, vm: str) -> Verdict | None:
        """The VM's security verdict now (an operator's flag first)."""
        if vm in self._manual:
            return self._manual[vm]
        state = self._vms.get(vm)
        return state.verdict if state is not None else None

    def reliability_verdicts(self, vm: str) -> list[Verdict]:
        state = self._vms.get(vm)
        return state.reliability.active() if state is not None else []

    def vms(self) -> list[str]:
        return sorted(set(self._vms) | set(self._manual))

    def snapshot(self) -> list[dict[str, object]]:
        """Per VM: current rates, normal levels, z-scores and verdicts (JSON-friendly)."""
        rows: list[dict[str, object]] = []
        for vm in self.vms():
            state = self._vms.get(vm)
            verdict = self.verdict(vm)
            signals: dict[str, object] = {}
            if state is not None and state.last_rates is not None:
                for signal, value in state.last_rates.values.items():
                    score = state.last_scores.get(signal)
                    signals[signal] = (
                        None
                        if value is None or score is None
                        else {
                            "value": value,
                            "normal": score.normal,
                            "z": round(score.z, 2),
                            "anomalous": score.anomalous,
                        }
                    )
            sample = state.last_sample if state is not None else None
            rows.append(
                {
                    "vm": vm,
                    "backend": sample.backend if sample else None,
                    "status": sample.status if sample else None,
                    "pid": sample.pid if sample else None,
                    "progress": sample.progress if sample else None,
                    "samples": state.samples if state else 0,
                    "warm": bool(
                        state and state.last_scores and all(score.warm for score in state.last_scores.values())
                    ),
                    "signals": signals,
                    "verdict": verdict.to_dict() if verdict else None,
                    "reliability": [v.to_dict() for v in (state.reliability.active() if state else [])],
                    "restarts": state.reliability.restarts if state else 0,
                }
            )
        return rows

    # -- internals ------------------------------------------------------------

    def _settle(
        self, state: _VmState, sample: VmSample, candidate: str | None, signals: list[str]
    ) -> list[MonitorEvent]:
        if candidate is None:
            state.candidate, state.streak = None, 0
            state.quiet += 1
            if state.verdict is not None and state.quiet >= self.config.clear_after:
                cleared, state.verdict = state.verdict, None
                return [MonitorEvent("cleared", cleared)]
            return []
        state.quiet = 0
        state.streak = state.streak + 1 if state.candidate is not None else 1
        state.candidate = _stronger(state.candidate, candidate) if state.candidate else candidate
        if state.streak < self.config.confirm:
            return []
        kind = candidate if state.verdict is None else _stronger(state.verdict.kind, candidate)
        if state.verdict is not None and state.verdict.kind == kind:
            return []
        deviations = tuple(
            Deviation(
                s,
                state.last_scores[s].value,
                state.last_scores[s].normal,
                state.last_scores[s].z,
                state.last_scores[s].ratio,
            )
            for s in signals
        )
        reason = f"{kind}: " + "; ".join(d.describe() for d in deviations)
        state.verdict = Verdict(sample.vm, kind, reason, sample.time, deviations)
        return [MonitorEvent("raised", state.verdict)]


_RANK = {ANOMALOUS: 0, VICTIM: 1, ATTACKER: 2}


def _stronger(a: str, b: str) -> str:
    """Verdicts only escalate while they last (anomalous < victim < attacker)."""
    return a if _RANK.get(a, 0) >= _RANK.get(b, 0) else b
