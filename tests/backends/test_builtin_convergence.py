"""The pre-copy stop/continue/throttle decision, branch by branch."""

import pytest

from sealift.backends.builtin.convergence import SCATTERED_SLOWDOWN, Action, RoundStats, decide
from sealift.migration.options import MigrationOptions, OptionsError

PAGE = 4096
GBPS = 1 << 30  # bytes per second


def stats(
    round_no: int, sent: int, dirty_after: int, seconds: float = 1.0, bytes_sent: int | None = None
) -> RoundStats:
    return RoundStats(round_no, sent, bytes_sent if bytes_sent is not None else sent * PAGE, seconds, dirty_after)


def test_stops_when_the_rest_fits_the_downtime_budget() -> None:
    # 1 GiB/s link; 1000 dirty pages = 4 MB = ~4 ms < 300 ms.
    history = [stats(0, 262144, 1000, bytes_sent=GBPS)]
    decision = decide(history, PAGE, MigrationOptions())
    assert decision.action is Action.STOP_AND_COPY
    assert "downtime" in decision.reason
    # Round 0 moved contiguous memory: the scattered rest is expected to go slower.
    assert decision.expected_downtime_ms == pytest.approx(1000 * PAGE / (GBPS / SCATTERED_SLOWDOWN) * 1000)


def test_continues_while_the_dirty_set_shrinks() -> None:
    # 100k dirty pages = 400 MB = ~380 ms at 1 GiB/s: over a 300 ms budget.
    history = [stats(0, 262144, 150000, bytes_sent=GBPS), stats(1, 150000, 100000, bytes_sent=GBPS)]
    decision = decide(history, PAGE, MigrationOptions())
    assert decision.action is Action.CONTINUE


def test_a_tighter_budget_means_more_rounds() -> None:
    history = [stats(0, 262144, 20000, bytes_sent=GBPS)]  # ~76 ms at round 0's rate, ~230 ms scattered
    assert decide(history, PAGE, MigrationOptions(downtime_limit_ms=300)).action is Action.STOP_AND_COPY
    assert decide(history, PAGE, MigrationOptions(downtime_limit_ms=50)).action is Action.CONTINUE


def test_stops_at_max_rounds() -> None:
    history = [stats(i, 200000, 150000 - i, bytes_sent=GBPS) for i in range(3)]
    decision = decide(history, PAGE, MigrationOptions(max_rounds=3))
    assert decision.action is Action.STOP_AND_COPY
    assert "maximum of 3 rounds" in decision.reason


def test_stops_when_rounds_stop_shrinking_without_auto_converge() -> None:
    history = [stats(0, 262144, 200000, bytes_sent=GBPS), stats(1, 200000, 199000, bytes_sent=GBPS)]
    decision = decide(history, PAGE, MigrationOptions())
    assert decision.action is Action.STOP_AND_COPY
    assert "not converging" in decision.reason


def test_auto_converge_throttles_in_qemu_steps_then_gives_up() -> None:
    history = [stats(0, 262144, 200000, bytes_sent=GBPS), stats(1, 200000, 199000, bytes_sent=GBPS)]
    options = MigrationOptions(auto_converge=True)
    first = decide(history, PAGE, options, throttle_pct=0)
    assert (first.action, first.throttle_pct) == (Action.THROTTLE, 20)
    second = decide(history, PAGE, options, throttle_pct=20)
    assert (second.action, second.throttle_pct) == (Action.THROTTLE, 30)
    assert decide(history, PAGE, options, throttle_pct=95).throttle_pct == 99
    last = decide(history, PAGE, options, throttle_pct=99)
    assert last.action is Action.STOP_AND_COPY


def test_round_zero_is_never_judged_as_not_shrinking() -> None:
    # Round 0 sends everything; its leftover is compared with nothing yet.
    history = [stats(0, 1000, 5000, bytes_sent=10 * PAGE, seconds=1.0)]
    assert decide(history, PAGE, MigrationOptions()).action is Action.CONTINUE


def test_bandwidth_limit_caps_the_estimate() -> None:
    # The link did 1 GiB/s, but the operator allows 10 MiB/s: 20000 pages (78 MiB) take ~7.8 s.
    history = [stats(0, 262144, 20000, bytes_sent=GBPS), stats(1, 30000, 20000, bytes_sent=GBPS)]
    decision = decide(history, PAGE, MigrationOptions(bandwidth_limit_bps=10 << 20))
    assert decision.action is Action.CONTINUE
    assert decision.expected_downtime_ms == pytest.approx(20000 * PAGE / (10 << 20) * 1000)


def test_decide_needs_history() -> None:
    with pytest.raises(ValueError):
        decide([], PAGE, MigrationOptions())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downtime_limit_ms": 0},
        {"max_rounds": 0},
        {"compression": "gzip"},
        {"bandwidth_limit_bps": 10},
        {"completion_timeout_s": 0.5},
    ],
)
def test_bad_options_are_refused_with_a_reason(kwargs: dict) -> None:
    with pytest.raises(OptionsError):
        MigrationOptions(**kwargs)


def test_round_zero_rate_is_discounted_for_scattered_pages() -> None:
    """40k dirty pages fit 300 ms at round 0's contiguous rate (~150 ms) but not scattered."""
    history = [stats(0, 262144, 40000, bytes_sent=GBPS)]
    assert decide(history, PAGE, MigrationOptions()).action is Action.CONTINUE
    later = [*history, stats(1, 40000, 40000 // 4, bytes_sent=40000 * PAGE, seconds=40000 * PAGE / (GBPS / 3))]
    assert decide(later, PAGE, MigrationOptions()).action is Action.STOP_AND_COPY
