"""An agent restarted during a post-copy holds the split guest: never resumed at the source, never discarded."""

from __future__ import annotations

from pathlib import Path

from sealift.host.store import AgentStore, MigrationRecord
from sealift.migration import records
from sealift.migration.phases import Event, Phase, Role
from sealift.migration.recovery import Keepers, recover


class RecordingKeeper:
    """What the recovery asked the backend to do (the backend's own tests drive real guests)."""

    backend = "qemu"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.saved: dict[str, dict | None] = {}

    def can_settle(self, record: MigrationRecord) -> bool:
        return True

    def _note(self, what: str, record: MigrationRecord) -> None:
        self.calls.append((what, record.id))

    def resume_source(self, record: MigrationRecord) -> bool:
        self._note("resume_source", record)
        return True

    def hold_source(self, record: MigrationRecord) -> None:
        self._note("hold_source", record)

    def release_source(self, record: MigrationRecord) -> None:
        self._note("release_source", record)

    def running_destination(self, record: MigrationRecord) -> int | None:
        return None

    def hold_destination(self, record: MigrationRecord) -> None:
        self._note("hold_destination", record)

    def start_destination(self, record: MigrationRecord) -> int | None:
        self._note("start_destination", record)
        return None

    def discard_destination(self, record: MigrationRecord) -> None:
        self._note("discard_destination", record)

    def handed_over(self, record: MigrationRecord) -> bool:
        return False

    def resume_postcopy(self, record: MigrationRecord, saved: dict | None) -> bool:
        self._note("resume_postcopy", record)
        self.saved[record.id] = saved
        return saved is not None


def test_a_restart_during_post_copy_holds_both_sides_and_offers_the_stored_hello(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    try:
        records.create(store, "src1", "vm", Role.SOURCE, "host-b", 1 << 20, "qemu")
        records.transition(store, "src1", Event.BEGIN_PRECOPY)
        records.transition(store, "src1", Event.DECIDE_POSTCOPY)
        records.create(store, "dst1", "vm2", Role.DESTINATION, "host-a", 1 << 20, "qemu")
        for event in (Event.STREAM_VERIFIED, Event.RECEIVE_COMMIT, Event.RUN_POSTCOPY):
            records.transition(store, "dst1", event)
        store.save_resume("dst1", {"hello": {"migration_id": "dst1"}, "order_id": "o1"})
        keeper = RecordingKeeper()
        audited: list[str] = []
        recover(store, Keepers({"qemu": keeper}, "qemu", lambda vm: "qemu"), lambda kind, **f: audited.append(kind))
        assert sorted(keeper.calls) == [
            ("hold_destination", "dst1"),
            ("hold_source", "src1"),
            ("resume_postcopy", "dst1"),
            ("resume_postcopy", "src1"),
        ]
        # The backend is offered what the store holds, once the record is paused (it resumes from there).
        assert keeper.saved == {"dst1": {"hello": {"migration_id": "dst1"}, "order_id": "o1"}, "src1": None}
        for migration_id in ("src1", "dst1"):
            record = store.migration(migration_id)
            assert record is not None and record.phase == Phase.POSTCOPY_PAUSED
        assert store.migration("src1").decision == "committed"  # type: ignore[union-attr]
        assert audited == ["migration.postcopy_paused"] * 2
    finally:
        store.close()
