"""Structure-aware fuzz of the parsers of untrusted documents: only sealift's own errors come out.

Each input keeps a valid outer encoding and damages something inside: a
certificate is valid DER, re-signed by the cluster CA, with one extension's
value, subject attribute, issuer or key damaged; an order, advert or receipt
is valid JSON, often re-signed with the right key so the damage reaches the
checks behind the signature, with one field replaced by an odd value. A
parser may accept or refuse; a refusal must be a SealiftError (for orders an
OrderError, which the agents audit and send back as a Refuse), never a
ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, ...

Budget: 300 inputs for certificates and orders, 150 for adverts and
receipts, 300 PSK proofs: about 2 s in all on one core (hypothesis draws a
seed; a seeded random.Random makes the edits, so a failure replays exactly).
"""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealift.errors import SealiftError
from sealift.migration.documents import DocumentSigner, await_receipt
from sealift.placement.adverts import AdvertError, Placement, make_advert, sign_advert, verify_advert
from sealift.security.certificates import is_issued_by, read_certificate
from sealift.security.errors import MalformedCertificateError, OrderError
from sealift.security.identity import host_name_of, read_host_certificate
from sealift.security.operators import operator_of, read_operator_certificate, verify_operator_certificate
from sealift.security.orders import create_order, describe_order, verify_order
from sealift.security.psk.proof import PROOF_BYTES, PskProof
from sealift.security.revocation import RevocationList
from sealift.security.signing import sign_document
from sealift.wire.messages import Receipt

from . import certforge
from .conftest import Cluster

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The certificate and order parsers are the finding's: twice the inputs (still about a second each).
FUZZ_MORE = settings(FUZZ, max_examples=300)
seeds = st.integers(0, 2**64 - 1)
NO_CRL = RevocationList.disabled()
MID = "0123456789abcdef0123456789abcdef"
BINDING = "ab" * 32

# Values a field should never hold, and some it might: wrong types, edges, huge and odd text.
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    10**400,
    -(10**400),
    1e308,
    -1e308,
    0.5,
    "",
    " ",
    "x" * 5000,
    "\u0000",
    "\ud800",
    "é" * 70,
    "٣",
    [],
    [1, "a"],
    {},
    {"a": {"b": [None]}},
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "2026-02-30T10:00:00Z",
    "2026-11-22T10:00:00+01:00",
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----\n",
    "host-a",
    "HOST-B",
    "alice",
    "ca",
]


def odd_value(rng: random.Random) -> Any:
    if rng.random() < 0.2:
        alphabet = string.printable + "\u00e9\u2603\U0001f600\ud800"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
    return rng.choice(ODD_VALUES)


def only_sealift_errors(run: Callable[[], object], allowed: type[SealiftError] = SealiftError) -> bool:
    """Run; True if it succeeded, False if it raised `allowed`. Anything else propagates and fails the test."""
    try:
        run()
    except allowed as exc:
        assert isinstance(exc.code, str) and exc.code and str(exc), f"{type(exc).__name__} without a code or reason"
        return False
    return True


def mutate_json(rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
    """One field of `document` (or of an object inside it) replaced, removed, or added."""
    target = document
    while True:
        nested = [key for key, value in target.items() if isinstance(value, dict)]
        if not nested or rng.random() < 0.5:
            break
        target = target[rng.choice(nested)]
    how = rng.randrange(4)
    if how == 0 and target:
        del target[rng.choice(sorted(target))]
    elif how == 1:
        target[rng.choice(["role", "x", "", "v2", "\ud800"])] = odd_value(rng)
    elif target:
        target[rng.choice(sorted(target))] = odd_value(rng)
    return document


def mutate_text(rng: random.Random, text: str) -> str | bytes:
    """A byte-level edit: truncation, a changed or inserted byte (which may break UTF-8), a swapped bracket."""
    data = bytearray(text.encode("utf-8"))
    at = rng.randrange(len(data))
    how = rng.randrange(4)
    if how == 0:
        del data[at:]
    elif how == 1:
        data[at] = rng.randrange(256)
    elif how == 2:
        data[at:at] = bytes([rng.choice(b'{}[]",:\\\x00\xff')])
    else:
        return text[:at] + "[" * rng.randrange(1, 3000) + text[at:]
    return bytes(data)


# --------------------------------------------------------------------------
# Certificates


@FUZZ_MORE
@given(seeds)
def test_fuzz_certificates_malformed_inside(cluster: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    ca_key = certforge.ca_key_of(cluster.ca)
    if rng.random() < 0.5:
        base, key = certforge.operator_certificate(cluster.ca, "alice", "admin", key=_operator_key())
    else:
        base, key = certforge.host_certificate(cluster.ca, "host-c"), _operator_key()
    der = certforge.mutate_certificate(rng, base, ca_key)

    # Through an order, whatever the certificate: the order's parser must refuse it as an OrderError.
    order = certforge.order_with_certificate(_template(cluster), certforge.pem(der), key, "alice")
    only_sealift_errors(lambda: verify_order(order, cluster.ca.certificate, revocations=NO_CRL), OrderError)
    only_sealift_errors(lambda: describe_order(order), OrderError)

    try:
        cert = certforge.load(der)
    except ValueError:
        return  # not even the outer encoding loads: the order's PEM check above covers it
    for reader in (
        read_certificate,
        read_operator_certificate,
        read_host_certificate,
        operator_of,
        host_name_of,
        lambda c: verify_operator_certificate(c, cluster.ca.certificate),
        lambda c: is_issued_by(c, cluster.ca.certificate),
    ):
        only_sealift_errors(lambda reader=reader: reader(cert))


_KEYS: list[Any] = []


def _operator_key() -> Any:
    # One key for every example: making a fresh key each time would be most of the run time.
    from cryptography.hazmat.primitives.asymmetric import ec

    if not _KEYS:
        _KEYS.append(ec.generate_private_key(ec.SECP256R1()))
    return _KEYS[0]


_TEMPLATES: dict[int, str] = {}


def _template(cluster: Cluster) -> str:
    # A valid order to start from (orders live minutes; the fuzz runs seconds).
    if id(cluster) not in _TEMPLATES:
        _TEMPLATES[id(cluster)] = create_order(cluster.admin, "web1", "host-a", "host-b", labels={"tier": "web"})
    return _TEMPLATES[id(cluster)]


# --------------------------------------------------------------------------
# Orders


@FUZZ_MORE
@given(seeds)
def test_fuzz_orders_with_damaged_fields(cluster: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    envelope = json.loads(_template(cluster))
    resign = rng.random() < 0.6
    mutated = mutate_json(rng, envelope["payload"] if resign else envelope)
    if resign:  # signed by alice herself: the damage reaches the checks behind the signature
        try:
            order: str | bytes = sign_document(
                mutated, cluster.admin.private_key(), signer="alice", kind=envelope["kind"]
            )
        except ValueError:
            return  # not even encodable as canonical JSON: no one can sign it
    else:
        order = json.dumps(mutated)
    if rng.random() < 0.2:
        order = mutate_text(rng, order if isinstance(order, str) else order.decode("utf-8", "surrogatepass"))
    for check in (
        lambda: verify_order(order, cluster.ca.certificate, revocations=NO_CRL, expect_destination="host-b"),
        lambda: describe_order(order),
    ):
        only_sealift_errors(check, OrderError)


# --------------------------------------------------------------------------
# Adverts


@FUZZ
@given(seeds)
def test_fuzz_adverts_with_damaged_fields(cluster: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    now = time.time()
    advert = make_advert("host-b", 8 << 30, 4 << 30, 0.25, 2, now)
    payload = mutate_json(rng, advert.to_payload())
    key = cluster.host_b.private_key()
    try:
        envelope: str | bytes = sign_document(payload, key, signer="host-b", kind="advert")
    except ValueError:
        return
    if rng.random() < 0.2:
        envelope = mutate_text(rng, envelope)
    public_key = cluster.host_b.certificate().public_key()
    verified = None

    def verify() -> None:
        nonlocal verified
        verified = verify_advert(envelope, public_key, "host-b", now)  # type: ignore[arg-type]

    if only_sealift_errors(verify, AdvertError) and verified is not None:
        # What was accepted must not break the placement that believes it only so far.
        placement = Placement({"host-b": 16 << 30})
        placement.consider(verified)
        only_sealift_errors(lambda: placement.choose(1 << 30, now))


def test_an_advert_number_too_large_for_a_float_is_an_advert_error(cluster: Cluster) -> None:
    """Found by the fuzz: math.isfinite(10**400) raises OverflowError."""
    now = time.time()
    payload = {**make_advert("host-b", 8 << 30, 4 << 30, 0.25, 2, now).to_payload(), "cpu_load": 10**400}
    envelope = sign_document(payload, cluster.host_b.private_key(), signer="host-b", kind="advert")
    with pytest.raises(AdvertError, match="cpu_load must be a finite number"):
        verify_advert(envelope, cluster.host_b.certificate().public_key(), "host-b", now)  # type: ignore[arg-type]
    assert sign_advert(make_advert("host-b", 8 << 30, 4 << 30, 0.25, 2, now), cluster.host_b.private_key())


# --------------------------------------------------------------------------
# Receipts


def _channel(cluster: Cluster, envelope: str, secure: bool) -> Any:
    """What await_receipt reads of a control channel: the next message and the peer's certificate."""
    reply = Receipt(MID, "running", envelope)
    tls = SimpleNamespace(peer_certificate=cluster.host_b.certificate())
    return SimpleNamespace(secure=secure, tls=tls, recv=lambda timeout: reply)


def _receipt_payload() -> dict[str, Any]:
    return {
        "migration_id": MID,
        "vm": "web1",
        "source": "host-a",
        "destination": "host-b",
        "image_digest": "00" * 32,
        "state_digest": "11" * 32,
        "stage": "running",
        "channel_binding": BINDING,
        "signed_at": time.time(),
        "counter_at_resume": 7,
        "pid": 1234,
        "cpu_s": 0.5,
    }


@FUZZ
@given(seeds)
def test_fuzz_receipts_with_damaged_fields(cluster: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    secure = rng.random() < 0.7
    payload = mutate_json(rng, _receipt_payload())
    try:
        if secure:
            envelope = sign_document(payload, cluster.host_b.private_key(), signer="host-b", kind="receipt")
        else:
            envelope = json.dumps({"alg": "none", "kind": "receipt", "signer": "host-b", "payload": payload})
    except ValueError:
        return
    if rng.random() < 0.2:
        edited = mutate_text(rng, envelope)
        envelope = edited if isinstance(edited, str) else edited.decode("utf-8", "replace")

    def receive() -> None:
        await_receipt(
            _channel(cluster, envelope, secure),
            DocumentSigner("host-a", None),
            peer="host-b",
            stage="running",
            migration_id=MID,
            binding=BINDING,
            manifest=None,
            timeout=1.0,
        )

    only_sealift_errors(receive)


def test_a_valid_receipt_is_accepted_and_a_bad_cpu_time_refused(cluster: Cluster) -> None:
    def receive(payload: dict[str, Any]) -> dict[str, Any]:
        envelope = sign_document(payload, cluster.host_b.private_key(), signer="host-b", kind="receipt")
        receipt, _ = await_receipt(
            _channel(cluster, envelope, True),
            DocumentSigner("host-a", None),
            peer="host-b",
            stage="running",
            migration_id=MID,
            binding=BINDING,
            manifest=None,
            timeout=1.0,
        )
        return receipt

    assert receive(_receipt_payload())["cpu_s"] == 0.5
    with pytest.raises(SealiftError, match="cpu_s is not a number of seconds"):
        receive({**_receipt_payload(), "cpu_s": "fast"})


# --------------------------------------------------------------------------
# PSK proofs


def _proof_hex(rng: random.Random) -> str:
    raw = bytearray(rng.randbytes(PROOF_BYTES))
    raw[0] = rng.choice((1, 1, 1, 0, 2, 255))  # mostly the right version, so the rest is parsed
    raw[1] = rng.choice((0, 1, 1, 2, 0x81))
    text = raw.hex()
    how = rng.randrange(5)
    at = rng.randrange(len(text))
    if how == 0:
        text = text[:at] + " " + text[at + 1 :]  # bytes.fromhex skips whitespace: fewer bytes
    elif how == 1:
        text = text[:at] + rng.choice("gG-+٣é\u0000") + text[at + 1 :]
    elif how == 2:
        text = text[: at - at % 2] + text[at - at % 2 + 2 :] + rng.choice(("  ", "\n\t", "0 "))
    elif how == 3:
        text = text.upper()
    return text


@settings(max_examples=300, deadline=None)
@given(seeds)
def test_fuzz_psk_proofs(seed: int) -> None:
    rng = random.Random(seed)
    text = _proof_hex(rng)
    assert len(text) == 2 * PROOF_BYTES
    only_sealift_errors(lambda: PskProof.from_hex(text))


def test_a_psk_proof_with_whitespace_is_refused_as_not_hex() -> None:
    """Found by the fuzz: bytes.fromhex skipped the spaces and the short MAC raised ValueError."""
    from sealift.security.psk import PskError

    text = ("01" + "00" * 17 + "ab" * 32)[: 2 * PROOF_BYTES - 2] + " 0"
    with pytest.raises(PskError, match="not hex"):
        PskProof.from_hex(text)


def test_the_fuzzed_certificates_mostly_reach_the_lazy_parse(cluster: Cluster) -> None:
    """The fuzz is only worth something if many inputs load and fail only when read: the finding's case."""
    rng = random.Random(23)
    malformed_inside = 0
    for _ in range(100):
        base = certforge.host_certificate(cluster.ca, "host-c")
        try:
            read_certificate(certforge.load(certforge.mutate_certificate(rng, base, certforge.ca_key_of(cluster.ca))))
        except ValueError:
            continue  # the outer parse refused it
        except MalformedCertificateError:
            malformed_inside += 1
    assert malformed_inside >= 25, f"only {malformed_inside} of 100 mutated certificates load and fail inside"


def test_an_order_at_the_edge_of_the_calendar_is_malformed_not_an_overflow(cluster: Cluster) -> None:
    """Found in review: year 1 minus the clock skew overflowed datetime (a signed order, so past the signature)."""
    payload = json.loads(_template(cluster))["payload"]
    payload.update(not_before="0001-01-01T00:00:00Z", expires="0001-01-01T00:01:00Z", issued_at="0001-01-01T00:00:00Z")
    order = sign_document(payload, cluster.admin.private_key(), signer="alice", kind="migration-order")
    with pytest.raises(OrderError, match="between the years 1970 and 9998") as refused:
        verify_order(order, cluster.ca.certificate, revocations=NO_CRL)
    assert refused.value.code == "malformed"
