"""The lab session's pure parts: agent config defaults and how a guest's state is read."""

from __future__ import annotations

import tomllib

from sealift.lab.session import _state, _with_lab_defaults


def test_lab_deadlines_are_defaults_an_attack_can_override() -> None:
    merged = tomllib.loads(_with_lab_defaults("max_incoming = 1\nstep_timeout_s = 3", "builtin"))
    assert merged == {"step_timeout_s": 3, "resolve_interval_s": 0.5, "handshake_timeout_s": 5, "max_incoming": 1}
    assert tomllib.loads(_with_lab_defaults("", "qemu"))["step_timeout_s"] == 20  # a TCG QEMU starts slowly


def test_a_copy_counts_as_running_only_when_alive_and_not_paused() -> None:
    assert _state({"alive": True, "paused": False}) == "running"  # built-in
    assert _state({"alive": True, "paused": True}) == "paused"
    assert _state({"alive": False, "paused": False}) == "exited"
    assert _state({"alive": True, "paused": False, "status": "running"}) == "running"  # QEMU
    assert _state({"alive": True, "paused": True, "status": "postmigrate"}) == "postmigrate"
    assert _state({"alive": False, "status": "running"}) == "exited"
