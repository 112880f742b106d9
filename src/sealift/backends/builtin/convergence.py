"""When to stop iterating: the pre-copy convergence decision, as a pure function.

After every round the engine asks `decide()` whether to run another round,
to throttle the guest first (auto-converge), or to pause the guest and send
the rest (stop-and-copy). Keeping this free of I/O makes every branch easy to
test and to explain in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sealift.migration.options import MigrationOptions

# A round "shrank" only if it left fewer than this share of the pages it sent.
SHRINK_FACTOR = 0.95
# Round 0 sends contiguous runs; later rounds send scattered pages, which cost
# more per page on both sides (gathers, one write per run, partial digest
# blocks). Measured here: a 1 GiB db guest's dirty rounds ran at 1/2 to 1/3
# of round 0's rate, so round 0's rate alone overpromised the downtime 2x.
SCATTERED_SLOWDOWN = 3.0
# QEMU's cpu-throttle-initial / -increment / max, in percent.
THROTTLE_INITIAL = 20
THROTTLE_STEP = 10
THROTTLE_MAX = 99


class Action(Enum):
    CONTINUE = "continue"
    THROTTLE = "throttle"
    STOP_AND_COPY = "stop-and-copy"


@dataclass(frozen=True)
class RoundStats:
    """What one pre-copy round did, as the engine measured it."""

    round: int
    pages_sent: int
    bytes_sent: int  # bytes written to the wire, framing and tags included
    duration_s: float
    dirty_pages_after: int  # pages dirtied while the round ran: the next round's work

    @property
    def throughput_bps(self) -> float:
        return self.bytes_sent / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    expected_downtime_ms: float
    throttle_pct: int = 0


def estimated_bandwidth(history: list[RoundStats], options: MigrationOptions) -> float:
    """Bytes per second the next (scattered) round should move, capped by the limit.

    After round 0, which moved contiguous memory, scale its rate down by
    SCATTERED_SLOWDOWN; after later rounds, their own rate is representative.
    """
    measured = history[-1].throughput_bps
    if history[-1].round == 0:
        measured /= SCATTERED_SLOWDOWN
    if options.bandwidth_limit_bps is not None:
        measured = min(measured, float(options.bandwidth_limit_bps)) if measured else float(options.bandwidth_limit_bps)
    return measured


def decide(
    history: list[RoundStats],
    page_size: int,
    options: MigrationOptions,
    throttle_pct: int = 0,
) -> Decision:
    """Decide what follows the last round in `history` (which must not be empty)."""
    if not history:
        raise ValueError("decide() needs at least one finished round")
    last = history[-1]
    bandwidth = estimated_bandwidth(history, options)
    remaining_bytes = last.dirty_pages_after * page_size
    expected_ms = remaining_bytes / bandwidth * 1000.0 if bandwidth > 0 else float("inf")

    if expected_ms <= options.downtime_limit_ms:
        return Decision(Action.STOP_AND_COPY, "remaining dirty set fits the downtime limit", expected_ms)
    if len(history) >= options.max_rounds:
        return Decision(Action.STOP_AND_COPY, f"reached the maximum of {options.max_rounds} rounds", expected_ms)
    if last.round >= 1 and last.dirty_pages_after >= SHRINK_FACTOR * last.pages_sent:
        # The guest dirties memory at least as fast as the link carries it.
        if options.auto_converge and throttle_pct < THROTTLE_MAX:
            new_pct = THROTTLE_INITIAL if throttle_pct == 0 else min(THROTTLE_MAX, throttle_pct + THROTTLE_STEP)
            return Decision(Action.THROTTLE, f"not converging: throttling guest to {new_pct}%", expected_ms, new_pct)
        return Decision(
            Action.STOP_AND_COPY,
            "not converging: dirty rate at or above bandwidth"
            + (" with maximum throttle" if options.auto_converge else ""),
            expected_ms,
            throttle_pct,
        )
    return Decision(Action.CONTINUE, "dirty set still shrinking", expected_ms, throttle_pct)
