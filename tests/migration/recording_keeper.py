"""A stand-in guest keeper that records what the recovery asked of it (the backends' own tests drive real guests)."""

from __future__ import annotations

from sealift.host.store import MigrationRecord


class RecordingKeeper:
    """Every keeper call, in order, as (what, migration id); it settles whatever it is asked to."""

    backend = "qemu"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def can_settle(self, record: MigrationRecord) -> bool:
        return True

    def handed_over(self, record: MigrationRecord) -> bool:
        return False

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

    def remove_leftovers(self, record: MigrationRecord) -> None:
        self._note("remove_leftovers", record)
