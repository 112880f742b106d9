"""Addresses the migration port expects: the agent's `[peers]`, and hosts that recently proved a cluster certificate.

The guard (agent/guard.py) keeps part of the port for these addresses and
lets a connection from one of them evict an unauthenticated connection from
anywhere else when the port is full: a flood from many unknown addresses
cannot lock out the hosts the agent actually migrates with.

Two sources, because neither is enough alone: `[peers]` names the hosts this
agent connects *to*, by their listening address, which is usually but not
always the address they connect *from* (a multi-homed host); and a cluster
host that is not in `[peers]` (a new host, an operator's lab) has no entry at
all until it has authenticated once. Remembered addresses expire, and there
are at most `max_remembered` of them, least recently authenticated out first.

Keys are the guard's `peer_key` (IPv4 address, IPv6 /64). Sans-IO except
`resolve_peer_keys`; not thread-safe on its own: the guard calls it under
its lock.
"""

from __future__ import annotations

import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

DEFAULT_REMEMBER_S = 3600.0
DEFAULT_MAX_REMEMBERED = 1024


class ExpectedPeers:
    def __init__(
        self,
        configured: Iterable[str] = (),
        *,
        remember_s: float = DEFAULT_REMEMBER_S,
        max_remembered: int = DEFAULT_MAX_REMEMBERED,
    ) -> None:
        if not remember_s > 0:
            raise ValueError(f"remember_s must be positive, got {remember_s!r}")
        if type(max_remembered) is not int or max_remembered < 1:
            raise ValueError(f"max_remembered must be a positive integer, got {max_remembered!r}")
        self._configured = frozenset(configured)
        self._remember_s = float(remember_s)
        self._max_remembered = max_remembered
        self._remembered: OrderedDict[str, float] = OrderedDict()  # key -> expiry, least recent first

    def is_expected(self, key: str, now: float) -> bool:
        if key in self._configured:
            return True
        expiry = self._remembered.get(key)
        if expiry is None:
            return False
        if expiry <= now:
            del self._remembered[key]
            return False
        return True

    def remember(self, key: str, now: float) -> None:
        """`key` completed a mutual-TLS handshake as a cluster host: expect it for `remember_s`."""
        if key in self._configured:
            return  # always expected; keep the bounded table for the others
        self._remembered.pop(key, None)
        while len(self._remembered) >= self._max_remembered:
            self._remembered.popitem(last=False)
        self._remembered[key] = now + self._remember_s

    @property
    def configured(self) -> frozenset[str]:
        return self._configured

    def remembered(self, now: float) -> int:
        """How many remembered addresses are still valid (expired ones are dropped here)."""
        for key in [k for k, expiry in self._remembered.items() if expiry <= now]:
            del self._remembered[key]
        return len(self._remembered)


def resolve_peer_keys(
    addresses: Iterable[tuple[str, int]],
    key_of: Callable[[str], str],
    resolve: Callable[[str], list[str]] | None = None,
) -> set[str]:
    """The guard keys of the `[peers]` addresses; a name that does not resolve is logged and skipped."""
    lookup = resolve or _resolve
    keys: set[str] = set()
    for host, _port in addresses:
        try:
            keys.update(key_of(ip) for ip in lookup(host))
        except (OSError, ValueError) as exc:
            log.warning("peer address %s does not resolve (%s): it gets no reserved capacity", host, exc)
    return keys


def _resolve(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})
