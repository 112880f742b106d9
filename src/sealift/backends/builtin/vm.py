"""A built-in VM as its agent sees it: a guest process plus its image and dirty log.

Files, all in one VM directory (``/dev/shm/...`` for real use)::

    NAME.img    the image (state area + RAM), see ``image.py``
    NAME.dirty  the dirty log of the current guest process, see ``dirtylog.py``
    NAME.log    the guest's stdout/stderr

The guest runs in its own session so it outlives its agent (as QEMU outlives
libvirtd); a restarted agent finds it again with :meth:`BuiltinVM.adopt`.
Signals go through a pidfd taken once the pid is known to be the guest, so
a recycled pid is never signalled.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealift.backends.builtin.dirtylog import DirtyLog, DirtyLogError
from sealift.backends.builtin.guest import READY_MESSAGE, image_in_use
from sealift.backends.builtin.image import DEFAULT_SECRET, GuestImage, ImageCheck, ImageError
from sealift.backends.builtin.workload import WorkloadError, get_profile
from sealift.backends.process import file_tail, proc_cmdline, wait_until
from sealift.errors import SealiftError

__all__ = ["BuiltinVM", "StandbyGuest", "VmError", "GUEST_MODULE"]

GUEST_MODULE = "sealift.backends.builtin.guest"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOG_TAIL_BYTES = 2000


class VmError(SealiftError):
    """A built-in VM could not be created, started, found, paused or stopped."""

    code = "vm_error"


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3].decode("ascii")


def _log_tail(log_path: Path) -> str:
    return file_tail(log_path, _LOG_TAIL_BYTES, unreadable=b"(no log)").decode("utf-8", "replace").strip()


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` with a short, growing interval (the guest answers a signal within microseconds)."""
    return wait_until(predicate, timeout, interval=0.0005, max_interval=0.02)


def _boot_timeout(memory_bytes: int, fill_fraction: float) -> float:
    # Filling fresh tmpfs memory costs up to ~3.4 s/GiB on these hosts; allow 3x.
    return 20.0 + 10.0 * fill_fraction * memory_bytes / (1 << 30)


class BuiltinVM:
    """Handle on one built-in guest. Build with :meth:`create`, :meth:`start_on_image` or :meth:`adopt`."""

    def __init__(
        self,
        *,
        vm_dir: Path,
        name: str,
        pid: int,
        pidfd: int,
        popen: subprocess.Popen[bytes] | None,
        image: GuestImage,
        dirty: DirtyLog,
    ) -> None:
        self.vm_dir = vm_dir
        self._name = name
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._popen = popen  # set only when the guest is our child (we must reap it)
        self._image: GuestImage | None = image
        self._dirty: DirtyLog | None = dirty

    # -- construction -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        vm_dir: Path,
        name: str,
        memory_bytes: int,
        profile: str = "db",
        secret: str = DEFAULT_SECRET,
        fill_fraction: float = 0.5,
        seed: int | None = None,
    ) -> BuiltinVM:
        """Create a new VM (image, dirty log) and boot its guest; returns once it runs."""
        vm_dir = _vm_dir(vm_dir)
        _check_name(name)
        try:
            workload = get_profile(profile)
        except WorkloadError as exc:
            raise VmError(str(exc)) from None
        image_path, dirty_path, log_path = _paths(vm_dir, name)
        if image_path.exists():
            raise VmError(f"a VM named {name!r} already exists in {vm_dir} ({image_path})")
        try:
            image = GuestImage.create(image_path, memory_bytes, workload, secret, fill_fraction, seed)
        except ImageError as exc:
            raise VmError(f"cannot create VM {name!r}: {exc}") from None
        try:
            dirty = DirtyLog.create(dirty_path, image.npages)
        except DirtyLogError as exc:
            image.close()
            image_path.unlink(missing_ok=True)
            raise VmError(f"cannot create VM {name!r}: {exc}") from None
        log_path.unlink(missing_ok=True)
        try:
            return cls._spawn(vm_dir, name, image, dirty, _boot_timeout(memory_bytes, fill_fraction))
        except VmError:
            image.close()
            dirty.close()
            image_path.unlink(missing_ok=True)
            dirty_path.unlink(missing_ok=True)
            raise

    @classmethod
    def start_on_image(cls, vm_dir: Path, name: str) -> BuiltinVM:
        """Start a guest on an existing image (e.g. written by a migration); it continues from its counter.

        A fresh dirty log is created, and the throttle is reset to 0: a
        migrated guest never inherits the source's auto-converge throttle.
        """
        vm_dir = _vm_dir(vm_dir)
        _check_name(name)
        image_path, dirty_path, _ = _paths(vm_dir, name)
        if image_in_use(image_path):
            raise VmError(f"a guest is already running on {image_path}; refusing to start a second one")
        try:
            image = GuestImage.open(image_path)
            state = image.state
        except ImageError as exc:
            raise VmError(f"cannot start VM {name!r}: {exc}") from None
        try:
            image.set_throttle(0)
            dirty = DirtyLog.create(dirty_path, image.npages)
        except (ImageError, DirtyLogError) as exc:
            image.close()
            raise VmError(f"cannot start VM {name!r}: {exc}") from None
        fill = 0.0 if state.booted else state.fill_fraction
        try:
            return cls._spawn(vm_dir, name, image, dirty, _boot_timeout(state.memory_bytes, fill))
        except VmError:
            image.close()
            dirty.close()
            raise

    @classmethod
    def adopt(cls, vm_dir: Path, name: str, pid: int) -> BuiltinVM:
        """Take charge of a running guest (an agent restarting), after checking the pid is that guest."""
        vm_dir = _vm_dir(vm_dir)
        _check_name(name)
        image_path, dirty_path, _ = _paths(vm_dir, name)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise VmError(f"cannot adopt VM {name!r}: no process {pid}") from None
        try:
            # Checked after pidfd_open: from here on the pidfd pins this very process.
            cmdline = proc_cmdline(pid)
            if GUEST_MODULE not in cmdline or str(image_path) not in cmdline:
                raise VmError(
                    f"cannot adopt VM {name!r}: process {pid} is not its guest "
                    f"(command line {' '.join(cmdline)!r} does not run {GUEST_MODULE} on {image_path})"
                )
            if _proc_state(pid) in (None, "Z", "X"):
                raise VmError(f"cannot adopt VM {name!r}: its guest process {pid} has exited")
            image = GuestImage.open(image_path)
            try:
                dirty = DirtyLog.open(dirty_path, image.npages)
            except DirtyLogError:
                image.close()
                raise
        except (ImageError, DirtyLogError) as exc:
            os.close(pidfd)
            raise VmError(f"cannot adopt VM {name!r}: {exc}") from None
        except VmError:
            os.close(pidfd)
            raise
        return cls(vm_dir=vm_dir, name=name, pid=pid, pidfd=pidfd, popen=None, image=image, dirty=dirty)

    @classmethod
    def _spawn(cls, vm_dir: Path, name: str, image: GuestImage, dirty: DirtyLog, timeout: float) -> BuiltinVM:
        """Start the guest process and wait for its 'ready' line (bounded)."""
        popen, ready_r = _launch_guest_process(vm_dir, name, go_r=None)
        return cls._await_ready(vm_dir, name, popen, ready_r, image, dirty, timeout)

    @classmethod
    def _await_ready(
        cls,
        vm_dir: Path,
        name: str,
        popen: subprocess.Popen[bytes],
        ready_r: int,
        image: GuestImage,
        dirty: DirtyLog,
        timeout: float,
    ) -> BuiltinVM:
        _, _, log_path = _paths(vm_dir, name)
        vm = cls(
            vm_dir=vm_dir,
            name=name,
            pid=popen.pid,
            pidfd=os.pidfd_open(popen.pid),
            popen=popen,
            image=image,
            dirty=dirty,
        )
        try:
            readable, _, _ = select.select([ready_r], [], [], timeout)
            message = os.read(ready_r, len(READY_MESSAGE)) if readable else None
        finally:
            os.close(ready_r)
        if message == READY_MESSAGE:
            return vm
        vm._kill_and_reap()
        vm._release_mappings()
        if message is None:
            raise VmError(
                f"the guest of VM {name!r} did not come up within {timeout:.0f} s and was killed; "
                f"log {log_path}:\n{_log_tail(log_path)}"
            )
        raise VmError(f"the guest of VM {name!r} exited while starting; log {log_path}:\n{_log_tail(log_path)}")

    # -- accessors -------------------------------------------------------------

    @property
    def name(self) -> str:
        # A property, not a plain attribute: the GuestVM protocol (guests.py) declares it on the class.
        return self._name

    @property
    def image_path(self) -> Path:
        return _paths(self.vm_dir, self._name)[0]

    @property
    def dirty_path(self) -> Path:
        return _paths(self.vm_dir, self._name)[1]

    @property
    def log_path(self) -> Path:
        return _paths(self.vm_dir, self._name)[2]

    @property
    def image(self) -> GuestImage:
        if self._image is None:
            raise VmError(f"VM {self._name!r} is closed")
        return self._image

    @property
    def dirty(self) -> DirtyLog:
        if self._dirty is None:
            raise VmError(f"VM {self._name!r} is closed")
        return self._dirty

    @property
    def memory_bytes(self) -> int:
        return self.image.memory_bytes

    def counter(self) -> int:
        return self.image.counter

    def check(self, timeout: float = 5.0) -> ImageCheck:
        """Verify the whole image (see ``GuestImage.check``).

        A running guest is paused for the scan (about 0.15-0.3 s per GiB
        here) and resumed, since a scan of live memory sees half-written
        pages. Do not call it while a migration of this VM is in flight: the
        resume would undo the engine's pause.
        """
        was_running = self.is_alive and _proc_state(self.pid) != "T"
        if was_running:
            self.pause(timeout)
        try:
            return self.image.check()
        finally:
            if was_running:
                self.resume(timeout)

    def set_throttle(self, pct: int) -> None:
        """Auto-converge: make the guest sleep ``pct`` percent of each tick (0-99)."""
        try:
            self.image.set_throttle(pct)
        except ImageError as exc:
            raise VmError(str(exc)) from None

    # -- process control --------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """Whether the guest process exists (running or paused)."""
        if self._pidfd is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        # A pidfd becomes readable when its process exits (zombie or reaped).
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable

    @property
    def is_paused(self) -> bool:
        return self.is_alive and _proc_state(self.pid) == "T"

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP the guest and wait until the kernel reports it stopped."""
        self._signal(signal.SIGSTOP, "pause")
        if not _wait_until(lambda: _proc_state(self.pid) == "T" or not self.is_alive, timeout):
            raise VmError(f"VM {self._name!r} (pid {self.pid}) did not stop within {timeout} s after SIGSTOP")
        if not self.is_alive:
            raise VmError(f"VM {self._name!r} (pid {self.pid}) exited while being paused; log {self.log_path}")

    def resume(self, timeout: float = 5.0) -> None:
        """SIGCONT the guest and wait until the kernel reports it running again."""
        self._signal(signal.SIGCONT, "resume")
        if not _wait_until(lambda: _proc_state(self.pid) != "T", timeout):
            raise VmError(f"VM {self._name!r} (pid {self.pid}) still stopped {timeout} s after SIGCONT")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the guest for good; never leaves a zombie we own.

        A paused guest gets SIGKILL directly and never runs another
        instruction (after a handover the source copy must not run again;
        all its state is already in the image). A running guest gets SIGTERM
        and, after ``timeout``, SIGKILL.
        """
        if not self.is_alive:
            self._reap()
            return
        if _proc_state(self.pid) == "T":
            self._send(signal.SIGKILL)
        else:
            self._send(signal.SIGTERM)
            if not _wait_until(lambda: not self.is_alive, timeout):
                self._send(signal.SIGKILL)
        if not _wait_until(lambda: not self.is_alive, max(timeout, 1.0)):
            raise VmError(f"VM {self._name!r} (pid {self.pid}) survived SIGKILL for {timeout} s")
        self._reap()

    def close(self) -> None:
        """Drop this handle's mappings and pidfd; the guest keeps running (agent shutting down)."""
        self._release_mappings()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def destroy(self) -> None:
        """Stop the guest and remove its image, dirty log and log file."""
        self.stop()
        self.close()
        for path in _paths(self.vm_dir, self._name):
            path.unlink(missing_ok=True)

    def info(self) -> dict[str, Any]:
        """A summary for listings (JSON-friendly)."""
        alive = self.is_alive
        info: dict[str, Any] = {
            "name": self._name,
            "pid": self.pid,
            "memory_bytes": self.memory_bytes,
            "profile": None,
            "counter": None,
            "throttle_pct": None,
            "paused": alive and _proc_state(self.pid) == "T",
            "alive": alive,
            "image_path": str(self.image_path),
        }
        try:
            state = self.image.state
            info.update(profile=state.profile, counter=state.counter, throttle_pct=state.throttle_pct)
        except ImageError:
            pass  # listing must not fail on one broken image; the fields stay None
        return info

    def __repr__(self) -> str:
        return f"BuiltinVM(name={self._name!r}, pid={self.pid})"

    # -- internals ----------------------------------------------------------------

    def _signal(self, sig: signal.Signals, action: str) -> None:
        if not self.is_alive:
            raise VmError(f"cannot {action} VM {self._name!r}: its guest (pid {self.pid}) is not running")
        self._send(sig)

    def _send(self, sig: signal.Signals) -> None:
        if self._pidfd is None:
            raise VmError(f"VM {self._name!r} handle is closed")
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass  # exited meanwhile; callers check is_alive

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()

    def _kill_and_reap(self) -> None:
        if self.is_alive:
            self._send(signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _release_mappings(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None
        if self._dirty is not None:
            self._dirty.close()
            self._dirty = None


def _launch_guest_process(vm_dir: Path, name: str, go_r: int | None) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn a guest process; returns it and the read end of its 'ready' pipe."""
    image_path, dirty_path, log_path = _paths(vm_dir, name)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-P", "-m", GUEST_MODULE, str(image_path), str(dirty_path), "--ready-fd", str(ready_w)]
    fds = [ready_w]
    if go_r is not None:
        args += ["--go-fd", str(go_r)]
        fds.append(go_r)
    try:
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(fds),
                start_new_session=True,  # survive the agent, as QEMU survives libvirtd
                cwd="/",
                env=env,
            )
    except OSError as exc:
        os.close(ready_r)
        raise VmError(f"cannot start the guest of VM {name!r}: {exc}") from None
    finally:
        os.close(ready_w)
    return popen, ready_r


class StandbyGuest:
    """A guest process started before an incoming migration ends, like QEMU's ``-incoming``.

    Starting a Python guest costs ~0.2 s here (interpreter, numpy). Doing it
    while pre-copy runs keeps that out of the downtime: at the handover the
    standby process only opens the image and continues.
    """

    def __init__(self, vm_dir: Path, name: str) -> None:
        self._vm_dir = _vm_dir(vm_dir)
        _check_name(name)
        self._name = name
        self._handed_over = False
        go_r, self._go_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._popen, self._ready_r = _launch_guest_process(self._vm_dir, name, go_r=go_r)
        except VmError:
            os.close(self._go_w)
            raise
        finally:
            os.close(go_r)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def launch(self, timeout: float = 10.0) -> BuiltinVM:
        """Hand the (verified) image to the standby process; returns once it runs."""
        image_path, dirty_path, _ = _paths(self._vm_dir, self._name)
        try:
            image = GuestImage.open(image_path)
            image.set_throttle(0)
            dirty = DirtyLog.create(dirty_path, image.npages)
        except (ImageError, DirtyLogError) as exc:
            self.cancel()
            raise VmError(f"cannot start VM {self._name!r}: {exc}") from None
        self._handed_over = True
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        return BuiltinVM._await_ready(self._vm_dir, self._name, self._popen, self._ready_r, image, dirty, timeout)

    def cancel(self) -> None:
        """No handover: the standby process sees EOF and exits without touching the image."""
        if self._handed_over:
            return
        self._handed_over = True
        for fd in (self._go_w, self._ready_r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()


def _vm_dir(vm_dir: Path | str) -> Path:
    path = Path(vm_dir).resolve()
    if not path.is_dir():
        raise VmError(f"VM directory {path} does not exist or is not a directory")
    return path


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise VmError(
            f"invalid VM name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )


def _paths(vm_dir: Path, name: str) -> tuple[Path, Path, Path]:
    return vm_dir / f"{name}.img", vm_dir / f"{name}.dirty", vm_dir / f"{name}.log"
