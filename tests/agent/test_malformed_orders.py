"""An order whose operator certificate is malformed inside (issue 23), on real agents.

The certificate loads (its outer DER is fine) but its subjectAltName does
not parse. Before the fix the destination just closed the connection and the
source's control API answered with the ASN.1 parser's message; neither
audited `order.refused`. Now both refuse it as `malformed`: the destination
with a Refuse carrying the code, the source with the code in its answer, and
each with an `order.refused` entry after its `order.received`.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import OPERATOR, LocalCluster
from sealift.host.transport import ControlChannel
from sealift.security.identity import HostIdentity
from sealift.security.signing import sign_document
from sealift.wire.messages import Hello, Refuse

VM = "vm1"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(hosts=("host-a", "host-b"), extra_config="step_timeout_s = 8")
    cluster.start()
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
    yield cluster
    cluster.cleanup()


def malformed_order(cluster: LocalCluster) -> str:
    """The cluster admin's order for VM host-a -> host-b, carrying a CA-signed certificate with a broken SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, OPERATOR),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                ]
            )
        )
        .issuer_name(cluster.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        # The SEQUENCE claims 5 bytes and holds 2: it loads, and reading the SAN fails.
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x05\x86\x01"), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(cluster.ca._key, hashes.SHA256())
    )
    payload = json.loads(cluster.order(VM, "host-a", "host-b"))["payload"]
    payload["issuer_certificate"] = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return sign_document(payload, key, signer=OPERATOR, kind="migration-order")


def order_entries(cluster: LocalCluster, host: str) -> list[dict]:
    entries = cluster.client(host).request("audit.show", limit=50)["entries"]
    return [entry for entry in entries if entry["kind"] in ("order.received", "order.refused", "order.accepted")]


def assert_received_then_refused_as_malformed(cluster: LocalCluster, host: str, side: str) -> None:
    entries = sorted(order_entries(cluster, host), key=lambda entry: entry["seq"])
    kinds = [entry["kind"] for entry in entries]
    assert kinds == ["order.received", "order.refused"], kinds
    refused = entries[-1]["fields"]
    assert refused["side"] == side and refused["code"] == "malformed"
    assert "issuer certificate" in refused["reason"] and "is malformed" in refused["reason"]


def test_the_destination_refuses_it_with_the_code_and_audits_the_refusal(cluster: LocalCluster) -> None:
    """host-a speaks the protocol directly (as a source whose own agent would not check the order)."""
    channel = ControlChannel.connect(
        cluster.addresses["host-b"], HostIdentity.load(cluster.pki, "host-a"), "host-b", secure=True, timeout=5
    )
    try:
        channel.send(
            Hello(
                migration_id=secrets.token_hex(16),
                vm_name=VM,
                source_host="host-a",
                destination_host="host-b",
                nonce=secrets.token_bytes(32),
                memory_bytes=32 << 20,
                page_size=4096,
                secure=True,
                compression=None,
                streams=1,
                backend="builtin",
                order=malformed_order(cluster),
                psk_proof=None,
            )
        )
        reply = channel.recv(5)
    finally:
        channel.close()
    assert isinstance(reply, Refuse), reply
    assert reply.code == "malformed" and "issuer certificate" in reply.reason
    assert_received_then_refused_as_malformed(cluster, "host-b", "destination")
    assert not cluster.client("host-b").request("vm.list")["vms"]


def test_the_source_refuses_it_with_the_code_and_audits_the_refusal(cluster: LocalCluster) -> None:
    with pytest.raises(AgentRequestFailed) as refused:
        cluster.client("host-a").request("migrate", vm=VM, to="host-b", options={}, order=malformed_order(cluster))
    assert refused.value.code == "malformed"
    assert str(refused.value).startswith("malformed order") and "its extensions cannot be parsed" in str(refused.value)
    assert_received_then_refused_as_malformed(cluster, "host-a", "source")
    info = cluster.client("host-a").request("vm.info", name=VM)["vm"]
    assert info["alive"] and not info["paused"] and not info["migrating"]
    assert order_entries(cluster, "host-b") == []  # nothing reached the destination
