"""Shared fixtures: a cluster CA with hosts, and TLS connections over 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.tls import TlsStream, client_context, server_context

JOIN_TIMEOUT = 20.0  # only a guard against a hung test, never a measurement


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: ClusterCA
    host_a: HostIdentity
    host_b: HostIdentity
    host_c: HostIdentity
    other_ca: ClusterCA
    foreign_a: HostIdentity  # "host-a", but issued by another CA


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = ClusterCA.init(root / "ca")
    other_ca = ClusterCA.init(root / "other-ca", name="some other CA")
    return Pki(
        root=root,
        ca=ca,
        host_a=ca.issue_host("host-a", root / "host-a"),
        host_b=ca.issue_host("host-b", root / "host-b"),
        host_c=ca.issue_host("host-c", root / "host-c"),
        other_ca=other_ca,
        foreign_a=other_ca.issue_host("host-a", root / "foreign-a"),
    )


class Server:
    """Accepts one connection on 127.0.0.1 in a thread and runs a handler on it.

    `result` is what the handler returned, `error` what accept or the handler
    raised (asserted by the test, not swallowed).
    """

    def __init__(
        self,
        context: SSL.Context,
        handler: Callable[[TlsStream], Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.context = context
        self.handler = handler
        self.timeout = timeout
        self.stream: TlsStream | None = None
        self.result: Any = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            self.stream = TlsStream.accept(sock, self.context, timeout=self.timeout)
            if self.handler is not None:
                self.result = self.handler(self.stream)
        except Exception as exc:  # handed to the test thread, which asserts on it
            self.error = exc
        finally:
            self.listener.close()

    def connect_tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=JOIN_TIMEOUT)

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), "server thread did not finish"

    def join(self) -> None:
        """Wait for the thread, then close the server's stream if it has one."""
        self.wait()
        if self.stream is not None:
            self.stream.close()


@pytest.fixture
def connected(pki: Pki) -> Iterator[tuple[TlsStream, TlsStream]]:
    """(client host-a, server host-b), handshake done, both open."""
    server = Server(server_context(pki.host_b))
    client = TlsStream.connect(server.connect_tcp(), client_context(pki.host_a), "host-b", timeout=10)
    server.wait()
    assert server.error is None and server.stream is not None
    try:
        yield client, server.stream
    finally:
        client.close()
        server.stream.close()
