"""The destination side: apply authenticated records to a fresh image.

Records are opened (authenticated) into the reader's staging buffer before a
single byte reaches the image, so a tampered record never touches guest RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sealift.engine.digest import DigestWorker, ImageDigest
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


class ImageReceiver:
    def __init__(self, pages: np.ndarray, reader: DataStreamReader, with_digest: bool = True) -> None:
        self._pages = pages
        self._reader = reader
        self._digest = ImageDigest(pages) if with_digest else None

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
            indexes = event.indexes
            data = np.frombuffer(event.data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            first = int(indexes[0])
            if int(indexes[-1]) - first == indexes.size - 1:
                self._pages[first : first + indexes.size] = data
            else:
                self._pages[indexes] = data
            self._mark(indexes)
            result.pages_received += int(indexes.size)
        elif isinstance(event, ZeroPagesReceived):
            self._pages[event.indexes] = 0
            self._mark(event.indexes)
        elif isinstance(event, RoundEnded):
            result.rounds = event.round + 1
            result.round_pages.append(event.pages)
        elif isinstance(event, DeviceStateReceived):
            result.device_state = event.blob
        elif isinstance(event, StreamEnded):
            return True
        return False

    def _mark(self, indexes: np.ndarray) -> None:
        if self._digest is not None:
            self._digest.mark_pages(indexes)
