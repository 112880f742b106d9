"""Writing a benchmark's results: JSON (every run and the summaries), Markdown (Table 4 layout), PNG plots."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from sealift.bench.results import RunResult, Summary, summarise, table4_markdown


def results_document(
    runs: Sequence[RunResult], skipped: dict[str, str], command: str, transport_order: Sequence[str]
) -> dict[str, Any]:
    return {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": _cpu_count(), "cpu": _cpu_model(), "kernel": platform.release()},
        "skipped": skipped,
        "summaries": [s.to_json() for s in summarise(runs, transport_order)],
        "runs": [r.to_json() for r in runs],
    }


def markdown_report(
    runs: Sequence[RunResult], skipped: dict[str, str], command: str, transport_order: Sequence[str]
) -> str:
    lines = [
        "# sealift against the alternatives",
        "",
        f"`{command}` on {_cpu_count()} CPUs ({_cpu_model()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "Medians with (min–max) over the runs; 'vs plain' is each run's total time over the plain run of the same "
        "repetition. Peak CPU is summed over every process involved (100% = one core).",
        "",
        table4_markdown(summarise(runs, transport_order)),
    ]
    if skipped:
        lines += ["Not run here:", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()] + [""]
    crashed = [r for r in runs if r.detail.get("guest_crashed")]
    if crashed:
        lines += [
            f"In {len(crashed)} of {len(runs)} runs the guest's kernel panicked on the destination right after "
            "a completed migration (QEMU 7.2 under TCG here, on every transport): their migration figures "
            "stand, their probed downtime does not exist. The runs are in results.json (`guest_crashed`).",
            "",
        ]
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["Failed runs:", ""]
        lines += [
            f"- {r.transport} {r.backend} {r.memory_mib} MiB {r.workload} #{r.repetition}: {r.error}" for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


def write_results(
    directory: Path,
    runs: Sequence[RunResult],
    skipped: dict[str, str],
    command: str,
    transport_order: Sequence[str],
    plots: bool = True,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    path = directory / "results.json"
    path.write_text(json.dumps(results_document(runs, skipped, command, transport_order), indent=2) + "\n")
    written.append(path)
    path = directory / "results.md"
    path.write_text(markdown_report(runs, skipped, command, transport_order))
    written.append(path)
    if plots:
        written += write_plots(directory, summarise(runs, transport_order))
    return written


PLOTS = (
    ("total_time_s", "Migration time (s)", "time.png"),
    ("downtime_probe_ms", "Downtime probed from the client (ms)", "downtime.png"),
    ("cpu_s", "CPU seconds, processes involved", "cpu.png"),
    ("peak_cpu_pct", "Peak CPU (% of one core)", "peak_cpu.png"),
)


# Every PNG sealift writes (these and `sealift migrations show --plot`) looks alike.
PLOT_DPI = 110


def agg_pyplot() -> ModuleType | None:
    """matplotlib's pyplot on the Agg backend (files only, no display), or None without the `bench` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(directory: Path, summaries: Sequence[Summary]) -> list[Path]:
    """Grouped bars per transport for each size (and workload/MTU): median, with min–max as error bars."""
    plt = agg_pyplot()
    if plt is None:
        return []  # the `bench` extra is not installed: JSON and Markdown still tell everything
    written = []
    cells = list(dict.fromkeys(s.cell for s in summaries))
    transports = list(dict.fromkeys(s.transport for s in summaries))
    for metric, title, filename in PLOTS:
        if not any(s.metrics.get(metric) for s in summaries):
            continue
        figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(cells) * len(transports) / 3 + 3), 4.5))
        width = 0.8 / max(1, len(transports))
        for i, transport in enumerate(transports):
            xs, ys, lows, highs = [], [], [], []
            for x, cell in enumerate(cells):
                match = next((s for s in summaries if s.cell == cell and s.transport == transport), None)
                spread = match.metrics.get(metric) if match else None
                if spread is None:
                    continue
                xs.append(x + (i - (len(transports) - 1) / 2) * width)
                ys.append(spread.median)
                lows.append(spread.median - spread.low)
                highs.append(spread.high - spread.median)
            if xs:
                axes.bar(xs, ys, width, yerr=[lows, highs], capsize=2, label=transport)
        axes.set_xticks(range(len(cells)))
        axes.set_xticklabels([_cell_label(c) for c in cells], rotation=20, ha="right", fontsize=8)
        axes.set_ylabel(title)
        axes.set_title(title)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / filename
        figure.savefig(path, dpi=PLOT_DPI)
        plt.close(figure)
        written.append(path)
    return written


def _cell_label(cell: tuple[str, int, str, int]) -> str:
    backend, memory_mib, workload, mtu = cell
    size = f"{memory_mib // 1024} GiB" if memory_mib >= 1024 and memory_mib % 1024 == 0 else f"{memory_mib} MiB"
    return f"{backend} {size} {workload} mtu{mtu}"


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
