"""The lab's memory check of a QEMU test guest: a stamped page with any one bit changed reads as damaged.

The pages are built here as the guest's workload writes them
(backends/qemu/guest/workload.c, stamp_page); the check's reading of a real
guest is exercised by tests/qemu/test_qemu_postcopy.py.
"""

from __future__ import annotations

import random
import struct

import pytest

from sealift.lab import guest_memory
from sealift.lab.guest_memory import GOLDEN, PAGE, workload_pages

PAGES = 64


def stamp(index: int, counter: int) -> bytearray:
    """One page as workload.c's stamp_page leaves it in zeroed memory."""
    words = [((index << 32) ^ (counter * GOLDEN) ^ i) & ((1 << 64) - 1) for i in range(8)]
    return bytearray(struct.pack("<8Q", *words) + bytes(PAGE - 64))


def test_a_whole_stamp_gives_its_index_and_other_pages_are_not_stamps() -> None:
    assert guest_memory._page(bytes(stamp(17, 123456)), 0, PAGES) == 17
    assert guest_memory._page(bytes(stamp(0, 1)), 0, PAGES) == 0
    assert guest_memory._page(bytes(PAGE), 0, PAGES) is None  # a zero page
    assert guest_memory._page(random.Random(1).randbytes(PAGE), 0, PAGES) is None
    assert guest_memory._page(bytes(range(256)) * 16, 0, PAGES) is None


@pytest.mark.parametrize("bit", [0, 63, 64 * 5 + 7, 64 * 7 + 63, 8 * 64, 8 * 200 + 3, 8 * PAGE - 1])
def test_any_one_bit_changed_in_a_stamped_page_reads_as_damaged(bit: int) -> None:
    page = stamp(5, 987654)
    page[bit // 8] ^= 1 << (bit % 8)
    assert guest_memory._page(bytes(page), 0, PAGES) == -1


def test_a_stamp_naming_a_page_outside_the_working_set_is_damaged() -> None:
    assert guest_memory._page(bytes(stamp(PAGES + 3, 42)), 0, PAGES) == -1


def test_the_working_set_comes_from_the_workload_arguments() -> None:
    assert workload_pages("sealift.mem_mib=32 sealift.rate_mib=64") == 32 * 256
    with pytest.raises(ValueError):
        workload_pages("sealift.rate_mib=64")


def test_the_check_is_intact_only_with_every_page_and_no_damage() -> None:
    check = guest_memory.MemoryCheck(expected=3, indices={0, 1, 2})
    assert check.intact
    assert not guest_memory.MemoryCheck(expected=3, indices={0, 2}).intact
    assert not guest_memory.MemoryCheck(expected=3, indices={0, 1, 2}, damaged=[0x1000]).intact
