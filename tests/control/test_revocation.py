"""Certificate revocation (T13): a revoked host or operator is refused."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from sealift.security.errors import CertificateRevokedError, CrlError, HandshakeError
from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.revocation import RevocationList, enable_crl_check
from sealift.security.tls import TlsStream, client_context, server_context

from .conftest import UTC, HandshakeServer


@dataclass(frozen=True)
class Site:
    ca: ClusterCA
    crl_path: Path
    host_a: HostIdentity
    host_b: HostIdentity
    host_c: HostIdentity  # the one that gets revoked


@pytest.fixture
def site(tmp_path: Path) -> Site:
    ca = ClusterCA.init(tmp_path / "ca")
    return Site(
        ca=ca,
        crl_path=tmp_path / "ca" / "ca.crl.pem",
        host_a=ca.issue_host("host-a", tmp_path / "a"),
        host_b=ca.issue_host("host-b", tmp_path / "b"),
        host_c=ca.issue_host("host-c", tmp_path / "c"),
    )


def _load(site: Site, **kwargs: object) -> RevocationList:
    return RevocationList.load(site.crl_path, site.ca.certificate, **kwargs)  # type: ignore[arg-type]


def test_revoke_writes_a_signed_crl_naming_the_certificate(site: Site) -> None:
    cert_c = site.host_c.certificate()
    crl = site.ca.revoke(cert_c, "key_compromise")
    assert crl.is_signature_valid(site.ca.certificate.public_key())  # type: ignore[arg-type]
    revocations = _load(site)
    assert revocations.is_revoked(cert_c)
    assert not revocations.is_revoked(site.host_a.certificate())
    assert revocations.entry_for(cert_c).reason == "key_compromise"  # type: ignore[union-attr]
    assert revocations.number == 1
    revocations.check(site.host_a.certificate())  # not revoked: no error
    with pytest.raises(CertificateRevokedError, match=r"host-c.*was revoked at .*key compromise"):
        revocations.check(cert_c)


def test_revoke_accumulates_and_numbers_crls(site: Site) -> None:
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    first = _load(site).entry_for(site.host_c.certificate())
    site.ca.revoke(site.host_b.certificate().serial_number, "superseded")
    site.ca.revoke(site.host_c.certificate(), "unspecified")  # again: keeps the first entry
    revocations = _load(site)
    assert revocations.number == 3
    assert revocations.is_revoked(site.host_b.certificate())
    assert revocations.entry_for(site.host_c.certificate()) == first
    assert not revocations.is_revoked(site.host_a.certificate())


def test_revoke_refuses_unknown_reasons(site: Site) -> None:
    with pytest.raises(ValueError, match="unknown revocation reason 'lost'"):
        site.ca.revoke(site.host_c.certificate(), "lost")


def test_crl_of_an_impostor_ca_with_the_same_name_is_refused(site: Site, tmp_path: Path) -> None:
    """Attack: feed the agent an empty CRL, made by a CA with the cluster CA's name."""
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    impostor = ClusterCA.init(tmp_path / "impostor")  # same default name
    assert impostor.certificate.subject == site.ca.certificate.subject
    impostor.publish_crl()
    with pytest.raises(CrlError, match="not signed by this cluster's CA"):
        RevocationList.load(tmp_path / "impostor" / "ca.crl.pem", site.ca.certificate)
    # And the CA itself refuses to re-sign a CRL someone replaced.
    (tmp_path / "ca" / "ca.crl.pem").write_bytes((tmp_path / "impostor" / "ca.crl.pem").read_bytes())
    with pytest.raises(CrlError, match="not signed by this cluster's CA"):
        site.ca.revoke(site.host_b.certificate())


def test_stale_crl_is_refused(site: Site) -> None:
    """Attack: keep serving an old CRL from before the revocation."""
    site.ca.publish_crl(crl_days=1)
    revocations = _load(site)
    assert revocations.next_update is not None and revocations.last_update is not None
    later = revocations.next_update + datetime.timedelta(minutes=6)
    with pytest.raises(CrlError, match="expired at .* re-publish"):
        _load(site, now=later)
    assert revocations.is_stale(later)
    earlier = revocations.last_update - datetime.timedelta(minutes=6)
    with pytest.raises(CrlError, match="not valid before .*clock"):
        _load(site, now=earlier)


def test_missing_or_garbage_crl_is_refused(site: Site) -> None:
    with pytest.raises(CrlError, match="does not exist"):
        _load(site)
    site.crl_path.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(CrlError, match="not a readable PEM CRL"):
        _load(site)


def test_revoked_host_is_detected_after_the_handshake(site: Site) -> None:
    """Without CRL checking in OpenSSL: the agent checks the peer certificate itself."""
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    revocations = _load(site)
    server = HandshakeServer(server_context(site.host_b))
    client = TlsStream.connect(server.connect_tcp(), client_context(site.host_c), "host-b", timeout=10)
    server.join()
    assert server.error is None and server.stream is not None
    with pytest.raises(CertificateRevokedError, match="peer host-c"):
        revocations.check(server.stream.peer_certificate, what="peer host-c")
    client.close()


def test_revoked_client_host_is_refused_in_the_handshake(site: Site) -> None:
    """Attack (T13): a host whose key was stolen and revoked connects to a migration port."""
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    context = server_context(site.host_b)
    enable_crl_check(context, _load(site))
    server = HandshakeServer(context)
    try:
        TlsStream.connect(server.connect_tcp(), client_context(site.host_c), "host-b", timeout=10)
    except HandshakeError:
        pass  # the client may or may not see the server's alert before returning
    server.join()
    assert isinstance(server.error, HandshakeError)
    assert "error 23" in str(server.error) or "revoked" in str(server.error)


def test_revoked_server_host_is_refused_in_the_handshake(site: Site) -> None:
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    context = client_context(site.host_a)
    enable_crl_check(context, _load(site))
    server = HandshakeServer(server_context(site.host_c))
    with pytest.raises(HandshakeError, match="error 23|revoked"):
        TlsStream.connect(server.connect_tcp(), context, "host-c", timeout=10)
    server.join()


def test_unrevoked_hosts_still_connect_with_crl_checking(site: Site) -> None:
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    revocations = _load(site)
    server_ctx = server_context(site.host_b)
    client_ctx = client_context(site.host_a)
    enable_crl_check(server_ctx, revocations)
    enable_crl_check(client_ctx, revocations)
    server = HandshakeServer(server_ctx)
    client = TlsStream.connect(server.connect_tcp(), client_ctx, "host-b", timeout=10)
    server.join()
    assert server.error is None
    client.close()


def test_expired_crl_in_a_context_fails_closed(site: Site) -> None:
    """An agent still holding a CRL past its next update refuses everyone, not no one."""
    now = datetime.datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(site.ca.certificate.subject)
        .last_update(now - datetime.timedelta(days=10))
        .next_update(now - datetime.timedelta(days=1))
    )
    site.crl_path.write_bytes(builder.sign(site.ca._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    stale = _load(site, now=now - datetime.timedelta(days=2))
    context = server_context(site.host_b)
    enable_crl_check(context, stale)
    server = HandshakeServer(context)
    try:
        TlsStream.connect(server.connect_tcp(), client_context(site.host_a), "host-b", timeout=10)
    except HandshakeError:
        pass
    server.join()
    assert isinstance(server.error, HandshakeError)


def test_disabled_revocation_list_revokes_nothing(site: Site) -> None:
    disabled = RevocationList.disabled()
    assert not disabled.enabled and not disabled.is_revoked(site.host_c.certificate())
    context = server_context(site.host_b)
    enable_crl_check(context, disabled)  # a no-op: hosts still connect
    server = HandshakeServer(context)
    client = TlsStream.connect(server.connect_tcp(), client_context(site.host_a), "host-b", timeout=10)
    server.join()
    assert server.error is None
    client.close()
