"""libvirt domains' side of settling migrations after a crash or a cut link (migration/recovery.py).

The same rules as every backend, with libvirt's states: before libvirt's
switchover the source domain runs (libvirt resumes it when its migration
fails); after it, the source's definition is stopped and the destination's
domain waits, defined and paused (VIR_MIGRATE_PAUSED), for the decision.
"""

from __future__ import annotations

import logging

import libvirt

from sealift.backends.libvirt.registry import BACKEND, LibvirtRegistry
from sealift.host.store import MigrationRecord

log = logging.getLogger(__name__)


class LibvirtKeeper:
    backend = BACKEND

    def __init__(self, domains: LibvirtRegistry | None) -> None:
        self._domains = domains

    def can_settle(self, record: MigrationRecord) -> bool:
        return self._domains is not None and self._domains.lookup(record.vm) is not None

    def resume_source(self, record: MigrationRecord) -> bool:
        assert self._domains is not None  # can_settle said so
        domain = self._domains.get(record.vm)
        self._domains.unclaim(record.vm)
        if not domain.dom.isActive():
            return False  # libvirt handed it over: the destination holds the only copy, paused
        domain.resume()
        return domain.state() == "running"

    def hold_source(self, record: MigrationRecord) -> None:
        assert self._domains is not None
        self._domains.claim(record.vm)

    def release_source(self, record: MigrationRecord) -> None:
        assert self._domains is not None
        self._domains.release_migrated(record.vm)

    def running_destination(self, record: MigrationRecord) -> int | None:
        if self._domains is None:
            return None
        domain = self._domains.lookup(record.vm)
        return domain.pid() if domain is not None and domain.state() == "running" else None

    def hold_destination(self, record: MigrationRecord) -> None:
        assert self._domains is not None
        self._domains.claim(record.vm)

    def start_destination(self, record: MigrationRecord) -> int | None:
        assert self._domains is not None
        domain = self._domains.get(record.vm)
        domain.resume()
        self._domains.unclaim(record.vm)
        return domain.pid()

    def handed_over(self, record: MigrationRecord) -> bool:
        """libvirt's word: at a source the domain is shut off with reason "migrated" (its QEMU quit after
        libvirt's Finish) or gone; at a destination it is defined (PERSIST_DEST) and paused (VIR_MIGRATE_PAUSED)."""
        if self._domains is None:
            return False
        domain = self._domains.lookup(record.vm)
        if domain is None:
            # A source domain gone during its migration: a transient one that libvirt handed over (a persistent
            # one stays defined, shut off). Nothing can run here either way, and the destination starts only a
            # domain libvirt finished handing over, so "handed over" never makes a second copy.
            return record.role == "source"
        try:
            state, reason = domain.dom.state()
            if record.role == "source":
                return bool(state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
            return bool(domain.dom.isPersistent()) and state == libvirt.VIR_DOMAIN_PAUSED
        except libvirt.libvirtError as exc:
            log.warning("%s: libvirt could not say whether it handed the domain over: %s", record.vm, exc)
            return False

    def remove_leftovers(self, record: MigrationRecord) -> None:
        """Nothing: libvirt owns the domain's files (the disks stay, as in discard_destination)."""

    def discard_destination(self, record: MigrationRecord) -> None:
        """The source aborted before libvirt's switchover: it runs the domain, so our incoming copy goes."""
        assert self._domains is not None
        domain = self._domains.lookup(record.vm)
        if domain is not None and domain.dom.isPersistent():
            # libvirt made it persistent here (PERSIST_DEST) when it finished handing it over: the source's
            # QEMU has quit, so this paused copy may be the only one left. Never destroy it: it stays
            # paused, defined and busy for the operator (the lab's T11 rows at the switchover saw the only
            # copy destroyed here before this check).
            log.error(
                "%s: migration %s was called off, but libvirt had finished handing the domain over: it stays "
                "here, paused, for the operator (never destroyed; check the source with `virsh domstate`)",
                record.vm,
                record.id,
            )
            return
        self._domains.unclaim(record.vm)
        if domain is not None and domain.dom.isActive():
            domain.dom.destroy()  # libvirt's own transient incoming domain: never handed over
