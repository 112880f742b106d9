"""One migration as the coordinator and its backend driver both see it.

`MigrationContext` is what every migration on this host shares (config,
identity, durable store, authority, data sessions). A session adds what one
migration owns: its id, nonces, order, report, the pair's PSK session, and
the only ways to change its record (`enter`), report progress and audit.
The backend driver gets the session, never the coordinator.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sealift.host.config import AgentConfig
from sealift.host.store import AgentStore
from sealift.host.transport import ControlChannel, DataSessions
from sealift.migration import records
from sealift.migration.authority import Authority
from sealift.migration.documents import DocumentSigner
from sealift.migration.errors import IncomingRefused
from sealift.migration.options import MigrationOptions
from sealift.migration.phases import Event, Phase
from sealift.migration.report import MigrationReport
from sealift.security.identity import HostIdentity
from sealift.security.psk import PskSession
from sealift.security.reload import InFlightTrust
from sealift.wire.messages import Hello

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # "round" | "transfer" | "phase"
    data: dict[str, object]


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class MigrationContext:
    """What every migration on this host shares."""

    config: AgentConfig
    identity: HostIdentity | None
    store: AgentStore
    authority: Authority
    sessions: DataSessions


class SourceSession:
    """One outgoing migration: what the source coordinator and its driver share."""

    def __init__(
        self,
        context: MigrationContext,
        vm_name: str,
        destination: str,
        options: MigrationOptions,
        order: str | None,
        transport: str,
        progress: ProgressCallback | None = None,
        resumed: tuple[str, bytes] | None = None,
    ) -> None:
        self.context = context
        self.config = context.config
        self.vm_name = vm_name
        self.destination = destination
        self.options = options
        self.order = order
        # A new migration gets a fresh id and nonce; `resumed` (id, nonce) rebuilds the session of one that a
        # restart interrupted in post-copy, from its stored Hello (backends/qemu/postcopy_restart.py).
        self.migration_id, self.nonce = resumed or (secrets.token_hex(16), secrets.token_bytes(32))
        self.signer = DocumentSigner(context.config.name, context.identity if options.secure else None)
        self.psk: PskSession | None = None  # the pair's second factor, when a PSK is provisioned
        self.psk_binding = b""
        self.binding: str | None = None  # the channel binding the signed documents carry
        self.flight = InFlightTrust(self.migration_id)  # the operator and peer it relies on (live revocation)
        self.report = MigrationReport(
            migration_id=self.migration_id,
            vm=vm_name,
            source=context.config.name,
            destination=destination,
            transport=transport,
        )
        self._progress = progress or (lambda event: None)
        # Post-copy (QEMU): the coordinator's decision step, called by the driver just before the switch
        # with the manifest's backend fields; it returns only once the switch is decided and Commit sent.
        self.decide_postcopy: Callable[[dict[str, object]], None] | None = None
        # ... and after a cut link, its re-confirmation on a fresh channel (manifest, prepared receipt, Commit);
        # the driver leaves that channel here, and the coordinator takes the running receipt on it.
        self.reconfirm_postcopy: Callable[[ControlChannel, dict[str, object]], None] | None = None
        self.recovered_channel: ControlChannel | None = None
        # libvirt: the coordinator's record of the hypervisor's own switchover (its point of no return),
        # called by the driver the moment libvirt has handed the guest over, before anything else.
        self.handed_over: Callable[[], None] | None = None

    def enter(self, event: Event, error: str | None = None) -> Phase:
        """Move this migration's record by the handover's table, and tell whoever follows the progress."""
        phase = records.transition(self.context.store, self.migration_id, event, error)
        self.progress("phase", {"phase": phase.value})
        return phase

    def progress(self, kind: str, data: dict[str, object]) -> None:
        self._progress(ProgressEvent(kind, data))

    def hello(
        self,
        *,
        vm_name: str,
        backend: str,
        memory_bytes: int,
        page_size: int,
        compression: str | None,
        psk_proof: str | None,
        image_digest: str | None,
    ) -> Hello:
        """The Hello that opens this migration: the session's ids, hosts and order, and the backend's guest."""
        return Hello(
            migration_id=self.migration_id,
            vm_name=vm_name,
            source_host=self.config.name,
            destination_host=self.destination,
            nonce=self.nonce,
            memory_bytes=memory_bytes,
            page_size=page_size,
            secure=self.options.secure,
            compression=compression,
            streams=1,
            backend=backend,
            order=self.order,
            psk_proof=psk_proof,
            image_digest=image_digest,
        )

    def audit(self, kind: str, **fields: object) -> None:
        self.context.authority.record(kind, migration_id=self.migration_id, **fields)

    def mark(self, step: str, paused_at: float) -> None:
        """Milliseconds since the guest paused: where the downtime goes."""
        self.report.downtime_breakdown_ms[step] = round((time.monotonic() - paused_at) * 1000.0, 1)


class DestinationSession:
    """One incoming migration: what the destination coordinator and its driver share."""

    def __init__(self, context: MigrationContext, channel: ControlChannel, hello: Hello) -> None:
        self.context = context
        self.config = context.config
        self.channel = channel
        self.hello = hello
        self.migration_id = hello.migration_id
        self.nonce = secrets.token_bytes(32)
        self.session_id = secrets.token_bytes(16)  # names the data stream(s) the source opens to us
        self.signer = DocumentSigner(context.config.name, context.identity if channel.secure else None)
        self.binding: str | None = None
        self.order_id: str | None = None
        self.psk: PskSession | None = None
        self.psk_binding = b""
        self.flight = InFlightTrust(self.migration_id)  # the operator and peer it relies on (live revocation)
        self.error_code: str | None = None  # why it was refused or failed, once it was (the agent's metrics)
        self.receipt_extra: dict[str, object] = {}  # what the driver adds to the running receipt (post-copy's digest)
        self._deferred_audits: list[tuple[str, dict[str, object]]] = []  # audit_after_promise's entries

    def enter(self, event: Event, error: str | None = None) -> Phase:
        return records.transition(self.context.store, self.migration_id, event, error)

    def audit(self, kind: str, **fields: object) -> None:
        self.context.authority.record(kind, migration_id=self.migration_id, **fields)

    def audit_after_promise(self, kind: str, **fields: object) -> None:
        """An audit entry written once the prepared receipt is sent (or the migration failed): the source's guest
        is stopped until then, and the promise's durable write (the store's phase) is all it must wait for."""
        self._deferred_audits.append((kind, fields))

    def flush_audits(self) -> None:
        entries, self._deferred_audits = self._deferred_audits, []
        for kind, fields in entries:
            self.audit(kind, **fields)

    def stop_if_aborted(self) -> None:
        """Raise if the source has given up (its Abort is waiting on the control channel), or was revoked.

        For the waits that do not read the control channel themselves (the
        data stream's arrival): an abandoned migration frees its reservation
        at once instead of after the step timeout.
        """
        self.flight.check()
        abort = self.channel.abort_within(0)
        if abort is not None:
            raise IncomingRefused(f"the source aborted: {abort.reason}", code=abort.code)

    def lab_pause(self, point: str) -> None:
        """Tests and the attack lab only: hold at a named point (config.LAB_PAUSE_POINTS)."""
        if self.config.lab_pause_at == point:
            log.warning("lab: migration %s paused at %s", self.migration_id, point)
            time.sleep(self.config.lab_pause_s)
