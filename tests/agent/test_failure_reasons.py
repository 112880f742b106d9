"""A failed migration names its cause at both ends, and an Abort frees the destination at once (issue 23).

Two real agents; every byte between them passes through a relay that flips
one bit of the data stream at a chosen offset: in its opening (the
destination's port cannot even tell which migration it belongs to), in a
record's header (a protocol error) or inside a sealed record (AEAD
authentication fails). The source sees only a broken connection; it must
still report the destination's reason and code, and the destination's audit
must carry the same code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay, Tamper
from sealift.wire.datastream import STREAM_OPEN_SIZE

VM = "vm1"
MiB = 1 << 20


@pytest.fixture
def cluster(relay: Relay) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        extra_config="step_timeout_s = 30\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
    )
    relay.target = cluster.addresses["host-b"]
    cluster.start()
    yield cluster
    cluster.cleanup()


def audit_codes(client: AgentClient, kind: str) -> list[str | None]:
    return [e["fields"].get("code") for e in client.request("audit.show", kind=kind, limit=20)["entries"]]


def failed_migration(cluster: LocalCluster) -> AgentRequestFailed:
    with pytest.raises(AgentRequestFailed) as failure:
        cluster.migrate(VM, "host-a", "host-b")
    return failure.value


@pytest.mark.parametrize(
    ("offset", "expected_code"),
    [
        (1, None),  # the opening's magic: host-b's port drops the stream; only host-a knows what happened
        (STREAM_OPEN_SIZE, "protocol_error"),  # the first record's type byte
        (3 * MiB, "record_auth_failed"),  # inside a sealed record, as the lab's T2 flips it
    ],
)
def test_a_tampered_stream_fails_with_the_same_reason_code_at_both_ends(
    cluster: LocalCluster, relay: Relay, offset: int, expected_code: str | None
) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    src.request("vm.start", name=VM, memory="64M", workload="db")
    relay.tamper = Tamper(flip_offset=offset)
    failure = failed_migration(cluster)
    assert relay.tamper.done.is_set()
    source_code = failure.code
    if expected_code is not None:
        assert source_code == expected_code, failure
        assert "host-b aborted:" in str(failure), failure  # the destination's reason, not a bare broken pipe
    else:
        assert source_code not in (None, "migration_failed", "internal_error"), failure
    # The destination's record of it: the same code, audited, and nothing left behind.
    deadline = time.monotonic() + 10
    while source_code not in audit_codes(dst, "migration.aborted") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert source_code in audit_codes(dst, "migration.aborted")
    assert source_code in audit_codes(src, "migration.aborted")
    assert src.request("vm.info", name=VM)["vm"]["alive"]


def test_an_abort_frees_the_destination_at_once_and_a_retry_succeeds(cluster: LocalCluster, relay: Relay) -> None:
    """Finding 3: a corrupted opening made every retry for the step timeout (30 s here) fail with
    "a VM named 'vm1' already exists"; the destination now honours the source's Abort while it waits."""
    src = cluster.client("host-a")
    src.request("vm.start", name=VM, memory="64M", workload="db")
    relay.tamper = Tamper(flip_offset=1)
    failed_migration(cluster)
    relay.tamper = None
    started = time.monotonic()
    report = cluster.migrate(VM, "host-a", "host-b")
    assert report["status"] == "completed", report
    assert time.monotonic() - started < 25  # well inside the 30 s the reservation used to be held
