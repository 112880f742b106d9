"""bench/matrix_table.py: the per-repetition ratios and the issue-21 target counts it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from matrix_table import load, main, ratio  # noqa: E402

GiB = 1 << 30


def run(transport: str, repetition: int, seconds: float, downtime: float, **extra: object) -> dict:
    return {
        "backend": "qemu",
        "memory_mib": 1024,
        "workload": "moderate",
        "mtu": 1500,
        "transport": transport,
        "repetition": repetition,
        "total_time_s": seconds,
        "downtime_to_running_ms": downtime,
        "bytes": GiB,
        "cpu_by_role": {"agent-src": 0.4, "agent-dst": 0.3},
        "error": None,
        **extra,
    }


RUNS = [
    run("plain", 0, 2.0, 50),
    run("plain", 1, 4.0, 60),
    run("plain", 2, 3.0, 70),
    run("sealift", 0, 2.1, 60),  # 1.05x
    run("sealift", 1, 5.0, 80),  # 1.25x
    run("sealift", 2, 3.0, 75),  # 1.00x
    run("ssh", 0, 4.0, 90),
    run("ssh", 1, 0.0, 0, error="not converging", total_time_s=None),
    run("ssh", 2, 6.0, 90),
]


def test_ratio_is_the_median_of_per_repetition_ratios_and_skips_failed_runs() -> None:
    plain = [r for r in RUNS if r["transport"] == "plain"]
    assert ratio([r for r in RUNS if r["transport"] == "sealift"], plain) == pytest.approx(1.05)
    assert ratio([r for r in RUNS if r["transport"] == "ssh"], plain) == pytest.approx(2.0)  # 2.0 and 2.0


def test_the_table_counts_the_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": RUNS}))
    assert set(load([path])) == {("qemu", 1024, "moderate", 1500)}
    monkeypatch.setattr(sys, "argv", ["matrix_table.py", str(path)])
    assert main() == 0
    out = capsys.readouterr().out
    assert "| qemu 1024 MiB moderate 1500 | 3.00 s | 5.00 s (2.00x), 1 of 3 not converging | 3.00 s (1.05x) |" in out
    assert "75 vs 60" in out  # downtime medians, sealift against plain
    assert "0.40 / 0.30" in out  # the agents' CPU per GiB on the wire
    assert "- sealift within 1.10x of plain: 1 of 1 cells" in out
    assert "- downtime within plain's + 20 ms: 1 of 1 cells" in out
    assert "- sealift the fastest secure transport: 1 of 1" in out
