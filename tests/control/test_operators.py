"""Operator certificates: roles, and no confusion with host certificates (T10)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealift.security.errors import CertificateError, HandshakeError, PeerIdentityError
from sealift.security.identity import _HOST_PROFILE, ClusterCA, host_name_of
from sealift.security.operators import (
    Operator,
    OperatorIdentity,
    Role,
    operator_of,
    verify_operator_certificate,
)
from sealift.security.tls import TlsStream, client_context, server_context

from .conftest import Cluster, HandshakeServer


def test_operator_certificate_carries_name_and_role(cluster: Cluster) -> None:
    cert = cluster.admin.certificate()
    assert operator_of(cert) == Operator("alice", Role.ADMIN)
    assert operator_of(cluster.auditor.certificate()) == Operator("audrey", Role.AUDITOR)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["sealift:operator:alice"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["admin"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert os.stat(cluster.admin.key_path).st_mode & 0o077 == 0


def test_operator_certificate_is_not_a_host_certificate(cluster: Cluster) -> None:
    """Attack: present an operator certificate where a host is expected."""
    with pytest.raises(CertificateError, match="0 SAN DNS names"):
        host_name_of(cluster.admin.certificate())


def test_host_certificate_is_not_an_operator_certificate(cluster: Cluster) -> None:
    """Attack: a host (or its stolen key) signs as if it were an operator."""
    with pytest.raises(CertificateError, match="names a DNS host"):
        operator_of(cluster.host_a.certificate())
    with pytest.raises(CertificateError, match="CA certificate"):
        operator_of(cluster.ca.certificate)


def test_operator_of_refuses_a_certificate_with_extra_usages(cluster: Cluster) -> None:
    """A URI-named certificate that could also serve TLS (serverAuth) is not an operator's."""
    key = ec.generate_private_key(ec.SECP256R1())
    role = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")]
    san = [x509.UniformResourceIdentifier("sealift:operator:eve")]
    cert = cluster.ca._issue_leaf("eve", san, key.public_key(), _HOST_PROFILE, 1, extra_subject=role)
    with pytest.raises(CertificateError, match="clientAuth extended key usage and no other"):
        operator_of(cert)


def test_operator_of_refuses_unknown_roles_and_missing_roles(cluster: Cluster) -> None:
    from sealift.security.operators import OPERATOR_PROFILE

    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.UniformResourceIdentifier("sealift:operator:eve")]
    root = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root")]
    cert = cluster.ca._issue_leaf("eve", san, key.public_key(), OPERATOR_PROFILE, 1, extra_subject=root)
    with pytest.raises(CertificateError, match="unknown operator role 'root'"):
        operator_of(cert)
    no_role = cluster.ca._issue_leaf("eve", san, key.public_key(), OPERATOR_PROFILE, 1)
    with pytest.raises(CertificateError, match="exactly one role"):
        operator_of(no_role)


def test_issue_operator_refuses_bad_input(cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="unknown operator role 'root'"):
        cluster.ca.issue_operator("bob", "root", tmp_path)
    with pytest.raises(CertificateError, match="invalid operator name"):
        cluster.ca.issue_operator("../bob", "admin", tmp_path)
    with pytest.raises(CertificateError, match="reserved"):
        cluster.ca.issue_operator("ca", "admin", tmp_path)
    cluster.ca.issue_operator("bob", "operator", tmp_path)
    with pytest.raises(CertificateError, match="already exists"):
        cluster.ca.issue_operator("bob", "admin", tmp_path)


def test_operator_identity_load_checks_everything(cluster: Cluster, tmp_path: Path) -> None:
    loaded = OperatorIdentity.load(cluster.root / "operators", "olga")
    assert loaded.operator() == Operator("olga", Role.OPERATOR)
    with pytest.raises(CertificateError, match="does not exist"):
        OperatorIdentity.load(tmp_path, "nobody")
    # A certificate from another CA next to our ca.pem.
    copy = tmp_path / "copy"
    shutil.copytree(cluster.root / "foreign", copy)
    shutil.copy(cluster.ca.cert_path, copy / "ca.pem")
    with pytest.raises(CertificateError, match="not issued by this cluster's CA"):
        OperatorIdentity.load(copy, "alice")


def test_verify_operator_certificate_refuses_another_ca(cluster: Cluster) -> None:
    with pytest.raises(CertificateError, match="not issued by this cluster's CA"):
        verify_operator_certificate(cluster.foreign_admin.certificate(), cluster.ca.certificate)
    assert verify_operator_certificate(cluster.admin.certificate(), cluster.ca.certificate) == Operator(
        "alice", Role.ADMIN
    )


def test_operator_certificate_cannot_act_as_a_host_on_the_migration_port(cluster: Cluster) -> None:
    """Attack: a real TLS client with an operator certificate dials a host's migration port."""
    server = HandshakeServer(server_context(cluster.host_b))
    client = TlsStream.connect(
        server.connect_tcp(),
        client_context(cluster.admin),
        "host-b",
        timeout=10,  # type: ignore[arg-type]
    )
    server.join()
    client.close()
    assert isinstance(server.error, PeerIdentityError)
    assert "not a sealift host" in str(server.error)


def test_operator_certificate_cannot_serve_as_a_host(cluster: Cluster) -> None:
    """Attack: a server presents an operator certificate to a connecting host."""
    server = HandshakeServer(server_context(cluster.admin))  # type: ignore[arg-type]
    with pytest.raises(HandshakeError, match="not meant for this purpose"):
        TlsStream.connect(server.connect_tcp(), client_context(cluster.host_a), "host-b", timeout=10)
    server.join()
    assert server.error is not None


def test_operators_from_a_fresh_ca_share_its_ca_file(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca")
    other = ClusterCA.init(tmp_path / "other")
    ca.issue_operator("alice", "admin", tmp_path / "ops")
    with pytest.raises(CertificateError, match="belongs to another cluster"):
        other.issue_operator("bob", "admin", tmp_path / "ops")
