"""The host side of QEMU: where the binary is, its version, and whether KVM really works here.

"/dev/kvm exists" is not "KVM works": inside some virtual machines (nested
virtualisation without full support) /dev/kvm opens, creates VMs and even
runs the BIOS, but a Linux kernel never gets past its switch to long mode.
So usability is decided by booting the guest's own kernel under KVM for a
few seconds and watching for its first line on the serial port. The answer
is remembered in the process and in ``/run/sealift/kvm-probe.json`` (tmpfs:
forgotten at the host's next boot, and keyed by the boot id and the QEMU
version), so a broken KVM costs its probe once per boot rather than once per
agent. ``SEALIFT_QEMU_ACCEL=tcg|kvm`` overrides the probe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["QEMU_BINARY", "HostError", "choose_accel", "kvm_usable", "qemu_binary", "qemu_version"]

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
_KVM_PROBE_S = 8.0  # a working KVM reaches the kernel's banner in well under a second
# The kernel proper's first line. Earlier output (the real-mode setup's "Probing EDD")
# does not count: a broken nested KVM gets that far and then hangs.
_KERNEL_BANNER = b"Linux version"
_PROBE_RECORD = Path("/run/sealift/kvm-probe.json")
_probe_lock = threading.Lock()
_probe_result: bool | None = None


class HostError(Exception):
    """QEMU is missing, or the requested accelerator cannot be used here."""


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise HostError(
            f"{QEMU_BINARY} is not installed: install the Debian package qemu-system-x86 "
            "(bash scripts/run.sh setup does)"
        )
    return path


def qemu_version() -> str:
    """E.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"."""
    done = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = done.stdout.splitlines()[0] if done.stdout else ""
    return first.removeprefix("QEMU emulator version ").strip() or "unknown"


def _kvm_device_ok() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _kvm_boots(kernel: Path) -> bool:
    """Boot ``kernel`` under KVM and wait briefly for the kernel's banner on the serial port."""
    with tempfile.TemporaryDirectory(prefix="sealift-kvm-probe-") as scratch:
        serial = Path(scratch) / "serial"
        argv = [
            qemu_binary(),
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
            "-serial",
            f"file:{serial}",
        ]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + _KVM_PROBE_S
            while time.monotonic() < deadline and proc.poll() is None:
                if _KERNEL_BANNER in _read(serial):
                    return True
                time.sleep(0.05)
            return _KERNEL_BANNER in _read(serial)
        finally:
            proc.kill()
            proc.wait()


def _probe_key() -> dict[str, str]:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return {"boot_id": boot_id, "qemu": qemu_version()}


def _recorded_probe(key: dict[str, str]) -> bool | None:
    try:
        record = json.loads(_PROBE_RECORD.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("usable"), bool):
        return None
    return bool(record["usable"])


def _record_probe(key: dict[str, str], usable: bool) -> None:
    try:
        _PROBE_RECORD.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = _PROBE_RECORD.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "usable": usable}) + "\n")
        os.replace(tmp, _PROBE_RECORD)
    except OSError as exc:
        log.debug("cannot record the KVM probe in %s: %s", _PROBE_RECORD, exc)  # only a cache


def kvm_usable(kernel: Path | None) -> bool:
    """Whether KVM can run a guest on this host (probed with ``kernel`` once per boot).

    Without a kernel to probe with (a firmware boot) only an earlier probe's
    answer counts; none yet means TCG, slower but always correct.
    """
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            if not _kvm_device_ok():
                _probe_result = False
            else:
                key = _probe_key()
                recorded = _recorded_probe(key)
                if recorded is None:
                    if kernel is None:
                        return False  # not remembered: a later probe with a kernel decides
                    recorded = _kvm_boots(kernel)
                    _record_probe(key, recorded)
                    log.info("KVM is %s on this host", "usable" if recorded else "not usable (using TCG)")
                _probe_result = recorded
        return _probe_result


def choose_accel(requested: str | None, kernel: Path | None) -> str:
    """Either "kvm" or "tcg": the request, else $SEALIFT_QEMU_ACCEL, else KVM where it works."""
    choice = requested or os.environ.get("SEALIFT_QEMU_ACCEL") or "auto"
    if choice == "tcg":
        return "tcg"
    if choice == "kvm":
        if not _kvm_device_ok():
            raise HostError("KVM was requested but /dev/kvm is missing or unusable (use accel='tcg')")
        return "kvm"
    if choice != "auto":
        raise HostError(f"unknown accelerator {choice!r}: use 'kvm', 'tcg' or 'auto'")
    return "kvm" if kvm_usable(kernel) else "tcg"
