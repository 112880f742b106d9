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

from sealift.agent.config import AgentConfig
from sealift.agent.store import AgentStore, MigrationRecord
from sealift.agent.transport import ControlChannel
from sealift.agent.vms import VmRegistry
from sealift.backends.builtin.vm import VmError
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
    ) -> None:
        self._config = config
        self._identity = identity
        self._store = store
        self._vms = vms
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
        for record in self._store.migrations(limit=1000, phases=("prepared", "committed")):
            with self._active_lock:
                if record.id in self._active:
                    continue
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
