"""QEMU's own TCP migration path (backends/qemu/direct.py) between two real QEMUs (TCG), without agents.

A TCP relay the test controls stands between the two QEMUs and records what
crosses: with QEMU's native TLS (credentials from a cluster CA, as the
agents install them) the guest's secret must not appear and the stream must
be TLS; in clear (the ``plain`` transport) the secret is there. A source
whose certificate comes from another CA is refused by the destination QEMU,
and the source guest keeps running.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from qemu_testlib import VmPool, free_udp_port
from sealift.backends.qemu.direct import QemuTls, TlsMaterial, listen_direct, run_after_hooks, start_direct
from sealift.backends.qemu.image import DEFAULT_SECRET
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.security.identity import ClusterCA, HostIdentity

MiB = 1 << 20
GUEST_MIB = 160
WORKLOAD = "sealift.mem_mib=48 sealift.rate_mib=8"
UNCAPPED = 8 << 30
SLOW = 48 * MiB  # bytes/s: slow enough for several live passes while the workload dirties memory
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a handshake message


class TcpRelay:
    """Forwards every connection it accepts on 127.0.0.1 to ``target``; records the forward direction."""

    def __init__(self, target: tuple[str, int], needle: bytes) -> None:
        self.target = target
        self.needle = needle
        self.connections = 0
        self.forwarded = 0
        self.needle_hits = 0
        self.first_bytes: list[bytes] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", int(self._server.getsockname()[1]))
        threading.Thread(target=self._accept, name="tcp-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                upstream, _ = self._server.accept()
                downstream = socket.create_connection(self.target, timeout=5)
                downstream.settimeout(None)
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets += [upstream, downstream]
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        tail, first = b"", True
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            if forward:
                window = tail + data
                with self._lock:
                    if first:
                        self.first_bytes.append(data[:8])
                    self.needle_hits += window.count(self.needle)
                    self.forwarded += len(data)
                tail, first = window[-(len(self.needle) - 1) :], False
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


def issue(tmp_path: Path, ca_dir: str, hosts: tuple[str, ...]) -> dict[str, TlsMaterial]:
    ca = ClusterCA.init(tmp_path / ca_dir)
    pki = tmp_path / f"{ca_dir}-pki"
    identities: dict[str, HostIdentity] = {host: ca.issue_host(host, pki) for host in hosts}
    return {h: TlsMaterial.from_files(i.ca_path, i.cert_path, i.key_path) for h, i in identities.items()}


def start_pair(vms: VmPool) -> tuple[QemuVM, QemuVM]:
    src_dir, dst_dir = vms.new_dir("sl-dsrc-"), vms.new_dir("sl-ddst-")
    source = vms.start(src_dir, "mig", GUEST_MIB, net=NetConfig.user(free_udp_port()), extra_cmdline=WORKLOAD)
    destination = vms.start(
        dst_dir, "mig", GUEST_MIB, net=NetConfig.user(free_udp_port()), extra_cmdline=WORKLOAD, incoming="defer"
    )
    destination.pause()  # as the agent does: autostart off, the guest runs only on our cont
    source.wait_counter(0, timeout=90)
    return source, destination


def configure(source: QemuVM, destination: QemuVM, multifd: int = 0, bandwidth: int = UNCAPPED) -> None:
    caps = {"multifd": True} if multifd else {}
    for vm in (source, destination):
        if caps:
            vm.set_migration_capabilities(caps)
            vm.set_migration_parameters({"multifd-channels": multifd})
    source.set_migration_parameters({"max-bandwidth": bandwidth, "downtime-limit": 300})


def finish_and_check(source: QemuVM, destination: QemuVM) -> dict:
    done = source.wait_migration({"completed"}, timeout=120)
    deadline = time.monotonic() + 20
    while destination.status() != "paused" and time.monotonic() < deadline:  # loading the stream's tail
        time.sleep(0.05)
    assert destination.status() == "paused"  # autostart off: nothing runs until our cont
    destination.resume()
    last = source.counter() or 0
    assert source.status() == "postmigrate"
    assert destination.wait_counter(last, timeout=30) > last
    time.sleep(3)
    assert destination.alive(), destination.console_tail(5)  # ...and keeps running
    return done


@pytest.mark.timeout(240)
def test_qemu_tls_hides_the_secret_and_the_guest_continues(vms: VmPool, tmp_path: Path) -> None:
    creds = issue(tmp_path, "ca", ("host-a", "host-b"))
    source, destination = start_pair(vms)
    server, client = QemuTls(creds["host-b"], "server", "host-a"), QemuTls(creds["host-a"], "client", "host-b")
    port = listen_direct(destination, "127.0.0.1", before=[server.install])
    relay = TcpRelay(("127.0.0.1", port), DEFAULT_SECRET.encode())
    try:
        # Slow: several live passes, each ending in a dirty sync. Before the RAM padding in
        # backends/qemu/vm.py, QEMU 7.2 under TCG lost guest writes here and the guest crashed.
        configure(source, destination, bandwidth=SLOW)
        start_direct(source, relay.address, before=[client.install])
        done = finish_and_check(source, destination)
    finally:
        relay.close()
        run_after_hooks(source, [client.remove])
        run_after_hooks(destination, [server.remove])
    assert relay.forwarded >= 32 * MiB
    assert relay.first_bytes and all(first[0] == TLS_HANDSHAKE for first in relay.first_bytes), relay.first_bytes
    assert relay.needle_hits == 0
    assert done["ram"]["dirty-sync-count"] >= 4, done["ram"]  # setup, two live passes, completion
    assert destination.query_migrate_parameters()["tls-creds"] == ""  # removed after the migration


@pytest.mark.timeout(240)
def test_plain_multifd_carries_the_secret_in_clear(vms: VmPool) -> None:
    source, destination = start_pair(vms)
    configure(source, destination, multifd=2)
    port = listen_direct(destination, "127.0.0.1")
    relay = TcpRelay(("127.0.0.1", port), DEFAULT_SECRET.encode())
    try:
        start_direct(source, relay.address)
        finish_and_check(source, destination)
    finally:
        relay.close()
    assert relay.connections == 3  # the main channel and two multifd channels
    assert relay.needle_hits >= 1  # the positive control: QEMU's own stream is guest RAM in clear


@pytest.mark.timeout(240)
def test_qemu_tls_refuses_a_source_certificate_from_another_ca(vms: VmPool, tmp_path: Path) -> None:
    creds = issue(tmp_path, "ca", ("host-a", "host-b"))
    rogue = issue(tmp_path, "rogue-ca", ("host-a",))
    source, destination = start_pair(vms)
    server, client = QemuTls(creds["host-b"], "server", "host-a"), QemuTls(rogue["host-a"], "client", "host-b")
    port = listen_direct(destination, "127.0.0.1", before=[server.install])
    configure(source, destination)
    try:
        start_direct(source, ("127.0.0.1", port), before=[client.install])
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_migration({"completed", "pre-switchover"}, timeout=60)
    finally:
        run_after_hooks(source, [client.remove])
    assert source.status() == "running"
    before = source.counter() or 0
    assert source.wait_counter(before, timeout=30) > before
    # A destination whose TLS handshake failed either exits or waits on (QEMU 7.2 keeps listening): never runs.
    assert destination.wait_exit(1) or destination.status() != "running"


def test_the_incoming_qemu_never_listens_on_a_wildcard_address(vms: VmPool) -> None:
    destination = vms.start(vms.new_dir("sl-ddst-"), "mig", GUEST_MIB, incoming="defer")
    with pytest.raises(QemuError, match="wildcard"):
        listen_direct(destination, "0.0.0.0")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "client_host, server_expects, client_expects, where, why",
    [
        # A cluster host, but not the source the destination admits (tls-authz): the destination refuses.
        ("host-c", "host-a", "host-b", "destination", "authz check for CN=host-c is denied"),
        # The source expects another destination name (tls-hostname): the source refuses.
        ("host-a", "host-a", "host-c", "source", "does not match the hostname host-c"),
    ],
)
def test_qemu_tls_checks_who_is_at_the_other_end(
    vms: VmPool, tmp_path: Path, client_host: str, server_expects: str, client_expects: str, where: str, why: str
) -> None:
    creds = issue(tmp_path, "ca", ("host-a", "host-b", "host-c"))
    source, destination = start_pair(vms)
    server = QemuTls(creds["host-b"], "server", server_expects)
    client = QemuTls(creds[client_host], "client", client_expects)
    port = listen_direct(destination, "127.0.0.1", before=[server.install])
    configure(source, destination)
    try:
        start_direct(source, ("127.0.0.1", port), before=[client.install])
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_migration({"completed", "pre-switchover"}, timeout=60)
    finally:
        run_after_hooks(source, [client.remove])
    assert source.status() == "running"
    refuser = destination if where == "destination" else source
    deadline = time.monotonic() + 10
    while why not in refuser.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert why in refuser.log_path.read_text(), refuser.log_tail()
