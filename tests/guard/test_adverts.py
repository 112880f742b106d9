"""Signed resource adverts and placement (threat T7), with real host keys."""

from __future__ import annotations

import json

import pytest

from sealift.placement.adverts import (
    AdvertError,
    Placement,
    PlacementError,
    ResourceAdvert,
    VerifiedAdvert,
    make_advert,
    sign_advert,
    verify_advert,
)
from sealift.security.signing import sign_document

from .conftest import Hosts

GiB = 1 << 30
NOW = 1_800_000_000.0


def signed(
    hosts: Hosts,
    host: str,
    free: int,
    *,
    capacity: int = 16 * GiB,
    load: float = 0.2,
    at: float = NOW,
    lifetime: float = 60,
) -> VerifiedAdvert:
    """host's advert, signed with its real key and verified just after `at`."""
    identity = {"host-a": hosts.a, "host-b": hosts.b, "host-c": hosts.c}[host]
    advert = make_advert(host, capacity, free, load, 3, at, lifetime)
    envelope = sign_advert(advert, identity.private_key())
    return verify_advert(envelope, identity.certificate().public_key(), host, at + 1)


# ---------------------------------------------------------------------------
# Verification


def test_a_genuine_advert_verifies(hosts: Hosts) -> None:
    advert = make_advert("host-b", 16 * GiB, 8 * GiB, 0.25, 4, NOW)
    envelope = sign_advert(advert, hosts.b.private_key())
    verified = verify_advert(envelope, hosts.b.certificate().public_key(), "host-b", NOW + 5)
    assert verified.advert == advert


def test_forged_altered_and_misattributed_adverts_are_refused(hosts: Hosts) -> None:
    advert = make_advert("host-b", 16 * GiB, 8 * GiB, 0.25, 4, NOW)
    b_key = hosts.b.certificate().public_key()
    # Signed by another host's key, claiming to be host-b.
    forged = sign_advert(advert, hosts.c.private_key())
    with pytest.raises(AdvertError, match="does not verify"):
        verify_advert(forged, b_key, "host-b", NOW)
    # A genuine advert with the free memory raised in transit.
    doc = json.loads(sign_advert(advert, hosts.b.private_key()))
    doc["payload"]["free_memory"] = 15 * GiB
    with pytest.raises(AdvertError, match="does not verify"):
        verify_advert(json.dumps(doc), b_key, "host-b", NOW)
    # host-c's genuine advert presented as host-b's.
    c_advert = sign_advert(make_advert("host-c", 16 * GiB, 8 * GiB, 0.1, 1, NOW), hosts.c.private_key())
    with pytest.raises(AdvertError, match="signed by 'host-c', expected 'host-b'"):
        verify_advert(c_advert, b_key, "host-b", NOW)
    # host-b signing a document about host-c.
    about_c = sign_document(
        make_advert("host-c", GiB, GiB, 0.1, 1, NOW).to_payload(), hosts.b.private_key(), "host-b", "advert"
    )
    with pytest.raises(AdvertError, match="describes host-c"):
        verify_advert(about_c, b_key, "host-b", NOW)
    # A receipt is not an advert.
    receipt = sign_document(advert.to_payload(), hosts.b.private_key(), "host-b", "receipt")
    with pytest.raises(AdvertError, match="expected a 'advert'"):
        verify_advert(receipt, b_key, "host-b", NOW)


def test_expired_future_and_long_lived_adverts_are_refused(hosts: Hosts) -> None:
    key = hosts.b.certificate().public_key()
    envelope = sign_advert(make_advert("host-b", GiB, GiB, 0.1, 1, NOW, lifetime=60), hosts.b.private_key())
    with pytest.raises(AdvertError, match="expired 10 s ago"):
        verify_advert(envelope, key, "host-b", NOW + 70)
    with pytest.raises(AdvertError, match="in the future"):
        verify_advert(envelope, key, "host-b", NOW - 300)
    long_lived = ResourceAdvert("host-b", GiB, GiB, 0.1, 1, NOW, NOW + 86400)
    with pytest.raises(AdvertError, match="valid for 86400 s"):
        verify_advert(sign_advert(long_lived, hosts.b.private_key()), key, "host-b", NOW)


def test_malformed_payloads_are_refused(hosts: Hosts) -> None:
    payload = make_advert("host-b", GiB, GiB, 0.1, 1, NOW).to_payload()
    key = hosts.b.certificate().public_key()
    for change in ({"free_memory": "lots"}, {"cpu_load": True}, {"extra": 1}, {"expires_at": NOW - 1}):
        bad = sign_document({**payload, **change}, hosts.b.private_key(), "host-b", "advert")
        with pytest.raises(AdvertError):
            verify_advert(bad, key, "host-b", NOW)


# ---------------------------------------------------------------------------
# Placement


def test_only_fresh_authenticated_adverts_of_inventory_hosts_are_chosen(hosts: Hosts) -> None:
    placement = Placement({"host-b": 16 * GiB, "host-c": 16 * GiB})
    assert placement.consider(signed(hosts, "host-b", 8 * GiB, at=NOW - 100))  # expired by NOW
    assert placement.consider(signed(hosts, "host-c", 2 * GiB))
    assert not placement.consider(signed(hosts, "host-a", 15 * GiB))  # not in the inventory
    with pytest.raises(TypeError):
        placement.consider(make_advert("host-b", 16 * GiB, 16 * GiB, 0.0, 0, NOW))  # type: ignore[arg-type]
    choice = placement.choose(GiB, NOW)
    assert choice.host == "host-c"
    assert "host-b: advert expired 40 s ago" in choice.reason
    with pytest.raises(PlacementError, match="no host can take a 4 GiB VM") as err:
        placement.choose(4 * GiB, NOW)
    assert {a.host for a in err.value.assessments} == {"host-b", "host-c"}


def test_an_older_advert_never_replaces_a_newer_one(hosts: Hosts) -> None:
    placement = Placement({"host-b": 16 * GiB})
    assert placement.consider(signed(hosts, "host-b", 1 * GiB, at=NOW))
    assert not placement.consider(signed(hosts, "host-b", 12 * GiB, at=NOW - 10))  # a replayed old advert
    with pytest.raises(PlacementError, match="1 GiB believed free"):
        placement.choose(4 * GiB, NOW + 1)


def test_a_host_claiming_impossible_capacity_is_not_chosen(hosts: Hosts) -> None:
    placement = Placement({"host-b": 16 * GiB, "host-c": 8 * GiB})
    # host-c says it has 64 GiB (registered: 8 GiB) and all of it free.
    placement.consider(signed(hosts, "host-c", 64 * GiB, capacity=64 * GiB, load=0.0))
    placement.consider(signed(hosts, "host-b", 4 * GiB, load=0.9))
    choice = placement.choose(2 * GiB, NOW + 1)
    assert choice.host == "host-b"
    assert "impossible claim: advertises 64 GiB capacity, but 8 GiB is registered" in choice.reason
    assert placement.penalty("host-c", NOW + 1) == pytest.approx(1.0, abs=0.01)
    # Free memory above its own advertised capacity, or negative numbers: also impossible.
    for free, capacity in ((9 * GiB, 8 * GiB), (-1, 8 * GiB)):
        p = Placement({"host-c": 8 * GiB})
        p.consider(signed(hosts, "host-c", free, capacity=capacity))
        with pytest.raises(PlacementError, match="impossible claim"):
            p.choose(GiB, NOW + 1)


def test_claims_are_capped_at_registered_capacity_minus_known_usage(hosts: Hosts) -> None:
    placement = Placement({"host-b": 16 * GiB, "host-c": 16 * GiB})
    placement.consider(signed(hosts, "host-b", 14 * GiB))
    placement.consider(signed(hosts, "host-c", 10 * GiB))
    placement.set_known_usage("host-b", 12 * GiB)  # we know it runs 12 GiB of VMs
    choice = placement.choose(3 * GiB, NOW + 1)
    assert choice.host == "host-c"
    assert (
        "4 GiB believed free" in choice.reason
        and "capped at registered 16 GiB minus 12 GiB known in use" in choice.reason
    )
    # A VM just sent to host-c counts until an advert issued after it arrives.
    placement.note_placed("host-c", 8 * GiB, NOW + 2)
    assert placement.choose(3 * GiB, NOW + 3).host == "host-b"
    placement.consider(signed(hosts, "host-c", 2 * GiB, at=NOW + 5))
    assert placement.choose(1 * GiB, NOW + 6).host == "host-b"  # 4 GiB (b) > 2 GiB (c)


def test_a_host_that_lied_once_is_down_ranked_below_an_honest_one(hosts: Hosts) -> None:
    placement = Placement({"host-b": 16 * GiB, "host-c": 16 * GiB}, penalty_half_life_s=3600)
    placement.consider(signed(hosts, "host-b", 12 * GiB))
    placement.consider(signed(hosts, "host-c", 4 * GiB))
    assert placement.choose(2 * GiB, NOW + 1).host == "host-b"  # more room
    placement.report_admission_refused("host-b", 12 * GiB, "host-b has 512 MiB free of 16384 MiB", NOW + 2)
    choice = placement.choose(2 * GiB, NOW + 3)
    assert choice.host == "host-c"
    assert "claimed 12 GiB free but admission was refused (host-b has 512 MiB free" in choice.reason
    # A new advert from the liar is used again, but it ranks below the honest host.
    placement.consider(signed(hosts, "host-b", 12 * GiB, at=NOW + 10))
    choice = placement.choose(2 * GiB, NOW + 11)
    assert choice.host == "host-c" and "penalty 1.00 for a false claim" in choice.reason
    # ... unless the honest host cannot take the VM.
    assert placement.choose(6 * GiB, NOW + 11).host == "host-b"
    # The penalty decays: after ~5 half-lives the host is trusted as before.
    later = NOW + 5 * 3600
    assert placement.penalty("host-b", later) == 0.0
    placement.consider(signed(hosts, "host-b", 12 * GiB, at=later))
    placement.consider(signed(hosts, "host-c", 4 * GiB, at=later))
    assert placement.choose(2 * GiB, later + 1).host == "host-b"


def test_ties_are_broken_deterministically(hosts: Hosts) -> None:
    def choose(order: list[str], loads: dict[str, float]) -> str:
        placement = Placement({"host-c": 16 * GiB, "host-a": 16 * GiB, "host-b": 16 * GiB})
        for host in order:
            placement.consider(signed(hosts, host, 8 * GiB, load=loads[host]))
        return placement.choose(GiB, NOW + 1).host

    equal = {"host-a": 0.5, "host-b": 0.5, "host-c": 0.5}
    assert {choose(order, equal) for order in (["host-a", "host-b", "host-c"], ["host-c", "host-b", "host-a"])} == {
        "host-a"
    }
    assert choose(["host-a", "host-b", "host-c"], {"host-a": 0.5, "host-b": 0.1, "host-c": 0.5}) == "host-b"


def test_excluded_hosts_are_not_chosen(hosts: Hosts) -> None:
    placement = Placement({"host-a": 16 * GiB, "host-b": 16 * GiB})
    placement.consider(signed(hosts, "host-a", 12 * GiB))
    placement.consider(signed(hosts, "host-b", 2 * GiB))
    choice = placement.choose(GiB, NOW + 1, exclude=("host-a",))
    assert choice.host == "host-b" and "host-a: excluded" in choice.reason
