"""What every backend's guest and guest registry look like to the rest of sealift.

The built-in VM (backends/builtin) and QEMU guests (backends/qemu) keep
their own state their own way (SQLite rows, sidecar files); the daemon,
placement and the monitors use them only through these two protocols.
GuestTable is the bookkeeping both registries hold: their guests by name and
which names are busy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from sealift.errors import SealiftError

V = TypeVar("V")


@runtime_checkable
class GuestVM(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def memory_bytes(self) -> int: ...

    def counter(self) -> int | None:
        """The guest's workload counter (proves it runs on, and where it stopped); None if unknown."""

    def resume(self) -> None: ...


@runtime_checkable
class VmRegistry(Protocol):
    backend: str

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> Any: ...  # the backend's GuestVM

    def info(self, name: str) -> dict[str, Any]: ...

    def list(self) -> list[dict[str, Any]]: ...

    def stop(self, name: str) -> None: ...

    def claim(self, name: str) -> Any:
        """The VM, marked busy: no second migration or stop until unclaim or release_migrated."""

    def unclaim(self, name: str) -> None: ...

    def release_migrated(self, name: str) -> None:
        """It runs elsewhere now: quit our paused copy and forget it."""

    def usage(self) -> tuple[int, int]:
        """(memory in bytes, guests) this registry holds on the host, reservations included."""


class GuestTable(Generic[V]):
    """A registry's guests by name, and which names are busy, under one lock.

    A busy name is being started, migrated out, received or checked: it cannot
    be claimed, stopped or taken again until it is released. Both backends'
    registries hold one of these, since that bookkeeping is the same for both;
    only the error class and how a message names a VM ("VM", "QEMU VM") differ.
    A registry that keeps more state with its guests (reservations, capacity)
    changes it under `lock` too, reading `vms` and `busy` directly.
    """

    def __init__(self, host: str, noun: str, error: type[SealiftError]) -> None:
        self.lock = threading.Lock()
        self.vms: dict[str, V] = {}
        self.busy: set[str] = set()
        self._host = host
        self._noun = noun
        self._error = error

    def add(self, name: str, vm: V) -> None:
        with self.lock:
            self.vms[name] = vm

    def find(self, name: str) -> V | None:
        with self.lock:
            return self.vms.get(name)

    def get(self, name: str) -> V:
        vm = self.find(name)
        if vm is None:
            raise self._error(f"no {self._noun} named {name!r} on {self._host}")
        return vm

    def has(self, name: str) -> bool:
        """Whether the name is taken: a guest, or a name reserved while one boots or arrives."""
        with self.lock:
            return name in self.vms or name in self.busy

    def is_busy(self, name: str) -> bool:
        with self.lock:
            return name in self.busy

    def values(self) -> list[V]:
        with self.lock:
            return list(self.vms.values())

    def infos(self, info: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
        """`info(name)` of every guest, skipping those released or stopped meanwhile."""
        with self.lock:
            names = list(self.vms)
        infos = []
        for name in names:
            try:
                infos.append(info(name))
            except self._error:
                continue  # released or stopped meanwhile
        return infos

    def claim(self, name: str) -> V:
        """The guest, marked busy: no second migration or stop until unclaim or release."""
        vm = self.get(name)
        with self.lock:
            if name in self.busy:
                raise self._error(f"{self._noun} {name!r} is already being migrated")
            self.busy.add(name)
        return vm

    def unclaim(self, name: str) -> None:
        with self.lock:
            self.busy.discard(name)

    def remove(self, name: str) -> V:
        """Forget a guest that is not busy (it is being stopped); the guest, for the caller to stop."""
        vm = self.get(name)
        with self.lock:
            if name in self.busy:
                raise self._error(f"{self._noun} {name!r} is being migrated; wait for the migration to end")
            self.vms.pop(name, None)
        return vm

    def release(self, name: str) -> V | None:
        """Forget a guest that runs elsewhere now, busy or not; the guest if there was one."""
        with self.lock:
            self.busy.discard(name)
            return self.vms.pop(name, None)
