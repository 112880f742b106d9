"""`sealift migrations show ID [--plot]` after a real migration between two agents, driven by the CLI.

The migration itself runs through `sealift migrate` with its stderr in a file: the
round lines it logs there are plain `time level logger: message` lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealift.cli.migration_plot import timeline
from sealift.cluster import OPERATOR, LocalCluster
from sealift.host.store import MigrationRecord

Check = Callable[[str, object], None]  # the check_json fixture (tests/conftest.py)

VM = "plotted"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# "2026-12-07 11:20:03,512 INFO sealift.cli.progress: round 0: ..."
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def sealift(*argv: str, stderr: int | object = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealift", *argv],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, dict, Path]]:
    """A 128 MiB write-heavy guest migrated host-a → host-b: a bandwidth limit and a tight downtime budget
    make it take several rounds."""
    cluster = LocalCluster()
    cluster.start()
    try:
        cluster.client("host-a").request("vm.start", name=VM, memory="128M", workload="db")
        stderr_path = tmp_path_factory.mktemp("cli") / "migrate.stderr"
        config = str(cluster.agents["host-a"].config_path)
        with stderr_path.open("w") as stderr:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sealift",
                    "migrate",
                    VM,
                    "--to",
                    "host-b",
                    "--bandwidth",
                    "120M",
                    "--downtime-ms",
                    "60",
                    "--max-rounds",
                    "8",
                ]
                + ["--config", config, "--operator", OPERATOR, "--operator-dir", str(cluster.operators), "--json"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=240,
                check=False,
                env={**os.environ, "COLUMNS": "200"},
            )
        report = json.loads(done.stdout)
        assert done.returncode == 0 and report["status"] == "completed", (done.stdout, stderr_path.read_text())
        yield cluster, report, stderr_path
    finally:
        cluster.stop_guests()
        cluster.cleanup()


def test_cli_log_lines_in_a_file_are_plain(migrated: tuple[LocalCluster, dict, Path]) -> None:
    _, report, stderr_path = migrated
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    rounds = [line for line in lines if "sealift.cli.progress: " in line]
    assert len(rounds) == report["rounds"], lines
    for line in rounds:
        assert PLAIN_LINE.match(line), line
        assert not re.search(r"\w+\.py:\d+\s*$", line), f"a source location in {line!r}"
    assert any(" INFO sealift.cli.progress: stop-and-copy: " in line for line in rounds)


def test_agent_log_lines_in_a_file_are_plain(migrated: tuple[LocalCluster, dict, Path]) -> None:
    cluster, _, _ = migrated
    lines = cluster.agents["host-a"].log_path.read_text().splitlines()
    started = [line for line in lines if "sealift.agent.daemon: agent host-a listening on" in line]
    assert started and PLAIN_LINE.match(started[0]), lines[:5]
    records = [line for line in lines if PLAIN_LINE.match(line)]
    assert records and not any(re.search(r"\w+\.py:\d+\s*$", line) for line in records)


def test_show_prints_the_record_and_its_rounds(migrated: tuple[LocalCluster, dict, Path], check_json: Check) -> None:
    cluster, report, _ = migrated
    socket = str(cluster.agents["host-a"].socket_path)
    done = sealift("migrations", "show", report["migration_id"][:12], "--socket", socket, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    check_json("migrations-show", record)
    assert record["id"] == report["migration_id"] and record["role"] == "source" and record["vm"] == VM
    saved = record["report"]
    assert saved["rounds"] == report["rounds"] >= 3, "a write-heavy guest under a limit takes several rounds"
    assert [r["round"] for r in saved["round_reports"]] == list(range(saved["rounds"]))
    assert saved["round_reports"][-1]["final"] and saved["downtime_ms"] > 0

    text = sealift("migrations", "show", report["migration_id"][:8], "--socket", socket)
    assert text.returncode == 0, text.stderr
    assert report["migration_id"] in text.stdout and "stop-and-copy" in text.stdout


def test_show_plot_writes_a_png(migrated: tuple[LocalCluster, dict, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the bench extra; the test environment has it
    cluster, report, _ = migrated
    png = tmp_path / "migration.png"
    socket = str(cluster.agents["host-a"].socket_path)
    done = sealift("migrations", "show", report["migration_id"], "--socket", socket, "--plot", str(png))
    assert done.returncode == 0, done.stderr
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 30_000, "four panels with data are not a tiny image"
    keep = os.environ.get("SEALIFT_KEEP_PLOT")  # to look at it: SEALIFT_KEEP_PLOT=/tmp/m.png pytest ...
    if keep:
        Path(keep).write_bytes(data)


def test_the_timeline_puts_the_switchover_where_the_guest_paused(migrated: tuple[LocalCluster, dict, Path]) -> None:
    _, report, _ = migrated
    line = timeline(report)
    final = line.rounds[-1]
    assert final.final and line.switchover_s == pytest.approx(final.start_s)
    assert line.memory_mib == 128
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(line.rounds, line.rounds[1:], strict=False))
    assert line.downtime_s == pytest.approx(report["downtime_ms"] / 1000)


def test_show_on_the_destination_has_no_plot(
    migrated: tuple[LocalCluster, dict, Path], tmp_path: Path, check_json: Check
) -> None:
    cluster, report, _ = migrated
    socket = str(cluster.agents["host-b"].socket_path)
    record = json.loads(sealift("migrations", "show", report["migration_id"], "--socket", socket, "--json").stdout)
    assert record["role"] == "destination" and record["report"] is None
    check_json("migrations-show", record)
    done = sealift("migrations", "show", report["migration_id"], "--socket", socket, "--plot", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert "no saved report here" in done.stderr and "source host" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_show_an_unknown_id(migrated: tuple[LocalCluster, dict, Path], check_json: Check) -> None:
    cluster, _, _ = migrated
    done = sealift("migrations", "show", "ffffffff", "--socket", str(cluster.agents["host-a"].socket_path), "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["code"] == "not_found"
    check_json("migrations-show", json.loads(done.stdout))


def test_the_schema_names_the_records_fields() -> None:
    document = json.loads(
        (Path(__file__).resolve().parents[2] / "docs/schemas/migrations-show.schema.json").read_text()
    )
    assert list(document["oneOf"][0]["properties"]) == [f.name for f in dataclasses.fields(MigrationRecord)]
