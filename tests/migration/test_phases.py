"""The handover's state machine, driven without sockets or processes: every phase x event of both roles."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from sealift.host.store import AgentStore
from sealift.migration import records
from sealift.migration.phases import (
    FINAL,
    INITIAL,
    SOURCE_OPEN,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Phase,
    Role,
    decision_after,
    next_phase,
    outcome_for,
    phases_of,
    state_diagram,
)

S, D = Role.SOURCE, Role.DESTINATION

# The whole table written out again, row by row, as the rules read in docs/architecture.md.
# A change to the table must change this too: nothing moves a record by accident.
EXPECTED = {
    (S, Phase.STARTED): {
        Event.BEGIN_PRECOPY: Phase.PRECOPY,
        Event.FAIL: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.ABORTED,
    },
    (S, Phase.PRECOPY): {
        Event.PAUSE_GUEST: Phase.STOP_AND_COPY,
        Event.DECIDE_COMMIT: Phase.COMMITTED,
        Event.DECIDE_POSTCOPY: Phase.POSTCOPY_ACTIVE,
        Event.HYPERVISOR_HANDED_OVER: Phase.HANDED_OVER,
        Event.FAIL: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.ABORTED,
    },
    # libvirt: its switchover done, the source's copy has quit: decided, never aborted by a failure
    (S, Phase.HANDED_OVER): {
        Event.DECIDE_COMMIT: Phase.COMMITTED,
        Event.FAIL: Phase.IN_DOUBT,
        Event.AGENT_RESTARTED: Phase.IN_DOUBT,
    },
    (S, Phase.STOP_AND_COPY): {
        Event.DECIDE_COMMIT: Phase.COMMITTED,
        Event.FAIL: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.ABORTED,
    },
    (S, Phase.COMMITTED): {
        Event.CONFIRM_RUNNING: Phase.COMPLETED,
        Event.FAIL: Phase.IN_DOUBT,
        Event.PEER_ABORTED: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.COMMITTED,
    },
    (S, Phase.IN_DOUBT): {
        Event.CONFIRM_RUNNING: Phase.COMPLETED,
        Event.PEER_ABORTED: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.IN_DOUBT,
    },
    (S, Phase.COMPLETED): {},
    (S, Phase.ABORTED): {},
    (D, Phase.RECEIVING): {
        Event.STREAM_VERIFIED: Phase.PREPARED,
        Event.HYPERVISOR_HANDED_OVER: Phase.IN_DOUBT,
        Event.FAIL: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.ABORTED,
    },
    (D, Phase.PREPARED): {
        Event.RECEIVE_COMMIT: Phase.COMMITTED,
        Event.FAIL: Phase.IN_DOUBT,
        Event.PEER_ABORTED: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.PREPARED,
    },
    (D, Phase.IN_DOUBT): {
        Event.RECEIVE_COMMIT: Phase.COMMITTED,
        Event.PEER_ABORTED: Phase.ABORTED,
        Event.AGENT_RESTARTED: Phase.IN_DOUBT,
    },
    (D, Phase.COMMITTED): {
        Event.START_GUEST: Phase.RUNNING,
        Event.RUN_POSTCOPY: Phase.POSTCOPY_ACTIVE,
        Event.FAIL: Phase.COMMITTED,
        Event.AGENT_RESTARTED: Phase.COMMITTED,
    },
    (D, Phase.RUNNING): {},
    (D, Phase.ABORTED): {},
    # post-copy: after the switch a failure pauses the page flow; nothing aborts, nothing resumes the source
    (S, Phase.POSTCOPY_ACTIVE): {
        Event.CONFIRM_RUNNING: Phase.COMPLETED,
        Event.FAIL: Phase.POSTCOPY_PAUSED,
        Event.AGENT_RESTARTED: Phase.POSTCOPY_PAUSED,
    },
    (D, Phase.POSTCOPY_ACTIVE): {
        Event.POSTCOPY_DONE: Phase.RUNNING,
        Event.FAIL: Phase.POSTCOPY_PAUSED,
        Event.AGENT_RESTARTED: Phase.POSTCOPY_PAUSED,
    },
    **{
        (role, Phase.POSTCOPY_PAUSED): {
            Event.BEGIN_RECOVERY: Phase.POSTCOPY_RECOVERING,
            Event.FAIL: Phase.POSTCOPY_PAUSED,
            Event.AGENT_RESTARTED: Phase.POSTCOPY_PAUSED,
        }
        for role in (S, D)
    },
    **{
        (role, Phase.POSTCOPY_RECOVERING): {
            Event.RESUME_POSTCOPY: Phase.POSTCOPY_ACTIVE,
            Event.FAIL: Phase.POSTCOPY_PAUSED,
            Event.AGENT_RESTARTED: Phase.POSTCOPY_PAUSED,
        }
        for role in (S, D)
    },
}


@pytest.mark.parametrize(("role", "phase", "event"), list(itertools.product(Role, Phase, Event)))
def test_every_phase_and_event_of_both_roles(role: Role, phase: Phase, event: Event) -> None:
    allowed = EXPECTED.get((role, phase), {})
    if event in allowed:
        assert next_phase(role, phase, event) is allowed[event]
    else:
        with pytest.raises(IllegalTransition, match=re.escape(f"cannot take {event.value!r}")):
            next_phase(role, phase, event)


def test_the_table_has_no_rule_the_expectation_lacks() -> None:
    written = {(r, p, e): after for (r, p), row in EXPECTED.items() for e, after in row.items()}
    assert TRANSITIONS == written


def test_each_role_has_its_own_phases() -> None:
    assert set(phases_of(S)) == {p for (r, p) in EXPECTED if r is S}
    assert set(phases_of(D)) == {p for (r, p) in EXPECTED if r is D}
    assert INITIAL == {S: Phase.STARTED, D: Phase.RECEIVING}


def test_final_phases_take_no_event_but_every_other_phase_can_fail_or_restart() -> None:
    for role, phase in EXPECTED:
        events = set(EXPECTED[(role, phase)])
        if phase in FINAL:
            assert events == set()
        else:
            assert Event.AGENT_RESTARTED in events  # a restart never finds a record it cannot place
            assert events & {Event.FAIL, Event.PEER_ABORTED}


def test_no_failure_before_the_decision_leaves_the_source_undecided() -> None:
    for phase in SOURCE_OPEN:
        assert next_phase(S, phase, Event.FAIL) is Phase.ABORTED
        assert next_phase(S, phase, Event.AGENT_RESTARTED) is Phase.ABORTED
    # ... and after it, no failure aborts by itself: only the peer's word does.
    for phase in (Phase.COMMITTED, Phase.IN_DOUBT):
        assert (
            next_phase(S, phase, Event.FAIL if phase is Phase.COMMITTED else Event.AGENT_RESTARTED) is not Phase.ABORTED
        )


def test_the_destination_starts_a_guest_only_from_a_commit() -> None:
    sources = {p for (r, p, e), after in TRANSITIONS.items() if r is D and after is Phase.RUNNING}
    assert sources == {Phase.COMMITTED, Phase.POSTCOPY_ACTIVE}
    # a post-copy guest runs here only after the commit was heard (or on a resumed post-copy)
    postcopy_from = {
        p for (r, p, e), after in TRANSITIONS.items() if r is D and after is Phase.POSTCOPY_ACTIVE and p is not after
    }
    assert postcopy_from == {Phase.COMMITTED, Phase.POSTCOPY_RECOVERING}
    commit_from = {
        p for (r, p, e), after in TRANSITIONS.items() if r is D and after is Phase.COMMITTED and p is not after
    }
    assert commit_from == {Phase.PREPARED, Phase.IN_DOUBT}
    assert all(
        e is Event.RECEIVE_COMMIT
        for (r, p, e), after in TRANSITIONS.items()
        if r is D and after is Phase.COMMITTED and p is not after
    )


def test_after_the_post_copy_switch_the_source_never_aborts_or_resumes() -> None:
    """The switch is the point of no return: from the post-copy phases no event leads back to the source's guest."""
    for role in (S, D):
        for phase in (Phase.POSTCOPY_ACTIVE, Phase.POSTCOPY_PAUSED, Phase.POSTCOPY_RECOVERING):
            reachable = {after for (r, p, e), after in TRANSITIONS.items() if r is role and p is phase}
            assert Phase.ABORTED not in reachable
            assert Phase.IN_DOUBT not in reachable  # the resolver would settle (and so could resume) an in-doubt one
    # only a pre-copy that never paused the guest may switch, and the switch records the decision
    assert {p for (r, p, e) in TRANSITIONS if e is Event.DECIDE_POSTCOPY} == {Phase.PRECOPY}
    assert decision_after(S, Phase.PRECOPY, Phase.POSTCOPY_ACTIVE) == "committed"
    assert decision_after(S, Phase.POSTCOPY_PAUSED, Phase.POSTCOPY_RECOVERING) is None
    assert outcome_for(S, Phase.POSTCOPY_PAUSED, "committed") == "committed"


def test_after_libvirt_handed_the_guest_over_the_source_never_aborts_by_itself() -> None:
    """libvirt's switchover is the source's point of no return: recorded as "committed", and from the
    handed-over phase no failure or restart leads to an abort (only the destination's word could)."""
    assert {p for (r, p, e) in TRANSITIONS if r is S and e is Event.HYPERVISOR_HANDED_OVER} == {Phase.PRECOPY}
    assert decision_after(S, Phase.PRECOPY, Phase.HANDED_OVER) == "committed"
    assert decision_after(S, Phase.HANDED_OVER, Phase.COMMITTED) is None  # decided once, at the switchover
    assert outcome_for(S, Phase.HANDED_OVER, "committed") == "committed"
    reachable = {after for (r, p, e), after in TRANSITIONS.items() if r is S and p is Phase.HANDED_OVER}
    assert reachable == {Phase.COMMITTED, Phase.IN_DOUBT}
    # a destination holding what libvirt handed over, cut before its promise, asks instead of discarding
    assert next_phase(D, Phase.RECEIVING, Event.HYPERVISOR_HANDED_OVER) is Phase.IN_DOUBT


def test_the_source_decision_is_recorded_only_when_it_is_taken() -> None:
    assert decision_after(S, Phase.STOP_AND_COPY, Phase.COMMITTED) == "committed"
    assert decision_after(S, Phase.PRECOPY, Phase.ABORTED) == "aborted"
    assert decision_after(S, Phase.COMMITTED, Phase.ABORTED) is None  # the decision stays "committed"
    assert decision_after(S, Phase.COMMITTED, Phase.IN_DOUBT) is None
    assert decision_after(D, Phase.PREPARED, Phase.COMMITTED) is None


def test_what_a_host_tells_its_peer() -> None:
    assert outcome_for(S, Phase.IN_DOUBT, "committed") == "committed"
    assert outcome_for(S, Phase.ABORTED, "aborted") == "aborted"
    assert outcome_for(S, Phase.PRECOPY, None) == "unknown"
    assert outcome_for(D, Phase.RUNNING, None) == "committed"
    assert outcome_for(D, Phase.ABORTED, None) == "aborted"
    assert outcome_for(D, Phase.COMMITTED, None) == "unknown"  # not running yet: the source decides
    # ... and the same from the store's text (a record as read back), not only from the enums.
    assert outcome_for("source", "in-doubt", "committed") == "committed"  # type: ignore[arg-type]
    assert outcome_for("destination", "running", None) == "committed"  # type: ignore[arg-type]


def test_the_store_moves_a_record_only_by_the_table(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    try:
        records.create(store, "m1", "vm", S, "host-b", 1 << 20, "builtin")
        assert store.migration("m1").phase == Phase.STARTED
        with pytest.raises(IllegalTransition):
            records.transition(store, "m1", Event.DECIDE_COMMIT)  # nothing was sent yet
        assert store.migration("m1").phase == Phase.STARTED  # nothing written
        records.transition(store, "m1", Event.BEGIN_PRECOPY)
        records.transition(store, "m1", Event.PAUSE_GUEST)
        assert records.transition(store, "m1", Event.DECIDE_COMMIT) is Phase.COMMITTED
        assert store.migration("m1").decision == "committed"
        assert records.transition(store, "m1", Event.FAIL, error="link cut") is Phase.IN_DOUBT
        record = store.migration("m1")
        assert (record.phase, record.decision, record.error, record.backend) == (
            Phase.IN_DOUBT,
            "committed",
            "link cut",
            "builtin",
        )
        records.create(store, "m2", "vm", D, "host-a", 1 << 20, "qemu")
        records.transition(store, "m2", Event.FAIL, error="bad digest")
        assert [r.id for r in store.migrations(phases=(Phase.ABORTED,))] == ["m2"]
        with pytest.raises(IllegalTransition):
            records.transition(store, "m2", Event.STREAM_VERIFIED)  # aborted is final
    finally:
        store.close()


def test_the_diagram_in_the_docs_is_the_table() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    assert state_diagram() in docs, "docs/architecture.md must embed phases.state_diagram() as it is now"
