"""An agent restarted after libvirt's switchover reads libvirt's word: the guest can only run at the destination."""

from __future__ import annotations

from pathlib import Path

from sealift.host.store import AgentStore, MigrationRecord
from sealift.migration import records
from sealift.migration.phases import Event, Phase, Role
from sealift.migration.recovery import Keepers, recover

from .recording_keeper import RecordingKeeper


class SwitchedOverKeeper(RecordingKeeper):
    """A libvirt keeper whose libvirtd says it handed the guest over (or not); it records what it was asked."""

    backend = "libvirt"

    def __init__(self, handed_over: bool, present: bool = True) -> None:
        super().__init__()
        self._handed_over = handed_over
        self._present = present

    def can_settle(self, record: MigrationRecord) -> bool:
        return self._present

    def handed_over(self, record: MigrationRecord) -> bool:
        return self._handed_over


def _restart(
    tmp_path: Path, handed_over: bool, present: bool = True
) -> tuple[AgentStore, SwitchedOverKeeper, list[str]]:
    store = AgentStore(tmp_path / "agent.db")
    records.create(store, "src", "vm", Role.SOURCE, "host-b", 1 << 20, "libvirt")
    records.transition(store, "src", Event.BEGIN_PRECOPY)  # killed before it could record the switchover
    records.create(store, "dst", "vm2", Role.DESTINATION, "host-a", 1 << 20, "libvirt")  # still receiving
    keeper = SwitchedOverKeeper(handed_over, present)
    audited: list[str] = []
    recover(store, Keepers({"libvirt": keeper}, "libvirt", lambda vm: "libvirt"), lambda k, **f: audited.append(k))
    return store, keeper, audited


def test_after_libvirts_switchover_a_restart_holds_both_sides_in_doubt_and_the_source_decides_commit(
    tmp_path: Path,
) -> None:
    store, keeper, audited = _restart(tmp_path, handed_over=True)
    try:
        assert sorted(keeper.calls) == [("hold_destination", "dst"), ("hold_source", "src")]  # nothing resumed
        source, destination = store.migration("src"), store.migration("dst")
        assert source is not None and (source.phase, source.decision) == (Phase.IN_DOUBT, "committed")
        assert destination is not None and destination.phase == Phase.IN_DOUBT  # the resolver asks the source
        assert "END" in (destination.error or "")  # says what it could no longer check
        assert audited == ["migration.recovered"] * 2
    finally:
        store.close()


def test_before_libvirts_switchover_a_restart_still_resumes_the_source_and_discards_the_destination(
    tmp_path: Path,
) -> None:
    store, keeper, _ = _restart(tmp_path, handed_over=False)
    try:
        assert sorted(keeper.calls) == [("discard_destination", "dst"), ("resume_source", "src")]
        source = store.migration("src")
        assert source is not None and (source.phase, source.decision) == (Phase.ABORTED, "aborted")
    finally:
        store.close()


def test_a_source_domain_gone_after_libvirts_switchover_is_handed_over_too(tmp_path: Path) -> None:
    """A transient domain libvirt handed over leaves nothing at the source: committed, nothing held or resumed."""
    store, keeper, _ = _restart(tmp_path, handed_over=True, present=False)
    try:
        assert ("resume_source", "src") not in keeper.calls and ("hold_source", "src") not in keeper.calls
        source = store.migration("src")
        assert source is not None and (source.phase, source.decision) == (Phase.IN_DOUBT, "committed")
    finally:
        store.close()
