# Long file: the QEMU process and every QMP command sealift sends it, sharing its state.
"""A QEMU VM as its agent sees it: a supervised ``qemu-system-x86_64`` process driven over QMP.

Files, all in one VM directory (mode 0700: the QMP socket is the VM's root
console, so only root may reach it)::

    NAME.json     what the VM was started with (for adopt and list)
    NAME.pid      QEMU's pid (written by QEMU)
    NAME.qmp      QMP unix socket (QEMU is the server)
    NAME.console  the guest's serial console (the workload's counter lines)
    NAME.log      QEMU's own stdout/stderr

QEMU runs in its own session, so it outlives its agent (as under libvirt);
a restarted agent finds it again with :meth:`QemuVM.adopt`. Signals go
through a pidfd taken while the pid is known to be this VM's QEMU, so a
recycled pid is never signalled. Every QMP call is time-bounded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.backends.process import file_tail, proc_cmdline, wait_until
from sealift.backends.qemu.debian_guest import DISK_PCI_ADDR, NIC_PCI_ADDR, GuestShape
from sealift.backends.qemu.definition import blockdev_args
from sealift.backends.qemu.host import HostError, choose_accel, qemu_binary
from sealift.backends.qemu.image import SERVICE_PORT, GuestImagePaths
from sealift.backends.qemu.net import NetConfig, NetError
from sealift.backends.qemu.qmp import DEFAULT_TIMEOUT_S, QmpConnection, QmpDisconnected, QmpError
from sealift.errors import SealiftError
from sealift.wire.vm_definition import BootSpec, FirmwareBoot, VmDefinition

__all__ = ["QemuError", "QemuVM", "VmRecord", "list_vms"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COUNTER_RE = re.compile(rb"sealift-counter (\d+)")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its terminating NUL
_MIN_MEMORY_MIB = 96  # the Debian kernel and the initramfs need about this much before the workload
_START_TIMEOUT_S = 15.0
_EXIT_TIMEOUT_S = 10.0
_LOG_TAIL_BYTES = 2000
_CONSOLE_TAIL_BYTES = 64 * 1024
_TCG_RAM_PAD_KIB = 4  # see _ram_size_arg
# QEMU's own defaults for the announcements it makes after an incoming migration.
_ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


class QemuError(SealiftError):
    """A QEMU VM could not be started, found, driven or stopped."""

    code = "qemu_error"


@dataclass(frozen=True)
class VmRecord:
    """One VM found in a VM directory (from its files, without talking to QEMU)."""

    name: str
    pid: int | None
    alive: bool
    memory_mib: int
    accel: str
    net_mode: str


def _is_our_qemu(pid: int, qmp_path: Path) -> bool:
    """Whether ``pid`` is a QEMU serving this VM's QMP socket (and not a recycled pid)."""
    return any(str(qmp_path) in arg for arg in proc_cmdline(pid))


def _read_pid(pid_path: Path) -> int | None:
    try:
        return int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None


def _prepare_vm_dir(vm_dir: Path) -> None:
    """Create ``vm_dir`` private to its owner (it holds the QMP socket), or tighten it."""
    vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = vm_dir.stat()
    if st.st_uid != os.geteuid():
        raise QemuError(f"VM directory {vm_dir} belongs to uid {st.st_uid}, not to us: refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(vm_dir, 0o700)


@dataclass(frozen=True)
class _Paths:
    spec: Path
    pid: Path
    qmp: Path
    console: Path
    log: Path

    @classmethod
    def of(cls, vm_dir: Path, name: str) -> _Paths:
        base = vm_dir / name
        return cls(*(Path(f"{base}.{ext}") for ext in ("json", "pid", "qmp", "console", "log")))


@dataclass(frozen=True)
class _Spec:
    """What a VM was started with; saved as NAME.json so a restarted agent can adopt it."""

    name: str
    memory_mib: int
    accel: str
    kernel: str
    initramfs: str
    cmdline: str
    incoming: str | None
    net: NetConfig
    definition: VmDefinition = VmDefinition()  # vCPUs and disks (definition.py)
    # "sealift" (the test image) or "debian": the Debian guest's machine shape (fixed PCI slots and MAC,
    # as its saved booted state has them, debian_guest.py).
    guest: str = "sealift"

    def to_json(self) -> str:
        data = {**self.__dict__, "net": self.net.to_json(), "definition": self.definition.to_json()}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> _Spec:
        try:
            data = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                memory_mib=int(data["memory_mib"]),
                accel=str(data["accel"]),
                kernel=str(data["kernel"]),
                initramfs=str(data["initramfs"]),
                cmdline=str(data["cmdline"]),
                incoming=data.get("incoming"),
                net=NetConfig.from_json(data["net"]),
                definition=VmDefinition.from_json(data["definition"]) if "definition" in data else VmDefinition(),
                guest=str(data.get("guest", "sealift")),
            )
        except (OSError, ValueError, KeyError, TypeError, NetError, SealiftError) as exc:
            raise QemuError(f"cannot read VM description {path}: {exc}") from exc


def _ram_size_arg(spec: _Spec) -> str:
    """QEMU's -m: under TCG, one page more than asked.

    QEMU before 9.0 under TCG loses guest writes during a migration when the
    RAM block's length is a multiple of 64 pages: its word-at-a-time dirty
    bitmap sync clears the bits without bringing the TCG TLB up to date, so
    later stores through the TLB are not logged (fixed upstream in 2024:
    "physmem: Fix migration dirty bitmap coherency with TCG memory access").
    Here, a migration needing a second live pass crashed the destination
    guest every time. With one extra page QEMU syncs page by page, which
    resets the TLB. Both ends compute the same size, so their RAM matches.
    """
    if spec.accel == "tcg":
        return f"{spec.memory_mib * 1024 + _TCG_RAM_PAD_KIB}K"
    return f"{spec.memory_mib}M"


def _qemu_argv(spec: _Spec, paths: _Paths) -> list[str]:
    # TCG: QEMU picks multi-threaded TCG itself where the host allows; with one vCPU it is moot.
    argv = [
        qemu_binary(),
        "-name",
        f"{spec.name},debug-threads=on",
        "-machine",
        "q35",
        "-accel",
        spec.accel,
        "-smp",
        str(spec.definition.cpus),
        "-m",
        _ram_size_arg(spec),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",  # a guest that panics (panic=-1) ends QEMU instead of rebooting in a loop
        *_boot_args(spec),
        "-chardev",
        f"file,id=console,path={paths.console}",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
        "-pidfile",
        str(paths.pid),
    ]
    if spec.guest == "debian":
        # The shape the saved booted state was made with: a restore loads only into the same machine.
        shape = GuestShape()
        argv += spec.net.qemu_args(spec.name, SERVICE_PORT, mac=shape.mac, pci_addr=NIC_PCI_ADDR)
        argv += blockdev_args(spec.definition, first_pci_slot=int(DISK_PCI_ADDR, 16))
    else:
        argv += spec.net.qemu_args(spec.name, SERVICE_PORT)
        argv += blockdev_args(spec.definition)
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    return argv


def _boot_args(spec: _Spec) -> list[str]:
    """The kernel QEMU loads itself, or (firmware boot) the BIOS that boots disk 0.

    A firmware-booted guest's kernel command line is the one its boot loader
    holds on its disk: sealift's (``spec.cmdline``) does not reach it.
    """
    boot = spec.definition.boot
    if isinstance(boot, FirmwareBoot):
        # bootindex is not needed: -nodefaults leaves no floppy, CD or other disk ahead of virtio disk 0.
        return ["-bios", boot.firmware]
    return ["-kernel", spec.kernel, "-initrd", spec.initramfs, "-append", spec.cmdline]


def _boot_info(boot: BootSpec | FirmwareBoot | None) -> dict[str, str]:
    """How the VM boots, for `vm info`/`vm list`."""
    if isinstance(boot, FirmwareBoot):
        return {"from": "disk", "firmware": boot.firmware}
    if isinstance(boot, BootSpec):
        return {"from": "kernel", "kernel": boot.kernel, "initrd": boot.initrd}
    return {"from": "image"}


def _check_paths(vm_dir: Path, paths: _Paths) -> None:
    if "," in str(vm_dir):
        raise QemuError(f"VM directory {vm_dir} contains a comma, which QEMU's option syntax cannot carry")
    if len(str(paths.qmp)) > _UNIX_PATH_MAX:
        raise QemuError(f"QMP socket path {paths.qmp} is longer than {_UNIX_PATH_MAX} bytes: use a shorter vm_dir")


class QemuVM:
    """A running (or just exited) QEMU VM. Create with :meth:`start` or :meth:`adopt`."""

    def __init__(
        self, vm_dir: Path, spec: _Spec, pid: int, pidfd: int, proc: subprocess.Popen[bytes] | None, qmp: QmpConnection
    ) -> None:
        self.vm_dir = vm_dir
        self._spec = spec
        self._paths = _Paths.of(vm_dir, spec.name)
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._proc = proc  # set when this process started QEMU (and so must reap it)
        self._qmp = qmp

    # -- creation ----------------------------------------------------------------

    @classmethod
    def start(
        cls,
        vm_dir: Path,
        name: str,
        memory_mib: int,
        image: GuestImagePaths,
        *,
        incoming: str | None = None,
        net: NetConfig | None = None,
        extra_cmdline: str = "",
        accel: str | None = None,
        definition: VmDefinition | None = None,
        guest: str = "sealift",
    ) -> QemuVM:
        """Launch QEMU for VM ``name`` and connect to its QMP socket.

        ``incoming``: "defer" for a migration destination (then
        :meth:`migrate_incoming`), or a migration URI. ``extra_cmdline``:
        guest settings such as ``sealift.mem_mib=64 sealift.rate_mib=32``.
        ``accel``: "kvm", "tcg", or None for KVM where it works. ``guest``:
        "debian" gives the Debian guest's machine shape (debian_guest.py).
        """
        if not _NAME_RE.match(name):
            raise QemuError(f"bad VM name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        if memory_mib < _MIN_MEMORY_MIB:
            raise QemuError(f"{memory_mib} MiB is too little for the guest: give it at least {_MIN_MEMORY_MIB} MiB")
        net = (net or NetConfig.none()).validated()
        paths = _Paths.of(vm_dir, name)
        _check_paths(vm_dir, paths)
        _prepare_vm_dir(vm_dir)
        cls._refuse_if_running(paths, name)
        try:
            # A firmware boot has no kernel file to probe KVM with (the kernel is on its disk).
            probe = None if isinstance((definition or VmDefinition()).boot, FirmwareBoot) else image.kernel
            chosen = choose_accel(accel, probe)
        except HostError as exc:
            raise QemuError(str(exc)) from exc
        spec = _Spec(
            name=name,
            memory_mib=memory_mib,
            accel=chosen,
            kernel=str(image.kernel),
            initramfs=str(image.initramfs),
            cmdline=" ".join(filter(None, ("console=ttyS0 quiet panic=-1", net.kernel_args(), extra_cmdline))),
            incoming=incoming,
            net=net,
            definition=definition or VmDefinition(),
            guest=guest,
        )
        try:
            argv = _qemu_argv(spec, paths)
        except HostError as exc:
            raise QemuError(str(exc)) from exc
        tmp = paths.spec.with_suffix(".json.tmp")
        tmp.write_text(spec.to_json())
        os.replace(tmp, paths.spec)
        try:
            with open(paths.log, "wb") as log:
                # Own session: QEMU survives its agent. umask 077: socket, console and pidfile private.
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    umask=0o077,
                    close_fds=True,
                )
        except OSError as exc:
            paths.spec.unlink(missing_ok=True)
            raise QemuError(f"cannot launch {argv[0]} for VM {name}: {exc}") from exc
        pidfd = os.pidfd_open(proc.pid)
        qmp = QmpConnection(paths.qmp, f"qmp-{name}")
        vm = cls(vm_dir, spec, proc.pid, pidfd, proc, qmp)
        try:
            vm._connect_after_start()
        except BaseException:
            vm.kill()  # never leave a QEMU behind that nobody knows about
            raise
        return vm

    @staticmethod
    def _refuse_if_running(paths: _Paths, name: str) -> None:
        pid = _read_pid(paths.pid)
        if pid is not None and _is_our_qemu(pid, paths.qmp):
            raise QemuError(f"VM {name} is already running (pid {pid}): stop it first, or adopt it")
        for stale in (paths.pid, paths.qmp):
            stale.unlink(missing_ok=True)

    def _connect_after_start(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._paths.qmp.exists():
            if not self.alive():
                raise QemuError(f"QEMU for VM {self.name} exited at start-up: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(
                    f"QEMU for VM {self.name} made no QMP socket in {_START_TIMEOUT_S:.0f} s: {self.log_tail()}"
                )
            time.sleep(0.02)
        try:
            self._qmp.connect(timeout=max(1.0, deadline - time.monotonic()))
        except QmpError as exc:
            raise QemuError(f"cannot talk QMP to VM {self.name}: {exc}; QEMU said: {self.log_tail()}") from exc

    @classmethod
    def adopt(cls, vm_dir: Path, name: str) -> QemuVM:
        """Take over a VM that an earlier agent started (QEMU kept running in its own session)."""
        paths = _Paths.of(vm_dir, name)
        if not paths.spec.exists():
            raise QemuError(f"no VM {name} in {vm_dir}: it is not running (or was stopped)")
        spec = _Spec.load(paths.spec)
        pid = _read_pid(paths.pid)
        if pid is None:
            raise QemuError(f"VM {name} has no pidfile {paths.pid}: it is not running")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            raise QemuError(f"VM {name} (pid {pid}) is not running") from exc
        # Checked after taking the pidfd: from now on the pidfd cannot refer to a recycled pid.
        if not _is_our_qemu(pid, paths.qmp):
            os.close(pidfd)
            raise QemuError(f"pid {pid} is not VM {name}'s QEMU: the VM is gone")
        qmp = QmpConnection(paths.qmp, f"qmp-{name}")
        vm = cls(vm_dir, spec, pid, pidfd, None, qmp)
        try:
            qmp.connect(timeout=DEFAULT_TIMEOUT_S)
        except QmpError as exc:
            vm.close()
            raise QemuError(f"cannot talk QMP to VM {name} (is another agent connected?): {exc}") from exc
        return vm

    # -- properties --------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def memory_mib(self) -> int:
        return self._spec.memory_mib

    @property
    def memory_bytes(self) -> int:
        return self._spec.memory_mib << 20

    @property
    def accel(self) -> str:
        return self._spec.accel

    @property
    def net(self) -> NetConfig:
        return self._spec.net

    @property
    def definition(self) -> VmDefinition:
        return self._spec.definition

    @property
    def console_path(self) -> Path:
        return self._paths.console

    @property
    def qmp_path(self) -> Path:
        return self._paths.qmp

    @property
    def log_path(self) -> Path:
        return self._paths.log

    # -- process -----------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the QEMU process still runs (a child that exited is reaped here)."""
        if self._proc is not None:
            return self._proc.poll() is None
        if self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable  # a pidfd becomes readable when its process exits

    def wait_exit(self, timeout: float) -> bool:
        """Wait until QEMU has exited; True if it did within ``timeout``."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return wait_until(lambda: not self.alive(), timeout)

    def exit_code(self) -> int | None:
        """QEMU's exit status, when this process started it and it has exited."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self) -> str:
        text = file_tail(self._paths.log, _LOG_TAIL_BYTES).decode("utf-8", "replace").strip()
        return text or "(QEMU printed nothing)"

    def _forget_files(self) -> None:
        for path in (self._paths.spec, self._paths.pid, self._paths.qmp):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Let go of the VM without stopping it (QMP closed, pidfd released)."""
        self._qmp.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def quit(self, timeout: float = _EXIT_TIMEOUT_S) -> None:
        """Ask QEMU to exit (QMP ``quit``) and wait for it; the guest gets no warning."""
        if self.alive():
            if not self._qmp.connected:
                raise QemuError(f"VM {self.name}: no QMP connection to send quit on (closed, or adopted elsewhere)")
            try:
                self._qmp.execute("quit", timeout=timeout)
            except QmpDisconnected:
                pass  # QEMU may close the socket before its answer to quit reaches us
            except QmpError as exc:
                raise QemuError(f"VM {self.name}: quit failed: {exc}") from exc
            if not self.wait_exit(timeout):
                raise QemuError(f"VM {self.name} (pid {self.pid}) did not exit within {timeout:.0f} s of quit")
        self._forget_files()
        self.close()

    def kill(self) -> None:
        """SIGKILL QEMU (through its pidfd, or as our child) and reap it."""
        if self.alive():
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                elif self._proc is not None:
                    self._proc.kill()
            except ProcessLookupError:
                pass  # it exited on its own meanwhile
            if not self.wait_exit(_EXIT_TIMEOUT_S):
                raise QemuError(f"VM {self.name} (pid {self.pid}) survived SIGKILL for {_EXIT_TIMEOUT_S:.0f} s")
        self._forget_files()
        self.close()

    def stop_vm(self, timeout: float = _EXIT_TIMEOUT_S) -> None:
        """Stop the VM for good: quit, and kill if QEMU does not go."""
        try:
            self.quit(timeout)
        except QemuError:
            self.kill()

    # -- QMP -----------------------------------------------------------------------

    def qmp(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        oob: bool = False,
    ) -> Any:
        """Run any QMP command (time-bounded); QEMU's refusal becomes a QemuError.

        `oob`: out of band (exec-oob), for the few commands QEMU runs while its main loop is blocked,
        e.g. migrate-recover on a destination whose post-copy paused with a vCPU waiting on a page.
        """
        try:
            return self._qmp.execute(command, arguments, timeout=timeout, oob=oob)
        except QmpError as exc:
            raise QemuError(f"VM {self.name}: {exc}") from exc

    def status(self) -> str:
        """QEMU's run state ("running", "paused", "inmigrate", "postmigrate", ...), or "exited"."""
        if not self.alive():
            return "exited"
        return str(self.qmp("query-status")["status"])

    def pause(self) -> None:
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    def recent_events(self) -> list[dict[str, Any]]:
        return self._qmp.recent_events()

    def wait_event(self, timeout: float) -> bool:
        """Sleep up to `timeout` s, waking early on any QMP event (see QmpConnection.wait_event)."""
        return self._qmp.wait_event(timeout)

    # -- migration -----------------------------------------------------------------

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate"))

    def set_migration_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        caps = [{"capability": name, "state": bool(state)} for name, state in capabilities.items()]
        self.qmp("migrate-set-capabilities", {"capabilities": caps})

    def set_migration_parameters(self, parameters: Mapping[str, Any]) -> None:
        self.qmp("migrate-set-parameters", parameters)

    def query_migrate_parameters(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate-parameters"))

    def migrate(self, uri: str, resume: bool = False) -> None:
        """Start an outgoing migration (returns at once; follow it with :meth:`query_migrate`).

        `resume`: go on with a post-copy paused by a broken connection (the destination ran migrate-recover).
        """
        self.qmp("migrate", {"uri": uri, "resume": True} if resume else {"uri": uri})

    def migrate_to_socket(self, sock: socket.socket, name: str = "sealift-migration", resume: bool = False) -> None:
        """Start an outgoing migration into `sock`, a connected socket of ours that QEMU gets a copy of.

        Unlike ``unix:`` (QEMU opens the socket), the caller sets the socket's
        options first, e.g. a send buffer deep enough to keep QEMU writing.
        """
        try:
            self._qmp.pass_fd(sock.fileno(), name)
        except QmpError as exc:
            raise QemuError(f"VM {self.name}: {exc}") from exc
        try:
            self.migrate(f"fd:{name}", resume)
        except QemuError:
            self._close_named_fd(name)
            raise

    def _close_named_fd(self, name: str) -> None:
        """Drop a descriptor passed with getfd that no migration took (else QEMU keeps it open)."""
        try:
            self.qmp("closefd", {"fdname": name})
        except QemuError:
            pass  # already taken by the refused command, or QEMU is gone: nothing left open either way

    def migrate_incoming(self, uri: str) -> None:
        """Listen for the incoming stream (the VM must have been started with incoming="defer")."""
        self.qmp("migrate-incoming", {"uri": uri})

    def migrate_continue(self, state: str = "pre-switchover") -> None:
        """Let a migration paused by ``pause-before-switchover`` go on to the switchover."""
        self.qmp("migrate-continue", {"state": state})

    def migrate_cancel(self) -> None:
        self.qmp("migrate_cancel")

    def announce_self(self) -> None:
        """Make the NIC announce its MAC (RARP), so switches learn where the VM now is."""
        self.qmp("announce-self", _ANNOUNCE)

    def wait_migration(self, statuses: set[str], timeout: float, interval: float = 0.05) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``statuses``; returns that answer.

        A migration that fails (or is cancelled) while another status is awaited
        raises at once, with QEMU's reason.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = info.get("status", "none")
            if status in statuses:
                return info
            if status in ("failed", "cancelled"):
                reason = info.get("error-desc", "no reason given")
                raise QemuError(f"VM {self.name}: migration {status} ({reason})")
            if time.monotonic() >= deadline:
                raise QemuError(
                    f"VM {self.name}: migration still {status!r} after {timeout:.0f} s (waiting for {sorted(statuses)})"
                )
            time.sleep(interval)

    # -- guest -----------------------------------------------------------------------

    def counter(self) -> int | None:
        """The last progress counter the guest printed on its console, if any yet."""
        matches = _COUNTER_RE.findall(file_tail(self._paths.console, 16 * 1024))
        return int(matches[-1]) if matches else None

    def wait_counter(self, above: int = 0, timeout: float = 60.0) -> int:
        """Wait until the console counter exceeds ``above``; returns it."""
        seen: list[int] = []

        def advanced() -> bool:
            value = self.counter()
            if value is not None and value > above:
                seen.append(value)
                return True
            return not self.alive()

        if not wait_until(advanced, timeout, 0.1) or not seen:
            state = "exited" if not self.alive() else f"counter {self.counter()}"
            raise QemuError(
                f"VM {self.name}: no counter above {above} within {timeout:.0f} s ({state}); "
                f"console: {' | '.join(self.console_tail(5))}"
            )
        return seen[-1]

    def console_tail(self, lines: int = 20) -> list[str]:
        text = file_tail(self._paths.console, _CONSOLE_TAIL_BYTES).decode("utf-8", "replace")
        return [line.rstrip("\r") for line in text.splitlines()][-lines:]

    def probe(self, timeout: float = 0.5) -> int | None:
        """Ask the guest's UDP service for its counter; None if no answer within ``timeout``."""
        address = self._spec.net.probe_address(SERVICE_PORT)
        if address is None:
            raise QemuError(f"VM {self.name} has no network ({self._spec.net.mode}): nothing to probe")
        return probe_udp(address, timeout)

    def info(self) -> dict[str, Any]:
        alive = self.alive()
        status = "exited"
        if alive:
            try:
                status = self.status()
            except QemuError:
                status = "unreachable"  # QEMU runs but does not answer QMP
        return {
            "name": self.name,
            "pid": self.pid,
            "alive": alive,
            "memory_mib": self.memory_mib,
            "accel": self.accel,
            "status": status,
            "counter": self.counter(),
            "net": self._spec.net.to_json(),
            "cpus": self._spec.definition.cpus,
            "boot": _boot_info(self._spec.definition.boot),
            "disks": [
                {"path": d.path, "format": d.format, "virtual_size": d.virtual_size, "shared": d.shared}
                for d in self._spec.definition.disks
            ],
            "console": str(self._paths.console),
        }


def probe_udp(address: tuple[str, int], timeout: float) -> int | None:
    """Send one probe to a guest service; return the counter in the matching answer, or None."""
    token = secrets.token_hex(8).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(token, address)
        except OSError:
            return None
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                reply = sock.recv(256)
            except OSError:  # timeout, or refused: QEMU (and its port forward) is gone
                return None
            counter, _, echoed = reply.partition(b" ")
            if echoed == token and counter.isdigit():
                return int(counter)
            # An answer to an earlier probe (or noise): keep waiting for ours.
    return None


def list_vms(vm_dir: Path) -> list[VmRecord]:
    """The VMs described in ``vm_dir``, running or not (a dead one that was not stopped has crashed)."""
    records: list[VmRecord] = []
    for spec_path in sorted(vm_dir.glob("*.json")):
        try:
            spec = _Spec.load(spec_path)
        except QemuError:
            continue  # not one of ours
        paths = _Paths.of(vm_dir, spec.name)
        pid = _read_pid(paths.pid)
        alive = pid is not None and _is_our_qemu(pid, paths.qmp)
        records.append(VmRecord(spec.name, pid, alive, spec.memory_mib, spec.accel, spec.net.mode))
    return records
