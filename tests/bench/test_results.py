"""The benchmark's statistics and tables (sans-IO): ratios per repetition, medians, Table 4 layout."""

from __future__ import annotations

import json

import pytest

from sealift.bench.results import (
    JSON_KEYS,
    RunResult,
    Spread,
    fill_ratios,
    interleaved_schedule,
    summarise,
    table4_markdown,
)


def run(
    transport: str,
    rep: int,
    total: float | None,
    *,
    memory: int = 256,
    error: str | None = None,
    downtime: float = 50.0,
    probe: float | None = 80.0,
    cpu: float = 2.0,
) -> RunResult:
    return RunResult(
        transport,
        "qemu",
        memory,
        "moderate",
        1500,
        rep,
        total_time_s=total,
        downtime_ms=downtime,
        downtime_probe_ms=probe,
        bytes=300 << 20,
        cpu_s=cpu,
        peak_cpu_pct=150.0,
        error=error,
    )


def test_ratio_is_taken_against_plain_of_the_same_repetition_and_cell() -> None:
    runs = [
        run("plain", 0, 2.0),
        run("sealift", 0, 2.2),
        run("plain", 1, 4.0),
        run("sealift", 1, 4.4),
        run("plain", 0, 10.0, memory=1024),
        run("sealift", 0, 12.0, memory=1024),
    ]
    fill_ratios(runs)
    assert [r.ratio_to_plain for r in runs] == [1.0, 1.1, 1.0, 1.1, 1.0, 1.2]


def test_no_ratio_when_plain_failed_or_the_run_failed() -> None:
    runs = [
        run("plain", 0, None, error="boom"),
        run("ssh", 0, 3.0),
        run("plain", 1, 2.0),
        run("ssh", 1, None, error="x"),
    ]
    fill_ratios(runs)
    assert [r.ratio_to_plain for r in runs] == [None, None, 1.0, None]


def test_spread_median_min_max_ignores_missing_values() -> None:
    spread = Spread.of([3.0, None, 1.0, 2.0, 10.0])
    assert spread == Spread(median=2.5, low=1.0, high=10.0, n=4)
    assert spread.text(1) == "2.5 (1.0–10.0)"
    assert Spread.of([None, None]) is None
    assert Spread.of([7.0]).text(0) == "7"  # one run: no range


def test_summaries_count_failures_and_exclude_them_from_the_figures() -> None:
    runs = [run("plain", r, t) for r, t in enumerate((2.0, 3.0, 4.0))]
    runs += [run("sealift", 0, 2.5), run("sealift", 1, None, error="timeout"), run("sealift", 2, 100.0)]
    fill_ratios(runs)
    summaries = summarise(runs, ["plain", "sealift"])
    assert [s.transport for s in summaries] == ["plain", "sealift"]
    plain, sealift = summaries
    assert (plain.runs, plain.failures) == (3, 0)
    assert plain.metrics["total_time_s"] == Spread(3.0, 2.0, 4.0, 3)
    assert (sealift.runs, sealift.failures) == (2, 1)
    assert sealift.metrics["total_time_s"] == Spread(51.25, 2.5, 100.0, 2)
    assert sealift.metrics["ratio_to_plain"] == Spread(13.125, 1.25, 25.0, 2)
    json.dumps([s.to_json() for s in summaries])  # serialisable


def test_table4_has_the_dissertations_rows_and_one_column_per_transport() -> None:
    runs = [run("plain", 0, 2.0, probe=None), run("ssh", 0, 3.0), run("sealift", 0, 2.2)]
    for one, stream_ms, to_running in zip(runs, (1800.0, 2700.0, None), (64.0, 75.5, 90.0)):
        one.qemu_total_ms, one.downtime_to_running_ms = stream_ms, to_running
    fill_ratios(runs)
    table = table4_markdown(summarise(runs, ["plain", "ssh", "sealift"]))
    lines = table.splitlines()
    assert lines[0] == "#### QEMU guest, 256 MiB, moderate workload, MTU 1500"
    assert lines[2] == "| | plain | ssh | sealift |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[4:] if line}
    assert rows["Migration time (s)"] == ["2.00", "3.00", "2.20"]
    assert rows["vs plain"] == ["1.00", "1.50", "1.10"]
    assert rows["Downtime, probed (ms)"] == ["–", "80", "80"]
    assert rows["QEMU's own stream time (s)"] == ["1.80", "2.70", "–"]
    assert rows["Downtime, stop to running (ms)"] == ["64", "76", "90"]
    assert rows["Peak CPU (% of one core)"] == ["150", "150", "150"]
    assert rows["On the wire (MiB)"] == ["300", "300", "300"]
    assert rows["Confidentiality and integrity"][0] == "no"
    assert rows["Confidentiality and integrity"][2].startswith("yes")
    assert rows["Live migration"] == ["yes", "yes", "yes"]
    assert rows["Runs (failed)"] == ["1 (0)", "1 (0)", "1 (0)"]


def test_brief_json_has_exactly_the_issue_keys() -> None:
    r = run("plain", 0, 2.0)
    fill_ratios([r])
    brief = r.to_brief_json()
    assert tuple(brief) == JSON_KEYS
    assert brief["ratio_to_plain"] == 1.0
    assert r.to_json()["throughput_mib_s"] == pytest.approx(150.0)


def test_schedule_interleaves_transports_within_each_repetition() -> None:
    order = interleaved_schedule(["c1", "c2"], ["plain", "sealift", "ssh"], 2)
    assert order[:6] == [
        ("c1", 0, "plain"),
        ("c1", 0, "sealift"),
        ("c1", 0, "ssh"),
        ("c1", 1, "plain"),
        ("c1", 1, "sealift"),
        ("c1", 1, "ssh"),
    ]
    assert len(order) == 12 and order[6] == ("c2", 0, "plain")


def test_table_names_what_each_column_really_was() -> None:
    ssh = run("ssh", 0, 3.0)
    ssh.detail["cipher"] = "chacha20-poly1305@openssh.com"
    builtin_plain = RunResult("plain", "builtin", 128, "moderate", 1500, 0, total_time_s=1.0)
    runs = [run("plain", 0, 2.0), ssh, builtin_plain]
    table = table4_markdown(summarise(runs, ["plain", "ssh"]))
    qemu_part, builtin_part = table.split("#### built-in VM")
    assert "(cipher: chacha20-poly1305@openssh.com)" in qemu_part
    assert "QEMU `tcp:`" in qemu_part and "without protection" in builtin_part
    assert table.index("QEMU guest") < table.index("built-in VM")  # cells in the order they ran


def test_a_debian_run_records_the_disk_and_the_client_and_fails_on_a_lost_write() -> None:
    from sealift.bench.debian import to_run_result
    from sealift.bench.harness import Cell

    cell = Cell("debian", 1024, "serving", 1500, fill_mib=512)
    figures = {"status": "completed", "total_ms": 7800.0, "mirror_ms": 2400.0, "downtime_ms": 180, "disk_mb": 545.2,
               "longest_gap_ms": 566.0, "failed": 0, "writes_acked": 812, "writes_lost": 0, "disk_ok": True,
               "cpu_s": 9.5, "qemu_cpu_s": 6.1, "fill_s": 12.0}  # fmt: skip
    good = to_run_result(figures, "sealift", cell, 0)
    assert good.ok and good.total_time_s == 7.8 and good.downtime_probe_ms == 566.0
    assert (good.disk_bytes, good.mirror_ms, good.requests_failed, good.writes_lost) == (545_200_000, 2400.0, 0, 0)
    assert good.detail["writes_acked"] == 812
    lost = to_run_result({**figures, "writes_lost": 3}, "sealift", cell, 1)
    assert not lost.ok and "3 acknowledged writes lost" in (lost.error or "")
    unchecked = to_run_result({**figures, "disk_ok": False}, "plain", cell, 1)
    assert not unchecked.ok and "disk check FAILED" in (unchecked.error or "")
    broken = to_run_result({"status": "error: the mirror job is gone"}, "ssh", cell, 2)
    assert not broken.ok and broken.total_time_s is None and broken.error == "error: the mirror job is gone"


def test_the_table_shows_disk_and_client_rows_only_for_a_guest_with_a_disk() -> None:
    plain, sealift = run("plain", 0, 2.0), run("sealift", 0, 2.4)
    assert "Disk mirrored (MB)" not in table4_markdown(summarise([plain, sealift]))
    for one, disk, lost in ((plain, 500_000_000, 0), (sealift, 510_000_000, 0)):
        one.backend, one.workload = "debian", "serving"
        one.disk_bytes, one.mirror_ms, one.requests_failed, one.writes_lost = disk, 2400.0, 1, lost
    lines = table4_markdown(summarise([plain, sealift], ["plain", "sealift"])).splitlines()
    assert lines[0] == "#### Debian guest with its disk, 256 MiB, serving workload, MTU 1500"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[4:] if line}
    assert rows["Disk mirrored (MB)"] == ["500", "510"]
    assert rows["Disk mirror time (s)"] == ["2.40", "2.40"]
    assert rows["Client's failed requests"] == ["1", "1"]
    assert rows["Acknowledged writes lost"] == ["0", "0"]
    assert "NBD mirror" in rows["Implementation"][0] and "agents" in rows["Implementation"][1]
