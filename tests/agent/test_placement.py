"""T7: false resource advertising. Placement believes only signed, fresh, possible claims."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.cluster import LocalCluster
from sealift.placement.adverts import make_advert, sign_advert
from sealift.security.identity import HostIdentity
from sealift.security.tls import TlsStream, server_context
from sealift.wire.control import ControlConnection, Role
from sealift.wire.messages import Advert, AdvertQuery

VM = "vm1"
TiB = 1 << 40


class LyingHost:
    """host-c with its genuine certificate, answering advert queries with whatever it likes."""

    def __init__(self, identity: HostIdentity, envelope_for: callable) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self._identity = identity
        self._envelope_for = envelope_for
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                stream = TlsStream.accept(conn, server_context(self._identity), timeout=5)
                control = ControlConnection(Role.SERVER)
                (query,) = control.receive_data(stream.recv(65536))
                assert isinstance(query, AdvertQuery)
                stream.sendall(control.send(Advert(query.migration_id, self._envelope_for())))
                stream.close()
            except Exception:
                conn.close()

    def close(self) -> None:
        self.server.close()


def cluster_with_liar(envelope_for) -> tuple[LocalCluster, LyingHost]:
    probe = LocalCluster(hosts=("host-a", "host-b", "host-c"))
    liar = LyingHost(HostIdentity.load(probe.pki, "host-c"), lambda: envelope_for(probe))
    probe.cleanup()  # only its PKI layout was needed to know the liar's address
    cluster = LocalCluster(
        hosts=("host-a", "host-b", "host-c"), capacity="2G", peer_routes={("host-a", "host-c"): liar.address}
    )
    liar._identity = HostIdentity.load(cluster.pki, "host-c")
    liar._envelope_for = lambda: envelope_for(cluster)
    cluster.start("host-a")
    cluster.start("host-b")
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="idle")
    return cluster, liar


def advert(cluster: LocalCluster, signer: str, host: str, free: int, capacity: int) -> str:
    key = HostIdentity.load(cluster.pki, signer).private_key()
    return sign_advert(make_advert(host, capacity, free, 0.0, 0, now=time.time(), lifetime=30), key)


@pytest.fixture
def honest() -> Iterator[LocalCluster]:
    cluster = LocalCluster(hosts=("host-a", "host-b", "host-c"))
    cluster.start()
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="idle")
    yield cluster
    cluster.cleanup()


def test_placement_chooses_among_authenticated_adverts(honest: LocalCluster) -> None:
    placement = honest.client("host-a").request("place", vm=VM)["placement"]
    assert placement["host"] in ("host-b", "host-c")
    assert {a["host"] for a in placement["assessments"] if a["eligible"]} == {"host-b", "host-c"}


def test_a_host_claiming_impossible_capacity_is_not_chosen() -> None:
    cluster, liar = cluster_with_liar(lambda c: advert(c, "host-c", "host-c", free=TiB, capacity=TiB))
    try:
        placement = cluster.client("host-a").request("place", vm=VM)["placement"]
        assert placement["host"] == "host-b"
        host_c = next(a for a in placement["assessments"] if a["host"] == "host-c")
        assert not host_c["eligible"] and host_c["penalty"] > 0
    finally:
        liar.close()
        cluster.cleanup()


def test_an_advert_signed_by_another_host_is_ignored() -> None:
    """host-c relays a glowing advert signed by host-b's key: not host-c's own word."""
    cluster, liar = cluster_with_liar(lambda c: advert(c, "host-b", "host-c", free=1 << 30, capacity=2 << 30))
    try:
        placement = cluster.client("host-a").request("place", vm=VM)["placement"]
        assert placement["host"] == "host-b"
        host_c = next(a for a in placement["assessments"] if a["host"] == "host-c")
        assert not host_c["eligible"]
    finally:
        liar.close()
        cluster.cleanup()


def test_a_plausible_liar_is_caught_at_admission_and_down_ranked() -> None:
    """host-c claims 15 GiB free (within its registered 16 GiB) but can hold 64 MiB."""
    cluster = LocalCluster(
        hosts=("host-a", "host-b", "host-c"),
        host_config={
            "host-b": 'memory_capacity = "1G"',
            "host-c": 'memory_capacity = "64M"\nlab_advertise_free_memory = "15G"',
        },
    )
    try:
        cluster.start()
        src = cluster.client("host-a")
        src.request("vm.start", name=VM, memory="128M", workload="idle")
        first = src.request("place", vm=VM)["placement"]
        assert first["host"] == "host-c"  # the lie is plausible: it wins on paper
        with pytest.raises(Exception, match="free of"):
            cluster.migrate(VM, "host-a", "host-c")  # admission re-checks, and refuses
        second = src.request("place", vm=VM)["placement"]
        assert second["host"] == "host-b"
        host_c = next(a for a in second["assessments"] if a["host"] == "host-c")
        assert host_c["penalty"] > 0
        assert src.request("vm.info", name=VM)["vm"]["alive"]
    finally:
        cluster.cleanup()
