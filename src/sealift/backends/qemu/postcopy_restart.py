"""A source agent restarted during a QEMU post-copy: it resumes the migration from its store.

The agent that switched to post-copy died; its QEMU did not (QEMU runs in its
own session): it paused its post-copy when its migration connection went,
and keeps every page the destination has not received. The destination's
QEMU runs the guest (or waits on a missing page) and its agent waits for
its source to reconnect (postcopy_recovery.DestinationRecovery). The
restarted agent adopts its QEMU, finds the record in `postcopy-paused` with
what the switch stored (`QemuSourceDriver._resume_record`: the Hello with
its signed order, the options, the transport, the report so far), and
resumes exactly as after a cut link: a fresh mutual-TLS channel and keys,
the same migration id and order with a fresh nonce, the re-confirmed
handover, `migrate` with resume: true; then the running receipt, the
stream digest, and its paused copy quits. Nothing here ever runs the guest
at the source: the decision to switch is on disk.

If the destination does not take the reconnection within the recovery
window, the record stays `postcopy-paused` and the source QEMU is kept,
held (busy), for an operator: it holds the only copy of the missing pages.
"""

from __future__ import annotations

import logging
import threading
import time

from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.source import QemuSourceDriver
from sealift.backends.qemu.transports import default_transport, transport_named
from sealift.host.store import MigrationRecord
from sealift.migration.errors import MigrationError
from sealift.migration.options import MigrationOptions
from sealift.migration.session import MigrationContext, SourceSession
from sealift.migration.source import SourceCoordinator
from sealift.wire.messages import Hello

log = logging.getLogger(__name__)


def resume_source_after_restart(
    context: MigrationContext, vms: QemuVmRegistry, record: MigrationRecord, saved: dict[str, object]
) -> threading.Thread:
    """Source, at the restart of an agent killed during post-copy: reconnect, resume, finish (in a thread)."""
    hello = Hello.from_json(saved["hello"])
    if hello.migration_id != record.id or hello.source_host != context.config.name:
        raise MigrationError(f"the stored Hello is for {hello.migration_id} from {hello.source_host}, not {record.id}")
    session, driver = _rebuild(context, vms, hello, saved)
    vm = vms.get(hello.vm_name)
    address = context.config.peer_address(hello.destination_host)
    # The report's total covers the whole migration, from its record's creation, across the restart.
    started = time.monotonic() - max(0.0, time.time() - record.created_at)
    coordinator = SourceCoordinator(session, driver)

    def finish() -> None:
        try:
            report = coordinator.resume_postcopy(
                vm, record.memory_bytes, lambda: driver.resume_after_restart(vm, address, hello), started
            )
            log.info(
                "post-copy of %s (%s) finished after this agent's restart: it runs on %s (%s recoveries)",
                hello.vm_name,
                record.id,
                hello.destination_host,
                (report.postcopy or {}).get("recoveries"),
            )
        except Exception as exc:  # noqa: BLE001 - the record says postcopy-paused; the QEMU stays held here
            log.error("post-copy of %s (%s) could not be resumed after the restart: %s", hello.vm_name, record.id, exc)

    thread = threading.Thread(target=finish, name=f"postcopy-resume-{record.id[:8]}", daemon=True)
    thread.start()
    return thread


def _rebuild(
    context: MigrationContext, vms: QemuVmRegistry, hello: Hello, saved: dict[str, object]
) -> tuple[SourceSession, QemuSourceDriver]:
    """The migration's session (its id, nonce and order from the stored Hello) and a driver for its transport."""
    options_saved = saved.get("options")
    options = (
        MigrationOptions.from_dict(options_saved)
        if isinstance(options_saved, dict)
        else MigrationOptions(secure=hello.secure, postcopy="after-precopy")  # a record from before "options"
    )
    name = saved.get("transport")
    transport = transport_named(name) if isinstance(name, str) else default_transport(hello.secure)
    session = SourceSession(
        context,
        hello.vm_name,
        hello.destination_host,
        options,
        hello.order,
        transport.name,
        resumed=(hello.migration_id, hello.nonce),
    )
    report = session.report
    report.memory_bytes = hello.memory_bytes
    for key in ("order_id", "operator"):
        value = saved.get(key)
        setattr(report, key, value if isinstance(value, str) else None)
    for key in ("counter_before", "counter_at_pause"):
        value = saved.get(key)
        setattr(report, key, value if isinstance(value, int) else None)
    return session, QemuSourceDriver(session, vms, transport, ipsec=None)
