"""The destination side: apply authenticated records to a fresh image.

Records are opened (authenticated) into the reader's staging buffer before a
single byte reaches the image, so a tampered record never touches guest RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from sealift.engine.digest import BLOCK_PAGES, DigestWorker, ImageDigest
from sealift.wire.datastream import (
    DataStreamReader,
    DeviceStateReceived,
    PagesReceived,
    RoundEnded,
    StreamEnded,
    ZeroPagesReceived,
)
from sealift.wire.errors import ProtocolError

PAGE_SIZE = 4096


@dataclass
class ReceiveResult:
    rounds: int = 0
    pages_received: int = 0
    device_state: bytes | None = None
    image_digest: str = ""
    first_record_at: float = 0.0
    last_record_at: float = 0.0
    round_pages: list[int] = field(default_factory=list)


class PageStore(Protocol):
    """Where received pages go (the destination image)."""

    @property
    def pages(self) -> np.ndarray: ...  # (npages, 4096) view, read by the digest

    def write_pages(self, first_page: int, data: memoryview) -> None: ...

    def read_pages_into(self, first_page: int, out: memoryview) -> memoryview: ...


class ImageReceiver:
    def __init__(self, store: PageStore, reader: DataStreamReader, digest: str | None = "xxh3") -> None:
        self._store = store
        self._reader = reader
        self._digest = None
        if digest is not None:
            block = memoryview(bytearray(BLOCK_PAGES * PAGE_SIZE))
            self._digest = ImageDigest(store.pages, digest, lambda first, count: store.read_pages_into(first, block[: count * PAGE_SIZE]))
        self._zero_run = memoryview(bytes(PAGE_SIZE * 256))

    def run(self, read_into: Callable[[memoryview], None]) -> ReceiveResult:
        """Read records with `read_into(view)` (fills view exactly) until END."""
        result = ReceiveResult()
        header = bytearray(self._reader.HEADER_SIZE)
        header_view = memoryview(header)
        worker = DigestWorker(self._digest) if self._digest is not None else None
        try:
            while True:
                read_into(header_view)
                if not result.first_record_at:
                    result.first_record_at = time.monotonic()
                self._reader.read_header(header_view)
                read_into(self._reader.payload_buffer())
                event = self._reader.finish_record()
                if self._apply(event, result):
                    break
        finally:
            if worker is not None:
                worker.stop()
        result.last_record_at = time.monotonic()
        if result.device_state is None:
            raise ProtocolError("stream ended without the guest's device state")
        if self._digest is not None:
            result.image_digest = self._digest.digest()
        return result

    def _apply(self, event: object, result: ReceiveResult) -> bool:
        if isinstance(event, PagesReceived):
            data = event.data
            for start, end in contiguous_runs(event.indexes):
                run = data[start * PAGE_SIZE : end * PAGE_SIZE]
                first = int(event.indexes[start])
                self._store.write_pages(first, run)
                if self._digest is not None:
                    self._digest.store_pages(first, run)  # after the write
            result.pages_received += int(event.indexes.size)
        elif isinstance(event, ZeroPagesReceived):
            for start, end in contiguous_runs(event.indexes):
                first = int(event.indexes[start])
                for offset in range(0, end - start, 256):
                    count = min(256, end - start - offset)
                    self._store.write_pages(first + offset, self._zero_run[: count * PAGE_SIZE])
            self._mark(event.indexes)
        elif isinstance(event, RoundEnded):
            result.rounds = event.round + 1
            result.round_pages.append(event.pages)
        elif isinstance(event, DeviceStateReceived):
            result.device_state = event.blob
        elif isinstance(event, StreamEnded):
            return True
        return False

    def _mark(self, indexes: np.ndarray) -> None:  # after the write: see digest.py
        if self._digest is not None:
            self._digest.mark_pages(indexes)


def contiguous_runs(indexes: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) positions in `indexes` (sorted or not) where page numbers are consecutive."""
    if indexes.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indexes.astype(np.int64)) != 1) + 1
    bounds = [0, *breaks.tolist(), int(indexes.size)]
    return list(zip(bounds[:-1], bounds[1:]))
