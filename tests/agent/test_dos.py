"""T9: handshake floods and slow clients do not stop a legitimate migration.

The attacker connects from 127.0.0.2 (its own address on loopback), bounded
in count and time; the legitimate source is 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.cluster import LocalCluster

ATTACKER = "127.0.0.2"
VM = "vm1"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(extra_config="handshake_timeout_s = 2\nstep_timeout_s = 10")
    cluster.start()
    yield cluster
    cluster.cleanup()


def slow_clients(target: tuple[str, int], count: int, hold_s: float, stop: threading.Event) -> list[socket.socket]:
    """Connections that send one byte of a TLS record and then nothing (slowloris).

    80 of them would fill the whole port (64 connections) but for the per-address cap.
    """
    held = []
    for _ in range(count):
        try:
            sock = socket.create_connection(target, timeout=2, source_address=(ATTACKER, 0))
            sock.sendall(b"\x16")
            held.append(sock)
        except OSError:
            pass
    stop.wait(hold_s)
    return held


def handshake_flood(target: tuple[str, int], count: int, stop: threading.Event, outcome: dict) -> None:
    """Full TLS handshakes without a client certificate, as fast as possible (bounded)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    attempts = refused = 0
    for _ in range(count):
        if stop.is_set():
            break
        attempts += 1
        try:
            with socket.create_connection(target, timeout=2, source_address=(ATTACKER, 0)) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"x")
                    if not tls.recv(1):
                        refused += 1
        except (OSError, ssl.SSLError):
            refused += 1
    outcome.update(attempts=attempts, refused=refused)


def test_a_migration_completes_under_a_handshake_flood_and_slow_clients(cluster: LocalCluster) -> None:
    target = cluster.addresses["host-b"]
    cluster.client("host-a").request("vm.start", name=VM, memory="64M", workload="db")
    stop = threading.Event()
    flood: dict = {}
    threads = [
        threading.Thread(target=slow_clients, args=(target, 80, 8.0, stop)),
        threading.Thread(target=handshake_flood, args=(target, 400, stop, flood)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the attack is under way before the migration starts
    try:
        report = cluster.migrate(VM, "host-a", "host-b", options={"bandwidth_limit_bps": 24 << 20})
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert report["status"] == "completed"
    assert flood["refused"] == flood["attempts"] > 0  # no handshake without a certificate succeeds
    guard = cluster.client("host-b").request("status")["status"]["guard"]
    # The cheap checks did the refusing: per-address caps and handshake budget.
    assert guard["refused_connections"] + guard["refused_handshakes"] > 0
    info = cluster.client("host-b").request("vm.info", name=VM)["vm"]
    assert info["alive"]
