"""The lab's control-plane, admission and monitor attacks (T5, T6, T7, T9, T10, T12) on real agents.

Each test runs one threat's attacks through `LabRun.run` (the registry, fresh
agents per attack, crash capture) on the built-in backend, in one testbed of
network namespaces shared by the module, and checks what the report will
say: sealift blocked it, the baseline's outcome, exactly one running copy of
the VM, and evidence that names what refused it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sealift.lab.attacks.base import AttackResult
from sealift.lab.runner import LabRun

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with LabRun(out_dir=tmp_path_factory.mktemp("lab-admission")) as run:
        yield run


def run_threat(lab: LabRun, threat: str, count: int) -> list[AttackResult]:
    results = lab.run(only={threat}, backends=("builtin",))
    assert len(results) == count, [r.evidence for r in results]
    for result in results:
        assert result.threat == threat and result.backend == "builtin"
        assert not result.evidence.startswith("error:"), result.evidence
        assert result.sealift == "blocked", result.evidence
        assert result.vm_running_copies == 1, result.evidence
        assert result.evidence.strip()
    return results


@pytest.mark.timeout(60)
def test_t5_a_valid_host_cannot_pull_a_vm_without_an_order_for_it(lab: LabRun) -> None:
    results = run_threat(lab, "T5", 4)
    assert [r.details["refusal_code"] for r in results] == [
        "malformed",
        "wrong_destination",
        "untrusted_issuer",
        "denied_by_policy",
    ]
    for result in results:
        assert result.baseline == "n/a"
        assert result.details["copies"] == {"host-a": "running"}
        assert result.details["orders_reaching_host_c"] == 0  # refused before anything was sent
        assert "host-a audit #" in result.evidence and "order.refused" in result.evidence


@pytest.mark.timeout(90)
def test_t6_a_push_flood_is_refused_capped_and_the_victim_keeps_working(lab: LabRun) -> None:
    orderless, ordered = run_threat(lab, "T6", 2)
    assert orderless.baseline == "n/a"
    assert orderless.details["audit_refusals"] >= 1 and orderless.details["resident_alive"]
    assert sum(orderless.details["refused"].values()) + len(orderless.details["closed"]) == 20
    # With its caps lifted the destination takes all twenty; with sealift's, two at a time.
    assert ordered.baseline == "succeeded" and ordered.details["baseline_accepted"] == 20
    assert ordered.details["accepted"] == 2
    assert ordered.details["refused"].get("guard: migrations per source host", 0) >= 1
    assert ordered.details["oversized"] == {"accepted": 0, "refused": {"admission: memory capacity": 1}}
    assert ordered.details["legitimate_migration"].startswith("completed")
    assert ordered.details["copies"] == {"host-b": "running"}


@pytest.mark.timeout(60)
def test_t7_a_host_lying_about_free_memory_does_not_attract_the_vm(lab: LabRun) -> None:
    impossible, plausible = run_threat(lab, "T7", 2)
    assert impossible.baseline == "succeeded" and impossible.details["baseline_choice"] == "host-c"
    assert impossible.details["placement"]["host"] == "host-b"
    assert plausible.details["first_placement"]["host"] == "host-c"  # the lie wins on paper...
    assert "free of" in plausible.details["error"]  # ...is caught at admission...
    assert plausible.details["second_placement"]["host"] == "host-b"  # ...and the liar is down-ranked
    assert plausible.details["copies"] == {"host-a": "running"}


@pytest.mark.timeout(90)
def test_t9_a_migration_completes_under_a_handshake_flood_and_slow_clients(lab: LabRun) -> None:
    (result,) = run_threat(lab, "T9", 1)
    flood, slow = result.details["flood"], result.details["slow_clients"]
    assert flood["attempts"] == 200 and flood["handshakes_completed"] == 0
    assert slow["opened"] + slow["connect_errors"] == 20 and slow["still_open"] == 0
    assert result.details["migration_time_s"] and result.details["migration_time_without_attack_s"]
    guard = result.details["guard"]
    assert guard["refused_connections"] + guard["refused_handshakes"] > 0


@pytest.mark.timeout(60)
def test_t10_unauthorised_operators_are_refused_and_audit_tampering_is_named(lab: LabRun) -> None:
    outsider, auditor, tampering = run_threat(lab, "T10", 3)
    assert outsider.details["refusal_code"] == "untrusted_issuer"
    assert auditor.details["refusal_code"] == "denied_by_policy"
    assert tampering.details["verify_exit_code"] == 1
    assert {tampering.details["edited_seq"], tampering.details["deleted_seq"]} <= set(tampering.details["named_seqs"])


@pytest.mark.timeout(120)
def test_t12_a_storming_vm_is_flagged_attacker_and_not_migrated(lab: LabRun) -> None:
    (result,) = run_threat(lab, "T12", 1)
    assert result.baseline == "succeeded"  # without monitors the storming VM moves like any other
    assert result.details["verdict"]["kind"] == "attacker"
    assert {d["signal"] for d in result.details["verdict"]["deviations"]} >= {"dirty_bps"}
    assert result.details["refusal_code"] == "vm_flagged_attacker"
    assert result.details["copies"] == {"host-a": "running"}
