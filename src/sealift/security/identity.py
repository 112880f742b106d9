"""Cluster CA and host identities (ECC P-256 keys, X.509 certificates).

One cluster CA signs every host certificate. A host certificate names exactly
one host (its CN and its only SAN DNS name) and is usable both as a TLS server
and as a TLS client, because agents dial each other in both directions.

On disk (one directory per host, as `issue_host` writes it):

    {host}.key   PKCS#8 PEM private key, mode 0600
    {host}.pem   the host certificate
    ca.pem       the cluster CA certificate (the only trust anchor)

Operator certificates (`issue_operator`, see `operators.py`) are issued by the
same CA from another `LeafProfile`: clientAuth only, no SAN DNS name, a URI
SAN `sealift:operator:NAME` and the role in the subject's OU. Without a DNS
name and serverAuth, `host_name_of` refuses them as host identities (and
OpenSSL's purpose check refuses them as TLS servers).

Revocation (`revoke`, `publish_crl`, see `revocation.py`) writes an X.509 CRL
signed by the CA into the CA directory (`ca.crl.pem`).

This module is the top of the certificate layer: it imports `operators` and
`revocation` (which the CA serves), and all three read and check files with
`certificates`.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealift.security import revocation
from sealift.security.certificates import (
    CA_CERT_FILE,
    CLOCK_SKEW,
    IdentityFiles,
    LeafProfile,
    cert_pem,
    certificate_builder,
    extended_key_usages,
    is_ca,
    is_issued_by,
    load_certificate,
    load_private_key,
    read_certificate,
    same_public_key,
    subject_alt_names,
    subject_of,
    utc_now,
)
from sealift.security.errors import CertificateError
from sealift.security.operators import (
    OPERATOR_PROFILE,
    OPERATOR_URI_PREFIX,
    OperatorIdentity,
    parse_role,
    validate_operator_name,
)

CA_KEY_FILE = "ca.key"

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
        raise CertificateError(f"invalid host name {name!r}: must be 1-{_MAX_HOSTNAME_LENGTH} characters")
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
    subject = subject_of(cert)
    names = subject_alt_names(cert, "host").get_values_for_type(x509.DNSName)
    if len(names) != 1:
        raise CertificateError(f"certificate {subject} has {len(names)} SAN DNS names, expected exactly one")
    if is_ca(cert):
        raise CertificateError(f"certificate {subject} is a CA certificate, not a host certificate")
    if not extended_key_usages(cert).issuperset(_HOST_PROFILE.extended_key_usages):
        raise CertificateError(
            f"certificate {subject} lacks the serverAuth and clientAuth key usages of a host certificate"
        )
    return names[0]


def read_host_certificate(cert: x509.Certificate) -> str:
    """The boundary for a peer's host certificate (from a TLS handshake): the host it names.

    Parses now every part read later (the names and key usages `host_name_of`
    checks, the issuer and serial the revocation check reads, the public key
    that verifies the peer's adverts, manifests and receipts), so a
    certificate malformed inside is refused here as MalformedCertificateError.
    Then `host_name_of`, and the ECC P-256 key every sealift host has (those
    documents are verified with no other kind). Raises CertificateError.
    """
    read_certificate(cert)
    name = host_name_of(cert)
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"certificate {subject_of(cert)} has no ECC P-256 key, as every host certificate has")
    return name


# --------------------------------------------------------------------------
# Cluster CA


_HOST_PROFILE = LeafProfile(
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
    def init(cls, directory: Path, name: str = "sealift cluster CA", days: int = 3650) -> ClusterCA:
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
        now = utc_now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            certificate_builder(
                subject, subject, key.public_key(), now - CLOCK_SKEW, now + datetime.timedelta(days=days)
            )
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
        _write_new_file(directory / CA_CERT_FILE, cert_pem(cert), mode=0o644)
        return cls(directory=directory, certificate=cert, _key=key)

    @classmethod
    def load(cls, directory: Path) -> ClusterCA:
        """Load the CA from `directory`, checking that its key and certificate match."""
        directory = Path(directory)
        key = load_private_key(directory / CA_KEY_FILE)
        cert = load_certificate(directory / CA_CERT_FILE)
        if not is_ca(cert):
            raise CertificateError(f"{directory / CA_CERT_FILE} is not a CA certificate")
        if not same_public_key(key, cert):
            raise CertificateError(f"{directory / CA_KEY_FILE} does not belong to {directory / CA_CERT_FILE}")
        return cls(directory=directory, certificate=cert, _key=key)

    def issue_host(self, hostname: str, out_dir: Path, days: int = 365) -> HostIdentity:
        """Issue a host certificate into `out_dir` ({hostname}.key, {hostname}.pem, ca.pem).

        Refuses to overwrite an existing host key, and refuses a directory
        whose ca.pem belongs to another CA.
        """
        validate_hostname(hostname)
        _check_days(days)
        identity = HostIdentity.in_directory(out_dir, hostname)
        self._issue_leaf_files(
            identity,
            f"{hostname!r}. Remove it first to re-issue.",
            [x509.DNSName(hostname)],
            _HOST_PROFILE,
            days,
        )
        return identity

    def issue_operator(self, name: str, role: str, out_dir: Path, days: int = 365) -> OperatorIdentity:
        """Issue an operator certificate with `role` into `out_dir` ({name}.key, {name}.pem, ca.pem).

        `role` is one of "admin", "operator", "auditor". See `operators.py`
        for how the certificate differs from a host certificate. Refuses to
        overwrite an existing key or certificate, and refuses a directory
        whose ca.pem belongs to another CA.
        """
        validate_operator_name(name)
        parsed_role = parse_role(role)
        _check_days(days)
        identity = OperatorIdentity.in_directory(out_dir, name)
        role_attribute = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, parsed_role.value)
        self._issue_leaf_files(
            identity,
            f"operator {name!r}. Remove it first to re-issue (and revoke the old one).",
            [x509.UniformResourceIdentifier(OPERATOR_URI_PREFIX + name)],
            OPERATOR_PROFILE,
            days,
            extra_subject=[role_attribute],
        )
        return identity

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
        # The signing key goes to the CRL writer of this package, nowhere else.
        return revocation.revoke(self.directory, self.certificate, self._key, serial_or_cert, reason, crl_days=crl_days)

    def publish_crl(self, *, crl_days: int = 30) -> x509.CertificateRevocationList:
        """Re-sign the CRL with the same entries and a new expiry (creating it if absent).

        Agents refuse a CRL past its next-update time, so run this (e.g. from
        cron) well before the current one expires.
        """
        return revocation.publish_crl(self.directory, self.certificate, self._key, crl_days=crl_days)

    def _issue_leaf_files(
        self,
        identity: IdentityFiles,
        whose: str,
        san: Sequence[x509.GeneralName],
        profile: LeafProfile,
        days: int,
        *,
        extra_subject: Sequence[x509.NameAttribute] = (),
    ) -> None:
        """A fresh key and a leaf certificate for `identity.name`, written next to ca.pem (hosts, operators).

        Never over an existing key or certificate (`whose` ends the refusal),
        never into a directory whose ca.pem belongs to another CA.
        """
        cert_path, key_path, ca_path = identity.cert_path, identity.key_path, identity.ca_path
        for existing in (key_path, cert_path):
            if existing.exists():
                raise CertificateError(f"{existing} already exists; refusing to overwrite the identity of {whose}")
        ca_pem = cert_pem(self.certificate)
        if ca_path.exists() and ca_path.read_bytes() != ca_pem:
            raise CertificateError(
                f"{ca_path} holds a different CA certificate; {ca_path.parent} belongs to another cluster"
            )
        ca_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue_leaf(identity.name, san, key.public_key(), profile, days, extra_subject=extra_subject)
        _write_private_key(key_path, key)
        _write_new_file(cert_path, cert_pem(cert), mode=0o644)
        if not ca_path.exists():
            _write_new_file(ca_path, ca_pem, mode=0o644)

    def _issue_leaf(
        self,
        common_name: str,
        san: Sequence[x509.GeneralName],
        public_key: ec.EllipticCurvePublicKey,
        profile: LeafProfile,
        days: int,
        *,
        extra_subject: Sequence[x509.NameAttribute] = (),
    ) -> x509.Certificate:
        now = utc_now()
        # A leaf never outlives its CA: such a certificate would just fail later.
        not_after = min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), *extra_subject])
        return (
            certificate_builder(subject, self.certificate.subject, public_key, now - CLOCK_SKEW, not_after)
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
class HostIdentity(IdentityFiles):
    """Where one host's key, certificate and trusted CA certificate live.

    `HostIdentity.load(directory, name)` loads and checks the identity of
    host `name` from `directory`.
    """

    validate_name = staticmethod(validate_hostname)

    def check(self) -> None:
        """Raise CertificateError unless this identity is complete and consistent.

        Checks, so that a misconfiguration shows here and not as an obscure
        handshake failure: the files exist, the key is private (no group or
        other permissions) and matches the certificate, the certificate names
        the host, was issued by ca.pem, and is valid now.
        """
        cert = self.certificate()
        ca = self.ca_certificate()
        key = self.private_key()
        named = host_name_of(cert)
        if named != self.name:
            raise CertificateError(f"{self.cert_path} was issued for {named!r}, not {self.name!r}")
        if not same_public_key(key, cert):
            raise CertificateError(f"{self.key_path} does not belong to {self.cert_path}")
        if not is_ca(ca):
            raise CertificateError(f"{self.ca_path} is not a CA certificate")
        if not is_issued_by(cert, ca):
            raise CertificateError(
                f"{self.cert_path} was not issued by the CA in {self.ca_path}; re-issue it with this cluster's CA"
            )
        now = utc_now()
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
