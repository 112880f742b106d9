"""bench/profile_agents.py's reading of py-spy's collapsed stacks (the numbers its summary quotes)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from profile_agents import read_folded, summarize  # noqa: E402

FOLDED = """\
thread (22808): qemu-pump-out-0;Thread.run (threading.py:982);SourcePump._run (sealift/agent/qemu_relay.py:179) 60
thread (22808): qemu-pump-out-0;Thread.run (threading.py:982);SourcePump._run (sealift/agent/qemu_relay.py:186) 25
thread (22808): qemu-pump-out-0;Thread.run (threading.py:982);SourcePump._run (sealift/agent/qemu_relay.py:184);AeadProtection.seal_into (sealift/wire/records.py:95) 15
thread (22761): qmp-loop;BaseEventLoop._run_once (base_events.py:1922) 10
not a stack line
"""


def test_threads_self_time_by_line_and_inclusive_time_by_function(tmp_path: Path) -> None:
    path = tmp_path / "agent.folded"
    path.write_text(FOLDED)
    threads = read_folded(path)
    assert set(threads) == {"qemu-pump-out-0", "qmp-loop"}  # by name: thread ids differ per run
    pump = threads["qemu-pump-out-0"]
    assert pump.samples == 100
    assert pump.self_samples["SourcePump._run (qemu_relay.py:179)"] == 60  # recv_into's line, apart from send's
    assert pump.self_samples["SourcePump._run (qemu_relay.py:186)"] == 25
    assert pump.self_samples["AeadProtection.seal_into (records.py:95)"] == 15
    assert pump.inclusive["SourcePump._run (qemu_relay.py)"] == 100  # every line of the function
    assert pump.inclusive["AeadProtection.seal_into (records.py)"] == 15

    summary = summarize(threads, rate=100)
    assert summary["cpu_s"] == 1.1
    first = summary["threads"][0]  # type: ignore[index]
    assert first["thread"] == "qemu-pump-out-0" and first["cpu_s"] == 1.0
    assert first["self"][0] == {"function": "SourcePump._run (qemu_relay.py:179)", "samples": 60, "share": 0.6}
