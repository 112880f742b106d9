"""The libvirt source stamps the switchover's pause on its own thread (stand-in domain, no libvirtd)."""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt

from sealift.backends.libvirt.source import PauseWatch


class SwitchingDomain:
    """A domain whose state turns 'paused for migration' once `switch` is set."""

    def __init__(self) -> None:
        self.switch = threading.Event()

    def state(self) -> list[int]:
        if self.switch.is_set():
            return [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION]
        return [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]


class Vm:
    def __init__(self, dom: Any) -> None:
        self.dom = dom


def test_the_pause_is_stamped_while_the_migration_loop_is_blocked_elsewhere() -> None:
    """The loop's jobStats call can block through the switchover; the stamp must not wait for it."""
    dom = SwitchingDomain()
    migration = threading.Thread(target=time.sleep, args=(5.0,), daemon=True)
    migration.start()
    watch = PauseWatch(Vm(dom), migration)  # type: ignore[arg-type]
    watch.start()
    time.sleep(0.05)
    dom.switch.set()
    switched = time.monotonic()
    time.sleep(0.5)  # the loop, stuck in a libvirt call
    unblocked = time.monotonic()
    paused_at = watch.stop()
    assert paused_at is not None and switched <= paused_at < unblocked


def test_no_pause_seen_when_the_domain_never_paused() -> None:
    migration = threading.Thread(target=time.sleep, args=(0.1,), daemon=True)
    migration.start()
    watch = PauseWatch(Vm(SwitchingDomain()), migration)  # type: ignore[arg-type]
    watch.start()
    migration.join()
    assert watch.stop() is None


def test_a_pause_by_someone_else_is_not_the_switchover() -> None:
    class UserPaused:
        def state(self) -> list[int]:
            return [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]

    migration = threading.Thread(target=time.sleep, args=(0.2,), daemon=True)
    migration.start()
    watch = PauseWatch(Vm(UserPaused()), migration)  # type: ignore[arg-type]
    watch.start()
    migration.join()
    assert watch.stop() is None
