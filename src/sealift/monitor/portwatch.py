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

A peer whose events within the last `window_s` seconds weigh `threshold`
or more is blocked for `block_s` seconds: the guard then refuses its
connections at accept(), before reading a byte. An honest migration costs a
handful of connections and no scored event; a 50-connection scan weighs 100.

Memory is bounded: at most `max_peers` addresses, least recently seen first
out, and at most `max_events` events per peer (older ones no longer count).
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
}


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
