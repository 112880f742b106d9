"""What an attack of the lab is, what it reports, and the registry of attacks.

An attack is a function `(LabSession, backend) -> list[AttackResult]`, registered
with `@attack("T1", "passive snooping")`. It runs against the plaintext
baseline first where that applies (baseline "succeeded" shows the attack is
real), then against sealift (which must block it), on real agents in the
lab's namespaces, and collects evidence: capture files and offsets, error
messages, audit entries. The runner (lab/runner.py) calls the attacks in a
LabSession (lab/session.py: the testbed and everything an attack uses);
the CLI writes the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from sealift.lab.session import Backend, LabSession

__all__ = ["ATTACKS", "Attack", "AttackResult", "RegisteredAttack", "attack"]

Baseline = Literal["succeeded", "blocked", "n/a"]
Outcome = Literal["blocked", "succeeded"]


@dataclass
class AttackResult:
    threat: str  # "T1" .. "T13"
    attack: str  # what was tried, in a few words
    backend: Backend
    baseline: Baseline  # the attack against an insecure set-up ("n/a": there is no baseline to attack)
    sealift: Outcome  # the attack against sealift
    evidence: str  # where to look: capture file and offsets, error message, audit entry
    vm_running_copies: int  # running copies of the guest afterwards (must be 1)
    details: dict[str, object] = field(default_factory=dict)

    @property
    def defended(self) -> bool:
        return self.sealift == "blocked" and self.vm_running_copies == 1

    def to_json(self) -> dict[str, object]:
        return asdict(self)


Attack = Callable[[LabSession, Backend], list[AttackResult]]


@dataclass(frozen=True)
class RegisteredAttack:
    threat: str
    title: str
    run: Attack
    backends: tuple[Backend, ...]


ATTACKS: list[RegisteredAttack] = []


def attack(threat: str, title: str, backends: tuple[Backend, ...] = ("builtin", "qemu")) -> Callable[[Attack], Attack]:
    """Register an attack on threat `threat` for the given backends."""

    def register(run: Attack) -> Attack:
        ATTACKS.append(RegisteredAttack(threat, title, run, backends))
        return run

    return register
