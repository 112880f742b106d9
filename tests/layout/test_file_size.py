"""Files stay small enough to read: one over 600 lines says why at its top."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "sealift"
LIMIT = 600
MARKER = "# Long file:"  # the first line of a longer one: "# Long file: <why it is one piece>"


def test_every_long_file_says_why() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > LIMIT and not (lines and lines[0].startswith(MARKER) and len(lines[0]) > len(MARKER) + 10):
            unexplained.append(f"{path.relative_to(PACKAGE)}: {len(lines)} lines")
    assert unexplained == [], f"over {LIMIT} lines without a '{MARKER} ...' first line:\n" + "\n".join(unexplained)
