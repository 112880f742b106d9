"""What a per-VM monitor (VSEM/VREM) reports, and how counters become rates.

A collector reads *cumulative* counters (CPU seconds of the VM's process,
network bytes and packets) and, where the source gives rates only, rates
(QEMU's calc-dirty-rate). `RateTracker` turns two consecutive samples into
per-second rates; a counter that went backwards or a new process (a restart,
or the VM arriving by migration) starts afresh instead of producing a
negative or huge rate.

A signal the VM does not have is None, never 0: the built-in VM has no NIC,
so its network signals are absent, and absent is not "quiet".
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The signals the host monitor learns, with the level below which each is noise.
SIGNAL_SCALES: dict[str, float] = {
    "cpu": 0.02,  # fraction of one core
    "dirty_bps": 64 * 1024.0,  # bytes of memory dirtied per second
    "rx_bps": 8 * 1024.0,  # network bytes per second into the VM
    "tx_bps": 8 * 1024.0,  # ... out of the VM
    "rx_pps": 20.0,  # packets per second into the VM
    "tx_pps": 20.0,
}
SIGNALS = tuple(SIGNAL_SCALES)


@dataclass(frozen=True)
class VmSample:
    """One observation of one VM, taken from outside the guest."""

    vm: str
    backend: str  # "builtin" | "qemu"
    time: float  # monotonic seconds
    pid: int | None  # the VM's process (a new pid means a new process)
    alive: bool
    status: str  # "running", "paused", "migrating", "exited", "booting" (QEMU, no workload yet), or QEMU's run state
    cpu_seconds: float | None = None  # cumulative user+system CPU of the process
    progress: int | None = None  # the guest's progress counter, if it has one
    dirty_pages: int | None = None  # cumulative distinct pages dirtied (built-in dirty log)
    dirty_bps: float | None = None  # or a dirty rate measured by the hypervisor (QEMU)
    rx_bytes: int | None = None  # cumulative network counters, None without a NIC
    tx_bytes: int | None = None
    rx_packets: int | None = None
    tx_packets: int | None = None
    errors: tuple[str, ...] = ()  # what the collector could not read, or QEMU error events
    page_size: int = 4096


@dataclass(frozen=True)
class VmRates:
    """Per-second rates between two samples; None where the VM lacks the signal."""

    vm: str
    time: float
    values: dict[str, float | None] = field(default_factory=dict)

    def get(self, signal: str) -> float | None:
        return self.values.get(signal)


_COUNTERS = {  # rate signal -> cumulative counter field
    "cpu": "cpu_seconds",
    "rx_bps": "rx_bytes",
    "tx_bps": "tx_bytes",
    "rx_pps": "rx_packets",
    "tx_pps": "tx_packets",
}


def rates_between(previous: VmSample, current: VmSample) -> VmRates | None:
    """Rates from `previous` to `current`, or None if they cannot be compared.

    Not comparable: no time elapsed, or a different process (pid changed).
    A single counter that went backwards gives None for that signal only.
    """
    elapsed = current.time - previous.time
    if elapsed <= 0 or previous.pid != current.pid or not current.alive:
        return None
    values: dict[str, float | None] = {}
    for signal, counter in _COUNTERS.items():
        before, after = getattr(previous, counter), getattr(current, counter)
        values[signal] = None if before is None or after is None or after < before else (after - before) / elapsed
    if current.dirty_bps is not None:
        values["dirty_bps"] = current.dirty_bps
    elif (
        previous.dirty_pages is not None
        and current.dirty_pages is not None
        and current.dirty_pages >= previous.dirty_pages
    ):
        values["dirty_bps"] = (current.dirty_pages - previous.dirty_pages) * current.page_size / elapsed
    else:
        values["dirty_bps"] = None
    return VmRates(current.vm, current.time, values)
