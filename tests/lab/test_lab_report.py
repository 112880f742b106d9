"""The lab report: its JSON shape, its Markdown table, and the rule that fails a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealift.cli.lab_cmd import parse_only
from sealift.lab.attacks.base import AttackResult
from sealift.lab.report import RESULT_KEYS, exit_code, failures, public_json, to_markdown, write_report


def result(
    threat: str = "T1", sealift: str = "blocked", copies: int = 1, evidence: str = "0 hits in a.pcap"
) -> AttackResult:
    return AttackResult(
        threat,
        "snoop",
        "builtin",
        "succeeded",
        sealift,
        evidence,
        copies,  # type: ignore[arg-type]
        details={"pcap": "a.pcap"},
    )


def test_public_json_has_exactly_the_documented_keys() -> None:
    document = public_json([result(), result("T2")])
    assert list(document) == ["results"]
    assert [list(r) for r in document["results"]] == [list(RESULT_KEYS)] * 2
    assert document["results"][0] == {
        "threat": "T1",
        "attack": "snoop",
        "backend": "builtin",
        "baseline": "succeeded",
        "sealift": "blocked",
        "evidence": "0 hits in a.pcap",
        "vm_running_copies": 1,
    }
    json.dumps(document)  # serialisable as is


def test_a_run_fails_when_an_attack_gets_through_or_a_vm_does_not_run_exactly_once() -> None:
    assert exit_code([result(), result("T2")]) == 0
    assert exit_code([result(), result("T2", sealift="succeeded")]) == 1
    assert exit_code([result(), result("T11", copies=2)]) == 1
    assert exit_code([result(), result("T11", copies=0)]) == 1
    assert exit_code([]) == 1  # nothing ran: nothing was shown
    assert [r.threat for r in failures([result(), result("T5", sealift="succeeded")])] == ["T5"]


def test_markdown_table_escapes_cells_and_flags_failures(tmp_path: Path) -> None:
    text = to_markdown([result(evidence="a | b\nc"), result("T2", sealift="succeeded")])
    lines = text.splitlines()
    assert lines[0].startswith("| threat | attack | backend | baseline | sealift | evidence | VM running copies |")
    assert "a \\| b c" in lines[2] and lines[2].count(" | ") == 6  # one row, seven cells
    assert "**SUCCEEDED**" in lines[3]
    assert "FAILED" in text

    markdown, json_path = write_report([result()], tmp_path, {"only": ["T1"]})
    assert markdown.read_text() == to_markdown([result()])
    saved = json.loads(json_path.read_text())
    assert saved["results"] == public_json([result()])["results"]
    assert saved["details"][0]["pcap"] == "a.pcap" and saved["failed"] == [] and saved["meta"] == {"only": ["T1"]}


def test_only_takes_threat_ids() -> None:
    assert parse_only("t3, T5") == {"T3", "T5"}
    assert parse_only(None) is None
    with pytest.raises(ValueError, match="T1,T3"):
        parse_only("T3,ssh")


def test_only_and_skip_select_by_threat_or_group() -> None:
    import sealift.lab.attacks  # noqa: F401  (registers the attacks)
    from sealift.lab.attacks.base import ATTACKS
    from sealift.lab.runner import is_selected

    def chosen(only: set[str] | None, skip: set[str], quick: bool = False) -> set[tuple[str, str]]:
        return {(a.threat, a.run.__module__.rsplit(".", 1)[-1]) for a in ATTACKS if is_selected(a, only, skip, quick)}

    every = chosen(None, set())
    ipsec = {row for row in every if row[1] == "ipsec"}
    assert {t for t, _ in ipsec} == {"T1", "T4", "T13"}
    assert chosen({"IPSEC"}, set()) == ipsec
    assert chosen({"IPSEC"}, {"T4"}) == {row for row in ipsec if row[0] != "T4"}
    assert chosen(None, {"T11"}) == {row for row in every if row[0] != "T11"}
    # --quick leaves the IPsec and disk-stream rows out unless asked for by name (CI plays them elsewhere).
    assert chosen({"T1"}, set(), quick=True) == {
        row for row in every if row[0] == "T1" and row[1] not in ("ipsec", "storage", "postcopy")
    }
    storage = {row for row in every if row[1] == "storage"}
    assert storage == {("T1", "storage"), ("T2", "storage"), ("T11", "storage")}
    assert chosen({"STORAGE"}, set(), quick=True) == storage
    postcopy = {row for row in every if row[1] == "postcopy"}
    assert postcopy == {("T1", "postcopy"), ("T2", "postcopy"), ("T11", "postcopy")}
    assert chosen({"POSTCOPY"}, set(), quick=True) == postcopy
    assert chosen({"T1", "IPSEC"}, {"IPSEC"}) == {row for row in every if row[0] == "T1" and row[1] != "ipsec"}
    assert parse_only("t11", "--skip") == {"T11"}
    with pytest.raises(ValueError, match="--skip takes"):
        parse_only("nope", "--skip")
