"""The agent's durable state in an embedded SQLite file.

The migration table is what makes handover safe across crashes: the source
writes its commit decision here *before* it tells the destination, and the
destination writes "prepared" before it promises anything (see
docs/architecture.md, "Migration protocol"). The store keeps phases as
text and knows no rule: a record's phase changes only through
migration/records.py `transition`, which applies the handover's table
(migration/phases.py) and writes with `set_phase_if`, so that a record that
changed under it is never overwritten.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sealift.security.store import open_durable

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    pid INTEGER,
    memory_bytes INTEGER NOT NULL,
    profile TEXT,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('source', 'destination')),
    peer TEXT NOT NULL,
    phase TEXT NOT NULL,
    backend TEXT,
    decision TEXT,
    memory_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    report TEXT,
    resume TEXT
);
"""

_MIGRATION_COLUMNS = "id, vm, role, peer, phase, backend, decision, memory_bytes, created_at, updated_at, error, report"


@dataclass(frozen=True)
class VmRecord:
    name: str
    backend: str
    pid: int | None
    memory_bytes: int
    profile: str | None
    status: str


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    vm: str
    role: str  # "source" | "destination" (migration/phases.py Role)
    peer: str
    phase: str  # migration/phases.py Phase
    backend: str | None  # None: a record from before the column
    decision: str | None
    memory_bytes: int
    created_at: float
    updated_at: float
    error: str | None
    report: dict | None


class AgentStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_durable(path)  # the commit decision must survive a crash
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(migrations)")}
        if "backend" not in columns:  # a store from before the column
            self._db.execute("ALTER TABLE migrations ADD COLUMN backend TEXT")
        if "resume" not in columns:  # a store from before post-copy could be resumed after a restart
            self._db.execute("ALTER TABLE migrations ADD COLUMN resume TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- VMs ----------------------------------------------------------------

    def put_vm(
        self, name: str, backend: str, pid: int | None, memory_bytes: int, profile: str | None, status: str
    ) -> None:
        self._exec(
            "INSERT INTO vms (name, backend, pid, memory_bytes, profile, status, updated_at) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET backend=excluded.backend, pid=excluded.pid, "
            "memory_bytes=excluded.memory_bytes, profile=excluded.profile, status=excluded.status, "
            "updated_at=excluded.updated_at",
            (name, backend, pid, memory_bytes, profile, status, time.time()),
        )

    def set_vm_status(self, name: str, status: str) -> None:
        self._exec("UPDATE vms SET status=?, updated_at=? WHERE name=?", (status, time.time(), name))

    def delete_vm(self, name: str) -> None:
        self._exec("DELETE FROM vms WHERE name=?", (name,))

    def vms(self) -> list[VmRecord]:
        rows = self._exec("SELECT name, backend, pid, memory_bytes, profile, status FROM vms ORDER BY name")
        return [VmRecord(*row) for row in rows]

    # -- migrations -----------------------------------------------------------

    def create_migration(
        self, migration_id: str, vm: str, role: str, peer: str, phase: str, memory_bytes: int, backend: str
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO migrations (id, vm, role, peer, phase, backend, memory_bytes, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (migration_id, vm, role, peer, phase, backend, memory_bytes, now, now),
        )

    def set_phase_if(
        self, migration_id: str, expected: str, phase: str, decision: str | None = None, error: str | None = None
    ) -> bool:
        """Write `phase` (and a decision, an error) only if the record is still in `expected`; whether it was."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE migrations SET phase=?, decision=COALESCE(?, decision), error=COALESCE(?, error), "
                "updated_at=? WHERE id=? AND phase=?",
                (phase, decision, error, time.time(), migration_id, expected),
            )
            return cursor.rowcount == 1

    def save_report(self, migration_id: str, report: dict) -> None:
        self._exec(
            "UPDATE migrations SET report=?, updated_at=? WHERE id=?", (json.dumps(report), time.time(), migration_id)
        )

    def save_resume(self, migration_id: str, resume: dict) -> None:
        """What a restarted agent needs to resume this migration's post-copy (the Hello with its order)."""
        self._exec(
            "UPDATE migrations SET resume=?, updated_at=? WHERE id=?", (json.dumps(resume), time.time(), migration_id)
        )

    def resume_of(self, migration_id: str) -> dict | None:
        rows = self._exec("SELECT resume FROM migrations WHERE id=?", (migration_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def migration(self, migration_id: str) -> MigrationRecord | None:
        rows = self._exec(f"SELECT {_MIGRATION_COLUMNS} FROM migrations WHERE id=?", (migration_id,))
        return _migration(rows[0]) if rows else None

    def migrations_by_prefix(self, prefix: str, limit: int = 2) -> list[MigrationRecord]:
        """The migrations whose id starts with `prefix` (ids are shown shortened), newest first."""
        sql = f"SELECT {_MIGRATION_COLUMNS} FROM migrations WHERE substr(id, 1, ?) = ? ORDER BY created_at DESC LIMIT ?"
        return [_migration(row) for row in self._exec(sql, (len(prefix), prefix, limit))]

    def migrations(
        self, limit: int = 100, phases: tuple[str, ...] | None = None, role: str | None = None
    ) -> list[MigrationRecord]:
        sql = f"SELECT {_MIGRATION_COLUMNS} FROM migrations"
        clauses: list[str] = []
        args: list[object] = []
        if phases:
            clauses.append(f"phase IN ({','.join('?' * len(phases))})")
            args.extend(phases)
        if role:
            clauses.append("role=?")
            args.append(role)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [_migration(row) for row in self._exec(sql, tuple(args))]


def _migration(row: tuple) -> MigrationRecord:
    values = list(row)
    values[-1] = json.loads(values[-1]) if values[-1] else None
    return MigrationRecord(*values)
