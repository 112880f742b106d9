"""The source side of pre-copy: rounds of pages while the guest runs, then stop-and-copy.

I/O stays at the edge: the sender gets a `sink` that writes bytes to the data
stream and a `GuestMemory` that exposes pages, the dirty log and pause. It
never touches sockets or processes itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import numpy as np

from sealift.backends.builtin.convergence import Action, Decision, RoundStats, decide
from sealift.backends.builtin.digest import ImageDigest
from sealift.migration.options import MigrationOptions
from sealift.migration.report import RoundReport
from sealift.wire.datastream import DataStreamWriter

PAGE_SIZE = 4096
PAGES_PER_RECORD = 256  # 1 MiB records: few wake-ups, cache-resident buffers
SCAN_WINDOW = 8192  # pages scanned for zeroes at once in round 0


class GuestMemory(Protocol):
    """What the engine needs from a backend to migrate its memory."""

    @property
    def pages(self) -> np.ndarray: ...  # (npages, 4096) uint8, live

    def dirty_snapshot(self) -> np.ndarray: ...  # uint32 generations, a copy

    def data_ranges(self) -> list[tuple[int, int]]: ...  # [lo, hi) page ranges that may hold data

    def pause(self) -> None: ...

    def read_device_state(self) -> bytes: ...

    def set_throttle(self, pct: int) -> None: ...


@dataclass(frozen=True)
class TransferProgress:
    """Intra-round progress, at most ~10 times a second, for progress bars."""

    round: int
    pages_done: int
    pages_total: int
    wire_bytes: int
    dirty_pages: int = 0  # pages dirtied since this round began: the next round's work so far


@dataclass
class PrecopyResult:
    rounds: list[RoundStats] = field(default_factory=list)
    reports: list[RoundReport] = field(default_factory=list)
    pages_sent: int = 0
    wire_bytes: int = 0
    paused_at: float = 0.0  # time.monotonic() when the guest was paused
    device_state: bytes = b""
    image_digest: str = ""
    state_digest: str = ""
    stop_reason: str = ""
    throttle_pct: int = 0


def state_digest(blob: bytes) -> str:
    return "blake3:" + blake3.blake3(blob).hexdigest()


class _Pacer:
    """Token bucket for the operator's bandwidth limit."""

    def __init__(self, limit_bps: int | None) -> None:
        self._limit = limit_bps
        self._start = time.monotonic()
        self._sent = 0

    def wait(self, nbytes: int) -> None:
        if self._limit is None:
            return
        self._sent += nbytes
        ahead = self._sent / self._limit - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)


class PrecopySender:
    def __init__(
        self,
        guest: GuestMemory,
        writer: DataStreamWriter,
        sink: Callable[[memoryview], None],
        options: MigrationOptions,
        on_round: Callable[[RoundReport], None] | None = None,
        with_digest: bool = True,
        on_transfer: Callable[[TransferProgress], None] | None = None,
    ) -> None:
        self._guest = guest
        self._pages = guest.pages
        self._npages = self._pages.shape[0]
        self._writer = writer
        self._sink = sink
        self._options = options
        self._on_round = on_round or (lambda report: None)
        self._on_transfer = on_transfer
        self._next_tick = 0.0
        self._round = 0
        self._round_total = 0
        self._round_start_pages = 0
        self._pacer = _Pacer(options.bandwidth_limit_bps)
        self._digest = ImageDigest(self._npages, options.image_digest) if with_digest else None
        self._sent_gens = np.zeros(self._npages, dtype=np.uint32)
        self._scratch = np.empty((PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)

    # -- public -------------------------------------------------------------

    def run(self) -> PrecopyResult:
        result = PrecopyResult()
        self._precopy_rounds(result)
        self._stop_and_copy(result)
        if self._digest is not None:
            result.image_digest = self._digest.digest()
        result.state_digest = state_digest(result.device_state)
        result.pages_sent = self._writer.pages_sent
        result.wire_bytes = self._writer.wire_bytes
        return result

    # -- rounds -------------------------------------------------------------

    def _precopy_rounds(self, result: PrecopyResult) -> None:
        throttle = 0
        round_no = 0
        while True:
            started = time.monotonic()
            bytes_before = self._writer.wire_bytes
            if round_no == 0:
                sent = self._send_round_zero()
            else:
                sent = self._send_dirty()
            self._emit(self._writer.round_end(round_no, sent))
            duration = max(time.monotonic() - started, 1e-6)
            dirty_after = int(np.count_nonzero(self._guest.dirty_snapshot() != self._sent_gens))
            stats = RoundStats(round_no, sent, self._writer.wire_bytes - bytes_before, duration, dirty_after)
            result.rounds.append(stats)
            decision = decide(result.rounds, PAGE_SIZE, self._options, throttle)
            self._report(result, stats, decision)
            if decision.action is Action.STOP_AND_COPY:
                result.stop_reason = decision.reason
                result.throttle_pct = throttle
                return
            if decision.action is Action.THROTTLE:
                throttle = decision.throttle_pct
                self._guest.set_throttle(throttle)
            round_no += 1

    def _stop_and_copy(self, result: PrecopyResult) -> None:
        started = time.monotonic()
        bytes_before = self._writer.wire_bytes
        self._guest.pause()
        result.paused_at = time.monotonic()
        sent = self._send_dirty()
        final_round = len(result.rounds)
        self._emit(self._writer.round_end(final_round, sent))
        result.device_state = self._guest.read_device_state()
        self._emit(self._writer.device_state(result.device_state))
        self._emit(self._writer.end())
        duration = max(time.monotonic() - started, 1e-6)
        stats = RoundStats(final_round, sent, self._writer.wire_bytes - bytes_before, duration, 0)
        result.rounds.append(stats)
        final = Decision(Action.STOP_AND_COPY, result.stop_reason, duration * 1000.0, result.throttle_pct)
        self._report(result, stats, final, final_round=True)

    def _report(self, result: PrecopyResult, stats: RoundStats, decision: Decision, final_round: bool = False) -> None:
        report = RoundReport(
            round=stats.round,
            pages_sent=stats.pages_sent,
            bytes_sent=stats.bytes_sent,
            duration_s=round(stats.duration_s, 6),
            dirty_pages_left=stats.dirty_pages_after,
            throughput_mib_s=round(stats.throughput_bps / (1 << 20), 1),
            decision=decision.action.value,
            reason=decision.reason,
            throttle_pct=decision.throttle_pct,
            final=final_round,
        )
        result.reports.append(report)
        self._on_round(report)

    # -- page selection -----------------------------------------------------

    def _send_round_zero(self) -> int:
        """Every non-zero page (every page without zero-page elision)."""
        self._sent_gens = self._guest.dirty_snapshot()  # before reading any page
        self._begin_round(0, self._npages)
        # Holes of a sparse image are zero by definition; reading them would
        # make tmpfs allocate them. Without elision every page goes anyway.
        ranges = self._guest.data_ranges() if self._options.zero_page_elision else [(0, self._npages)]
        sent = 0
        # Pages left over from one window fill the next record with the next
        # window's: a guest that wrote here and there leaves many small data
        # ranges, and a record per range (measured: 20k one-page records for
        # a 1 GiB db guest) made round 0 three times slower.
        leftover = np.empty(0, dtype=np.uint32)
        for low, high in ranges:
            for start in range(low, high, SCAN_WINDOW):
                window = self._pages[start : min(high, start + SCAN_WINDOW)]
                if self._options.zero_page_elision:
                    nonzero = window.view(np.uint64).any(axis=1)
                    indexes = (np.flatnonzero(nonzero) + start).astype(np.uint32)
                else:
                    indexes = np.arange(start, start + window.shape[0], dtype=np.uint32)
                if leftover.size:
                    indexes = np.concatenate([leftover, indexes])
                whole = indexes.size - indexes.size % PAGES_PER_RECORD
                for first in range(0, whole, PAGES_PER_RECORD):
                    self._send_known_pages(indexes[first : first + PAGES_PER_RECORD])
                sent += whole
                leftover = indexes[whole:]
        if leftover.size:
            self._send_known_pages(leftover)
            sent += int(leftover.size)
        return sent

    def _send_dirty(self) -> int:
        """Pages whose generation moved since we last sent them."""
        snapshot = self._guest.dirty_snapshot()  # before reading any page
        indexes = np.flatnonzero(snapshot != self._sent_gens).astype(np.uint32)
        self._sent_gens = snapshot
        self._begin_round(self._round + 1, int(indexes.size))
        for first in range(0, indexes.size, PAGES_PER_RECORD):
            self._send_maybe_zero_pages(indexes[first : first + PAGES_PER_RECORD])
        return int(indexes.size)

    # -- records ------------------------------------------------------------

    def _send_known_pages(self, indexes: np.ndarray) -> None:
        """Gather pages straight into the writer's staging buffer and send them."""
        count = int(indexes.size)
        index_view, data_view = self._writer.begin_pages(count)
        index_view[:] = indexes
        staged = np.frombuffer(data_view, dtype=np.uint8).reshape(count, PAGE_SIZE)
        first = int(indexes[0])
        if int(indexes[-1]) - first == count - 1:
            np.copyto(staged, self._pages[first : first + count])
        else:
            np.take(self._pages, indexes, axis=0, out=staged)
        if self._digest is not None:  # the bytes we send, before compression reuses the staging area
            self._digest.store_pages(indexes, data_view)
        self._emit_digested(self._writer.finish_pages(count))

    def _send_maybe_zero_pages(self, indexes: np.ndarray) -> None:
        if not self._options.zero_page_elision:
            self._send_known_pages(indexes)
            return
        count = int(indexes.size)
        scratch = self._scratch[:count]
        np.take(self._pages, indexes, axis=0, out=scratch)
        nonzero = scratch.view(np.uint64).any(axis=1)
        zero_indexes = indexes[~nonzero]
        if zero_indexes.size:
            if self._digest is not None:
                self._digest.store_zero_pages(zero_indexes)
            self._emit_digested(self._writer.zero_pages(zero_indexes))
        keep = np.flatnonzero(nonzero)
        if keep.size == 0:
            return
        index_view, data_view = self._writer.begin_pages(int(keep.size))
        index_view[:] = indexes[keep]
        staged = np.frombuffer(data_view, dtype=np.uint8).reshape(keep.size, PAGE_SIZE)
        np.take(scratch, keep, axis=0, out=staged)
        if self._digest is not None:
            self._digest.store_pages(indexes[keep], data_view)
        self._emit_digested(self._writer.finish_pages(int(keep.size)))

    def _emit_digested(self, record: memoryview) -> None:
        """Send a page-carrying record whose pages the digest has stored; it takes the record's tag too."""
        if self._digest is not None:
            self._digest.store_tag(self._writer.last_tag)
        self._emit(record)

    def _emit(self, data: memoryview) -> None:
        self._sink(data)
        self._pacer.wait(len(data))
        if self._on_transfer is not None:
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + 0.1
                # At the tick only (10 a second): one compare of the generations, not per record.
                dirty = int(np.count_nonzero(self._guest.dirty_snapshot() != self._sent_gens))
                self._on_transfer(
                    TransferProgress(
                        self._round,
                        self._writer.pages_sent - self._round_start_pages,
                        self._round_total,
                        self._writer.wire_bytes,
                        dirty,
                    )
                )

    def _begin_round(self, round_no: int, total_pages: int) -> None:
        self._round = round_no
        self._round_total = total_pages
        self._round_start_pages = self._writer.pages_sent
