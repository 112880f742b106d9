"""The QEMU drivers' storage hooks: a migration's disks, between the drivers and storage.py.

source.py and destination.py call these at a few clearly marked points
(``-- storage hook``), so that the storage migration stays in its own
modules: which disks travel, their data streams' keys and sessions, the
shared-disk check, the report's figures, and the clean-up on failure. A VM
with no disk and one vCPU sends no definition at all (as before disks).
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
from pathlib import Path

from sealift.backends.qemu import relay
from sealift.backends.qemu.definition import (
    DiskError,
    check_boot,
    check_shared,
    create_target,
    remove_share_token,
    write_share_token,
)
from sealift.backends.qemu.image import GuestImagePaths
from sealift.backends.qemu.storage import (
    DISK_STREAM_INDEX,
    DestinationStorage,
    SourceStorage,
    disk_label,
    remove_targets,
    target_name,
)
from sealift.backends.qemu.vm import QemuVM
from sealift.host.transport import ControlChannel, open_data_stream
from sealift.migration.errors import IncomingRefused, MigrationError
from sealift.migration.report import MigrationReport
from sealift.migration.session import DestinationSession, SourceSession
from sealift.migration.streams import stream_protections
from sealift.wire.messages import Accept
from sealift.wire.records import RecordProtection
from sealift.wire.vm_definition import DiskSpec, VmDefinition

log = logging.getLogger(__name__)


class SourceDisks:
    """The source's disks during one migration."""

    def __init__(self, session: SourceSession) -> None:
        self._session = session
        self._definition: VmDefinition | None = None
        self._storage: SourceStorage | None = None
        self._shared: list[DiskSpec] = []  # with a check file written beside them
        self._done = False

    def prepare(self, vm: QemuVM, transport: str, direct: bool) -> VmDefinition | None:
        """The definition to send: shared disks carry a fresh token, written beside their image."""
        definition = vm.definition
        if definition == VmDefinition():
            return None  # one vCPU, no disk: the guest description of a VM from before definitions
        if definition.copied and direct:
            raise MigrationError(
                f"{vm.name} has disks to copy: they travel only on the sealift transports, not {transport!r}",
                code="disk_needs_sealift_transport",
            )
        disks = []
        for disk in definition.disks:
            if disk.shared:
                try:
                    disk = write_share_token(disk, self._session.migration_id)
                except DiskError as exc:
                    raise MigrationError(str(exc), code=exc.code) from exc
                self._shared.append(disk)
            disks.append(disk)
        self._definition = VmDefinition(definition.cpus, tuple(disks), definition.boot)
        return self._definition

    @property
    def copied(self) -> int:
        return 0 if self._definition is None else len(self._definition.copied)

    def split_sessions(self, sessions: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The ready record's extra streams: multifd's first, then one per copied disk."""
        first_disk = len(sessions) - self.copied
        if first_disk < 0:
            raise MigrationError(f"the destination opened {len(sessions)} streams for {self.copied} copied disks")
        return sessions[:first_disk], sessions[first_disk:]

    def mirror(
        self,
        vm: QemuVM,
        sessions: tuple[bytes, ...],
        channel: ControlChannel,
        accept: Accept,
        address: tuple[str, int],
    ) -> None:
        """Connect every copied disk to its export, mirror it, and return once every job is ready."""
        if self._definition is None or not self.copied:
            return
        s = self._session
        timeout = s.config.step_timeout_s
        storage = self._storage = SourceStorage(vm, self._definition, timeout)

        def protections(disk: int) -> tuple[RecordProtection, RecordProtection]:
            return stream_protections(
                channel, s.options.secure, s.nonce, accept.nonce, disk_label(s.migration_id, disk)
            )

        def open_stream(session_id: bytes) -> socket.socket:
            return open_data_stream(address, session_id, DISK_STREAM_INDEX, timeout)

        storage.connect(sessions, protections, open_stream)
        storage.mirror(lambda figures: s.progress("disk", figures), s.flight.check)

    def check(self) -> None:
        if self._storage is not None and self._storage.error is not None:
            raise MigrationError(f"a disk stream failed: {self._storage.error}", code="stream_failed")

    def at_switchover(self) -> None:
        if self._storage is not None:
            self._storage.at_switchover()

    def finish(self) -> list[relay.StreamDigest]:
        if self._storage is None:
            return []
        digests = self._storage.finish()
        self._storage.close()
        self._done = True
        return digests

    def fill_report(self, report: MigrationReport) -> None:
        if self._definition is None:
            return
        report.disks = len(self._definition.disks)
        report.disks_copied = self.copied
        if self._storage is not None:
            report.disk_bytes_sent = self._storage.figures.disk_bytes_sent
            report.mirror_time_s = self._storage.figures.mirror_time_s

    def abort(self) -> None:
        if self._storage is not None and not self._done:
            self._done = True
            self._storage.abort()

    def cleanup(self) -> None:
        self.abort()
        for disk in self._shared:
            remove_share_token(disk, self._session.migration_id)
        self._shared = []


class DestinationDisks:
    """The destination's disks during one migration: checked, created, served, and removed on failure."""

    def __init__(self, session: DestinationSession, disk_dir: Path) -> None:
        self._session = session
        self._disk_dir = disk_dir
        self._storage: DestinationStorage | None = None
        self._created: list[Path] = []
        self._sessions: tuple[bytes, ...] = ()

    def boot_image(self, definition: VmDefinition | None, key: str) -> GuestImagePaths | None:
        """The operator's kernel and initramfs here, the very files the source booted (same digest)."""
        if definition is None or definition.boot is None:
            return None
        try:
            return check_boot(definition.boot, key)
        except DiskError as exc:
            raise IncomingRefused(f"this host cannot boot the guest's own kernel: {exc}") from None

    def definition_here(self, definition: VmDefinition | None, direct: bool) -> VmDefinition | None:
        """The machine to start here: shared disks checked, copied ones replaced by new empty targets."""
        if definition is None:
            return None
        s, hello = self._session, self._session.hello
        if definition.copied and direct:
            raise IncomingRefused("disks to copy travel only on the sealift transports")
        disks = []
        for index, disk in enumerate(definition.disks):
            if disk.shared:
                check_shared(disk, hello.migration_id)  # SharedDiskError (shared_disk_not_shared) refuses
                disks.append(disk.without_token())
                continue
            self._disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            target = self._disk_dir / target_name(hello.vm_name, index, hello.migration_id, disk.format)
            created = create_target(disk, target)
            self._created.append(target)
            disks.append(created)
        here = VmDefinition(definition.cpus, tuple(disks), definition.boot)
        if definition.copied:
            self._storage = DestinationStorage(here, s.config.step_timeout_s)
        return here

    def serve(self, qemu: QemuVM) -> None:
        if self._storage is not None:
            self._storage.serve(qemu)

    def new_sessions(self) -> tuple[bytes, ...]:
        """One data stream per copied disk, announced in the ready record after multifd's."""
        count = 0 if self._storage is None else len(self._storage.disks)
        self._sessions = tuple(secrets.token_bytes(16) for _ in range(count))
        for session in self._sessions:
            self._session.context.sessions.expect(session)
        return self._sessions

    def accept_streams(self, main_data: socket.socket) -> None:
        """Start carrying the disks; a failed disk stream breaks the main stream, so the migration stops."""
        if self._storage is None:
            return
        s, hello = self._session, self._session.hello

        def protections(disk: int) -> tuple[RecordProtection, RecordProtection]:
            label = disk_label(hello.migration_id, disk)
            return stream_protections(s.channel, hello.secure, hello.nonce, s.nonce, label)

        def wait_stream(session_id: bytes) -> socket.socket:
            return s.context.sessions.wait(session_id, s.config.step_timeout_s)

        def break_main() -> None:
            try:
                main_data.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        self._storage.accept_streams(self._sessions, protections, wait_stream, break_main)

    @property
    def error(self) -> BaseException | None:
        return None if self._storage is None else self._storage.error

    def wait_for_memory(self, data: socket.socket) -> None:
        """Until the memory stream's first record: the source mirrors every disk before it starts.

        The main stream is silent meanwhile, however long the disks take;
        their traffic is the sign of life (none for a whole step timeout,
        or a failed disk stream, ends the wait).
        """
        if self._storage is None:
            return
        timeout = self._session.config.step_timeout_s
        moved = -1
        while True:
            readable, _, _ = select.select([data], [], [], timeout)
            if readable:
                return
            if self.error is not None:
                raise MigrationError(f"a disk stream failed: {self.error}", code="stream_failed")
            if self._storage.bytes_moved() == moved:
                raise MigrationError(f"neither memory nor disk data came for {timeout:.0f} s", code="timeout")
            moved = self._storage.bytes_moved()

    def join(self) -> list[relay.StreamDigest]:
        return [] if self._storage is None else self._storage.join()

    def stop_server(self, qemu: QemuVM) -> None:
        if self._storage is not None:
            self._storage.stop_server(qemu)

    def close(self) -> None:
        for session in self._sessions:
            self._session.context.sessions.cancel(session)
        if self._storage is not None:
            self._storage.close()

    def discard(self) -> None:
        """Never a second disk: the target images this migration created go."""
        remove_targets(self._created)
        self._created = []
