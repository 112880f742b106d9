"""Single-use orders (T4): the replay cache refuses a second use, also after a restart."""

from __future__ import annotations

import datetime
import secrets
import sqlite3
import threading
from pathlib import Path

import pytest

from sealift.security.errors import OrderError, OrderExpiredError, OrderReplayedError
from sealift.security.orders import create_order, verify_order
from sealift.security.replay import RETENTION, ReplayCache
from sealift.security.revocation import RevocationList

from .conftest import UTC, Cluster

NOW = datetime.datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
IN_5_MIN = NOW + datetime.timedelta(minutes=5)


def test_second_use_is_refused(tmp_path: Path) -> None:
    order_id = secrets.token_hex(16)
    with ReplayCache(tmp_path / "replay.sqlite3") as cache:
        cache.use_once(order_id, IN_5_MIN, now=NOW)
        with pytest.raises(
            OrderReplayedError, match=f"order {order_id} was already used at 2026-11-22T10:00:00.000Z"
        ) as caught:
            cache.use_once(order_id, IN_5_MIN, now=NOW + datetime.timedelta(seconds=3))
    assert isinstance(caught.value, OrderError) and caught.value.code == "replayed"


def test_replay_is_refused_after_a_restart(tmp_path: Path) -> None:
    """Attack (T4): capture an order, wait for the agent to restart, send it again."""
    order_id = secrets.token_hex(16)
    path = tmp_path / "state" / "agent.sqlite3"
    first = ReplayCache(path)
    first.use_once(order_id, IN_5_MIN, now=NOW)
    first.close()
    reopened = ReplayCache(path)
    with pytest.raises(OrderReplayedError):
        reopened.use_once(order_id, IN_5_MIN, now=NOW + datetime.timedelta(minutes=1))
    reopened.close()


def test_real_order_is_usable_once(cluster: Cluster, tmp_path: Path) -> None:
    envelope = create_order(cluster.operator, "web1", "host-a", "host-b")
    cache = ReplayCache(tmp_path / "replay.sqlite3")
    for attempt in range(2):
        verified = verify_order(envelope, cluster.ca.certificate, revocations=RevocationList.disabled())
        if attempt == 0:
            cache.use_once(verified.order.id, verified.order.expires)
        else:
            with pytest.raises(OrderReplayedError):
                cache.use_once(verified.order.id, verified.order.expires)
    cache.close()


def test_concurrent_uses_let_exactly_one_through(tmp_path: Path) -> None:
    """Two connections (as two agent threads or processes) race with the same order."""
    order_id = secrets.token_hex(16)
    caches = [ReplayCache(tmp_path / "replay.sqlite3") for _ in range(4)]
    results: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(caches) * 2)

    def attempt(cache: ReplayCache) -> None:
        start.wait()
        try:
            cache.use_once(order_id, IN_5_MIN, now=NOW)
            outcome = "used"
        except OrderReplayedError:
            outcome = "replayed"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in caches for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == ["replayed"] * 7 + ["used"]
    for cache in caches:
        cache.close()


def test_ids_are_kept_until_after_expiry_then_pruned(tmp_path: Path) -> None:
    cache = ReplayCache(tmp_path / "replay.sqlite3")
    old, fresh = secrets.token_hex(16), secrets.token_hex(16)
    cache.use_once(old, IN_5_MIN, now=NOW)
    # Just before the retention ends the id is still remembered (a verifier
    # with clock skew could still accept the order).
    assert cache.prune(IN_5_MIN + RETENTION - datetime.timedelta(seconds=1)) == 0
    later = IN_5_MIN + RETENTION + datetime.timedelta(seconds=1)
    cache.use_once(fresh, later + datetime.timedelta(minutes=5), now=later)  # prunes as it goes
    assert cache.used_at(old) is None and cache.used_at(fresh) is not None
    assert len(cache) == 1
    cache.close()


def test_expired_order_cannot_be_recorded(tmp_path: Path) -> None:
    cache = ReplayCache(tmp_path / "replay.sqlite3")
    with pytest.raises(OrderExpiredError, match="expired at 2026-11-22T10:05:00Z"):
        cache.use_once(secrets.token_hex(16), IN_5_MIN, now=IN_5_MIN + datetime.timedelta(minutes=1))
    with pytest.raises(ValueError, match="32 lower-case hex"):
        cache.use_once("not-an-id", IN_5_MIN, now=NOW)
    cache.close()


def test_replay_table_can_share_the_agent_database(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE vms (name TEXT PRIMARY KEY)")
    other.commit()
    cache = ReplayCache(path)
    cache.use_once(secrets.token_hex(16), IN_5_MIN, now=NOW)
    assert other.execute("SELECT COUNT(*) FROM used_orders").fetchone() == (1,)
    other.close()
    cache.close()
