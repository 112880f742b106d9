"""Live migration between two real QEMUs (TCG) through a relay the test controls.

The relay stands where sealift's channel will stand: the source QEMU
migrates to a unix socket the relay listens on, and the relay copies the
stream into the destination QEMU (started with ``-incoming defer``). It
searches the stream for the guest's secret: QEMU's own migration stream is
plaintext guest RAM, so the secret must be there (the positive control for
the encrypted channel's tests), and it can cut the link mid-stream.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from qemu_testlib import VmPool, free_udp_port
from sealift.backends.qemu.image import DEFAULT_SECRET
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.vm import QemuError, QemuVM

MiB = 1 << 20
GUEST_MIB = 256
WORKLOAD = "sealift.mem_mib=64 sealift.rate_mib=16"
UNCAPPED = 8 << 30  # bytes/s: QEMU's default max-bandwidth (128 MiB/s) would dominate the timing


class UnixRelay:
    """Accepts the source's migration connection and pumps it into the destination's socket."""

    def __init__(self, listen: Path, target: Path, needle: bytes, cut_after: int | None = None) -> None:
        self.target = target
        self.needle = needle
        self.cut_after = cut_after
        self.forwarded = 0  # bytes source -> destination
        self.needle_hits = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._done = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(1)
        threading.Thread(target=self._serve, name="relay", daemon=True).start()

    def _serve(self) -> None:
        try:
            upstream, _ = self._server.accept()
            downstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            downstream.connect(str(self.target))
        except OSError:
            self._done.set()
            return
        with self._lock:
            self._sockets += [upstream, downstream]
        back = threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True)
        back.start()  # the return path (QEMU uses it only for some features; carry it anyway)
        self._pump(upstream, downstream, True)
        back.join(timeout=10)
        self._done.set()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        tail = b""
        while not self._cut.is_set():
            try:
                data = src.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            if forward:
                window = tail + data
                self.needle_hits += window.count(self.needle)
                tail = window[-(len(self.needle) - 1) :]
                self.forwarded += len(data)
            try:
                dst.sendall(data)
            except OSError:
                break
            if forward and self.cut_after is not None and self.forwarded >= self.cut_after:
                self.cut()
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """The link breaks: both connections are torn down at once."""
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait_done(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self.cut()
        self._server.close()
        for sock in self._sockets:
            sock.close()


def first_counter(vm: QemuVM) -> int | None:
    for line in vm.console_tail(100_000):
        match = re.match(r"sealift-counter (\d+)", line)
        if match:
            return int(match.group(1))
    return None


def wait_probe(vm: QemuVM, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = vm.probe(0.5)
        if answer is not None:
            return answer
    raise AssertionError(f"{vm.vm_dir.name}/{vm.name} never answered a probe; console: {vm.console_tail(5)}")


def wait_status(vm: QemuVM, wanted: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = vm.status()
    while status != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        status = vm.status()
    return status


def start_pair(vms: VmPool) -> tuple[QemuVM, QemuVM, Path]:
    """A running source and a destination waiting for a deferred incoming migration (same VM name)."""
    src_dir, dst_dir, relay_dir = vms.new_dir("sl-src-"), vms.new_dir("sl-dst-"), vms.new_dir("sl-relay-")
    source = vms.start(src_dir, "mig", GUEST_MIB, net=NetConfig.user(free_udp_port()), extra_cmdline=WORKLOAD)
    destination = vms.start(
        dst_dir, "mig", GUEST_MIB, net=NetConfig.user(free_udp_port()), extra_cmdline=WORKLOAD, incoming="defer"
    )
    assert destination.status() == "inmigrate"
    source.wait_counter(0, timeout=90)
    wait_probe(source)
    return source, destination, relay_dir


def prepare(
    source: QemuVM, destination: QemuVM, relay_dir: Path, bandwidth: int, cut_after: int | None = None
) -> tuple[UnixRelay, str]:
    # pause-before-switchover: the source stops before sending device state and waits
    # for migrate-continue, which sealift gives only once the destination has confirmed.
    caps = {"pause-before-switchover": True}
    source.set_migration_capabilities(caps)
    destination.set_migration_capabilities(caps)
    source.set_migration_parameters({"max-bandwidth": bandwidth, "downtime-limit": 300})
    incoming = destination.vm_dir / "incoming.sock"
    destination.migrate_incoming(f"unix:{incoming}")
    relay = UnixRelay(relay_dir / "relay.sock", incoming, DEFAULT_SECRET.encode(), cut_after)
    return relay, f"unix:{relay_dir / 'relay.sock'}"


def test_migration_through_relay_continues_on_destination(vms: VmPool) -> None:
    source, destination, relay_dir = start_pair(vms)
    relay, uri = prepare(source, destination, relay_dir, UNCAPPED)
    try:
        started = time.monotonic()
        source.migrate(uri)
        source.wait_migration({"pre-switchover"}, timeout=120)
        # Paused before the switchover: the guest is stopped, nothing runs anywhere yet.
        assert source.status() == "finish-migrate"
        assert destination.status() == "inmigrate"
        last_on_source = source.counter()
        assert last_on_source is not None

        source.migrate_continue("pre-switchover")
        done = source.wait_migration({"completed"}, timeout=60)
        elapsed = time.monotonic() - started
        assert wait_status(destination, "running", 10) == "running"
    finally:
        relay.close()

    assert source.status() == "postmigrate"
    assert source.probe(0.3) is None  # the source copy is stopped for good
    # The guest continued where it stopped: the destination never booted, its first
    # counter line follows the source's last one, and it keeps counting.
    first_on_destination = destination.wait_counter(last_on_source, timeout=30)
    assert first_counter(destination) is not None and first_counter(destination) >= last_on_source  # type: ignore[operator]
    assert first_on_destination > last_on_source
    assert wait_probe(destination) >= last_on_source
    destination.announce_self()

    # Plaintext QEMU migration carries guest RAM as is: the secret crosses the relay.
    assert relay.needle_hits >= 1
    assert relay.forwarded >= 64 * MiB  # at least the workload's memory went through
    ram = done["ram"]
    print(
        f"\nmigration {GUEST_MIB} MiB: {elapsed:.2f} s wall, QEMU total {done.get('total-time')} ms, "
        f"downtime {done.get('downtime')} ms (incl. waiting at pre-switchover), "
        f"{relay.forwarded / MiB:.0f} MiB relayed, "
        f"{ram.get('dirty-sync-count')} syncs, secret seen {relay.needle_hits}x"
    )


def test_cut_during_precopy_fails_and_source_keeps_running(vms: VmPool) -> None:
    source, destination, relay_dir = start_pair(vms)
    # A capped link so that the cut lands in the middle of the first pass.
    relay, uri = prepare(source, destination, relay_dir, 32 * MiB, cut_after=16 * MiB)
    try:
        source.migrate(uri)
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_migration({"completed", "pre-switchover"}, timeout=60)
    finally:
        relay.close()
    assert relay.forwarded < GUEST_MIB * MiB
    # The source never stopped: it runs, counts and answers.
    assert source.status() == "running"
    before = source.counter() or 0
    assert source.wait_counter(before, timeout=30) > before
    assert wait_probe(source) >= before
    # The destination got a truncated stream and gave up on its own.
    assert destination.wait_exit(15), "the destination should exit after a broken incoming stream"
    assert destination.exit_code() not in (None, 0)


def test_cut_at_pre_switchover_then_cancel_resumes_source(vms: VmPool) -> None:
    source, destination, relay_dir = start_pair(vms)
    relay, uri = prepare(source, destination, relay_dir, UNCAPPED)
    try:
        source.migrate(uri)
        source.wait_migration({"pre-switchover"}, timeout=120)
        paused_at = source.counter() or 0
        relay.cut()  # the destination's confirmation will never come
        # QEMU does not notice a dead link while it waits at pre-switchover: the
        # decision to give up is the caller's (sealift's), by cancelling.
        assert source.query_migrate()["status"] == "pre-switchover"
        source.migrate_cancel()
        source.wait_migration({"cancelled"}, timeout=30)
    finally:
        relay.close()
    if source.status() == "paused":
        source.resume()  # QEMU 7.2 resumes by itself on cancel; older ones may not
    assert source.status() == "running"
    assert source.wait_counter(paused_at, timeout=30) > paused_at
    assert wait_probe(source) >= paused_at
    assert destination.wait_exit(15)
