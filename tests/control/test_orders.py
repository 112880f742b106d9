"""Signed migration orders: each test is an attack that an unchecked order would let through."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sealift.security.errors import (
    IssuerRevokedError,
    MalformedOrderError,
    OrderExpiredError,
    OrderNotYetValidError,
    OrderSignatureError,
    OrderTooLargeError,
    UntrustedIssuerError,
    WrongDestinationError,
    WrongSourceError,
)
from sealift.security.identity import ClusterCA
from sealift.security.operators import Operator, Role
from sealift.security.orders import (
    MAX_ORDER_BYTES,
    ORDER_CLOCK_SKEW,
    create_order,
    describe_order,
    format_time,
    verify_order,
)
from sealift.security.revocation import RevocationList
from sealift.security.signing import canonical_json, sign_document

from .conftest import UTC, Cluster

NO_CRL = RevocationList.disabled()


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC).replace(microsecond=0)


def _verify(cluster: Cluster, envelope: str | bytes, **kwargs: Any):  # type: ignore[no-untyped-def]
    kwargs.setdefault("revocations", NO_CRL)
    return verify_order(envelope, cluster.ca.certificate, **kwargs)


def _edit(envelope: str, **payload_changes: Any) -> str:
    doc = json.loads(envelope)
    doc["payload"].update(payload_changes)
    return canonical_json(doc).decode()


def test_a_valid_order_is_accepted_by_source_and_destination(cluster: Cluster) -> None:
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b", ttl_s=120, labels={"tier": "web"})
    at_source = _verify(cluster, envelope, expect_source="host-a", expect_destination="host-b")
    at_dest = _verify(cluster, envelope, expect_source="HOST-A", expect_destination="host-b")
    assert at_source.order == at_dest.order
    order = at_source.order
    assert at_source.operator == Operator("olga", Role.OPERATOR)
    assert (order.vm, order.source, order.destination, order.issuer) == ("web1", "host-a", "host-b", "olga")
    assert len(order.id) == 32 and int(order.id, 16) >= 0
    assert order.expires - order.not_before == datetime.timedelta(seconds=120)
    assert dict(order.labels) == {"tier": "web"}
    fields = at_source.audit_fields()
    assert fields["order_id"] == order.id and fields["role"] == "operator" and fields["issuer"] == "olga"


def test_order_ids_are_random(cluster: Cluster) -> None:
    ids = {json.loads(create_order(cluster.admin, "web1", "host-a", "host-b"))["payload"]["id"] for _ in range(20)}
    assert len(ids) == 20


def test_tampered_order_is_refused(cluster: Cluster) -> None:
    """Attack: change the VM (or the destination) of a captured order."""
    start = _now()
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b", now=start)
    longer = format_time(start + datetime.timedelta(hours=2))
    for change in ({"vm": "db1"}, {"destination": "host-c"}, {"expires": longer}):
        tampered = _edit(envelope, **change)
        with pytest.raises(OrderSignatureError, match="does not verify"):
            _verify(cluster, tampered)


def test_order_forged_with_the_operators_certificate_but_another_key_is_refused(cluster: Cluster) -> None:
    """Attack: an insider copies alice's (public) certificate and signs with their own key."""
    payload = json.loads(create_order(cluster.operator, "db1", "host-a", "host-b"))["payload"]
    payload["issuer"] = "alice"
    payload["issuer_certificate"] = cluster.admin.certificate_pem()
    forged = sign_document(payload, ec.generate_private_key(ec.SECP256R1()), signer="alice", kind="migration-order")
    with pytest.raises(OrderSignatureError, match="does not verify"):
        _verify(cluster, forged)


def test_swapping_in_an_admin_certificate_does_not_raise_the_role(cluster: Cluster) -> None:
    """Attack: olga (operator) signs, then replaces her certificate by alice's (admin)."""
    envelope = create_order(cluster.operator, "db1", "host-a", "host-b")
    swapped = _edit(envelope, issuer_certificate=cluster.admin.certificate_pem())
    with pytest.raises(OrderSignatureError, match="carries the certificate of operator 'alice'"):
        _verify(cluster, swapped)


def test_order_signed_by_an_operator_of_another_ca_is_refused(cluster: Cluster) -> None:
    """Attack: an "alice/admin" certificate made by a CA the attacker controls."""
    envelope = create_order(cluster.foreign_admin, "web1", "host-a", "host-b")
    with pytest.raises(UntrustedIssuerError, match="not issued by this cluster's CA"):
        _verify(cluster, envelope)


def test_order_signed_by_a_host_key_is_refused(cluster: Cluster) -> None:
    """Attack: a compromised host signs an order with its own (valid, same-CA) certificate."""
    payload = json.loads(create_order(cluster.operator, "web1", "host-a", "host-b"))["payload"]
    payload["issuer"] = "host-a"
    payload["issuer_certificate"] = cluster.host_a.cert_path.read_text()
    forged = sign_document(payload, cluster.host_a.private_key(), signer="host-a", kind="migration-order")
    with pytest.raises(UntrustedIssuerError, match="names a DNS host"):
        _verify(cluster, forged)


def test_order_of_a_revoked_operator_is_refused(tmp_path: Path) -> None:
    """Attack: an operator whose key was stolen (and revoked) keeps issuing orders."""
    ca = ClusterCA.init(tmp_path / "ca")
    mallory = ca.issue_operator("mallory", "admin", tmp_path / "ops")
    envelope = create_order(mallory, "web1", "host-a", "host-b")
    crl_before = ca.publish_crl()
    assert crl_before is not None
    assert verify_order(
        envelope, ca.certificate, revocations=RevocationList.load(tmp_path / "ca" / "ca.crl.pem", ca.certificate)
    )
    ca.revoke(mallory.certificate(), "key_compromise")
    revocations = RevocationList.load(tmp_path / "ca" / "ca.crl.pem", ca.certificate)
    with pytest.raises(IssuerRevokedError, match="operator 'mallory'.*was revoked.*key compromise") as caught:
        verify_order(envelope, ca.certificate, revocations=revocations)
    assert caught.value.code == "issuer_revoked"


def test_expired_order_is_refused_with_both_times(cluster: Cluster) -> None:
    """Attack: replay an old captured order after its lifetime (to an agent that forgot it)."""
    start = _now()
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b", ttl_s=300, now=start)
    expires = start + datetime.timedelta(seconds=300)
    # Within the clock-skew tolerance: still accepted.
    _verify(cluster, envelope, now=expires + ORDER_CLOCK_SKEW)
    late = expires + ORDER_CLOCK_SKEW + datetime.timedelta(seconds=1)
    with pytest.raises(OrderExpiredError) as caught:
        _verify(cluster, envelope, now=late)
    message = str(caught.value)
    assert f"expired at {format_time(expires)} (now {format_time(late)})" in message
    assert caught.value.order_id in message and caught.value.code == "expired"
    fields = caught.value.audit_fields()
    assert fields == {"order_id": caught.value.order_id, "code": "expired", "reason": message}


def test_not_yet_valid_order_is_refused(cluster: Cluster) -> None:
    """Attack: use an order prepared for a later maintenance window now."""
    start = _now() + datetime.timedelta(hours=1)
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b", not_before=start)
    with pytest.raises(OrderNotYetValidError, match=f"not valid before {format_time(start)}"):
        _verify(cluster, envelope)
    _verify(cluster, envelope, now=start - ORDER_CLOCK_SKEW)
    with pytest.raises(OrderNotYetValidError):
        _verify(cluster, envelope, now=start - ORDER_CLOCK_SKEW - datetime.timedelta(seconds=1))


def test_order_for_another_source_is_refused(cluster: Cluster) -> None:
    """Attack: an order to move web1 off host-c is presented to host-a."""
    envelope = create_order(cluster.operator, "web1", "host-c", "host-b")
    with pytest.raises(WrongSourceError, match="for source host 'host-c', not 'host-a'"):
        _verify(cluster, envelope, expect_source="host-a")


def test_order_for_another_destination_is_refused(cluster: Cluster) -> None:
    """Attack (T5): a host with a valid certificate but no order pulls the VM to itself."""
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b")
    # The source compares the order with the name in the peer's TLS certificate.
    with pytest.raises(WrongDestinationError, match="for destination host 'host-b', not 'host-evil'"):
        _verify(cluster, envelope, expect_source="host-a", expect_destination="host-evil")


def test_expired_operator_certificate_is_refused(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca")
    temp = ca.issue_operator("temp", "admin", tmp_path / "ops", days=1)
    later = _now() + datetime.timedelta(days=2)
    envelope = create_order(temp, "web1", "host-a", "host-b", not_before=later)
    with pytest.raises(UntrustedIssuerError, match="expired at"):
        verify_order(envelope, ca.certificate, revocations=NO_CRL, now=later)


@pytest.mark.parametrize(
    ("envelope", "match"),
    [
        ("not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        (
            '{"alg":"ecdsa-p256-sha256","kind":"migration-order","kind":"receipt","payload":{},"signature":"","signer":"a"}',
            "duplicate key",
        ),
    ],
)
def test_malformed_orders_are_refused(cluster: Cluster, envelope: str, match: str) -> None:
    with pytest.raises(MalformedOrderError, match=match):
        _verify(cluster, envelope)


def test_order_payload_is_checked_strictly(cluster: Cluster) -> None:
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b")
    with pytest.raises(MalformedOrderError, match=r"unexpected fields \['role'\]"):
        _verify(cluster, _edit(envelope, role="admin"))
    with pytest.raises(MalformedOrderError, match="32 lower-case hex"):
        _verify(cluster, _edit(envelope, id="1"))
    with pytest.raises(MalformedOrderError, match="invalid VM name"):
        _verify(cluster, _edit(envelope, vm="../../etc"))
    with pytest.raises(MalformedOrderError, match="same host"):
        _verify(cluster, _edit(envelope, destination="HOST-A"))
    with pytest.raises(MalformedOrderError, match="maximum"):
        _verify(cluster, _edit(envelope, expires="2099-01-01T00:00:00Z"))
    receipt = sign_document({"x": 1}, cluster.operator.private_key(), signer="olga", kind="receipt")
    with pytest.raises(MalformedOrderError, match="not a migration order"):
        _verify(cluster, receipt)


def test_oversized_order_is_refused_before_parsing(cluster: Cluster) -> None:
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b")
    padded = envelope[:-1] + " " * MAX_ORDER_BYTES + "}"
    with pytest.raises(OrderTooLargeError, match="larger than"):
        _verify(cluster, padded)


def test_create_order_refuses_bad_arguments(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="same host"):
        create_order(cluster.operator, "web1", "host-a", "host-a")
    with pytest.raises(ValueError, match="maximum order lifetime"):
        create_order(cluster.operator, "web1", "host-a", "host-b", ttl_s=2 * 86400)
    with pytest.raises(ValueError, match="positive"):
        create_order(cluster.operator, "web1", "host-a", "host-b", ttl_s=0)
    with pytest.raises(ValueError, match="invalid VM name"):
        create_order(cluster.operator, "", "host-a", "host-b")


def test_describe_order_reads_without_verifying(cluster: Cluster) -> None:
    envelope = create_order(cluster.auditor, "web1", "host-a", "host-b")
    info = describe_order(envelope)
    assert info["verified"] is False
    assert info["issuer_claims"] == "audrey (auditor)"
    assert (info["vm"], info["source"], info["destination"]) == ("web1", "host-a", "host-b")
    # It shows a forged order too - that is why it says verified: False.
    forged = describe_order(_edit(envelope, vm="db1"))
    assert forged["vm"] == "db1" and forged["verified"] is False
    with pytest.raises(MalformedOrderError):
        describe_order("{}")
