"""The incremental image digest equals a from-scratch digest of the final contents."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.engine.digest import BLOCK_PAGES, ImageDigest

NPAGES = 100  # not a multiple of the block size: exercises the short tail block


def fresh_digest(pages: np.ndarray, algorithm: str = "xxh3") -> str:
    digest = ImageDigest(pages, algorithm)
    digest.mark_all()
    return digest.digest()


def test_zero_image_needs_no_hashing_and_matches_a_full_hash() -> None:
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    lazy = ImageDigest(pages)
    assert lazy.stale_blocks() == 0
    assert lazy.digest() == fresh_digest(pages)


def test_a_single_changed_byte_changes_the_digest() -> None:
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    before = fresh_digest(pages)
    pages[57, 1000] = 1
    assert fresh_digest(pages) != before


def test_stale_marks_cover_only_touched_blocks() -> None:
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    digest = ImageDigest(pages, "xxh3")
    digest.mark_pages(np.array([0, 1, BLOCK_PAGES * 3 + 2], dtype=np.uint32))
    assert digest.stale_blocks() == 2


@pytest.mark.parametrize("algorithm", ["xxh3", "blake3"])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 255)), min_size=1, max_size=60))
def test_incremental_digest_tracks_every_write(algorithm: str, writes: list[tuple[int, int]]) -> None:
    """Write, mark (after the write), refresh in between: always equals a fresh digest."""
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    digest = ImageDigest(pages, algorithm)
    for step, (page, value) in enumerate(writes):
        pages[page, :] = value
        digest.mark_pages(np.array([page], dtype=np.uint32))
        if step % 7 == 0:
            digest.refresh()
    assert digest.digest() == fresh_digest(pages, algorithm)


def test_algorithms_are_named_in_the_digest() -> None:
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    assert ImageDigest(pages, "xxh3").digest().startswith("xxh3-16k:")
    assert ImageDigest(pages, "blake3").digest().startswith("blake3-16k:")
    with pytest.raises(ValueError):
        ImageDigest(pages, "md5")


def test_a_lost_page_is_caught() -> None:
    """What the end-to-end check is for: a page the engine failed to send."""
    rng = np.random.default_rng(2)
    source = rng.integers(1, 256, size=(NPAGES, 4096), dtype=np.uint8)
    destination = source.copy()
    destination[42] = 0  # never arrived
    assert fresh_digest(source) != fresh_digest(destination)


def test_source_and_destination_agree_on_the_same_contents() -> None:
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, size=(NPAGES, 4096), dtype=np.uint8)
    source[10:20] = 0
    destination = np.zeros_like(source)
    dest_digest = ImageDigest(destination)
    nonzero = np.flatnonzero(source.any(axis=1)).astype(np.uint32)
    destination[nonzero] = source[nonzero]
    dest_digest.mark_pages(nonzero)
    src_digest = ImageDigest(source)
    src_digest.mark_pages(nonzero)
    assert src_digest.digest() == dest_digest.digest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 40), st.integers(1, 255)), min_size=1, max_size=30))
def test_storing_received_runs_equals_a_fresh_digest(writes: list[tuple[int, int, int]]) -> None:
    """Whole blocks hashed from the received data, partial ones re-read: same result."""
    pages = np.zeros((NPAGES, 4096), dtype=np.uint8)
    digest = ImageDigest(pages, "xxh3")
    for step, (first, count, value) in enumerate(writes):
        count = min(count, NPAGES - first)
        run = np.full((count, 4096), value, dtype=np.uint8)
        pages[first : first + count] = run
        digest.store_pages(first, memoryview(run).cast("B"))
        if step % 5 == 0:
            digest.refresh()
    assert digest.digest() == fresh_digest(pages)
