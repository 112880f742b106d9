"""What a backend supplies to the one handover: a source driver, a destination driver, a guest keeper.

The coordinators (source.py, destination.py) run the handover the same way
for every backend: order, Hello/Accept, PSK proofs, manifest, receipts,
durable decision, Commit, recovery. A backend adds only what differs: how
its guest is claimed, described and streamed, and how it is resumed,
started, held or discarded. Each driver serves one migration (it may keep
that migration's state); the keeper serves the resolver and the recovery
after a restart, for every record of its backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from sealift.guests import GuestVM
from sealift.host.store import MigrationRecord
from sealift.host.transport import ControlChannel
from sealift.wire.messages import Accept, Hello


class Transfer(Protocol):
    """What a driver's transfer returns: at least when the guest paused (the downtime's start)."""

    paused_at: float


VmT = TypeVar("VmT", bound=GuestVM)  # the backend's guest (BuiltinVM, QemuVM)
TransferT = TypeVar("TransferT", bound=Transfer)  # what the backend's transfer returns


class SourceDriver(Protocol[VmT, TransferT]):
    backend: str  # "builtin" | "qemu": the Hello's and the record's backend
    start_audit: Mapping[str, object]  # fields of its own in the migration.started audit entry

    def preflight(self, address: tuple[str, int]) -> None:
        """Checks of the backend's own before anything is claimed; MigrationError with the reason."""

    def claim(self) -> tuple[VmT, int]:
        """The VM, marked busy, and its memory size in bytes."""

    def describe(self, vm: VmT, psk_proof: str | None) -> Hello:
        """The Hello for this guest; `psk_proof` is the hex proof of the pair's PSK (None without a PSK)."""

    def transfer(self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: VmT) -> TransferT:
        """The guest's state to the destination; the guest is left paused."""

    def manifest_fields(self, transfer: TransferT) -> tuple[dict[str, object], dict[str, object]]:
        """(the backend's fields of the signed manifest, the digest fields for the audit log)."""

    def fill_report(self, transfer: TransferT) -> None: ...

    def resume(self, vm: VmT) -> bool:
        """After a failure before the decision: run the guest here again; True if it runs."""

    def unclaim(self, vm: VmT) -> None: ...

    def release(self, vm: VmT) -> None:
        """It runs at the destination now: quit our paused copy."""

    def cleanup(self, vm: VmT) -> None:
        """Always, at the end, whatever happened."""


class DestinationDriver(Protocol):
    backend: str
    accept_audit: Mapping[str, object]

    def admit(self) -> None:
        """This backend's checks and reservations before Accept; IncomingRefused or AdmissionError to refuse."""

    def prepare(self) -> None:
        """What must hold before Accept, once admitted."""

    def take_stream(self) -> dict[str, object]:
        """Receive the guest and check it against the source's signed manifest; the manifest."""

    def start_guest(self, manifest: Mapping[str, object]) -> tuple[int | None, object]:
        """Run the received guest (on Commit); its (pid, counter at resume) for the running receipt."""

    def discard(self, reason: str) -> None:
        """Before the promise: drop what was received (the source still has the guest)."""

    def hold(self) -> None:
        """After the promise, a failure: keep the received guest, unstarted, for the resolver."""

    def release(self, prepared: bool) -> None:
        """Always, at the end, whatever happened."""


class GuestKeeper(Protocol):
    """A backend's side of settling migrations after a crash or a cut link (migration/recovery.py)."""

    backend: str

    def can_settle(self, record: MigrationRecord) -> bool:
        """Is the guest of this record still there for us to act on?"""

    def resume_source(self, record: MigrationRecord) -> bool:
        """The migration is off: run the guest here again, free for another migration; True if it runs."""

    def hold_source(self, record: MigrationRecord) -> None:
        """Undecided: keep the paused guest, busy, until the peer's word."""

    def release_source(self, record: MigrationRecord) -> None:
        """It runs at the peer: quit our paused copy."""

    def running_destination(self, record: MigrationRecord) -> int | None:
        """The pid of the guest this migration already started here, if it runs."""

    def hold_destination(self, record: MigrationRecord) -> None:
        """Keep what was received (and its reservation), unstarted, for the resolver."""

    def start_destination(self, record: MigrationRecord) -> int | None:
        """The commit is known: start the received guest (if it does not run yet); its pid."""

    def discard_destination(self, record: MigrationRecord) -> None:
        """Never promised, or the source aborted: drop what was received."""

    def remove_leftovers(self, record: MigrationRecord) -> None:
        """Never promised, and its guest is gone (it died with the agent): remove what the migration made here."""

    def handed_over(self, record: MigrationRecord) -> bool:
        """Did a hypervisor that migrates on its own (libvirt) finish handing the guest over? At a source: its
        copy has quit for the destination (or is gone); at a destination: the guest is here, paused. False for
        backends whose handover is sealift's own (built-in, QEMU)."""
