"""What a migration costs, measured from outside: CPU of the processes involved, bytes on a link.

CPU comes from `/proc/PID/stat` (utime + stime, all threads) sampled every
`interval_s`; a role is a root pid, optionally with its descendants (sshd
forks a child per connection), or a finder for a process that appears
during the run (the QEMU a destination agent starts). Peak CPU is the
highest summed rate over one sampling interval, in % of one core. The whole
machine's busy time (`/proc/stat`) is sampled alongside, which includes the
kernel's share (softirq work of veth, forwarding and TUN) that no process
is billed for.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pids() -> Iterator[int]:
    """Every process's pid (the numeric entries of /proc)."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from the 3rd (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields (from the 3rd) start after the last ')'.
    return raw[raw.rfind(b")") + 2 :].split()


def process_cpu(pid: int) -> tuple[float, int] | None:
    """(utime + stime of a process, all its threads, in seconds; its start time in ticks since boot)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None  # gone
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[19])


def _now_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * CLK_TCK)


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is not None:
            parents[pid] = int(fields[1])
    return parents


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def machine_busy_s() -> float:
    """Busy CPU time of the whole machine (all cores), in seconds."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK  # guest time is already inside user


@dataclass
class Role:
    """A process (tree) whose CPU counts: a pid, or a finder called until it answers."""

    name: str
    pid: int | None = None
    tree: bool = False  # also count its descendants (not claimed by an earlier role)
    finder: Callable[[], int | None] | None = None


@dataclass
class CpuFigures:
    cpu_s: float
    peak_pct: float
    machine_cpu_s: float
    by_role: dict[str, float] = field(default_factory=dict)
    peak_by_role: dict[str, float] = field(default_factory=dict)


class CpuSampler:
    """Samples the roles' CPU in a thread between start() and stop()."""

    def __init__(self, roles: list[Role], interval_s: float = 0.1) -> None:
        self._roles = roles
        self._interval = interval_s
        self._first: dict[int, float] = {}  # pid -> CPU when the run started (0 for a pid born during it)
        self._start_ticks = 0
        self._last: dict[int, float] = {}
        self._owner: dict[int, str] = {}
        self._peak = 0.0
        self._peak_by_role: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._machine_start = 0.0
        self._machine_end = 0.0
        self._started = False

    def add(self, role: Role) -> None:
        self._roles.append(role)

    def start(self) -> CpuSampler:
        self._machine_start = machine_busy_s()
        self._start_ticks = _now_ticks()
        self._sample()
        self._started = True
        self._thread.start()
        return self

    def _pids(self) -> dict[int, str]:
        needs_tree = any(r.tree for r in self._roles)
        parents = _parent_map() if needs_tree else {}
        owner: dict[int, str] = {}
        for role in self._roles:
            if role.pid is None and role.finder is not None:
                role.pid = role.finder()
            if role.pid is None:
                continue
            members = {role.pid} | (descendants(role.pid, parents) if role.tree else set())
            for pid in members:
                owner.setdefault(pid, role.name)
        return owner

    def _sample(self) -> dict[str, float]:
        deltas: dict[str, float] = {}
        for pid, name in self._pids().items():
            stat = process_cpu(pid)
            if stat is None:
                continue
            value, started = stat
            if pid not in self._first:
                # A process older than the run (sshd's listener, charon) counts from now; one the run
                # started (the destination QEMU, sshd's per-connection child) counts from its birth.
                self._first[pid] = 0.0 if started >= self._start_ticks else value
                self._owner[pid] = name
            previous = self._last.get(pid, self._first[pid])
            self._last[pid] = value
            deltas[name] = deltas.get(name, 0.0) + max(0.0, value - previous)
        return deltas

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._interval):
            deltas = self._sample()
            now = time.monotonic()
            elapsed = max(now - last, 1e-3)
            last = now
            self._peak = max(self._peak, 100 * sum(deltas.values()) / elapsed)
            for name, delta in deltas.items():
                self._peak_by_role[name] = max(self._peak_by_role.get(name, 0.0), 100 * delta / elapsed)

    def stop(self) -> CpuFigures:
        if self._started:
            self._stop.set()
            self._thread.join(timeout=5)
            self._sample()
        self._machine_end = machine_busy_s()
        by_role: dict[str, float] = {}
        for pid, first in self._first.items():
            name = self._owner[pid]
            by_role[name] = by_role.get(name, 0.0) + self._last.get(pid, first) - first
        return CpuFigures(
            cpu_s=round(sum(by_role.values()), 3),
            peak_pct=round(self._peak, 1),
            machine_cpu_s=round(self._machine_end - self._machine_start, 3),
            by_role={k: round(v, 3) for k, v in sorted(by_role.items())},
            peak_by_role={k: round(v, 1) for k, v in sorted(self._peak_by_role.items())},
        )


def link_counters(netns: str, ifname: str) -> tuple[int, int, int]:
    """(rx bytes, tx bytes, rx+tx packets) of an interface inside a namespace (`ip -s -j link`)."""
    done = subprocess.run(
        ["ip", "-n", netns, "-s", "-j", "link", "show", "dev", ifname],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    stats = json.loads(done.stdout)[0]["stats64"]
    return (
        int(stats["rx"]["bytes"]),
        int(stats["tx"]["bytes"]),
        int(stats["rx"]["packets"]) + int(stats["tx"]["packets"]),
    )


class LinkCounter:
    """Bytes (each direction) and packets that crossed one interface between start() and stop()."""

    def __init__(self, netns: str, ifname: str) -> None:
        self.netns, self.ifname = netns, ifname
        self._start = (0, 0, 0)
        self.packets = 0

    def start(self) -> LinkCounter:
        self._start = link_counters(self.netns, self.ifname)
        return self

    def stop(self) -> tuple[int, int]:
        rx, tx, packets = link_counters(self.netns, self.ifname)
        self.packets = packets - self._start[2]
        return rx - self._start[0], tx - self._start[1]


def find_descendant(root: int, comm_prefix: str) -> int | None:
    """A descendant of `root` whose command name starts with `comm_prefix` (e.g. the charon an agent started)."""
    for pid in sorted(descendants(root, _parent_map())):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith(comm_prefix):
                    return pid
        except OSError:
            continue
    return None


def find_process(needle: str, comm_prefix: str = "") -> int | None:
    """The first process whose command line contains `needle` (and whose comm starts with `comm_prefix`)."""
    raw_needle = needle.encode()
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if raw_needle not in cmdline:
                continue
            if comm_prefix:
                with open(f"/proc/{pid}/comm") as f:
                    if not f.read().startswith(comm_prefix):
                        continue
        except OSError:
            continue
        return pid
    return None
