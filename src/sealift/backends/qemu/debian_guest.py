"""The Debian guest booted once and saved, so every test guest starts from a running system in seconds.

Under TCG the Debian guest needs 25-60 s to boot to nginx and redis.
``ensure_saved_state(image, shape)`` pays that once: it boots the image on
a qcow2 overlay with a NIC on a tap (in a private network namespace, so
the NIC negotiates what a tap offers, as it will after a restore), waits
for the guest's own ``sealift-guest-ready`` line (nginx served its page
and redis holds the secret, checked over TCP inside the guest), stops it
(QMP ``stop``: QEMU drains and flushes the disk), saves the machine with
``migrate exec:cat > memory.state`` and keeps the overlay as it was then,
read-only. It lives beside the image
(``debian/<image key>/states/<state key>/``), keyed by the image's key and
the shape of the QEMU command line (memory, accelerator, devices and their
PCI slots, kernel command line with the guest's address, MAC, QEMU version).

A guest from the saved state (:func:`restore_guest` does all of it):
``new_overlay(state, path)`` (a fresh copy-on-write qcow2 backed by the
saved overlay, so each guest is independent), then QEMU with
:func:`guest_argv` (or the pieces: :func:`machine_args`,
:func:`boot_args`, :func:`disk_args`, :func:`nic_args`) and ``-incoming``
:func:`incoming_uri`. The stream carries the stopped run state, so the
loaded guest stays paused until ``cont``. The guest's address and MAC are
those of the saved state (they live in its memory), so one saved state
serves one guest per VM network at a time; its wall clock resumes from the
moment of the save.

:class:`GuestProcess` is the small launcher the save, the tests and the
bench use; the agents' VMs (``vm.py``) are meant to take the same argv
pieces (a migration's destination: the same pieces with ``-incoming defer``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sealift.backends.process import file_tail
from sealift.backends.qemu.debian_image import (
    NOT_READY_LINE,
    READY_LINE,
    DebianGuestError,
    DebianImage,
    build_debian_image,
)
from sealift.backends.qemu.host import HostError, qemu_binary, qemu_version
from sealift.backends.qemu.image_cache import MANIFEST, cached_build
from sealift.backends.qemu.net import mac_for
from sealift.backends.qemu.qmp import QmpConnection, QmpError

__all__ = [
    "GuestProcess",
    "GuestShape",
    "SavedState",
    "boot_args",
    "cli_build_debian",
    "disk_args",
    "ensure_saved_state",
    "guest_argv",
    "incoming_uri",
    "machine_args",
    "memory_arg",
    "new_overlay",
    "nic_args",
    "restore_guest",
]

log = logging.getLogger(__name__)

STATE_FORMAT = 1  # bump when the save changes for the same image and shape
# Fixed PCI slots: the saved device state and a restoring QEMU must agree on them, whatever
# order a caller puts the -device options in.
NIC_PCI_ADDR = "0x3"
DISK_PCI_ADDR = "0x4"
_TCG_RAM_PAD_KIB = 4  # as vm.py's _ram_size_arg: QEMU 7.2 under TCG needs RAM that is not 64 pages aligned
_BOOT_TIMEOUT_S = 240.0
_SAVE_TIMEOUT_S = 180.0
_START_TIMEOUT_S = 15.0
_STATE_FILE = "memory.state"
_OVERLAY_FILE = "overlay.qcow2"
_SAVE_NETNS_PREFIX = "sld-save-"


@dataclass(frozen=True)
class GuestShape:
    """What a saved state fixes: the machine and what the guest's memory already holds (address, MAC)."""

    memory_mib: int = 256
    accel: str = "tcg"
    guest_ip: str = "10.78.0.10/24"  # the lab's VM network (lab/testbed.py GUEST_IPS)
    gateway: str | None = None
    mac: str = mac_for("sealift-debian")

    def kernel_cmdline(self) -> str:
        # quiet: every console line costs time under TCG. net.ifnames=0: the NIC is eth0 (sealift-net).
        return (
            "root=/dev/vda rw console=ttyS0 quiet panic=-1 net.ifnames=0 "
            f"sealift.ip={self.guest_ip} sealift.gw={self.gateway or 'none'}"
        )


@dataclass(frozen=True)
class SavedState:
    """A booted Debian guest, stopped and saved: restore with -incoming from ``stream`` on an overlay of ``overlay``."""

    dir: Path
    image: DebianImage
    shape: GuestShape
    key: str
    overlay: Path  # qcow2 backed by image.disk, read-only: the disk as it was at the save
    stream: Path  # QEMU's migration stream of the stopped guest
    boot_seconds: float  # QEMU start to sealift-guest-ready, when it was made
    save_seconds: float

    def to_json(self) -> dict[str, Any]:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        data["image"] = self.image.to_json()
        data["shape"] = asdict(self.shape)
        return data


# -- the command line ------------------------------------------------------------


def memory_arg(memory_mib: int, accel: str) -> str:
    """QEMU's -m: under TCG one page more than asked (see vm.py's _ram_size_arg for the QEMU 7.2 bug)."""
    return f"{memory_mib * 1024 + _TCG_RAM_PAD_KIB}K" if accel == "tcg" else f"{memory_mib}M"


def machine_args(shape: GuestShape) -> list[str]:
    """The machine: q35, one vCPU, no default devices (as vm.py starts every guest)."""
    return [
        "-machine",
        "q35",
        "-accel",
        shape.accel,
        "-smp",
        "1",
        "-m",
        memory_arg(shape.memory_mib, shape.accel),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]


def boot_args(image: DebianImage, shape: GuestShape) -> list[str]:
    """Direct kernel boot. A restore needs them too: QEMU compares the option ROMs the kernel loader made."""
    return ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", shape.kernel_cmdline()]


def disk_args(overlay: Path) -> list[str]:
    """The root disk: a virtio block device at a fixed PCI slot on a qcow2 (the guest's /dev/vda)."""
    if "," in str(overlay):
        raise DebianGuestError(f"disk path {overlay} contains a comma, which QEMU's option syntax cannot carry")
    return [
        "-drive",
        f"file={overlay},if=none,id=disk0,format=qcow2",
        "-device",
        f"virtio-blk-pci,drive=disk0,bus=pcie.0,addr={DISK_PCI_ADDR}",
    ]


def nic_args(tap: str, mac: str) -> list[str]:
    """A virtio NIC at a fixed PCI slot on an existing tap (script=no: the caller put it on its bridge)."""
    return [
        "-netdev",
        f"tap,id=net0,ifname={tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={mac},romfile=,bus=pcie.0,addr={NIC_PCI_ADDR}",
    ]


def incoming_uri(state: SavedState) -> str:
    """Where a restoring QEMU reads the saved machine (``-incoming URI`` or QMP migrate-incoming)."""
    return f"exec:cat {state.stream}"


def guest_argv(
    image: DebianImage, shape: GuestShape, *, disk: Path, tap: str, console: Path, qmp: Path, incoming: str | None
) -> list[str]:
    """A whole QEMU command line for a Debian guest (``incoming``: None boots, else the URI to restore from)."""
    argv = [qemu_binary(), "-name", "sealift-debian,debug-threads=on"]
    argv += machine_args(shape) + boot_args(image, shape) + disk_args(disk) + nic_args(tap, shape.mac)
    argv += ["-chardev", f"file,id=console,path={console}", "-serial", "chardev:console"]
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def new_overlay(state: SavedState, path: Path) -> Path:
    """A fresh copy-on-write disk for one guest, backed by the saved overlay (which stays untouched)."""
    _qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(state.overlay), str(path)])
    return path


def _qemu_img(args: list[str]) -> None:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise DebianGuestError("qemu-img is not installed (Debian package qemu-utils)") from exc
    if done.returncode != 0:
        raise DebianGuestError(f"`qemu-img {' '.join(args)}` failed: {done.stderr.strip()}")


# -- a QEMU process ---------------------------------------------------------------


class GuestProcess:
    """One QEMU started from an argv (optionally inside a network namespace), with its QMP and console."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp: QmpConnection, console: Path, log_path: Path) -> None:
        self.proc = proc
        self._qmp = qmp
        self.console = console
        self.log_path = log_path

    @classmethod
    def start(cls, argv: Sequence[str], workdir: Path, netns: str | None = None) -> GuestProcess:
        """Run ``argv`` (made by guest_argv with ``workdir``'s console and qmp paths) and connect to QMP."""
        qmp_path, console, log_path = workdir / "qmp.sock", workdir / "console.log", workdir / "qemu.log"
        if str(qmp_path) not in " ".join(argv):
            raise DebianGuestError(f"the QEMU command line does not use {qmp_path} for QMP")
        wrapped = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)  # exec: QEMU keeps this pid
        with open(log_path, "wb") as out:
            try:
                proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            except OSError as exc:
                raise DebianGuestError(f"cannot start QEMU: {exc}") from exc
        guest = cls(proc, QmpConnection(qmp_path, "qmp-debian"), console, log_path)
        try:
            guest._connect(qmp_path)
        except BaseException:
            guest.kill()
            raise
        return guest

    def _connect(self, qmp_path: Path) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DebianGuestError(f"QEMU made no QMP socket: {self.log_tail()}")
            time.sleep(0.02)
        try:
            self._qmp.connect(timeout=max(1.0, deadline - time.monotonic()))
        except QmpError as exc:
            raise DebianGuestError(f"cannot talk QMP to QEMU: {exc}; QEMU said: {self.log_tail()}") from exc

    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 10.0) -> Any:
        try:
            return self._qmp.execute(command, arguments, timeout=timeout)
        except QmpError as exc:
            raise DebianGuestError(f"QMP {command} failed: {exc}; QEMU said: {self.log_tail()}") from exc

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def log_tail(self) -> str:
        return file_tail(self.log_path, 2000).decode(errors="replace").strip() or "(nothing)"

    def console_tail(self, limit: int = 3000) -> str:
        return file_tail(self.console, limit).decode(errors="replace")

    def wait_console(self, line: bytes, timeout: float, fail_line: bytes | None = None) -> float:
        """Wait until the serial console shows ``line``; returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            text = self.console.read_bytes() if self.console.exists() else b""
            if line in text:
                return time.monotonic() - started
            if fail_line is not None and fail_line in text:
                raise DebianGuestError(f"the guest said it is not ready: {self.console_tail()}")
            if self.proc.poll() is not None:
                raise DebianGuestError(f"QEMU exited ({self.proc.returncode}): {self.log_tail()} {self.console_tail()}")
            time.sleep(0.2)
        raise DebianGuestError(f"no {line.decode()!r} on the console in {timeout:.0f} s: {self.console_tail()}")

    def wait_restored(self, timeout: float, start: bool = True) -> float:
        """Wait until a restoring guest's stream is loaded, then (``start``) run it; returns the seconds waited.

        The guest was stopped when it was saved, and the stream carries that
        run state, so QEMU keeps it paused after loading, whatever -S says:
        the caller decides when it runs (``cont``), as a migration destination does.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise DebianGuestError(f"QEMU exited while restoring: {self.log_tail()}")
            status = self.status()
            if status in ("paused", "running"):
                if start and status == "paused":
                    self.qmp("cont")
                return time.monotonic() - started
            if status != "inmigrate":
                raise DebianGuestError(f"the restoring guest is {status!r}: {self.log_tail()}")
            time.sleep(0.05)
        raise DebianGuestError(f"the saved guest was not loaded {timeout:.0f} s after QEMU started")

    def kill(self) -> None:
        """End QEMU now (a guest from a saved state has nothing to keep) and reap it."""
        self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


# -- the saved state --------------------------------------------------------------


def _state_key(image: DebianImage, shape: GuestShape) -> str:
    # The whole command line with placeholders for paths: any change of device, slot or option is a new state.
    template = guest_argv(
        image, shape, disk=Path("DISK"), tap="TAP", console=Path("CONSOLE"), qmp=Path("QMP"), incoming=None
    )
    material = {
        "format": STATE_FORMAT,
        "image": image.key,
        "shape": asdict(shape),
        "argv": [arg.replace(str(image.dir), "IMAGE") for arg in template[1:]],
        "qemu": qemu_version(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _load_state(image: DebianImage, shape: GuestShape, state_dir: Path) -> SavedState | None:
    try:
        info = json.loads((state_dir / MANIFEST).read_text())
        state = SavedState(
            dir=state_dir,
            image=image,
            shape=shape,
            key=str(info["key"]),
            overlay=state_dir / _OVERLAY_FILE,
            stream=state_dir / _STATE_FILE,
            boot_seconds=float(info["boot_seconds"]),
            save_seconds=float(info["save_seconds"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if state.overlay.is_file() and state.stream.is_file() else None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise DebianGuestError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _remove_stale_save_namespaces() -> None:
    """Remove the save namespaces of processes that were killed while saving (their pid is in the name)."""
    netns_dir = Path("/var/run/netns")
    if not netns_dir.is_dir():
        return
    for entry in netns_dir.glob(f"{_SAVE_NETNS_PREFIX}*"):
        try:
            owner = int(entry.name.removeprefix(_SAVE_NETNS_PREFIX), 16)
        except ValueError:
            continue
        if not Path(f"/proc/{owner}").exists():
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=10, check=False)


def _boot_and_save(image: DebianImage, shape: GuestShape, key: str, scratch: Path) -> Path:
    """Boot the image once in ``scratch``, wait for nginx and redis, save; returns the state's directory."""
    out = scratch / "out"
    out.mkdir()
    overlay = out / _OVERLAY_FILE
    _qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), str(overlay)])
    # A tap, in a namespace of its own, that nothing else sees: the NIC then negotiates a tap's offloads,
    # as it will after every restore onto a lab tap.
    _remove_stale_save_namespaces()
    netns, tap = f"{_SAVE_NETNS_PREFIX}{os.getpid():x}", "sld-save0"
    _ip("netns", "add", netns)
    guest: GuestProcess | None = None
    try:
        _ip("-n", netns, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip("-n", netns, "link", "set", tap, "up")
        argv = guest_argv(
            image,
            shape,
            disk=overlay,
            tap=tap,
            console=scratch / "console.log",
            qmp=scratch / "qmp.sock",
            incoming=None,
        )
        started = time.monotonic()
        guest = GuestProcess.start(argv, scratch, netns=netns)
        boot_s = guest.wait_console(READY_LINE, _BOOT_TIMEOUT_S, fail_line=NOT_READY_LINE)
        log.info("Debian guest ready after %.1f s; saving it", boot_s)
        save_started = time.monotonic()
        guest.qmp("stop")  # vm_stop drains and flushes the disk: the overlay now matches the memory
        guest.qmp("migrate", {"uri": f"exec:cat > {out / _STATE_FILE}"})
        _wait_saved(guest)
        save_s = time.monotonic() - save_started
        guest.kill()
        guest = None
    finally:
        if guest is not None:
            guest.kill()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10, check=False)
    shutil.copyfile(scratch / "console.log", out / "boot-console.log")
    for name in (_OVERLAY_FILE, _STATE_FILE):
        os.chmod(out / name, 0o444)  # read-only from now on: every guest gets its own overlay on top
    manifest = {
        "format": STATE_FORMAT,
        "key": key,
        "image": image.key,
        "shape": asdict(shape),
        "qemu": qemu_version(),
        "boot_seconds": round(boot_s, 1),
        "save_seconds": round(save_s, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "stream_bytes": (out / _STATE_FILE).stat().st_size,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _wait_saved(guest: GuestProcess) -> None:
    deadline = time.monotonic() + _SAVE_TIMEOUT_S
    while time.monotonic() < deadline:
        info = guest.qmp("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise DebianGuestError(f"saving the guest failed: {info.get('error-desc', status)}")
        time.sleep(0.1)
    raise DebianGuestError(f"saving the guest did not complete in {_SAVE_TIMEOUT_S:.0f} s")


def ensure_saved_state(image: DebianImage, shape: GuestShape | None = None, force: bool = False) -> SavedState:
    """The saved booted guest for ``image`` and ``shape``: from the cache, or booted and saved now (root)."""
    shape = shape or GuestShape()
    try:
        key = _state_key(image, shape)
    except HostError as exc:
        raise DebianGuestError(str(exc)) from exc
    states = image.dir / "states"
    states.mkdir(exist_ok=True)

    def load(state_dir: Path) -> SavedState | None:
        return _load_state(image, shape, state_dir)

    if os.geteuid() != 0 and load(states / key) is None:
        raise DebianGuestError("saving the Debian guest needs root (a tap device in a network namespace)")
    if shutil.which("ip") is None:
        raise DebianGuestError("`ip` is not installed (Debian package iproute2)")
    try:
        state, built = cached_build(
            states, key, load, lambda scratch: _boot_and_save(image, shape, key, scratch), force=force
        )
    except OSError as exc:
        raise DebianGuestError(f"saving the Debian guest failed: {exc}") from exc
    if built:
        log.info("saved the booted Debian guest in %s (boot %.1f s)", state.dir, state.boot_seconds)
    return state


def restore_guest(
    state: SavedState, workdir: Path, tap: str, *, netns: str | None = None, start: bool = True
) -> tuple[GuestProcess, float]:
    """A new guest from the saved state: its own overlay in ``workdir``, QEMU on ``tap`` (in ``netns``).

    Returns the guest, running (``start``) or paused, and the seconds QEMU
    took to load the saved machine. ``workdir`` must exist and be short
    (it holds the QMP socket).
    """
    disk = new_overlay(state, workdir / "disk.qcow2")
    argv = guest_argv(
        state.image,
        state.shape,
        disk=disk,
        tap=tap,
        console=workdir / "console.log",
        qmp=workdir / "qmp.sock",
        incoming=incoming_uri(state),
    )
    guest = GuestProcess.start(argv, workdir, netns=netns)
    try:
        return guest, guest.wait_restored(60.0, start=start)
    except BaseException:
        guest.kill()
        raise


def cli_build_debian(args: argparse.Namespace) -> int:
    """``sealift image build --guest debian [--saved-state]``: build (or find) the image and print where it is."""
    started = time.monotonic()
    try:
        image = build_debian_image(args.cache_dir, force=args.force)
        state = ensure_saved_state(image, force=args.force) if args.saved_state else None
    except DebianGuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = round(time.monotonic() - started, 2)
    if args.json:
        print(json.dumps({**image.to_json(), "saved_state": state.to_json() if state else None, "seconds": elapsed}))
        return 0
    print(f"Debian guest image {image.key}\n  disk    {image.disk}\n  kernel  {image.kernel} ({image.kernel_release})")
    print(f"  initrd  {image.initrd}")
    if state is not None:
        print(f"  saved   {state.stream} (booted in {state.boot_seconds} s; disk {state.overlay})")
    print(f"  ({elapsed:.1f} s)")
    return 0
