"""Durable SQLite stores: the audit log, the replay cache, and (open_durable) the agent's own store.

One way to open a database whose writes survive a crash, one way to make a
write transaction that other processes on the same file wait for, and a
base class that owns the connection under one lock and closes it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self


def open_durable(path: Path) -> sqlite3.Connection:
    """Open (creating it and its directory if needed) the database at `path` for durable records.

    Autocommit mode: transactions are explicit (`immediate_transaction`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    # WAL lets several connections (the agent's own, another process) share the file.
    db.execute("PRAGMA journal_mode=WAL")
    # A record written must survive a power cut: an audit entry that vanishes,
    # or a recorded order use that does (a replay would then be accepted).
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that serialises other processes too; committed unless the block raises.

    The block may COMMIT by itself before raising (to keep what it did): then
    there is nothing left to roll back.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteStore:
    """A SQLite connection one object uses under its lock; a context manager that closes it.

    A connection the store did not open (`owned=False`) is left open.
    """

    def __init__(self, db: sqlite3.Connection, *, owned: bool) -> None:
        self._lock = threading.Lock()
        self._db = db
        self._owned = owned

    def close(self) -> None:
        with self._lock:
            if self._owned:
                self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
