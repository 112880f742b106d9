"""The built-in VM's part of a migration: its source and destination drivers and its keeper.

Source: pre-copy rounds of the guest's pages as AEAD records on one data
stream (sender.py), the guest paused for the last round. Destination: the
records into a fresh image (receiver.py), checked against the signed
manifest's image and state digests, and a standby guest process, prepared
off the downtime path, started from that image on Commit.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path

from sealift.backends.builtin.image import GuestImage
from sealift.backends.builtin.receiver import ImageReceiver, ReceiveResult
from sealift.backends.builtin.registry import BuiltinGuestMemory, BuiltinVmRegistry
from sealift.backends.builtin.sender import PAGE_SIZE, PrecopyResult, PrecopySender, TransferProgress, state_digest
from sealift.backends.builtin.vm import BuiltinVM, StandbyGuest, VmError
from sealift.host.store import MigrationRecord
from sealift.host.transport import ControlChannel, PipelinedSink, open_data_stream, recv_exactly_into
from sealift.migration.destination import admit_hello, verify_manifest
from sealift.migration.documents import DocumentError
from sealift.migration.errors import IncomingRefused
from sealift.migration.phases import Event
from sealift.migration.report import RoundReport
from sealift.migration.session import DestinationSession, SourceSession
from sealift.migration.streams import stream_protections
from sealift.security.audit import Kinds
from sealift.wire.datastream import DataStreamReader, DataStreamWriter
from sealift.wire.messages import Accept, Hello

log = logging.getLogger(__name__)

BACKEND = "builtin"


class BuiltinSourceDriver:
    backend = BACKEND
    start_audit: Mapping[str, object] = {}

    def __init__(self, session: SourceSession, vms: BuiltinVmRegistry) -> None:
        self._session = session
        self._vms = vms

    def preflight(self, address: tuple[str, int]) -> None:
        """Nothing of its own: the built-in VM needs no host service."""

    def claim(self) -> tuple[BuiltinVM, int]:
        vm = self._vms.claim(self._session.vm_name)
        return vm, vm.memory_bytes

    def describe(self, vm: BuiltinVM, psk_proof: str | None) -> Hello:
        options = self._session.options
        return self._session.hello(
            vm_name=vm.name,
            backend=BACKEND,
            memory_bytes=vm.memory_bytes,
            page_size=4096,
            compression=options.compression,
            psk_proof=psk_proof,
            image_digest=options.image_digest if options.secure else None,
        )

    def transfer(
        self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: BuiltinVM
    ) -> PrecopyResult:
        s = self._session
        protection, _ = stream_protections(channel, s.options.secure, s.nonce, accept.nonce, s.migration_id)
        data = open_data_stream(address, accept.session_id, 0, s.config.step_timeout_s)
        sink = PipelinedSink(data)
        try:
            writer = DataStreamWriter(
                protection, vm.image.npages, s.options.compression, out_buffers=PipelinedSink.ring_size()
            )
            s.enter(Event.BEGIN_PRECOPY)
            sender = PrecopySender(
                BuiltinGuestMemory(vm),
                writer,
                sink,
                s.options,
                on_round=self._on_round,
                with_digest=s.options.secure,
                on_transfer=self._on_transfer,
            )
            result = sender.run()  # leaves the guest paused
            sink.flush()
            s.report.counter_at_pause = vm.counter()
            s.enter(Event.PAUSE_GUEST)
            return result
        finally:
            try:
                data.shutdown(socket.SHUT_RDWR)  # wakes the sink's thread if it is stuck in sendall
            except OSError:
                pass
            sink.close()
            data.close()

    def manifest_fields(self, result: PrecopyResult) -> tuple[dict[str, object], dict[str, object]]:
        fields = {
            "image_digest": result.image_digest,
            "state_digest": result.state_digest,
            "pages_sent": result.pages_sent,
            "rounds": len(result.rounds),
            "wire_bytes": result.wire_bytes,
        }
        return fields, {"image_digest": result.image_digest, "state_digest": result.state_digest}

    def fill_report(self, result: PrecopyResult) -> None:
        report = self._session.report
        report.rounds = len(result.rounds)
        report.pages_sent = result.pages_sent
        report.bytes_sent = result.wire_bytes
        report.image_digest = result.image_digest or None
        report.stop_reason = result.stop_reason

    def resume(self, vm: BuiltinVM) -> bool:
        vm.set_throttle(0)  # auto-converge must not outlive the migration
        if vm.is_paused:
            vm.resume()
        return vm.is_alive

    def unclaim(self, vm: BuiltinVM) -> None:
        self._vms.unclaim(vm.name)

    def release(self, vm: BuiltinVM) -> None:
        self._vms.release_migrated(vm.name)

    def cleanup(self, vm: BuiltinVM) -> None:
        """Nothing left to close: the transfer closes its own stream."""

    def _on_round(self, report: RoundReport) -> None:
        s = self._session
        s.flight.check()  # a newly revoked destination or operator stops the rounds (the guest resumes here)
        s.report.round_reports.append(report)
        s.audit(
            Kinds.MIGRATION_ROUND,
            round=report.round,
            pages=report.pages_sent,
            bytes=report.bytes_sent,
            dirty_left=report.dirty_pages_left,
            decision=report.decision,
        )
        s.progress("round", report.to_dict())

    def _on_transfer(self, progress: TransferProgress) -> None:
        self._session.flight.check()  # ~10 times a second: a revocation stops the transfer at once
        self._session.progress(
            "transfer",
            {
                "round": progress.round,
                "pages_done": progress.pages_done,
                "pages_total": progress.pages_total,
                "wire_bytes": progress.wire_bytes,
                # What is left as far as we know: this round's unsent pages and the pages dirtied meanwhile.
                "remaining_bytes": (progress.pages_total - progress.pages_done + progress.dirty_pages) * PAGE_SIZE,
            },
        )


class BuiltinDestinationDriver:
    """A built-in guest: received into a fresh image, started from a standby process on Commit."""

    backend = BACKEND
    accept_audit: Mapping[str, object] = {}

    def __init__(self, session: DestinationSession, vms: BuiltinVmRegistry) -> None:
        self._session = session
        self._vms = vms
        self._image: GuestImage | None = None
        self._created_image = False  # only an image this migration created may be discarded by it
        self._standby: StandbyGuest | None = None

    @property
    def image_path(self) -> Path:
        return self._session.config.vm_dir / f"{self._session.hello.vm_name}.img"

    def admit(self) -> None:
        s, hello = self._session, self._session.hello
        if hello.backend != BACKEND:
            raise IncomingRefused(f"backend {hello.backend!r} is not supported by this agent")
        admit_hello(s)
        if self.image_path.exists() and not self._vms.has(hello.vm_name):
            # Never overwrite or delete an image we cannot account for: it may be someone's only copy.
            raise IncomingRefused(
                f"stale image: {self.image_path.name} already exists on {s.config.name} but no VM "
                f"{hello.vm_name!r} runs there (left over from an earlier migration; its agent removes it "
                "at restart if it is not the live copy)"
            )
        self._vms.reserve_incoming(hello.migration_id, hello.vm_name, hello.memory_bytes)

    def prepare(self) -> None:
        self._image = GuestImage.create_empty(self.image_path, self._session.hello.memory_bytes)
        self._created_image = True
        self._image.reserve()  # the memory is ours before we say yes
        self._standby = StandbyGuest(self._session.config.vm_dir, self._session.hello.vm_name)  # off the downtime path

    def take_stream(self) -> dict[str, object]:
        assert self._image is not None
        result = self._receive()
        manifest = self._verify_manifest(result)
        self._image.write_state(result.device_state or b"")
        return manifest

    def start_guest(self, manifest: Mapping[str, object]) -> tuple[int | None, object]:
        s, hello = self._session, self._session.hello
        assert self._image is not None and self._standby is not None
        counter_at_resume = self._image.counter
        self._image.close()
        self._image = None
        launched = self._standby.launch()
        self._standby = None
        s.lab_pause("launched")
        vm = self._vms.adopt_incoming(launched)
        s.lab_pause("adopted")
        self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
        return vm.pid, counter_at_resume

    def discard(self, reason: str) -> None:
        self._cancel_standby()
        if self._image is not None:
            self._image.close()
            self._image = None
        if self._created_image:
            self.image_path.unlink(missing_ok=True)

    def hold(self) -> None:
        """The received image stays, reserved; the resolver starts a guest from it or deletes it."""

    def release(self, prepared: bool) -> None:
        self._cancel_standby()  # never handed over (in doubt or failed)
        if not prepared:
            self._vms.unreserve_incoming(self._session.hello.migration_id, self._session.hello.vm_name)

    def _cancel_standby(self) -> None:
        """The standby guest process that was never handed the image goes (idempotent)."""
        if self._standby is not None:
            self._standby.cancel()
            self._standby = None

    def _receive(self) -> ReceiveResult:
        s, hello = self._session, self._session.hello
        assert self._image is not None
        protection, _ = stream_protections(s.channel, hello.secure, hello.nonce, s.nonce, hello.migration_id)
        data = s.context.sessions.wait(s.session_id, s.config.step_timeout_s, interrupt=s.stop_if_aborted)
        try:
            data.settimeout(s.config.step_timeout_s)  # a silent peer is a dead peer
            reader = DataStreamReader(protection, self._image.npages)
            digest = hello.image_digest if hello.secure else None
            receiver = ImageReceiver(self._image, reader, digest=digest)

            def read_into(view: memoryview) -> None:
                s.flight.check()  # a newly revoked source or operator: stop receiving at once
                recv_exactly_into(data, view)

            return receiver.run(read_into)
        finally:
            data.close()

    def _verify_manifest(self, result: ReceiveResult) -> dict[str, object]:
        s, hello = self._session, self._session.hello
        manifest, envelope = verify_manifest(s, {}, "expected")
        if hello.secure:
            if manifest.get("image_digest") != result.image_digest:
                signed = manifest.get("image_digest")
                raise DocumentError(f"image digest mismatch: received {result.image_digest}, source signed {signed}")
            if manifest.get("state_digest") != state_digest(result.device_state or b""):
                raise DocumentError("device state digest does not match the signed manifest")
        s.audit_after_promise(
            Kinds.MIGRATION_DIGEST, image_digest=result.image_digest, verified=hello.secure, manifest=envelope
        )
        return manifest


class BuiltinKeeper:
    """Settles built-in guests' migrations after a crash or a cut link (migration/recovery.py)."""

    backend = BACKEND

    def __init__(self, vms: BuiltinVmRegistry) -> None:
        self._vms = vms

    def can_settle(self, record: MigrationRecord) -> bool:
        return True  # the image and the registry's records are on disk: there is always something to decide

    def resume_source(self, record: MigrationRecord) -> bool:
        try:
            vm = self._vms.get(record.vm)
            if vm.is_paused:
                vm.resume()
            self._vms.unclaim(record.vm)
            return vm.is_alive
        except VmError as exc:
            log.error("could not resume %s: %s", record.vm, exc)
            return False

    def hold_source(self, record: MigrationRecord) -> None:
        try:
            self._vms.claim(record.vm)  # paused, in doubt: not available for another migration
        except VmError:
            pass

    def release_source(self, record: MigrationRecord) -> None:
        self._vms.release_migrated(record.vm)

    def running_destination(self, record: MigrationRecord) -> int | None:
        guest = self._vms.running_guest(record.vm)
        return None if guest is None else guest.pid

    def hold_destination(self, record: MigrationRecord) -> None:
        self._vms.reserve_incoming(record.id, record.vm, record.memory_bytes)

    def start_destination(self, record: MigrationRecord) -> int | None:
        guest = self._vms.running_guest(record.vm)  # it may have started before a crash
        if guest is None:
            guest = self._vms.start_incoming(record.vm, None)
        self._vms.unreserve_incoming(record.id, record.vm)
        return guest.pid

    def discard_destination(self, record: MigrationRecord) -> None:
        if self._vms.running_guest(record.vm) is None:  # never pull the image from under a guest
            self._vms.image_path(record.vm).unlink(missing_ok=True)
        self._vms.unreserve_incoming(record.id, record.vm)

    def handed_over(self, record: MigrationRecord) -> bool:
        return False  # sealift moves this guest itself: nothing switches over before the decision

    def remove_leftovers(self, record: MigrationRecord) -> None:
        """Nothing: without its image (can_settle) a received built-in guest left nothing behind."""
