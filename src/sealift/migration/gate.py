"""The migration coordinators' question to the monitors: may this VM move?

Both coordinators (source and destination, both backends) call
`check_outgoing` / `check_incoming` with their host name; the agent installs
its monitor's policy for that name at start (`install`). A host without an
installed gate (unit tests that build a coordinator alone) allows everything.
A registry keyed by host name, rather than a constructor argument, keeps the
hook a single line in each coordinator, and lets several agents share one
process (tests).

A refusal is a SecurityError whose message starts with its code, e.g.
``vm_flagged_attacker: ...``: the coordinators already turn a SecurityError
into a refusal (destination: a Refuse with the reason; source: an error
before anything is sent).
"""

from __future__ import annotations

import threading
from typing import Protocol

from sealift.security.errors import SecurityError

VM_FLAGGED_ATTACKER = "vm_flagged_attacker"


class MonitorRefusal(SecurityError):
    """The monitor's policy refuses this migration; `code` says why."""

    code = "monitor_refused"  # the class default; each instance carries the policy's own code

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


class MigrationGate(Protocol):
    def check_outgoing(self, vm: str, destination: str) -> None: ...

    def check_incoming(self, vm: str, source: str) -> None: ...


_lock = threading.Lock()
_gates: dict[str, MigrationGate] = {}


def install(host: str, gate: MigrationGate) -> None:
    with _lock:
        _gates[host] = gate


def uninstall(host: str, gate: MigrationGate) -> None:
    with _lock:
        if _gates.get(host) is gate:
            del _gates[host]


def _gate(host: str) -> MigrationGate | None:
    with _lock:
        return _gates.get(host)


def check_outgoing(host: str, vm: str, destination: str) -> None:
    """Raises MonitorRefusal if `host`'s monitor policy holds `vm` here."""
    gate = _gate(host)
    if gate is not None:
        gate.check_outgoing(vm, destination)


def check_incoming(host: str, vm: str, source: str) -> None:
    """Raises MonitorRefusal if `host`'s monitor policy will not take `vm`."""
    gate = _gate(host)
    if gate is not None:
        gate.check_incoming(vm, source)
