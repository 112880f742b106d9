"""Shared fixtures: one cluster CA with hosts and operators of every role, another CA,
and a helper that runs the server side of a real TLS handshake in a thread."""

from __future__ import annotations

import datetime
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL

from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.operators import OperatorIdentity
from sealift.security.tls import TlsStream

JOIN_TIMEOUT = 20.0  # only a guard against a hung test, never a measurement

UTC = datetime.UTC


@dataclass(frozen=True)
class Cluster:
    root: Path
    ca: ClusterCA
    host_a: HostIdentity
    host_b: HostIdentity
    admin: OperatorIdentity  # alice
    operator: OperatorIdentity  # olga
    auditor: OperatorIdentity  # audrey
    other_ca: ClusterCA
    foreign_admin: OperatorIdentity  # "alice", admin, but issued by another CA


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """Read-only shared PKI. Tests that revoke build their own CA (fresh_ca)."""
    root = tmp_path_factory.mktemp("cluster")
    ca = ClusterCA.init(root / "ca")
    other_ca = ClusterCA.init(root / "other-ca", name="some other CA")
    return Cluster(
        root=root,
        ca=ca,
        host_a=ca.issue_host("host-a", root / "host-a"),
        host_b=ca.issue_host("host-b", root / "host-b"),
        admin=ca.issue_operator("alice", "admin", root / "operators"),
        operator=ca.issue_operator("olga", "operator", root / "operators"),
        auditor=ca.issue_operator("audrey", "auditor", root / "operators"),
        other_ca=other_ca,
        foreign_admin=other_ca.issue_operator("alice", "admin", root / "foreign"),
    )


@pytest.fixture
def fresh_ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.init(tmp_path / "ca")


class HandshakeServer:
    """Accepts one TLS connection on 127.0.0.1 in a thread; `stream` or `error` afterwards."""

    def __init__(self, context: SSL.Context) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.context = context
        self.stream: TlsStream | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            self.stream = TlsStream.accept(sock, self.context, timeout=10)
        except Exception as exc:  # handed to the test thread, which asserts on it
            self.error = exc
        finally:
            self.listener.close()

    def connect_tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=JOIN_TIMEOUT)

    def join(self) -> None:
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), "server thread did not finish"
        if self.stream is not None:
            self.stream.close()
