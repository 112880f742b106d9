"""Operator identities: the people (or tools) who sign migration orders.

An operator certificate is issued by the cluster CA like a host certificate,
but can never be taken for one, and a host certificate can never be taken for
an operator's:

    subject        CN=<name>, OU=<role>           role: admin | operator | auditor
    subjectAltName URI:sealift:operator:<name>    and nothing else (no DNS name)
    extKeyUsage    clientAuth only                 (no serverAuth)
    keyUsage       digitalSignature; basicConstraints CA:FALSE

Why this encoding:
- The role sits in the subject's OU (one OU, exactly a role name), readable
  with `openssl x509 -text`, parsed by `cryptography` without hand-made DER.
  Host certificates have no OU and the CA sets it only here.
- `host_name_of` needs exactly one SAN DNS name and serverAuth+clientAuth, and
  `operator_of` needs no DNS name, the `sealift:operator:` URI and clientAuth
  alone: the two tests cannot both pass on one certificate.
- clientAuth (not serverAuth) so that a later remote control API can accept
  operators over mutual TLS. An operator certificate presented on the
  migration port passes OpenSSL's client purpose check but is refused by
  `host_name_of` inside `TlsStream.accept`, before any message is read; as a
  server it fails OpenSSL's purpose check already.

On disk, as `ClusterCA.issue_operator` writes it (same layout as a host,
`certificates.IdentityFiles`):

    {name}.key   PKCS#8 PEM private key, mode 0600
    {name}.pem   the operator certificate
    ca.pem       the cluster CA certificate
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealift.security.certificates import (
    IdentityFiles,
    LeafProfile,
    cert_pem,
    extended_key_usages,
    is_ca,
    is_issued_by,
    iso,
    read_certificate,
    same_public_key,
    subject_alt_names,
    subject_attributes,
    subject_of,
    utc_now,
)
from sealift.security.errors import CertificateError
from sealift.security.revocation import RevocationList

OPERATOR_URI_PREFIX = "sealift:operator:"

# Letters, digits, '.', '_' and '-', starting and ending with a letter or
# digit: the name is also a file name and part of a URI.
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")
# "ca" would make {name}.key / {name}.pem collide with the CA's own files.
_RESERVED_NAMES = frozenset({"ca"})

# What `ClusterCA.issue_operator` issues from (identity.py).
OPERATOR_PROFILE = LeafProfile(extended_key_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))


class Role(enum.StrEnum):
    """What an operator may do. Which migrations each role may order is policy (policy.py)."""

    ADMIN = "admin"
    OPERATOR = "operator"
    AUDITOR = "auditor"  # reads audit logs; may never order a migration


ROLES: frozenset[str] = frozenset(role.value for role in Role)


@dataclass(frozen=True)
class Operator:
    """Who signed something, as the CA certified it."""

    name: str
    role: Role

    def __str__(self) -> str:
        return f"{self.name} ({self.role.value})"


def validate_operator_name(name: str) -> str:
    """Return `name` if it is a valid operator name, else raise CertificateError."""
    if not isinstance(name, str) or not _OPERATOR_NAME.fullmatch(name):
        raise CertificateError(
            f"invalid operator name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    if name.lower() in _RESERVED_NAMES:
        raise CertificateError(f"invalid operator name {name!r}: the name is reserved")
    return name


def parse_role(role: str) -> Role:
    """The Role for `role` ("admin", "operator", "auditor"), else CertificateError."""
    try:
        return Role(role)
    except ValueError:
        raise CertificateError(f"unknown operator role {role!r}: use one of {', '.join(sorted(ROLES))}") from None


# --------------------------------------------------------------------------
# Reading a certificate


def read_operator_certificate(cert: x509.Certificate) -> x509.Certificate:
    """The boundary for an operator certificate that travels inside a document (an order).

    Parses now every part that `operator_of`, `verify_operator_certificate`
    and the document's signature check read later (subject CN and OU,
    subjectAltName, key usages, basic constraints, issuer, public key), so a
    certificate malformed inside is refused here, as MalformedCertificateError,
    and not halfway through a check. Says nothing about whose it is: that is
    `operator_of`'s job.
    """
    return read_certificate(cert)


def operator_of(cert: x509.Certificate) -> Operator:
    """Return the operator an operator certificate names, after checking its shape.

    Raises CertificateError if `cert` is not a sealift operator certificate
    (a host or CA certificate, a DNS name, a missing or second URI, another
    key usage, no role or an unknown one). Does NOT check who issued it, its
    validity period or revocation: use `verify_operator_certificate` for that.
    """
    subject = subject_of(cert)
    if is_ca(cert):
        raise CertificateError(f"certificate {subject} is a CA certificate, not an operator's")
    san = subject_alt_names(cert, "operator")
    if san.get_values_for_type(x509.DNSName):
        raise CertificateError(f"certificate {subject} names a DNS host: a host certificate cannot sign as an operator")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(list(san)) != 1 or len(uris) != 1 or not uris[0].startswith(OPERATOR_URI_PREFIX):
        raise CertificateError(
            f"certificate {subject} must have exactly one subjectAltName, "
            f"URI:{OPERATOR_URI_PREFIX}NAME, to be a sealift operator certificate"
        )
    name = uris[0][len(OPERATOR_URI_PREFIX) :]
    validate_operator_name(name)
    if extended_key_usages(cert) != {ExtendedKeyUsageOID.CLIENT_AUTH}:
        raise CertificateError(
            f"certificate {subject} must have the clientAuth extended key usage and no other "
            "to be a sealift operator certificate"
        )
    common_names = subject_attributes(cert, NameOID.COMMON_NAME)
    if common_names != [name]:
        raise CertificateError(f"certificate {subject}: the common name does not match the operator URI {uris[0]!r}")
    roles = subject_attributes(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(roles) != 1:
        raise CertificateError(f"certificate {subject} must carry exactly one role (subject OU), found {len(roles)}")
    return Operator(name=name, role=parse_role(roles[0]))


def verify_operator_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    revocations: RevocationList | None = None,
    now: datetime.datetime | None = None,
) -> Operator:
    """`operator_of(cert)`, after checking it was issued by `ca_cert`, is valid at `now`
    and (if `revocations` is given) not revoked.

    Raises CertificateError (or its subclass CertificateRevokedError).
    """
    now = utc_now() if now is None else now
    operator = operator_of(cert)
    if not is_issued_by(cert, ca_cert):
        raise CertificateError(f"the certificate of operator {operator.name!r} was not issued by this cluster's CA")
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"the certificate of operator {operator.name!r} is not valid before "
            f"{iso(cert.not_valid_before_utc)} (now {iso(now)}; check the clocks)"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"the certificate of operator {operator.name!r} expired at "
            f"{iso(cert.not_valid_after_utc)} (now {iso(now)}); issue a new one"
        )
    if revocations is not None:
        revocations.check(cert, what=f"certificate of operator {operator.name!r}")
    return operator


# --------------------------------------------------------------------------
# Loading (`ClusterCA.issue_operator` issues)


@dataclass(frozen=True)
class OperatorIdentity(IdentityFiles):
    """Where one operator's key, certificate and the cluster CA certificate live.

    `OperatorIdentity.load(directory, name)` loads and checks the identity
    of operator `name` from `directory`.
    """

    validate_name = staticmethod(validate_operator_name)

    def certificate_pem(self) -> str:
        return cert_pem(self.certificate()).decode("ascii")

    def operator(self) -> Operator:
        """Name and role, as the certificate states them."""
        return operator_of(self.certificate())

    def check(self) -> None:
        """Raise CertificateError unless this identity is complete and consistent.

        Checks that the files exist, the key is private (mode 0600) and
        matches the certificate, the certificate is an operator certificate
        for the operator's name issued by ca.pem, and it is valid now.
        """
        cert = self.certificate()
        ca = self.ca_certificate()
        key = self.private_key()
        if not is_ca(ca):
            raise CertificateError(f"{self.ca_path} is not a CA certificate")
        try:
            operator = verify_operator_certificate(cert, ca)
        except CertificateError as exc:
            raise CertificateError(f"{self.cert_path}: {exc}") from None
        if operator.name != self.name:
            raise CertificateError(f"{self.cert_path} was issued for operator {operator.name!r}, not {self.name!r}")
        if not same_public_key(key, cert):
            raise CertificateError(f"{self.key_path} does not belong to {self.cert_path}")
