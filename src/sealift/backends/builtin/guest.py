"""The built-in guest process: ``python -m sealift.backends.builtin.guest IMAGE DIRTY``.

First boot (state not booted): fill ``fill_fraction`` of RAM with
workload-format pages (counter 0), bump their generations and the secret
page's, then set the booted flag. A boot interrupted before that flag is
simply redone.

Then, forever, one tick at a time:

1. read the counter ``c`` from the state area;
2. write the pages of tick ``c`` (data first), then increment their
   generations in the dirty log;
3. store ``c + 1`` in the state area, last, so a tick interrupted anywhere
   is redone identically (same pages, same content) by the next process;
4. sleep to keep ``tick_hz``, plus the throttle.

The throttle works like QEMU's cpu-throttle: ``throttle_pct`` percent of
each tick is spent sleeping, so a throttled guest makes ``100 - pct``
percent of its unthrottled progress (its tick rate drops to that share).
The guest reads the throttle every tick; the engine sets it while the
guest runs.

Nothing that matters for continuation lives only in Python variables: a
new process on a copied image continues exactly where the old one stopped.
The process holds an exclusive ``flock`` on its image while it runs, so two
guests never run on one image. SIGTERM or SIGINT ends it cleanly between
ticks.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np

from sealift.backends.builtin.dirtylog import DirtyLog, DirtyLogError
from sealift.backends.builtin.image import GuestImage, GuestState, ImageError
from sealift.backends.builtin.workload import (
    WorkloadParams,
    boot_fill_ranges,
    pages_for_tick,
    write_page_range,
    write_pages,
)

EXIT_OK = 0
EXIT_BAD_IMAGE = 2
EXIT_IMAGE_IN_USE = 3
READY_MESSAGE = b"ready\n"

# Pages per boot-fill step (64 MiB): lets SIGTERM interrupt a long first boot.
_FILL_CHUNK_PAGES = 16384


class ImageInUseError(Exception):
    """Another guest process already runs on this image."""


class StopRequest:
    """Set by SIGTERM/SIGINT; the signal also wakes the tick sleep via a self-pipe."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wfd)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early if a stop was requested (even one racing with this call)."""
        if seconds <= 0 or self.requested:
            return
        readable, _, _ = select.select([self._rfd], [], [], seconds)
        if readable:
            try:
                while os.read(self._rfd, 64):
                    pass
            except BlockingIOError:
                pass


def acquire_run_lock(image_path: Path) -> int:
    """Take the exclusive run lock of an image; return the fd that holds it."""
    fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ImageInUseError(f"another guest process is already running on {image_path}") from None
    return fd


def image_in_use(image_path: Path) -> bool:
    """Whether a guest process holds the run lock of this image."""
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock too
    return False


def next_tick_start(start: float, now: float, busy: float, anchor: float, period: float, throttle_pct: int) -> float:
    """When the next tick starts (monotonic seconds); also the new schedule anchor.

    ``start``/``now``: wall clock at the start and end of the tick just run;
    ``busy``: CPU seconds it used (time spent stopped by SIGSTOP is not
    counted, so a long pause never turns into a long throttle sleep).
    Unthrottled ticks follow a fixed schedule, without a catch-up burst after
    a pause. A throttled tick lasts its unthrottled duration / (1 - pct).
    """
    if throttle_pct <= 0:
        anchor += period
        if anchor < now - period:
            anchor = now
        return anchor
    unthrottled = max(period, busy)
    return start + unthrottled * 100.0 / (100 - throttle_pct)


def run_tick(words: np.ndarray, gens: np.ndarray, params: WorkloadParams, counter: int) -> np.ndarray:
    """Write the pages of tick ``counter``, bumping their generations around the write.

    Before the write, like a hardware dirty log that marks a page on the
    write fault: a pause that lands mid-write still finds the page dirty.
    After the write: a page the engine read while it was being written is
    dirty again, so its torn copy is always replaced. Returns the pages.
    """
    pages = pages_for_tick(params, counter)
    gens[pages] += 1
    write_pages(words, pages, counter)
    gens[pages] += 1
    return pages


def boot(
    image: GuestImage, dirty: DirtyLog, state: GuestState, should_stop: Callable[[], bool] = lambda: False
) -> bool:
    """First-boot fill. Returns False if ``should_stop`` interrupted it (it is redone next start)."""
    words, gens = image.words, dirty.gens
    for lo, hi in boot_fill_ranges(state.workload, state.fill_fraction):
        for chunk_lo in range(lo, hi, _FILL_CHUNK_PAGES):
            if should_stop():
                return False
            chunk_hi = min(hi, chunk_lo + _FILL_CHUNK_PAGES)
            gens[chunk_lo:chunk_hi] += 1  # around the write: see run_tick
            write_page_range(words, chunk_lo, chunk_hi, 0)
            gens[chunk_lo:chunk_hi] += 1
    gens[state.secret_page] += 1  # installed at image creation; dirty for this log
    image.mark_booted()
    return True


def run(image: GuestImage, dirty: DirtyLog, stop: StopRequest) -> None:
    """Tick until a stop is requested."""
    params = image.state.workload
    period = params.tick_period
    words, gens = image.words, dirty.gens
    anchor = time.monotonic()
    while not stop.requested:
        start, cpu_start = time.monotonic(), time.process_time()
        counter = image.counter
        run_tick(words, gens, params, counter)
        image.set_counter(counter + 1)  # last: an interrupted tick is redone
        now = time.monotonic()
        busy = time.process_time() - cpu_start
        anchor = next_tick_start(start, now, busy, anchor, period, image.throttle_pct)
        stop.sleep(anchor - now)


def _signal_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, READY_MESSAGE)
    except OSError:
        pass  # whoever started us is gone; the guest runs on regardless
    finally:
        os.close(ready_fd)


def _log(message: str) -> None:
    print(f"sealift-guest[{os.getpid()}]: {message}", flush=True)


def wait_for_go(go_fd: int) -> bool:
    """Standby, like QEMU's -incoming: code loaded, image not yet ours. False on EOF."""
    try:
        return os.read(go_fd, 1) != b""
    finally:
        os.close(go_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sealift.backends.builtin.guest", description="Run a sealift built-in guest."
    )
    parser.add_argument("image", type=Path, help="guest image file (state area + RAM)")
    parser.add_argument("dirty", type=Path, help="dirty log file (one uint32 generation per page)")
    parser.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once running")
    parser.add_argument(
        "--go-fd",
        type=int,
        default=None,
        help="standby: wait for a byte on this fd before opening the image (EOF = cancelled)",
    )
    args = parser.parse_args(argv)

    if args.go_fd is not None and not wait_for_go(args.go_fd):
        return EXIT_OK  # the incoming migration was cancelled before the handover

    stop = StopRequest()
    try:
        lock_fd = acquire_run_lock(args.image)
    except ImageInUseError as exc:
        _log(str(exc))
        return EXIT_IMAGE_IN_USE
    except OSError as exc:
        _log(f"cannot open image {args.image}: {exc.strerror}")
        return EXIT_BAD_IMAGE
    try:
        image = GuestImage.open(args.image)
        state = image.state
        dirty = DirtyLog.open(args.dirty, state.npages)
    except (ImageError, DirtyLogError) as exc:
        _log(str(exc))
        return EXIT_BAD_IMAGE

    if not state.booted:
        t0 = time.monotonic()
        if not boot(image, dirty, state, lambda: stop.requested):
            _log(f"stopped by {stop.signal_name} during first boot (it will be redone)")
            return EXIT_OK
        _log(
            f"first boot: filled {state.fill_fraction:.0%} of {state.memory_bytes} bytes "
            f"in {time.monotonic() - t0:.2f} s"
        )
    _log(f"running profile {state.profile} from counter {image.counter} on {args.image}")
    _signal_ready(args.ready_fd)
    run(image, dirty, stop)
    _log(f"stopped by {stop.signal_name} at counter {image.counter}")
    os.close(lock_fd)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
