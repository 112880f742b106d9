"""Signed migration orders (threats T4, T5, T10).

An order is a small signed document an operator creates with their key and
hands to an agent (`sealift order create` / `sealift migrate --order`):

    {"alg": "ecdsa-p256-sha256", "kind": "migration-order", "signer": "alice",
     "payload": {"v": 1, "id": "<32 hex>", "vm": "web1",
                 "source": "host-a", "destination": "host-b",
                 "not_before": "2026-11-22T09:55:00Z", "expires": "2026-11-22T10:00:00Z",
                 "issued_at": "2026-11-22T09:55:00Z", "issuer": "alice",
                 "labels": {"tier": "web"}, "issuer_certificate": "-----BEGIN ..."},
     "signature": "..."}

It is a `signing.sign_document` envelope. The operator's certificate travels
inside the signed payload, so any agent can check the order against the
cluster CA alone, and the certificate cannot be swapped for another one.

Both agents check an order with `verify_order` before anything moves: the
source before it sends (with `expect_source` = itself and `expect_destination`
= the name in the peer's TLS certificate), the destination before it accepts
(with `expect_destination` = itself and `expect_source` = its TLS peer). Then
each agent records the id in its `replay.ReplayCache`, so an order is used
once per agent, and asks its policy (`policy.Policy.authorize`) whether the
operator's role may do this. Every refusal is an `OrderError` whose `code`
and message go to the audit log.

Clock skew: agents accept an order up to ORDER_CLOCK_SKEW (30 s) before its
not-before time and after its expiry, so hosts whose clocks differ by a few
seconds agree on validity. The replay cache keeps ids at least that long
after expiry, so the tolerance opens no replay window.

Labels in an order are what the operator asserts. A policy rule on labels is
only as good as the source of the labels: agents should match policy labels
against their own record of the VM, not against the order's.
"""

from __future__ import annotations

import datetime
import re
import secrets
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sealift.security.errors import (
    CertificateError,
    CertificateRevokedError,
    IssuerRevokedError,
    MalformedOrderError,
    OrderExpiredError,
    OrderNotYetValidError,
    OrderSignatureError,
    OrderTooLargeError,
    SignatureError,
    UntrustedIssuerError,
    WrongDestinationError,
    WrongSourceError,
)
from sealift.security.identity import validate_hostname
from sealift.security.operators import (
    Operator,
    OperatorIdentity,
    operator_of,
    read_operator_certificate,
    validate_operator_name,
    verify_operator_certificate,
)
from sealift.security.revocation import RevocationList
from sealift.security.signing import _parse_envelope, sign_document, verify_document

ORDER_KIND = "migration-order"
ORDER_VERSION = 1
MAX_ORDER_BYTES = 8 * 1024  # an order with its certificate is ~1.5 KiB
ORDER_CLOCK_SKEW = datetime.timedelta(seconds=30)
DEFAULT_TTL_S = 300
# A long-lived order is a standing authorisation (and a long-lived replay
# cache entry): cap it.
MAX_ORDER_LIFETIME = datetime.timedelta(hours=24)
MAX_LABELS = 32

_ORDER_ID = re.compile(r"[0-9a-f]{32}")
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as wire.messages and the VM backend
_LABEL_KEY = re.compile(r"[a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_EARLIEST_YEAR = 1970
_LATEST_YEAR = 9998
_PAYLOAD_FIELDS = frozenset(
    {
        "v",
        "id",
        "vm",
        "source",
        "destination",
        "not_before",
        "expires",
        "issued_at",
        "issuer",
        "labels",
        "issuer_certificate",
    }
)


# --------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class MigrationOrder:
    """The content of an order. Times are timezone-aware UTC, whole seconds."""

    id: str
    vm: str
    source: str
    destination: str
    not_before: datetime.datetime
    expires: datetime.datetime
    issuer: str
    issued_at: datetime.datetime
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy: the order must not change after it was checked.
        object.__setattr__(self, "labels", types.MappingProxyType(dict(self.labels)))

    @property
    def short_id(self) -> str:
        return self.id[:8] + "…"

    def payload_fields(self) -> dict[str, Any]:
        """The order as its signed payload spells it, but for "v" and "issuer_certificate"."""
        return {
            "id": self.id,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "not_before": format_time(self.not_before),
            "expires": format_time(self.expires),
            "issued_at": format_time(self.issued_at),
            "issuer": self.issuer,
            "labels": dict(self.labels),
        }

    def to_fields(self) -> dict[str, Any]:
        """JSON-ready summary (no certificate), e.g. for audit entries and `--json` output."""
        fields = self.payload_fields()
        # "order_id", as in OrderError.audit_fields: refusals and acceptances read alike.
        return {"order_id": fields.pop("id"), **fields}


@dataclass(frozen=True)
class VerifiedOrder:
    """An order whose signature, issuer, validity and hosts `verify_order` has checked."""

    order: MigrationOrder
    operator: Operator
    issuer_certificate: x509.Certificate = field(repr=False, compare=False)

    def audit_fields(self) -> dict[str, Any]:
        """Fields for an `order.accepted` audit entry: the order and who signed it."""
        return {
            **self.order.to_fields(),
            "role": self.operator.role.value,
            "issuer_serial": f"{self.issuer_certificate.serial_number:x}",
        }


# --------------------------------------------------------------------------
# Creating


def create_order(
    operator: OperatorIdentity,
    vm: str,
    source: str,
    destination: str,
    ttl_s: float = DEFAULT_TTL_S,
    not_before: datetime.datetime | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    now: datetime.datetime | None = None,
) -> str:
    """Sign an order to migrate `vm` from `source` to `destination`; returns the envelope JSON.

    The order is valid from `not_before` (default: now) for `ttl_s` seconds
    (at most 24 h). Raises ValueError for a bad argument and CertificateError
    if the operator's identity is unusable (e.g. an expired certificate).
    """
    now = _utc_now() if now is None else _require_aware("now", now)
    _check_vm(vm)
    validate_hostname(source)
    validate_hostname(destination)
    if source.lower() == destination.lower():
        raise ValueError(f"source and destination are the same host ({source!r})")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
    start = now if not_before is None else _require_aware("not_before", not_before)
    start = _whole_second(start)
    expires = _whole_second(start + datetime.timedelta(seconds=ttl_s))
    if expires <= start:
        raise ValueError(f"ttl_s={ttl_s!r} is shorter than one second")
    if expires - start > MAX_ORDER_LIFETIME:
        raise ValueError(
            f"ttl_s={ttl_s!r} exceeds the maximum order lifetime of {int(MAX_ORDER_LIFETIME.total_seconds())} s"
        )
    clean_labels = _check_labels(dict(labels or {}))
    operator.check()
    name = operator.operator().name
    order = MigrationOrder(
        id=secrets.token_hex(16),  # 128 random bits
        vm=vm,
        source=source,
        destination=destination,
        not_before=start,
        expires=expires,
        issuer=name,
        issued_at=_whole_second(now),
        labels=clean_labels,
    )
    payload = {"v": ORDER_VERSION, **order.payload_fields(), "issuer_certificate": operator.certificate_pem()}
    return sign_document(payload, operator.private_key(), signer=name, kind=ORDER_KIND)


# --------------------------------------------------------------------------
# Verifying


def verify_order(
    envelope: str | bytes,
    ca_cert: x509.Certificate,
    *,
    revocations: RevocationList,
    now: datetime.datetime | None = None,
    expect_source: str | None = None,
    expect_destination: str | None = None,
) -> VerifiedOrder:
    """Check an order completely, or raise the OrderError subclass that says why not.

    In this order: size and syntax (MalformedOrderError, OrderTooLargeError);
    the issuer's certificate is an operator certificate of `ca_cert`, valid at
    `now` (UntrustedIssuerError) and not revoked (IssuerRevokedError); the
    signature (OrderSignatureError); the validity window, with
    ORDER_CLOCK_SKEW of tolerance (OrderNotYetValidError, OrderExpiredError);
    the hosts, case-insensitively (WrongSourceError, WrongDestinationError).

    Does not check replay (`replay.ReplayCache.use_once`) or authorisation
    (`policy.Policy.authorize`): call those next.
    """
    now = _utc_now() if now is None else _require_aware("now", now)
    raw = _envelope_bytes(envelope)
    doc, order, cert = _parse(raw)
    oid = order.id

    try:
        operator = verify_operator_certificate(cert, ca_cert, now=now)
    except CertificateError as exc:
        raise UntrustedIssuerError(
            f"order {oid} refused: its issuer is not a valid operator of this cluster: {exc}", oid
        ) from None
    try:
        revocations.check(cert, what=f"the certificate of operator {operator.name!r}")
    except CertificateRevokedError as exc:
        raise IssuerRevokedError(f"order {oid} refused: {exc}", oid) from None
    if doc["signer"] != operator.name or order.issuer != operator.name:
        raise OrderSignatureError(
            f"order {oid} refused: it claims issuer {order.issuer!r} (signer {doc['signer']!r}) "
            f"but carries the certificate of operator {operator.name!r}",
            oid,
        )
    try:
        verify_document(raw, cert.public_key(), ORDER_KIND, expected_signer=operator.name)
    except (SignatureError, TypeError) as exc:
        raise OrderSignatureError(f"order {oid} refused: {exc}", oid) from None

    if now < order.not_before - ORDER_CLOCK_SKEW:
        raise OrderNotYetValidError(
            f"order {oid} is not valid before {format_time(order.not_before)} "
            f"(now {format_time(now)}); wait, or check this host's clock",
            oid,
        )
    if now > order.expires + ORDER_CLOCK_SKEW:
        raise OrderExpiredError(
            f"order {oid} expired at {format_time(order.expires)} (now {format_time(now)}); create a new order",
            oid,
        )
    if expect_source is not None and order.source.lower() != expect_source.lower():
        raise WrongSourceError(f"order {oid} is for source host {order.source!r}, not {expect_source!r}", oid)
    if expect_destination is not None and order.destination.lower() != expect_destination.lower():
        raise WrongDestinationError(
            f"order {oid} is for destination host {order.destination!r}, not {expect_destination!r}",
            oid,
        )
    return VerifiedOrder(order=order, operator=operator, issuer_certificate=cert)


def describe_order(envelope: str | bytes) -> dict[str, Any]:
    """What an order says, WITHOUT checking its signature or issuer (`sealift order show`).

    Raises MalformedOrderError if it cannot be read. The result has
    "verified": False so that nobody mistakes it for a checked order.
    """
    doc, order, cert = _parse(_envelope_bytes(envelope))
    try:
        claimed = str(operator_of(cert))
    except CertificateError as exc:
        claimed = f"(not an operator certificate: {exc})"
    return {
        **order.to_fields(),
        "signer": doc["signer"],
        "issuer_claims": claimed,
        "issuer_certificate_serial": f"{cert.serial_number:x}",
        "issuer_certificate_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "issuer_certificate_not_after": format_time(cert.not_valid_after_utc),
        "verified": False,
    }


# --------------------------------------------------------------------------
# Time


def format_time(moment: datetime.datetime) -> str:
    """UTC, whole seconds, ISO 8601 with Z: the only time format in orders."""
    return moment.astimezone(datetime.UTC).strftime(_TIME_FORMAT)


def parse_time(text: str) -> datetime.datetime:
    """Inverse of format_time; ValueError for anything else, and for years outside 1970-9998."""
    if not isinstance(text, str) or not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"{text!r} is not a time of the form 2026-11-22T10:00:00Z")
    moment = datetime.datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=datetime.UTC)
    # Checks add clock skew and retention to these times: near year 1 or 9999 that overflows.
    if not _EARLIEST_YEAR <= moment.year <= _LATEST_YEAR:
        raise ValueError(f"{text!r} is not a time between the years {_EARLIEST_YEAR} and {_LATEST_YEAR}")
    return moment


# --------------------------------------------------------------------------
# Helpers


def _envelope_bytes(envelope: str | bytes) -> bytes:
    if isinstance(envelope, str):
        if len(envelope) > MAX_ORDER_BYTES:  # cheap check before encoding
            raise OrderTooLargeError(f"order is larger than {MAX_ORDER_BYTES} bytes")
        envelope = envelope.encode("utf-8", "surrogatepass")
    if not isinstance(envelope, bytes):
        raise MalformedOrderError("an order must be JSON text (str or bytes)")
    if len(envelope) > MAX_ORDER_BYTES:
        raise OrderTooLargeError(f"order is {len(envelope)} bytes, larger than the {MAX_ORDER_BYTES}-byte limit")
    return envelope


def _parse(raw: bytes) -> tuple[dict[str, Any], MigrationOrder, x509.Certificate]:
    """Syntax only: the envelope, the order and the certificate it carries. Trusts nothing."""
    try:
        # The same strict parser verify_document uses (no duplicate keys, no NaN).
        doc = _parse_envelope(raw)
    except SignatureError as exc:
        raise MalformedOrderError(f"not a readable order: {exc}") from None
    if doc["kind"] != ORDER_KIND:
        raise MalformedOrderError(f"not a migration order: the document is a {doc['kind']!r}")
    payload = doc["payload"]
    if not isinstance(payload, dict):
        raise MalformedOrderError("malformed order: the payload is not an object")
    order = _order_from_payload(payload)
    if not isinstance(doc["signer"], str):
        raise MalformedOrderError(f"malformed order {order.id}: signer is not a string", order.id)
    pem = payload["issuer_certificate"]
    if not isinstance(pem, str) or not pem.startswith("-----BEGIN CERTIFICATE-----"):
        raise MalformedOrderError(f"malformed order {order.id}: issuer_certificate is not a PEM certificate", order.id)
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise MalformedOrderError(
            f"malformed order {order.id}: unreadable issuer certificate: {exc}", order.id
        ) from None
    try:
        read_operator_certificate(cert)  # its inside too, before anything reads it
    except CertificateError as exc:
        raise MalformedOrderError(f"malformed order {order.id}: issuer certificate: {exc}", order.id) from None
    return doc, order, cert


def _order_from_payload(payload: dict[str, Any]) -> MigrationOrder:
    order_id = payload.get("id")
    oid = order_id if isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id) else None
    where = f"order {oid}" if oid else "order"

    def bad(reason: str) -> MalformedOrderError:
        return MalformedOrderError(f"malformed {where}: {reason}", oid)

    if payload.keys() != _PAYLOAD_FIELDS:
        missing = sorted(_PAYLOAD_FIELDS - payload.keys())
        extra = sorted(payload.keys() - _PAYLOAD_FIELDS)
        raise bad(f"missing fields {missing}, unexpected fields {extra}")
    if payload["v"] != ORDER_VERSION or isinstance(payload["v"], bool):
        raise bad(f"unsupported order version {payload['v']!r} (this agent reads {ORDER_VERSION})")
    if oid is None:
        raise bad("id must be 32 lower-case hex digits")
    try:
        _check_vm(payload["vm"])
        validate_hostname(payload["source"])
        validate_hostname(payload["destination"])
        validate_operator_name(payload["issuer"])
        labels = _check_labels(payload["labels"])
        not_before = parse_time(payload["not_before"])
        expires = parse_time(payload["expires"])
        issued_at = parse_time(payload["issued_at"])
    except (ValueError, CertificateError) as exc:
        raise bad(str(exc)) from None
    if payload["source"].lower() == payload["destination"].lower():
        raise bad("source and destination are the same host")
    if expires <= not_before:
        raise bad("it expires before it becomes valid")
    if expires - not_before > MAX_ORDER_LIFETIME:
        raise bad(f"its lifetime of {expires - not_before} exceeds the maximum of {MAX_ORDER_LIFETIME}")
    return MigrationOrder(
        id=oid,
        vm=payload["vm"],
        source=payload["source"],
        destination=payload["destination"],
        not_before=not_before,
        expires=expires,
        issuer=payload["issuer"],
        issued_at=issued_at,
        labels=labels,
    )


def _check_vm(vm: object) -> None:
    if not isinstance(vm, str) or not _VM_NAME.fullmatch(vm):
        raise ValueError(
            f"invalid VM name {vm!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def _check_labels(labels: object) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise ValueError("labels must be an object of key=value strings")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"invalid label key {key!r}: lower-case letters, digits, '.', '_', '/', '-'")
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"invalid value {value!r} for label {key!r}")
    return dict(labels)


def _require_aware(what: str, moment: datetime.datetime) -> datetime.datetime:
    if not isinstance(moment, datetime.datetime) or moment.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return moment.astimezone(datetime.UTC)


def _whole_second(moment: datetime.datetime) -> datetime.datetime:
    return moment.replace(microsecond=0)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
