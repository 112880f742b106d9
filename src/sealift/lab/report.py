"""The lab's report: one row per attack and backend, as Markdown, JSON and a rich table.

A run *fails* when any attack succeeds against sealift, or any guest ends
with other than exactly one running copy: `exit_code()` says so, and
`sealift lab run` exits with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from sealift.lab.attacks.base import AttackResult

__all__ = ["RESULT_KEYS", "exit_code", "failures", "public_json", "rich_table", "to_markdown", "write_report"]

# The keys of one result in `sealift lab run --json`, in this order.
RESULT_KEYS = ("threat", "attack", "backend", "baseline", "sealift", "evidence", "vm_running_copies")
MARKDOWN_NAME = "results.md"
JSON_NAME = "results.json"


def failures(results: Sequence[AttackResult]) -> list[AttackResult]:
    """The results that fail the run: the attack got through, or the VM is not running exactly once."""
    return [r for r in results if r.sealift != "blocked" or r.vm_running_copies != 1]


def exit_code(results: Sequence[AttackResult]) -> int:
    """0 when sealift blocked every attack and every guest runs exactly once; 1 otherwise (or if nothing ran)."""
    return 1 if not results or failures(results) else 0


def public_json(results: Sequence[AttackResult]) -> dict[str, list[dict[str, object]]]:
    """`{"results": [...]}` with exactly RESULT_KEYS per result (details stay in the results file)."""
    return {"results": [{key: getattr(r, key) for key in RESULT_KEYS} for r in results]}


def to_markdown(results: Sequence[AttackResult]) -> str:
    header = "| threat | attack | backend | baseline | sealift | evidence | VM running copies |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = (r.threat, r.attack, r.backend, r.baseline, _marked(r), r.evidence, str(r.vm_running_copies))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    verdict = "FAILED" if exit_code(results) else "every attack blocked, every guest ran exactly once"
    return "\n".join(lines) + f"\n\n{len(results)} results: {verdict}.\n"


def write_report(
    results: Sequence[AttackResult], results_dir: Path, meta: dict[str, object] | None = None
) -> tuple[Path, Path]:
    """results.md and results.json (with each attack's details) in results_dir."""
    results_dir.mkdir(parents=True, exist_ok=True)
    markdown = results_dir / MARKDOWN_NAME
    markdown.write_text(to_markdown(results))
    document = {
        **public_json(results),
        "details": [{"threat": r.threat, "backend": r.backend, **r.details} for r in results],
        "failed": [f"{r.threat} {r.backend}: {r.attack}" for r in failures(results)],
        **({"meta": meta} if meta else {}),
    }
    json_path = results_dir / JSON_NAME
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return markdown, json_path


def rich_table(results: Sequence[AttackResult], title: str = "sealift attack lab") -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("threat", "attack", "backend", "baseline", "sealift", "evidence", "copies"):
        table.add_column(column, overflow="fold")
    for r in results:
        sealift = "[green]blocked[/green]" if r.sealift == "blocked" else f"[bold red]{r.sealift}[/bold red]"
        copies = str(r.vm_running_copies) if r.vm_running_copies == 1 else f"[bold red]{r.vm_running_copies}[/bold red]"
        baseline = {"succeeded": "[yellow]succeeded[/yellow]"}.get(r.baseline, r.baseline)
        table.add_row(r.threat, r.attack, r.backend, baseline, sealift, r.evidence, copies)
    return table


def _marked(result: AttackResult) -> str:
    return result.sealift if result.sealift == "blocked" else f"**{result.sealift.upper()}**"


def _cell(text: str) -> str:
    """Markdown table cells: no pipes, no newlines."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
