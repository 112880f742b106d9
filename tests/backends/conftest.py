"""Fixtures for the built-in VM tests: scratch dirs in /dev/shm and VMs that are always cleaned up."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealift.backends.builtin.vm import BuiltinVM

MiB = 1 << 20


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory on tmpfs (like production), removed afterwards."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="sealift-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class VmPool:
    """Creates VMs in one directory and stops every VM it made or was given."""

    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self._vms: list[BuiltinVM] = []

    def __call__(self, name: str = "vm", memory_bytes: int = 16 * MiB, **kwargs: Any) -> BuiltinVM:
        return self.register(BuiltinVM.create(self.vm_dir, name, memory_bytes, **kwargs))

    def register(self, vm: BuiltinVM) -> BuiltinVM:
        self._vms.append(vm)
        return vm

    def cleanup(self) -> None:
        for vm in self._vms:
            try:
                vm.stop()
            finally:
                vm.close()


@pytest.fixture
def vms(shm_dir: Path) -> Iterator[VmPool]:
    pool = VmPool(shm_dir)
    try:
        yield pool
    finally:
        pool.cleanup()
