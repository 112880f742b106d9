"""A migration's durable record moved only by the handover's table.

The store (host/store.py) keeps phases as text and knows no rule; these two
functions are the only writers of a record's phase: a new record starts in
its role's first phase, and every later change is an event that
phases.next_phase allows, written only if the record is still where the
table started from (compare-and-set), so two writers never overwrite each
other.
"""

from __future__ import annotations

from sealift.host.store import AgentStore
from sealift.migration.phases import INITIAL, Event, IllegalTransition, Phase, Role, decision_after, next_phase


def create(
    store: AgentStore, migration_id: str, vm: str, role: Role, peer: str, memory_bytes: int, backend: str
) -> None:
    store.create_migration(migration_id, vm, role.value, peer, INITIAL[role].value, memory_bytes, backend)


def transition(store: AgentStore, migration_id: str, event: Event, error: str | None = None) -> Phase:
    """Move a record by the table; its new phase. IllegalTransition, and nothing written, if the table
    does not allow `event` in the record's phase or the record changed meanwhile."""
    record = store.migration(migration_id)
    if record is None:
        raise KeyError(f"no migration {migration_id} in the store")
    role, before = Role(record.role), Phase(record.phase)
    after = next_phase(role, before, event)
    if not store.set_phase_if(migration_id, before.value, after.value, decision_after(role, before, after), error):
        current = store.migration(migration_id)
        assert current is not None  # read above; migration records are never deleted
        raise IllegalTransition(role, Phase(current.phase), event)
    return after
