"""The pre-copy sender and the image receiver against an in-memory guest and image, over AEAD records."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sealift.backends.builtin.receiver import ImageReceiver
from sealift.backends.builtin.sender import PAGES_PER_RECORD, PrecopySender
from sealift.migration.options import MigrationOptions
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, PagesReceived
from sealift.wire.records import AeadProtection

NPAGES = 4096
PAGE = 4096


class ScatteredGuest:
    """A guest whose data lies in many one-page ranges (as a guest that wrote here and there)."""

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


class MemoryImage:
    """The destination image, in memory."""

    def __init__(self) -> None:
        self.pages = np.zeros((NPAGES, PAGE), dtype=np.uint8)
        self.npages = NPAGES

    def write_pages(self, first_page: int, data: memoryview) -> None:
        self.pages[first_page : first_page + len(data) // PAGE] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)


def migrate(guest: ScatteredGuest, digest: str) -> tuple[MemoryImage, int, str, str]:
    """The image received, the number of PAGES records on the wire, and both sides' image digests."""
    key, iv = os.urandom(32), os.urandom(12)
    wire = bytearray()
    writer = DataStreamWriter(AeadProtection(key, iv), NPAGES)
    sent = PrecopySender(guest, writer, wire.extend, MigrationOptions(image_digest=digest)).run()
    events = DataStreamReader(AeadProtection(key, iv), NPAGES).receive_data(wire)
    pages_records = sum(1 for e in events if isinstance(e, PagesReceived))
    image = MemoryImage()
    stream = memoryview(bytes(wire))
    position = 0

    def read_into(view: memoryview) -> None:
        nonlocal position
        view[:] = stream[position : position + len(view)]
        position += len(view)

    received = ImageReceiver(image, DataStreamReader(AeadProtection(key, iv), NPAGES), digest).run(read_into)
    return image, pages_records, sent.image_digest, received.image_digest


@pytest.mark.parametrize("digest", ["tags", "blake3"])
def test_one_page_data_ranges_share_full_records(digest: str) -> None:
    data_pages = np.arange(0, NPAGES, 3, dtype=np.uint32)  # 1366 one-page ranges
    guest = ScatteredGuest(data_pages)
    image, records, sent, received = migrate(guest, digest)
    assert np.array_equal(image.pages, guest.pages)
    assert sent == received
    assert records == -(-data_pages.size // PAGES_PER_RECORD)  # 6 records, not 1366


def test_the_digests_differ_when_one_page_differs() -> None:
    data_pages = np.arange(5, NPAGES, 7, dtype=np.uint32)
    first, second = ScatteredGuest(data_pages), ScatteredGuest(data_pages)
    second.pages[12, 100] ^= 0xFF
    assert migrate(first, "blake3")[2] != migrate(second, "blake3")[2]
