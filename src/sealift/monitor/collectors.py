"""Per-VM monitors (VSEM/VREM) at the edge: read a VM's behaviour from outside it.

Nothing here looks inside a guest's memory or traffic contents:

- CPU: utime + stime of the VM's process, from ``/proc/PID/stat`` (all of
  QEMU's threads are in it);
- memory dirty rate: the built-in VM's own dirty log (a generation counter
  per page; a page whose generation changed since the last sample was
  dirtied) or QEMU's ``calc-dirty-rate``/``query-dirty-rate`` over QMP
  (page sampling: QEMU hashes a sample of pages and compares after
  ``calc-time`` seconds; it measures continuously, one result per period);
- network: a QEMU guest on a tap, from the tap's counters in
  ``/proc/net/dev`` of the agent's network namespace (swapped: what the tap
  transmits, the guest receives). The built-in VM has no NIC and a QEMU
  guest on user-mode networking has no host interface to count, so their
  network signals are absent (None), not zero;
- progress and status: the built-in guest's counter in its state area, the
  QEMU guest's console counter and QMP run state ("booting" until the
  guest's workload prints its first counter: a boot is not learnt as normal).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sealift.monitor.signals import VmSample

if TYPE_CHECKING:
    from sealift.backends.builtin.registry import BuiltinVmRegistry
    from sealift.backends.qemu.registry import QemuVmRegistry
    from sealift.backends.qemu.vm import QemuVM

log = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
# QEMU run states that are a reliability problem, not just "not running".
QEMU_ERROR_STATES = {"internal-error", "io-error", "guest-panicked", "shutdown"}
QEMU_DIRTY_CALC_S = 1  # calc-dirty-rate's measuring time (whole seconds)
QEMU_DIRTY_SAMPLE_PAGES = 4096  # pages hashed per GiB of guest RAM (QEMU's maximum; default 512 is coarse)


def read_proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) the process used so far, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def read_netdev(interface: str, proc_net_dev: Path = Path("/proc/net/dev")) -> dict[str, int] | None:
    """rx/tx bytes and packets of `interface` as the host sees them, or None if absent."""
    try:
        lines = proc_net_dev.read_text().splitlines()[2:]
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == interface:
            values = [int(v) for v in counters.split()]
            return {"rx_bytes": values[0], "rx_packets": values[1], "tx_bytes": values[8], "tx_packets": values[9]}
    return None


def guest_view_of_tap(counters: dict[str, int] | None) -> dict[str, int | None]:
    """A tap's host-side counters from the guest's point of view (rx and tx swap)."""
    if counters is None:
        return {"rx_bytes": None, "tx_bytes": None, "rx_packets": None, "tx_packets": None}
    return {
        "rx_bytes": counters["tx_bytes"],
        "tx_bytes": counters["rx_bytes"],
        "rx_packets": counters["tx_packets"],
        "tx_packets": counters["rx_packets"],
    }


class DirtyCounter:
    """Distinct pages dirtied, from successive snapshots of a built-in dirty log."""

    def __init__(self) -> None:
        self._previous: np.ndarray | None = None
        self.total = 0

    def update(self, generations: np.ndarray) -> int:
        if self._previous is not None and self._previous.shape == generations.shape:
            self.total += int(np.count_nonzero(generations != self._previous))
        self._previous = generations
        return self.total


class BuiltinCollector:
    """Samples the built-in VMs of a registry."""

    def __init__(self, registry: BuiltinVmRegistry, clock=time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self._dirty: dict[tuple[str, int], DirtyCounter] = {}  # per (vm, pid): a new process has a new log

    def collect(self) -> list[VmSample]:
        samples = []
        seen = set()
        for info in self._registry.list():
            name, pid = str(info["name"]), int(info["pid"])  # type: ignore[call-overload]  # BuiltinVM.info's pid: an int
            seen.add((name, pid))
            samples.append(self._sample(name, pid, info))
        for key in set(self._dirty) - seen:
            del self._dirty[key]
        return samples

    def _sample(self, name: str, pid: int, info: dict[str, object]) -> VmSample:
        errors: list[str] = []
        alive = bool(info.get("alive"))
        status = (
            "exited"
            if not alive
            else "migrating"
            if info.get("migrating")
            else ("paused" if info.get("paused") else "running")
        )
        dirty_pages = None
        try:
            generations = self._registry.get(name).dirty.snapshot()
            dirty_pages = self._dirty.setdefault((name, pid), DirtyCounter()).update(generations)
        except Exception as exc:  # a VM released meanwhile: report, do not fail the round
            errors.append(f"dirty log unreadable: {exc}")
        counter = info.get("counter")
        return VmSample(
            vm=name,
            backend="builtin",
            time=self._clock(),
            pid=pid,
            alive=alive,
            status=status,
            cpu_seconds=read_proc_cpu(pid) if alive else None,
            progress=int(counter) if isinstance(counter, int) else None,
            dirty_pages=dirty_pages,
            errors=tuple(errors) if alive else (),
        )


class QemuDirtyRate:
    """QEMU's page-sampling dirty rate, measured back to back: one result per period.

    Each call returns the last completed measurement (bytes/s) and starts the
    next one. calc-dirty-rate refuses while one runs, which is fine: the
    result is picked up next time.
    """

    def __init__(self, calc_time_s: int = QEMU_DIRTY_CALC_S, sample_pages: int = QEMU_DIRTY_SAMPLE_PAGES) -> None:
        self._calc_time_s = calc_time_s
        self._sample_pages = sample_pages
        self.last_bps: float | None = None

    def poll(self, vm: QemuVM) -> float | None:
        result = vm.qmp("query-dirty-rate")
        if result.get("status") == "measured" and "dirty-rate" in result:
            self.last_bps = float(result["dirty-rate"]) * MiB  # QEMU reports MiB/s ("MB/s" in its docs)
        if result.get("status") != "measuring":
            vm.qmp("calc-dirty-rate", {"calc-time": self._calc_time_s, "sample-pages": self._sample_pages})
        return self.last_bps


class QemuCollector:
    """Samples the QEMU guests of a registry."""

    def __init__(
        self, registry: QemuVmRegistry, clock=time.monotonic, proc_net_dev: Path = Path("/proc/net/dev")
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._proc_net_dev = proc_net_dev
        self._dirty: dict[tuple[str, int], QemuDirtyRate] = {}

    def collect(self) -> list[VmSample]:
        samples = []
        seen = set()
        for info in self._registry.list():
            name = str(info["name"])
            try:
                vm = self._registry.get(name)
            except Exception:
                continue
            seen.add((name, vm.pid))
            samples.append(self.sample(vm, migrating=bool(info.get("migrating"))))
        for key in set(self._dirty) - seen:
            del self._dirty[key]
        return samples

    def sample(self, vm: QemuVM, migrating: bool = False) -> VmSample:
        errors: list[str] = []
        alive = vm.alive()
        status = "exited"
        dirty_bps = None
        try:
            progress = vm.counter()
        except OSError:
            progress = None
        if alive:
            try:
                status = vm.status()
            except Exception as exc:
                errors.append(f"QMP query-status failed: {exc}")
                status = "unknown"
            if status in QEMU_ERROR_STATES:
                errors.append(f"QEMU run state {status}")
            if migrating or status in ("inmigrate", "postmigrate", "finish-migrate"):
                status = "migrating"
            elif status == "running" and progress is None:
                # The kernel boots, the workload has not started: under TCG a boot burns a core for
                # seconds and writes much of RAM, which is not the VM's normal behaviour to learn.
                status = "booting"
            elif status == "running":
                try:
                    dirty_bps = self._dirty.setdefault((vm.name, vm.pid), QemuDirtyRate()).poll(vm)
                except Exception as exc:
                    errors.append(f"QMP dirty rate failed: {exc}")
        net: dict[str, int | None] = {"rx_bytes": None, "tx_bytes": None, "rx_packets": None, "tx_packets": None}
        if vm.net.mode == "tap" and vm.net.tap:
            net = guest_view_of_tap(read_netdev(vm.net.tap, self._proc_net_dev))
        return VmSample(
            vm=vm.name,
            backend="qemu",
            time=self._clock(),
            pid=vm.pid,
            alive=alive,
            status=status,
            cpu_seconds=read_proc_cpu(vm.pid) if alive else None,
            progress=progress,
            dirty_bps=dirty_bps,
            errors=tuple(errors),
            rx_bytes=net["rx_bytes"],
            tx_bytes=net["tx_bytes"],
            rx_packets=net["rx_packets"],
            tx_packets=net["tx_packets"],
        )
