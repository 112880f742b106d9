"""Real guest processes: ticking, dirty tracking, pause/resume, continuation, throttle, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from sealift.backends.builtin.guest import EXIT_IMAGE_IN_USE
from sealift.backends.builtin.image import SECRET_PAGE, GuestImage
from sealift.backends.builtin.vm import GUEST_MODULE, BuiltinVM, VmError, _proc_state
from sealift.backends.builtin.workload import pages_for_tick

if TYPE_CHECKING:
    from conftest import VmPool

MiB = 1 << 20
GiB = 1 << 30


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition without asserting on how long it takes (bounded only to fail a hung test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def ticks_in(vm: BuiltinVM, seconds: float) -> int:
    start = vm.counter()
    time.sleep(seconds)
    return vm.counter() - start


def process_gone(pid: int) -> bool:
    return _proc_state(pid) is None


def test_guest_boots_and_ticks(vms: VmPool) -> None:
    vm = vms("a", 16 * MiB, profile="db", seed=3)
    assert vm.is_alive and not vm.is_paused
    assert vm.image.state.booted
    assert os.getsid(vm.pid) == vm.pid  # own session: survives its agent
    first = vm.counter()
    wait_for(lambda: vm.counter() > first + 3)
    info = vm.info()
    assert info["name"] == "a" and info["pid"] == vm.pid and info["memory_bytes"] == 16 * MiB
    assert info["profile"] == "db" and info["alive"] and not info["paused"]
    assert info["counter"] >= first


def test_first_boot_fills_and_marks_generations(vms: VmPool) -> None:
    vm = vms("a", 16 * MiB, profile="idle", fill_fraction=0.5, seed=3)
    vm.pause()
    gens = vm.dirty.snapshot()
    nonzero = vm.image.pages.any(axis=1)
    assert nonzero[SECRET_PAGE] and gens[SECRET_PAGE] == 1  # the secret page, never rewritten
    # Every page with data has been marked, and a page without data never was.
    assert np.all(gens[nonzero] >= 1) and not gens[~nonzero].any()
    assert nonzero.sum() >= vm.image.npages // 2
    assert vm.image.check().ok


def test_dirty_generations_count_exactly_the_written_pages(vms: VmPool) -> None:
    vm = vms("a", 16 * MiB, profile="db", seed=5)
    vm.pause()
    c0, g0 = vm.counter(), vm.dirty.snapshot().astype(np.int64)
    vm.resume()
    wait_for(lambda: vm.counter() >= c0 + 5)
    vm.pause()
    c1, g1 = vm.counter(), vm.dirty.snapshot().astype(np.int64)
    params = vm.image.state.workload
    expected = np.zeros(vm.image.npages, dtype=np.int64)
    for counter in range(c0, c1):  # ticks completed while running: +1 before and +1 after each write
        expected[pages_for_tick(params, counter)] += 2
    maybe = np.zeros(vm.image.npages, dtype=np.int64)
    maybe[pages_for_tick(params, c1)] = 2  # the tick the pause interrupted, if any
    delta = g1 - g0
    assert np.all(delta >= expected) and np.all(delta <= expected + maybe)
    assert delta[SECRET_PAGE] == 0
    assert vm.image.check().ok


def test_pause_really_stops_the_guest(vms: VmPool) -> None:
    vm = vms("a", 16 * MiB, profile="stress", seed=1)
    vm.pause()
    assert vm.is_paused and _proc_state(vm.pid) == "T" and vm.info()["paused"]
    counter, gens = vm.counter(), vm.dirty.snapshot()
    time.sleep(0.3)
    assert vm.counter() == counter
    np.testing.assert_array_equal(vm.dirty.snapshot(), gens)
    vm.resume()
    assert not vm.is_paused
    wait_for(lambda: vm.counter() > counter)
    vm.pause()  # pausing twice in a row is fine
    vm.pause()
    vm.resume()
    vm.resume()


def test_check_is_clean_wherever_a_pause_lands(vms: VmPool) -> None:
    # SIGSTOP can land in the middle of a page write; check() must accept
    # exactly those half-written pages of the interrupted tick, nothing else.
    vm = vms("a", 16 * MiB, profile="stress", fill_fraction=1.0)
    for _ in range(15):
        vm.pause()
        result = vm.image.check()
        assert result.ok, result
        vm.resume()
        time.sleep(0.01)


def test_vm_check_pauses_a_running_guest_for_the_scan(vms: VmPool) -> None:
    vm = vms("a", 16 * MiB, profile="stress", fill_fraction=1.0)
    for _ in range(5):
        assert vm.check().ok
        assert not vm.is_paused  # resumed afterwards
    vm.pause()
    assert vm.check().ok
    assert vm.is_paused  # a paused guest stays paused


def test_stop_leaves_no_process(vms: VmPool, shm_dir: Path) -> None:
    running = vms("run", 16 * MiB, profile="web")
    paused = vms("paused", 16 * MiB, profile="stress")
    paused.pause()
    for vm in (running, paused):
        pid = vm.pid
        vm.stop()
        assert not vm.is_alive and process_gone(pid)  # reaped: not even a zombie
        vm.stop()  # idempotent
        with pytest.raises(VmError, match="not running"):
            vm.pause()
    assert "stopped by SIGTERM" in running.log_path.read_text()  # a clean exit
    # A paused guest is killed without running again: its counter did not move.
    assert "stopped by" not in paused.log_path.read_text()


def test_destroy_removes_files(vms: VmPool, shm_dir: Path) -> None:
    vm = vms("a", 16 * MiB, profile="idle")
    pid = vm.pid
    vm.destroy()
    assert process_gone(pid)
    assert list(shm_dir.iterdir()) == []


def test_continuation_on_a_copied_image(vms: VmPool, shm_dir: Path) -> None:
    source = vms("a", 32 * MiB, profile="db", seed=9)
    wait_for(lambda: source.counter() > 10)
    source.pause()
    paused_at = source.counter()

    dest_dir = shm_dir / "dest"
    dest_dir.mkdir()
    with GuestImage.create_empty(dest_dir / "b.img", source.memory_bytes) as dest:
        dest.ram[:] = source.image.ram
        dest.write_state(source.image.read_state())
        result = dest.check()
        assert result.ok and result.bad_page_count == 0 and result.secret_intact
        assert dest.counter == paused_at

    copy = BuiltinVM.start_on_image(dest_dir, "b")
    vms.register(copy)
    first = copy.counter()
    assert paused_at <= first  # continues, never restarts or goes back
    wait_for(lambda: copy.counter() > paused_at + 3)
    copy.pause()
    result = copy.image.check()
    assert result.ok and result.secret_intact
    assert copy.image.secret_text() == source.image.secret_text()
    assert source.counter() == paused_at and source.is_paused  # the source stayed put


def test_continuation_redoes_the_interrupted_tick_identically(vms: VmPool, shm_dir: Path) -> None:
    # Source and copy both run on from the same paused state; every page both
    # have written at the same counter must hold identical bytes.
    source = vms("a", 16 * MiB, profile="db", seed=4)
    wait_for(lambda: source.counter() > 5)
    source.pause()
    dest_dir = shm_dir / "dest"
    dest_dir.mkdir()
    with GuestImage.create_empty(dest_dir / "b.img", source.memory_bytes) as dest:
        dest.ram[:] = source.image.ram
        dest.write_state(source.image.read_state())
    copy = BuiltinVM.start_on_image(dest_dir, "b")
    vms.register(copy)
    source.resume()
    wait_for(lambda: source.counter() > 20 and copy.counter() > 20)
    source.pause()
    copy.pause()
    same_counter = source.image.words[:, 1] == copy.image.words[:, 1]
    assert same_counter.sum() > copy.image.npages // 2
    np.testing.assert_array_equal(source.image.pages[same_counter], copy.image.pages[same_counter])


def test_start_on_image_resets_throttle_and_refuses_a_second_guest(vms: VmPool, shm_dir: Path) -> None:
    vm = vms("a", 16 * MiB, profile="idle")
    vm.set_throttle(80)
    with pytest.raises(VmError, match="already running"):
        BuiltinVM.start_on_image(shm_dir, "a")
    # Even started by hand, a second guest refuses the image.
    proc = subprocess.run(
        [sys.executable, "-m", GUEST_MODULE, str(vm.image_path), str(vm.dirty_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_IMAGE_IN_USE and "already running" in proc.stdout
    vm.stop()
    again = BuiltinVM.start_on_image(shm_dir, "a")
    vms.register(again)
    assert again.image.throttle_pct == 0


def test_start_on_a_bad_image_reports_it(shm_dir: Path) -> None:
    with GuestImage.create_empty(shm_dir / "b.img", 2 * MiB):
        pass
    with pytest.raises(VmError, match="state area is empty"):
        BuiltinVM.start_on_image(shm_dir, "b")
    with pytest.raises(VmError, match="cannot open"):
        BuiltinVM.start_on_image(shm_dir, "missing")


def test_create_validates_its_arguments(vms: VmPool, shm_dir: Path) -> None:
    with pytest.raises(VmError, match="invalid VM name"):
        BuiltinVM.create(shm_dir, "../evil", 16 * MiB)
    with pytest.raises(VmError, match="unknown workload profile"):
        BuiltinVM.create(shm_dir, "a", 16 * MiB, profile="nosuch")
    with pytest.raises(VmError, match="multiple of 4096"):
        BuiltinVM.create(shm_dir, "a", 16 * MiB + 1)
    with pytest.raises(VmError, match="does not exist"):
        BuiltinVM.create(shm_dir / "nope", "a", 16 * MiB)
    vms("a", 16 * MiB, profile="idle")
    with pytest.raises(VmError, match="already exists"):
        BuiltinVM.create(shm_dir, "a", 16 * MiB)


def test_adopt_finds_the_guest_again(vms: VmPool, shm_dir: Path) -> None:
    vm = vms("a", 16 * MiB, profile="web")
    with pytest.raises(VmError, match="not its guest"):
        BuiltinVM.adopt(shm_dir, "a", os.getpid())
    with pytest.raises(VmError, match="no process"):
        BuiltinVM.adopt(shm_dir, "a", 2**22 + 12345)
    adopted = BuiltinVM.adopt(shm_dir, "a", vm.pid)
    try:
        assert adopted.is_alive and adopted.memory_bytes == vm.memory_bytes
        adopted.pause()
        assert vm.is_paused and adopted.is_paused
        counter = adopted.counter()
        adopted.resume()
        wait_for(lambda: vm.counter() > counter)
        adopted.stop()  # not our child: SIGTERM, then wait on the pidfd
        assert not adopted.is_alive
        wait_for(lambda: not vm.is_alive)  # the parent handle reaps it
        assert process_gone(vm.pid)
    finally:
        adopted.close()


def test_one_gib_guest_boots_without_fill(vms: VmPool, shm_dir: Path) -> None:
    vm = vms("big", 1 * GiB, profile="idle", fill_fraction=0.0)
    counter = vm.counter()
    wait_for(lambda: vm.counter() > counter)
    vm.pause()
    # idle rewrites one page: RAM holds the secret page and that page, the rest are holes.
    assert sum(hi - lo for lo, hi in vm.image.data_ranges()) <= 2
    assert os.stat(vm.image_path).st_blocks * 512 < 1 * MiB
    assert vm.image.check().ok


@pytest.mark.parametrize("profile", ["stress", "db"])
def test_throttle_lowers_the_tick_rate(vms: VmPool, profile: str) -> None:
    vm = vms("a", 16 * MiB, profile=profile, fill_fraction=1.0)
    ticks_in(vm, 0.2)  # settle
    unthrottled = ticks_in(vm, 1.0)
    vm.set_throttle(90)
    ticks_in(vm, 0.3)  # let the current (unthrottled) tick finish
    throttled = ticks_in(vm, 1.0)
    assert unthrottled > 0
    assert throttled < 0.7 * unthrottled
    vm.set_throttle(0)
    wait_for(lambda: ticks_in(vm, 0.5) > throttled)  # recovers


AGENT_SCRIPT = """
import sys
from pathlib import Path
from sealift.backends.builtin.vm import BuiltinVM
vm = BuiltinVM.create(Path(sys.argv[1]), "orphan", 16 << 20, profile="web")
print(vm.pid, flush=True)
"""  # exits without stopping its VM, like a crashing agent


def test_guest_survives_its_agent_and_can_be_adopted(shm_dir: Path) -> None:
    agent = subprocess.run(
        [sys.executable, "-c", AGENT_SCRIPT, str(shm_dir)], capture_output=True, text=True, timeout=60
    )
    assert agent.returncode == 0, agent.stderr
    pid = int(agent.stdout)
    vm = BuiltinVM.adopt(shm_dir, "orphan", pid)
    try:
        counter = vm.counter()
        wait_for(lambda: vm.counter() > counter)  # still running after its agent exited
        assert vm.info()["alive"]
    finally:
        vm.stop()
        vm.close()
    # Not our child: init reaps it; it must at least not run any more.
    assert _proc_state(pid) in (None, "Z")


def test_a_page_is_dirty_before_its_data_changes() -> None:
    """The pause-between-write-and-mark bug: the generation must move before the data does."""
    from sealift.backends.builtin.guest import run_tick
    from sealift.backends.builtin.workload import PROFILES, WorkloadParams

    npages = 256
    words = np.zeros((npages, 512), dtype=np.uint64)
    gens = np.zeros(npages, dtype=np.uint32)
    params = WorkloadParams.for_profile(PROFILES["db"], npages, 7, SECRET_PAGE)
    seen: list[tuple[int, int]] = []

    import sealift.backends.builtin.guest as guest

    real_write = guest.write_pages

    def spying_write(w: np.ndarray, pages: np.ndarray, counter: int) -> None:
        seen.extend((int(p), int(gens[p])) for p in pages)
        real_write(w, pages, counter)

    guest.write_pages = spying_write
    try:
        pages = run_tick(words, gens, params, counter=1)
    finally:
        guest.write_pages = real_write
    assert seen and all(generation == 1 for _, generation in seen)  # already dirty while writing
    assert np.all(gens[pages] == 2)  # and again after, for a reader that saw a torn page
