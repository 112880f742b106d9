"""Fixtures for the guard tests: real host keys from a real cluster CA, PSK stores, TLS pairs."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.psk import PskStore, new_psk, wrap_key_from_private_key
from sealift.security.tls import TlsStream, client_context, server_context

JOIN_TIMEOUT = 20.0  # a guard against a hung test, never a measurement


@dataclass(frozen=True)
class Hosts:
    ca: ClusterCA
    a: HostIdentity
    b: HostIdentity
    c: HostIdentity


@pytest.fixture(scope="session")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Hosts:
    root = tmp_path_factory.mktemp("guard-pki")
    ca = ClusterCA.init(root / "ca")
    return Hosts(
        ca=ca,
        a=ca.issue_host("host-a", root / "host-a"),
        b=ca.issue_host("host-b", root / "host-b"),
        c=ca.issue_host("host-c", root / "host-c"),
    )


@dataclass
class PskPair:
    """host-a's and host-b's PSK stores, provisioned with the same first key."""

    dir: Path
    wrap_a: bytes
    wrap_b: bytes
    a: PskStore
    b: PskStore
    initial_key: bytes

    def reopen(self) -> None:
        """What an agent restart does: a new store on the same files (ratchet slots are lost)."""
        self.a.close()
        self.b.close()
        self.a = PskStore(self.dir / "a.db", self.wrap_a)
        self.b = PskStore(self.dir / "b.db", self.wrap_b)


@pytest.fixture
def psk_pair(hosts: Hosts, tmp_path: Path) -> Iterator[PskPair]:
    wrap_a = wrap_key_from_private_key(hosts.a.private_key())
    wrap_b = wrap_key_from_private_key(hosts.b.private_key())
    # /dev/shm when there is one: the same SQLite, without waiting for a disk's fsync.
    shm = Path("/dev/shm")
    directory = Path(os.path.realpath(tmp_path))
    if shm.is_dir() and os.access(shm, os.W_OK):
        directory = Path(os.path.realpath(shm)) / f"sealift-psk-test-{os.getpid()}-{tmp_path.name}"
        directory.mkdir()
    key = new_psk()
    pair = PskPair(
        directory, wrap_a, wrap_b, PskStore(directory / "a.db", wrap_a), PskStore(directory / "b.db", wrap_b), key
    )
    pair.a.provision("host-b", key)
    pair.b.provision("host-a", key)
    try:
        yield pair
    finally:
        pair.a.close()
        pair.b.close()
        if directory.parent == shm.resolve():
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()


@pytest.fixture
def tls_pair(hosts: Hosts) -> Iterator[tuple[TlsStream, TlsStream]]:
    """(client host-a, server host-b) over a real mutual-TLS connection on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            sock, _ = listener.accept()
            result["stream"] = TlsStream.accept(sock, server_context(hosts.b), timeout=10)
        except Exception as exc:  # handed to the test thread, which asserts on it
            result["error"] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = socket.create_connection(("127.0.0.1", port), timeout=JOIN_TIMEOUT)
    client = TlsStream.connect(sock, client_context(hosts.a), "host-b", timeout=10)
    thread.join(JOIN_TIMEOUT)
    assert "error" not in result, result.get("error")
    server = result["stream"]
    assert isinstance(server, TlsStream)
    try:
        yield client, server
    finally:
        client.close()
        server.close()
