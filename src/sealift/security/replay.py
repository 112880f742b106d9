"""Single-use orders: a persistent replay cache in SQLite (threat T4).

Each agent records the id of every order it acts on, in one atomic INSERT
into a table with the id as primary key, before it acts. A second use of the
same id - a replayed order, also after an agent restart, also from another
process on the same database - fails the primary-key constraint and is
refused with OrderReplayedError.

An id is kept until its order's expiry plus ORDER_CLOCK_SKEW plus a margin:
by then `verify_order` refuses the order as expired anyway, so forgetting it
opens no replay window, and the table stays as small as the number of
unexpired orders. Call `use_once` only after `verify_order` succeeded, with
the verified order's `expires`.

A use counts even if the migration then fails: the order is spent, and the
operator creates a new one. That is what "usable once" means, and it keeps a
captured order from being retried against an agent until it works.

The table (`used_orders`) may live in its own file or in the agent's SQLite
database (a separate connection; WAL mode lets both coexist).
"""

from __future__ import annotations

import datetime
import re
import sqlite3
from pathlib import Path

from sealift.security.errors import OrderExpiredError, OrderReplayedError
from sealift.security.orders import ORDER_CLOCK_SKEW, format_time
from sealift.security.store import SqliteStore, immediate_transaction, open_durable

__all__ = ["ReplayCache", "OrderReplayedError", "RETENTION"]

# How long after an order's expiry its id is kept.
RETENTION = ORDER_CLOCK_SKEW + datetime.timedelta(minutes=1)

_ORDER_ID = re.compile(r"[0-9a-f]{32}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS used_orders (
    order_id TEXT PRIMARY KEY,
    used_at TEXT NOT NULL,
    keep_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS used_orders_keep_until ON used_orders (keep_until);
"""


class ReplayCache(SqliteStore):
    """Remembers used order ids across restarts. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(open_durable(self.path), owned=True)
        self._db.executescript(_SCHEMA)

    def use_once(self, order_id: str, expires_at: datetime.datetime, *, now: datetime.datetime | None = None) -> None:
        """Record `order_id` as used now, or raise OrderReplayedError if it already was.

        Also raises OrderExpiredError if the order is already past its expiry
        (plus skew): such an id would not be kept, and verify_order should
        have refused it. Prunes ids that are no longer needed.
        """
        if not isinstance(order_id, str) or not _ORDER_ID.fullmatch(order_id):
            raise ValueError(f"order id must be 32 lower-case hex digits, got {order_id!r}")
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must be a timezone-aware datetime")
        now = _utc_now() if now is None else now
        if now > expires_at + ORDER_CLOCK_SKEW:
            raise OrderExpiredError(
                f"order {order_id} expired at {format_time(expires_at)} (now {format_time(now)}); create a new order",
                order_id,
            )
        keep_until = (expires_at + RETENTION).timestamp()
        with self._lock, immediate_transaction(self._db):
            self._db.execute("DELETE FROM used_orders WHERE keep_until < ?", (now.timestamp(),))
            try:
                self._db.execute(
                    "INSERT INTO used_orders (order_id, used_at, keep_until) VALUES (?, ?, ?)",
                    (order_id, _precise(now), keep_until),
                )
            except sqlite3.IntegrityError:
                row = self._db.execute("SELECT used_at FROM used_orders WHERE order_id = ?", (order_id,)).fetchone()
                self._db.execute("COMMIT")  # keep the pruning
                used_at = row[0] if row else "an earlier time"
                raise OrderReplayedError(
                    f"order {order_id} was already used at {used_at} on this agent; "
                    "an order can be used once: create a new one",
                    order_id,
                ) from None

    def used_at(self, order_id: str) -> str | None:
        """When `order_id` was used (ISO time), if it is still remembered."""
        with self._lock:
            row = self._db.execute("SELECT used_at FROM used_orders WHERE order_id = ?", (order_id,)).fetchone()
        return row[0] if row else None

    def prune(self, now: datetime.datetime | None = None) -> int:
        """Forget ids of orders expired long enough ago; returns how many."""
        now = _utc_now() if now is None else now
        with self._lock:
            cursor = self._db.execute("DELETE FROM used_orders WHERE keep_until < ?", (now.timestamp(),))
            return cursor.rowcount

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM used_orders").fetchone()[0]


def _precise(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
