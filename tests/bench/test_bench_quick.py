"""`sealift bench --quick --json` end to end: real namespaces, real QEMU guests, sshd, strongSwan, agents.

One run per transport (a small QEMU guest, then a small built-in VM); the
benchmark's own figures are checked for shape and plausibility, never for
speed (performance is judged by the full benchmark, not by tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sealift.bench.harness import AGENT_OPTIONS, available_transports
from sealift.bench.results import DEFAULT_TRANSPORTS, JSON_KEYS
from sealift.cli.bench_cmd import QUICK_BUILTIN_MIB, QUICK_FILL_MIB, QUICK_QEMU_MIB

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"),
]


@pytest.mark.timeout(900)
def test_quick_bench_prints_one_run_per_transport(tmp_path: Path, check_json: Callable[[str, object], None]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sealift", "bench", "--quick", "--json", "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert done.stdout, f"no JSON on stdout; stderr:\n{done.stderr[-3000:]}"
    document = json.loads(done.stdout)
    check_json("bench", document)  # docs/schemas/bench.schema.json
    assert list(document) == ["runs"]
    runs = document["runs"]
    for run in runs:
        assert tuple(run) == JSON_KEYS, run

    expected, _ = available_transports(DEFAULT_TRANSPORTS)
    qemu = {r["transport"]: r for r in runs if r["backend"] == "qemu"}
    builtin = {r["transport"]: r for r in runs if r["backend"] == "builtin"}
    assert sorted(qemu) == sorted(expected), done.stderr[-3000:]
    assert sorted(builtin) == ["plain", "sealift"]
    assert all(r["memory_mib"] == QUICK_QEMU_MIB for r in qemu.values())
    assert all(r["memory_mib"] == QUICK_BUILTIN_MIB for r in builtin.values())
    assert {r["workload"] for r in runs} == {"moderate"}

    failed = {(r["backend"], r["transport"]) for r in runs if r["total_time_s"] is None}
    assert not failed, f"runs failed: {failed}; stderr:\n{done.stderr[-3000:]}"
    for run in runs:
        where = f"{run['backend']}/{run['transport']}"
        assert run["total_time_s"] > 0, where
        assert run["downtime_ms"] is not None and run["downtime_ms"] >= 0, where
        assert run["cpu_s"] > 0, where
        # Everything the guest wrote crossed the attacker's link at least once (no compression here).
        fill_mib = QUICK_FILL_MIB if run["backend"] == "qemu" else QUICK_BUILTIN_MIB * 0.6
        assert run["bytes"] >= 0.8 * fill_mib * 2**20, (where, run["bytes"])
        if run["transport"] == "plain":
            assert run["ratio_to_plain"] == 1.0
        else:
            assert run["ratio_to_plain"] > 0, where
    # The built-in VM has no network service to probe; a QEMU guest does (unless its kernel died).
    assert all(r["downtime_probe_ms"] is None for r in builtin.values())
    assert any(r["downtime_probe_ms"] for r in qemu.values()), "no QEMU run was probed"

    results = tmp_path / "results"
    table = (results / "results.md").read_text()
    assert "Migration time (s)" in table and "Confidentiality and integrity" in table
    full = json.loads((results / "results.json").read_text())
    assert len(full["runs"]) == len(runs) and full["summaries"]
    assert "Downtime, stop to running (ms)" in table
    for run in full["runs"]:
        if run["backend"] == "qemu" and run["error"] is None:
            # Source stopped -> guest running on the destination: a span that contains QEMU's own downtime.
            where = run["transport"]
            assert run["downtime_to_running_ms"] is not None, where
            assert run["downtime_to_running_ms"] >= (run["qemu_downtime_ms"] or 0) - 5, (where, run)
    assert (results / "time.png").stat().st_size > 0 if _has_matplotlib() else True
    assert done.returncode == 0, done.stderr[-3000:]


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_agent_transports_are_known_to_the_agents() -> None:
    """The harness's agent transports must exist in the agents, or they are reported as skipped."""
    from sealift.bench.harness import agent_qemu_transports

    chosen, skipped = available_transports(list(AGENT_OPTIONS))
    assert "sealift" in chosen
    for name in chosen:
        assert AGENT_OPTIONS[name].get("transport", "sealift") in agent_qemu_transports() + ("sealift",)
    for name in skipped:
        assert AGENT_OPTIONS[name]["transport"] not in agent_qemu_transports()


@pytest.mark.timeout(600)
def test_quick_bench_of_sealifts_ipsec_transport(tmp_path: Path, check_json: Callable[[str, object], None]) -> None:
    """sealift-ipsec cannot share a run with the ipsec baseline (both run charon on the hosts): its own run."""
    if available_transports(["sealift-ipsec"])[0] != ["sealift-ipsec"]:
        pytest.skip("the agents have no ipsec transport here")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sealift",
            "bench",
            "--quick",
            "--json",
            "--backends",
            "qemu",
            "--transports",
            "sealift-ipsec",
            "--out",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_json("bench", json.loads(done.stdout))  # docs/schemas/bench.schema.json
    runs = {r["transport"]: r for r in json.loads(done.stdout)["runs"]}
    assert sorted(runs) == ["sealift-ipsec"]  # alone: no plain run, so no ratio
    ipsec = runs["sealift-ipsec"]
    assert ipsec["ratio_to_plain"] is None
    assert ipsec["total_time_s"] > 0 and ipsec["cpu_s"] > 0
    assert ipsec["bytes"] >= 0.8 * QUICK_FILL_MIB * 2**20  # ESP carried at least what the guest wrote
