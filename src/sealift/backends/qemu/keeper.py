"""QEMU guests' side of settling migrations after a crash or a cut link (migration/recovery.py)."""

from __future__ import annotations

from sealift.backends.qemu import postcopy_recovery
from sealift.backends.qemu.postcopy_restart import resume_source_after_restart
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.source import resume_source
from sealift.host.store import MigrationRecord
from sealift.migration.phases import Role
from sealift.migration.session import MigrationContext

BACKEND = "qemu"


class QemuKeeper:
    """Settles QEMU guests' migrations after a crash or a cut link (migration/recovery.py).

    The same rules as every backend, with QEMU's states: the source's guest
    waits in "postmigrate" (paused, its memory intact), the destination's in
    "paused" after the stream, until the decision is known.
    """

    backend = BACKEND

    def __init__(self, qemu_vms: QemuVmRegistry, context: MigrationContext | None = None) -> None:
        self._qemu_vms = qemu_vms
        self._context = context  # to resume a post-copy after a restart; None: only hold it

    def resume_postcopy(self, record: MigrationRecord, saved: dict[str, object] | None) -> bool:
        """A post-copy paused by this agent's restart: resume it (in the background); False if it cannot.

        Either side can, from what the store kept before the record entered
        post-copy: the destination waits for its source's reconnection (its
        adopted QEMU kept the guest and the pages it received), the source
        reconnects with the stored Hello and order and resumes its adopted,
        paused QEMU's migration (postcopy_restart.py).
        """
        if self._context is None or saved is None:
            return False
        if record.role == Role.DESTINATION.value:
            postcopy_recovery.resume_after_restart(self._context, self._qemu_vms, record.id, saved)
        else:
            resume_source_after_restart(self._context, self._qemu_vms, record, saved)
        return True

    def can_settle(self, record: MigrationRecord) -> bool:
        return self._qemu_vms.has(record.vm)  # its QEMU is gone: nothing here to resume, start or release

    def resume_source(self, record: MigrationRecord) -> bool:
        resumed = resume_source(self._qemu_vms.get(record.vm))
        self._qemu_vms.unclaim(record.vm)
        return resumed

    def hold_source(self, record: MigrationRecord) -> None:
        self._qemu_vms.claim(record.vm)

    def release_source(self, record: MigrationRecord) -> None:
        self._qemu_vms.release_migrated(record.vm)

    def running_destination(self, record: MigrationRecord) -> int | None:
        return None  # a received QEMU runs only once start_destination `cont`s it, which is idempotent

    def hold_destination(self, record: MigrationRecord) -> None:
        self._qemu_vms.claim(record.vm)  # paused and undecided: held until the resolver settles it

    def start_destination(self, record: MigrationRecord) -> int | None:
        vm = self._qemu_vms.get(record.vm)
        if vm.status() != "running":
            vm.resume()
        self._qemu_vms.unclaim(record.vm)
        return vm.pid

    def discard_destination(self, record: MigrationRecord) -> None:
        self._qemu_vms.discard_incoming(record.vm)  # never a second copy: the source keeps the guest (and disks)

    def handed_over(self, record: MigrationRecord) -> bool:
        return False  # sealift moves this guest itself: nothing switches over before the decision

    def remove_leftovers(self, record: MigrationRecord) -> None:
        """The target images this migration created (named by its id: never another migration's or an
        operator's file), when its destination QEMU died with the agent before the "prepared" record."""
        self._qemu_vms.remove_incoming_leftovers(record.vm, record.id)
