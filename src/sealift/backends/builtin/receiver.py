"""The destination side: apply authenticated records to a fresh image.

Records are opened (authenticated) into the reader's staging buffer before a
single byte reaches the image, so a tampered record never touches guest RAM.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sealift.backends.builtin.digest import ImageDigest
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
    def npages(self) -> int: ...

    def write_pages(self, first_page: int, data: memoryview) -> None: ...


class ImageReceiver:
    def __init__(self, store: PageStore, reader: DataStreamReader, digest: str | None = "tags") -> None:
        self._store = store
        self._reader = reader
        self._digest = ImageDigest(store.npages, digest) if digest is not None else None
        self._zero_run = memoryview(bytes(PAGE_SIZE * 256))

    def run(self, read_into: Callable[[memoryview], None]) -> ReceiveResult:
        """Read records with `read_into(view)` (fills view exactly) until END.

        Two stages, so the cores overlap: this thread receives and opens
        (authenticates, decrypts) records; a writer thread puts the pages into
        the image and enters them in the image digest. Both stages spend their
        time in calls that release the GIL (recv_into, AES-GCM, pwrite). Page data is copied
        into one of a few pooled buffers between them, and order is kept.
        """
        result = ReceiveResult()
        header = bytearray(self._reader.HEADER_SIZE)
        header_view = memoryview(header)
        writer = _PageWriter(self._apply_pages)
        try:
            while True:
                read_into(header_view)
                if not result.first_record_at:
                    result.first_record_at = time.monotonic()
                self._reader.read_header(header_view)
                read_into(self._reader.payload_buffer())
                event = self._reader.finish_record()
                if self._digest is not None and isinstance(event, (PagesReceived, ZeroPagesReceived)):
                    self._digest.store_tag(self._reader.last_tag)  # in stream order, like the source
                if isinstance(event, PagesReceived):
                    writer.submit(event, result)
                    continue
                if isinstance(event, ZeroPagesReceived):
                    writer.drain()  # keep the order of writes to the same page
                if self._apply(event, result):
                    break
            writer.drain()
        finally:
            writer.close()
        result.last_record_at = time.monotonic()
        if result.device_state is None:
            raise ProtocolError("stream ended without the guest's device state")
        if self._digest is not None:
            result.image_digest = self._digest.digest()
        return result

    def _apply_pages(self, indexes: np.ndarray, data: memoryview) -> None:
        for start, end in contiguous_runs(indexes):
            self._store.write_pages(int(indexes[start]), data[start * PAGE_SIZE : end * PAGE_SIZE])
        if self._digest is not None:  # after the write: the map shows what this stage applied
            self._digest.store_pages(indexes, data)

    def _apply(self, event: object, result: ReceiveResult) -> bool:
        """Every record but PAGES, which the writer stage applies; True at END."""
        if isinstance(event, ZeroPagesReceived):
            for start, end in contiguous_runs(event.indexes):
                first = int(event.indexes[start])
                for offset in range(0, end - start, 256):
                    count = min(256, end - start - offset)
                    self._store.write_pages(first + offset, self._zero_run[: count * PAGE_SIZE])
            if self._digest is not None:
                self._digest.store_zero_pages(event.indexes)
        elif isinstance(event, RoundEnded):
            result.rounds = event.round + 1
            result.round_pages.append(event.pages)
        elif isinstance(event, DeviceStateReceived):
            result.device_state = event.blob
        elif isinstance(event, StreamEnded):
            return True
        return False


class _PageWriter:
    """The second stage: writes received pages in order from a small buffer pool."""

    DEPTH = 3  # records in flight between the stages

    def __init__(self, apply_pages: Callable[[np.ndarray, memoryview], None]) -> None:
        self._apply_pages = apply_pages
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(self.DEPTH):
            self._free.put(memoryview(bytearray(256 * PAGE_SIZE)))
        self._work: queue.Queue[tuple[np.ndarray, memoryview] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="page-writer", daemon=True)
        self._thread.start()

    def submit(self, event: PagesReceived, result: ReceiveResult) -> None:
        self._raise_if_failed()
        buffer = self._free.get()
        size = len(event.data)
        buffer[:size] = event.data  # the reader reuses its buffer for the next record
        self._work.put((event.indexes, buffer[:size]))
        result.pages_received += int(event.indexes.size)

    def drain(self) -> None:
        """Wait until every submitted record is in the image."""
        self._work.join()
        self._raise_if_failed()

    def close(self) -> None:
        self._work.put(None)
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._work.get()
            try:
                if item is None:
                    return
                indexes, data = item
                if self._error is None:
                    try:
                        self._apply_pages(indexes, data)
                    except BaseException as exc:  # surfaced in the receiving thread
                        self._error = exc
                self._free.put(memoryview(data.obj))  # the whole pooled buffer again
            finally:
                self._work.task_done()


def contiguous_runs(indexes: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) positions in `indexes` (sorted or not) where page numbers are consecutive."""
    if indexes.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indexes.astype(np.int64)) != 1) + 1
    bounds = [0, *breaks.tolist(), int(indexes.size)]
    return list(zip(bounds[:-1], bounds[1:]))
