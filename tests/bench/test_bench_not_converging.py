"""The benchmark's early "not converging" verdict, from QEMU's own query-migrate figures."""

from __future__ import annotations

from sealift.bench.harness import NOT_CONVERGING_AFTER_S, NOT_CONVERGING_HOLD_S, ConvergenceWatch, not_converging

MiB = 1 << 20


def ram(dirty_mib_s: float, link_mib_s: float, syncs: int) -> dict[str, object]:
    """query-migrate's ram block: dirty-pages-rate in pages/s, mbps in Mbit/s."""
    return {
        "dirty-pages-rate": int(dirty_mib_s * MiB / 4096),
        "page-size": 4096,
        "mbps": link_mib_s * MiB * 8 / 1e6,
        "dirty-sync-count": syncs,
    }


def test_a_guest_dirtying_faster_than_the_link_is_not_converging() -> None:
    verdict = not_converging(ram(32, 14, syncs=4), NOT_CONVERGING_AFTER_S + 1)
    assert verdict is not None
    assert "32.0 MiB/s" in verdict and "14.0 MiB/s" in verdict


def test_a_link_faster_than_the_guest_may_still_converge() -> None:
    assert not_converging(ram(32, 100, syncs=10), 200.0) is None


def test_no_verdict_before_qemu_measured_enough() -> None:
    assert not_converging(ram(128, 10, syncs=2), 200.0) is None  # too few passes
    assert not_converging(ram(128, 10, syncs=5), NOT_CONVERGING_AFTER_S - 1) is None  # too early
    assert not_converging({}, 500.0) is None  # QEMU has not reported yet


def test_the_verdict_must_hold_without_a_break() -> None:
    watch = ConvergenceWatch(started=0.0)
    t = NOT_CONVERGING_AFTER_S
    assert watch.update(ram(100, 50, syncs=5), t) is None  # first bad sample
    assert watch.update(ram(100, 50, syncs=6), t + NOT_CONVERGING_HOLD_S - 1) is None
    assert watch.update(ram(40, 50, syncs=7), t + NOT_CONVERGING_HOLD_S) is None  # the link caught up: start again
    assert watch.update(ram(100, 50, syncs=8), t + NOT_CONVERGING_HOLD_S + 1) is None
    verdict = watch.update(ram(100, 50, syncs=9), t + 2 * NOT_CONVERGING_HOLD_S + 1)
    assert verdict is not None and "9 passes" in verdict
