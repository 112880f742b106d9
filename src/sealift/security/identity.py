"""Cluster CA and host identities (ECC P-256 keys, X.509 certificates).

One cluster CA signs every host certificate. A host certificate names exactly
one host (its CN and its only SAN DNS name) and is usable both as a TLS server
and as a TLS client, because agents dial each other in both directions.

On disk (one directory per host, as `issue_host` writes it):

    {host}.key   PKCS#8 PEM private key, mode 0600
    {host}.pem   the host certificate
    ca.pem       the cluster CA certificate (the only trust anchor)

Operator certificates (`issue_operator`, see `operators.py`) are issued by the
same CA from another `_LeafProfile`: clientAuth only, no SAN DNS name, a URI
SAN `sealift:operator:NAME` and the role in the subject's OU. Without a DNS
name and serverAuth, `host_name_of` refuses them as host identities (and
OpenSSL's purpose check refuses them as TLS servers).

Revocation (`revoke`, `publish_crl`, see `revocation.py`) writes an X.509 CRL
signed by the CA into the CA directory (`ca.crl.pem`).
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealift.security.errors import CertificateError

if TYPE_CHECKING:  # both modules import this one
    from sealift.security.operators import OperatorIdentity

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"

# Certificates start a little in the past so that a peer whose clock is a few
# minutes behind does not refuse a freshly issued certificate.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

_MAX_HOSTNAME_LENGTH = 253
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# "ca" would make {host}.key / {host}.pem collide with the CA's own files.
_RESERVED_HOSTNAMES = frozenset({"ca"})


# --------------------------------------------------------------------------
# Host names


def validate_hostname(name: str) -> str:
    """Return `name` if it is a valid host name, else raise CertificateError.

    Allowed: DNS-style names of letters, digits, '-' and '.', 1-253 characters,
    labels of 1-63 characters not starting or ending with '-'. The name is
    also used as a file name, so anything else is refused.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_HOSTNAME_LENGTH:
        raise CertificateError(
            f"invalid host name {name!r}: must be 1-{_MAX_HOSTNAME_LENGTH} characters"
        )
    if not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise CertificateError(
            f"invalid host name {name!r}: use letters, digits, '-' and '.', "
            "with labels of 1-63 characters not starting or ending with '-'"
        )
    if name.lower() in _RESERVED_HOSTNAMES:
        raise CertificateError(f"invalid host name {name!r}: the name is reserved")
    return name


def host_name_of(cert: x509.Certificate) -> str:
    """Return the host name a host certificate was issued for (its SAN DNS name).

    Raises CertificateError if the certificate is not a host certificate: no
    or several SAN DNS names, a CA certificate, or without the serverAuth and
    clientAuth extended key usages.
    """
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"certificate {subject} has no subjectAltName: not a sealift host certificate"
        ) from None
    names = san.value.get_values_for_type(x509.DNSName)
    if len(names) != 1:
        raise CertificateError(
            f"certificate {subject} has {len(names)} SAN DNS names, expected exactly one"
        )
    if _is_ca(cert):
        raise CertificateError(f"certificate {subject} is a CA certificate, not a host certificate")
    if not _has_host_usages(cert):
        raise CertificateError(
            f"certificate {subject} lacks the serverAuth and clientAuth key usages "
            "of a host certificate"
        )
    return names[0]


# --------------------------------------------------------------------------
# Cluster CA


@dataclass(frozen=True)
class _LeafProfile:
    """What kind of end-entity certificate to issue (host now, operator later)."""

    extended_key_usages: tuple[x509.ObjectIdentifier, ...]


_HOST_PROFILE = _LeafProfile(
    extended_key_usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
)


@dataclass(frozen=True)
class ClusterCA:
    """The cluster's certificate authority: a P-256 key and a self-signed certificate."""

    directory: Path
    certificate: x509.Certificate
    _key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @classmethod
    def init(
        cls, directory: Path, name: str = "sealift cluster CA", days: int = 3650
    ) -> ClusterCA:
        """Create a new CA in `directory` (ca.key mode 0600, ca.pem).

        Refuses to overwrite an existing CA: replacing it would silently cut
        every host issued by the old one out of the cluster.
        """
        directory = Path(directory)
        _check_days(days)
        for existing in (directory / CA_KEY_FILE, directory / CA_CERT_FILE):
            if existing.exists():
                raise CertificateError(
                    f"a cluster CA already exists in {directory} ({existing.name}); "
                    "refusing to overwrite it. Use it as it is, or move the directory "
                    "away to start a new cluster."
                )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            # path_length=0: the CA signs hosts directly, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        _write_private_key(directory / CA_KEY_FILE, key)
        _write_new_file(directory / CA_CERT_FILE, _cert_pem(cert), mode=0o644)
        return cls(directory=directory, certificate=cert, _key=key)

    @classmethod
    def load(cls, directory: Path) -> ClusterCA:
        """Load the CA from `directory`, checking that its key and certificate match."""
        directory = Path(directory)
        key = _load_private_key(directory / CA_KEY_FILE)
        cert = _load_certificate(directory / CA_CERT_FILE)
        if not _is_ca(cert):
            raise CertificateError(f"{directory / CA_CERT_FILE} is not a CA certificate")
        if not _same_public_key(key, cert):
            raise CertificateError(
                f"{directory / CA_KEY_FILE} does not belong to {directory / CA_CERT_FILE}"
            )
        return cls(directory=directory, certificate=cert, _key=key)

    def issue_host(self, hostname: str, out_dir: Path, days: int = 365) -> HostIdentity:
        """Issue a host certificate into `out_dir` ({hostname}.key, {hostname}.pem, ca.pem).

        Refuses to overwrite an existing host key, and refuses a directory
        whose ca.pem belongs to another CA.
        """
        validate_hostname(hostname)
        _check_days(days)
        out_dir = Path(out_dir)
        identity = HostIdentity(
            name=hostname,
            cert_path=out_dir / f"{hostname}.pem",
            key_path=out_dir / f"{hostname}.key",
            ca_path=out_dir / CA_CERT_FILE,
        )
        self._issue_leaf_files(
            identity.cert_path, identity.key_path, identity.ca_path, f"{hostname!r}. Remove it first to re-issue.",
            hostname, [x509.DNSName(hostname)], _HOST_PROFILE, days,
        )  # fmt: skip
        return identity

    def issue_operator(
        self, name: str, role: str, out_dir: Path, days: int = 365
    ) -> OperatorIdentity:
        """Issue an operator certificate with `role` into `out_dir` ({name}.key, {name}.pem, ca.pem).

        `role` is one of "admin", "operator", "auditor". See `operators.py`
        for how the certificate differs from a host certificate.
        """
        from sealift.security import operators  # imports this module: import late

        return operators.issue_operator(self, name, role, out_dir, days=days)

    def revoke(
        self,
        serial_or_cert: int | x509.Certificate,
        reason: str | x509.ReasonFlags = "unspecified",
        *,
        crl_days: int = 30,
    ) -> x509.CertificateRevocationList:
        """Add a certificate (or serial number) to this CA's CRL and re-sign it.

        Writes {directory}/ca.crl.pem atomically and returns the new CRL;
        copy that file to every agent. See `revocation.py`.
        """
        from sealift.security import revocation  # imports this module: import late

        return revocation.revoke(self, serial_or_cert, reason, crl_days=crl_days)

    def publish_crl(self, *, crl_days: int = 30) -> x509.CertificateRevocationList:
        """Re-sign the CRL with the same entries and a new expiry (creating it if absent).

        Agents refuse a CRL past its next-update time, so run this (e.g. from
        cron) well before the current one expires.
        """
        from sealift.security import revocation  # imports this module: import late

        return revocation.publish_crl(self, crl_days=crl_days)

    def _issue_leaf_files(
        self,
        cert_path: Path,
        key_path: Path,
        ca_path: Path,
        whose: str,
        common_name: str,
        san: Sequence[x509.GeneralName],
        profile: _LeafProfile,
        days: int,
        *,
        extra_subject: Sequence[x509.NameAttribute] = (),
    ) -> None:
        """A fresh key and a leaf certificate written next to ca.pem (package-private: hosts, operators).

        Never over an existing key or certificate (`whose` ends the refusal),
        never into a directory whose ca.pem belongs to another CA.
        """
        for existing in (key_path, cert_path):
            if existing.exists():
                raise CertificateError(f"{existing} already exists; refusing to overwrite the identity of {whose}")
        ca_pem = _cert_pem(self.certificate)
        if ca_path.exists() and ca_path.read_bytes() != ca_pem:
            raise CertificateError(f"{ca_path} holds a different CA certificate; {ca_path.parent} belongs to another cluster")
        ca_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue_leaf(common_name, san, key.public_key(), profile, days, extra_subject=extra_subject)
        _write_private_key(key_path, key)
        _write_new_file(cert_path, _cert_pem(cert), mode=0o644)
        if not ca_path.exists():
            _write_new_file(ca_path, ca_pem, mode=0o644)

    def _issue_leaf(
        self,
        common_name: str,
        san: Sequence[x509.GeneralName],
        public_key: ec.EllipticCurvePublicKey,
        profile: _LeafProfile,
        days: int,
        *,
        extra_subject: Sequence[x509.NameAttribute] = (),
    ) -> x509.Certificate:
        now = _now()
        # A leaf never outlives its CA: such a certificate would just fail later.
        not_after = min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), *extra_subject])
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(profile.extended_key_usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )


# --------------------------------------------------------------------------
# Host identity


@dataclass(frozen=True)
class HostIdentity:
    """Where one host's key, certificate and trusted CA certificate live."""

    name: str
    cert_path: Path
    key_path: Path
    ca_path: Path

    @classmethod
    def load(cls, directory: Path, name: str) -> HostIdentity:
        """Load and check the identity of host `name` from `directory`.

        Checks, so that a misconfiguration shows here and not as an obscure
        handshake failure: the files exist, the key is private (no group or
        other permissions) and matches the certificate, the certificate names
        `name`, was issued by ca.pem, and is valid now.
        """
        validate_hostname(name)
        directory = Path(directory)
        identity = cls(
            name=name,
            cert_path=directory / f"{name}.pem",
            key_path=directory / f"{name}.key",
            ca_path=directory / CA_CERT_FILE,
        )
        identity.check()
        return identity

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return _load_private_key(self.key_path)

    def certificate(self) -> x509.Certificate:
        return _load_certificate(self.cert_path)

    def ca_certificate(self) -> x509.Certificate:
        return _load_certificate(self.ca_path)

    def check(self) -> None:
        """Raise CertificateError unless this identity is complete and consistent."""
        cert = self.certificate()
        ca = self.ca_certificate()
        key = self.private_key()
        named = host_name_of(cert)
        if named != self.name:
            raise CertificateError(
                f"{self.cert_path} was issued for {named!r}, not {self.name!r}"
            )
        if not _same_public_key(key, cert):
            raise CertificateError(f"{self.key_path} does not belong to {self.cert_path}")
        if not _is_ca(ca):
            raise CertificateError(f"{self.ca_path} is not a CA certificate")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateError(
                f"{self.cert_path} was not issued by the CA in {self.ca_path}; "
                "re-issue it with this cluster's CA"
            ) from None
        now = _now()
        if now < cert.not_valid_before_utc:
            raise CertificateError(
                f"{self.cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                "(check this host's clock)"
            )
        if now > cert.not_valid_after_utc:
            raise CertificateError(
                f"{self.cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                "issue a new one with the cluster CA"
            )


# --------------------------------------------------------------------------
# Helpers


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"validity must be a positive number of days, got {days!r}")


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _has_host_usages(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return all(oid in usages for oid in _HOST_PROFILE.extended_key_usages)


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new_file(path, pem, mode=0o600)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace an existing file; the mode is set at creation so a
    # private key is never readable by others, not even for a moment.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(f"{path} already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed the mode given to open
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror}") from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_file(path, "private key")
    # Like ssh: a key others can read is treated as compromised configuration.
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"private key {path} is accessible by other users (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"private key {path} is not a readable PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"private key {path} is not an ECC P-256 key")
    return key


def _load_certificate(path: Path) -> x509.Certificate:
    data = _read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"certificate {path} is not a readable PEM certificate: {exc}") from None
