"""An agent restarted during a post-copy holds the split guest: never resumed at the source, never discarded."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from sealift.backends.qemu import postcopy_recovery
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.vm import QemuVM
from sealift.host.store import AgentStore, MigrationRecord
from sealift.host.transport import ControlChannel
from sealift.migration import records
from sealift.migration.errors import PostcopyPaused
from sealift.migration.phases import Event, Phase, Role
from sealift.migration.recovery import Keepers, recover
from sealift.migration.session import DestinationSession, MigrationContext, SourceSession
from sealift.wire.messages import Hello

from .recording_keeper import RecordingKeeper


class PostcopyKeeper(RecordingKeeper):
    """A QEMU keeper that can resume a post-copy: it records the stored Hello it was offered."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, dict | None] = {}

    def resume_postcopy(self, record: MigrationRecord, saved: dict | None) -> bool:
        self._note("resume_postcopy", record)
        self.saved[record.id] = saved
        return saved is not None


def test_a_restart_during_post_copy_holds_both_sides_and_offers_the_stored_hello(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    try:
        records.create(store, "src1", "vm", Role.SOURCE, "host-b", 1 << 20, "qemu")
        records.transition(store, "src1", Event.BEGIN_PRECOPY)
        records.transition(store, "src1", Event.DECIDE_POSTCOPY)
        records.create(store, "dst1", "vm2", Role.DESTINATION, "host-a", 1 << 20, "qemu")
        for event in (Event.STREAM_VERIFIED, Event.RECEIVE_COMMIT, Event.RUN_POSTCOPY):
            records.transition(store, "dst1", event)
        store.save_resume("dst1", {"hello": {"migration_id": "dst1"}, "order_id": "o1"})
        keeper = PostcopyKeeper()
        audited: list[str] = []
        recover(store, Keepers({"qemu": keeper}, "qemu", lambda vm: "qemu"), lambda kind, **f: audited.append(kind))
        assert sorted(keeper.calls) == [
            ("hold_destination", "dst1"),
            ("hold_source", "src1"),
            ("resume_postcopy", "dst1"),
            ("resume_postcopy", "src1"),
        ]
        # The backend is offered what the store holds, once the record is paused (it resumes from there).
        assert keeper.saved == {"dst1": {"hello": {"migration_id": "dst1"}, "order_id": "o1"}, "src1": None}
        for migration_id in ("src1", "dst1"):
            record = store.migration(migration_id)
            assert record is not None and record.phase == Phase.POSTCOPY_PAUSED
        assert store.migration("src1").decision == "committed"  # type: ignore[union-attr]
        assert audited == ["migration.postcopy_paused"] * 2
    finally:
        store.close()


# -- a peer that never comes back: the reports say plainly what is lost, and nothing runs twice ----------------


DST, SRC = "d" * 32, "5" * 32  # migration ids as the wire has them


def _hello(migration_id: str) -> Hello:
    return Hello(
        migration_id=migration_id,
        vm_name="vm",
        source_host="host-a",
        destination_host="host-b",
        nonce=b"\1" * 32,
        memory_bytes=1 << 20,
        page_size=4096,
        secure=False,
        compression=None,
        streams=1,
        backend="qemu",
        order="order",
        psk_proof=None,
    )


def test_a_destination_whose_source_never_comes_back_says_the_guest_is_lost_and_runs_no_second_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted destination waits for its source's reconnection; when the window passes without one (the
    source host is gone), its record says that the guest is lost if the source is gone for good, and that no
    second copy ever runs; the guest is neither started nor discarded here (the keeper is never asked)."""
    monkeypatch.setattr(postcopy_recovery, "recover_window", lambda step_timeout_s: 0.3)
    store = AgentStore(tmp_path / "agent.db")
    try:
        records.create(store, DST, "vm", Role.DESTINATION, "host-a", 1 << 20, "qemu")
        for event in (Event.STREAM_VERIFIED, Event.RECEIVE_COMMIT, Event.RUN_POSTCOPY, Event.AGENT_RESTARTED):
            records.transition(store, DST, event)
        audited: list[str] = []
        context = SimpleNamespace(
            config=SimpleNamespace(name="host-b", step_timeout_s=1.0),
            identity=None,
            store=store,
            authority=SimpleNamespace(record=lambda kind, **fields: audited.append(kind)),
            sessions=None,
        )
        session = DestinationSession(
            cast(MigrationContext, context), cast(ControlChannel, postcopy_recovery._NoChannelYet(False)), _hello(DST)
        )
        qemu = cast(QemuVM, SimpleNamespace(name="vm"))  # never touched: nothing reconnected to resume it
        recovery = postcopy_recovery.DestinationRecovery(session, qemu)
        postcopy_recovery._finish_after_restart(session, qemu, cast(QemuVmRegistry, None), recovery)

        record = store.migration(DST)
        assert record is not None and record.phase == Phase.POSTCOPY_PAUSED and record.error is not None
        assert "host-a did not reconnect" in record.error
        assert "If host-a is gone for good, the guest is lost" in record.error
        assert "no second copy of it ever runs" in record.error
        assert audited.count("migration.postcopy_paused") == 2  # paused, then not resumed
        # The meeting point is closed: a late reconnection is not taken for this migration any more.
        assert not postcopy_recovery.RECOVERIES.offer(cast(ControlChannel, None), _hello(DST), timeout=0.1)
    finally:
        store.close()


def test_a_source_whose_destination_never_answers_keeps_its_paused_qemu_and_says_the_guest_may_be_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source side of the same: its reconnections are refused for the whole window; the error says that
    its paused QEMU never runs the guest again and that the guest is lost if the destination is gone."""
    monkeypatch.setattr(postcopy_recovery, "recover_window", lambda step_timeout_s: 0.5)
    monkeypatch.setattr(postcopy_recovery, "RETRY_S", 0.05)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = closed.getsockname()[:2]  # nothing listens there once closed: every attempt is refused
    store = AgentStore(tmp_path / "agent.db")
    try:
        records.create(store, SRC, "vm", Role.SOURCE, "host-b", 1 << 20, "qemu")
        for event in (Event.BEGIN_PRECOPY, Event.DECIDE_POSTCOPY, Event.AGENT_RESTARTED):
            records.transition(store, SRC, event)
        session = SimpleNamespace(
            config=SimpleNamespace(step_timeout_s=1.0, handshake_timeout_s=1.0),
            context=SimpleNamespace(store=store, identity=None),
            options=SimpleNamespace(secure=False),
            migration_id=SRC,
            vm_name="vm",
            destination="host-b",
            audit=lambda kind, **fields: None,
            progress=lambda kind, data: None,
        )
        calls: list[str] = []

        class PausedQemu:  # what the recovery may ask of the source QEMU before it reconnects
            name = "vm"

            def query_migrate(self) -> dict:
                calls.append("query-migrate")
                return {"status": "postcopy-paused"}

        recovery = postcopy_recovery.SourceRecovery(
            cast(SourceSession, session), cast(QemuVM, PausedQemu()), address, _hello(SRC)
        )
        with pytest.raises(PostcopyPaused) as paused:
            recovery.recover(PostcopyPaused("the source agent restarted"), {})
        message = str(paused.value)
        assert "refused" in message.lower()  # the last attempt's cause
        assert "never runs the guest again (no second copy)" in message
        assert "If host-b is gone for good, the guest is lost" in message
        assert calls == ["query-migrate"]  # only asked whether it paused: never resumed, never cont'ed
        record = store.migration(SRC)
        assert record is not None and record.phase == Phase.POSTCOPY_PAUSED
    finally:
        store.close()
