"""Every refusal of an order is on record: `order.refused` with its code follows each `order.received`.

The agent-level tests (tests/agent/test_malformed_orders.py) show it over the
wire; these check `Authority._authorize` itself, including the refusals that
are not an OrderError: another security check's, and a check that broke.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.host.config import AgentConfig
from sealift.migration import authority as authority_module
from sealift.migration.authority import Authority
from sealift.security.errors import CertificateError, MalformedOrderError, OrderError
from sealift.security.orders import create_order

from . import certforge
from .conftest import Cluster


@pytest.fixture
def authority(cluster: Cluster, tmp_path: Path) -> Iterator[Authority]:
    """host-b's authority, as its agent builds it (no policy file: every valid order is denied by policy)."""
    config = AgentConfig(
        name="host-b",
        listen=("127.0.0.1", 0),
        control_socket=tmp_path / "control.sock",
        state_dir=tmp_path / "state",
        vm_dir=tmp_path / "vms",
        identity_dir=cluster.host_b.cert_path.parent,
    )
    config.state_dir.mkdir()
    authority = Authority(config, cluster.host_b)
    yield authority
    authority.close()


def order_log(authority: Authority) -> list[tuple[str, str | None]]:
    entries = authority.audit.show(limit=20)
    return [(e.kind, e.fields.get("code")) for e in entries if e.kind.startswith("order.")]


def test_an_order_with_a_certificate_malformed_inside_is_refused_and_audited(
    cluster: Cluster, authority: Authority
) -> None:
    cert, key = certforge.operator_certificate(cluster.ca, "alice", "admin")
    der = certforge.replace_extension(cert, certforge.ca_key_of(cluster.ca), certforge.SAN_OID, b"\x30\x05\x86\x01")
    order = certforge.order_with_certificate(
        create_order(cluster.admin, "web1", "host-a", "host-b"), certforge.pem(der), key, "alice"
    )
    with pytest.raises(MalformedOrderError):
        authority.authorize_incoming(order, "web1", "host-a")
    assert order_log(authority) == [("order.received", None), ("order.refused", "malformed")]
    refused = authority.audit.show(limit=1, kind="order.refused")[0].fields
    assert refused["side"] == "destination" and refused["order_id"] is not None


def test_a_refusal_by_another_security_check_is_audited_with_its_code(
    cluster: Cluster, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise CertificateError("the CRL could not be read")

    monkeypatch.setattr(authority_module, "verify_order", refuse)
    with pytest.raises(CertificateError, match="CRL"):
        authority.authorize_outgoing(create_order(cluster.admin, "web1", "host-b", "host-a"), "web1", "host-a")
    assert order_log(authority) == [("order.received", None), ("order.refused", "certificate_error")]


def test_a_check_that_breaks_refuses_the_order_and_is_audited(
    cluster: Cluster, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: an unexpected error while checking is a refusal (an OrderError the peer is told), on record."""

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a parser we did not wrap")

    monkeypatch.setattr(authority_module, "verify_order", broken)
    with pytest.raises(OrderError, match="could not be checked: a parser we did not wrap") as refused:
        authority.authorize_incoming(create_order(cluster.admin, "web1", "host-a", "host-b"), "web1", "host-a")
    assert refused.value.code == "refused"
    assert isinstance(refused.value.__cause__, ValueError)
    assert order_log(authority) == [("order.received", None), ("order.refused", "refused")]
