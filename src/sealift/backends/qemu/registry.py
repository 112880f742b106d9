"""The QEMU VMs an agent owns, kept apart from the built-in registry.

QEMU guests outlive their agent (each QEMU runs in its own session), so the
registry's truth is the VM directory itself (`NAME.json` written by
`QemuVM.start`) plus one small sidecar per VM, `NAME.sealift`, holding what a
migration must reproduce on the destination (the extra kernel arguments and
the guest image it booted). A restarted agent adopts what still runs.
"""

from __future__ import annotations

import builtins
import json
import logging
import socket
from pathlib import Path
from typing import Any

from sealift.backends.qemu import debian_vm
from sealift.backends.qemu.definition import boot_image
from sealift.backends.qemu.guest_control import GuestControl, new_token, token_from_cmdline, with_token
from sealift.backends.qemu.image import SERVICE_PORT, GuestImagePaths, build_image, default_cache_dir
from sealift.backends.qemu.net import NetConfig, NetError, create_tap, delete_tap, own_tap_name
from sealift.backends.qemu.storage import incoming_targets
from sealift.backends.qemu.vm import QemuError, QemuVM, list_vms
from sealift.errors import SealiftError
from sealift.guests import GuestTable, TableRegistry
from sealift.host.config import AgentConfig
from sealift.wire.vm_definition import VmDefinition

log = logging.getLogger(__name__)

MiB = 1 << 20


class QemuVmError(SealiftError):
    """A QEMU VM request that cannot be done (unknown name, busy, clash)."""

    code = "qemu_vm_error"


def free_udp_port() -> int:
    """A free host UDP port for a user-network forward to the guest's probe service."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def network_like(net: NetConfig) -> NetConfig:
    """The destination's network for a guest that had `net` at its source.

    User networking: a fresh host port (this host's own forward). A tap keeps
    its name and address (the lab gives each host the same tap on its bridge).
    """
    if net.mode == "user":
        return NetConfig.user(free_udp_port())
    return net


class QemuVmRegistry(TableRegistry[QemuVM]):
    backend = "qemu"

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self.vm_dir = config.vm_dir / "qemu"
        # The guests, and the names busy (being started, migrated out, or received).
        self._guests: GuestTable[QemuVM] = GuestTable(config.name, "QEMU VM", QemuVmError)
        self._image: GuestImagePaths | None = None

    # -- image ------------------------------------------------------------------

    def image(self) -> GuestImagePaths:
        """The guest image (built on first use, cached on disk by content)."""
        with self._guests.lock:  # the registry keeps one lock, for its image too
            if self._image is None:
                self._image = build_image(default_cache_dir())
            return self._image

    # -- lifecycle ---------------------------------------------------------------

    def adopt_existing(self) -> None:
        if not self.vm_dir.exists():
            return
        for record in list_vms(self.vm_dir):
            if not record.alive:
                continue
            try:
                vm = QemuVM.adopt(self.vm_dir, record.name)
            except QemuError as exc:
                log.warning("QEMU VM %s could not be adopted: %s", record.name, exc)
                continue
            self._guests.add(vm.name, vm)

    def start(
        self,
        name: str,
        memory_mib: int,
        extra_cmdline: str = "",
        net: NetConfig | None = None,
        image_cache: Path | None = None,
        definition: VmDefinition | None = None,
        guest: str = "sealift",
    ) -> QemuVM:
        """Start VM ``name``: sealift's test guest, or (``guest="debian"``) the Debian guest (debian_vm.py)."""
        if guest not in ("sealift", "debian"):
            raise QemuVmError(f"unknown guest {guest!r}: use sealift or debian")
        self._reserve_name(name)
        try:
            net = self._own_tap(name, net) if net is not None else None
        except BaseException:
            self._guests.unclaim(name)
            raise
        # A per-VM token for the guest's control channel (guest_control.py), kept in the sidecar
        # with the rest of the command line: a migration carries it to the destination's sidecar.
        extra_cmdline = with_token(extra_cmdline, new_token())
        debian: debian_vm.DebianStart | None = None
        try:
            net = net or NetConfig.user(free_udp_port())
            if guest == "debian":
                debian = debian_vm.plan(name, memory_mib, net, definition, extra_cmdline, self.disk_dir(), image_cache)
                definition, extra_cmdline = debian.definition, debian.extra_cmdline
            image = self._image_for(definition, image_cache)
            vm = QemuVM.start(
                self.vm_dir,
                name,
                memory_mib,
                image,
                net=net,
                extra_cmdline=extra_cmdline,
                definition=definition,
                incoming=debian.incoming if debian is not None else None,
                guest=guest,
            )
            try:
                if debian is not None and debian.state is not None:
                    seconds = debian_vm.run_restored(vm)
                    log.info("Debian guest %s restored from its saved booted state in %.2f s", name, seconds)
                self._write_sidecar(name, extra_cmdline, image.key)
            except BaseException:
                vm.kill()
                raise
        except BaseException:
            self._delete_own_tap(net)
            if debian is not None and debian.created_disk is not None:
                debian.created_disk.unlink(missing_ok=True)
            raise
        finally:
            self._guests.unclaim(name)
        self._guests.add(name, vm)
        return vm

    def start_incoming(
        self, name: str, memory_mib: int, extra_cmdline: str, net: NetConfig, definition: VmDefinition | None = None
    ) -> QemuVM:
        """A destination QEMU waiting for a deferred incoming migration, never running by itself.

        `stop` while QEMU is in "inmigrate" clears its autostart flag (the QMP
        equivalent of -S): when the stream completes the guest stays paused
        until we `cont` it on the source's Commit.
        """
        image = self._image_for(definition, None)
        net = self._own_tap(name, net)
        try:
            vm = QemuVM.start(
                self.vm_dir,
                name,
                memory_mib,
                image,
                incoming="defer",
                net=net,
                extra_cmdline=extra_cmdline,
                definition=definition,
                guest="debian" if debian_vm.is_debian(extra_cmdline) else "sealift",
            )
        except BaseException:
            self._delete_own_tap(net)
            raise
        try:
            vm.pause()
            if vm.status() != "inmigrate":
                raise QemuError(f"destination QEMU for {name} is {vm.status()!r}, expected 'inmigrate'")
            self._write_sidecar(name, extra_cmdline, image.key)
        except BaseException:
            vm.kill()
            self._delete_own_tap(net)
            raise
        return vm

    def adopt_incoming(self, vm: QemuVM) -> None:
        self._guests.add(vm.name, vm)

    def hold_in_doubt(self, vm: QemuVM) -> None:
        """A received guest whose handover is undecided: listed (paused), and busy until the resolver settles it."""
        with self._guests.lock:
            self._guests.vms[vm.name] = vm
            self._guests.busy.add(vm.name)

    def info(self, name: str) -> dict[str, Any]:
        vm = self.get(name)
        info = vm.info()
        migrating = self._guests.is_busy(name)
        status = info["status"]
        info.update(
            backend="qemu",
            migrating=migrating,
            paused=status not in ("running", "exited"),
            memory_bytes=vm.memory_mib * MiB,
            profile="qemu",
            probe=list(vm.net.probe_address(7777) or ()) or None,
            # Every backend's entry has the same keys (docs/schemas/common.schema.json, vm): the built-in's.
            throttle_pct=None,
            image_path=None,
        )
        return info

    def list(self) -> list[dict[str, Any]]:
        return self._guests.infos(self.info)

    def usage(self) -> tuple[int, int]:
        """(memory bytes, vCPUs) of every QEMU guest this host holds: running, paused or in doubt."""
        vms = self._guests.values()
        return sum(vm.memory_mib for vm in vms) * MiB, sum(vm.definition.cpus for vm in vms)

    def console(self, name: str, lines: int) -> builtins.list[str]:  # `list` is the method above here
        return self.get(name).console_tail(max(1, min(lines, 1000)))

    def stop(self, name: str) -> None:
        vm = self._guests.remove(name)
        vm.stop_vm()
        self._delete_own_tap(vm.net)
        self._sidecar(name).unlink(missing_ok=True)

    def stop_all(self) -> None:
        for vm in self._guests.values():
            vm.stop_vm()

    # -- migration bookkeeping ----------------------------------------------------

    def release_migrated(self, name: str) -> None:
        """The destination runs it now: quit our stopped copy for good."""
        vm = self._guests.release(name)
        if vm is not None:
            vm.stop_vm()
            self._delete_own_tap(vm.net)
        self._sidecar(name).unlink(missing_ok=True)

    def discard_incoming(self, name: str) -> None:
        """A received guest whose migration was aborted: quit it, and remove the disk images the migration
        created for it (only those in this host's disk directory: never a shared disk or another file)."""
        vm = self._guests.find(name)
        created = self._own_disks(vm) if vm is not None else []
        self.release_migrated(name)
        for path in created:
            path.unlink(missing_ok=True)

    def remove_incoming_leftovers(self, name: str, migration_id: str) -> builtins.list[Path]:
        """An incoming migration that never promised, whose QEMU died with this agent: remove the target
        images it created (named by its id, storage.target_name) and, if no guest `name` is here, its
        sidecar. Returns the images removed."""
        removed = []
        for path in incoming_targets(self.disk_dir(), name, migration_id):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("could not remove the target image %s of migration %s: %s", path, migration_id, exc)
        if not self.has(name):
            self._sidecar(name).unlink(missing_ok=True)
        if removed:
            log.warning("removed the target images of the half-received %s (%s): %s", name, migration_id, removed)
        return removed

    def reserve_incoming_name(self, name: str) -> None:
        self._reserve_name(name)

    def unreserve_incoming_name(self, name: str) -> None:
        self._guests.unclaim(name)

    def extra_cmdline(self, name: str) -> str:
        try:
            return str(json.loads(self._sidecar(name).read_text()).get("extra_cmdline", ""))
        except (OSError, ValueError):
            return ""

    def guest_control(self, name: str) -> GuestControl:
        """The control channel of guest `name`'s workload, reached from this agent's network."""
        vm = self.get(name)
        token = token_from_cmdline(self.extra_cmdline(name))
        if token is None:
            raise QemuVmError(
                f"QEMU VM {name!r} was started without a control token (sealift.ctl=): "
                "its workload cannot be driven; restart it with this agent"
            )
        address = vm.net.probe_address(SERVICE_PORT)
        if address is None:
            raise QemuVmError(f"QEMU VM {name!r} has no network ({vm.net.mode}): its control channel is unreachable")
        return GuestControl(address, token)

    # -- helpers ------------------------------------------------------------------

    def _reserve_name(self, name: str) -> None:
        with self._guests.lock:
            if name in self._guests.vms or name in self._guests.busy:
                raise QemuVmError(f"a QEMU VM named {name!r} already exists on {self._config.name}")
            self._guests.busy.add(name)

    def _own_tap(self, name: str, net: NetConfig) -> NetConfig:
        """A guest on a named bridge: this host's own tap for it, made now (`bridge=` of --nic)."""
        if net.bridge is None:
            return net
        tap = own_tap_name(self._config.name, name)
        try:
            create_tap(tap, net.bridge)
        except NetError as exc:
            raise QemuVmError(f"cannot put guest {name!r} on bridge {net.bridge}: {exc}") from None
        return NetConfig("tap", tap=tap, guest_ip=net.guest_ip, gateway=net.gateway, bridge=net.bridge).validated()

    def delete_own_tap(self, net: NetConfig) -> None:
        """Remove the tap this agent made for a guest that left (a tap of the operator's stays)."""
        self._delete_own_tap(net)

    @staticmethod
    def _delete_own_tap(net: NetConfig | None) -> None:
        if net is None or net.bridge is None or net.tap is None:
            return
        try:
            delete_tap(net.tap)
        except NetError as exc:
            log.warning("could not delete tap %s: %s", net.tap, exc)

    def _image_for(self, definition: VmDefinition | None, image_cache: Path | None) -> GuestImagePaths:
        """The operator's kernel when the definition names one, else sealift's guest image."""
        if definition is not None and definition.boot is not None:
            return boot_image(definition.boot)
        return build_image(image_cache) if image_cache is not None else self.image()

    def image_key(self, name: str) -> str:
        """The key of the image VM `name` booted (its sidecar's; a migration carries it)."""
        try:
            key = json.loads(self._sidecar(name).read_text()).get("image_key")
        except (OSError, ValueError):
            key = None
        return str(key) if isinstance(key, str) else self.image().key

    def _own_disks(self, vm: QemuVM) -> builtins.list[Path]:
        """The VM's disk images this agent created (in its disk directory: never an operator's file)."""
        return [Path(d.path) for d in vm.definition.disks if Path(d.path).parent == self.disk_dir()]

    def disk_dir(self) -> Path:
        """Where this host creates the images of disks that migrations copy in."""
        return self.vm_dir / "disks"

    def _sidecar(self, name: str) -> Path:
        return self.vm_dir / f"{name}.sealift"

    def _write_sidecar(self, name: str, extra_cmdline: str, image_key: str) -> None:
        self._sidecar(name).write_text(json.dumps({"extra_cmdline": extra_cmdline, "image_key": image_key}) + "\n")
