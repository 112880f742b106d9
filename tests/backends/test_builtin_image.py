"""The image file: layout, validation, state round trip, check(), sparse creation."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sealift.backends.builtin.dirtylog import DirtyLog, DirtyLogError
from sealift.backends.builtin.guest import boot
from sealift.backends.builtin.image import (
    COUNTER_OFFSET,
    DEFAULT_SECRET,
    PAGE_SIZE,
    SECRET_PAGE,
    STATE_AREA_SIZE,
    THROTTLE_OFFSET,
    GuestImage,
    GuestState,
    ImageError,
    secret_page_bytes,
)
from sealift.backends.builtin.workload import (
    PROFILES,
    boot_fill_ranges,
    fill_values,
    pages_for_tick,
    write_page_range,
    write_pages,
)

MiB = 1 << 20
GiB = 1 << 30


def booted_image(path: Path, memory_bytes: int = 4 * MiB, fill: float = 0.5, profile: str = "db") -> GuestImage:
    """An image as a guest leaves it after boot (filled in-process, no guest)."""
    image = GuestImage.create(path, memory_bytes, PROFILES[profile], fill_fraction=fill, seed=11)
    for lo, hi in boot_fill_ranges(image.state.workload, fill):
        write_page_range(image.words, lo, hi, 0)
    image.mark_booted()
    return image


def run_ticks(image: GuestImage, first: int, last: int) -> None:
    params = image.state.workload
    for counter in range(first, last):
        write_pages(image.words, pages_for_tick(params, counter), counter)
        image.set_counter(counter + 1)


def test_default_secret_is_the_dissertation_line() -> None:
    assert DEFAULT_SECRET.startswith("The bank amount transferred")


def test_create_and_open(shm_dir: Path) -> None:
    path = shm_dir / "a.img"
    with GuestImage.create(path, 4 * MiB, PROFILES["web"], fill_fraction=0.25, seed=5) as image:
        assert path.stat().st_size == STATE_AREA_SIZE + 4 * MiB
        assert image.npages == 1024 and image.memory_bytes == 4 * MiB
        assert len(image.ram) == 4 * MiB and image.pages.shape == (1024, PAGE_SIZE)
        state = image.state
        assert (state.profile, state.counter, state.booted, state.seed) == ("web", 0, False, 5)
        assert state.fill_fraction == 0.25 and state.throttle_pct == 0
    with GuestImage.open(path) as image:
        assert image.state == state
        assert image.secret_text() == DEFAULT_SECRET
        assert bytes(image.pages[SECRET_PAGE]) == secret_page_bytes(DEFAULT_SECRET.encode())


def test_ram_and_pages_share_memory(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["idle"]) as image:
        image.pages[3, 10] = 0xAB
        assert image.ram[3 * PAGE_SIZE + 10] == 0xAB
        image.ram[5 * PAGE_SIZE] = 7
        assert image.words[5, 0] == 7


@pytest.mark.parametrize("memory_bytes", [0, -4096, 1 * MiB + 1, 512 * 1024, 2**41])
def test_create_rejects_bad_sizes(shm_dir: Path, memory_bytes: int) -> None:
    with pytest.raises(ImageError, match="multiple of 4096"):
        GuestImage.create(shm_dir / "a.img", memory_bytes, PROFILES["db"])
    assert not (shm_dir / "a.img").exists()


def test_create_refuses_to_overwrite(shm_dir: Path) -> None:
    GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["db"]).close()
    with pytest.raises(ImageError, match="already exists"):
        GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["db"])


def test_open_rejects_bad_magic(shm_dir: Path) -> None:
    path = shm_dir / "a.img"
    GuestImage.create(path, 1 * MiB, PROFILES["db"]).close()
    with open(path, "r+b") as f:
        f.write(b"NOTSEALV")
    with pytest.raises(ImageError, match="bad magic"):
        GuestImage.open(path)


def test_open_rejects_wrong_version(shm_dir: Path) -> None:
    path = shm_dir / "a.img"
    GuestImage.create(path, 1 * MiB, PROFILES["db"]).close()
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(4, "little"))
    with pytest.raises(ImageError, match="version 99"):
        GuestImage.open(path)


@pytest.mark.parametrize("delta", [-PAGE_SIZE, PAGE_SIZE])
def test_open_rejects_wrong_size(shm_dir: Path, delta: int) -> None:
    path = shm_dir / "a.img"
    GuestImage.create(path, 2 * MiB, PROFILES["db"]).close()
    os.truncate(path, path.stat().st_size + delta)
    with pytest.raises(ImageError, match="truncated or altered"):
        GuestImage.open(path)


def test_open_rejects_missing_and_tiny_files(shm_dir: Path) -> None:
    with pytest.raises(ImageError, match="cannot open"):
        GuestImage.open(shm_dir / "missing.img")
    (shm_dir / "tiny.img").write_bytes(b"x" * 100)
    with pytest.raises(ImageError, match="too small"):
        GuestImage.open(shm_dir / "tiny.img")


def test_empty_image_has_no_state_until_written(shm_dir: Path) -> None:
    with GuestImage.create_empty(shm_dir / "d.img", 2 * MiB) as dest:
        assert not dest.pages.any()
        with pytest.raises(ImageError, match="empty"):
            _ = dest.state
    with pytest.raises(ImageError, match="empty"):
        GuestImage.open(shm_dir / "d.img")


def test_state_round_trip(shm_dir: Path) -> None:
    src = booted_image(shm_dir / "s.img")
    run_ticks(src, 0, 5)
    src.set_throttle(30)
    blob = src.read_state()
    assert len(blob) == STATE_AREA_SIZE
    assert GuestState.from_bytes(blob).to_bytes() == blob
    with GuestImage.create_empty(shm_dir / "d.img", src.memory_bytes) as dest:
        dest.write_state(blob)
        assert dest.state == src.state
        assert dest.state.counter == 5 and dest.state.booted and dest.state.throttle_pct == 30
    src.close()


def test_write_state_validates_before_writing(shm_dir: Path) -> None:
    with (
        GuestImage.create(shm_dir / "s.img", 2 * MiB, PROFILES["db"]) as src,
        GuestImage.create_empty(shm_dir / "d.img", 4 * MiB) as dest,
    ):
        blob = src.read_state()
        with pytest.raises(ImageError, match="refusing"):
            dest.write_state(blob)  # 2 MiB state into a 4 MiB image
        with pytest.raises(ImageError, match="bad magic"):
            dest.write_state(b"X" * 8 + blob[8:])
        with pytest.raises(ImageError, match="4096 bytes"):
            dest.write_state(blob[:100])
        bad_throttle = bytearray(blob)
        bad_throttle[THROTTLE_OFFSET] = 100
        with pytest.raises(ImageError, match="throttle"):
            dest.write_state(bytes(bad_throttle))
        assert not any(dest.read_state())  # nothing was written


def test_state_rejects_inconsistent_fields(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "s.img", 2 * MiB, PROFILES["db"]) as src:
        state = src.state
    with pytest.raises(ImageError):
        replace(state, npages=state.npages + 1)
    with pytest.raises(ImageError):
        replace(state, secret_page=state.npages)
    with pytest.raises(ImageError):
        replace(state, hot_set_pages=0)


def test_set_throttle_writes_only_its_field(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["db"]) as image:
        before = bytearray(image.read_state())
        image.set_throttle(90)
        after = bytearray(image.read_state())
        assert image.throttle_pct == 90 and image.state.throttle_pct == 90
        changed = [i for i in range(STATE_AREA_SIZE) if before[i] != after[i]]
        assert changed and all(THROTTLE_OFFSET <= i < THROTTLE_OFFSET + 4 for i in changed)
        for bad in (-1, 100):
            with pytest.raises(ImageError, match="throttle"):
                image.set_throttle(bad)


def test_counter_field(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["db"]) as image:
        image.set_counter(2**40 + 3)
        assert image.counter == 2**40 + 3 == image.state.counter
        raw = image.read_state()[COUNTER_OFFSET : COUNTER_OFFSET + 8]
        assert int.from_bytes(raw, "little") == 2**40 + 3


def test_check_clean_image(shm_dir: Path) -> None:
    with booted_image(shm_dir / "a.img") as image:
        run_ticks(image, 0, 20)
        result = image.check()
        assert result.ok
        assert result.pages_checked == image.npages
        assert (result.bad_page_count, result.bad_pages, result.in_flight_pages) == (0, (), 0)
        assert result.secret_intact


def test_check_fresh_and_unfilled_images_are_clean(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "a.img", 2 * MiB, PROFILES["db"]) as image:
        assert image.check().ok  # all zero except the secret page


@pytest.mark.parametrize("word_index", [0, 1, 2, 300, 511])
def test_check_finds_a_flipped_byte_in_a_workload_page(shm_dir: Path, word_index: int) -> None:
    with booted_image(shm_dir / "a.img") as image:
        run_ticks(image, 0, 10)
        victim = 7  # filled at boot; not written by tick 10, the tick in progress
        assert victim not in pages_for_tick(image.state.workload, 10)
        assert image.check().ok
        image.pages[victim, word_index * 8 + 3] ^= 0x10
        result = image.check()
        assert result.bad_pages == (victim,) and result.bad_page_count == 1
        assert result.secret_intact and not result.ok


def test_check_finds_junk_in_a_zero_page_and_a_misplaced_page(shm_dir: Path) -> None:
    with booted_image(shm_dir / "a.img", fill=0.5) as image:
        last = image.npages - 1  # beyond the fill: a hole
        image.pages[last, 4000] = 1
        image.pages[5] = image.pages[6]  # valid content, wrong place
        assert image.check().bad_pages == (5, last)


def test_check_finds_pages_from_the_future(shm_dir: Path) -> None:
    # A page written at a later counter than the state says: state and RAM
    # come from different moments (e.g. a stale state area).
    with booted_image(shm_dir / "a.img") as image:
        run_ticks(image, 0, 10)
        page = int(pages_for_tick(image.state.workload, 9)[0])
        image.set_counter(5)
        assert page in image.check().bad_pages


def test_check_lists_at_most_16_bad_pages(shm_dir: Path) -> None:
    with booted_image(shm_dir / "a.img", fill=1.0) as image:
        image.words[100:200, 300] ^= np.uint64(1)
        result = image.check()
        assert result.bad_page_count == 100
        assert result.bad_pages == tuple(range(100, 116))


def test_secret_corruption(shm_dir: Path) -> None:
    with booted_image(shm_dir / "a.img") as image:
        image.pages[SECRET_PAGE, 4] ^= 0x01
        result = image.check()
        assert not result.secret_intact and SECRET_PAGE in result.bad_pages
        assert image.secret_text() is None
    with booted_image(shm_dir / "b.img") as image:
        image.pages[SECRET_PAGE, PAGE_SIZE - 1] = 0x41  # the padding, not the first copy
        result = image.check()
        assert result.secret_intact and result.bad_pages == (SECRET_PAGE,)


def test_custom_secret(shm_dir: Path) -> None:
    secret = "The bank amount transferred is EUR 3.50 — ünïcode"
    with GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["idle"], secret=secret) as image:
        assert image.secret_text() == secret
        assert image.state.secret_sha256 == hashlib.sha256(secret.encode()).digest()
        assert image.check().secret_intact
    with pytest.raises(ImageError, match="secret"):
        GuestImage.create(shm_dir / "b.img", 1 * MiB, PROFILES["idle"], secret="")


def test_interrupted_tick_pages_are_in_flight_not_bad(shm_dir: Path) -> None:
    # A pause can stop the guest in the middle of a page write. The next
    # process redoes that tick in full, so such a page is not corruption.
    with booted_image(shm_dir / "a.img", fill=0.5) as image:
        run_ticks(image, 0, 10)
        tick = pages_for_tick(image.state.workload, 10)
        filled, hole = int(tick[0]), int(tick[-1])
        image.pages[hole] = 0  # as if never written before
        assert image.check().ok and image.words[filled, 1] < 10
        for page in (filled, hole):  # stopped after word 199 of the new content
            image.words[page, 1] = 10
            image.words[page, 2:200] = fill_values(np.array([page], dtype=np.uint64), 10)[0]
        image.words[hole, 0] = hole
        result = image.check()
        assert result.ok and result.in_flight_pages == 2
        # Redoing tick 10 repairs them.
        run_ticks(image, 10, 11)
        result = image.check()
        assert result.ok and result.in_flight_pages == 0


def test_damage_in_interrupted_tick_pages_is_still_found(shm_dir: Path) -> None:
    with booted_image(shm_dir / "a.img", fill=1.0) as image:
        run_ticks(image, 0, 10)
        tick = pages_for_tick(image.state.workload, 10)
        garbage, flipped = int(tick[0]), int(tick[1])
        image.words[garbage, 200:] = np.uint64(12345)  # neither old nor new content
        write_pages(image.words, tick[1:2], 10)  # fully written, then a bit flips
        image.pages[flipped, 3000] ^= 0x04
        other = next(p for p in range(2, image.npages) if p not in tick)
        image.words[other, 200:] = np.uint64(12345)  # outside the tick
        result = image.check()
        assert result.bad_pages == tuple(sorted((garbage, flipped, other)))
        assert result.in_flight_pages == 0


def test_data_ranges_follow_writes(shm_dir: Path) -> None:
    with GuestImage.create(shm_dir / "a.img", 4 * MiB, PROFILES["db"]) as image:
        assert image.data_ranges() == [(SECRET_PAGE, SECRET_PAGE + 1)]
        image.pages[500:510] = 1
        assert image.data_ranges() == [(SECRET_PAGE, SECRET_PAGE + 1), (500, 510)]


def test_close_is_safe_with_views_outstanding(shm_dir: Path) -> None:
    image = GuestImage.create(shm_dir / "a.img", 1 * MiB, PROFILES["db"])
    pages = image.pages
    ram = image.ram
    image.close()
    image.close()  # idempotent
    pages[3, 0] = 9  # the mapping stays valid while a view exists
    assert pages[3, 0] == 9
    with pytest.raises(ValueError):
        ram[0]  # released memoryview: an error, never a dangling pointer
    with pytest.raises(ImageError, match="closed"):
        _ = image.counter
    del pages


def test_4gib_image_is_sparse(shm_dir: Path) -> None:
    path = shm_dir / "big.img"
    with GuestImage.create(path, 4 * GiB, PROFILES["db"], fill_fraction=0.0) as image:
        assert image.npages == GiB // 1024
        assert len(image.ram) == 4 * GiB
    assert path.stat().st_size == STATE_AREA_SIZE + 4 * GiB
    assert path.stat().st_blocks * 512 < 1 * MiB  # state area and secret page only
    with GuestImage.open(path) as image:
        assert image.state.memory_bytes == 4 * GiB
        assert image.data_ranges() == [(SECRET_PAGE, SECRET_PAGE + 1)]
    assert path.stat().st_blocks * 512 < 1 * MiB  # opening touched nothing


def test_dirty_log_create_open_snapshot(shm_dir: Path) -> None:
    path = shm_dir / "a.dirty"
    with DirtyLog.create(path, 1000) as log:
        assert path.stat().st_size == 4000
        assert log.gens.dtype == np.dtype("<u4") and not log.gens.any()
        log.gens[[3, 7]] += 1
        snap = log.snapshot()
        log.gens[3] += 1
        assert snap[3] == 1 and log.gens[3] == 2  # a snapshot is a copy
        with DirtyLog.open(path, 1000) as other:
            assert other.gens[3] == 2  # shared file
    with pytest.raises(DirtyLogError, match="another image"):
        DirtyLog.open(path, 999)
    with pytest.raises(DirtyLogError, match="cannot open"):
        DirtyLog.open(shm_dir / "missing.dirty", 10)


def test_dirty_log_create_replaces_without_disturbing_old_mappings(shm_dir: Path) -> None:
    path = shm_dir / "a.dirty"
    old = DirtyLog.create(path, 100)
    old.gens[:] = 5
    with DirtyLog.create(path, 100) as new:
        assert not new.gens.any()
        assert old.gens[0] == 5  # the old mapping still works (no SIGBUS)
    old.close()
    assert [p.name for p in shm_dir.iterdir()] == ["a.dirty"]


def test_interrupted_boot_fill_is_in_flight_and_redone(shm_dir: Path) -> None:
    image = GuestImage.create(shm_dir / "a.img", 128 * MiB, PROFILES["db"], fill_fraction=1.0, seed=2)
    dirty = DirtyLog.create(shm_dir / "a.dirty", image.npages)
    with image, dirty:
        calls = iter([False, True])  # stop after the first 64 MiB chunk
        assert not boot(image, dirty, image.state, lambda: next(calls))
        assert not image.state.booted
        assert image.check().ok
        torn = image.npages - 10  # not filled yet: a page the fill was writing when stopped
        image.words[torn, 0], image.words[torn, 2:100] = torn, fill_values(np.array([torn], dtype=np.uint64), 0)[0]
        result = image.check()
        assert result.ok and result.in_flight_pages == 1
        assert boot(image, dirty, image.state)
        assert image.state.booted
        result = image.check()
        assert result.ok and result.in_flight_pages == 0
        # Each fill bumps a page before and after writing it; page 0 was filled by both boots.
        assert dirty.gens[SECRET_PAGE] == 1 and dirty.gens[0] == 4 and dirty.gens[torn] == 2
