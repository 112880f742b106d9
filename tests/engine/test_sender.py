"""The pre-copy sender against an in-memory guest: what it puts on the wire, and that it is the guest."""

from __future__ import annotations

import numpy as np

from sealift.engine.digest import ImageDigest
from sealift.engine.options import MigrationOptions
from sealift.engine.sender import PAGES_PER_RECORD, PrecopySender
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, PagesReceived, ZeroPagesReceived
from sealift.wire.records import NoProtection

NPAGES = 4096
PAGE = 4096


class ScatteredGuest:
    """A paused-looking guest whose data lies in many small ranges (as a guest that wrote here and there)."""

    def __init__(self, data_pages: np.ndarray) -> None:
        self.pages = np.zeros((NPAGES, PAGE), dtype=np.uint8)
        self.pages[data_pages] = (data_pages % 251 + 1).astype(np.uint8)[:, None]
        self._data_pages = data_pages
        self._gens = np.zeros(NPAGES, dtype=np.uint32)

    def dirty_snapshot(self) -> np.ndarray:
        return self._gens.copy()

    def data_ranges(self) -> list[tuple[int, int]]:
        return [(int(p), int(p) + 1) for p in self._data_pages]

    def pause(self) -> None:
        pass

    def read_device_state(self) -> bytes:
        return b"state"

    def set_throttle(self, pct: int) -> None:
        pass


def migrate(guest: ScatteredGuest) -> tuple[np.ndarray, list[object], str]:
    wire = bytearray()
    writer = DataStreamWriter(NoProtection(), NPAGES)
    result = PrecopySender(guest, writer, wire.extend, MigrationOptions()).run()
    events = DataStreamReader(NoProtection(), NPAGES).receive_data(wire)
    image = np.zeros((NPAGES, PAGE), dtype=np.uint8)
    received = ImageDigest(NPAGES)
    for event in events:
        if isinstance(event, PagesReceived):
            data = np.frombuffer(event.data, dtype=np.uint8).reshape(-1, PAGE)
            image[event.indexes] = data
            received.store_pages(event.indexes, memoryview(data).cast("B"))
        elif isinstance(event, ZeroPagesReceived):
            image[event.indexes] = 0
            received.store_zero_pages(event.indexes)
    assert received.digest() == result.image_digest
    return image, events, result.image_digest


def test_one_page_data_ranges_share_full_records() -> None:
    data_pages = np.arange(0, NPAGES, 3, dtype=np.uint32)  # 1366 one-page ranges
    guest = ScatteredGuest(data_pages)
    image, events, _ = migrate(guest)
    assert np.array_equal(image, guest.pages)
    records = [e for e in events if isinstance(e, PagesReceived)]
    assert sum(e.indexes.size for e in records) == data_pages.size
    assert len(records) == -(-data_pages.size // PAGES_PER_RECORD)  # 6 records, not 1366


def test_the_image_digest_changes_with_one_page() -> None:
    data_pages = np.arange(5, NPAGES, 7, dtype=np.uint32)
    first = ScatteredGuest(data_pages)
    second = ScatteredGuest(data_pages)
    second.pages[12, 100] ^= 0xFF
    assert migrate(first)[2] != migrate(second)[2]
