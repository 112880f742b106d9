"""The reliability monitor (VREM/HREM): stalls, exits, restarts, errors of one VM.

Sans-IO, driven by the same samples as the security monitor:

- *stall*: the guest's progress counter has not moved for `stall_after_s`
  while its process runs and is not paused (a hung guest, or a host that
  starves it);
- *exited*: the VM's process is gone while the VM is still ours;
- *restart*: a new process for the same VM that nobody announced (a crash
  and restart); an announced one (workload switch, migration arrival) is not
  a problem;
- *error*: the collector saw an error state (QEMU `internal-error`,
  `guest-panicked`, `io-error`, a QMP failure).

A problem is one verdict per kind; it clears when the condition is gone (a
restart clears after `restart_hold_s`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sealift.monitor.signals import VmSample
from sealift.monitor.verdicts import RELIABILITY, MonitorEvent, Verdict


@dataclass(frozen=True)
class ReliabilityConfig:
    stall_after_s: float = 5.0
    restart_hold_s: float = 60.0

    def __post_init__(self) -> None:
        if not (self.stall_after_s > 0 and self.restart_hold_s > 0):
            raise ValueError("stall_after_s and restart_hold_s must be positive")


class ReliabilityTracker:
    def __init__(self, vm: str, config: ReliabilityConfig) -> None:
        self._vm = vm
        self._config = config
        self._progress: int | None = None
        self._progress_since: float | None = None  # when the counter last moved
        self._active: dict[str, Verdict] = {}
        self._restart_expected = False
        self.restarts = 0

    def expect_restart(self) -> None:
        self._restart_expected = True

    def active(self) -> list[Verdict]:
        return [self._active[k] for k in sorted(self._active)]

    def observe(self, sample: VmSample, previous: VmSample | None) -> list[MonitorEvent]:
        events: list[MonitorEvent] = []
        now = sample.time
        # restart: a different process than last time
        if previous is not None and sample.pid is not None and previous.pid is not None and sample.pid != previous.pid:
            if self._restart_expected:
                self._restart_expected = False
            else:
                self.restarts += 1
                events += self._raise(
                    "restart",
                    f"a new process (pid {previous.pid} -> {sample.pid}) that nobody "
                    f"announced: restart #{self.restarts}",
                    now,
                )
            self._progress, self._progress_since = None, None
        elif "restart" in self._active and now - self._active["restart"].since >= self._config.restart_hold_s:
            events += self._clear("restart")
        # exited
        if not sample.alive:
            events += self._raise("exited", f"its process (pid {sample.pid}) is gone", now)
        else:
            events += self._clear("exited")
        # error
        if sample.errors:
            events += self._raise("error", "; ".join(sample.errors), now)
        else:
            events += self._clear("error")
        # stall: only while it should be making progress
        running = sample.alive and sample.status == "running"
        if not running or sample.progress is None:
            self._progress, self._progress_since = sample.progress, None  # a pause restarts the stall clock
            return events + self._clear("stall")
        if self._progress_since is None or sample.progress != self._progress:
            if sample.progress != self._progress:
                events += self._clear("stall")
            self._progress, self._progress_since = sample.progress, now
            return events
        stalled_for = now - self._progress_since
        if stalled_for >= self._config.stall_after_s:
            events += self._raise(
                "stall",
                f"progress counter stuck at {sample.progress} for {stalled_for:.1f} s while its process runs",
                now,
            )
        return events

    def _raise(self, problem: str, reason: str, now: float) -> list[MonitorEvent]:
        if problem in self._active:
            return []
        verdict = Verdict(self._vm, RELIABILITY, f"{problem}: {reason}", now, problem=problem)
        self._active[problem] = verdict
        return [MonitorEvent("raised", verdict)]

    def _clear(self, problem: str) -> list[MonitorEvent]:
        verdict = self._active.pop(problem, None)
        return [MonitorEvent("cleared", verdict)] if verdict is not None else []
