"""A real QEMU migration through the native relay core with a flipped byte: the destination's native reader
refuses the record (authentication, before a byte of it reaches QEMU), the migration aborts and the guest keeps
running on the source only.

The lab's in-path relay (T2's machinery, sealift.lab.relay) flips one bit of the data stream well inside QEMU's
stream, i.e. in a record the native core seals and opens (the guest description and the ready record are
Python's). tests/qemu/test_qemu_agent.py covers the rest of the QEMU relay through the same path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.backends.qemu import relay as qemu_relay
from sealift.cluster import LocalCluster
from sealift.host import relaycore
from sealift.lab.relay import Relay, Tamper
from test_qemu_agent import assert_runs_on_source_only, make_cluster, migrate, start_guest, stop_guests


@pytest.fixture
def cluster(relay: Relay, guest_image: object) -> Iterator[LocalCluster]:
    cluster = make_cluster(relay)
    try:
        yield cluster
    finally:
        stop_guests(cluster)
        cluster.cleanup()


def test_the_qemu_relay_runs_the_native_core() -> None:
    """One implementation in production: the pumps and feeders call the compiled core."""
    assert qemu_relay.relaycore is relaycore
    assert relaycore._relaycore.__file__.endswith(".so")


def test_a_flipped_byte_in_qemus_stream_fails_native_authentication_and_the_guest_stays(
    cluster: LocalCluster, relay: Relay
) -> None:
    start_guest(cluster.client("host-a"))
    relay.tamper = Tamper(flip_offset=5 << 20)  # 5 MiB in: QEMU's RAM, in a native record
    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        migrate(cluster)
    assert relay.tamper.done.is_set()
    assert_runs_on_source_only(cluster)
    aborted = cluster.client("host-b").request("audit.show", kind="migration.aborted")["entries"]
    assert aborted, "the destination audited no abort"
    fields = aborted[-1]["fields"]
    assert fields["code"] == "record_auth_failed", fields  # the native reader's error, the reference's code
