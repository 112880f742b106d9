"""Recovering a QEMU post-copy after a cut link: a fresh authenticated channel, fresh keys, the same order.

When the link (or the stream) breaks during post-copy both QEMUs pause
their post-copy (`postcopy-paused`): the source keeps the pages not yet
sent, the destination runs nothing it has not received (its vCPUs wait on
the missing pages). Neither side gives up: the source agent reconnects
(a new mutual-TLS handshake, so a new TLS exporter), repeats the handover's
conversation for the same migration id and the same signed order (Hello
with a fresh nonce, Accept, a signed manifest marked `resume`, the signed
"prepared" receipt, Commit), opens a data stream keyed from the new channel
and both nonces, and then the destination runs `migrate-recover` and the
source `migrate` with `resume: true`. QEMU exchanges what each side has
and the post-copy goes on to its end; the running receipt comes over the
new channel. The destination checks that the new channel's peer is the
migration's source host and that the order is byte for byte the one the
migration began with (orders are single use: a recovery is the same
migration, not a new one).

The destination's waiting driver and the agent's migration port meet in
`RECOVERIES`: the port offers a Hello for a migration that waits for its
recovery, and the driver takes the channel (the port's thread holds it open
until the driver is done with it).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from sealift.backends.qemu import relay
from sealift.backends.qemu.postcopy import DestinationFlow, ReturnPath, finish_destination, migration_status
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.errors import SealiftError
from sealift.host.transport import ControlChannel, open_data_stream
from sealift.migration.destination import verify_manifest
from sealift.migration.documents import channel_binding
from sealift.migration.errors import IncomingRefused, MigrationError, PostcopyPaused
from sealift.migration.phases import POSTCOPY, Event, Phase
from sealift.migration.session import DestinationSession, MigrationContext, SourceSession
from sealift.migration.streams import stream_protections
from sealift.security.audit import Kinds
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived
from sealift.wire.messages import Abort, Accept, Commit, Hello, Receipt, Refuse
from sealift.wire.qemu_stream import Ready

if TYPE_CHECKING:
    from sealift.backends.qemu.registry import QemuVmRegistry

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between two attempts to reach the peer again
PAUSE_WAIT_S = 10.0  # how long a QEMU may take to notice its broken connection and pause


def recover_window(step_timeout_s: float) -> float:
    """How long both agents keep trying before the report says the post-copy cannot be recovered."""
    return max(30.0, 4 * step_timeout_s)


# -- the meeting point on the destination ----------------------------------------------------------


@dataclass
class _Offer:
    channel: ControlChannel
    hello: Hello
    done: threading.Event = field(default_factory=threading.Event)


class Recoveries:
    """Destination: migrations waiting for their source to reconnect, and the Hellos that come for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_Offer]] = {}
        self._arrived = threading.Condition(self._lock)

    def open(self, migration_id: str) -> None:
        with self._lock:
            self._waiting.setdefault(migration_id, [])

    def close(self, migration_id: str) -> None:
        with self._lock:
            offers = self._waiting.pop(migration_id, [])
        for offer in offers:
            offer.done.set()

    def offer(self, channel: ControlChannel, hello: Hello, timeout: float) -> bool:
        """The port's side: hand this Hello's channel to the migration waiting for it; False if none waits.

        Blocks (the channel stays open) until the driver is done with it.
        """
        with self._lock:
            offers = self._waiting.get(hello.migration_id)
            if offers is None:
                return False
            offer = _Offer(channel, hello)
            offers.append(offer)
            self._arrived.notify_all()
        offer.done.wait(timeout)
        return True

    def take(self, migration_id: str, timeout: float) -> _Offer | None:
        """The driver's side: the next reconnection for this migration, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                offers = self._waiting.get(migration_id)
                if offers:
                    return offers.pop(0)
                remaining = deadline - time.monotonic()
                if offers is None or remaining <= 0:
                    return None
                self._arrived.wait(remaining)


RECOVERIES = Recoveries()  # one per agent process


# -- destination -----------------------------------------------------------------------------------


class DestinationRecovery:
    """A destination whose post-copy paused: waits for the source, checks it, and resumes QEMU's post-copy."""

    def __init__(self, session: DestinationSession, qemu: QemuVM) -> None:
        self._s = session
        self._qemu = qemu
        self._offers: list[_Offer] = []  # their channels stay open until release (the running receipt uses one)
        self.count = 0
        RECOVERIES.open(session.migration_id)

    def recover(self, cause: BaseException) -> DestinationFlow:
        s = self._s
        window = recover_window(s.config.step_timeout_s)
        deadline = time.monotonic() + window
        log.warning(
            "post-copy of %s paused (%s); waiting %.0f s for the source to reconnect", s.migration_id, cause, window
        )
        s.audit("migration.postcopy_paused", vm=self._qemu.name, reason=str(cause))
        last: BaseException = cause
        while (remaining := deadline - time.monotonic()) > 0:
            offer = RECOVERIES.take(s.migration_id, remaining)
            if offer is None:
                break
            self._offers.append(offer)
            try:
                flow = self._serve(offer)
                self.count += 1
                return flow
            except Exception as exc:  # noqa: BLE001 - one failed attempt; the source tries again
                last = exc
                log.warning("post-copy recovery attempt for %s failed: %s", s.migration_id, exc)
                _refuse_quietly(offer, s.migration_id, exc)
                if _phase(s) == Phase.POSTCOPY_RECOVERING:
                    s.enter(Event.FAIL, error=str(exc))
        source = s.hello.source_host
        raise PostcopyPaused(
            f"the post-copy could not be recovered within {window:.0f} s ({last}): {source} did not reconnect. "
            f"The guest stays paused here, held, waiting for its remaining pages, which only {source}'s QEMU "
            f"has; it never runs on {source} again and no second copy of it ever runs. If {source} is gone "
            f"for good, the guest is lost"
        )

    def release(self) -> None:
        RECOVERIES.close(self._s.migration_id)
        for offer in self._offers:
            offer.done.set()

    def _serve(self, offer: _Offer) -> DestinationFlow:
        s, hello, channel = self._s, offer.hello, offer.channel
        _check_same_migration(s.hello, hello, channel)
        s.enter(Event.BEGIN_RECOVERY)
        nonce, session_id = secrets.token_bytes(32), secrets.token_bytes(16)
        s.context.sessions.expect(session_id)
        try:
            channel.send(Accept(hello.migration_id, nonce, session_id, None))
            s.channel, s.binding = channel, channel_binding(channel, hello.nonce, nonce, hello.migration_id)
            verify_manifest(s, {"backend": "qemu", "postcopy": True, "resume": True}, "received")
            receipt = _prepared_receipt(s)
            s.audit(Kinds.RECEIPT, stage="prepared", receipt=receipt, recovery=True)
            channel.send(Receipt(hello.migration_id, "prepared", receipt))
            reply = channel.recv(s.config.step_timeout_s)
            if not isinstance(reply, Commit):
                raise IncomingRefused(f"the source sent {type(reply).__name__} instead of Commit to resume")
            data = s.context.sessions.wait(session_id, s.config.step_timeout_s)
            try:
                flow = self._resume_qemu(data, hello, nonce)
            finally:
                data.close()  # the flow holds its own duplicate
        finally:
            s.context.sessions.cancel(session_id)
        s.enter(Event.RESUME_POSTCOPY)
        s.audit("migration.postcopy_recovered", vm=self._qemu.name, attempt=self.count + 1)
        return flow

    def _resume_qemu(self, data: socket.socket, hello: Hello, nonce: bytes) -> DestinationFlow:
        s = self._s
        incoming, outgoing = stream_protections(s.channel, hello.secure, hello.nonce, nonce, hello.migration_id)
        npages = hello.memory_bytes // relay.PAGE
        sock_dir = relay.private_dir("sl-qrec-")
        try:
            path = sock_dir / "rec.sock"
            _migrate_recover(self._qemu, f"unix:{path}")
            qemu_sock = _connect_unix(path, s.config.step_timeout_s)
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
        try:
            writer = DataStreamWriter(outgoing, npages, None)
            data.settimeout(s.config.step_timeout_s)
            relay.send_opaque(data, writer, Ready(None).encode())
            reader = DataStreamReader(incoming, npages)
            flow = DestinationFlow.start(data, reader, writer, qemu_sock, relay.StreamDigest(incoming.overhead))
        finally:
            qemu_sock.close()  # the flow holds its own duplicate
        try:
            _wait_resumed(self._qemu, flow, s.config.step_timeout_s)
        except BaseException:
            flow.close()  # QEMU's recovering connection breaks: it pauses again, ready for the next attempt
            raise
        return flow


def _migrate_recover(qemu: QemuVM, uri: str) -> None:
    """migrate-recover out of band (QEMU's main loop may wait on a page); QEMU takes it only once its
    post-copy has paused, which it notices a moment after the connection broke: ask again until then."""
    deadline = time.monotonic() + PAUSE_WAIT_S
    while True:
        try:
            qemu.qmp("migrate-recover", {"uri": uri}, timeout=5.0, oob=True)
            return
        except QemuError as exc:
            if time.monotonic() > deadline or not qemu.alive():
                raise QemuError(f"{qemu.name}: migrate-recover failed: {exc}") from exc
            time.sleep(0.1)


def _wait_resumed(qemu: QemuVM, flow: DestinationFlow, timeout: float) -> None:
    """Until QEMU's post-copy runs again (the source's resume reached it) or has ended."""
    deadline = time.monotonic() + timeout
    while True:
        if flow.error is not None:
            raise PostcopyPaused(f"the resumed stream broke at once: {flow.error}")
        status = migration_status(qemu)
        if status in ("postcopy-active", "completed"):
            return
        if status in ("failed", "cancelled"):
            raise QemuError(f"{qemu.name}: QEMU's migration is {status} during the recovery: {qemu.log_tail()}")
        if time.monotonic() > deadline:
            raise PostcopyPaused(f"{qemu.name}: QEMU's post-copy did not resume in {timeout:.0f} s ({status})")
        time.sleep(relay.POLL_S)


def _check_same_migration(first: Hello, again: Hello, channel: ControlChannel) -> None:
    """A reconnection is only for the very migration: the same source host (TLS), VM and order."""
    if channel.secure and channel.peer_name != first.source_host:
        raise IncomingRefused(f"{channel.peer_name} may not resume a migration from {first.source_host}")
    for key in ("vm_name", "source_host", "destination_host", "memory_bytes", "secure", "backend", "order"):
        if getattr(again, key) != getattr(first, key):
            raise IncomingRefused(f"the resuming Hello's {key} differs from the migration's")
    if again.nonce == first.nonce:
        raise IncomingRefused("a resuming Hello must bring a fresh nonce")


def _prepared_receipt(s: DestinationSession) -> str:
    hello = s.hello
    payload = {
        "migration_id": hello.migration_id,
        "vm": hello.vm_name,
        "source": hello.source_host,
        "destination": s.config.name,
        "image_digest": None,
        "state_digest": None,
        "stage": "prepared",
        "channel_binding": s.binding,
        "signed_at": time.time(),
        "resume": True,
    }
    return s.signer.sign(payload, "receipt")


def _refuse_quietly(offer: _Offer, migration_id: str, exc: BaseException) -> None:
    try:
        offer.channel.send(Abort(migration_id, str(exc)[:1000], "postcopy_paused"))
    except Exception:  # noqa: BLE001 - the conversation may be in a state where Abort is not allowed, or gone
        try:
            offer.channel.send(Refuse(migration_id, str(exc)[:1000], "postcopy_paused"))
        except Exception:  # noqa: BLE001
            pass
    offer.done.set()


def _phase(s: DestinationSession) -> str | None:
    record = s.context.store.migration(s.migration_id)
    return None if record is None else record.phase


def _connect_unix(path: Path, timeout: float) -> socket.socket:
    deadline = time.monotonic() + relay.QEMU_CONNECT_TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.settimeout(timeout)
            relay.widen_send_buffer(sock)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise QemuError(f"destination QEMU did not listen on {path} for the recovery") from None
            time.sleep(0.02)


def _wait_status(qemu: QemuVM, statuses: set[str], timeout: float, flow: DestinationFlow | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(qemu.query_migrate().get("status", "none"))
        if status in statuses:
            return status
        if flow is not None and flow.error is not None:
            raise PostcopyPaused(f"the resumed stream broke at once: {flow.error}")
        if status in ("failed", "cancelled") or not qemu.alive():
            raise QemuError(f"{qemu.name}: QEMU's migration is {status} during the recovery: {qemu.log_tail()}")
        if time.monotonic() > deadline:
            raise PostcopyPaused(f"{qemu.name}: QEMU's migration stayed {status!r}, not {sorted(statuses)}")
        qemu.wait_event(relay.POLL_S)


# -- a destination agent restarted during post-copy ------------------------------------------------


class _NoChannelYet:
    """A restarted destination's session until its source reconnects: nothing to send on, only whether the
    migration runs on the authenticated channels (the signer's choice); the reconnection replaces it."""

    def __init__(self, secure: bool) -> None:
        self.secure = secure

    def send(self, message: object) -> None:
        raise OSError("the source has not reconnected since this agent restarted")

    def close(self) -> None:
        pass


def resume_after_restart(
    context: MigrationContext, vms: QemuVmRegistry, migration_id: str, saved: dict[str, object]
) -> threading.Thread:
    """Destination, at the restart of an agent killed during post-copy: wait for the source, resume, finish.

    `saved` is what `run_destination` stored before the record went to
    post-copy (the source's Hello with its signed order, the order's id).
    The reconnection is taken here before the migration port listens
    (`RECOVERIES`), checked as any reconnection is (the same source host,
    VM and order byte for byte), and the post-copy runs to its end on the
    adopted QEMU, which kept the guest and its pages through the restart;
    the running receipt goes on the reconnection's channel.
    """
    hello = Hello.from_json(saved["hello"])
    if hello.migration_id != migration_id:
        raise MigrationError(f"the stored Hello is for {hello.migration_id}, not {migration_id}")
    session = DestinationSession(context, cast(ControlChannel, _NoChannelYet(hello.secure)), hello)
    order_id = saved.get("order_id")
    session.order_id = order_id if isinstance(order_id, str) else None
    qemu = vms.get(hello.vm_name)
    recovery = DestinationRecovery(session, qemu)  # open before the port listens: the source's Hello is ours
    thread = threading.Thread(
        target=_finish_after_restart,
        args=(session, qemu, vms, recovery),
        name=f"postcopy-resume-{migration_id[:8]}",
        daemon=True,
    )
    thread.start()
    return thread


def _finish_after_restart(
    session: DestinationSession, qemu: QemuVM, vms: QemuVmRegistry, recovery: DestinationRecovery
) -> None:
    flow: DestinationFlow | None = None
    cpu_started = time.process_time()

    def again(cause: BaseException) -> DestinationFlow:
        nonlocal flow
        if flow is not None:
            flow.close()  # QEMU pauses on its broken connection (if it has not yet)
        flow = recovery.recover(cause)
        return flow

    try:
        first = again(PostcopyPaused("the destination agent restarted during post-copy"))
        pid = finish_destination(session, qemu, first, vms, again)
        hello = session.hello
        payload = {
            "migration_id": hello.migration_id,
            "vm": hello.vm_name,
            "source": hello.source_host,
            "destination": session.config.name,
            "image_digest": None,
            "state_digest": None,
            "stage": "running",
            "channel_binding": session.binding,
            "signed_at": time.time(),
            "counter_at_resume": None,
            "pid": pid,
            "cpu_s": round(time.process_time() - cpu_started, 3),
            "resumed_after_restart": True,
            **session.receipt_extra,
        }
        receipt = session.signer.sign(payload, "receipt")
        session.audit(Kinds.MIGRATION_HANDOVER, decision="committed", vm=hello.vm_name, pid=pid, receipt=receipt)
        log.info("post-copy of %s (%s) finished after this agent's restart", hello.vm_name, hello.migration_id)
        try:
            session.channel.send(Receipt(hello.migration_id, "running", receipt))
        except OSError as exc:  # the guest runs here and the source has committed: it learns by asking
            log.warning("could not send the running receipt for %s: %s", hello.migration_id, exc)
    except Exception as exc:  # noqa: BLE001 - the guest stays held here, paused, for another restart or an operator
        log.error("post-copy of %s could not be resumed after the restart: %s", session.migration_id, exc)
        session.audit("migration.postcopy_paused", vm=qemu.name, reason=f"not resumed after the restart: {exc}")
        if _phase(session) in POSTCOPY:
            session.enter(Event.FAIL, error=f"not resumed after the restart: {exc}")  # `sealift migrations` says why
    finally:
        if flow is not None:
            flow.close()
        recovery.release()


# -- source ----------------------------------------------------------------------------------------


Reconfirm = Callable[[ControlChannel, dict[str, object]], None]


@dataclass
class Resumed:
    """A resumed page flow on the source: its pumps, return path and data stream."""

    pumps: relay.SourcePumps
    return_path: ReturnPath
    data: socket.socket


class SourceRecovery:
    """A source whose post-copy paused: reconnects, re-confirms the handover, and resumes QEMU's migration."""

    def __init__(self, session: SourceSession, vm: QemuVM, address: tuple[str, int], hello: Hello) -> None:
        self._s = session
        self._vm = vm
        self._address = address
        self._hello = hello
        self.count = 0

    def recover(self, cause: BaseException, manifest_fields: dict[str, object]) -> Resumed:
        s = self._s
        window = recover_window(s.config.step_timeout_s)
        deadline = time.monotonic() + window
        log.warning("post-copy of %s paused (%s); reconnecting to %s", s.vm_name, cause, s.destination)
        s.audit("migration.postcopy_paused", vm=s.vm_name, reason=str(cause))
        s.progress("phase", {"phase": "postcopy-paused", "reason": str(cause)})
        try:
            _wait_status(self._vm, {"postcopy-paused"}, PAUSE_WAIT_S)
        except PostcopyPaused:
            pass  # still not paused: the resume below says what QEMU thinks
        last: BaseException = cause
        while time.monotonic() < deadline:
            try:
                resumed = self._attempt(manifest_fields)
                self.count += 1
                s.audit("migration.postcopy_recovered", vm=s.vm_name, attempt=self.count)
                return resumed
            except (OSError, SealiftError) as exc:  # the link still down, a refusal, QEMU not ready
                last = exc
                log.info("post-copy recovery of %s: %s; retrying", s.vm_name, exc)
                record = s.context.store.migration(s.migration_id)
                if record is not None and record.phase == Phase.POSTCOPY_RECOVERING:
                    s.enter(Event.FAIL, error=str(exc))
                time.sleep(RETRY_S)
        raise PostcopyPaused(
            f"the post-copy could not be recovered within {window:.0f} s ({last}); {s.vm_name} waits on "
            f"{s.destination} for its remaining pages, kept by the paused QEMU here, which never runs the guest "
            f"again (no second copy). If {s.destination} is gone for good, the guest is lost: its running "
            f"state was there"
        )

    def _attempt(self, manifest_fields: dict[str, object]) -> Resumed:
        s = self._s
        channel = ControlChannel.connect(
            self._address, s.context.identity, s.destination, s.options.secure, s.config.handshake_timeout_s
        )
        try:
            if channel.secure:
                s.context.authority.check_peer(channel.tls.peer_certificate, s.destination)
            s.enter(Event.BEGIN_RECOVERY)
            s.progress("phase", {"phase": "postcopy-recovering"})
            nonce = secrets.token_bytes(32)
            channel.send(dataclasses.replace(self._hello, nonce=nonce, psk_proof=None))
            accept = channel.recv(s.config.step_timeout_s)
            if not isinstance(accept, Accept):
                reason = getattr(accept, "reason", type(accept).__name__)
                raise MigrationError(f"{s.destination} would not resume the post-copy: {reason}")
            s.binding = channel_binding(channel, nonce, accept.nonce, s.migration_id)
            if s.reconfirm_postcopy is None:
                raise MigrationError("post-copy recovery without the coordinator's re-confirmation (a bug)")
            s.reconfirm_postcopy(channel, {**manifest_fields, "resume": True})
            resumed = self._resume_qemu(channel, nonce, accept)
        except BaseException:
            channel.close()
            raise
        if s.recovered_channel is not None:
            s.recovered_channel.close()
        s.recovered_channel = channel  # the running receipt comes on this one
        s.enter(Event.RESUME_POSTCOPY)
        s.progress("phase", {"phase": "postcopy-active", "recovered": True})
        return resumed

    def _resume_qemu(self, channel: ControlChannel, nonce: bytes, accept: Accept) -> Resumed:
        s = self._s
        outgoing, incoming = stream_protections(channel, s.options.secure, nonce, accept.nonce, s.migration_id)
        npages = self._vm.memory_mib * (1 << 20) // relay.PAGE
        timeout = s.config.step_timeout_s
        data = open_data_stream(self._address, accept.session_id, 0, timeout)
        try:
            reader = DataStreamReader(incoming, npages)
            ready = relay.read_record(data, reader)
            if not isinstance(ready, OpaqueReceived):
                raise MigrationError(f"{s.destination} sent {type(ready).__name__} instead of its ready record")
            Ready.decode(bytes(ready.data))
            writer = DataStreamWriter(outgoing, npages, None)
            pump = relay.SourcePump(0, writer, data, timeout, relay.StreamDigest(outgoing.overhead))
            ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            relay.widen_send_buffer(qemus)
            pumps = relay.SourcePumps([pump], first=ours)
            back = ReturnPath.to_qemu(data, reader, ours.dup()).start()
            pumps.start()
            try:
                self._vm.migrate_to_socket(qemus, "sealift-resume", resume=True)
            except BaseException:
                pumps.stop()
                back.stop()
                raise
            finally:
                qemus.close()
        except BaseException:
            data.close()
            raise
        return Resumed(pumps, back, data)
