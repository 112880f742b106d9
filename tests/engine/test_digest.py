"""The per-page image digest: both sides agree exactly when the destination holds what the source sent."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.engine.digest import PAGE_SIZE, ImageDigest

NPAGES = 100


def full_digest(pages: np.ndarray, algorithm: str = "xxh3") -> str:
    """The digest of an image whose every page was sent as it is now."""
    digest = ImageDigest(pages.shape[0], algorithm)
    digest.store_run(0, memoryview(pages).cast("B"))
    return digest.digest()


def test_an_untouched_image_equals_an_all_zero_image_sent_in_full() -> None:
    zeros = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    assert ImageDigest(NPAGES).digest() == full_digest(zeros)


@pytest.mark.parametrize("algorithm", ["xxh3", "blake3"])
def test_a_single_changed_byte_changes_the_digest(algorithm: str) -> None:
    pages = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    before = full_digest(pages, algorithm)
    pages[57, 1000] = 1
    assert full_digest(pages, algorithm) != before


def test_zero_pages_are_stored_without_data() -> None:
    rng = np.random.default_rng(3)
    pages = rng.integers(1, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    digest = ImageDigest(NPAGES)
    digest.store_run(0, memoryview(pages).cast("B"))
    digest.store_zero_pages(np.array([4, 9], dtype=np.uint32))
    pages[[4, 9]] = 0
    assert digest.digest() == full_digest(pages)


def test_algorithms_are_named_in_the_digest() -> None:
    assert ImageDigest(NPAGES, "xxh3").digest().startswith("xxh3-4k:")
    assert ImageDigest(NPAGES, "blake3").digest().startswith("blake3-4k:")
    with pytest.raises(ValueError):
        ImageDigest(NPAGES, "md5")


def test_a_lost_page_is_caught() -> None:
    """A record the destination never applied leaves its pages' old fingerprints."""
    rng = np.random.default_rng(2)
    source = rng.integers(1, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    src, dst = ImageDigest(NPAGES), ImageDigest(NPAGES)
    src.store_run(0, memoryview(source).cast("B"))
    dst.store_run(0, memoryview(source[:42]).cast("B"))
    dst.store_run(43, memoryview(source[43:]).cast("B"))  # page 42 never arrived
    assert src.digest() != dst.digest()


def test_a_page_applied_at_the_wrong_place_is_caught() -> None:
    rng = np.random.default_rng(4)
    source = rng.integers(1, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    indexes = np.array([3, 17, 60], dtype=np.uint32)
    data = memoryview(np.ascontiguousarray(source[indexes])).cast("B")
    src, dst = ImageDigest(NPAGES), ImageDigest(NPAGES)
    src.store_pages(indexes, data)
    dst.store_pages(np.array([3, 17, 61], dtype=np.uint32), data)
    assert src.digest() != dst.digest()


@pytest.mark.parametrize("algorithm", ["xxh3", "blake3"])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=12, unique=True),
                          st.integers(0, 255)), min_size=1, max_size=30))  # fmt: skip
def test_rounds_of_scattered_pages_end_in_the_digest_of_the_final_image(
    algorithm: str, rounds: list[tuple[list[int], int]]
) -> None:
    """Pages sent again in later rounds (zero or not) overwrite their entries: the end equals a full send."""
    image = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    digest = ImageDigest(NPAGES, algorithm)
    for written, value in rounds:
        indexes = np.array(written, dtype=np.uint32)
        image[indexes] = value
        if value == 0:
            digest.store_zero_pages(indexes)
        else:
            digest.store_pages(indexes, memoryview(np.ascontiguousarray(image[indexes])).cast("B"))
    assert digest.digest() == full_digest(image, algorithm)
