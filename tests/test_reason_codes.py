"""Every reason code the source can produce is in docs/security.md's table, so operators can look any up."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import sealift
from sealift.errors import SealiftError

ROOT = Path(__file__).resolve().parents[1]


def documented_codes() -> set[str]:
    text = (ROOT / "docs" / "security.md").read_text()
    section = text[text.index("### Reason codes") :]
    section = section[: section.index("\n## ")]
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", section))


def class_codes() -> set[str]:
    for module in pkgutil.walk_packages(sealift.__path__, "sealift."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, todo = {SealiftError.code}, [SealiftError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub.code)
            todo.append(sub)
    return found


def literal_codes() -> set[str]:
    """Codes written as `code="..."` anywhere in the source (an instance's finer code)."""
    found = set()
    for path in (ROOT / "src" / "sealift").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
                if isinstance(node.value.value, str):
                    found.add(node.value.value)
    return found


def test_the_table_lists_every_code() -> None:
    missing = (class_codes() | literal_codes()) - documented_codes()
    assert missing == set(), f"reason codes missing from docs/security.md 'Reason codes': {sorted(missing)}"


def test_the_table_is_found_and_not_empty() -> None:
    assert len(documented_codes()) > 40
