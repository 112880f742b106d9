"""The time axis of a migration's picture, from reports of both backends' shapes (no agents)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealift.cli.common import CliError
from sealift.cli.migration_plot import timeline, write_migration_plot


def round_entry(index: int, mib: int, seconds: float, dirty_pages: int, final: bool = False) -> dict:
    return {
        "round": index,
        "pages_sent": mib * 256,
        "bytes_sent": mib << 20,
        "duration_s": seconds,
        "dirty_pages_left": dirty_pages,
        "throughput_mib_s": round(mib / seconds, 1),
        "decision": "stop-and-copy" if final else "continue",
        "reason": "test",
        "final": final,
    }


def builtin_report() -> dict:
    return {
        "migration_id": "ab" * 16,
        "vm": "vm1",
        "source": "host-a",
        "destination": "host-b",
        "status": "completed",
        "rounds": 3,
        "memory_bytes": 64 << 20,
        "downtime_ms": 80.0,
        "downtime_breakdown_ms": {"running_receipt": 80.0, "stream_sent": 50.0, "commit_sent": 70.0},
        "round_reports": [
            round_entry(0, 60, 0.5, 2560),  # 10 MiB dirtied while 60 went: 20 MiB/s
            round_entry(1, 10, 0.1, 512),
            round_entry(2, 2, 0.05, 0, final=True),
        ],
    }


def test_rounds_are_laid_end_to_end_and_the_pause_is_the_final_rounds_start() -> None:
    line = timeline(builtin_report())
    assert [(p.start_s, p.end_s) for p in line.rounds] == [
        (0.0, 0.5),
        (0.5, pytest.approx(0.6)),
        (pytest.approx(0.6), pytest.approx(0.65)),
    ]
    assert line.switchover_s == pytest.approx(0.6)
    assert line.downtime_s == pytest.approx(0.08)
    assert [step for step, _ in line.downtime_steps] == ["stream_sent", "commit_sent", "running_receipt"]
    assert line.rounds[0].dirty_rate_mib_s == pytest.approx(20.0)
    assert line.rounds[0].remaining_mib == 10 and line.rounds[-1].dirty_rate_mib_s is None
    assert line.memory_mib == 64


def test_a_report_without_a_final_round_pauses_after_the_last() -> None:
    report = builtin_report()  # QEMU's rounds have no final flag: the pause follows the last pass
    for entry in report["round_reports"]:
        entry["final"] = False
    assert timeline(report).switchover_s == pytest.approx(0.65)


def test_a_report_without_rounds_cannot_be_drawn(tmp_path: Path) -> None:
    report = {**builtin_report(), "round_reports": [], "rounds": 0, "status": "failed"}
    with pytest.raises(CliError, match="no rounds"):
        write_migration_plot(report, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_picture_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_migration_plot(builtin_report(), tmp_path / "m.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
