"""Mutual TLS 1.3 over real sockets on 127.0.0.1, handshakes in threads."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from sealift.security.certificates import LeafProfile
from sealift.security.errors import HandshakeError, PeerIdentityError
from sealift.security.identity import HostIdentity
from sealift.security.tls import TlsStream, client_context, server_context

from .conftest import Pki, Server

LABEL = b"EXPORTER-sealift-test"


def _connect(server: Server, identity: HostIdentity, expected: str = "host-b") -> TlsStream:
    return TlsStream.connect(server.connect_tcp(), client_context(identity), expected, timeout=10)


def _write_identity(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ca_path: Path
) -> HostIdentity:
    """An identity from arbitrary key material (no consistency checks: attackers don't run them)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return HostIdentity(name=name, cert_path=cert_path, key_path=key_path, ca_path=ca_path)


def _self_signed(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


# --------------------------------------------------------------------------
# Working connections


def test_mutual_tls_between_two_hosts(pki: Pki) -> None:
    def serve(stream: TlsStream) -> tuple[str, bytes, bytes]:
        stream.sendall(b"hello from b")
        return stream.peer_name, stream.recv_exactly(12), stream.recv(100)

    server = Server(server_context(pki.host_b), serve)
    client = _connect(server, pki.host_a)
    assert client.peer_name == "host-b"
    assert client.peer_certificate == pki.host_b.certificate()
    assert client.protocol_version == "TLSv1.3"
    assert client.cipher_name in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert client.group_name in {"x25519", "secp256r1", "prime256v1"}
    assert client.recv_exactly(12) == b"hello from b"
    client.sendall(b"hello from a")
    client.close()
    client.close()  # idempotent
    server.join()
    assert server.error is None
    assert server.result == ("host-a", b"hello from a", b"")  # b"" after close_notify


def test_large_transfer_arrives_intact(pki: Pki, connected: tuple[TlsStream, TlsStream]) -> None:
    client, server_stream = connected
    data = os.urandom(3 * 1024 * 1024 + 17)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(server_stream.recv_exactly(len(data))))
    reader.start()
    client.sendall(memoryview(data))
    reader.join(20)
    assert received == [data]


def test_exporter_is_equal_on_both_ends_and_unique_per_connection(pki: Pki) -> None:
    def export(stream: TlsStream) -> bytes:
        value = stream.export_keying_material(LABEL, 32, b"ctx")
        stream.recv(1)  # wait for the client to finish before closing
        return value

    exported = []
    for _ in range(2):
        server = Server(server_context(pki.host_b), export)
        client = _connect(server, pki.host_a)
        mine = client.export_keying_material(LABEL, 32, b"ctx")
        assert client.export_keying_material(LABEL, 32, b"other") != mine
        assert client.export_keying_material(b"EXPORTER-other", 32, b"ctx") != mine
        client.close()
        server.join()
        assert server.error is None
        assert server.result == mine
        exported.append(mine)
    assert exported[0] != exported[1]


def test_no_session_resumption(pki: Pki) -> None:
    """A client that keeps the session ticket still gets a full handshake."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(pki.host_a.ca_path)
    client_ctx.load_cert_chain(pki.host_a.cert_path, pki.host_a.key_path)
    session = None
    for _ in range(2):
        server = Server(server_context(pki.host_b), lambda s: (s.sendall(b"x"), s.recv(1)))
        tls = client_ctx.wrap_socket(server.connect_tcp(), session=session)
        assert tls.recv(1) == b"x"  # also processes any ticket the server sent
        assert not tls.session_reused
        session = tls.session
        tls.sendall(b"y")
        server.join()
        tls.close()
        assert server.error is None


def test_clean_and_unclean_end_of_stream(pki: Pki, connected: tuple[TlsStream, TlsStream]) -> None:
    client, server_stream = connected
    server_stream.sendall(b"abc")
    server_stream.close()
    with pytest.raises(ConnectionError, match="after 3 of 10"):
        client.recv_exactly(10)


def test_truncation_without_close_notify_is_an_error(connected: tuple[TlsStream, TlsStream]) -> None:
    client, server_stream = connected
    server_stream.sendall(b"abc")
    # Cut the TCP connection under TLS, as an attacker injecting a FIN would.
    raw = socket.socket(fileno=os.dup(server_stream.fileno()))
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    assert client.recv_exactly(3) == b"abc"
    with pytest.raises(ConnectionError):
        client.recv(10)


def test_recv_timeout(connected: tuple[TlsStream, TlsStream]) -> None:
    client, _ = connected
    client.settimeout(0.2)
    with pytest.raises(TimeoutError):
        client.recv(10)
    with pytest.raises(ValueError):
        client.settimeout(0)


# --------------------------------------------------------------------------
# Refusals


def _raw_client_context(
    ca_path: Path, identity: HostIdentity | None = None, ciphersuites: bytes | None = None
) -> SSL.Context:
    """A TLS 1.3 client not built with sealift's policy."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(ca_path))
    ctx.set_verify(SSL.VERIFY_PEER)
    if identity is not None:
        ctx.use_certificate(identity.certificate())
        ctx.use_privatekey(identity.private_key())
    if ciphersuites is not None:
        ctx.set_tls13_ciphersuites(ciphersuites)
    return ctx


def test_client_without_certificate_is_refused(pki: Pki) -> None:
    server = Server(server_context(pki.host_b))
    # In TLS 1.3 the client finishes its side before the server judges it;
    # it learns of the refusal on its first read.
    client = TlsStream.connect(server.connect_tcp(), _raw_client_context(pki.ca.cert_path), "host-b", timeout=10)
    server.join()
    assert isinstance(server.error, HandshakeError)
    assert "certificate" in str(server.error)
    with pytest.raises(ConnectionError):
        client.recv(1)
    client.close()


def test_client_with_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    impostor = HostIdentity(
        name="host-a",
        cert_path=pki.foreign_a.cert_path,
        key_path=pki.foreign_a.key_path,
        ca_path=pki.ca.cert_path,  # it trusts our CA, so only the server can refuse it
    )
    server = Server(server_context(pki.host_b))
    client = _connect(server, impostor)
    server.join()
    assert isinstance(server.error, HandshakeError)
    assert "not issued by this cluster's CA" in str(server.error)
    with pytest.raises(ConnectionError):
        client.recv(1)
    client.close()


def test_client_with_non_host_certificate_from_the_cluster_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    """A future operator certificate (other key usage) cannot act as a host."""
    key = ec.generate_private_key(ec.SECP256R1())
    profile = LeafProfile(extended_key_usages=(ExtendedKeyUsageOID.CODE_SIGNING,))
    cert = pki.ca._issue_leaf("host-a", [x509.DNSName("host-a")], key.public_key(), profile, 1)
    operator = _write_identity(tmp_path, "host-a", key, cert, pki.ca.cert_path)
    server = Server(server_context(pki.host_b))
    client = _connect(server, operator)
    server.join()
    assert isinstance(server.error, HandshakeError)
    assert "purpose" in str(server.error)
    client.close()


def test_server_with_self_signed_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    key, cert = _self_signed("host-b")
    fake_b = _write_identity(tmp_path, "host-b", key, cert, pki.ca.cert_path)
    server = Server(server_context(fake_b))
    with pytest.raises(HandshakeError, match="self-signed"):
        _connect(server, pki.host_a)
    server.join()
    assert isinstance(server.error, HandshakeError)


def test_server_from_another_ca_is_refused(pki: Pki) -> None:
    fake_a = HostIdentity(
        name="host-a",
        cert_path=pki.foreign_a.cert_path,
        key_path=pki.foreign_a.key_path,
        ca_path=pki.ca.cert_path,
    )
    server = Server(server_context(fake_a))
    with pytest.raises(HandshakeError, match="not issued by this cluster's CA"):
        _connect(server, pki.host_b, expected="host-a")
    server.join()


def test_server_with_another_hosts_valid_certificate_is_refused(pki: Pki) -> None:
    server = Server(server_context(pki.host_c))
    with pytest.raises(PeerIdentityError, match="peer presented certificate for 'host-c', expected 'host-b'"):
        _connect(server, pki.host_a, expected="host-b")
    server.join()


def test_tls12_client_is_refused(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki.host_a.ca_path)
    ctx.load_cert_chain(pki.host_a.cert_path, pki.host_a.key_path)
    server = Server(server_context(pki.host_b))
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(server.connect_tcp())
    server.join()
    assert isinstance(server.error, HandshakeError)


def test_client_without_a_shared_cipher_suite_is_refused(pki: Pki) -> None:
    ctx = _raw_client_context(pki.ca.cert_path, pki.host_a, b"TLS_CHACHA20_POLY1305_SHA256")
    server = Server(server_context(pki.host_b))
    with pytest.raises(HandshakeError):
        TlsStream.connect(server.connect_tcp(), ctx, "host-b", timeout=10)
    server.join()
    assert isinstance(server.error, HandshakeError)


def test_client_with_only_p384_is_refused(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.host_a.ca_path)
    ctx.load_cert_chain(pki.host_a.cert_path, pki.host_a.key_path)
    ctx.set_ecdh_curve("secp384r1")
    server = Server(server_context(pki.host_b))
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(server.connect_tcp())
    server.join()
    assert isinstance(server.error, HandshakeError)


def test_non_tls_client_is_refused(pki: Pki) -> None:
    server = Server(server_context(pki.host_b))
    with server.connect_tcp() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        server.join()
    assert isinstance(server.error, HandshakeError)


def test_silent_client_is_dropped_after_the_handshake_timeout(pki: Pki) -> None:
    server = Server(server_context(pki.host_b), timeout=0.5)
    with server.connect_tcp():
        server.join()
    assert isinstance(server.error, HandshakeError)
    assert "did not complete within 0.5 s" in str(server.error)


def test_slow_client_cannot_extend_the_handshake_deadline(pki: Pki) -> None:
    """One byte at a time resets no per-read timer: the deadline covers the whole handshake."""
    server = Server(server_context(pki.host_b), timeout=0.5)
    record_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200)
    with server.connect_tcp() as sock:
        for byte in record_start:
            if not server.running():
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # the server closed the connection
            time.sleep(0.05)
        server.join()
    assert isinstance(server.error, HandshakeError)
    assert "did not complete" in str(server.error)


def test_connect_timeout_against_a_silent_server(pki: Pki) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        with pytest.raises(HandshakeError, match="did not complete within 0.3 s"):
            TlsStream.connect(sock, client_context(pki.host_a), "host-b", timeout=0.3)
