"""Workload profiles and the pure tick function."""

from __future__ import annotations

import numpy as np
import pytest

from sealift.backends.builtin.guest import next_tick_start
from sealift.backends.builtin.workload import (
    PROFILES,
    UNPACED_PAGES_PER_TICK,
    WorkloadError,
    WorkloadParams,
    WorkloadProfile,
    boot_fill_ranges,
    fill_values,
    get_profile,
    pages_for_tick,
)

NPAGES = 4096  # 16 MiB
# pages_for_tick(db, seed 42, 4096 pages, tick 3): (count, first five, last three)
PINNED_DB_SEED42_TICK3 = (332, [46, 48, 50, 51, 53], [1055, 1061, 1066])


def params(profile: str, seed: int = 7, npages: int = NPAGES) -> WorkloadParams:
    return WorkloadParams.for_profile(PROFILES[profile], npages, seed, secret_page=1)


def test_profiles_exist_with_intended_rates() -> None:
    assert {"idle", "web", "db", "stress"} <= set(PROFILES)
    assert PROFILES["idle"].pages_per_tick == 1
    assert PROFILES["web"].pages_per_second == 2_000
    assert PROFILES["db"].pages_per_second == 20_000
    assert PROFILES["stress"].pages_per_second == 0  # unpaced
    assert PROFILES["stress"].pages_per_tick == UNPACED_PAGES_PER_TICK
    assert PROFILES["stress"].hot_set_fraction == 1.0


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(WorkloadError, match="idle"):
        get_profile("nosuch")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="x", hot_set_fraction=1.5, pages_per_second=10, tick_hz=10),
        dict(name="x", hot_set_fraction=0.5, pages_per_second=0, tick_hz=10),
        dict(name="x", hot_set_fraction=0.5, pages_per_second=-1, tick_hz=10),
        dict(name="", hot_set_fraction=0.5, pages_per_second=10, tick_hz=10),
        dict(name="much-too-long-profile-name", hot_set_fraction=0.5, pages_per_second=10, tick_hz=10),
    ],
)
def test_profile_validation(kwargs: dict) -> None:
    with pytest.raises(WorkloadError):
        WorkloadProfile(**kwargs)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_same_counter_gives_same_pages(profile: str) -> None:
    p = params(profile)
    for counter in (0, 1, 12345, 2**40):
        a = pages_for_tick(p, counter)
        b = pages_for_tick(params(profile), counter)
        np.testing.assert_array_equal(a, b)
        assert np.all(np.diff(a) > 0)  # sorted, distinct


def test_different_counters_and_seeds_differ() -> None:
    p = params("db")
    assert not np.array_equal(pages_for_tick(p, 1), pages_for_tick(p, 2))
    assert not np.array_equal(pages_for_tick(p, 1), pages_for_tick(params("db", seed=8), 1))


def test_tick_function_is_stable_across_versions() -> None:
    # Pinned values: a change here means guests on two hosts could disagree.
    pages = pages_for_tick(params("db", seed=42), 3)
    assert (pages.size, pages[:5].tolist(), pages[-3:].tolist()) == PINNED_DB_SEED42_TICK3
    assert int(fill_values(np.array([5], dtype=np.uint64), 9)[0]) == (
        (5 * 0x9E3779B97F4A7C15) ^ (9 * 0xC2B2AE3D27D4EB4F) | 1
    ) & (2**64 - 1)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_secret_page_is_never_written(profile: str) -> None:
    p = params(profile, npages=256)  # small RAM: stress covers nearly every page per tick
    for counter in range(200):
        pages = pages_for_tick(p, counter)
        assert 1 not in pages
        assert pages.min() >= 0 and pages.max() < 256


def test_pages_stay_in_the_hot_set() -> None:
    p = params("web")
    hot_pages = set()
    for counter in range(300):
        hot_pages.update(pages_for_tick(p, counter).tolist())
    assert len(hot_pages) <= p.hot_set_pages
    assert len(hot_pages) > p.hot_set_pages // 2


def test_idle_writes_one_page() -> None:
    p = params("idle")
    assert all(pages_for_tick(p, c).size == 1 for c in range(20))


def test_boot_fill_ranges_skip_the_secret_page() -> None:
    p = params("db", npages=257)  # 256 workload pages
    assert boot_fill_ranges(p, 0.0) == []
    assert boot_fill_ranges(p, 0.5) == [(0, 1), (2, 129)]
    assert boot_fill_ranges(p, 1.0) == [(0, 1), (2, 257)]


def test_tick_schedule_keeps_rate_without_catching_up() -> None:
    period = 0.02
    # On schedule: the next tick starts one period after the previous anchor.
    assert next_tick_start(10.0, 10.001, 0.001, 10.0, period, 0) == pytest.approx(10.02)
    # After a long pause: no burst of missed ticks, start now.
    assert next_tick_start(10.0, 15.0, 0.001, 10.0, period, 0) == 15.0


def test_throttle_stretches_ticks() -> None:
    # Paced: a 20 ms tick at 90% throttle lasts 200 ms.
    assert next_tick_start(10.0, 10.001, 0.001, 10.0, 0.02, 90) == pytest.approx(10.2)
    # Unpaced: 90% of the tick is sleep, based on CPU time (a SIGSTOP pause does not count).
    assert next_tick_start(10.0, 30.0, 0.004, 10.0, 0.0, 90) == pytest.approx(10.04)
    assert next_tick_start(10.0, 10.004, 0.004, 10.0, 0.0, 0) == pytest.approx(10.004)
