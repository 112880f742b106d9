"""The migration port's intrusion detection: hostile behaviour per peer, and blocks.

Sans-IO, injectable clock. The agent reports what each peer address does on
the migration port; each kind of event weighs according to how unlikely it is
from an honest agent:

    connection          0   any accepted connection: counted for the record, not scored
                            (an honest agent opens several per migration, and
                            outcome and advert queries too)
    refused_connection  1   the guard's rate limit or caps refused it (a flood)
    silent              2   closed or timed out before sending a byte (a scan)
    handshake_refused   2   the guard's handshake budget refused it
    handshake_failed    4   the TLS handshake failed (no or bad certificate)
    malformed           4   unknown protocol bytes, a malformed frame
    order_refused       5   an incoming migration refused (order, policy, monitor)
    slow_handshake      2   sent part of its ClientHello, not all of it, within hello_timeout_s
    evicted             0   closed unauthenticated to make room for another connection (the
                            guard's choice, not necessarily this peer's fault)
    established         0   got past pre-authentication: mutual TLS done, or a data stream
                            matched to a session (counted for the flood signal below)

A peer whose events within the last `window_s` seconds weigh `threshold`
or more is blocked for `block_s` seconds: the guard then refuses its
connections at accept(), before reading a byte. An honest migration costs a
handful of connections and no scored event; a 50-connection scan weighs 100.

Memory is bounded: at most `max_peers` addresses, least recently seen first
out, and at most `max_events` events per peer (older ones no longer count).

A flood spread over many addresses (issue 23) stays under every address's
threshold: each address may hold one connection per deadline. `FloodWatch`
looks at the port as a whole instead: within `window_s`, how many
connections ended without finishing their handshake (silent, slow,
evicted, failed, refused), from how many addresses, and what share of all
connections that is. An episode starts when all three are high and ends when
they have not been for a whole window; each start and end is reported once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

EVENT_WEIGHTS: dict[str, float] = {
    "connection": 0.0,
    "refused_connection": 1.0,
    "silent": 2.0,
    "handshake_refused": 2.0,
    "handshake_failed": 4.0,
    "malformed": 4.0,
    "order_refused": 5.0,
    "slow_handshake": 2.0,
    "evicted": 0.0,
    "established": 0.0,
}

# For the flood signal: how each event ended a connection (events not listed end nothing).
UNFINISHED = frozenset(
    {"refused_connection", "silent", "slow_handshake", "handshake_refused", "handshake_failed", "malformed", "evicted"}
)
FINISHED = frozenset({"established"})


@dataclass(frozen=True)
class PortWatchConfig:
    threshold: float = 60.0
    window_s: float = 10.0
    block_s: float = 60.0
    max_peers: int = 4096
    max_events: int = 512

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and self.window_s > 0 and self.block_s > 0):
            raise ValueError("threshold, window_s and block_s must be positive")
        if self.max_peers < 1 or self.max_events < 1:
            raise ValueError("max_peers and max_events must be at least 1")


@dataclass(frozen=True)
class Block:
    """A decision to block a peer: who, how long, and why (for the audit log)."""

    peer: str
    until: float
    seconds: float
    score: float
    counts: dict[str, int]
    reason: str


class _Peer:
    __slots__ = ("events", "counts", "blocked_until")

    def __init__(self, max_events: int) -> None:
        self.events: deque[tuple[float, float]] = deque(maxlen=max_events)
        self.counts: dict[str, int] = {}
        self.blocked_until = 0.0


class PortWatch:
    """Thread-safe: the agent's connection threads report into one watch."""

    def __init__(self, config: PortWatchConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or PortWatchConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self.blocks = 0

    def record(self, peer: str, kind: str) -> Block | None:
        """Count one event of `peer`; returns a Block when this event puts it over the threshold."""
        weight = EVENT_WEIGHTS.get(kind)
        if weight is None:
            raise ValueError(f"unknown port event {kind!r}; known: {', '.join(EVENT_WEIGHTS)}")
        now = self._clock()
        with self._lock:
            state = self._peer(peer)
            state.counts[kind] = state.counts.get(kind, 0) + 1
            state.events.append((now, weight))
            if state.blocked_until > now:
                return None  # already blocked: counted, not blocked again
            score = self._score(state, now)
            if score < self.config.threshold:
                return None
            state.blocked_until = now + self.config.block_s
            self.blocks += 1
            counts = dict(state.counts)
            state.events.clear()  # a fresh count after the block ends
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        reason = (
            f"{peer} scored {score:.0f} (threshold {self.config.threshold:.0f}) within "
            f"{self.config.window_s:g} s on the migration port: {summary}"
        )
        return Block(peer, now + self.config.block_s, self.config.block_s, score, counts, reason)

    def blocked_for(self, peer: str) -> float:
        """Seconds left of `peer`'s block (0 if not blocked)."""
        with self._lock:
            state = self._peers.get(peer)
            return max(0.0, state.blocked_until - self._clock()) if state is not None else 0.0

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        with self._lock:
            return [
                {
                    "peer": peer,
                    "score": round(self._score(state, now), 1),
                    "counts": dict(state.counts),
                    "blocked_for_s": round(max(0.0, state.blocked_until - now), 1),
                }
                for peer, state in self._peers.items()
            ]

    def _peer(self, peer: str) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.config.max_peers:
                self._peers.popitem(last=False)
            state = self._peers[peer] = _Peer(self.config.max_events)
        else:
            self._peers.move_to_end(peer)
        return state

    def _score(self, state: _Peer, now: float) -> float:
        horizon = now - self.config.window_s
        while state.events and state.events[0][0] < horizon:
            state.events.popleft()
        return sum(weight for _, weight in state.events)


# ---------------------------------------------------------------------------
# The port as a whole: a flood from many addresses


@dataclass(frozen=True)
class FloodConfig:
    window_s: float = 10.0
    min_unfinished: int = 32  # unfinished connections within the window
    min_addresses: int = 16  # ... from at least this many addresses
    min_share: float = 0.5  # ... and at least this share of all that ended
    max_events: int = 8192

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError("flood window_s must be positive")
        if self.min_unfinished < 1 or self.min_addresses < 1 or self.max_events < 1:
            raise ValueError("flood min_unfinished, min_addresses and max_events must be at least 1")
        if not 0 < self.min_share <= 1:
            raise ValueError("flood min_share must be within (0, 1]")


@dataclass(frozen=True)
class FloodReport:
    """A flood episode began (`started`) or ended, with the window's figures at that moment."""

    started: bool
    unfinished: int
    finished: int
    addresses: int
    share: float
    counts: dict[str, int]
    duration_s: float  # of the episode, when it ended; 0 when it starts
    reason: str


class FloodWatch:
    """Thread-safe; the same events as PortWatch. `tick()` ends an episode when no event comes."""

    def __init__(self, config: FloodConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or FloodConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[tuple[float, str, str]] = deque()  # (time, peer, kind), oldest first
        self._unfinished_by_peer: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._finished = 0
        self._active_since: float | None = None
        self._last_hot = 0.0
        self.episodes = 0

    def record(self, peer: str, kind: str) -> FloodReport | None:
        if kind not in UNFINISHED and kind not in FINISHED:
            return None
        now = self._clock()
        with self._lock:
            if len(self._events) >= self.config.max_events:
                self._forget_oldest()
            self._events.append((now, peer, kind))
            self._count(peer, kind, +1)
            return self._evaluate(now)

    def tick(self) -> FloodReport | None:
        with self._lock:
            return self._evaluate(self._clock())

    @property
    def active(self) -> bool:
        with self._lock:
            return self._active_since is not None

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            now = self._clock()
            self._expire(now)
            unfinished = sum(self._unfinished_by_peer.values())
            return {
                "active": self._active_since is not None,
                "active_for_s": round(now - self._active_since, 1) if self._active_since is not None else 0.0,
                "unfinished": unfinished,
                "finished": self._finished,
                "addresses": len(self._unfinished_by_peer),
                "share": round(self._share(unfinished), 3),
                "episodes": self.episodes,
            }

    def _evaluate(self, now: float) -> FloodReport | None:
        self._expire(now)
        unfinished = sum(self._unfinished_by_peer.values())
        hot = (
            unfinished >= self.config.min_unfinished
            and len(self._unfinished_by_peer) >= self.config.min_addresses
            and self._share(unfinished) >= self.config.min_share
        )
        if hot:
            self._last_hot = now
            if self._active_since is None:
                self._active_since = now
                self.episodes += 1
                return self._report(True, unfinished, 0.0)
            return None
        if self._active_since is not None and now - self._last_hot >= self.config.window_s:
            duration = now - self._active_since
            self._active_since = None
            return self._report(False, unfinished, duration)
        return None

    def _report(self, started: bool, unfinished: int, duration: float) -> FloodReport:
        addresses, share, counts = len(self._unfinished_by_peer), self._share(unfinished), dict(self._counts)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        if started:
            reason = (
                f"{unfinished} connections from {addresses} addresses ended without finishing a handshake within "
                f"{self.config.window_s:g} s ({share:.0%} of those that ended): {summary}"
            )
        else:
            reason = f"the flood on the migration port subsided after {duration:.0f} s"
        return FloodReport(started, unfinished, self._finished, addresses, share, counts, duration, reason)

    def _share(self, unfinished: int) -> float:
        ended = unfinished + self._finished
        return unfinished / ended if ended else 0.0

    def _expire(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._events and self._events[0][0] < horizon:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, peer, kind = self._events.popleft()
        self._count(peer, kind, -1)

    def _count(self, peer: str, kind: str, delta: int) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + delta
        if not self._counts[kind]:
            del self._counts[kind]
        if kind in FINISHED:
            self._finished += delta
            return
        left = self._unfinished_by_peer.get(peer, 0) + delta
        if left:
            self._unfinished_by_peer[peer] = left
        else:
            del self._unfinished_by_peer[peer]
