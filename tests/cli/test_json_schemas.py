"""Every command's --json output matches its JSON Schema in docs/schemas/ (issue 22).

The schemas themselves: valid draft 2020-12, every object closed with every
key required (a missing fact is null, never absent), and naming exactly the
keys the code prints. Then real output: the built-in backend through the CLI
against two real agents (one small VM, one migration shared by the checks),
`sealift demo`, `sealift bench --json` with the lab replaced and the recorded
benchmarks' runs, and failures.
QEMU guests: tests/qemu/test_qemu_json_schemas.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sealift.agent.guard import GuardStats
from sealift.bench.results import ALL_TRANSPORTS, BACKENDS, DEBIAN_WORKLOAD, JSON_KEYS, WORKLOADS, RunResult
from sealift.cluster import OPERATOR, LocalCluster
from sealift.migration.phases import Phase
from sealift.migration.report import MigrationReport, RoundReport
from sealift.monitor.portwatch import FloodWatch

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
COMMANDS = ("demo", "migrate", "migrations", "vm-list", "status", "bench", "migrations-show", "agent-check-config")
VM = "schema-vm"

Check = Callable[[str, object], None]


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def sealift(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `sealift` command as a script runs it (the source tree on PYTHONPATH, as the test run's)."""
    return subprocess.run(
        [sys.executable, "-m", "sealift", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def json_of(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}); stderr:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


# -- the schemas themselves ------------------------------------------------------------


def test_every_schema_is_valid_draft_2020_12() -> None:
    from jsonschema import Draft202012Validator

    names = {path.name.removesuffix(".schema.json") for path in SCHEMAS.glob("*.json")}
    assert names == {*COMMANDS, "failure", "common"}
    for name in names:
        document = schema(name)
        Draft202012Validator.check_schema(document)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert document["$id"].endswith(f"/{name}.schema.json"), name


def objects_in(node: object) -> Iterator[dict[str, Any]]:
    """Every subschema with `properties`, anywhere in a schema."""
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for value in node.values():
            yield from objects_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from objects_in(value)


def test_every_key_is_required_and_no_other_is_allowed() -> None:
    for name in (*COMMANDS, "failure", "common"):
        for obj in objects_in(schema(name)):
            assert obj["required"] == list(obj["properties"]), (name, obj.get("description"))
            assert obj["additionalProperties"] is False, (name, obj.get("description"))


def test_the_schemas_name_exactly_what_the_code_prints() -> None:
    defs = schema("common")["$defs"]
    assert list(defs["migration_report"]["properties"]) == [f.name for f in dataclasses.fields(MigrationReport)]
    assert list(defs["round_report"]["properties"]) == [f.name for f in dataclasses.fields(RoundReport)]
    assert defs["migration_record"]["properties"]["phase"]["enum"] == [phase.value for phase in Phase]
    status = schema("status")["oneOf"][0]["properties"]
    assert list(status["guard"]["properties"]) == [f.name for f in dataclasses.fields(GuardStats)]
    assert list(status["monitor"]["properties"]["port_flood"]["properties"]) == list(FloodWatch().snapshot())
    run = schema("bench")["oneOf"][0]["properties"]["runs"]["items"]["properties"]
    assert tuple(run) == JSON_KEYS
    assert tuple(run["transport"]["enum"]) == ALL_TRANSPORTS
    assert tuple(run["workload"]["enum"]) == (*WORKLOADS, DEBIAN_WORKLOAD)
    assert tuple(run["backend"]["enum"]) == BACKENDS


# -- failures -------------------------------------------------------------------------------


def test_a_failing_command_prints_the_failure_object(tmp_path: Path, check_json: Check) -> None:
    nowhere = str(tmp_path / "no-agent.sock")
    for argv in (["status"], ["vm", "list"], ["migrations"], ["migrate", VM, "--to", "host-b"]):
        done = sealift(*argv, "--socket", nowhere, "--json", timeout=60)
        failure = json_of(done)
        assert done.returncode == 2 and failure["code"] == "agent_unavailable", done.stderr
        check_json("failure", failure)
        check_json(argv[0] if argv[0] != "vm" else "vm-list", failure)
    order = tmp_path / "order.json"
    order.write_text('{"not": "an order"}')
    failure = json_of(sealift("order", "show", str(order), "--json", timeout=60))
    check_json("failure", failure)
    assert failure["code"] == "malformed"


# -- the built-in backend, through the CLI against real agents ------------------------------


@pytest.fixture(scope="module")
def builtin_outputs() -> Iterator[dict[str, Any]]:
    """What the commands print around one migration of a 64 MiB built-in VM from host-a to host-b."""
    cluster = LocalCluster()
    try:
        cluster.start()
        a = ["--socket", str(cluster.agents["host-a"].socket_path), "--json"]
        b = ["--socket", str(cluster.agents["host-b"].socket_path), "--json"]
        outputs: dict[str, Any] = {
            "vm start": json_of(sealift("vm", "start", VM, "--memory", "64M", "--workload", "db", *a)),
            "vm list before": json_of(sealift("vm", "list", *a)),
            "status": json_of(sealift("status", *a)),
        }
        signed = ["--operator", OPERATOR, "--operator-dir", str(cluster.operators)]
        outputs["migrate"] = json_of(sealift("migrate", VM, "--to", "host-b", *signed, *a, timeout=180))
        outputs["vm list after"] = json_of(sealift("vm", "list", *b))
        outputs["vm info after"] = json_of(sealift("vm", "info", VM, *b))
        outputs["migrations source"] = json_of(sealift("migrations", *a))
        outputs["migrations destination"] = json_of(sealift("migrations", *b))
        yield outputs
    finally:
        cluster.stop_guests()
        cluster.cleanup()


@pytest.mark.timeout(300)
def test_builtin_vm_list_and_status(builtin_outputs: dict[str, Any], check_json: Check) -> None:
    for key in ("vm list before", "vm list after"):
        entries = builtin_outputs[key]
        assert [vm["name"] for vm in entries] == [VM], key
        check_json("vm-list", entries)
    check_json("vm-list", [builtin_outputs["vm start"]])
    check_json("vm-list", [builtin_outputs["vm info after"]])
    entry = builtin_outputs["vm info after"]
    assert entry["backend"] == "builtin" and entry["status"] is None and entry["net"] is None
    check_json("status", builtin_outputs["status"])
    assert builtin_outputs["status"]["host"] == "host-a"


@pytest.mark.timeout(300)
def test_builtin_migrate_and_migrations(builtin_outputs: dict[str, Any], check_json: Check) -> None:
    report = builtin_outputs["migrate"]
    assert report["status"] == "completed", report
    check_json("migrate", report)
    assert report["round_reports"], "a built-in migration reports its rounds"
    for key in ("migrations source", "migrations destination"):
        records = builtin_outputs[key]
        assert [r["id"] for r in records] == [report["migration_id"]], key
        check_json("migrations", records)


@pytest.mark.timeout(300)
def test_builtin_demo(check_json: Check) -> None:
    result = json_of(sealift("demo", "--memory", "64M", "--json", timeout=240))
    check_json("demo", result)
    assert result["status"] == "completed" and result["backend"] == "builtin", result
    assert result["memory_check"] == {"bad_pages": 0, "secret_intact": True}
    assert result["probe_answer"] is None  # no network service in the built-in VM
    assert result["counter_before"] is not None and result["rounds"] >= 1


# -- sealift bench --json, the lab replaced ---------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="sealift bench refuses to start without root")
def test_bench_json_for_both_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], check_json: Check
) -> None:
    """The command's own output path, fed runs as the harness makes them: QEMU, built-in, and a failed run."""
    import sealift.bench.harness as harness
    from sealift.bench.results import fill_ratios
    from sealift.cli.main import main

    def runs_of_both_backends(plan, progress=None, on_run=None):  # type: ignore[no-untyped-def]
        runs = [
            RunResult("plain", "qemu", 160, "moderate", 1500, 0, 2.0, 40.0, 55.0, bytes=1 << 27, cpu_s=1.5),
            RunResult("sealift", "qemu", 160, "moderate", 1500, 0, 2.5, 60.0, 80.0, bytes=1 << 27, cpu_s=2.5),
            RunResult("plain", "builtin", 64, "moderate", 1500, 0, 1.0, 20.0, None, bytes=1 << 26, cpu_s=0.5),
            RunResult("sealift", "builtin", 64, "moderate", 1500, 0, error="the destination went away"),
        ]
        fill_ratios(runs)
        return harness.BenchOutcome(runs=runs)

    monkeypatch.setattr(harness, "run_plan", runs_of_both_backends)
    argv = ["bench", "--quick", "--transports", "plain,sealift", "--out", str(tmp_path / "out"), "--json"]
    assert main(argv) == 1  # one run failed
    document = json.loads(capsys.readouterr().out)
    check_json("bench", document)
    assert {r["backend"] for r in document["runs"]} == {"qemu", "builtin"}
    assert document["runs"][-1]["total_time_s"] is None

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(argv) == 2
    refusal = json.loads(capsys.readouterr().out)
    check_json("bench", refusal)
    assert refusal["code"] == "cli_error"


def test_recorded_benchmark_runs_as_bench_json_prints_them(check_json: Check) -> None:
    """The runs of the real benchmarks in bench/results (every transport, both backends, failed runs too)."""
    recorded = sorted((SCHEMAS.parents[1] / "bench" / "results").glob("*/results.json"))
    assert recorded, "no recorded benchmark in bench/results"
    for path in recorded:
        runs = json.loads(path.read_text())["runs"]
        check_json("bench", {"runs": [{key: run[key] for key in JSON_KEYS} for run in runs]})
