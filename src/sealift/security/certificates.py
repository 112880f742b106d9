"""Certificate and key files of the cluster PKI: the layer under identity, operators and revocation.

Reading and checking X.509 certificates and P-256 private keys, with the
CertificateError a misconfigured host should see. It knows what a
CA certificate, a key usage and a subject are, but nothing of hosts,
operators or CRLs: `identity.py`, `operators.py` and `revocation.py` build
on it, and it imports none of them.

Certificates that arrive from elsewhere (an operator's inside an order, a
peer's from a TLS handshake) are untrusted input: `read_certificate` parses
every part of one that sealift reads, at the boundary, so that a certificate
malformed inside is refused there with a MalformedCertificateError, and the
readers below raise it too rather than the parser's ValueError.

Also here: `IdentityFiles`, the on-disk layout every identity shares
(`{name}.key`, `{name}.pem`, `ca.pem` in one directory), which host and
operator identities extend with their own checks.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from sealift.security.errors import CertificateError, MalformedCertificateError

CA_CERT_FILE = "ca.pem"

# Certificates start a little in the past so that a peer whose clock is a few
# minutes behind does not refuse a freshly issued certificate.
CLOCK_SKEW = datetime.timedelta(minutes=5)


# What `cryptography` raises for a certificate that loaded (its outer DER is
# well formed) but is malformed inside: it parses names and extensions only
# when they are first read, and the key and algorithms only when used.
_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
# The parser's own words end a refusal, cut short: they say where, not why.
_MAX_DETAIL = 200

_T = TypeVar("_T")
_E = TypeVar("_E", bound=x509.ExtensionType)


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


def read_certificate(cert: x509.Certificate) -> x509.Certificate:
    """`cert`, after parsing every part sealift reads from it; MalformedCertificateError if one does not parse.

    The boundary for a certificate from elsewhere: its subject and issuer
    (every attribute), every extension (subjectAltName, extended and plain
    key usage, basic constraints, ...), and its public key. Afterwards no
    reader below can meet a parse error in it. Checks no content: that is
    `operator_of`'s and `host_name_of`'s job.
    """
    _parsed(cert, "subject", lambda: _name_text(cert.subject))
    _parsed(cert, "issuer", lambda: _name_text(cert.issuer))
    _parsed(cert, "extensions", lambda: [extension.value for extension in cert.extensions])
    _parsed(cert, "public key", cert.public_key)
    return cert


def subject_of(cert: x509.Certificate) -> str:
    """The subject as refusals name it."""
    return _parsed(cert, "subject", lambda: cert.subject.rfc4514_string()) or "(empty subject)"


def subject_alt_names(cert: x509.Certificate, kind: str) -> x509.SubjectAlternativeName:
    """The SAN extension, or CertificateError: without one it is no sealift `kind` certificate."""
    try:
        return _extension(cert, x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"certificate {subject_of(cert)} has no subjectAltName: not a sealift {kind} certificate"
        ) from None


def subject_attributes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    attributes = _parsed(cert, "subject", lambda: cert.subject.get_attributes_for_oid(oid))
    return [str(attribute.value) for attribute in attributes]


def extended_key_usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    """The extended key usages; none when the extension is absent."""
    try:
        return set(_extension(cert, x509.ExtendedKeyUsage))
    except x509.ExtensionNotFound:
        return set()


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return _extension(cert, x509.BasicConstraints).ca
    except x509.ExtensionNotFound:
        return False


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (its name and signature; not validity or revocation)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return False
    except _PARSE_ERRORS:  # a name or algorithm we cannot read is no proof either
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


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E:
    """The value of `cert`'s extension of class `kind`; x509.ExtensionNotFound when it has none."""
    extensions = _parsed(cert, "extensions", lambda: cert.extensions)
    return extensions.get_extension_for_class(kind).value


def _name_text(name: x509.Name) -> list[str]:
    # Every attribute value as text, and the whole name as refusals print it.
    return [name.rfc4514_string(), *(str(attribute.value) for attribute in name)]


def _parsed(cert: x509.Certificate, part: str, read: Callable[[], _T]) -> _T:
    """`read()`, or MalformedCertificateError naming the certificate (by serial) and the part that failed."""
    try:
        return read()
    except _PARSE_ERRORS as exc:
        detail = str(exc) or type(exc).__name__
        if len(detail) > _MAX_DETAIL:
            detail = detail[:_MAX_DETAIL] + "…"
        raise MalformedCertificateError(
            f"certificate with serial {cert.serial_number:x} is malformed: its {part} cannot be parsed ({detail})"
        ) from None


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
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"certificate {path} is not a readable PEM certificate: {exc}") from None
    try:
        return read_certificate(cert)  # a file is no more trusted to be well formed inside
    except MalformedCertificateError as exc:
        raise MalformedCertificateError(f"{path}: {exc}") from None


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
