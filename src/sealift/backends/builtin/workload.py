"""The built-in guest's workload: which pages each tick writes, and what it writes.

A workload *profile* (``idle``, ``web``, ``db``, ``stress``) is what an
operator picks. At image creation it is turned into :class:`WorkloadParams`,
which are stored in the image's state area, so a guest continues with the
same behaviour on any host even if the profile table changes.

Each tick ``c`` writes the pages returned by :func:`pages_for_tick`, a pure
function of ``(params, c)``. A tick interrupted by a pause is therefore redone
identically by the next guest process, on this host or on a migration
destination.

Page format (little-endian uint64 words)::

    word 0        page index
    word 1        counter of the tick that wrote it (the boot fill uses 0)
    words 2..511  fill_values(index, counter), all 510 the same, never zero

so a flipped byte anywhere in a page, or a page stored at the wrong index,
shows up in ``GuestImage.check()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8

# Odd 64-bit multipliers (golden-ratio and xxhash primes) so the fill differs
# for every (index, counter) pair that matters in practice.
INDEX_MULTIPLIER = 0x9E3779B97F4A7C15
COUNTER_MULTIPLIER = 0xC2B2AE3D27D4EB4F
_MASK64 = (1 << 64) - 1

# Pages one tick writes when a profile is unpaced (``stress``): 4 MiB, large
# enough that per-tick Python overhead is small, small enough that a pause
# interrupts little work.
UNPACED_PAGES_PER_TICK = 1024
MAX_PAGES_PER_TICK = 1 << 16


class WorkloadError(ValueError):
    """A workload profile or its parameters are inconsistent."""


@dataclass(frozen=True)
class WorkloadProfile:
    """An operator-facing workload description.

    ``pages_per_second == 0`` means unpaced: ticks run back to back, as fast
    as the process can write; ``tick_hz`` must then be 0 too.
    """

    name: str
    hot_set_fraction: float
    pages_per_second: int
    tick_hz: int

    def __post_init__(self) -> None:
        if not (1 <= len(self.name) <= 16 and self.name.isascii() and self.name.isprintable()):
            raise WorkloadError(f"profile name {self.name!r} must be 1-16 ASCII characters")
        if not 0.0 <= self.hot_set_fraction <= 1.0:
            raise WorkloadError(f"profile {self.name}: hot_set_fraction must be within [0, 1]")
        if self.pages_per_second < 0 or self.tick_hz < 0:
            raise WorkloadError(f"profile {self.name}: pages_per_second and tick_hz must be >= 0")
        if (self.pages_per_second == 0) != (self.tick_hz == 0):
            raise WorkloadError(
                f"profile {self.name}: pages_per_second and tick_hz must both be 0 (unpaced) or both > 0"
            )
        if self.pages_per_tick > MAX_PAGES_PER_TICK:
            raise WorkloadError(f"profile {self.name}: more than {MAX_PAGES_PER_TICK} pages per tick")

    @property
    def pages_per_tick(self) -> int:
        if self.tick_hz == 0:
            return UNPACED_PAGES_PER_TICK
        return max(1, round(self.pages_per_second / self.tick_hz))


PROFILES: dict[str, WorkloadProfile] = {
    # A clock: one page per tick, always the same one.
    "idle": WorkloadProfile("idle", hot_set_fraction=0.0, pages_per_second=10, tick_hz=10),
    # A small hot set rewritten often: converges in a round or two.
    "web": WorkloadProfile("web", hot_set_fraction=0.02, pages_per_second=2_000, tick_hz=20),
    # A quarter of RAM, ~80 MB/s of writes: needs several rounds.
    "db": WorkloadProfile("db", hot_set_fraction=0.25, pages_per_second=20_000, tick_hz=50),
    # All of RAM as fast as possible: outruns any bandwidth-limited link,
    # so pre-copy only converges with auto-converge or stop-and-copy.
    "stress": WorkloadProfile("stress", hot_set_fraction=1.0, pages_per_second=0, tick_hz=0),
}


def get_profile(name: str) -> WorkloadProfile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise WorkloadError(f"unknown workload profile {name!r}; known profiles: {known}") from None


@dataclass(frozen=True)
class WorkloadParams:
    """The workload as the guest runs it; stored in the image's state area.

    Pages are addressed through *workload ordinals* ``0 .. npages-2``: every
    RAM page except the secret page. The hot set is ``hot_set_pages``
    consecutive ordinals starting at ``hot_set_start`` (wrapping around).
    """

    seed: int
    npages: int
    secret_page: int
    hot_set_start: int
    hot_set_pages: int
    pages_per_tick: int
    tick_hz: int

    def __post_init__(self) -> None:
        wp = self.npages - 1
        if self.npages < 2:
            raise WorkloadError("a guest needs at least 2 pages")
        if not 0 <= self.secret_page < self.npages:
            raise WorkloadError(f"secret page {self.secret_page} outside RAM of {self.npages} pages")
        if not 1 <= self.hot_set_pages <= wp:
            raise WorkloadError(f"hot set of {self.hot_set_pages} pages outside [1, {wp}]")
        if not 0 <= self.hot_set_start < wp:
            raise WorkloadError(f"hot set start {self.hot_set_start} outside [0, {wp})")
        if not 1 <= self.pages_per_tick <= MAX_PAGES_PER_TICK:
            raise WorkloadError(f"pages_per_tick {self.pages_per_tick} outside [1, {MAX_PAGES_PER_TICK}]")
        if not 0 <= self.seed <= _MASK64:
            raise WorkloadError("seed must fit in 64 unsigned bits")
        if self.tick_hz < 0:
            raise WorkloadError("tick_hz must be >= 0")

    @classmethod
    def for_profile(cls, profile: WorkloadProfile, npages: int, seed: int, secret_page: int) -> WorkloadParams:
        workload_pages = npages - 1
        hot = min(workload_pages, max(1, round(profile.hot_set_fraction * workload_pages)))
        return cls(
            seed=seed,
            npages=npages,
            secret_page=secret_page,
            hot_set_start=seed % workload_pages,
            hot_set_pages=hot,
            pages_per_tick=profile.pages_per_tick,
            tick_hz=profile.tick_hz,
        )

    @property
    def workload_pages(self) -> int:
        return self.npages - 1

    @property
    def tick_period(self) -> float:
        """Seconds per tick when unthrottled; 0.0 for an unpaced workload."""
        return 0.0 if self.tick_hz == 0 else 1.0 / self.tick_hz


def ordinals_to_pages(ordinals: np.ndarray, secret_page: int) -> np.ndarray:
    """Map workload ordinals to page indexes, stepping over the secret page."""
    ordinals = ordinals.astype(np.intp, copy=False)
    return ordinals + (ordinals >= secret_page)


def pages_for_tick(params: WorkloadParams, counter: int) -> np.ndarray:
    """The sorted, distinct page indexes (intp) that tick ``counter`` writes.

    Uses the raw PCG64 stream rather than ``Generator.integers``: bit
    generators are stream-stable across numpy versions, ``Generator`` methods
    are not, and both ends of a migration must compute the same pages.
    """
    if counter < 0:
        raise WorkloadError("counter must be >= 0")
    bits = np.random.PCG64(np.random.SeedSequence([params.seed, counter]))
    raw = bits.random_raw(params.pages_per_tick)  # uint64
    hot = raw % np.uint64(params.hot_set_pages)
    ordinals = (hot + np.uint64(params.hot_set_start)) % np.uint64(params.workload_pages)
    return np.unique(ordinals_to_pages(ordinals, params.secret_page))


def boot_fill_ranges(params: WorkloadParams, fill_fraction: float) -> list[tuple[int, int]]:
    """Page ranges ``[lo, hi)`` the first boot fills: a prefix of the ordinals."""
    if not 0.0 <= fill_fraction <= 1.0:
        raise WorkloadError("fill_fraction must be within [0, 1]")
    nfill = min(params.workload_pages, math.floor(fill_fraction * params.workload_pages + 0.5))
    sp = params.secret_page
    ranges = []
    if min(nfill, sp) > 0:
        ranges.append((0, min(nfill, sp)))
    if nfill > sp:
        ranges.append((sp + 1, nfill + 1))
    return ranges


def fill_values(indexes: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """Fill word for each page: ``(index * A) ^ (counter * B) | 1`` mod 2**64.

    ``counters`` is one tick's counter (int) or one per page (uint64 array).
    Array arithmetic wraps silently; the scalar case is done in Python ints
    because numpy warns on scalar overflow.
    """
    idx = np.asarray(indexes).astype(np.uint64, copy=False)
    if isinstance(counters, (int, np.integer)):
        cterm: np.ndarray | np.uint64 = np.uint64((int(counters) * COUNTER_MULTIPLIER) & _MASK64)
    else:
        cterm = np.asarray(counters).astype(np.uint64, copy=False) * np.uint64(COUNTER_MULTIPLIER)
    return (idx * np.uint64(INDEX_MULTIPLIER)) ^ cterm | np.uint64(1)


def write_pages(words: np.ndarray, pages: np.ndarray, counter: int) -> None:
    """Write workload-format content into ``pages`` of ``words`` (npages x 512 uint64)."""
    idx = pages.astype(np.uint64)
    words[pages, 0] = idx
    words[pages, 1] = np.uint64(counter)
    words[pages, 2:] = fill_values(idx, counter)[:, None]


def write_page_range(words: np.ndarray, lo: int, hi: int, counter: int) -> None:
    """Write workload-format content into the contiguous pages ``[lo, hi)``."""
    idx = np.arange(lo, hi, dtype=np.uint64)
    words[lo:hi, 0] = idx
    words[lo:hi, 1] = np.uint64(counter)
    words[lo:hi, 2:] = fill_values(idx, counter)[:, None]
