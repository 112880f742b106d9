"""The guest workload's control channel (guest/workload.c), run as a host process: fast, and the same C code.

The workload reads its settings from a file when given one, so here it runs
on loopback with a token of our choosing; the QEMU tests drive the same
program inside a guest.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.backends.qemu.guest_control import (
    GuestControl,
    GuestControlError,
    new_token,
    request_line,
    token_from_cmdline,
    with_token,
)
from sealift.backends.qemu.image import WORKLOAD_SOURCE
from sealift.backends.qemu.vm import probe_udp
from sealift.monitor.collectors import read_proc_cpu

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def workload_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("workload") / "workload"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(WORKLOAD_SOURCE)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Workload:
    def __init__(self, binary: Path, workdir: Path, cmdline: str) -> None:
        self.port = _free_udp_port()
        settings = workdir / "cmdline"
        settings.write_text(f"sealift.mem_mib=8 sealift.rate_mib=1 sealift.port={self.port} {cmdline}\n")
        self.console = workdir / "console"
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen([str(binary), str(settings)], stdout=out, stderr=subprocess.STDOUT)
        self.address = ("127.0.0.1", self.port)
        deadline = time.monotonic() + 10
        while probe_udp(self.address, 0.2) is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.console.read_text()

    def cpu_over(self, seconds: float) -> float:
        before = read_proc_cpu(self.proc.pid)
        time.sleep(seconds)
        after = read_proc_cpu(self.proc.pid)
        assert before is not None and after is not None
        return (after - before) / seconds

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def workload(workload_binary: Path, tmp_path: Path, token: str) -> Iterator[Workload]:
    running = Workload(workload_binary, tmp_path, f"sealift.ctl={token}")
    try:
        yield running
    finally:
        running.stop()


def test_the_token_is_added_to_a_command_line_once() -> None:
    token = new_token()
    cmdline = with_token("sealift.mem_mib=32 sealift.rate_mib=4", token)
    assert token_from_cmdline(cmdline) == token and cmdline.startswith("sealift.mem_mib=32")
    assert with_token(cmdline, new_token()) == cmdline, "a guest keeps the token it booted with"
    assert token_from_cmdline("sealift.ctl=nothex!") is None
    with pytest.raises(ValueError):
        with_token("", "short")


@pytest.mark.timeout(60)
def test_without_a_token_control_is_refused_and_probes_still_answered(workload_binary: Path, tmp_path: Path) -> None:
    guest = Workload(workload_binary, tmp_path, "")
    try:
        with pytest.raises(GuestControlError, match="control is disabled"):
            GuestControl(guest.address, new_token()).storm()
        assert probe_udp(guest.address, 1.0) is not None
    finally:
        guest.stop()


@pytest.mark.timeout(60)
def test_a_wrong_token_is_refused_and_changes_nothing(workload: Workload, token: str) -> None:
    with pytest.raises(GuestControlError, match="bad token"):
        GuestControl(workload.address, new_token()).storm()
    state = GuestControl(workload.address, token).status()
    assert not state.storm and state.rate_mib == 1 and state.flood_pps == 0
    assert probe_udp(workload.address, 1.0) is not None


@pytest.mark.timeout(60)
def test_a_write_storm_burns_cpu_until_restored_and_probes_are_still_answered(workload: Workload, token: str) -> None:
    control = GuestControl(workload.address, token)
    quiet = workload.cpu_over(1.0)
    state = control.storm()
    assert state.storm and state.command == "storm"
    stormy = workload.cpu_over(1.5)
    assert probe_udp(workload.address, 1.0) is not None, "the guest keeps answering during a storm"
    restored = control.restore()
    assert not restored.storm and restored.rate_mib == 1
    after = workload.cpu_over(1.0)
    print(f"\nworkload CPU: quiet {quiet:.2f}, storm {stormy:.2f}, restored {after:.2f} of a core")
    assert stormy >= 0.3 and stormy >= 5 * max(quiet, 0.01), (quiet, stormy)
    assert after < stormy / 3, (stormy, after)
    assert "sealift-ctl storm" in workload.console.read_text()
    assert control.rate(6).rate_mib == 6


@pytest.mark.timeout(60)
def test_an_outbound_flood_has_its_rate_and_its_duration_and_can_be_stopped(workload: Workload, token: str) -> None:
    control = GuestControl(workload.address, token)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(0.2)
        state = control.flood(sink.getsockname(), pps=500, seconds=2, size=200)
        assert state.flood_pps == 500 and 0 < state.flood_left_ms <= 2000
        started, sizes = time.monotonic(), []
        while time.monotonic() - started < 3.5:
            try:
                sizes.append(len(sink.recv(2048)))
            except TimeoutError:
                pass
        assert set(sizes) == {200}
        assert 600 <= len(sizes) <= 1100, f"500/s for 2 s, received {len(sizes)}"
        assert control.status().flood_pps == 0, "the flood ends by itself"

        control.flood(sink.getsockname(), pps=200, seconds=30, size=100)
        time.sleep(0.5)
        stopped = control.stop()
        assert stopped.flood_pps == 0 and stopped.flood_sent > 0
        time.sleep(0.2)
        while True:  # drain what was in flight
            try:
                sink.recv(2048)
            except TimeoutError:
                break
        time.sleep(0.5)
        sink.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sink.recv(2048)
    console = workload.console.read_text()
    assert "sealift-flood start" in console and "sealift-flood end" in console


@pytest.mark.timeout(60)
def test_the_guest_caps_a_flood_and_answers_a_retry_without_acting_twice(workload: Workload, token: str) -> None:
    control = GuestControl(workload.address, token)
    with pytest.raises(GuestControlError, match="at most 20000"):
        control.flood(("10.0.0.1", 9), pps=50_000, seconds=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)

        def ask(request_id: str, *words: object) -> str:
            sock.sendto(request_line(token, request_id, *words), workload.address)  # type: ignore[arg-type]
            return sock.recv(512).decode()

        # The guest checks for itself: a client that skips the checks above gets refused.
        assert ask("big", "flood", "10.0.0.1", 9, 50000, 5).startswith("sealift-nak big pps must be")
        assert ask("long", "flood", "10.0.0.1", 9, 100, 31).startswith("sealift-nak long")
        assert ask("bcast", "flood", "255.255.255.255", 9, 100, 1).startswith("sealift-nak bcast the target")
        assert ask("word", "rate", "lots").startswith("sealift-nak word rate must be")
        assert ask("x" * 33, "storm").startswith("sealift-nak - bad token or request"), "IDs are at most 32 characters"
        first = ask("once", "storm")
        time.sleep(0.3)
        assert ask("once", "storm") == first, "a retry gets the same answer (same counter: not done again)"
        assert ask("next", "restore").startswith("sealift-ack next restore")
