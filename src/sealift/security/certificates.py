"""Certificate and key files of the cluster PKI: the layer under identity, operators and revocation.

Reading and checking X.509 certificates and P-256 private keys, with the
CertificateError a misconfigured host should see. It knows what a
CA certificate, a key usage and a subject are, but nothing of hosts,
operators or CRLs: `identity.py`, `operators.py` and `revocation.py` build
on it, and it imports none of them.

Also here: `IdentityFiles`, the on-disk layout every identity shares
(`{name}.key`, `{name}.pem`, `ca.pem` in one directory), which host and
operator identities extend with their own checks.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from sealift.security.errors import CertificateError

CA_CERT_FILE = "ca.pem"

# Certificates start a little in the past so that a peer whose clock is a few
# minutes behind does not refuse a freshly issued certificate.
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class LeafProfile:
    """What kind of end-entity certificate to issue (a host's, an operator's)."""

    extended_key_usages: tuple[x509.ObjectIdentifier, ...]


# --------------------------------------------------------------------------
# Time


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(moment: datetime.datetime) -> str:
    """UTC, whole seconds, ISO 8601 with Z: how refusals name a time."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Reading a certificate


def subject_of(cert: x509.Certificate) -> str:
    """The subject as refusals name it."""
    return cert.subject.rfc4514_string() or "(empty subject)"


def subject_alt_names(cert: x509.Certificate, kind: str) -> x509.SubjectAlternativeName:
    """The SAN extension, or CertificateError: without one it is no sealift `kind` certificate."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"certificate {subject_of(cert)} has no subjectAltName: not a sealift {kind} certificate"
        ) from None


def subject_attributes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(oid)]


def extended_key_usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    """The extended key usages; none when the extension is absent."""
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (its name and signature; not validity or revocation)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def certificate_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """What every certificate states: who, issued by whom, its key, a random serial, its validity (no extensions)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------
# Reading files


def _read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_file(path, "private key")
    # Like ssh: a key others can read is treated as compromised configuration.
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"private key {path} is accessible by other users (mode {mode:04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"private key {path} is not a readable PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"private key {path} is not an ECC P-256 key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    data = _read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"certificate {path} is not a readable PEM certificate: {exc}") from None


# --------------------------------------------------------------------------
# One identity's files


@dataclass(frozen=True)
class IdentityFiles:
    """Where one identity's key, certificate and the cluster CA certificate live.

    Subclasses say which names are valid (`validate_name`) and what makes the
    files a consistent identity (`check`).
    """

    name: str
    cert_path: Path
    key_path: Path
    ca_path: Path

    @classmethod
    def in_directory(cls, directory: Path, name: str) -> Self:
        """The identity `name` as laid out in `directory` ({name}.pem, {name}.key, ca.pem); reads nothing."""
        directory = Path(directory)
        return cls(
            name=name,
            cert_path=directory / f"{name}.pem",
            key_path=directory / f"{name}.key",
            ca_path=directory / CA_CERT_FILE,
        )

    @classmethod
    def load(cls, directory: Path, name: str) -> Self:
        """Load and check the identity `name` from `directory` (see `check`)."""
        cls.validate_name(name)
        identity = cls.in_directory(directory, name)
        identity.check()
        return identity

    @staticmethod
    def validate_name(name: str) -> str:
        """Return `name` if this kind of identity may have it, else raise CertificateError."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise CertificateError unless the files make a complete, consistent identity."""
        raise NotImplementedError

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return load_private_key(self.key_path)

    def certificate(self) -> x509.Certificate:
        return load_certificate(self.cert_path)

    def ca_certificate(self) -> x509.Certificate:
        return load_certificate(self.ca_path)
