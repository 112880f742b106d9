"""The migration port of a real agent refuses what it must, and keeps serving."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.cluster import LocalCluster
from sealift.host.transport import ControlChannel
from sealift.security.errors import SecurityError
from sealift.security.identity import ClusterCA, HostIdentity
from sealift.wire.datastream import encode_stream_open
from sealift.wire.messages import Hello


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(extra_config="handshake_timeout_s = 1")
    cluster.start("host-b")
    yield cluster
    cluster.cleanup()


def port(cluster: LocalCluster) -> tuple[str, int]:
    return cluster.addresses["host-b"]


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the agent closed the connection (EOF or reset) within the timeout."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def agent_still_serves(cluster: LocalCluster) -> None:
    assert cluster.client("host-b").request("status")["status"]["host"] == "host-b"


def tls_client(cert_dir: Path | None, host: str | None, ca_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=str(ca_file))
    context.check_hostname = False
    if cert_dir is not None and host is not None:
        context.load_cert_chain(str(cert_dir / f"{host}.pem"), str(cert_dir / f"{host}.key"))
    return context


def test_tls_client_without_certificate_is_refused(cluster: LocalCluster) -> None:
    context = tls_client(None, None, cluster.pki / "ca.pem")
    with socket.create_connection(port(cluster)) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"x" * 16)
                assert tls.recv(1) == b""  # TLS 1.3: the refusal arrives on the first read
                raise ConnectionError("closed without data")
    agent_still_serves(cluster)


def test_certificate_from_another_ca_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    rogue = ClusterCA.init(tmp_path / "rogue-ca")
    rogue.issue_host("host-a", tmp_path / "rogue-ca")  # same name, wrong CA
    identity = HostIdentity.load(tmp_path / "rogue-ca", "host-a")
    with pytest.raises((SecurityError, ConnectionError, OSError)):
        channel = ControlChannel.connect(port(cluster), identity, "host-b", secure=True, timeout=5)
        channel.send(_hello())
        channel.recv(5)
    agent_still_serves(cluster)


def test_valid_client_reaches_the_protocol(cluster: LocalCluster) -> None:
    """Positive control for the two tests above: the right certificate gets an answer."""
    identity = HostIdentity.load(cluster.pki, "host-a")
    channel = ControlChannel.connect(port(cluster), identity, "host-b", secure=True, timeout=5)
    try:
        channel.send(_hello(vm_name="no-such-backend", memory=1 << 20, backend="qemu"))
        reply = channel.recv(5)
        assert type(reply).__name__ == "Refuse"  # authenticated; refused for a stated reason
    finally:
        channel.close()


def test_server_must_be_the_host_we_asked_for(cluster: LocalCluster) -> None:
    identity = HostIdentity.load(cluster.pki, "host-a")
    with pytest.raises(SecurityError, match="host-c|expected"):
        ControlChannel.connect(port(cluster), identity, "host-c", secure=True, timeout=5)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00" * 64,
        b"SLC1" + b"\x01" * 20,
        encode_stream_open(b"\x07" * 16, 0) + b"\x01" * 100,
    ],
    ids=["http", "zeros", "plaintext-control-disabled", "data-stream-unknown-session"],
)
def test_unexpected_bytes_close_the_connection(cluster: LocalCluster, payload: bytes) -> None:
    with socket.create_connection(port(cluster)) as sock:
        sock.sendall(payload)
        assert closed_by_peer(sock)
    agent_still_serves(cluster)


def test_silent_client_is_dropped_at_the_pre_authentication_deadline(cluster: LocalCluster) -> None:
    with socket.create_connection(port(cluster)) as sock:
        assert closed_by_peer(sock, timeout=10.0)  # handshake_timeout_s = 1 in this cluster
    agent_still_serves(cluster)


def _hello(vm_name: str = "vm1", memory: int = 64 << 20, backend: str = "builtin") -> Hello:
    return Hello(
        migration_id="0" * 32,
        vm_name=vm_name,
        source_host="host-a",
        destination_host="host-b",
        nonce=b"\x01" * 32,
        memory_bytes=memory,
        page_size=4096,
        secure=True,
        compression=None,
        streams=1,
        backend=backend,
        order=None,
        psk_proof=None,
    )
