"""The Debian guest as an agent's QEMU VM (`sealift vm start --guest debian`).

A Debian VM is an ordinary QEMU VM with a definition (debian_guest.py has
the guest itself):

- its boot is the Debian image's kernel and initrd (``BootSpec``), so the
  guest description's image key is their digest and the destination checks
  it boots the very same files, as for an operator's own kernel;
- its root disk is a qcow2 overlay of its own in the agent's disk
  directory, not shared: a migration copies it (``sync=top``: the backing
  file, in the image cache, is on both hosts at the same path);
- its kernel command line carries ``sealift.guest=debian`` (which travels
  in the guest description), so the destination's QEMU gets the same
  machine shape: NIC and disk at the saved state's PCI slots, its MAC.

The start restores the saved booted state (``-incoming`` from its stream,
an overlay over the saved overlay, then ``cont``) when the machine matches
one: no operator disk, one vCPU, a tap on a bridge. Otherwise it boots cold
(25-60 s under TCG) on an overlay of the image itself.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sealift.backends.qemu.debian_guest import GuestShape, SavedState, ensure_saved_state, incoming_uri
from sealift.backends.qemu.debian_image import DebianGuestError, DebianImage, build_debian_image
from sealift.backends.qemu.definition import DiskError, definition_for, probe_disk, qemu_img
from sealift.backends.qemu.host import HostError, choose_accel
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.wire.vm_definition import BootSpec, VmDefinition

log = logging.getLogger(__name__)

GUEST_ARG = "sealift.guest=debian"
# What the Debian guest's kernel needs beyond what vm.py puts on every command line (console, address).
KERNEL_ARGS = f"root=/dev/vda rw net.ifnames=0 {GUEST_ARG}"
_RESTORE_TIMEOUT_S = 60.0


def is_debian(cmdline: str) -> bool:
    """Whether a VM's kernel arguments (its sidecar's, or a guest description's) are the Debian guest's."""
    return GUEST_ARG in cmdline.split()


@dataclass(frozen=True)
class DebianStart:
    """How to start one Debian VM: its definition, kernel arguments, and the saved state to restore (or None)."""

    definition: VmDefinition
    extra_cmdline: str
    state: SavedState | None
    created_disk: Path | None  # the overlay made for it (removed if the start fails)

    @property
    def incoming(self) -> str | None:
        return None if self.state is None else incoming_uri(self.state)


def plan(
    name: str,
    memory_mib: int,
    net: NetConfig,
    definition: VmDefinition | None,
    extra_cmdline: str,
    disk_dir: Path,
    image_cache: Path | None,
) -> DebianStart:
    """The Debian image (built on first use), a root disk, and whether the saved state fits this VM."""
    try:
        image = build_debian_image(image_cache)
        accel = choose_accel(None, image.kernel)
    except (DebianGuestError, HostError) as exc:
        raise QemuError(f"the Debian guest image is not available: {exc}") from exc
    cpus = definition.cpus if definition is not None else 1
    disks = definition.disks if definition is not None else ()
    if definition is not None and definition.boot is not None:
        raise QemuError("--guest debian boots the Debian image's kernel: leave out --kernel, --initrd and --boot")
    state = _saved_state(image, memory_mib, accel, net) if not disks and cpus == 1 else None
    disk_dir.mkdir(parents=True, exist_ok=True)
    created: Path | None = None
    if not disks:
        # A name of its own: the disk of an earlier VM of that name stays (`vm stop` deletes no disk).
        created = disk_dir / f"{name}-{secrets.token_hex(4)}.qcow2"
        # A copy-on-write disk of its own: over the saved disk (restore) or the image (cold boot).
        backing = state.overlay if state is not None else image.disk
        try:
            qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(created))
            disks = (probe_disk(str(created), shared=False),)
        except DiskError as exc:
            created.unlink(missing_ok=True)
            raise QemuError(f"cannot create the Debian guest's disk: {exc}") from exc
    try:
        full = definition_for(cpus, list(disks), BootSpec(str(image.kernel), str(image.initrd)))
    except DiskError as exc:
        if created is not None:
            created.unlink(missing_ok=True)
        raise QemuError(str(exc)) from exc
    return DebianStart(full, " ".join(filter(None, (KERNEL_ARGS, extra_cmdline))), state, created)


def _saved_state(image: DebianImage, memory_mib: int, accel: str, net: NetConfig) -> SavedState | None:
    """The saved booted guest for this machine (made now, once, if missing), or None to boot cold."""
    if net.mode != "tap":
        return None  # the state was saved with a NIC on a tap: another network is another machine
    shape = GuestShape(memory_mib=memory_mib, accel=accel, guest_ip=net.guest_ip, gateway=net.gateway)
    try:
        return ensure_saved_state(image, shape)
    except DebianGuestError as exc:
        log.warning("no saved booted Debian guest for this machine (%s): booting cold", exc)
        return None


def run_restored(vm: QemuVM) -> float:
    """Wait until QEMU has loaded the saved machine (it stays paused: the stream says so), then run it."""
    started = time.monotonic()
    while (status := vm.status()) == "inmigrate":
        if not vm.alive() or time.monotonic() - started > _RESTORE_TIMEOUT_S:
            raise QemuError(f"the saved Debian guest was not loaded: {vm.log_tail()}")
        time.sleep(0.05)
    if status not in ("paused", "prelaunch", "running"):
        raise QemuError(f"the restored Debian guest is {status!r}: {vm.log_tail()}")
    if status != "running":
        vm.resume()
    return time.monotonic() - started
