"""Log lines: rich on a terminal, plain `time level logger: message` anywhere else."""

from __future__ import annotations

import logging
import re

from rich.logging import RichHandler

from sealift.cli import render


def test_a_terminal_gets_rich() -> None:
    assert isinstance(render.log_handler(terminal=True), RichHandler)


def test_elsewhere_lines_are_plain() -> None:
    handler = render.log_handler(terminal=False)
    assert not isinstance(handler, RichHandler)
    record = logging.LogRecord("sealift.agent.daemon", logging.WARNING, "daemon.py", 57, "port %d busy", (7440,), None)
    line = handler.format(record)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING sealift.agent.daemon: port 7440 busy", line), (
        line
    )


def test_setup_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    level = root.level
    try:
        render.setup_logging()
        render.setup_logging()
        ours = [h for h in root.handlers if h is render._handler]
        assert len(ours) == 1 and other in root.handlers
        assert root.level == level, "without a level the root logger's level stays"
    finally:
        root.removeHandler(other)
        if render._handler is not None:
            root.removeHandler(render._handler)
            render._handler = None
