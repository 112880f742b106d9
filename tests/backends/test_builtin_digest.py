"""The image digest: both sides agree exactly when the destination applied what the source sent, in order."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.backends.builtin.digest import PAGE_SIZE, ImageDigest

NPAGES = 100


def tag(n: int) -> bytes:
    return n.to_bytes(16, "big")


def sent_in_full(pages: np.ndarray, algorithm: str) -> str:
    digest = ImageDigest(pages.shape[0], algorithm)
    digest.store_pages(np.arange(pages.shape[0]), memoryview(pages).cast("B"))
    digest.store_tag(tag(1))
    return digest.digest()


def test_the_untouched_image_has_a_fixed_digest() -> None:
    assert ImageDigest(NPAGES).digest() == ImageDigest(NPAGES).digest()
    assert ImageDigest(NPAGES).digest() != ImageDigest(NPAGES + 1).digest()


def test_blake3_binds_the_page_bytes() -> None:
    pages = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    before = sent_in_full(pages, "blake3")
    pages[57, 1000] = 1
    assert sent_in_full(pages, "blake3") != before
    zeros = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    assert ImageDigest(NPAGES, "blake3").digest() != sent_in_full(zeros, "blake3")  # one record more
    assert sent_in_full(zeros, "blake3").startswith("blake3-4k:")


def test_tags_bind_the_record_tags() -> None:
    """Under AEAD a record's tag authenticates its bytes: another tag is another record."""
    pages = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    one, other = ImageDigest(NPAGES), ImageDigest(NPAGES)
    for digest, record_tag in ((one, tag(1)), (other, tag(2))):
        digest.store_pages(np.arange(pages.shape[0]), memoryview(pages).cast("B"))
        digest.store_tag(record_tag)
    assert one.digest() != other.digest()
    assert one.digest().startswith("tags:")


def test_tags_need_aead_records() -> None:
    with pytest.raises(ValueError, match="AEAD"):
        ImageDigest(NPAGES).store_tag(b"")
    with pytest.raises(ValueError):
        ImageDigest(NPAGES, "md5")


@pytest.mark.parametrize("algorithm", ["tags", "blake3"])
def test_a_record_received_but_never_applied_is_caught(algorithm: str) -> None:
    rng = np.random.default_rng(2)
    source = rng.integers(1, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    src, dst = ImageDigest(NPAGES, algorithm), ImageDigest(NPAGES, algorithm)
    for first in range(0, NPAGES, 10):
        run = np.arange(first, first + 10)
        src.store_pages(run, memoryview(source[run]).cast("B"))
        src.store_tag(tag(first))
        if first != 40:  # the destination's writer lost this one
            dst.store_pages(run, memoryview(source[run]).cast("B"))
        dst.store_tag(tag(first))
    assert src.digest() != dst.digest()


@pytest.mark.parametrize("algorithm", ["tags", "blake3"])
def test_a_page_applied_at_the_wrong_place_is_caught(algorithm: str) -> None:
    rng = np.random.default_rng(4)
    source = rng.integers(1, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    indexes = np.array([3, 17, 60], dtype=np.uint32)
    data = memoryview(np.ascontiguousarray(source[indexes])).cast("B")
    src, dst = ImageDigest(NPAGES, algorithm), ImageDigest(NPAGES, algorithm)
    src.store_pages(indexes, data)
    dst.store_pages(np.array([3, 17, 61], dtype=np.uint32), data)
    for digest in (src, dst):
        digest.store_tag(tag(9))
    assert src.digest() != dst.digest()


@pytest.mark.parametrize("algorithm", ["tags", "blake3"])
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=12, unique=True), st.integers(0, 255)),
        min_size=1,
        max_size=30,
    )
)
def test_the_same_records_in_the_same_order_agree(algorithm: str, rounds: list[tuple[list[int], int]]) -> None:
    """Source and destination stores of the same scattered, zero and non-zero records give one digest."""
    image = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    src, dst = ImageDigest(NPAGES, algorithm), ImageDigest(NPAGES, algorithm)
    for written, value in rounds:
        indexes = np.array(written, dtype=np.uint32)
        image[indexes] = value
        record_tag = os.urandom(16)
        for digest in (src, dst):
            if value == 0:
                digest.store_zero_pages(indexes)
            else:
                digest.store_pages(indexes, memoryview(np.ascontiguousarray(image[indexes])).cast("B"))
            digest.store_tag(record_tag)
    assert src.digest() == dst.digest()
