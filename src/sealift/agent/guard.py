# Long file: one lock guards every counter (connections, slots, migrations, blocks) and their invariants.
"""The migration port's guard: cheap admission checks before any TLS work (threats T6, T9).

Everything here is sans-IO and takes an injectable clock, except the small
`accept_admitted` helper at the end. The agent asks the guard, in this order:

    accept()               -> admit_connection(ip)   counts and rate only: no crypto yet
    first byte is TLS      -> admit_handshake(ip)    a separate, smaller budget: the
                                                      handshake (ECDHE + ECDSA) is the
                                                      expensive step
    authenticated Hello    -> admit_migration(host)  by certificate name, not address
    ... then the existing capacity reservation (backends/builtin/registry.py) ...
    finally                -> release_migration(host), release(ip)

Why each check is where it is: the connection checks run on an unauthenticated
address, so they must cost a dictionary lookup and never grow memory without
bound; the migration check runs on an authenticated host name, so it can be
per host. Slow clients are the pre-authentication deadlines' job (the daemon's
`hello_timeout_s` for the ClientHello, `handshake_timeout_s` for the whole
handshake), and the per-peer cap means one address cannot hold more than a
few slots meanwhile.

Many addresses (issue 23): `open_slot` gives each connection a `Slot`. Slots
of unexpected addresses that have not authenticated yet share at most
`max_concurrent_total - reserved_for_expected` places; the rest is kept for
expected addresses (agent/expected.py: `[peers]` and hosts that recently
authenticated). When there is no room, the oldest unauthenticated slot of an
unexpected address is evicted: always for an expected newcomer, and for an
unexpected one only if that slot has had `min_tenure_s` (so each handshake
gets a fair chance and a flood cannot make the port churn without bound).
The daemon shuts the evicted socket down; the guard has already freed its
slot, and releasing a slot twice does nothing (agent/port.py).

Peers are keyed by address, IPv6 by /64 prefix: one IPv6 host usually owns a
whole /64, so counting single addresses would give it 2^64 fresh budgets.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sealift.agent.expected import ExpectedPeers
from sealift.errors import SealiftError

log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_MAX_TRACKED_PEERS = 4096
DEFAULT_MIN_TENURE_S = 0.5  # an unexpected connection is not evicted for another unexpected one sooner
IPV6_PREFIX = 64

# Why a connection was refused or closed before authenticating: the `code` of an Admission (the
# metrics' reason label: a short fixed word; the reason text names addresses and numbers), and of
# the PortRefusal the daemon logs and the port watch counts.
ADMITTED = "admitted"
BLOCKED = "blocked"  # the port watch blocked the address
PORT_FULL = "port_full"  # max_connections already open on the port (admit_connection)
PEER_LIMIT = "peer_limit"  # this address (or source host) already holds its share
RATE_LIMITED = "rate_limited"  # this address opens connections (or handshakes) too fast
HOST_LIMIT = "host_limit"  # this host already receives its total of migrations
TABLE_FULL = "table_full"  # no place left for this class of address, and none to evict
EVICTED = "evicted"  # closed to make room for another connection
SLOW_HANDSHAKE = "slow_handshake"  # no complete ClientHello within hello_timeout_s

# A slot's life: PENDING (accepted, not authenticated) -> ESTABLISHED (mutual TLS done, or a data
# stream matched to a session) -> CLOSED; or PENDING -> EVICTED. Changed only under the guard's lock.
PENDING = "pending"
ESTABLISHED = "established"
CLOSED = "closed"


class PortRefusal(SealiftError):
    """A connection on the migration port refused or closed before it authenticated (code: see above)."""

    code = "port_refused"


@dataclass(eq=False)
class Slot:
    """One admitted connection's place in the guard's table (`PeerGuard.open_slot`)."""

    id: int
    key: str  # peer_key of its address
    expected: bool  # the address was expected when it connected: never evicted
    opened: float  # guard clock
    state: str = PENDING

    @property
    def evicted(self) -> bool:
        return self.state == EVICTED


@dataclass(frozen=True)
class Admission:
    """The guard's answer: allowed or not, and why (for the log and the operator).

    From `open_slot`: the admitted connection's `slot`, and the slots evicted to
    make room for it (already freed here; the caller closes their sockets).
    """

    allowed: bool
    reason: str
    code: str = ADMITTED
    slot: Slot | None = None
    evicted: tuple[Slot, ...] = ()


_OK = Admission(True, "admitted")


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` tokens per second of `clock`.

    Refill is computed lazily from the clock on each use, so an idle bucket
    costs nothing. A clock that goes backwards (it should not: use a monotonic
    one) refills nothing rather than draining.
    """

    __slots__ = ("_rate", "_burst", "_clock", "_tokens", "_updated")

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of tokens per second, got {rate!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be at least 1 token, got {burst!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def is_full(self) -> bool:
        return self.tokens >= self._burst

    def try_take(self, amount: float = 1.0) -> bool:
        """Take `amount` tokens if there are that many; never goes negative."""
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def seconds_until(self, amount: float = 1.0) -> float:
        """How long until `amount` tokens are available (0 if they are)."""
        missing = amount - self.tokens
        return max(0.0, missing / self._rate)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._updated = max(self._updated, now)


class _PeerState:
    __slots__ = ("connections", "handshakes", "open")

    def __init__(self, connections: TokenBucket, handshakes: TokenBucket) -> None:
        self.connections = connections
        self.handshakes = handshakes
        self.open = 0


@dataclass(frozen=True)
class GuardStats:
    """What `sealift status` can show about the port guard."""

    open_connections: int
    tracked_peers: int
    incoming_migrations: int
    refused_connections: int
    refused_handshakes: int
    refused_migrations: int
    pending_unexpected: int = 0  # unauthenticated connections from unexpected addresses
    unexpected_limit: int = 0  # ... at most this many (max_concurrent_total - reserved_for_expected)
    evicted_connections: int = 0
    expected_addresses: int = 0  # configured [peers] keys + remembered authenticated addresses


def peer_key(address: str) -> str:
    """The key a remote address is counted under: IPv4 as is, IPv6 by its /64.

    An IPv4-mapped IPv6 address (::ffff:a.b.c.d, from a dual-stack socket)
    counts as the IPv4 address, so one host cannot double its budget.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        raise ValueError(f"not an IP address: {address!r}") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class PeerGuard:
    """Per-peer rate limits and concurrency caps for the migration port. Thread-safe.

    Connections: at most `max_concurrent_total` open, `max_concurrent_per_peer`
    per peer address, and `per_peer_burst` new ones per peer at once, refilled
    at `per_peer_rate` per second. TLS handshakes: their own bucket
    (`handshake_rate`/`handshake_burst`, by default the connection's).
    Migrations: at most `max_incoming_migrations_per_peer` per authenticated
    source host (and `max_incoming_migrations_total` in all, if given).

    Memory is bounded: at most `max_tracked_peers` addresses are remembered.
    When a new address arrives and the table is full, the least recently seen
    address with no open connection is forgotten (its budget starts afresh if
    it comes back). Addresses with open connections are never forgotten, and
    there are at most `max_concurrent_total` of those, so there is always one
    to evict. Forgetting lets an attacker with more addresses than the table
    holds start each address with a full burst; the total connection cap and
    the pre-authentication deadline still bound what that buys.
    """

    def __init__(
        self,
        per_peer_rate: float,
        per_peer_burst: float,
        max_concurrent_per_peer: int,
        max_concurrent_total: int,
        max_incoming_migrations_per_peer: int,
        clock: Clock = time.monotonic,
        *,
        handshake_rate: float | None = None,
        handshake_burst: float | None = None,
        max_incoming_migrations_total: int | None = None,
        max_tracked_peers: int = DEFAULT_MAX_TRACKED_PEERS,
        expected: ExpectedPeers | None = None,
        reserved_for_expected: int = 0,
        min_tenure_s: float = DEFAULT_MIN_TENURE_S,
    ) -> None:
        _check_count("max_concurrent_per_peer", max_concurrent_per_peer)
        _check_count("max_concurrent_total", max_concurrent_total)
        _check_count("max_incoming_migrations_per_peer", max_incoming_migrations_per_peer)
        if max_incoming_migrations_total is not None:
            _check_count("max_incoming_migrations_total", max_incoming_migrations_total)
        _check_count("max_tracked_peers", max_tracked_peers)
        if max_tracked_peers <= max_concurrent_total:
            raise ValueError(
                f"max_tracked_peers ({max_tracked_peers}) must exceed max_concurrent_total "
                f"({max_concurrent_total}) so that an idle peer can always be evicted"
            )
        if type(reserved_for_expected) is not int or not 0 <= reserved_for_expected < max_concurrent_total:
            raise ValueError(
                f"reserved_for_expected must be an integer in [0, max_concurrent_total), got {reserved_for_expected!r}"
            )
        if not (math.isfinite(min_tenure_s) and min_tenure_s >= 0):
            raise ValueError(f"min_tenure_s must be a non-negative number of seconds, got {min_tenure_s!r}")
        # Validate the bucket parameters once, here, rather than on first use.
        TokenBucket(per_peer_rate, per_peer_burst, clock)
        self._conn_rate, self._conn_burst = per_peer_rate, per_peer_burst
        self._hs_rate = per_peer_rate if handshake_rate is None else handshake_rate
        self._hs_burst = per_peer_burst if handshake_burst is None else handshake_burst
        TokenBucket(self._hs_rate, self._hs_burst, clock)
        self._max_per_peer = max_concurrent_per_peer
        self._max_total = max_concurrent_total
        self._max_migrations_per_peer = max_incoming_migrations_per_peer
        self._max_migrations_total = max_incoming_migrations_total
        self._max_tracked = max_tracked_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, _PeerState] = OrderedDict()  # least recently seen first
        self._open_total = 0
        # Only hosts with a migration in progress: bounded by the caps.
        self._migrations: dict[str, int] = {}
        self._refused_connections = 0
        self._refused_handshakes = 0
        self._refused_migrations = 0
        # Peers the port watch (sealift.monitor.portwatch) blocked: key -> (until, reason).
        self._blocked: dict[str, tuple[float, str]] = {}
        self._expected = expected
        self._unexpected_limit = max_concurrent_total - reserved_for_expected
        self._min_tenure = float(min_tenure_s)
        # Slots of unexpected addresses not yet authenticated, oldest first: the eviction candidates.
        self._pending_unexpected: OrderedDict[int, Slot] = OrderedDict()
        self._next_slot = 0
        self._evicted = 0

    # -- connections (unauthenticated: by address) ----------------------------

    def admit_connection(self, peer_ip: str) -> Admission:
        """May this new TCP connection be served? Call right after accept(), before reading."""
        key = peer_key(peer_ip)
        with self._lock:
            refusal = self._check_blocked(key, self._clock())
            if refusal is not None:
                return refusal
            # The total cap first: it needs no per-peer state, so a flood that
            # fills the port does not also fill the table.
            if self._open_total >= self._max_total:
                return self._refuse_connection(
                    f"{self._open_total} connections already open on the migration port (limit {self._max_total})",
                    PORT_FULL,
                )
            state = self._peers.get(key)
            refusal = self._check_peer_limit(key, state)
            if refusal is not None:
                return refusal
            state = self._touch(key, state)
            if not state.connections.try_take():
                return self._refuse_connection(self._rate_reason(key, state), RATE_LIMITED)
            state.open += 1
            self._open_total += 1
            return _OK

    def admit_handshake(self, peer_ip: str) -> Admission:
        """May this admitted connection start a TLS handshake (the expensive step)?"""
        key = peer_key(peer_ip)
        with self._lock:
            state = self._admitted_locked(key, f"admit_handshake for {key}")
            if not state.handshakes.try_take():
                self._refused_handshakes += 1
                wait = state.handshakes.seconds_until()
                return Admission(
                    False,
                    f"{key} starts TLS handshakes faster than {self._hs_rate:g}/s "
                    f"(burst {self._hs_burst:g}); retry in {wait:.1f} s",
                    RATE_LIMITED,
                )
            return _OK

    def release(self, peer_ip: str) -> None:
        """The connection admitted for `peer_ip` is closed (call exactly once per admission)."""
        key = peer_key(peer_ip)
        with self._lock:
            state = self._admitted_locked(key, f"release({key})")
            state.open -= 1
            self._open_total -= 1

    def _admitted_locked(self, key: str, call: str) -> _PeerState:
        """The state of a peer with an open admitted connection; calling `call` without one is a bug."""
        state = self._peers.get(key)
        if state is None or state.open == 0:
            raise RuntimeError(f"{call} without an admitted connection")
        return state

    # -- slots (connections the daemon can evict) -----------------------------

    def open_slot(self, peer_ip: str) -> Admission:
        """`admit_connection` with reserved capacity and eviction (see the module text).

        Allowed: `slot` is the new connection's, to pass to `mark_established`
        and `release_slot`; `evicted` lists slots freed to make room, whose
        sockets the caller must shut down.
        """
        key = peer_key(peer_ip)
        with self._lock:
            now = self._clock()
            refusal = self._check_blocked(key, now)
            if refusal is not None:
                return refusal
            expected = self._expected is not None and self._expected.is_expected(key, now)
            state = self._peers.get(key)
            refusal = self._check_peer_limit(key, state)
            if refusal is not None:
                return refusal
            victims = self._make_room(expected, now)
            if victims is None:
                return self._refuse_connection(self._table_full_reason(expected), TABLE_FULL)
            state = self._touch(key, state)
            if not state.connections.try_take():
                return self._refuse_connection(self._rate_reason(key, state), RATE_LIMITED)
            for victim in victims:
                self._free(victim, EVICTED)
                self._evicted += 1
            state.open += 1
            self._open_total += 1
            self._next_slot += 1
            slot = Slot(self._next_slot, key, expected, now)
            if not expected:
                self._pending_unexpected[slot.id] = slot
            return Admission(True, "admitted", ADMITTED, slot, tuple(victims))

    def mark_established(self, slot: Slot, *, authenticated: bool) -> bool:
        """The connection got past pre-authentication: it can no longer be evicted.

        `authenticated`: it proved a cluster certificate, so its address is
        expected from now on (for a while). False if the slot was evicted or
        released first (its socket is being closed).
        """
        with self._lock:
            if slot.state != PENDING:
                return False
            slot.state = ESTABLISHED
            self._pending_unexpected.pop(slot.id, None)
            if authenticated and self._expected is not None:
                self._expected.remember(slot.key, self._clock())
            return True

    def release_slot(self, slot: Slot) -> bool:
        """The connection is closed. Frees the slot once: False if it was already freed (evicted)."""
        with self._lock:
            if slot.state in (CLOSED, EVICTED):
                return False
            self._free(slot, CLOSED)
            return True

    def is_expected(self, peer_ip: str) -> bool:
        with self._lock:
            return self._expected is not None and self._expected.is_expected(peer_key(peer_ip), self._clock())

    def _make_room(self, expected: bool, now: float) -> list[Slot] | None:
        """[] if there is room, [victim] if evicting it makes room, None if there is no room."""
        share_full = not expected and len(self._pending_unexpected) >= self._unexpected_limit
        if not share_full and self._open_total < self._max_total:
            return []
        oldest = next(iter(self._pending_unexpected.values()), None)
        if oldest is None:
            return None  # every place is held by expected or authenticated connections
        if not expected and now - oldest.opened < self._min_tenure:
            return None  # let the oldest have its chance; the newcomer may retry
        return [oldest]

    def _free(self, slot: Slot, final_state: str) -> None:
        self._pending_unexpected.pop(slot.id, None)
        slot.state = final_state
        state = self._peers[slot.key]  # tracked: a peer with open connections is never forgotten
        state.open -= 1
        self._open_total -= 1

    def _table_full_reason(self, expected: bool) -> str:
        if expected:
            return f"all {self._max_total} connections are held by expected or authenticated hosts"
        return (
            f"the migration port's {self._unexpected_limit} places for unauthenticated connections from "
            f"unexpected addresses are full, none held longer than {self._min_tenure:g} s"
        )

    # -- migrations (authenticated: by host name) -----------------------------

    def admit_migration(self, peer_host: str) -> Admission:
        """May `peer_host` (as its certificate names it) start one more incoming migration?"""
        with self._lock:
            total = sum(self._migrations.values())
            if self._max_migrations_total is not None and total >= self._max_migrations_total:
                self._refused_migrations += 1
                return Admission(
                    False,
                    f"this host already receives {total} migrations (limit {self._max_migrations_total})",
                    HOST_LIMIT,
                )
            current = self._migrations.get(peer_host, 0)
            if current >= self._max_migrations_per_peer:
                self._refused_migrations += 1
                return Admission(
                    False,
                    f"{peer_host} already has {current} migrations in progress to this host "
                    f"(limit {self._max_migrations_per_peer} per source host)",
                    PEER_LIMIT,
                )
            self._migrations[peer_host] = current + 1
            return _OK

    def release_migration(self, peer_host: str) -> None:
        with self._lock:
            current = self._migrations.get(peer_host, 0)
            if current == 0:
                raise RuntimeError(f"release_migration({peer_host}) without an admitted migration")
            if current == 1:
                del self._migrations[peer_host]  # keep only hosts with work in progress
            else:
                self._migrations[peer_host] = current - 1

    # -- blocks (decided by the port watch) -----------------------------------

    def block(self, peer_ip: str, seconds: float, reason: str) -> None:
        """Refuse every connection from `peer_ip` (its /64 for IPv6) for `seconds`."""
        key = peer_key(peer_ip)
        with self._lock:
            now = self._clock()
            if len(self._blocked) >= self._max_tracked:  # bounded: drop expired blocks, then the oldest
                for old_key in [k for k, (until, _) in self._blocked.items() if until <= now] or [
                    next(iter(self._blocked))
                ]:
                    del self._blocked[old_key]
            self._blocked[key] = (now + seconds, reason)

    def blocked_for(self, peer_ip: str) -> float:
        """Seconds left of the block on `peer_ip` (0 if none)."""
        with self._lock:
            blocked = self._blocked.get(peer_key(peer_ip))
            return max(0.0, blocked[0] - self._clock()) if blocked else 0.0

    # -- observation --------------------------------------------------------

    @property
    def tracked_peers(self) -> int:
        with self._lock:
            return len(self._peers)

    def stats(self) -> GuardStats:
        with self._lock:
            return GuardStats(
                open_connections=self._open_total,
                tracked_peers=len(self._peers),
                incoming_migrations=sum(self._migrations.values()),
                refused_connections=self._refused_connections,
                refused_handshakes=self._refused_handshakes,
                refused_migrations=self._refused_migrations,
                pending_unexpected=len(self._pending_unexpected),
                unexpected_limit=self._unexpected_limit,
                evicted_connections=self._evicted,
                expected_addresses=(
                    len(self._expected.configured) + self._expected.remembered(self._clock())
                    if self._expected is not None
                    else 0
                ),
            )

    # -- internals ------------------------------------------------------------

    def _track(self, key: str) -> _PeerState:
        if len(self._peers) >= self._max_tracked:
            self._evict_one()
        state = _PeerState(
            TokenBucket(self._conn_rate, self._conn_burst, self._clock),
            TokenBucket(self._hs_rate, self._hs_burst, self._clock),
        )
        self._peers[key] = state
        return state

    def _evict_one(self) -> None:
        # Oldest first; at most max_concurrent_total entries have open
        # connections, so this loop looks at most that many + 1 entries.
        for key, state in self._peers.items():
            if state.open == 0:
                del self._peers[key]
                return
        raise AssertionError("no idle peer to evict: open connections exceed max_concurrent_total")

    def _refuse_connection(self, reason: str, code: str = TABLE_FULL) -> Admission:
        self._refused_connections += 1
        return Admission(False, reason, code)

    def _check_peer_limit(self, key: str, state: _PeerState | None) -> Admission | None:
        if state is not None and state.open >= self._max_per_peer:
            return self._refuse_connection(
                f"{key} already has {state.open} connections open (limit {self._max_per_peer} per peer)",
                PEER_LIMIT,
            )
        return None

    def _touch(self, key: str, state: _PeerState | None) -> _PeerState:
        """The peer's state, tracked from now on if new; else marked most recently used (the table evicts the least)."""
        if state is None:
            return self._track(key)
        self._peers.move_to_end(key)
        return state

    def _check_blocked(self, key: str, now: float) -> Admission | None:
        blocked = self._blocked.get(key)
        if blocked is None:
            return None
        if blocked[0] > now:
            return self._refuse_connection(f"{key} is blocked for {blocked[0] - now:.0f} s more: {blocked[1]}", BLOCKED)
        del self._blocked[key]
        return None

    def _rate_reason(self, key: str, state: _PeerState) -> str:
        wait = state.connections.seconds_until()
        return (
            f"{key} opens connections faster than {self._conn_rate:g}/s "
            f"(burst {self._conn_burst:g}); retry in {wait:.1f} s"
        )


def _check_count(name: str, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------
# A small accept-loop helper (the only part that touches sockets)


class GuardedConnection:
    """An accepted socket the guard admitted; `release()` gives its slot back (idempotent)."""

    def __init__(self, sock: socket.socket, address: tuple[Any, ...], guard: PeerGuard) -> None:
        self.sock = sock
        self.address = address
        self._guard = guard
        self._released = False
        self._release_lock = threading.Lock()

    @property
    def peer_ip(self) -> str:
        return str(self.address[0])

    def release(self) -> None:
        with self._release_lock:
            if self._released:
                return
            self._released = True
        self._guard.release(self.peer_ip)

    def close(self) -> None:
        """Close the socket and release the slot."""
        try:
            self.sock.close()
        finally:
            self.release()


def accept_admitted(listener: socket.socket, guard: PeerGuard) -> GuardedConnection | None:
    """Accept one connection; close it at once (None) if the guard refuses it.

    Nothing is read from a refused connection, so refusing costs one accept
    and one close. OSError from accept() (listener closed) propagates.
    """
    sock, address = listener.accept()
    try:
        admission = guard.admit_connection(str(address[0]))
    except ValueError:
        sock.close()  # not an IP peer (cannot happen on an AF_INET/AF_INET6 listener)
        return None
    if not admission.allowed:
        log.warning("connection from %s refused: %s", address[0], admission.reason)
        sock.close()
        return None
    return GuardedConnection(sock, address, guard)
