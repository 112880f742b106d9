"""QEMU guests' --json output matches the schemas in docs/schemas/ (issue 22), as the built-in VM's does.

One small QEMU guest migrated once between two agents through the CLI; every
check shares that migration. A built-in VM runs beside the guest on host-a, so
one `vm list` shows both backends' entries: the same keys. The QEMU demo runs
its own agents and guest (tests/cli/test_json_schemas.py has the built-in one).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sealift.agent.client import AgentClient
from sealift.cluster import OPERATOR, LocalCluster

QVM, BVM = "schema-qvm", "schema-bvm"
CMDLINE = "sealift.mem_mib=16 sealift.rate_mib=1"

Check = Callable[[str, object], None]


def sealift(*argv: str, timeout: float = 120) -> Any:
    """What `sealift ... --json` prints, parsed."""
    done = subprocess.run(
        [sys.executable, "-m", "sealift", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}); stderr:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def wait_counter(client: AgentClient, above: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counter = client.request("vm.info", name=QVM)["vm"]["counter"]
        if counter is not None and counter > above:
            return
        time.sleep(0.2)
    raise AssertionError(f"{QVM}: no console counter above {above} within {timeout} s")


@pytest.fixture(scope="module")
def qemu_outputs(guest_image: object) -> Iterator[dict[str, Any]]:
    cluster = LocalCluster()
    try:
        cluster.start()
        a = ["--socket", str(cluster.agents["host-a"].socket_path), "--json"]
        b = ["--socket", str(cluster.agents["host-b"].socket_path), "--json"]
        source = cluster.client("host-a")
        disk = cluster.root / "qvm.qcow2"  # a disk the migration copies: the disk fields of vm list and the report
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        outputs: dict[str, Any] = {
            "qemu vm start": sealift(
                "vm",
                "start",
                QVM,
                "--backend",
                "qemu",
                "--memory",
                "128M",
                "--cmdline",
                CMDLINE,
                "--disk",
                str(disk),
                *a,
            ),
            "bad disk": sealift("vm", "start", "nodisk", "--backend", "qemu", "--disk", str(disk) + ".missing", *a),
        }
        outputs["vm start"] = sealift("vm", "start", BVM, "--memory", "64M", "--workload", "idle", *a)
        wait_counter(source, 0, 90)
        outputs["vm list before"] = sealift("vm", "list", *a)
        outputs["status"] = sealift("status", *a)
        signed = ["--operator", OPERATOR, "--operator-dir", str(cluster.operators)]
        outputs["migrate"] = sealift("migrate", QVM, "--to", "host-b", *signed, *a, timeout=240)
        wait_counter(cluster.client("host-b"), 0, 30)
        outputs["vm list after"] = sealift("vm", "list", *b)
        outputs["vm info after"] = sealift("vm", "info", QVM, *b)
        outputs["migrations source"] = sealift("migrations", *a)
        outputs["migrations destination"] = sealift("migrations", *b)
        yield outputs
    finally:
        cluster.stop_guests()
        cluster.cleanup()


@pytest.mark.timeout(400)
def test_qemu_and_builtin_entries_have_the_same_keys(qemu_outputs: dict[str, Any], check_json: Check) -> None:
    entries = {vm["backend"]: vm for vm in qemu_outputs["vm list before"]}
    assert sorted(entries) == ["builtin", "qemu"]
    assert set(entries["qemu"]) == set(entries["builtin"])
    check_json("vm-list", qemu_outputs["vm list before"])
    check_json("vm-list", [qemu_outputs["vm start"]])
    check_json("vm-list", [qemu_outputs["qemu vm start"]])
    assert [d["format"] for d in qemu_outputs["qemu vm start"]["disks"]] == ["qcow2"]
    check_json("failure", qemu_outputs["bad disk"])
    assert "does not exist" in qemu_outputs["bad disk"]["error"], qemu_outputs["bad disk"]
    qemu = entries["qemu"]
    assert qemu["throttle_pct"] is None and qemu["image_path"] is None and qemu["accel"] in ("kvm", "tcg")
    check_json("status", qemu_outputs["status"])


@pytest.mark.timeout(400)
def test_qemu_migrate_vm_list_and_migrations(qemu_outputs: dict[str, Any], check_json: Check) -> None:
    report = qemu_outputs["migrate"]
    assert report["status"] == "completed", report
    check_json("migrate", report)
    assert (report["disks"], report["disks_copied"]) == (1, 1) and report["disk_bytes_sent"] > 0
    after = qemu_outputs["vm list after"]
    assert [(vm["name"], vm["backend"], vm["status"]) for vm in after] == [(QVM, "qemu", "running")]
    check_json("vm-list", after)
    check_json("vm-list", [qemu_outputs["vm info after"]])
    for key in ("migrations source", "migrations destination"):
        records = qemu_outputs[key]
        assert [r["id"] for r in records] == [report["migration_id"]], key
        check_json("migrations", records)


@pytest.mark.timeout(400)
def test_qemu_demo(guest_image: object, check_json: Check) -> None:
    result = sealift("demo", "--backend", "qemu", "--memory", "128M", "--json", timeout=360)
    check_json("demo", result)
    assert result["status"] == "completed" and result["backend"] == "qemu", result
    assert result["memory_check"] is None  # no check from inside a QEMU guest
    assert result["copies_running"] == {"source": False, "destination": True}
