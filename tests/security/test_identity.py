from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealift.security.certificates import LeafProfile
from sealift.security.errors import CertificateError
from sealift.security.identity import (
    ClusterCA,
    HostIdentity,
    host_name_of,
    validate_hostname,
)

from .conftest import Pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_private_key_and_ca_certificate(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca", name="test CA")
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.pem").read_bytes())
    assert cert == ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature


def test_init_refuses_to_overwrite_existing_ca(tmp_path: Path) -> None:
    ClusterCA.init(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(CertificateError, match="already exists.*refusing to overwrite"):
        ClusterCA.init(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == key_before


def test_load_returns_the_same_ca(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path)
    assert ClusterCA.load(tmp_path).certificate == ca.certificate


def test_load_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    ClusterCA.init(tmp_path)
    os.chmod(tmp_path / "ca.key", 0o644)
    with pytest.raises(CertificateError, match="chmod 600"):
        ClusterCA.load(tmp_path)


def test_load_refuses_mismatched_key(tmp_path: Path) -> None:
    ClusterCA.init(tmp_path / "one")
    ClusterCA.init(tmp_path / "two")
    shutil.copy(tmp_path / "two" / "ca.key", tmp_path / "one" / "ca.key")
    with pytest.raises(CertificateError, match="does not belong"):
        ClusterCA.load(tmp_path / "one")


def test_load_reports_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="does not exist"):
        ClusterCA.load(tmp_path / "nowhere")


def test_host_certificate_fields(pki: Pki) -> None:
    cert = pki.host_a.certificate()
    ca_cert = pki.ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a"]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert host_name_of(cert) == "host-a"


def test_issue_host_writes_key_0600_and_copies_ca(pki: Pki) -> None:
    identity = pki.host_a
    assert identity.key_path == pki.root / "host-a" / "host-a.key"
    assert identity.cert_path == pki.root / "host-a" / "host-a.pem"
    assert _mode(identity.key_path) == 0o600
    assert identity.ca_path.read_bytes() == pki.ca.cert_path.read_bytes()
    assert identity.ca_certificate() == pki.ca.certificate


def test_serial_numbers_are_random(pki: Pki) -> None:
    serials = {h.certificate().serial_number for h in (pki.host_a, pki.host_b, pki.host_c)}
    assert len(serials) == 3
    assert all(s.bit_length() > 64 for s in serials)


def test_issue_into_the_ca_directory_keeps_the_ca(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path)
    identity = ca.issue_host("host-a", tmp_path)
    assert identity.ca_path == ca.cert_path
    assert ClusterCA.load(tmp_path).certificate == ca.certificate
    assert HostIdentity.load(tmp_path, "host-a") == identity


def test_issue_refuses_to_overwrite_a_host(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca")
    ca.issue_host("host-a", tmp_path / "out")
    with pytest.raises(CertificateError, match="already exists"):
        ca.issue_host("host-a", tmp_path / "out")


def test_issue_refuses_a_directory_of_another_cluster(pki: Pki, tmp_path: Path) -> None:
    pki.other_ca.issue_host("host-x", tmp_path)
    with pytest.raises(CertificateError, match="another cluster"):
        pki.ca.issue_host("host-y", tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 254,
        "host_a",
        "host a",
        "../evil",
        "a/b",
        "-host",
        "host-",
        "a..b",
        ".a",
        "ca",
        "CA",
        "h\u00f6st",
        "host\n",
    ],
)
def test_invalid_host_names_are_refused(pki: Pki, tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateError, match="host name"):
        pki.ca.issue_host(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "host-a", "node7.rack2.example", "10.0.0.1", "A" * 63])
def test_valid_host_names(name: str) -> None:
    assert validate_hostname(name) == name


def test_host_identity_load_checks_consistency(pki: Pki, tmp_path: Path) -> None:
    assert HostIdentity.load(pki.root / "host-a", "host-a") == pki.host_a
    with pytest.raises(CertificateError, match="does not exist"):
        HostIdentity.load(pki.root / "host-a", "host-b")

    # host-a's files renamed to host-z: the certificate names someone else.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(pki.host_a.cert_path, renamed / "host-z.pem")
    shutil.copy(pki.host_a.key_path, renamed / "host-z.key")
    shutil.copy(pki.host_a.ca_path, renamed / "ca.pem")
    with pytest.raises(CertificateError, match="issued for 'host-a', not 'host-z'"):
        HostIdentity.load(renamed, "host-z")

    # A certificate from another CA next to this cluster's ca.pem.
    foreign = tmp_path / "foreign"
    shutil.copytree(pki.root / "foreign-a", foreign)
    shutil.copy(pki.ca.cert_path, foreign / "ca.pem")
    with pytest.raises(CertificateError, match="not issued by the CA"):
        HostIdentity.load(foreign, "host-a")

    # Another host's key next to host-a's certificate.
    swapped = tmp_path / "swapped"
    shutil.copytree(pki.root / "host-a", swapped)
    shutil.copy(pki.host_b.key_path, swapped / "host-a.key")
    with pytest.raises(CertificateError, match="does not belong"):
        HostIdentity.load(swapped, "host-a")


def test_host_key_readable_by_others_is_refused(pki: Pki, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pki.root / "host-a", copy)
    os.chmod(copy / "host-a.key", 0o640)
    with pytest.raises(CertificateError, match="accessible by other users"):
        HostIdentity.load(copy, "host-a")


def test_host_name_of_refuses_non_host_certificates(pki: Pki) -> None:
    with pytest.raises(CertificateError, match="no subjectAltName"):
        host_name_of(pki.ca.certificate)
    signing_only = LeafProfile(extended_key_usages=(ExtendedKeyUsageOID.CODE_SIGNING,))
    key = pki.host_a.private_key()
    cert = pki.ca._issue_leaf("alice", [x509.DNSName("alice")], key.public_key(), signing_only, 1)
    with pytest.raises(CertificateError, match="serverAuth and clientAuth"):
        host_name_of(cert)
    two_names = pki.ca._issue_leaf(
        "x", [x509.DNSName("host-a"), x509.DNSName("host-b")], key.public_key(), signing_only, 1
    )
    with pytest.raises(CertificateError, match="2 SAN DNS names"):
        host_name_of(two_names)
