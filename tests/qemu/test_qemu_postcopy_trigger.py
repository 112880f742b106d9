"""When a QEMU pre-copy switches to post-copy (backends/qemu/postcopy.py SwitchTrigger), from query-migrate figures.

Sans-IO: no QEMU here, only the numbers QEMU 7.2 reports in query-migrate's "ram".
"""

from __future__ import annotations

import dataclasses

import pytest

from sealift.backends.qemu import postcopy_recovery
from sealift.backends.qemu.postcopy import PostcopyUnavailable, SwitchTrigger, check_transport, effective_mode
from sealift.migration.errors import IncomingRefused
from sealift.migration.options import MigrationOptions, OptionsError
from sealift.wire.messages import Hello

MIB = 1 << 20


def ram(sync: int, dirty_mib_s: float, link_mib_s: float, remaining_mib: float = 32) -> dict[str, object]:
    return {
        "dirty-sync-count": sync,
        "dirty-pages-rate": int(dirty_mib_s * MIB / 4096),
        "page-size": 4096,
        "mbps": link_mib_s * MIB * 8 / 1e6,
        "remaining": int(remaining_mib * MIB),
    }


def test_off_never_switches() -> None:
    trigger = SwitchTrigger("off")
    assert all(trigger.reason(1e6, ram(sync, 100, 1)) is None for sync in range(1, 50))


def test_after_timeout_switches_once_the_time_is_up() -> None:
    trigger = SwitchTrigger("after-timeout", after_s=5)
    assert trigger.reason(4.9, ram(3, 1, 100)) is None
    assert trigger.reason(5.0, ram(3, 1, 100)) == "after 5 s of pre-copy"


def test_after_precopy_switches_after_the_first_full_pass() -> None:
    trigger = SwitchTrigger("after-precopy")
    assert trigger.reason(60, ram(1, 100, 1)) is None  # still in the first pass, however long it takes
    assert trigger.reason(0.1, ram(2, 0, 100)) == "after the first pre-copy pass"


def test_on_stall_needs_several_stalled_passes_in_a_row() -> None:
    trigger = SwitchTrigger("on-stall", stall_passes=3)
    assert trigger.reason(1, ram(1, 64, 16)) is None  # the first pass sends everything: never judged
    assert trigger.reason(2, ram(2, 16, 16, 32)) is None  # stalled 1 (QEMU counts a rewritten page once)
    assert trigger.reason(2.1, ram(2, 16, 16, 32)) is None  # the same pass polled again: not counted twice
    assert trigger.reason(3, ram(3, 4, 16, 20)) is None  # converging: the count starts again
    assert trigger.reason(4, ram(4, 20, 16, 20)) is None  # stalled 1
    assert trigger.reason(5, ram(5, 2, 16, 25)) is None  # stalled 2: little dirtied, but nothing shrank
    reason = trigger.reason(6, ram(6, 30, 16, 25))  # stalled 3
    assert reason is not None and reason.startswith("stalled for 3 passes")
    assert len(trigger.history) == 5


def test_a_guest_that_converges_never_stalls() -> None:
    trigger = SwitchTrigger("on-stall")
    for sync, left in enumerate([64, 32, 16, 8, 4, 2, 1], start=2):
        assert trigger.reason(sync, ram(sync, 4, 16, left)) is None


def test_post_copy_is_refused_where_it_cannot_run() -> None:
    check_transport("on-stall", "sealift")
    check_transport("off", "qemu-tls")
    with pytest.raises(PostcopyUnavailable, match="runs only on the sealift or sealift-plain transport"):
        check_transport("after-precopy", "qemu-tls")
    with pytest.raises(OptionsError, match="post-copy and multifd do not combine"):
        MigrationOptions(postcopy="on-stall", multifd_channels=2)
    with pytest.raises(OptionsError, match="unknown post-copy mode"):
        MigrationOptions(postcopy="sometimes")


class _Channel:
    """What the check reads of a control channel: whether it is TLS and whom it authenticated."""

    def __init__(self, peer_name: str | None, secure: bool = True) -> None:
        self.peer_name, self.secure = peer_name, secure


def _hello(**changes: object) -> Hello:
    base = Hello(
        migration_id="0123456789abcdef" * 2,
        vm_name="pcvm",
        source_host="host-a",
        destination_host="host-b",
        nonce=b"\x11" * 32,
        memory_bytes=1 << 27,
        page_size=4096,
        secure=True,
        compression=None,
        streams=1,
        backend="qemu",
        order='{"signed":"order","v":1}',
        psk_proof=None,
        image_digest=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_post_copy_is_resumed_only_by_its_source_with_its_own_order() -> None:
    first = _hello()
    check = postcopy_recovery._check_same_migration
    check(first, _hello(nonce=b"\x22" * 32), _Channel("host-a"))  # the same migration, reconnecting
    refusals = {
        "may not resume a migration from host-a": (_hello(nonce=b"\x22" * 32), _Channel("host-c")),
        "order differs": (_hello(nonce=b"\x22" * 32, order='{"signed":"another","v":1}'), _Channel("host-a")),
        "vm_name differs": (_hello(nonce=b"\x22" * 32, vm_name="other"), _Channel("host-a")),
        "fresh nonce": (_hello(), _Channel("host-a")),
    }
    for message, (again, channel) in refusals.items():
        with pytest.raises(IncomingRefused, match=message):
            check(first, again, channel)  # type: ignore[arg-type]


def test_the_completion_timeout_can_switch_to_post_copy_instead_of_aborting() -> None:
    assert effective_mode(MigrationOptions()) == ("off", 10.0)
    assert effective_mode(MigrationOptions(postcopy="on-stall")) == ("on-stall", 10.0)
    kubevirt = MigrationOptions(completion_timeout_s=30, completion_action="postcopy")
    assert effective_mode(kubevirt) == ("after-timeout", 30)
    assert effective_mode(MigrationOptions(completion_timeout_s=30)) == ("off", 10.0)  # abort: as before
    with pytest.raises(OptionsError, match="needs a completion timeout"):
        MigrationOptions(completion_action="postcopy")
    with pytest.raises(OptionsError, match="do not combine"):
        MigrationOptions(completion_timeout_s=30, completion_action="postcopy", postcopy="on-stall")
