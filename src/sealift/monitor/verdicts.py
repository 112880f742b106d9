"""What the host monitor reports: verdicts, the deviations that explain them, and their changes.

The vocabulary shared by the security classifier (`classify.py`) and the
reliability tracker (`reliability.py`), below both: each raises and clears
`Verdict`s through `MonitorEvent`s, and neither needs the other for that.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTACKER = "attacker"
VICTIM = "victim"
ANOMALOUS = "anomalous"
RELIABILITY = "reliability"

_UNITS = {
    "cpu": "of a core",
    "dirty_bps": "B/s",
    "rx_bps": "B/s",
    "tx_bps": "B/s",
    "rx_pps": "pkt/s",
    "tx_pps": "pkt/s",
}
_LABELS = {
    "cpu": "CPU",
    "dirty_bps": "memory dirty rate",
    "rx_bps": "inbound bytes",
    "tx_bps": "outbound bytes",
    "rx_pps": "inbound packets",
    "tx_pps": "outbound packets",
}


@dataclass(frozen=True)
class Deviation:
    """One signal's departure from normal, for the verdict's explanation."""

    signal: str
    value: float
    normal: float
    z: float
    ratio: float

    def describe(self) -> str:
        return (
            f"{_LABELS.get(self.signal, self.signal)} {_fmt(self.signal, self.value)} vs normal "
            f"{_fmt(self.signal, self.normal)} (x{self.ratio:.1f}, z={self.z:.1f})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "signal": self.signal,
            "value": self.value,
            "normal": self.normal,
            "z": round(self.z, 2),
            "ratio": round(self.ratio, 2),
        }


@dataclass(frozen=True)
class Verdict:
    vm: str
    kind: str  # attacker | victim | anomalous | reliability
    reason: str  # one line: which signals, how far from normal
    since: float
    deviations: tuple[Deviation, ...] = ()
    problem: str | None = None  # reliability: stall | exited | restart | error
    manual: bool = False  # set by an operator, not by the classifier

    def to_dict(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "kind": self.kind,
            "reason": self.reason,
            "since": self.since,
            "problem": self.problem,
            "manual": self.manual,
            "deviations": [d.to_dict() for d in self.deviations],
        }


@dataclass(frozen=True)
class MonitorEvent:
    """A change: `raised` a new or changed verdict, or `cleared` one."""

    change: str  # "raised" | "cleared"
    verdict: Verdict


def _fmt(signal: str, value: float) -> str:
    if signal == "cpu":
        return f"{value * 100:.0f}%"
    if signal.endswith("_bps"):
        for unit, size in (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value:.0f} B/s"
    return f"{value:.0f} {_UNITS.get(signal, '')}".strip()
