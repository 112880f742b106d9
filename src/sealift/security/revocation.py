"""Certificate revocation: an X.509 CRL signed by the cluster CA (threat T13).

The CA keeps one CRL, `ca.crl.pem` in its directory. `ClusterCA.revoke`
adds an entry and re-signs it; `ClusterCA.publish_crl` re-signs it with a new
expiry. The file is then copied to every agent (like ca.pem), which loads it
with `RevocationList.load` and refuses revoked hosts and operators.

Fail closed: an agent refuses a CRL that is not signed by its CA, that names
another issuer, that is not yet valid or whose next-update time has passed.
So a stolen host key cannot be "un-revoked" by feeding an agent an older or
forged CRL, but the CA must re-publish before `next_update` (default 30 days,
`crl_days`). Running agents load a changed file by themselves, and refuse
one older than the CRL in force (migration/authority.py, security/reload.py;
a TLS context made with `enable_crl_check` would have to be rebuilt).

Two ways for the TLS layer to use it:
- `revocations.check(stream.peer_certificate)` right after a handshake (raises
  CertificateRevokedError), on both the accepting and the connecting side;
- `enable_crl_check(context, revocations)`: OpenSSL checks the peer's
  certificate against the CRL during the handshake itself, so a revoked host
  never completes a handshake (OpenSSL's error 23, "certificate revoked").
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL import crypto as _crypto

from sealift.security.certificates import CLOCK_SKEW, iso, utc_now
from sealift.security.errors import CertificateError, CertificateRevokedError, CrlError

CRL_FILE = "ca.crl.pem"
DEFAULT_CRL_DAYS = 30
MAX_CRL_BYTES = 4 * 1024 * 1024  # ~50k entries; refuse to parse anything bigger

# Same tolerance as certificates: a CRL published on a machine whose clock is
# a few minutes ahead is still accepted.
CRL_CLOCK_SKEW = CLOCK_SKEW

# RFC 5280 reasons an operator may give (certificate_hold and remove_from_crl
# are for temporary suspension, which sealift does not do).
_REASONS = {
    flag.name: flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.certificate_hold, x509.ReasonFlags.remove_from_crl)
}


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime.datetime
    reason: str  # a ReasonFlags name, e.g. "key_compromise"


# --------------------------------------------------------------------------
# CA side: writing the CRL
#
# `ClusterCA.revoke` and `ClusterCA.publish_crl` are the public entry points:
# they hand over the CA's directory, certificate and signing key.


def revoke(
    ca_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    serial_or_cert: int | x509.Certificate,
    reason: str | x509.ReasonFlags = "unspecified",
    *,
    crl_days: int = DEFAULT_CRL_DAYS,
) -> x509.CertificateRevocationList:
    """Add a certificate to the CRL of the CA in `ca_dir` and re-sign it.

    Revoking a serial that is already revoked keeps its first date and reason
    (and still re-signs, extending the CRL's validity).
    """
    serial = _serial_of(serial_or_cert)
    reason_flag = _parse_reason(reason)
    path = ca_dir / CRL_FILE
    entries = {entry.serial: entry for entry in _current_entries(path, ca_cert)}
    if serial not in entries:
        entries[serial] = RevokedEntry(serial, utc_now(), reason_flag.name)
    return _write_crl(path, ca_cert, ca_key, entries.values(), crl_days)


def publish_crl(
    ca_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    crl_days: int = DEFAULT_CRL_DAYS,
) -> x509.CertificateRevocationList:
    """Re-sign the CRL of the CA in `ca_dir` with its current entries."""
    path = ca_dir / CRL_FILE
    return _write_crl(path, ca_cert, ca_key, _current_entries(path, ca_cert), crl_days)


def _current_entries(path: Path, ca_cert: x509.Certificate) -> list[RevokedEntry]:
    if not path.exists():
        return []
    # Check our own file as strictly as an agent would: re-signing a CRL that
    # someone replaced would launder their edits under the CA's signature.
    # (Freshness is not checked: re-publishing an expired CRL is the fix.)
    crl = _parse_crl(path.read_bytes(), path)
    _check_issuer(crl, ca_cert, path)
    return [_entry(revoked) for revoked in crl]


def _write_crl(
    path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    entries: Iterable[RevokedEntry],
    crl_days: int,
) -> x509.CertificateRevocationList:
    if not isinstance(crl_days, int) or crl_days < 1:
        raise ValueError(f"CRL validity must be a positive number of days, got {crl_days!r}")
    previous_number = _crl_number_of(path)
    now = utc_now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CRL_CLOCK_SKEW)
        .next_update(now + datetime.timedelta(days=crl_days))
        # A strictly increasing number lets anyone tell which of two CRLs is newer.
        .add_extension(x509.CRLNumber(previous_number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )
    for entry in sorted(entries, key=lambda e: e.serial):
        revoked = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
        # RFC 5280 5.3.1: omit the reason code rather than say "unspecified".
        if entry.reason != x509.ReasonFlags.unspecified.name:
            revoked = revoked.add_extension(x509.CRLReason(x509.ReasonFlags[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _replace_file(path, crl.public_bytes(serialization.Encoding.PEM))
    return crl


def _crl_number_of(path: Path) -> int:
    if not path.exists():
        return 0
    crl = _parse_crl(path.read_bytes(), path)
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


# --------------------------------------------------------------------------
# Agent side: loading and checking


@dataclass(frozen=True)
class RevocationList:
    """A verified CRL of the cluster CA, or the explicit absence of one (`disabled()`)."""

    path: Path | None
    issuer: x509.Name | None
    last_update: datetime.datetime | None
    next_update: datetime.datetime | None
    number: int | None
    entries: dict[int, RevokedEntry] = field(repr=False)
    crl: x509.CertificateRevocationList | None = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: Path, ca_cert: x509.Certificate, *, now: datetime.datetime | None = None) -> RevocationList:
        """Load `path` and check it is a current CRL signed by `ca_cert`.

        Raises CrlError with what to do: a missing or unreadable file, another
        issuer, a bad signature, a CRL from the future or past its next update.
        """
        path = Path(path)
        now = utc_now() if now is None else now
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CRL_BYTES + 1)
        except FileNotFoundError:
            raise CrlError(
                f"revocation list {path} does not exist; copy ca.crl.pem from the CA "
                "(sealift ca revoke / publish-crl creates it)"
            ) from None
        except OSError as exc:
            raise CrlError(f"cannot read revocation list {path}: {exc.strerror}") from None
        if len(data) > MAX_CRL_BYTES:
            raise CrlError(f"revocation list {path} is larger than {MAX_CRL_BYTES} bytes")
        crl = _parse_crl(data, path)
        _check_issuer(crl, ca_cert, path)
        last_update = crl.last_update_utc
        next_update = crl.next_update_utc
        if last_update > now + CRL_CLOCK_SKEW:
            raise CrlError(
                f"revocation list {path} is not valid before {iso(last_update)} "
                f"(now {iso(now)}): check this host's clock"
            )
        if next_update is None:
            raise CrlError(f"revocation list {path} has no next-update time; re-publish it")
        if now > next_update + CRL_CLOCK_SKEW:
            raise CrlError(
                f"revocation list {path} expired at {iso(next_update)} (now {iso(now)}); "
                "re-publish it on the CA (sealift ca publish-crl) and copy it to this host"
            )
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        entries = {revoked.serial_number: _entry(revoked) for revoked in crl}
        return cls(
            path=path,
            issuer=crl.issuer,
            last_update=last_update,
            next_update=next_update,
            number=number,
            entries=entries,
            crl=crl,
        )

    @classmethod
    def disabled(cls) -> RevocationList:
        """No revocation checking: nothing is revoked. Use only when no CRL is configured."""
        return cls(
            path=None,
            issuer=None,
            last_update=None,
            next_update=None,
            number=None,
            entries={},
            crl=None,
        )

    @property
    def enabled(self) -> bool:
        return self.crl is not None

    def entry_for(self, cert: x509.Certificate) -> RevokedEntry | None:
        """The revocation entry of `cert`, or None if it is not revoked."""
        # Serial numbers are unique per issuer only.
        if self.issuer is None or cert.issuer != self.issuer:
            return None
        return self.entries.get(cert.serial_number)

    def is_revoked(self, cert: x509.Certificate) -> bool:
        return self.entry_for(cert) is not None

    def check(self, cert: x509.Certificate, what: str | None = None) -> None:
        """Raise CertificateRevokedError if `cert` is revoked; `what` names it in the message."""
        entry = self.entry_for(cert)
        if entry is None:
            return
        what = what or f"certificate {cert.subject.rfc4514_string()!r}"
        raise CertificateRevokedError(
            f"{what} (serial {cert.serial_number:x}) was revoked at {iso(entry.revoked_at)} "
            f"(reason: {entry.reason.replace('_', ' ')}); it is refused"
        )

    def is_stale(self, now: datetime.datetime | None = None) -> bool:
        """True if this CRL is past its next update (reload it, or `load` will refuse it)."""
        if self.next_update is None:
            return False
        return (utc_now() if now is None else now) > self.next_update + CRL_CLOCK_SKEW


def enable_crl_check(context: SSL.Context, revocations: RevocationList) -> None:
    """Make OpenSSL refuse revoked peer certificates during the handshake on `context`.

    Adds the CRL to the context's trust store and turns on CRL checking of
    the peer's (leaf) certificate. From then on OpenSSL refuses a handshake
    when the peer is revoked (X.509 error 23), and also when this CRL has
    expired (error 12) - fail closed. The CRL is copied into the context: to
    pick up a new CRL, build a new context. Does nothing when `revocations`
    is `disabled()` (with CRL checking on and no CRL, OpenSSL would refuse
    every peer).
    """
    if revocations.crl is None:
        return
    store = context.get_cert_store()
    if store is None:
        raise CertificateError("this TLS context has no certificate store to add the CRL to")
    store.add_crl(revocations.crl)
    store.set_flags(_crypto.X509StoreFlags.CRL_CHECK)


# --------------------------------------------------------------------------
# Helpers


def _parse_crl(data: bytes, path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"revocation list {path} is not a readable PEM CRL: {exc}") from None


def _check_issuer(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate, path: Path) -> None:
    if crl.issuer != ca_cert.subject:
        raise CrlError(
            f"revocation list {path} was issued by {crl.issuer.rfc4514_string()!r}, "
            f"not by this cluster's CA {ca_cert.subject.rfc4514_string()!r}"
        )
    public_key = ca_cert.public_key()
    if not crl.is_signature_valid(public_key):  # type: ignore[arg-type]  # any certificate's key type; a CA's signs
        raise CrlError(
            f"revocation list {path} is not signed by this cluster's CA "
            "(altered, or from another CA with the same name)"
        )


def _entry(revoked: x509.RevokedCertificate) -> RevokedEntry:
    try:
        reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
    except x509.ExtensionNotFound:
        reason = x509.ReasonFlags.unspecified.name
    return RevokedEntry(revoked.serial_number, revoked.revocation_date_utc, reason)


def _serial_of(serial_or_cert: int | x509.Certificate) -> int:
    if isinstance(serial_or_cert, x509.Certificate):
        return serial_or_cert.serial_number
    if isinstance(serial_or_cert, bool) or not isinstance(serial_or_cert, int):
        raise TypeError("revoke takes a certificate or its serial number (int)")
    # RFC 5280 4.1.2.2: positive, at most 20 octets.
    if not 0 < serial_or_cert < 1 << 159:
        raise ValueError(f"serial number {serial_or_cert} is out of range for a certificate")
    return serial_or_cert


def _parse_reason(reason: str | x509.ReasonFlags) -> x509.ReasonFlags:
    name = reason.name if isinstance(reason, x509.ReasonFlags) else str(reason)
    name = name.replace("-", "_")
    if name not in _REASONS:
        raise ValueError(f"unknown revocation reason {reason!r}: use one of {', '.join(sorted(_REASONS))}")
    return _REASONS[name]


def _replace_file(path: Path, data: bytes) -> None:
    # Write beside, fsync, rename: an agent copying the file mid-update sees
    # the old CRL or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
