"""Settling migrations a crash or a cut link left open: one routine for every backend.

The source's durable decision is the truth. After a restart (`recover`), a
source without a decision resumes its guest and aborts and a destination
that never promised discards what it received, unless a hypervisor that
migrates on its own (libvirt) had already handed the guest over: that is
then the decision (the source holds, the destination keeps the guest in
doubt). Everything undecided is held, paused and busy, for the resolver. The resolver (`Resolver`) asks the peer
about every undecided record: a destination that promised ("prepared") but
never heard Commit, a source that committed but never got the "running"
receipt. Until an answer comes, the VM stays paused on the source and
unstarted on the destination: never two copies, never none. Every move of a
record goes through the handover's table (phases.py); what a backend does
to its guest is its keeper's (drivers.py GuestKeeper).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from sealift.host.config import AgentConfig
from sealift.host.store import AgentStore, MigrationRecord
from sealift.host.transport import ControlChannel
from sealift.migration import records
from sealift.migration.drivers import GuestKeeper
from sealift.migration.phases import POSTCOPY, SOURCE_OPEN, UNSETTLED, Event, Phase, Role
from sealift.security.identity import HostIdentity
from sealift.wire.messages import Outcome, OutcomeQuery

log = logging.getLogger(__name__)

Audit = Callable[..., object]
OPEN_AT_RESTART = (*SOURCE_OPEN, Phase.HANDED_OVER, Phase.RECEIVING, *UNSETTLED, *POSTCOPY)


class Keepers:
    """Each backend's keeper, found by a record's backend (or, for a record from before that column, its guest)."""

    def __init__(self, keepers: Mapping[str, GuestKeeper], fallback: str, legacy_owner: Callable[[str], str]) -> None:
        self._keepers = dict(keepers)
        self._fallback = fallback
        self._legacy_owner = legacy_owner  # vm name -> backend, for records without one

    def for_record(self, record: MigrationRecord) -> GuestKeeper:
        backend = record.backend or self._legacy_owner(record.vm)
        return self._keepers.get(backend, self._keepers[self._fallback])


def recover(store: AgentStore, keepers: Keepers, audit: Audit) -> None:
    """After a restart: settle what the crash interrupted, each record on its own.

    An error in one is logged and audited and never stops the agent (the
    record is left for the resolver or an operator).
    """
    for record in store.migrations(limit=1000, phases=OPEN_AT_RESTART):
        try:
            _recover_one(store, keepers.for_record(record), record, audit)
        except Exception as exc:
            log.exception("recovery of migration %s (%s, %s) failed", record.id, record.vm, record.phase)
            audit(
                "migration.recovery_failed",
                migration_id=record.id,
                vm=record.vm,
                role=record.role,
                phase=record.phase,
                error=str(exc),
            )


def _recover_one(store: AgentStore, keeper: GuestKeeper, record: MigrationRecord, audit: Audit) -> None:
    present = keeper.can_settle(record)
    if record.phase in POSTCOPY:
        # Split between the hosts: hold whatever is here (busy, never resumed at the source, never discarded
        # at the destination), and let the backend resume the post-copy where it can (a QEMU destination:
        # it waits for its source to reconnect; docs/architecture.md).
        if present:
            (keeper.hold_source if record.role == Role.SOURCE else keeper.hold_destination)(record)
        records.transition(store, record.id, Event.AGENT_RESTARTED, error="agent restarted during post-copy")
        log.error("recovery: post-copy migration %s of %s was cut by the restart; held, paused", record.id, record.vm)
        audit("migration.postcopy_paused", migration_id=record.id, vm=record.vm, reason="agent restarted")
        resume = getattr(keeper, "resume_postcopy", None)  # only backends with a post-copy have it
        if present and resume is not None and resume(record, store.resume_of(record.id)):
            log.warning(
                "recovery: post-copy %s of %s resumes: %s",
                record.id,
                record.vm,
                "reconnecting to its destination" if record.role == Role.SOURCE else "waiting for its source",
            )
    elif record.phase in (*SOURCE_OPEN, Phase.RECEIVING) and keeper.handed_over(record):
        _recover_handed_over(store, keeper, record, audit, present)
    elif record.role == Role.SOURCE and record.phase in SOURCE_OPEN:
        # No commit decision was written, so the VM must run here.
        resumed = present and keeper.resume_source(record)
        records.transition(store, record.id, Event.AGENT_RESTARTED, error="source agent restarted before commit")
        log.warning(
            "recovery: %s %s after the interrupted migration %s",
            record.vm,
            "resumed" if resumed else "could NOT be resumed",
            record.id,
        )
    elif record.role == Role.DESTINATION and record.phase == Phase.RECEIVING:
        if present:
            keeper.discard_destination(record)  # never promised: the source still has the guest
        else:
            keeper.remove_leftovers(record)  # its guest died with the agent: what the migration made here goes
        records.transition(store, record.id, Event.AGENT_RESTARTED, error="destination agent restarted while receiving")
        log.warning("recovery: discarded the half-received %s (%s)", record.vm, record.id)
    elif not present:
        log.warning(
            "recovery: migration %s of %s is %s but its guest is gone; left for an operator",
            record.id,
            record.vm,
            record.phase,
        )
    elif record.role == Role.SOURCE:
        keeper.hold_source(record)  # paused, in doubt: not available for another migration
        records.transition(store, record.id, Event.AGENT_RESTARTED)
    else:
        _recover_destination(store, keeper, record, audit)


def _recover_handed_over(
    store: AgentStore, keeper: GuestKeeper, record: MigrationRecord, audit: Audit, present: bool
) -> None:
    """libvirt finished handing the guest over before this agent could record it: libvirt's word is the decision.

    The source's copy has quit, so the source holds (never resumes) and
    answers "committed"; the destination keeps the paused guest in doubt and
    the resolver starts it once the source says so. What the restarted
    destination cannot check any more (the carried streams' END records, the
    manifest) died with the agent: docs/security.md says what remains.
    """
    if record.role == Role.SOURCE:
        if present:  # shut off, reason "migrated"; a transient domain handed over is gone
            keeper.hold_source(record)
        records.transition(store, record.id, Event.HYPERVISOR_HANDED_OVER)  # the decision: "committed"
        records.transition(
            store,
            record.id,
            Event.AGENT_RESTARTED,
            error="source agent restarted after libvirt's switchover: the guest can only run at the destination",
        )
    else:
        keeper.hold_destination(record)
        records.transition(
            store,
            record.id,
            Event.HYPERVISOR_HANDED_OVER,
            error="destination agent restarted after libvirt's switchover; its streams' END and the manifest "
            "could not be checked any more",
        )
    log.warning("recovery: libvirt had handed %s over (migration %s, %s); in doubt", record.vm, record.id, record.role)
    audit(
        "migration.recovered",
        migration_id=record.id,
        vm=record.vm,
        role=record.role,
        phase="in-doubt",
        handed_over_by="libvirt",
    )


def _recover_destination(store: AgentStore, keeper: GuestKeeper, record: MigrationRecord, audit: Audit) -> None:
    pid = keeper.running_destination(record)
    if pid is None:
        keeper.hold_destination(record)  # prepared (ask the source) or committed (start it): the resolver finishes
        records.transition(store, record.id, Event.AGENT_RESTARTED)
    elif record.phase == Phase.COMMITTED:
        # Started for this migration just before the crash: the handover is done.
        log.info("recovery: migration %s: %s runs here (pid %d); phase running", record.id, record.vm, pid)
        records.transition(store, record.id, Event.START_GUEST)
        audit("migration.recovered", migration_id=record.id, vm=record.vm, pid=pid, phase="running")
    else:  # a guest is only ever started after "committed" is recorded: leave it to an operator
        log.error(
            "recovery: migration %s is %s but %s already runs here; left in doubt", record.id, record.phase, record.vm
        )


class Resolver:
    """Asks the peer about every undecided migration, every `resolve_interval_s`, and applies its answer."""

    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        keepers: Keepers,
        active: set[str],
        active_lock: threading.Lock,
        audit: Audit | None = None,
    ) -> None:
        self._config = config
        self._identity = identity
        self._store = store
        self._keepers = keepers
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
        for record in self._store.migrations(limit=1000, phases=UNSETTLED):
            with self._active_lock:
                if record.id in self._active:
                    continue
            keeper = self._keepers.for_record(record)
            if not keeper.can_settle(record):
                continue  # its guest is gone: nothing here to resume, start or release
            try:
                self._resolve(record, keeper)
            except Exception as exc:  # noqa: BLE001 - one record must not stop the others; retried next pass
                log.error("migration %s: settling %s failed: %s", record.id, record.vm, exc)

    def _resolve(self, record: MigrationRecord, keeper: GuestKeeper) -> None:
        if record.role == Role.DESTINATION and record.phase == Phase.COMMITTED:
            self._start_destination(record, keeper)  # our own record says the commit came: start it
            return
        answer = self._ask(record)
        if answer == "unknown":
            return
        if record.role == Role.SOURCE:
            self._settle_source(record, keeper, answer)
        elif answer == "committed":
            records.transition(self._store, record.id, Event.RECEIVE_COMMIT)
            self._start_destination(record, keeper)
        else:
            log.info("migration %s: %s aborted; discarding the received %s", record.id, record.peer, record.vm)
            keeper.discard_destination(record)
            records.transition(self._store, record.id, Event.PEER_ABORTED, error=f"{record.peer} aborted")
            self._audit_resolved(record, "destination", "aborted", "discarded the received guest")

    def _settle_source(self, record: MigrationRecord, keeper: GuestKeeper, answer: str) -> None:
        if answer == "committed":
            log.info(
                "migration %s: %s confirms %s runs there; releasing our paused copy", record.id, record.peer, record.vm
            )
            keeper.release_source(record)
            records.transition(self._store, record.id, Event.CONFIRM_RUNNING)
            self._audit_resolved(record, "source", "committed", "released the paused source copy")
            return
        # We committed, but the destination never ran the guest: it cannot run there, so it must run here.
        if keeper.handed_over(record):  # ... unless libvirt already handed it over: our copy has quit for good
            log.error(
                "migration %s: %s refuses to run %s, which libvirt handed over (our copy has quit): nothing to "
                "resume here; it stays paused there for the operator",
                record.id,
                record.peer,
                record.vm,
            )
            records.transition(self._store, record.id, Event.PEER_ABORTED, error=f"{record.peer} refused the guest")
            self._audit_resolved(record, "source", "aborted", "nothing resumed: libvirt had handed the guest over")
            return
        log.error("migration %s: committed but %s reports abort; resuming %s here", record.id, record.peer, record.vm)
        resumed = keeper.resume_source(record)
        records.transition(
            self._store, record.id, Event.PEER_ABORTED, error=f"{record.peer} reported abort after commit"
        )
        self._audit_resolved(
            record, "source", "aborted", "resumed the source copy" if resumed else "could not resume the source copy"
        )

    def _start_destination(self, record: MigrationRecord, keeper: GuestKeeper) -> None:
        log.info("migration %s: %s decided commit; starting %s here", record.id, record.peer, record.vm)
        pid = keeper.start_destination(record)
        records.transition(self._store, record.id, Event.START_GUEST)
        self._audit_resolved(record, "destination", "committed", "started the received guest", pid=pid)

    def _audit_resolved(self, record: MigrationRecord, role: str, outcome: str, action: str, **extra: object) -> None:
        """The audit entry for a migration the resolver settled: what it decided and what it did."""
        self._audit(
            "migration.resolved",
            migration_id=record.id,
            vm=record.vm,
            role=role,
            outcome=outcome,
            action=action,
            **extra,
        )

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
