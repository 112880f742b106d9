"""Hash-chained, signed audit log (T10): every kind of tampering is detected and named.

The attacks work on the SQLite file directly, as someone with access to the
agent's disk (but not its private key) would: first dropping the triggers
that make the table append-only through SQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sealift.security.audit import AuditLog, AuditVerification, Kinds, _sign, verify_export
from sealift.security.errors import AuditError
from sealift.security.signing import canonical_json

from .conftest import Cluster

ENTRIES = 6


@pytest.fixture
def host_key(cluster: Cluster) -> ec.EllipticCurvePrivateKey:
    return cluster.host_a.private_key()


@pytest.fixture
def log_path(tmp_path: Path, host_key: ec.EllipticCurvePrivateKey) -> Path:
    """An audit log with ENTRIES entries, closed again."""
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path, "host-a", host_key) as log:
        for n in range(1, ENTRIES + 1):
            kind = Kinds.ORDER_ACCEPTED if n % 2 else Kinds.ORDER_REFUSED
            log.append(kind, order_id=f"{n:032x}", vm="web1", reason=f"event {n}")
    return path


def _verify(path: Path, key: ec.EllipticCurvePrivateKey) -> AuditVerification:
    with AuditLog(path, "host-a", None, key.public_key()) as log:
        return log.verify()


def _attacker(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER audit_log_no_update")
    db.execute("DROP TRIGGER audit_log_no_delete")
    return db


def _problems(result: AuditVerification) -> dict[int | None, str]:
    return {p.seq: p.what for p in result.problems}


def test_untouched_log_verifies(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    result = _verify(log_path, host_key)
    assert result.ok and result.entries == ENTRIES and result.problems == ()
    assert result.head_seq == ENTRIES


def test_entries_are_chained_and_signed(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    with AuditLog(log_path, "host-a", host_key) as log:
        entries = log.show(limit=100)
    assert [e.seq for e in entries] == list(range(1, ENTRIES + 1))
    assert entries[0].prev_hash == "0" * 64
    for earlier, later in zip(entries, entries[1:]):
        assert later.prev_hash == earlier.hash
    assert entries[2].fields["reason"] == "event 3" and entries[2].host == "host-a"


def test_the_table_is_append_only_through_sql(log_path: Path) -> None:
    db = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit_log SET kind='x' WHERE seq=1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_log WHERE seq=1")
    db.close()


def test_edited_entry_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    """Attack: turn a refusal into an acceptance after the fact."""
    db = _attacker(log_path)
    db.execute("UPDATE audit_log SET body = replace(body, 'event 4', 'event 0') WHERE seq = 4")
    db.close()
    result = _verify(log_path, host_key)
    assert not result.ok
    assert _problems(result) == {4: "entry #4 was edited: its content no longer matches its signed hash"}


def test_edited_entry_with_recomputed_hash_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    body = db.execute("SELECT body FROM audit_log WHERE seq = 2").fetchone()[0]
    body = body.replace("web1", "web9")
    db.execute(
        "UPDATE audit_log SET body = ?, hash = ? WHERE seq = 2", (body, hashlib.sha256(body.encode()).hexdigest())
    )
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert list(problems) == [2] and "not signed by host-a's key" in problems[2]


def test_edited_kind_column_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    """Attack: hide a refusal from `audit show --kind order.refused`."""
    db = _attacker(log_path)
    db.execute("UPDATE audit_log SET kind = 'order.accepted' WHERE seq = 2")
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert list(problems) == [2] and "kind column says 'order.accepted'" in problems[2]


def test_deleted_entry_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    db.execute("DELETE FROM audit_log WHERE seq = 3")
    db.close()
    assert _problems(_verify(log_path, host_key)) == {3: "entry #3 is missing: deleted"}


def test_deleted_entry_is_detected_even_after_renumbering(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    """Attack: delete #3 and renumber 4.. down to close the gap."""
    db = _attacker(log_path)
    db.execute("DELETE FROM audit_log WHERE seq = 3")
    db.execute("UPDATE audit_log SET seq = seq + 1000 WHERE seq > 3")
    db.execute("UPDATE audit_log SET seq = seq - 1001 WHERE seq > 1000")
    db.close()
    problems = [(p.seq, p.what) for p in _verify(log_path, host_key).problems]
    assert (3, "entry #3 is missing: deleted") in problems
    assert (3, "position #3 holds entry #4: entries were reordered or renumbered") in problems
    assert (5, "position #5 holds entry #6: entries were reordered or renumbered") in problems
    assert len(problems) == 4


def test_swapped_entries_are_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    db.execute("UPDATE audit_log SET seq = -2 WHERE seq = 2")
    db.execute("UPDATE audit_log SET seq = 2 WHERE seq = 5")
    db.execute("UPDATE audit_log SET seq = 5 WHERE seq = -2")
    db.close()
    assert _problems(_verify(log_path, host_key)) == {
        2: "position #2 holds entry #5: entries were reordered or renumbered",
        5: "position #5 holds entry #2: entries were reordered or renumbered",
    }


def _forged_row(seq: int, prev_hash: str) -> tuple[int, str, str, str, str]:
    """A well-formed entry, correctly chained and hashed, signed with the attacker's key."""
    body = canonical_json(
        {
            "v": 1,
            "seq": seq,
            "ts": "2026-11-22T10:00:00.000Z",
            "host": "host-a",
            "kind": Kinds.ORDER_ACCEPTED,
            "fields": {"order_id": "f" * 32},
            "prev_hash": prev_hash,
        }
    ).decode()
    digest = hashlib.sha256(body.encode()).hexdigest()
    signature = _sign(ec.generate_private_key(ec.SECP256R1()), {"kind": "audit-entry", "hash": digest})
    return seq, Kinds.ORDER_ACCEPTED, body, digest, signature


def test_forged_entry_appended_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = sqlite3.connect(log_path, isolation_level=None)  # inserting needs no trigger removed
    last_hash = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (ENTRIES,)).fetchone()[0]
    db.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?)", _forged_row(ENTRIES + 1, last_hash))
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert list(problems) == [ENTRIES + 1]
    assert "not signed by host-a's key: it was inserted or forged" in problems[ENTRIES + 1]


def test_forged_entry_inserted_in_the_middle_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    prev_hash = db.execute("SELECT hash FROM audit_log WHERE seq = 2").fetchone()[0]
    db.execute("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3")
    db.execute("UPDATE audit_log SET seq = seq - 999 WHERE seq > 1000")
    db.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?)", _forged_row(3, prev_hash))
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert "not signed by host-a's key" in problems[3]
    assert problems[4] == "position #4 holds entry #3: entries were reordered or renumbered"
    assert set(problems) == {3, 4, 5, 6, 7}


def test_truncated_tail_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    db.execute("DELETE FROM audit_log WHERE seq > 4")
    db.close()
    assert _problems(_verify(log_path, host_key)) == {
        5: "entries #5–#6 are missing at the end: the log was truncated (the signed head records #6)"
    }


def test_truncation_with_the_head_deleted_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    db.execute("DELETE FROM audit_log WHERE seq > 4")
    db.execute("DELETE FROM audit_head")
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert list(problems) == [None] and "signed head is missing" in problems[None]


def test_truncation_with_the_head_rewritten_is_detected(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    db = _attacker(log_path)
    db.execute("DELETE FROM audit_log WHERE seq > 4")
    new_head = db.execute("SELECT hash, signature FROM audit_log WHERE seq = 4").fetchone()
    # The only host-made signature the attacker has for #4 is the entry's own.
    db.execute("UPDATE audit_head SET seq = 4, hash = ?, signature = ?", new_head)
    db.close()
    problems = _problems(_verify(log_path, host_key))
    assert list(problems) == [None] and "head (#4) is not signed by host-a's key" in problems[None]


def test_head_rolled_back_to_an_old_copy_is_detected(tmp_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path, "host-a", host_key)
    for n in range(3):
        log.append("agent.started", n=n)
    saved_head = sqlite3.connect(path).execute("SELECT seq, hash, signature FROM audit_head").fetchone()
    log.append("order.accepted", n=3)
    log.append("order.accepted", n=4)
    log.close()
    db = _attacker(path)
    db.execute("UPDATE audit_head SET seq = ?, hash = ?, signature = ?", saved_head)
    db.close()
    problems = _problems(_verify(path, host_key))
    assert problems == {4: "entries from #4 on are after the signed head (#3): the head was rolled back"}


def test_log_signed_by_another_host_key_fails(log_path: Path) -> None:
    result = _verify(log_path, ec.generate_private_key(ec.SECP256R1()))
    assert not result.ok and len(result.problems) == ENTRIES + 1  # every entry, and the head


def test_export_verifies_offline_and_detects_edits(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    out = io.StringIO()
    with AuditLog(log_path, "host-a", None, host_key.public_key()) as log:
        assert log.export(out) == ENTRIES
    lines = out.getvalue().splitlines()
    assert verify_export(lines, host_key.public_key()).ok
    entry = json.loads(lines[3])
    entry["body"] = entry["body"].replace("event 3", "event 9")
    lines[3] = json.dumps(entry)
    result = verify_export(lines, host_key.public_key())
    assert _problems(result) == {3: "entry #3 was edited: its content no longer matches its signed hash"}
    # An export with its last lines cut off.
    cut = out.getvalue().splitlines()[:-3]
    assert "signed head is missing" in _problems(verify_export(cut, host_key.public_key()))[None]
    with pytest.raises(AuditError, match="not a sealift audit export"):
        verify_export(['{"hello": 1}'], host_key.public_key())


def test_concurrent_appends_keep_one_chain(tmp_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "audit.sqlite3"
    logs = [AuditLog(path, "host-a", host_key) for _ in range(2)]  # two connections, as two processes

    def writer(log: AuditLog, n: int) -> None:
        for i in range(10):
            log.append("migration.round", writer=n, round=i)

    threads = [threading.Thread(target=writer, args=(logs[n % 2], n)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    result = logs[0].verify()
    assert result.ok and result.entries == 60
    for log in logs:
        log.close()


def test_reopened_log_continues_the_chain(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    with AuditLog(log_path, "host-a", host_key) as log:
        entry = log.append(Kinds.KEY_CHANGED, fingerprint="ab" * 32)
        assert entry.seq == ENTRIES + 1
        assert log.verify().ok


def test_show_filters_by_kind_and_limits(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    with AuditLog(log_path, "host-a", host_key) as log:
        refused = log.show(limit=2, kind=Kinds.ORDER_REFUSED)
        assert [e.seq for e in refused] == [4, 6]
        assert [e.seq for e in log.show(limit=3)] == [4, 5, 6]
        assert len(log) == ENTRIES


def test_read_only_log_cannot_append(log_path: Path, host_key: ec.EllipticCurvePrivateKey) -> None:
    with AuditLog(log_path, "host-a", None, host_key.public_key()) as log:
        with pytest.raises(AuditError, match="read-only"):
            log.append("agent.started")


def test_log_in_a_shared_connection(host_key: ec.EllipticCurvePrivateKey) -> None:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    log = AuditLog(db, "host-a", host_key)
    log.append(Kinds.POLICY_LOADED, path="/etc/sealift/policy.toml", rules=2)
    assert log.verify().ok
    with pytest.raises(ValueError, match="invalid audit kind"):
        log.append("Not A Kind")
    with pytest.raises(ValueError, match="canonical JSON"):
        log.append("agent.started", value=float("nan"))
    log.close()
    db.close()
