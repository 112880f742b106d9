"""The VMs an agent owns, backed by the store so they survive an agent restart."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sealift.backends.builtin.guest import image_in_use
from sealift.backends.builtin.image import ImageCheck
from sealift.backends.builtin.vm import GUEST_MODULE, BuiltinVM, VmError
from sealift.guests import GuestTable, TableRegistry
from sealift.host.config import AgentConfig
from sealift.host.store import AgentStore
from sealift.migration.errors import AdmissionError

log = logging.getLogger(__name__)


class BuiltinGuestMemory:
    """The engine's view of a built-in VM (see backends/builtin/sender.py GuestMemory)."""

    def __init__(self, vm: BuiltinVM) -> None:
        self._vm = vm

    @property
    def pages(self) -> np.ndarray:
        return self._vm.image.pages

    def dirty_snapshot(self) -> np.ndarray:
        return self._vm.dirty.snapshot()

    def data_ranges(self) -> list[tuple[int, int]]:
        return self._vm.image.data_ranges()

    def pause(self) -> None:
        self._vm.pause()

    def read_device_state(self) -> bytes:
        return self._vm.image.read_state()

    def set_throttle(self, pct: int) -> None:
        self._vm.image.set_throttle(pct)


class BuiltinVmRegistry(TableRegistry[BuiltinVM]):
    backend = "builtin"

    def __init__(
        self, config: AgentConfig, store: AgentStore, other_guests: Callable[[], tuple[int, int]] = lambda: (0, 0)
    ) -> None:
        self._config = config
        self._store = store
        # (memory bytes, vCPUs) of the guests other registries hold on this host (QEMU): admission counts them too.
        self._other_guests = other_guests
        # The guests, and the names busy (migrating, booting, being checked); _reserved is kept under its lock.
        self._guests: GuestTable[BuiltinVM] = GuestTable(config.name, "VM", VmError)
        self._reserved: dict[str, int] = {}  # incoming migration id -> bytes
        config.vm_dir.mkdir(parents=True, exist_ok=True)

    @property
    def vm_dir(self) -> Path:
        return self._config.vm_dir

    # -- lifecycle ------------------------------------------------------------

    def adopt_existing(self) -> None:
        """After a restart: take back the guests that kept running without us."""
        for record in self._store.vms():
            if record.pid is None:
                continue
            try:
                vm = BuiltinVM.adopt(self.vm_dir, record.name, record.pid)
            except VmError as exc:
                log.warning("VM %s (pid %s) is gone: %s", record.name, record.pid, exc)
                self._store.set_vm_status(record.name, "lost")
                continue
            self._guests.add(record.name, vm)

    def image_path(self, name: str) -> Path:
        return self.vm_dir / f"{name}.img"

    def running_guest(self, name: str) -> BuiltinVM | None:
        """The guest that runs on this name's image, registered or not (recovery only).

        An agent killed between starting a guest and registering it leaves a
        guest that runs (it holds its image's run lock) but that the store does
        not know: find its process and take charge of it, so it is never
        started a second time nor its image discarded.
        """
        vm = self._guests.find(name)
        if vm is not None and vm.is_alive:
            return vm
        image = self.image_path(name)
        if not image_in_use(image):
            return None
        for pid in _guest_pids(self.vm_dir.resolve() / image.name):  # guests run on the resolved path
            try:
                vm = BuiltinVM.adopt(self.vm_dir, name, pid)
            except VmError as exc:
                log.warning("guest process %d on %s cannot be adopted: %s", pid, image, exc)
                continue
            log.warning("adopted guest %s (pid %d), started before the agent's crash but never registered", name, pid)
            self._add(vm, None)
            return vm
        return None

    def start(
        self, name: str, memory_bytes: int, workload: str, fill_fraction: float, seed: int | None = None
    ) -> BuiltinVM:
        with self._guests.lock:
            if name in self._guests.vms:
                raise AdmissionError(f"a VM named {name!r} already runs on {self._config.name}")
            self._check_capacity_locked(memory_bytes)
            self._guests.busy.add(name)  # reserve the name while it boots
        try:
            vm = BuiltinVM.create(
                self.vm_dir, name, memory_bytes, profile=workload, fill_fraction=fill_fraction, seed=seed
            )
        finally:
            self._guests.unclaim(name)
        self._add(vm, workload)
        return vm

    def start_incoming(self, name: str, profile: str | None) -> BuiltinVM:
        vm = BuiltinVM.start_on_image(self.vm_dir, name)
        self._add(vm, profile)
        return vm

    def adopt_incoming(self, vm: BuiltinVM) -> BuiltinVM:
        """A guest started (from standby) on a migrated image joins this host."""
        self._add(vm, None)
        return vm

    def _add(self, vm: BuiltinVM, profile: str | None) -> None:
        self._guests.add(vm.name, vm)
        self._store.put_vm(vm.name, "builtin", vm.pid, vm.memory_bytes, profile, "running")

    def info(self, name: str) -> dict[str, object]:
        vm = self.get(name)
        info = vm.info()
        info["migrating"] = self._guests.is_busy(name)
        # Every backend's entry has the same keys (docs/schemas/common.schema.json, vm): QEMU's are None here.
        info.update(
            backend="builtin",
            memory_mib=vm.memory_bytes >> 20,
            status=None,
            accel=None,
            console=None,
            net=None,
            cpus=None,
            disks=None,
            boot=None,
            probe=None,
        )
        return info

    def list(self) -> list[dict[str, object]]:
        return self._guests.infos(self.info)

    def check(self, name: str) -> ImageCheck:
        """Verify a VM's memory from inside (paused for the scan, then resumed)."""
        vm = self.get(name)
        with self._guests.lock:
            if name in self._guests.busy:
                raise VmError(f"VM {name!r} is being migrated; check it when the migration has ended")
            self._guests.busy.add(name)  # no migration may pause it under us
        try:
            return vm.check()
        finally:
            self._guests.unclaim(name)

    def stop(self, name: str) -> None:
        self._guests.remove(name).destroy()
        self._store.delete_vm(name)

    def release_migrated(self, name: str) -> None:
        """The destination runs it now: drop our paused copy for good."""
        vm = self._guests.release(name)
        if vm is not None:
            vm.destroy()
        self._store.delete_vm(name)

    def stop_all(self) -> None:
        for vm in self._guests.values():
            vm.stop()

    # -- migration bookkeeping -----------------------------------------------

    def reserve_incoming(self, migration_id: str, name: str, memory_bytes: int) -> None:
        """Admission control: hold the memory an incoming VM needs, or refuse."""
        with self._guests.lock:
            if name in self._guests.vms or name in self._guests.busy:
                raise AdmissionError(f"a VM named {name!r} already exists on {self._config.name}")
            incoming = len(self._reserved)
            if incoming >= self._config.max_incoming:
                raise AdmissionError(
                    f"{self._config.name} already receives {incoming} migrations (limit {self._config.max_incoming})"
                )
            self._check_capacity_locked(memory_bytes)
            self._reserved[migration_id] = memory_bytes
            self._guests.busy.add(name)

    def unreserve_incoming(self, migration_id: str, name: str) -> None:
        with self._guests.lock:
            self._reserved.pop(migration_id, None)
            self._guests.busy.discard(name)

    def memory_in_use(self) -> int:
        with self._guests.lock:
            return sum(vm.memory_bytes for vm in self._guests.vms.values()) + sum(self._reserved.values())

    def usage(self) -> tuple[int, int]:
        """(memory bytes, guests): running guests and incoming reservations; guests counts the running ones."""
        with self._guests.lock:
            vms = self._guests.vms.values()
            return sum(vm.memory_bytes for vm in vms) + sum(self._reserved.values()), len(vms)

    def _check_capacity_locked(self, memory_bytes: int) -> None:
        # A built-in guest is one process: one vCPU.
        other_memory, other_vcpus = self._other_guests()
        vcpus = len(self._guests.vms) + len(self._reserved) + other_vcpus + 1
        if vcpus > self._config.vcpu_capacity:
            raise AdmissionError(
                f"{self._config.name} runs {vcpus - 1} vCPUs of {self._config.vcpu_capacity} (vcpu_capacity); "
                "the VM needs 1 more",
                code="no_vcpu_capacity",
            )
        used = sum(vm.memory_bytes for vm in self._guests.vms.values()) + sum(self._reserved.values()) + other_memory
        if used + memory_bytes > self._config.memory_capacity:
            free = self._config.memory_capacity - used
            raise AdmissionError(
                f"{self._config.name} has {free >> 20} MiB free of {self._config.memory_capacity >> 20} MiB; "
                f"the VM needs {memory_bytes >> 20} MiB",
                code="no_memory_capacity",
            )


def _guest_pids(image: Path) -> list[int]:
    """Pids of built-in guest processes whose command line runs on `image`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if GUEST_MODULE.encode() in args and str(image).encode() in args:
            pids.append(int(entry.name))
    return pids
