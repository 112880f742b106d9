"""The checks an agent runs on an incoming order, in order, each refusal audited.

This is the sequence the lead wires into the agent: verify_order, then the
replay cache, then the policy, with an audit entry for every outcome.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sealift.security.audit import AuditLog, Kinds
from sealift.security.errors import OrderError
from sealift.security.orders import VerifiedOrder, create_order, verify_order
from sealift.security.policy import Policy
from sealift.security.replay import ReplayCache
from sealift.security.revocation import RevocationList

from .conftest import Cluster

POLICY = {"rule": [{"roles": ["admin", "operator"], "vms": ["web*"], "from": ["host-a"], "to": ["host-b"]}]}


class DestinationChecks:
    """What host-b does with an order before it accepts anything."""

    def __init__(self, cluster: Cluster, state: Path) -> None:
        self.cluster = cluster
        self.replay = ReplayCache(state / "agent.sqlite3")
        self.audit = AuditLog(state / "audit.sqlite3", "host-b", cluster.host_b.private_key())
        self.policy = Policy.from_dict(POLICY, source="policy.toml")

    def accept(self, envelope: str, tls_peer: str) -> VerifiedOrder:
        self.audit.append(Kinds.ORDER_RECEIVED, peer=tls_peer, size=len(envelope))
        try:
            verified = verify_order(
                envelope,
                self.cluster.ca.certificate,
                revocations=RevocationList.disabled(),
                expect_source=tls_peer,
                expect_destination="host-b",
            )
            order = verified.order
            # Labels from the agent's own VM records in real life; none here.
            self.policy.authorize(verified.operator, order.vm, None, order.source, order.destination).require(order.id)
            self.replay.use_once(order.id, order.expires)
        except OrderError as refusal:
            self.audit.append(Kinds.ORDER_REFUSED, **refusal.audit_fields())
            raise
        self.audit.append(Kinds.ORDER_ACCEPTED, **verified.audit_fields())
        return verified

    def close(self) -> None:
        self.replay.close()
        self.audit.close()


def test_each_refusal_is_audited_and_the_log_verifies(cluster: Cluster, tmp_path: Path) -> None:
    agent = DestinationChecks(cluster, tmp_path)
    good = create_order(cluster.operator, "web1", "host-a", "host-b")
    agent.accept(good, tls_peer="host-a")
    attempts = [
        (good, "host-a", "replayed"),  # T4
        (create_order(cluster.operator, "web1", "host-c", "host-b"), "host-c", "denied_by_policy"),  # T10
        (create_order(cluster.auditor, "web1", "host-a", "host-b"), "host-a", "denied_by_policy"),  # T10
        (create_order(cluster.foreign_admin, "web1", "host-a", "host-b"), "host-a", "untrusted_issuer"),
        (create_order(cluster.admin, "web1", "host-a", "host-b"), "host-evil", "wrong_source"),  # T5
    ]
    for envelope, peer, code in attempts:
        with pytest.raises(OrderError) as caught:
            agent.accept(envelope, tls_peer=peer)
        assert caught.value.code == code
    refused = agent.audit.show(limit=100, kind=Kinds.ORDER_REFUSED)
    assert [e.fields["code"] for e in refused] == [code for _, _, code in attempts]
    assert "auditors may never migrate" in refused[2].fields["reason"]
    assert [e.kind for e in agent.audit.show(limit=100, kind=Kinds.ORDER_ACCEPTED)] == [Kinds.ORDER_ACCEPTED]
    assert agent.audit.verify().ok
    agent.close()
