"""The handover as a state machine: every rule of a migration's phase in one table.

A migration has two records, one per host: the source's and the
destination's. Each moves through the phases of its role only by the events
in `TRANSITIONS`; anything else is a bug and raises `IllegalTransition`
before a byte is written. The coordinators, the resolver and the recovery
after a restart all go through `next_phase` (via `AgentStore.transition`),
so this table is the whole truth about where a migration can go.

The safety rule the table encodes: the source's durable commit decision
(`DECIDE_COMMIT`) is the point of no return. Before it, any failure aborts
and the guest runs on at the source. After it, a failure leaves the record
IN_DOUBT and the guest paused on both hosts until the peers agree where it
runs (the resolver asks). A hypervisor that migrates on its own (libvirt)
passes its own point of no return first: once it has handed the guest
over (the source's copy has quit), the source records that as its decision
(HYPERVISOR_HANDED_OVER, phase HANDED_OVER) before anything else can fail,
and never aborts or resumes that migration afterwards. A destination starts
its guest only once it holds a commit (its own COMMITTED record), so there
is never more than one copy.

Sans-IO: no store, socket or process here; tests drive every phase x event.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from sealift.errors import SealiftError


class Role(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(enum.StrEnum):
    """A record's phase; the values are what the store and `sealift migrations` show."""

    # source
    STARTED = "started"  # order checked, VM claimed, nothing sent yet
    PRECOPY = "precopy"  # memory flows while the guest runs
    STOP_AND_COPY = "stop-and-copy"  # the guest is paused; the last state flows
    HANDED_OVER = "handed-over"  # libvirt switched over: our copy quit, the guest waits paused there (decided)
    COMPLETED = "completed"  # the destination's guest runs; our copy is released
    # destination
    RECEIVING = "receiving"  # accepted; the stream comes in
    PREPARED = "prepared"  # the stream verified against the signed manifest: our promise
    RUNNING = "running"  # the guest runs here
    # both roles
    COMMITTED = "committed"  # source: the durable decision; destination: the commit heard
    IN_DOUBT = "in-doubt"  # a failure after the promise or the decision: ask the peer
    ABORTED = "aborted"  # the migration is off; the guest runs (or stays) at the source
    # post-copy (QEMU guests): the guest runs at the destination while its pages still come from the source
    POSTCOPY_ACTIVE = "postcopy-active"  # source: switched (decided); destination: the guest runs here
    POSTCOPY_PAUSED = "postcopy-paused"  # the link or an agent failed: both QEMUs wait, neither copy complete
    POSTCOPY_RECOVERING = "postcopy-recovering"  # a fresh channel is being set up to resume the page flow


class Event(enum.StrEnum):
    BEGIN_PRECOPY = "begin-precopy"  # source: the first page leaves
    PAUSE_GUEST = "pause-guest"  # source: the guest stops for its last state
    DECIDE_COMMIT = "decide-commit"  # source: the point of no return, on disk before Commit is sent
    # libvirt's own switchover completed (migrateToURI3 succeeded; the source domain is shut off, reason
    # "migrated"): source: the decision, on disk before anything else; destination: the guest is here,
    # paused, and the handover was cut before the promise: only the source's decision settles it
    HYPERVISOR_HANDED_OVER = "hypervisor-handed-over"
    CONFIRM_RUNNING = "confirm-running"  # source: the running receipt, or the peer says it runs there
    STREAM_VERIFIED = "stream-verified"  # destination: image and manifest agree; promise ("prepared")
    RECEIVE_COMMIT = "receive-commit"  # destination: Commit came, or the source says it committed
    START_GUEST = "start-guest"  # destination: the guest runs here
    FAIL = "fail"  # anything went wrong during the handover
    PEER_ABORTED = "peer-aborted"  # the peer, asked later, says the migration was aborted
    AGENT_RESTARTED = "agent-restarted"  # this agent starts again with the record open
    DECIDE_POSTCOPY = "decide-postcopy"  # source: the point of no return of post-copy, on disk before the switch
    RUN_POSTCOPY = "run-postcopy"  # destination: the guest runs here, its missing pages fetched on demand
    POSTCOPY_DONE = "postcopy-done"  # destination: every page arrived and the stream digest matches
    BEGIN_RECOVERY = "begin-recovery"  # either: a fresh authenticated channel to resume a paused post-copy
    RESUME_POSTCOPY = "resume-postcopy"  # either: the page flow runs again over the fresh channel


class IllegalTransition(SealiftError):
    """An event that the handover's rules do not allow in this phase: a bug, never a peer's doing."""

    code = "illegal_transition"

    def __init__(self, role: Role, phase: Phase, event: Event) -> None:
        allowed = ", ".join(sorted(e.value for e in events_from(role, phase))) or "none (final phase)"
        super().__init__(
            f"{role.value} migration in phase {phase.value!r} cannot take {event.value!r} (allowed: {allowed})"
        )
        self.role, self.phase, self.event = role, phase, event


S, D, P, E = Role.SOURCE, Role.DESTINATION, Phase, Event

# (role, phase, event) -> next phase. Every rule of the handover; nothing else is allowed.
TRANSITIONS: dict[tuple[Role, Phase, Event], Phase] = {
    # -- source: a failure aborts until the decision is on disk --------------------------------
    (S, P.STARTED, E.BEGIN_PRECOPY): P.PRECOPY,
    (S, P.STARTED, E.FAIL): P.ABORTED,
    (S, P.STARTED, E.AGENT_RESTARTED): P.ABORTED,
    (S, P.PRECOPY, E.PAUSE_GUEST): P.STOP_AND_COPY,
    (S, P.PRECOPY, E.DECIDE_COMMIT): P.COMMITTED,  # QEMU can finish before we see it pause
    (S, P.PRECOPY, E.FAIL): P.ABORTED,
    (S, P.PRECOPY, E.AGENT_RESTARTED): P.ABORTED,
    (S, P.STOP_AND_COPY, E.DECIDE_COMMIT): P.COMMITTED,
    (S, P.STOP_AND_COPY, E.FAIL): P.ABORTED,
    (S, P.STOP_AND_COPY, E.AGENT_RESTARTED): P.ABORTED,
    # -- source (libvirt): the hypervisor's switchover is the point of no return: its copy has quit --
    (S, P.PRECOPY, E.HYPERVISOR_HANDED_OVER): P.HANDED_OVER,
    (S, P.HANDED_OVER, E.DECIDE_COMMIT): P.COMMITTED,  # the signed steps went through: Commit goes
    (S, P.HANDED_OVER, E.FAIL): P.IN_DOUBT,  # never aborted: the guest can only run at the destination
    (S, P.HANDED_OVER, E.AGENT_RESTARTED): P.IN_DOUBT,
    # -- source: after the decision only the destination's word settles it ----------------------
    (S, P.COMMITTED, E.CONFIRM_RUNNING): P.COMPLETED,
    (S, P.COMMITTED, E.FAIL): P.IN_DOUBT,
    (S, P.COMMITTED, E.PEER_ABORTED): P.ABORTED,  # it never ran there: it resumes here
    (S, P.COMMITTED, E.AGENT_RESTARTED): P.COMMITTED,  # held, paused, for the resolver
    (S, P.IN_DOUBT, E.CONFIRM_RUNNING): P.COMPLETED,
    (S, P.IN_DOUBT, E.PEER_ABORTED): P.ABORTED,
    (S, P.IN_DOUBT, E.AGENT_RESTARTED): P.IN_DOUBT,
    # -- destination: nothing is promised until the stream is verified ---------------------------
    (D, P.RECEIVING, E.STREAM_VERIFIED): P.PREPARED,
    (D, P.RECEIVING, E.FAIL): P.ABORTED,
    (D, P.RECEIVING, E.AGENT_RESTARTED): P.ABORTED,
    (D, P.RECEIVING, E.HYPERVISOR_HANDED_OVER): P.IN_DOUBT,  # libvirt's guest is here, cut before the promise
    # -- destination: after the promise, only the source's decision settles it -------------------
    (D, P.PREPARED, E.RECEIVE_COMMIT): P.COMMITTED,
    (D, P.PREPARED, E.FAIL): P.IN_DOUBT,
    (D, P.PREPARED, E.PEER_ABORTED): P.ABORTED,
    (D, P.PREPARED, E.AGENT_RESTARTED): P.PREPARED,  # held for the resolver
    (D, P.IN_DOUBT, E.RECEIVE_COMMIT): P.COMMITTED,
    (D, P.IN_DOUBT, E.PEER_ABORTED): P.ABORTED,
    (D, P.IN_DOUBT, E.AGENT_RESTARTED): P.IN_DOUBT,
    # -- destination: a commit heard is ours to finish: the guest starts, whatever fails ---------
    (D, P.COMMITTED, E.START_GUEST): P.RUNNING,
    (D, P.COMMITTED, E.FAIL): P.COMMITTED,  # the resolver starts it
    (D, P.COMMITTED, E.AGENT_RESTARTED): P.COMMITTED,
    # -- post-copy (QEMU): the switch is the decision; from then on the source never runs the guest again,
    # and a failure only pauses the page flow until a fresh channel resumes it -------------------
    (S, P.PRECOPY, E.DECIDE_POSTCOPY): P.POSTCOPY_ACTIVE,
    (S, P.POSTCOPY_ACTIVE, E.CONFIRM_RUNNING): P.COMPLETED,
    (D, P.COMMITTED, E.RUN_POSTCOPY): P.POSTCOPY_ACTIVE,
    (D, P.POSTCOPY_ACTIVE, E.POSTCOPY_DONE): P.RUNNING,
    **{
        (role, phase, event): P.POSTCOPY_PAUSED
        for role in (S, D)
        for phase in (P.POSTCOPY_ACTIVE, P.POSTCOPY_PAUSED, P.POSTCOPY_RECOVERING)
        for event in (E.FAIL, E.AGENT_RESTARTED)
    },
    **{(role, P.POSTCOPY_PAUSED, E.BEGIN_RECOVERY): P.POSTCOPY_RECOVERING for role in (S, D)},
    **{(role, P.POSTCOPY_RECOVERING, E.RESUME_POSTCOPY): P.POSTCOPY_ACTIVE for role in (S, D)},
}

INITIAL: dict[Role, Phase] = {Role.SOURCE: Phase.STARTED, Role.DESTINATION: Phase.RECEIVING}
SOURCE_OPEN = frozenset({Phase.STARTED, Phase.PRECOPY, Phase.STOP_AND_COPY})  # no decision yet
POSTCOPY = (Phase.POSTCOPY_ACTIVE, Phase.POSTCOPY_PAUSED, Phase.POSTCOPY_RECOVERING)  # split between two hosts
FINAL = frozenset({Phase.COMPLETED, Phase.RUNNING, Phase.ABORTED})
UNSETTLED = (Phase.PREPARED, Phase.COMMITTED, Phase.IN_DOUBT)  # what the resolver settles with the peer


def next_phase(role: Role, phase: Phase, event: Event) -> Phase:
    """The phase `event` leads to; IllegalTransition if the rules do not allow it."""
    try:
        return TRANSITIONS[(role, phase, event)]
    except KeyError:
        raise IllegalTransition(role, phase, event) from None


def events_from(role: Role, phase: Phase) -> Iterator[Event]:
    return (event for (r, p, event) in TRANSITIONS if r == role and p == phase)


def phases_of(role: Role) -> list[Phase]:
    """The phases a record of this role can be in, in table order."""
    seen: list[Phase] = [INITIAL[role]]
    for (r, phase, _event), after in TRANSITIONS.items():
        for candidate in (phase, after):
            if r == role and candidate not in seen:
                seen.append(candidate)
    return seen


def decision_after(role: Role, before: Phase, after: Phase) -> str | None:
    """The source's durable decision a transition records ("committed" | "aborted"), if any."""
    if role != Role.SOURCE:
        return None
    if after in (Phase.COMMITTED, Phase.POSTCOPY_ACTIVE, Phase.HANDED_OVER) and before in SOURCE_OPEN:
        return "committed"
    if after == Phase.ABORTED and before in SOURCE_OPEN:
        return "aborted"
    return None


def outcome_for(role: Role | str, phase: Phase | str, decision: str | None) -> str:
    """What a host can tell its peer of a migration it knows (OutcomeQuery): committed | aborted | unknown.

    `role` and `phase` may be the store's text: compared by value, never by identity.
    """
    if role == Role.SOURCE:
        if decision == "committed":
            return "committed"
        return "aborted" if phase == Phase.ABORTED else "unknown"
    if phase == Phase.RUNNING:
        return "committed"
    return "aborted" if phase == Phase.ABORTED else "unknown"


def state_diagram() -> str:
    """The table as a Mermaid state diagram, one per role (docs/architecture.md embeds it; a test compares)."""
    lines = ["```mermaid", "stateDiagram-v2"]
    for role in Role:
        lines.append(f"    state {role.value} {{")
        for phase in phases_of(role):
            lines.append(f'        state "{phase.value}" as {_node(role, phase)}')
        lines.append(f"        [*] --> {_node(role, INITIAL[role])}")
        for (r, phase, event), after in TRANSITIONS.items():
            if r == role:
                lines.append(f"        {_node(role, phase)} --> {_node(role, after)}: {event.value}")
        for phase in phases_of(role):
            if phase in FINAL:
                lines.append(f"        {_node(role, phase)} --> [*]")
        lines.append("    }")
    lines.append("```")
    return "\n".join(lines)


def _node(role: Role, phase: Phase) -> str:
    # Mermaid ids cannot hold '-', and the two roles' COMMITTED/IN_DOUBT/ABORTED are different states.
    return f"{role.value[0]}_{phase.value.replace('-', '_')}"
