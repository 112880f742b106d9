"""Certificates that load but are malformed inside (issue 23): refused at the boundary with sealift's own errors.

`cryptography` parses a certificate's names, extensions and key lazily, so a
certificate whose outer DER is fine but whose subjectAltName (say) is not
used to escape `operator_of` as a ValueError, halfway through checking an
order. Each case below is signed by the cluster CA (the worst case: even a
CA-signed certificate must not crash a reader) and carried in an order
signed with the certificate's own key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealift.errors import SealiftError
from sealift.security.certificates import is_issued_by, read_certificate
from sealift.security.errors import CertificateError, MalformedCertificateError, MalformedOrderError
from sealift.security.identity import ClusterCA, host_name_of, read_host_certificate
from sealift.security.operators import operator_of, read_operator_certificate, verify_operator_certificate
from sealift.security.orders import create_order, describe_order, verify_order
from sealift.security.revocation import RevocationList

from . import certforge
from .certforge import BASIC_CONSTRAINTS_OID, EKU_OID, P256_OID, SAN_OID
from .conftest import Cluster

NO_CRL = RevocationList.disabled()
Forge = Callable[[x509.Certificate, ec.EllipticCurvePrivateKey], bytes]


def _duplicate_san(cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    def edit(extensions: list[bytes]) -> list[bytes]:
        return [*extensions, *(e for e in extensions if certforge.extension_oid(e) == SAN_OID)]

    return certforge.edit_extensions(cert, ca_key, edit)


def _point(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


# What is damaged -> how (the certificate is alice's, admin, from `certforge.operator_certificate`).
INSIDE_DAMAGE: dict[str, Forge] = {
    "subjectAltName truncated": lambda c, k: certforge.replace_extension(c, k, SAN_OID, b"\x30\x05\x86\x01"),
    "subjectAltName not a SEQUENCE": lambda c, k: certforge.replace_extension(c, k, SAN_OID, b"\x04\x00"),
    "subjectAltName URI not ASCII": lambda c, k: certforge.replace_extension(c, k, SAN_OID, b"\x30\x03\x86\x01\xff"),
    "subjectAltName twice": _duplicate_san,
    "extendedKeyUsage with an empty OID": lambda c, k: certforge.replace_extension(c, k, EKU_OID, b"\x30\x02\x06\x00"),
    "basicConstraints with a bad BOOLEAN": lambda c, k: certforge.replace_extension(
        c, k, BASIC_CONSTRAINTS_OID, b"\x30\x03\x01\x01\x02"
    ),
    "subject CN not UTF-8": lambda c, k: certforge.replace_in_tbs(
        c, k, b"\x0c\x05alice", b"\x0c\x05\xff\xfe\xfd\xfc\xfb"
    ),
    "subject CN an INTEGER": lambda c, k: certforge.replace_in_tbs(c, k, b"\x0c\x05alice", b"\x02\x05alice"),
    "subject OU not UTF-8": lambda c, k: certforge.replace_in_tbs(c, k, b"\x0c\x05admin", b"\x0c\x05adm\xc3\x28"),
    "key on an unknown curve": lambda c, k: certforge.replace_in_tbs(c, k, P256_OID, bytes.fromhex("2a8648ce3d030109")),
    "key not on its curve": lambda c, k: certforge.replace_in_tbs(c, k, _point(c), b"\x04" + b"\x01" * 64),
}
# The damage `operator_of` itself runs into (the key is read later, by the signature check).
READ_BY_OPERATOR_OF = [name for name in INSIDE_DAMAGE if not name.startswith("key")]


def _forged(cluster: Cluster, damage: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    cert, key = certforge.operator_certificate(cluster.ca, "alice", "admin")
    der = INSIDE_DAMAGE[damage](cert, certforge.ca_key_of(cluster.ca))
    certforge.load(der)  # the outer encoding is fine: it loads
    return der, key


def _order(cluster: Cluster, der: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    template = create_order(cluster.admin, "web1", "host-a", "host-b")
    return certforge.order_with_certificate(template, certforge.pem(der), key, "alice")


def test_the_forge_makes_a_valid_operator_certificate_unless_told_otherwise(cluster: Cluster) -> None:
    cert, key = certforge.operator_certificate(cluster.ca, "alice", "admin")
    verify_operator_certificate(cert, cluster.ca.certificate)
    order = _order(cluster, certforge.resign(cert.tbs_certificate_bytes, certforge.ca_key_of(cluster.ca)), key)
    assert verify_order(order, cluster.ca.certificate, revocations=NO_CRL).operator.name == "alice"


@pytest.mark.parametrize("damage", sorted(INSIDE_DAMAGE))
def test_an_order_whose_issuer_certificate_is_malformed_inside_is_refused_as_malformed(
    cluster: Cluster, damage: str
) -> None:
    der, key = _forged(cluster, damage)
    order = _order(cluster, der, key)
    with pytest.raises(MalformedOrderError) as refused:
        verify_order(order, cluster.ca.certificate, revocations=NO_CRL, expect_destination="host-b")
    assert refused.value.code == "malformed"
    assert refused.value.order_id is not None
    assert "issuer certificate: certificate with serial" in str(refused.value)
    assert "is malformed: its" in str(refused.value)
    # `sealift order show` reads it the same way: one refusal, no traceback.
    with pytest.raises(MalformedOrderError, match="is malformed"):
        describe_order(order)


@pytest.mark.parametrize("damage", sorted(INSIDE_DAMAGE))
def test_the_operator_boundary_parses_every_part_read_later(cluster: Cluster, damage: str) -> None:
    der, _ = _forged(cluster, damage)
    with pytest.raises(MalformedCertificateError) as refused:
        read_operator_certificate(certforge.load(der))
    assert refused.value.code == "malformed_certificate"
    assert isinstance(refused.value, CertificateError)


@pytest.mark.parametrize("damage", READ_BY_OPERATOR_OF)
def test_operator_of_raises_a_certificate_error_not_a_parser_error(cluster: Cluster, damage: str) -> None:
    """The finding itself: `operator_of` read the SAN or subject lazily and the parser's ValueError escaped."""
    der, _ = _forged(cluster, damage)
    with pytest.raises(MalformedCertificateError):
        operator_of(certforge.load(der))
    with pytest.raises(MalformedCertificateError):
        host_name_of(certforge.load(der))


@pytest.mark.parametrize("damage", sorted(INSIDE_DAMAGE))
def test_the_host_boundary_refuses_a_peer_certificate_malformed_inside(cluster: Cluster, damage: str) -> None:
    der, _ = _forged(cluster, damage)
    with pytest.raises(MalformedCertificateError):
        read_host_certificate(certforge.load(der))


def test_the_host_boundary_accepts_a_host_certificate_and_names_the_host(cluster: Cluster) -> None:
    assert read_host_certificate(cluster.host_a.certificate()) == "host-a"
    assert read_host_certificate(certforge.host_certificate(cluster.ca, "host-c")) == "host-c"
    assert read_certificate(cluster.ca.certificate) is cluster.ca.certificate


def test_the_host_boundary_refuses_a_key_other_than_p256(cluster: Cluster) -> None:
    """Adverts, manifests and receipts are verified with the peer's key: only P-256 can verify them."""
    cert = certforge.host_certificate(cluster.ca, "host-c")
    other_key = ec.generate_private_key(ec.SECP384R1())
    p384 = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(other_key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        p384 = p384.add_extension(extension.value, extension.critical)
    signed = p384.sign(certforge.ca_key_of(cluster.ca), hashes.SHA256())
    with pytest.raises(CertificateError, match="no ECC P-256 key"):
        read_host_certificate(signed)


def test_a_signature_algorithm_nobody_can_check_is_no_proof_of_issue(cluster: Cluster) -> None:
    cert, _ = certforge.operator_certificate(cluster.ca, "alice", "admin")
    unknown = bytes.fromhex("2a8648ce3d040309")  # ecdsa-with-"SHA-9": no such thing
    tbs = cert.tbs_certificate_bytes.replace(certforge.ECDSA_WITH_SHA256, unknown, 1)
    ca_key = certforge.ca_key_of(cluster.ca)
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    algorithm = certforge.tlv(0x30, certforge.tlv(0x06, unknown))
    der = certforge.tlv(0x30, tbs + algorithm + certforge.tlv(0x03, b"\x00" + signature))
    assert is_issued_by(certforge.load(der), cluster.ca.certificate) is False


def test_a_foreign_ca_certificate_with_malformed_inside_is_still_only_a_sealift_error(tmp_path: Path) -> None:
    """Before any trust is established: the order's certificate comes from an unknown CA and is malformed."""
    mine = ClusterCA.init(tmp_path / "mine")
    theirs = ClusterCA.init(tmp_path / "theirs")
    operator = mine.issue_operator("alice", "admin", tmp_path / "operators")
    cert, key = certforge.operator_certificate(theirs, "alice", "admin")
    der = certforge.replace_extension(cert, certforge.ca_key_of(theirs), SAN_OID, b"\x30\x05\x86\x01")
    order = certforge.order_with_certificate(
        create_order(operator, "web1", "host-a", "host-b"), certforge.pem(der), key, "alice"
    )
    with pytest.raises(SealiftError) as refused:
        verify_order(order, mine.certificate, revocations=NO_CRL)
    assert refused.value.code == "malformed"
