"""CPU sampling from /proc: a process's CPU counts from the run's start, or from its birth inside the run."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sealift.bench.sampling import CpuSampler, Role, process_cpu

BUSY = (
    "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\nimport sys; sys.stdin.read()"
)


def busy(seconds: float) -> subprocess.Popen[bytes]:
    """A child that burns `seconds` of CPU, then waits on stdin until closed."""
    return subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds)], stdin=subprocess.PIPE)


def wait_cpu(process: subprocess.Popen[bytes], at_least: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (stat := process_cpu(process.pid)) is None or stat[0] < at_least:
        assert time.monotonic() < deadline, "the busy child did not get the CPU"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_cpu_before_the_run_is_not_counted_cpu_of_a_child_born_in_it_is() -> None:
    old = busy(0.6)
    try:
        wait_cpu(old, 0.5)  # 0.5 s of CPU spent before the run starts: not the run's
        sampler = CpuSampler([Role("old", old.pid)], interval_s=0.05).start()
        young = busy(0.4)
        try:
            sampler.add(Role("young", young.pid))
            wait_cpu(young, 0.35)
            figures = sampler.stop()
        finally:
            young.stdin.close()  # type: ignore[union-attr]
            young.wait(10)
    finally:
        old.stdin.close()  # type: ignore[union-attr]
        old.wait(10)
    assert figures.by_role["old"] < 0.3
    assert figures.by_role["young"] >= 0.3  # from its birth: interpreter start-up included
    assert figures.cpu_s == pytest.approx(sum(figures.by_role.values()), abs=0.01)
    assert figures.peak_pct > 30  # a busy process fills most of a 50 ms interval
    assert figures.peak_by_role["young"] > 30


CHILD = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
PARENT = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {CHILD!r}])"  # burns almost nothing itself


def test_a_tree_role_counts_its_children_once() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    sampler = CpuSampler(
        [Role("tree", parent.pid, tree=True), Role("again", parent.pid, tree=True)], interval_s=0.02
    ).start()
    parent.wait(30)
    figures = sampler.stop()
    assert figures.by_role.get("tree", 0) >= 0.3  # the child's 0.4 s (the parent alone is ~0.05 s)
    assert figures.by_role.get("again", 0) == 0  # every process is claimed by one role only
