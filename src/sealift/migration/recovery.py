"""Settling migrations left in doubt by a crash or a cut link.

The source's durable decision is the truth. A destination that promised
("prepared") but never heard Commit asks the source; a source that committed
but never got the "running" receipt asks the destination. Until an answer
comes, the VM stays paused on the source and unstarted on the destination:
never two copies, never none.
"""

from __future__ import annotations

import logging
import threading

from collections.abc import Callable

from sealift.agent.config import AgentConfig
from sealift.backends.qemu.migration import resume_source
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.agent.store import IN_DOUBT, AgentStore, MigrationRecord
from sealift.agent.transport import ControlChannel
from sealift.backends.builtin.registry import VmRegistry
from sealift.backends.builtin.vm import VmError
from sealift.backends.qemu.vm import QemuError
from sealift.security.identity import HostIdentity
from sealift.wire.messages import Outcome, OutcomeQuery

log = logging.getLogger(__name__)


def outcome_for(record: MigrationRecord | None, active: bool) -> str:
    """What this host knows of a migration, as an answer to OutcomeQuery."""
    if record is None or active:
        return "unknown"
    if record.role == "source":
        if record.decision == "committed":
            return "committed"
        return "aborted" if record.phase == "aborted" else "unknown"
    if record.phase == "running":
        return "committed"
    return "aborted" if record.phase == "aborted" else "unknown"


class Resolver:
    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        vms: VmRegistry,
        active: set[str],
        active_lock: threading.Lock,
        qemu_vms: QemuVmRegistry | None = None,
        audit: Callable[..., object] | None = None,
    ) -> None:
        self._config = config
        self._identity = identity
        self._store = store
        self._vms = vms
        self._qemu_vms = qemu_vms
        self._audit = audit or (lambda kind, **fields: None)
        self._active = active
        self._active_lock = active_lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resolver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._config.resolve_interval_s):
            try:
                self.resolve_once()
            except Exception:
                log.exception("resolver pass failed")

    def resolve_once(self) -> None:
        for record in self._store.migrations(limit=1000, phases=("prepared", "committed", IN_DOUBT)):
            with self._active_lock:
                if record.id in self._active:
                    continue
            if self._qemu_vms is not None and self._qemu_vms.has(record.vm):
                self._resolve_qemu(record, self._qemu_vms)
                continue
            if record.phase == IN_DOUBT:
                continue  # a QEMU guest whose process is gone: nothing here to resume or release
            if record.role == "destination" and record.phase == "committed":
                self._start_on_destination(record)
                continue
            answer = self._ask(record)
            if answer == "committed":
                self._apply_commit(record)
            elif answer == "aborted":
                self._apply_abort(record)

    def _ask(self, record: MigrationRecord) -> str:
        try:
            address = self._config.peer_address(record.peer)
            channel = ControlChannel.connect(
                address, self._identity, record.peer, self._identity is not None, self._config.handshake_timeout_s
            )
        except Exception as exc:
            log.info("cannot reach %s about migration %s yet: %s", record.peer, record.id, exc)
            return "unknown"
        try:
            channel.send(OutcomeQuery(record.id))
            reply = channel.recv(self._config.step_timeout_s)
            assert isinstance(reply, Outcome)
            return reply.outcome
        except Exception as exc:
            log.info("no outcome for %s from %s yet: %s", record.id, record.peer, exc)
            return "unknown"
        finally:
            channel.close()

    def _apply_commit(self, record: MigrationRecord) -> None:
        if record.role == "source":
            log.info("migration %s: %s confirms %s runs there; releasing our copy", record.id, record.peer, record.vm)
            self._vms.release_migrated(record.vm)
            self._store.set_phase(record.id, "completed")
        else:
            self._store.set_phase(record.id, "committed")
            self._start_on_destination(record)

    def _start_on_destination(self, record: MigrationRecord) -> None:
        if self._vms.running_guest(record.vm) is None:  # it may have started before a crash
            log.info("migration %s: %s decided commit; starting %s here", record.id, record.peer, record.vm)
            self._vms.start_incoming(record.vm, None)
        self._vms.unreserve_incoming(record.id, record.vm)
        self._store.set_phase(record.id, "running")

    def _apply_abort(self, record: MigrationRecord) -> None:
        if record.role == "destination":
            log.info("migration %s: %s aborted; discarding the received image of %s", record.id, record.peer, record.vm)
            if self._vms.running_guest(record.vm) is None:  # never pull the image from under a guest
                self._vms.image_path(record.vm).unlink(missing_ok=True)
            self._vms.unreserve_incoming(record.id, record.vm)
            self._store.set_phase(record.id, "aborted")
            return
        # We committed but the destination says it never ran the VM: it cannot
        # be running there, so it must run here.
        log.error("migration %s: committed but %s reports abort; resuming %s here", record.id, record.peer, record.vm)
        try:
            vm = self._vms.get(record.vm)
            vm.resume()
            self._vms.unclaim(record.vm)
        except VmError as exc:
            log.error("could not resume %s: %s", record.vm, exc)
        self._store.set_phase(record.id, "aborted", error=f"{record.peer} reported abort after commit")

    # -- QEMU guests ------------------------------------------------------------------
    #
    # The same rules with QEMU's states: the source's guest waits in "postmigrate"
    # (paused, its memory intact), the destination's in "paused" after the stream.

    def _resolve_qemu(self, record: MigrationRecord, qemu_vms: QemuVmRegistry) -> None:
        if record.role == "destination" and record.phase == "committed":
            self._start_qemu_destination(record, qemu_vms)  # our own decision record says start
            return
        answer = self._ask(record)
        if answer == "unknown":
            return
        try:
            if record.role == "source":
                self._settle_qemu_source(record, qemu_vms, answer)
            elif answer == "committed":
                self._start_qemu_destination(record, qemu_vms)
            else:
                self._discard_qemu_destination(record, qemu_vms)
        except QemuError as exc:
            log.error("migration %s: settling QEMU guest %s failed: %s", record.id, record.vm, exc)

    def _settle_qemu_source(self, record: MigrationRecord, qemu_vms: QemuVmRegistry, answer: str) -> None:
        if answer == "committed":
            log.info("migration %s: %s confirms %s runs there; releasing our paused copy", record.id, record.peer,
                     record.vm)  # fmt: skip
            qemu_vms.release_migrated(record.vm)
            self._store.set_phase(record.id, "completed")
            self._audit("migration.resolved", migration_id=record.id, vm=record.vm, role="source", outcome="committed",
                        action="released the paused source copy")  # fmt: skip
            return
        # We committed, but the destination never ran the guest: it must run here.
        log.error("migration %s: committed but %s reports abort; resuming %s here", record.id, record.peer, record.vm)
        resumed = resume_source(qemu_vms.get(record.vm))
        qemu_vms.unclaim(record.vm)
        self._store.set_phase(record.id, "aborted", error=f"{record.peer} reported abort after commit")
        self._audit("migration.resolved", migration_id=record.id, vm=record.vm, role="source", outcome="aborted",
                    action="resumed the source copy" if resumed else "could not resume the source copy")  # fmt: skip

    def _start_qemu_destination(self, record: MigrationRecord, qemu_vms: QemuVmRegistry) -> None:
        vm = qemu_vms.get(record.vm)
        self._store.set_phase(record.id, "committed")
        if vm.status() != "running":
            log.info("migration %s: %s decided commit; starting QEMU guest %s here", record.id, record.peer, record.vm)
            vm.resume()
        qemu_vms.unclaim(record.vm)
        self._store.set_phase(record.id, "running")
        self._audit("migration.resolved", migration_id=record.id, vm=record.vm, role="destination",
                    outcome="committed", action="started the received guest", pid=vm.pid)  # fmt: skip

    def _discard_qemu_destination(self, record: MigrationRecord, qemu_vms: QemuVmRegistry) -> None:
        log.info("migration %s: %s aborted; discarding the received QEMU guest %s", record.id, record.peer, record.vm)
        qemu_vms.release_migrated(record.vm)
        self._store.set_phase(record.id, "aborted", error=f"{record.peer} aborted")
        self._audit("migration.resolved", migration_id=record.id, vm=record.vm, role="destination", outcome="aborted",
                    action="discarded the received guest")  # fmt: skip
