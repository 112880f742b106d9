"""Helpers shared by the monitor tests (a plain module: conftest fixtures cannot be imported)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sealift.agent.client import AgentClient
from sealift.backends.qemu.net import create_tap


def wait_for(what: str, probe: Callable[[], object], timeout: float, interval: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def vm_row(client: AgentClient, vm: str) -> dict | None:
    rows = client.request("monitor.snapshot")["monitor"]["vms"]
    return next((row for row in rows if row["vm"] == vm), None)


def audit_fields(client: AgentClient, kind: str) -> list[dict]:
    return [e["fields"] for e in client.request("audit.show", limit=500, kind=kind)["entries"]]


def wait_attacker(client: AgentClient, vm: str, timeout: float) -> tuple[dict, float, dict[str, dict]]:
    """The attacker verdict on `vm` (not a first 'anomalous' one): (verdict, seconds it took, deviations by signal)."""
    started = time.monotonic()
    flagged = wait_for(
        "an attacker verdict",
        lambda: (r := vm_row(client, vm)) and r["verdict"] and r["verdict"]["kind"] == "attacker" and r,
        timeout,
    )
    verdict = flagged["verdict"]  # type: ignore[index]
    return verdict, time.monotonic() - started, {d["signal"]: d for d in verdict["deviations"]}


@contextmanager
def bridge_netns(name: str, bridge_ip: str, tap: str) -> Iterator[str]:
    """A network namespace with a bridge (a VM network, `bridge_ip`/24) and a tap on it; removed afterwards."""

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)

    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "addr", "add", f"{bridge_ip}/24", "dev", "br0")
        ip("-n", name, "link", "set", "br0", "up")
        create_tap(tap, "br0", netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)
