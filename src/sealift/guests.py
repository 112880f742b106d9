"""What every backend's guest and guest registry look like to the rest of sealift.

The built-in VM (backends/builtin) and QEMU guests (backends/qemu) keep
their own state their own way (SQLite rows, sidecar files); the daemon,
placement and the monitors use them only through these two protocols.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


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
