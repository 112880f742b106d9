# Long file: the built-in guest's image format (state area, pages, run lock, checks): one file layout, one module.
"""The built-in guest's image: its whole state, in one shared-memory file.

Layout::

    image file = [ state area: 4096 bytes ][ RAM: npages * 4096 bytes ]

The *state area* is the guest's "CPU/device state" (:class:`GuestState`):
a fixed little-endian ``struct`` with a magic and a layout version, then
zeros. Everything a guest process needs to continue is there, so a new
process started on a copied image continues exactly where the old one
stopped.

Two fields are written in place while a guest runs, each as one aligned
machine word through a numpy view (so a concurrent reader never sees half a
value): the progress ``counter`` (written by the guest, after each tick) and
``throttle_pct`` (written by the engine for auto-converge).

The file is sparse: RAM the guest never wrote is a hole. Reading a hole
through the mapping makes tmpfs allocate a zero page, so whoever scans RAM
(``check()``, the migration engine) should walk :meth:`GuestImage.data_ranges`
and treat everything else as zero pages.

The secret page (page :data:`SECRET_PAGE`) holds the secret line, repeated;
the workload never writes it. The state area keeps only the secret's length
and SHA-256, so ``check()`` can tell whether it survived.
"""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import os
import secrets as _secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealift.backends.builtin.files import MappedFile, closed_on_failure, open_fd, unmap_and_close
from sealift.backends.builtin.workload import (
    COUNTER_MULTIPLIER,
    INDEX_MULTIPLIER,
    PAGE_SIZE,
    WORDS_PER_PAGE,
    WorkloadError,
    WorkloadParams,
    WorkloadProfile,
    boot_fill_ranges,
    fill_values,
    pages_for_tick,
)

__all__ = [
    "DEFAULT_SECRET",
    "GuestImage",
    "GuestState",
    "ImageCheck",
    "ImageError",
    "PAGE_SIZE",
    "SECRET_PAGE",
    "STATE_AREA_SIZE",
    "secret_page_bytes",
]

STATE_AREA_SIZE = 4096
MAGIC = b"SEALVM01"
LAYOUT_VERSION = 1
MIN_MEMORY_BYTES = 1 << 20
MAX_MEMORY_BYTES = 1 << 40
SECRET_PAGE = 1
MAX_SECRET_BYTES = 1024
MAX_THROTTLE_PCT = 99  # as QEMU's cpu-throttle: 100% would never run again
MAX_BAD_PAGES_LISTED = 16
DEFAULT_SECRET = "The bank amount transferred to account 4471-0093-2210 is USD 1,250,000.00 (sealift test secret)"

# magic, version, flags, memory_bytes, npages, counter, throttle_pct, tick_hz,
# pages_per_tick, secret_page, hot_set_pages, hot_set_start, seed,
# fill_fraction, secret_len, reserved, secret_sha256, profile
_STATE = struct.Struct("<8sIIQQQIIIIQQQdII32s16s")
FLAGS_OFFSET = struct.calcsize("<8sI")
COUNTER_OFFSET = struct.calcsize("<8sIIQQ")
THROTTLE_OFFSET = struct.calcsize("<8sIIQQQ")
_FLAG_BOOTED = 1
assert COUNTER_OFFSET % 8 == 0 and THROTTLE_OFFSET % 4 == 0 and FLAGS_OFFSET % 4 == 0

_MASK64 = (1 << 64) - 1

# Pages per vectorised check step: 64 MiB, bounds the temporaries.
_CHECK_CHUNK_PAGES = 16384


class ImageError(Exception):
    """A guest image is missing, malformed, or does not fit the request."""


def secret_page_bytes(secret: bytes) -> bytes:
    """The secret page: ``secret + b"\\n"`` repeated as often as it fits, zero padded."""
    line = secret + b"\n"
    return (line * (PAGE_SIZE // len(line))).ljust(PAGE_SIZE, b"\0")


@dataclass(frozen=True)
class GuestState:
    """The parsed state area. Constructing one validates every field."""

    memory_bytes: int
    npages: int
    profile: str
    counter: int
    tick_hz: int
    pages_per_tick: int
    hot_set_pages: int
    hot_set_start: int
    throttle_pct: int
    secret_page: int
    secret_len: int
    secret_sha256: bytes
    booted: bool
    fill_fraction: float
    seed: int
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.layout_version != LAYOUT_VERSION:
            raise ImageError(
                f"state layout version {self.layout_version} is not supported "
                f"(this sealift reads version {LAYOUT_VERSION})"
            )
        _validate_memory_bytes(self.memory_bytes)
        if self.npages * PAGE_SIZE != self.memory_bytes:
            raise ImageError(f"state says {self.npages} pages but {self.memory_bytes} bytes of RAM")
        if not (1 <= len(self.profile) <= 16 and self.profile.isascii() and self.profile.isprintable()):
            raise ImageError(f"state has an invalid profile name {self.profile!r}")
        if not 0 <= self.counter < 1 << 64:
            raise ImageError("state counter out of range")
        if not 0 <= self.throttle_pct <= MAX_THROTTLE_PCT:
            raise ImageError(f"state throttle {self.throttle_pct}% outside [0, {MAX_THROTTLE_PCT}]")
        if not 1 <= self.secret_len <= MAX_SECRET_BYTES or len(self.secret_sha256) != 32:
            raise ImageError("state has an invalid secret length or digest")
        if not (math.isfinite(self.fill_fraction) and 0.0 <= self.fill_fraction <= 1.0):
            raise ImageError("state fill_fraction outside [0, 1]")
        try:
            _ = self.workload  # reading it validates the workload fields
        except WorkloadError as exc:
            raise ImageError(f"state has invalid workload parameters: {exc}") from None

    @property
    def workload(self) -> WorkloadParams:
        return WorkloadParams(
            seed=self.seed,
            npages=self.npages,
            secret_page=self.secret_page,
            hot_set_start=self.hot_set_start,
            hot_set_pages=self.hot_set_pages,
            pages_per_tick=self.pages_per_tick,
            tick_hz=self.tick_hz,
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> GuestState:
        if len(blob) != STATE_AREA_SIZE:
            raise ImageError(f"state area must be {STATE_AREA_SIZE} bytes, got {len(blob)}")
        fields = _STATE.unpack_from(blob)
        (
            magic,
            version,
            flags,
            memory_bytes,
            npages,
            counter,
            throttle,
            tick_hz,
            ppt,
            secret_page,
            hot_pages,
            hot_start,
            seed,
            fill,
            secret_len,
            _reserved,
            digest,
            profile_raw,
        ) = fields
        if magic == bytes(len(MAGIC)):
            raise ImageError("state area is empty (a migration destination whose state was not written yet)")
        if magic != MAGIC:
            raise ImageError(f"not a sealift guest image: bad magic {magic!r} (expected {MAGIC!r})")
        try:
            profile = profile_raw.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise ImageError("state has a non-ASCII profile name") from None
        return cls(
            memory_bytes=memory_bytes,
            npages=npages,
            profile=profile,
            counter=counter,
            tick_hz=tick_hz,
            pages_per_tick=ppt,
            hot_set_pages=hot_pages,
            hot_set_start=hot_start,
            throttle_pct=throttle,
            secret_page=secret_page,
            secret_len=secret_len,
            secret_sha256=digest,
            booted=bool(flags & _FLAG_BOOTED),
            fill_fraction=fill,
            seed=seed,
            layout_version=version,
        )

    def to_bytes(self) -> bytes:
        packed = _STATE.pack(
            MAGIC,
            self.layout_version,
            _FLAG_BOOTED if self.booted else 0,
            self.memory_bytes,
            self.npages,
            self.counter,
            self.throttle_pct,
            self.tick_hz,
            self.pages_per_tick,
            self.secret_page,
            self.hot_set_pages,
            self.hot_set_start,
            self.seed,
            self.fill_fraction,
            self.secret_len,
            0,
            self.secret_sha256,
            self.profile.encode("ascii"),
        )
        return packed.ljust(STATE_AREA_SIZE, b"\0")


@dataclass(frozen=True)
class ImageCheck:
    """Result of :meth:`GuestImage.check`.

    ``in_flight_pages`` counts pages of the tick a pause interrupted that are
    not (yet) valid, e.g. half written. They are not bad: the next guest
    process redoes that tick and rewrites them in full.
    """

    pages_checked: int
    bad_pages: tuple[int, ...]
    bad_page_count: int
    secret_intact: bool
    in_flight_pages: int = 0

    @property
    def ok(self) -> bool:
        return self.bad_page_count == 0 and self.secret_intact


@dataclass
class _Views:
    """The numpy/memoryview windows on one mapping, dropped together on close."""

    ram: memoryview
    pages: np.ndarray  # (npages, 4096) uint8
    words: np.ndarray  # (npages, 512) little-endian uint64, same memory
    state_u64: np.ndarray  # the state area as 512 uint64
    state_u32: np.ndarray  # the state area as 1024 uint32


class GuestImage(MappedFile):
    """A mapped guest image. Build with :meth:`create`, :meth:`create_empty` or :meth:`open`.

    ``ram`` and ``pages`` are windows on the shared mapping. ``close()``
    releases ``ram``; numpy arrays a caller still holds keep the mapping
    alive until they are dropped (never a dangling pointer).
    """

    def __init__(self, path: Path, fd: int, memory_bytes: int) -> None:
        self.path = path
        self._fd = fd
        self.memory_bytes = memory_bytes
        self.npages = memory_bytes // PAGE_SIZE
        self._mm: mmap.mmap | None = mmap.mmap(
            fd, STATE_AREA_SIZE + memory_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        pages = np.frombuffer(self._mm, dtype=np.uint8, count=memory_bytes, offset=STATE_AREA_SIZE)
        pages = pages.reshape(self.npages, PAGE_SIZE)
        state_u64 = np.frombuffer(self._mm, dtype="<u8", count=STATE_AREA_SIZE // 8)
        self._views: _Views | None = _Views(
            ram=memoryview(self._mm)[STATE_AREA_SIZE:],
            pages=pages,
            words=pages.view("<u8"),
            state_u64=state_u64,
            state_u32=state_u64.view("<u4"),
        )

    # -- construction -----------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path | str,
        memory_bytes: int,
        profile: WorkloadProfile,
        secret: str = DEFAULT_SECRET,
        fill_fraction: float = 0.5,
        seed: int | None = None,
    ) -> GuestImage:
        """Create a new, not yet booted image (sparse; the guest fills RAM at first boot)."""
        path = Path(path)
        _validate_memory_bytes(memory_bytes)
        secret_raw = secret.encode("utf-8")
        if not 1 <= len(secret_raw) <= MAX_SECRET_BYTES:
            raise ImageError(f"secret must be 1-{MAX_SECRET_BYTES} bytes of UTF-8, got {len(secret_raw)}")
        if not (math.isfinite(fill_fraction) and 0.0 <= fill_fraction <= 1.0):
            raise ImageError(f"fill_fraction must be within [0, 1], got {fill_fraction}")
        if seed is None:
            seed = _secrets.randbits(63)
        npages = memory_bytes // PAGE_SIZE
        try:
            params = WorkloadParams.for_profile(profile, npages, seed, SECRET_PAGE)
        except WorkloadError as exc:
            raise ImageError(f"cannot create image: {exc}") from None
        state = GuestState(
            memory_bytes=memory_bytes,
            npages=npages,
            profile=profile.name,
            counter=0,
            tick_hz=params.tick_hz,
            pages_per_tick=params.pages_per_tick,
            hot_set_pages=params.hot_set_pages,
            hot_set_start=params.hot_set_start,
            throttle_pct=0,
            secret_page=SECRET_PAGE,
            secret_len=len(secret_raw),
            secret_sha256=hashlib.sha256(secret_raw).digest(),
            booted=False,
            fill_fraction=fill_fraction,
            seed=seed,
        )
        image = cls._create_file(path, memory_bytes)
        image._v().state_u64[:] = np.frombuffer(state.to_bytes(), dtype="<u8")
        # The secret is installed now, not at boot: the state area keeps only its digest.
        image._v().pages[SECRET_PAGE] = np.frombuffer(secret_page_bytes(secret_raw), dtype=np.uint8)
        return image

    @classmethod
    def create_empty(cls, path: Path | str, memory_bytes: int) -> GuestImage:
        """Create a zeroed image for a migration destination; its state comes via ``write_state``."""
        _validate_memory_bytes(memory_bytes)
        return cls._create_file(Path(path), memory_bytes)

    @classmethod
    def open(cls, path: Path | str) -> GuestImage:
        """Map an existing image and validate its state area."""
        path = Path(path)
        fd = open_fd(path, os.O_RDWR | os.O_CLOEXEC, ImageError, f"open guest image {path}")
        with closed_on_failure(fd):
            size = os.fstat(fd).st_size
            if size < STATE_AREA_SIZE + MIN_MEMORY_BYTES:
                raise ImageError(f"{path} is {size} bytes, too small to be a guest image")
            state = GuestState.from_bytes(os.pread(fd, STATE_AREA_SIZE, 0))
            if state.memory_bytes + STATE_AREA_SIZE != size:
                raise ImageError(
                    f"{path} is {size} bytes but its state area describes "
                    f"{state.memory_bytes} bytes of RAM (+{STATE_AREA_SIZE}); the file was truncated or altered"
                )
            return cls(path, fd, state.memory_bytes)

    @classmethod
    def _create_file(cls, path: Path, memory_bytes: int) -> GuestImage:
        size = STATE_AREA_SIZE + memory_bytes
        _check_free_space(path, size)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ImageError(f"guest image {path} already exists; remove it or choose another name") from None
        except OSError as exc:
            raise ImageError(f"cannot create guest image {path}: {exc.strerror}") from None
        with closed_on_failure(fd, remove=path):
            os.ftruncate(fd, size)  # sparse: no RAM is allocated until written
            return cls(path, fd, memory_bytes)

    # -- accessors ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._views is None

    @property
    def ram(self) -> memoryview:
        """Writable view of RAM (``memory_bytes`` long)."""
        return self._v().ram

    @property
    def pages(self) -> np.ndarray:
        """RAM as a (npages, 4096) uint8 array on the same memory."""
        return self._v().pages

    @property
    def words(self) -> np.ndarray:
        """RAM as a (npages, 512) little-endian uint64 array on the same memory."""
        return self._v().words

    @property
    def state(self) -> GuestState:
        """The state area, freshly parsed and validated."""
        return GuestState.from_bytes(self.read_state())

    @property
    def counter(self) -> int:
        return int(self._v().state_u64[COUNTER_OFFSET // 8])

    @property
    def throttle_pct(self) -> int:
        return int(self._v().state_u32[THROTTLE_OFFSET // 4])

    @property
    def booted(self) -> bool:
        return bool(self._v().state_u32[FLAGS_OFFSET // 4] & _FLAG_BOOTED)

    # -- state area -----------------------------------------------------------

    def read_state(self) -> bytes:
        """A copy of the whole state area."""
        return self._v().state_u64.tobytes()

    def write_state(self, blob: bytes) -> None:
        """Replace the state area (a migration destination installing the source's state)."""
        state = GuestState.from_bytes(bytes(blob))
        if state.memory_bytes != self.memory_bytes:
            raise ImageError(
                f"state describes {state.memory_bytes} bytes of RAM but image {self.path} "
                f"has {self.memory_bytes}; refusing to install it"
            )
        self._v().state_u64[:] = np.frombuffer(bytes(blob), dtype="<u8")

    def set_throttle(self, pct: int) -> None:
        """Set the guest's CPU throttle (0-99%); only this aligned word is written."""
        if not 0 <= pct <= MAX_THROTTLE_PCT:
            raise ImageError(f"throttle must be within [0, {MAX_THROTTLE_PCT}] percent, got {pct}")
        self._v().state_u32[THROTTLE_OFFSET // 4] = pct

    def set_counter(self, value: int) -> None:
        """Store the progress counter (the guest does this after each tick)."""
        self._v().state_u64[COUNTER_OFFSET // 8] = value

    def mark_booted(self) -> None:
        """Set the booted flag (the guest does this after its first-boot fill)."""
        flags = self._v().state_u32
        flags[FLAGS_OFFSET // 4] = int(flags[FLAGS_OFFSET // 4]) | _FLAG_BOOTED

    # -- RAM ------------------------------------------------------------------

    def reserve(self) -> None:
        """Allocate every RAM page now (tmpfs ``fallocate``): admission, not hope.

        A migration destination reserves the memory before it accepts, so a
        full tmpfs is a clear refusal instead of a SIGBUS in the guest later;
        allocating in one call is also ~2x cheaper here than page by page.
        """
        self._v()
        try:
            os.posix_fallocate(self._fd, STATE_AREA_SIZE, self.memory_bytes)
        except OSError as exc:
            raise ImageError(f"cannot reserve {self.memory_bytes >> 20} MiB for {self.path}: {exc.strerror}") from None

    def write_pages(self, first_page: int, data: memoryview | bytes) -> None:
        """Write whole pages at ``first_page`` through the file, not the mapping.

        ``pwrite`` into tmpfs costs a copy; writing through a fresh mapping
        costs a page fault per 4 KiB as well (measured ~2-5x slower here).
        """
        self._v()
        offset = STATE_AREA_SIZE + first_page * PAGE_SIZE
        view = memoryview(data).cast("B")
        if offset + len(view) > STATE_AREA_SIZE + self.memory_bytes or len(view) % PAGE_SIZE:
            raise ImageError(f"write of {len(view)} bytes at page {first_page} does not fit the image")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def data_ranges(self) -> list[tuple[int, int]]:
        """Page ranges ``[lo, hi)`` of RAM that may hold data; the rest are holes (zero).

        Uses SEEK_DATA/SEEK_HOLE so a scan does not touch (and so allocate)
        the holes of a sparse image. Falls back to all of RAM on a file
        system without hole reporting.
        """
        self._v()
        end = STATE_AREA_SIZE + self.memory_bytes
        ranges: list[tuple[int, int]] = []
        offset = STATE_AREA_SIZE
        while offset < end:
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    return [(0, self.npages)]
                raise
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            lo = (data - STATE_AREA_SIZE) // PAGE_SIZE
            hi = -(-(hole - STATE_AREA_SIZE) // PAGE_SIZE)
            ranges.append((lo, hi))
            offset = hole
        return ranges

    def check(self) -> ImageCheck:
        """Verify every page of a paused or stopped guest.

        A page is valid if it is all zero, or the secret page with the
        secret, or a workload page whose index, counter (not after the
        state's counter) and fill agree. On a running guest, pages written
        during the scan may be reported.
        """
        state = self.state
        words = self._v().words
        counter = np.uint64(state.counter)
        found: list[np.ndarray] = []
        for lo, hi in self.data_ranges():
            for chunk_lo in range(lo, hi, _CHECK_CHUNK_PAGES):
                chunk_hi = min(hi, chunk_lo + _CHECK_CHUNK_PAGES)
                bad = _bad_pages(words[chunk_lo:chunk_hi], chunk_lo, counter)
                if bad.size:
                    found.append(bad)
        bad_pages = np.concatenate(found) if found else np.empty(0, dtype=np.intp)
        bad_pages = bad_pages[bad_pages != state.secret_page]

        secret_intact, secret_valid = self._check_secret_page(state)
        if not secret_valid:
            bad_pages = np.sort(np.append(bad_pages, state.secret_page))

        in_flight = self._in_flight(state, bad_pages)
        in_flight_count = int(in_flight.sum())
        bad_pages = bad_pages[~in_flight]
        return ImageCheck(
            pages_checked=self.npages,
            bad_pages=tuple(int(p) for p in bad_pages[:MAX_BAD_PAGES_LISTED]),
            bad_page_count=int(bad_pages.size),
            secret_intact=secret_intact,
            in_flight_pages=in_flight_count,
        )

    def secret_text(self) -> str | None:
        """The secret line if the secret page is intact, else None."""
        state = self.state
        first = bytes(self._v().pages[state.secret_page, : state.secret_len])
        if hashlib.sha256(first).digest() != state.secret_sha256:
            return None
        return first.decode("utf-8", errors="replace")

    def _check_secret_page(self, state: GuestState) -> tuple[bool, bool]:
        page = bytes(self._v().pages[state.secret_page])
        first = page[: state.secret_len]
        intact = hashlib.sha256(first).digest() == state.secret_sha256
        return intact, intact and page == secret_page_bytes(first)

    def _in_flight(self, state: GuestState, bad_pages: np.ndarray) -> np.ndarray:
        """Which bad pages are a write of the interrupted tick (or boot fill), stopped midway.

        A pause can stop the guest inside a page write. Such a page is a
        word-by-word mix of its old content and the new content, and the
        next guest process rewrites it in full when it redoes the tick. A
        page only counts as in flight if it is exactly such a mix.
        """
        mask = np.zeros(bad_pages.size, dtype=bool)
        if bad_pages.size == 0:
            return mask
        params = state.workload
        if state.booted:
            counter = state.counter
            candidates = np.isin(bad_pages, pages_for_tick(params, counter))
        else:
            counter = 0  # the boot fill writes counter-0 pages over zero pages
            candidates = np.zeros(bad_pages.size, dtype=bool)
            for lo, hi in boot_fill_ranges(params, state.fill_fraction):
                candidates |= (bad_pages >= lo) & (bad_pages < hi)
        words = self._v().words
        for i in np.flatnonzero(candidates):
            mask[i] = _is_torn_write(words[int(bad_pages[i])], int(bad_pages[i]), counter)
        return mask

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close. Idempotent. Arrays a caller still holds keep the mapping alive."""
        views, self._views = self._views, None
        if views is None:
            return
        try:
            views.ram.release()
        except BufferError:
            pass  # someone built a view on ``ram``; it keeps the mapping alive
        del views
        mm, self._mm = self._mm, None
        unmap_and_close(mm, self._fd)

    def __repr__(self) -> str:
        status = "closed" if self.closed else f"{self.npages} pages"
        return f"GuestImage({str(self.path)!r}, {status})"

    def _v(self) -> _Views:
        if self._views is None:
            raise ImageError(f"guest image {self.path} is closed")
        return self._views


def _bad_pages(words: np.ndarray, first_index: int, counter: np.uint64) -> np.ndarray:
    """Indexes (absolute) of the pages in ``words`` that are neither zero nor valid workload pages."""
    w0 = words[:, 0]
    w1 = words[:, 1]
    fill = words[:, 2:]
    high = fill.max(axis=1)
    uniform = high == fill.min(axis=1)
    index = np.arange(first_index, first_index + words.shape[0], dtype=np.uint64)
    zero = uniform & (high == 0) & (w0 == 0) & (w1 == 0)
    workload = uniform & (w0 == index) & (w1 <= counter) & (high == fill_values(index, w1))
    return np.flatnonzero(~(zero | workload)) + first_index


_COUNTER_MULTIPLIER_INVERSE = pow(COUNTER_MULTIPLIER, -1, 1 << 64)


def _is_torn_write(page: np.ndarray, index: int, counter: int) -> bool:
    """Whether ``page`` (512 uint64) is a mix of its new content at ``counter`` and a valid old one.

    The guest stores whole aligned words, so each word is either old or new.
    The old content was a zero page or a workload page written at some
    counter ``<= counter``; that counter is read from word 1 or recovered
    from a fill word (the multiplier is odd, hence invertible mod 2**64).
    """
    new = np.empty(WORDS_PER_PAGE, dtype=np.uint64)
    new[0], new[1] = index, counter
    new[2:] = fill_values(np.array([index], dtype=np.uint64), counter)[0]
    differs = page != new
    old_words = page[differs]
    old_counters: set[int] = set()
    if differs[1]:
        old_counters.add(int(page[1]))
    else:
        fill_positions = np.flatnonzero(differs[2:])
        if fill_positions.size:
            x = int(page[2 + fill_positions[0]]) ^ ((index * INDEX_MULTIPLIER) & _MASK64)
            for low_bit in (0, 1):  # the fill's "| 1" hides the low bit
                old_counters.add(((x & ~1 | low_bit) * _COUNTER_MULTIPLIER_INVERSE) & _MASK64)
    if not old_words.any():
        return True  # old content: a zero page
    for old_counter in old_counters:
        if old_counter > counter:
            continue
        old = new.copy()
        old[1] = old_counter
        old[2:] = fill_values(np.array([index], dtype=np.uint64), old_counter)[0]
        if np.array_equal(old[differs], old_words):
            return True
    return False


def _validate_memory_bytes(memory_bytes: int) -> None:
    if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool):
        raise ImageError(f"memory size must be an integer number of bytes, got {memory_bytes!r}")
    if memory_bytes % PAGE_SIZE or not MIN_MEMORY_BYTES <= memory_bytes <= MAX_MEMORY_BYTES:
        raise ImageError(
            f"memory size {memory_bytes} must be a multiple of {PAGE_SIZE} "
            f"between {MIN_MEMORY_BYTES} (1 MiB) and {MAX_MEMORY_BYTES} (1 TiB)"
        )


def _check_free_space(path: Path, size: int) -> None:
    """Refuse an image its file system could not hold once written.

    A tmpfs that fills up kills the guest with SIGBUS at a random write, so
    say it now. (Images are sparse, so several may still overcommit.)
    """
    try:
        st = os.statvfs(path.parent)
    except OSError as exc:
        raise ImageError(f"cannot create guest image in {path.parent}: {exc.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if free < size:
        raise ImageError(
            f"not enough space in {path.parent} for a {size}-byte image: {free} bytes free; "
            f"free space or use a smaller memory size"
        )
