"""Namespace testbed for the IPsec tests: hosts a (source) and b (destination), router r (the attacker's seat)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from itertools import count

import pytest

from sealift.ipsec.charon import CHARON_CANDIDATES, Charon, detect_backend
from sealift.ipsec.tunnel import TunnelHost
from sealift.lab.ipsec.routed_pair import RoutedPair

MIGRATION_PORT = 7461

_serial = count()


def namespaces_usable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tshark") is None or shutil.which("nft") is None:
        return "needs iproute2, tshark and nftables"
    if not any(os.access(path, os.X_OK) for path in CHARON_CANDIDATES):
        return "needs strongSwan's charon (strongswan-charon, libcharon-extra-plugins)"
    return None


needs_namespaces = pytest.mark.skipif(namespaces_usable() is not None, reason=namespaces_usable() or "")


@pytest.fixture
def lab() -> Iterator[RoutedPair]:
    # Unique per process and test: namespaces are machine-wide.
    with RoutedPair(f"slips-{os.getpid() % 100000}-{next(_serial)}") as pair:
        yield pair


@pytest.fixture
def hosts(lab: RoutedPair) -> tuple[TunnelHost, TunnelHost]:
    return TunnelHost(lab.a.netns, lab.a.address, "host-a"), TunnelHost(lab.b.netns, lab.b.address, "host-b")


@pytest.fixture
def charons(lab: RoutedPair) -> Iterator[tuple[Charon, Charon]]:
    """One long-lived charon per host, as an agent would keep one: tunnels come and go in them."""
    backend = detect_backend()
    # mgr = 2 logs messages for unknown IKE SAs ("IKE_SA checkout not successful"): the replay test reads them.
    levels = {"mgr": 2}
    with (
        Charon(lab.a.netns, backend, subsystem_levels=levels) as a,
        Charon(lab.b.netns, backend, subsystem_levels=levels) as b,
    ):
        yield a, b
