"""The like-for-like downtime of the direct transports: source STOP to destination RESUME, by QEMU's timestamps."""

from __future__ import annotations

from typing import Any

from sealift.bench.harness import stop_to_resume_ms


class EventLog:
    """Stands in for a QemuVM's QMP event history (the unit under test only reads it)."""

    def __init__(self, *events: tuple[str, float], late: tuple[str, float] | None = None) -> None:
        self.events = [_event(name, at) for name, at in events]
        self.late = late  # delivered on the first wait, as QMP may deliver RESUME after the state changed

    def recent_events(self) -> list[dict[str, Any]]:
        return list(self.events)

    def wait_event(self, timeout: float) -> bool:
        if self.late is None:
            return False
        self.events.append(_event(*self.late))
        self.late = None
        return True


def _event(name: str, at: float) -> dict[str, Any]:
    seconds = int(at)
    return {"event": name, "timestamp": {"seconds": seconds, "microseconds": round((at - seconds) * 1e6)}}


def test_span_from_the_last_stop_to_the_resume() -> None:
    source = EventLog(("STOP", 100.0), ("RESUME", 100.5), ("STOP", 1000.250000))
    destination = EventLog(("RESUME", 1000.3125))
    assert stop_to_resume_ms(source, destination) == 62.5  # type: ignore[arg-type]


def test_waits_for_a_resume_event_delivered_late() -> None:
    source = EventLog(("STOP", 50.0))
    destination = EventLog(late=("RESUME", 50.04))
    assert stop_to_resume_ms(source, destination) == 40.0  # type: ignore[arg-type]


def test_missing_or_out_of_order_events_give_no_figure() -> None:
    assert stop_to_resume_ms(EventLog(), EventLog(("RESUME", 1.0))) is None  # type: ignore[arg-type]
    assert stop_to_resume_ms(EventLog(("STOP", 1.0)), EventLog()) is None  # type: ignore[arg-type]
    assert stop_to_resume_ms(EventLog(("STOP", 2.0)), EventLog(("RESUME", 1.0))) is None  # type: ignore[arg-type]
