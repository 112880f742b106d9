"""QemuVM with real QEMU under TCG: boot, console counter, UDP probe, pause/resume, adopt, stop, kill, list."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from collections.abc import Iterator

import pytest

from qemu_testlib import ACCEL, VmPool, free_udp_port
from sealift.backends.qemu.host import HostError, choose_accel, kvm_usable
from sealift.backends.qemu.image import GuestImagePaths
from sealift.backends.qemu.net import NetConfig, mac_for
from sealift.backends.qemu.vm import QemuError, QemuVM, list_vms


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def probe_until_answer(vm: QemuVM, timeout: float = 20.0) -> int:
    """The first answer of the guest's service (it starts a moment after the first counter line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = vm.probe(0.5)
        if answer is not None:
            return answer
    raise AssertionError(f"VM {vm.name} never answered a probe; console: {vm.console_tail(5)}")


@pytest.fixture(scope="module")
def booted(guest_image: GuestImagePaths) -> Iterator[QemuVM]:
    """One guest, booted once for the tests that only observe it (a TCG boot takes seconds)."""
    pool = VmPool(guest_image)
    try:
        vm = pool.start(
            pool.new_dir(),
            "obs",
            160,
            net=NetConfig.user(free_udp_port()),
            extra_cmdline="sealift.mem_mib=32 sealift.rate_mib=8",
        )
        vm.wait_counter(0, timeout=90)
        yield vm
    finally:
        pool.cleanup()


def test_console_counter_increases(booted: QemuVM) -> None:
    first = booted.wait_counter(0, timeout=30)
    second = booted.wait_counter(first, timeout=30)
    assert second > first
    assert any(line.startswith("sealift-workload ready") for line in booted.console_tail(10_000))


def test_probe_answers_with_increasing_counters(booted: QemuVM) -> None:
    answers = [probe_until_answer(booted)]
    for _ in range(3):
        time.sleep(0.3)
        answer = booted.probe(2.0)
        assert answer is not None, f"probe unanswered; console: {booted.console_tail(3)}"
        answers.append(answer)
    assert answers == sorted(answers) and answers[-1] > answers[0]


def test_pause_freezes_the_guest_and_resume_continues(booted: QemuVM) -> None:
    probe_until_answer(booted)
    booted.pause()
    try:
        assert booted.status() == "paused"
        frozen = booted.counter()
        assert booted.probe(0.5) is None  # a paused guest cannot answer
        time.sleep(0.5)
        assert booted.counter() == frozen
    finally:
        booted.resume()
    assert booted.status() == "running"
    assert booted.wait_counter(frozen or 0, timeout=30) > (frozen or 0)
    assert probe_until_answer(booted) >= (frozen or 0)


def test_info_list_and_private_qmp_socket(booted: QemuVM) -> None:
    info = booted.info()
    assert info["name"] == "obs" and info["pid"] == booted.pid and info["alive"]
    assert info["accel"] == ACCEL and info["memory_mib"] == 160 and info["status"] == "running"
    assert isinstance(info["counter"], int)
    records = list_vms(booted.vm_dir)
    assert [(r.name, r.pid, r.alive) for r in records] == [("obs", booted.pid, True)]
    # The QMP socket is the VM's root console: only its owner may reach it.
    assert stat.S_IMODE(booted.vm_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(booted.qmp_path.stat().st_mode) & 0o077 == 0
    # The guest's NIC carries the MAC derived from the VM's name (stable across migration).
    assert any(mac_for("obs") in line for line in booted.console_tail(10_000))


def test_a_second_vm_of_the_same_name_is_refused(booted: QemuVM, guest_image: GuestImagePaths) -> None:
    with pytest.raises(QemuError, match="already running"):
        QemuVM.start(booted.vm_dir, "obs", 160, guest_image, accel=ACCEL)
    assert booted.status() == "running"


def test_adopt_then_quit(vms: VmPool) -> None:
    vm_dir = vms.new_dir()
    vm = vms.start(vm_dir, "adoptee", 128)
    pid = vm.pid
    vm.close()  # the agent goes away; QEMU stays (its own session)
    assert os.getsid(pid) == pid

    adopted = QemuVM.adopt(vm_dir, "adoptee")
    assert adopted.pid == pid and adopted.memory_mib == 128 and adopted.status() == "running"
    adopted.quit()
    assert not adopted.alive()
    assert list_vms(vm_dir) == []
    assert adopted.console_path.exists()  # the console log is kept for the operator
    with pytest.raises(QemuError, match="not running|no pidfile"):
        QemuVM.adopt(vm_dir, "adoptee")


def test_kill_and_a_crashed_vm_is_listed_as_dead(vms: VmPool) -> None:
    vm_dir = vms.new_dir()
    victim = vms.start(vm_dir, "victim", 128)
    victim.kill()
    assert not victim.alive() and victim.status() == "exited"

    crashed = vms.start(vm_dir, "crashed", 128)
    os.kill(crashed.pid, signal.SIGKILL)  # not through the backend: a crash
    assert wait_for(lambda: not crashed.alive(), 10)
    [record] = list_vms(vm_dir)
    assert (record.name, record.alive) == ("crashed", False)
    assert crashed.info()["status"] == "exited"


def test_bad_requests_fail_before_qemu_starts(guest_image: GuestImagePaths, vms: VmPool) -> None:
    vm_dir = vms.new_dir()
    with pytest.raises(QemuError, match="bad VM name"):
        QemuVM.start(vm_dir, "../etc", 128, guest_image, accel=ACCEL)
    with pytest.raises(QemuError, match="too little"):
        QemuVM.start(vm_dir, "small", 16, guest_image, accel=ACCEL)
    with pytest.raises(QemuError, match="no network"):
        vms.start(vm_dir, "nonet", 128).probe(0.1)


def test_qemu_refusals_are_reported(vms: VmPool) -> None:
    vm = vms.start(vms.new_dir(), "refuse", 128)
    with pytest.raises(QemuError, match="QEMU refused migrate-incoming"):
        vm.migrate_incoming("unix:/nonexistent/x.sock")  # not started with -incoming defer


def test_migration_into_a_socket_of_ours_and_a_refused_one_keeps_no_descriptor(vms: VmPool) -> None:
    """The sealift transport's source side: QEMU writes its stream into a socket the agent handed over (fd:)."""
    vm = vms.start(vms.new_dir(), "fdout", 128)
    ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vm.migrate_to_socket(qemus)
    qemus.close()
    ours.settimeout(10)
    assert ours.recv(4, socket.MSG_WAITALL) == b"QEVM"  # QEMU's stream header, written into our socket

    other, others_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(QemuError, match="QEMU refused migrate"):  # one migration at a time
        vm.migrate_to_socket(others_qemu, name="second")
    others_qemu.close()
    other.settimeout(5)
    assert other.recv(1) == b""  # QEMU dropped the descriptor it was given: every copy of that end is closed

    vm.migrate_cancel()
    assert wait_for(lambda: vm.query_migrate().get("status") == "cancelled", 10)
    assert vm.status() == "running"
    ours.close()


def test_accelerator_choice(guest_image: GuestImagePaths) -> None:
    assert choose_accel("tcg", guest_image.kernel) == "tcg"
    with pytest.raises(HostError, match="unknown accelerator"):
        choose_accel("hvf", guest_image.kernel)
    usable = kvm_usable(guest_image.kernel)
    assert isinstance(usable, bool)
    if not os.path.exists("/dev/kvm"):
        assert not usable
    assert choose_accel(None, guest_image.kernel) == ("kvm" if usable else "tcg")


def test_mac_is_stable_per_name() -> None:
    assert mac_for("web1") == mac_for("web1") != mac_for("web2")
    assert mac_for("web1").startswith("52:54:00:")
