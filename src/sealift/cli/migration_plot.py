"""The picture of one migration (`sealift migrations show ID --plot FILE.png`), from its saved report.

The report keeps one entry per round (pages and bytes sent, duration, pages
left dirty at its end, throughput) and the downtime with its breakdown
(milliseconds since the pause at each step). It has no clock times, so the
time axis is the rounds' durations laid end to end from the start of round 0;
the switchover is where the final (stop-and-copy) round begins, which is
when the guest is paused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.bench.output import PLOT_DPI, agg_pyplot
from sealift.cli.common import CliError

PAGE = 4096  # both backends count guest pages of 4 KiB
MIB = float(1 << 20)


@dataclass(frozen=True)
class RoundPoint:
    """One round on the time axis (seconds since round 0 began; sizes in MiB)."""

    round: int
    start_s: float
    end_s: float
    sent_mib: float
    throughput_mib_s: float
    remaining_mib: float  # left dirty at the round's end: what the next round must send
    dirty_rate_mib_s: float | None  # pages dirtied during the round per second; None for the final round
    final: bool


@dataclass(frozen=True)
class Timeline:
    rounds: tuple[RoundPoint, ...]
    memory_mib: float
    switchover_s: float  # the guest pauses
    downtime_s: float
    downtime_steps: tuple[tuple[str, float], ...]  # (step, seconds since the pause)


def timeline(report: dict) -> Timeline:
    """The rounds of a saved report on one time axis (pure: no matplotlib)."""
    points: list[RoundPoint] = []
    clock = 0.0
    for entry in report.get("round_reports") or []:
        duration = max(float(entry["duration_s"]), 1e-6)
        left = int(entry["dirty_pages_left"]) * PAGE / MIB
        final = bool(entry.get("final"))
        points.append(
            RoundPoint(
                round=int(entry["round"]),
                start_s=clock,
                end_s=clock + duration,
                sent_mib=int(entry["bytes_sent"]) / MIB,
                throughput_mib_s=float(entry["throughput_mib_s"]),
                remaining_mib=left,
                # What is dirty at a round's end was written while it was sent.
                dirty_rate_mib_s=None if final else left / duration,
                final=final,
            )
        )
        clock += duration
    if not points:
        raise CliError("the report has no rounds to plot (the migration failed before round 0 ended)")
    # The guest pauses as the final round starts; a report without one (QEMU's) pauses after the last.
    final_round = next((p for p in points if p.final), None)
    switchover = final_round.start_s if final_round else points[-1].end_s
    steps = [(str(k), float(v) / 1000.0) for k, v in (report.get("downtime_breakdown_ms") or {}).items()]
    return Timeline(
        rounds=tuple(points),
        memory_mib=int(report.get("memory_bytes") or 0) / MIB,
        switchover_s=switchover,
        downtime_s=float(report.get("downtime_ms") or 0.0) / 1000.0,
        downtime_steps=tuple(sorted(steps, key=lambda step: step[1])),
    )


def write_migration_plot(report: dict, path: Path) -> Path:
    """Four panels over time: MiB sent per round, throughput, dirty rate, what is left; switchover and downtime."""
    line = timeline(report)
    plt = agg_pyplot()
    if plt is None:
        raise CliError("--plot needs matplotlib: install the bench extra (pip install 'sealift[bench]')")
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    sent, rate, dirty, left = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    starts = [p.start_s for p in line.rounds]
    widths = [p.end_s - p.start_s for p in line.rounds]
    colors = ["tab:red" if p.final else "tab:blue" for p in line.rounds]
    middles = [(p.start_s + p.end_s) / 2 for p in line.rounds]

    sent.bar(starts, [p.sent_mib for p in line.rounds], widths, align="edge", color=colors, edgecolor="white")
    sent.set_ylabel("MiB sent per round")
    sent.set_title("Bytes per round (red: stop-and-copy)", fontsize=10)

    rate.plot(middles, [p.throughput_mib_s for p in line.rounds], "o-", color="tab:green")
    rate.set_ylabel("MiB/s")
    rate.set_title("Throughput per round", fontsize=10)

    precopy = [p for p in line.rounds if p.dirty_rate_mib_s is not None]
    dirty.plot([(p.start_s + p.end_s) / 2 for p in precopy], [p.dirty_rate_mib_s for p in precopy], "o-")
    dirty.set_ylabel("MiB/s")
    dirty.set_title("Dirty rate (left dirty at a round's end / its duration)", fontsize=10)

    # What is left to send: the whole memory at the start, then what each round left dirty.
    left.plot(
        [0.0, *[p.end_s for p in line.rounds]],
        [line.memory_mib, *[p.remaining_mib for p in line.rounds]],
        "o-",
        color="tab:purple",
    )
    left.set_ylabel("MiB")
    left.set_title("Remaining to send (dirty pages)", fontsize=10)

    for axes_ in (sent, rate, dirty, left):
        _mark_switchover(axes_, line)
        axes_.grid(alpha=0.3)
        axes_.set_ylim(bottom=0)  # rates and sizes: a zero baseline, so small changes do not look large
    for axes_ in (dirty, left):
        axes_.set_xlabel("time since round 0 began (s)")
    sent.legend(fontsize=8, loc="upper right")
    figure.suptitle(_title(report, line), fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return path


def _mark_switchover(axes: Any, line: Timeline) -> None:  # a matplotlib Axes (optional: not imported for its type)
    """The pause (a dashed line), the downtime (shaded) and its steps (dotted) on one panel."""
    end = line.switchover_s + line.downtime_s
    label = f"downtime {line.downtime_s * 1000:.1f} ms"
    axes.axvspan(line.switchover_s, end, color="tab:red", alpha=0.15, label=label)
    axes.axvline(line.switchover_s, color="tab:red", linestyle="--", linewidth=1, label="switchover (guest paused)")
    for _step, seconds in line.downtime_steps:
        axes.axvline(line.switchover_s + seconds, color="tab:red", linestyle=":", linewidth=0.8)


def _title(report: dict, line: Timeline) -> str:
    title = (
        f"migration {str(report.get('migration_id', ''))[:12]}: {report.get('vm')} "
        f"{report.get('source')} → {report.get('destination')}, {report.get('status')}, "
        f"{report.get('rounds')} rounds, {int(report.get('memory_bytes') or 0) >> 20} MiB, "
        f"downtime {float(report.get('downtime_ms') or 0):.1f} ms"
    )
    if line.downtime_steps:  # the dotted lines, named: they are too close together for labels of their own
        steps = ", ".join(f"{step} {seconds * 1000:.1f}" for step, seconds in line.downtime_steps)
        title += f"\nms after the pause (dotted): {steps}"
    return title
