"""Post-copy for QEMU guests on the sealift transports: when to switch, and QEMU's return path.

Post-copy (QEMU's `postcopy-ram`) lets a guest that dirties memory faster
than the link carries it finish its migration: after some pre-copy the
source stops the guest, sends its device state, and the destination runs it
at once, fetching each page it touches before it arrives ("page requests")
while the source pushes the rest in the background. The switch
(`migrate-start-postcopy`) is the point of no return: from then on neither
host holds the whole guest, so the source never resumes its copy. The
source therefore switches only holding the destination's signed "prepared"
receipt and its own durable decision (migration/source.py,
`SourceCoordinator._decide_postcopy`).

The destination QEMU writes its page requests on the migration connection
itself (the return path). Through the agents that is the data stream's back
direction: OPAQUE records sealed with the destination -> source key, the
same key and sequence the ready record started (ReturnPath below). Every
byte either QEMU reads has been opened and authenticated by an agent first.

`SwitchTrigger` is sans-IO: it reads query-migrate's figures and says when
(and why) to switch; the tests drive it with numbers.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sealift.backends.qemu import relay
from sealift.backends.qemu.qmp import QmpTimeout
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.errors import SealiftError
from sealift.migration.destination import verify_manifest
from sealift.migration.documents import DocumentError
from sealift.migration.errors import MigrationError, PostcopyPaused
from sealift.migration.options import MigrationOptions
from sealift.migration.phases import Event
from sealift.migration.session import DestinationSession
from sealift.security.audit import Kinds
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
from sealift.wire.errors import ProtocolError

log = logging.getLogger(__name__)

BACKEND = "qemu"
TRANSPORTS = ("sealift", "sealift-plain")  # the ones whose stream the agents carry (and so its return path)
STALL_PASSES = 3  # "on-stall": this many passes in a row with the dirty rate at or above the link's
# QEMU counts a page dirtied twice in a pass once, so a guest that rewrites its whole working set every pass
# measures a dirty rate *equal* to the link's (its set / the pass's time): "at or above" allows 5 % of noise.
STALL_RATIO = 0.95
FIRST_PASS_DONE = 2  # dirty-sync-count after the first full pass (QEMU counts the sync before it too)


class PostcopyUnavailable(SealiftError):
    """Post-copy was asked for where it cannot run (a transport, a host without userfaultfd)."""

    code = "postcopy_unavailable"


def effective_mode(options: MigrationOptions) -> tuple[str, float]:
    """(post-copy mode, its switch time): `completion_action = "postcopy"` is "after-timeout" at the
    completion timeout (KubeVirt's allowPostCopy), otherwise the options' own."""
    if options.completion_action == "postcopy" and options.completion_timeout_s is not None:
        return "after-timeout", options.completion_timeout_s
    return options.postcopy, options.postcopy_after_s


def check_transport(mode: str, transport: str) -> None:
    """Post-copy only where the agents carry QEMU's stream: they must carry its return path too."""
    if mode != "off" and transport not in TRANSPORTS:
        raise PostcopyUnavailable(
            f"post-copy ({mode}) runs only on the {' or '.join(TRANSPORTS)} transport, not {transport!r}"
        )


# -- when to switch (sans-IO) -----------------------------------------------------------------


@dataclass
class SwitchTrigger:
    """Decides, from query-migrate's "ram" figures, when a pre-copy should switch to post-copy."""

    mode: str  # MigrationOptions.postcopy
    after_s: float = 10.0
    stall_passes: int = STALL_PASSES
    _last_sync: int = 0
    _last_remaining: int | None = None
    _stalled: int = 0
    history: list[str] = field(default_factory=list)  # one line per pass judged ("on-stall"), for the report

    def reason(self, elapsed_s: float, ram: dict[str, Any]) -> str | None:
        """Why to switch now, or None to go on with pre-copy."""
        sync = int(ram.get("dirty-sync-count", 0))
        if self.mode == "after-timeout":
            return f"after {self.after_s:g} s of pre-copy" if elapsed_s >= self.after_s else None
        if self.mode == "after-precopy":
            return "after the first pre-copy pass" if sync >= FIRST_PASS_DONE else None
        if self.mode == "on-stall":
            return self._stall_reason(sync, ram)
        return None

    def _stall_reason(self, sync: int, ram: dict[str, Any]) -> str | None:
        if sync <= self._last_sync or sync < FIRST_PASS_DONE:
            return None  # judged once per pass, from the second on (the first sends everything)
        self._last_sync = sync
        dirty_bps = float(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", relay.PAGE))
        link_bps = float(ram.get("mbps", 0.0)) * 1e6 / 8
        remaining = int(ram.get("remaining", 0))
        # Stalled: the guest dirties (about) what the link carries, or what is left to send did not shrink.
        not_shrinking = self._last_remaining is not None and remaining >= self._last_remaining
        stalled = (link_bps > 0 and dirty_bps >= STALL_RATIO * link_bps) or not_shrinking
        self._last_remaining = remaining
        self._stalled = self._stalled + 1 if stalled else 0
        self.history.append(f"pass {sync - 1}: dirty {dirty_bps / 2**20:.1f} MiB/s, link {link_bps / 2**20:.1f} MiB/s")
        if self._stalled >= self.stall_passes:
            return (
                f"stalled for {self._stalled} passes: the guest dirties {dirty_bps / 2**20:.1f} MiB/s, the link "
                f"carries {link_bps / 2**20:.1f} MiB/s, {remaining / 2**20:.1f} MiB left to send"
            )
        return None


# -- the source's side of the switch -----------------------------------------------------------


Decide = Callable[[], None]  # the coordinator's decision: prepared receipt held, decision on disk, Commit sent


@dataclass
class SourceSwitch:
    """The source's post-copy state during one migration: the trigger, and what happened at the switch."""

    trigger: SwitchTrigger
    decide: Decide | None = None  # set by the coordinator (SourceSession.decide_postcopy) before the transfer
    reason: str | None = None  # why it switched; None while it has not
    switched_at: float | None = None  # monotonic time of migrate-start-postcopy (the guest stops there)
    precopy_s: float = 0.0
    recoveries: int = 0  # post-copies resumed over a fresh channel after a cut (postcopy_recovery.py)
    continued_switchover = False

    @property
    def switched(self) -> bool:
        return self.switched_at is not None

    def poll(self, vm: QemuVM, status: str, ram: dict[str, Any], elapsed_s: float) -> float | None:
        """Called on every poll of the source's query-migrate; the time the guest stopped, once switched.

        Switches only from "active" (pre-copy proper): at "pre-switchover"
        QEMU is already finishing in pre-copy, and the ordinary handover goes on.
        """
        if self.switched or status != "active":
            return None
        reason = self.trigger.reason(elapsed_s, ram)
        if reason is None:
            return None
        if self.decide is None:
            raise MigrationError("post-copy switch without the coordinator's decision step (a bug)")
        self.decide()  # raises (and the guest runs on here) unless the destination promised and we decided
        log.info("switching %s to post-copy: %s", vm.name, reason)
        self.reason, self.precopy_s = reason, round(elapsed_s, 3)
        self.switched_at = time.monotonic()
        try:
            vm.qmp("migrate-start-postcopy")
        except QemuError as exc:
            # Decided already: the destination may run the guest; never resume here. The record pauses.
            raise PostcopyPaused(f"QEMU refused migrate-start-postcopy after the decision: {exc}") from exc
        return self.switched_at

    def continue_switchover(self, vm: QemuVM) -> None:
        """QEMU stops at pre-switchover on its way into post-copy too; the check was the decision, go on."""
        if not self.continued_switchover:
            self.continued_switchover = True
            vm.migrate_continue("pre-switchover")

    def figures(self, info: dict[str, Any], return_path: ReturnPath | None) -> dict[str, object] | None:
        """The report's post-copy figures (MigrationReport.postcopy) from QEMU's final query-migrate; None if
        it never switched. Page requests are QEMU 7.2's ram.postcopy-requests."""
        if self.switched_at is None:
            return None
        ram = info.get("ram", {})
        return {
            "reason": self.reason,
            "precopy_s": self.precopy_s,
            "postcopy_s": round(time.monotonic() - self.switched_at, 3),
            "postcopy_requests": ram.get("postcopy-requests"),
            "postcopy_bytes": ram.get("postcopy-bytes"),
            "return_path_bytes": return_path.bytes if return_path is not None else 0,
            "recoveries": self.recoveries,
        }


def manifest_fields(transport: str) -> dict[str, object]:
    """The backend's fields of the signed manifest at a post-copy switch: no digest yet (the running receipt
    brings the destination's, checked by the source at the end)."""
    return {
        "backend": BACKEND,
        "image_digest": None,
        "state_digest": None,
        "stream_bytes": None,
        "transport": transport,
        "postcopy": True,
    }


# -- the return path ---------------------------------------------------------------------------


class ReturnPath:
    """QEMU's back direction through one data stream, in a thread of its own, at either end.

    Source (`to_qemu`): opened records from the data stream into QEMU's
    socket. Destination (`from_qemu`): what QEMU writes, sealed onto the data
    stream. Either way a failure shuts QEMU's socket down (a QEMU in
    post-copy then pauses and waits for a recovery, it never runs on
    unverified bytes) and is kept in `error` for the coordinator's thread.
    """

    def __init__(self, name: str, qemu: socket.socket, data: socket.socket) -> None:
        self._qemu = qemu
        self._data = data
        self.bytes = 0
        self.records = 0
        self.ended = threading.Event()  # END seen (source) or sent (destination): the return path closed cleanly
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded, name=name, daemon=True)
        self._body: Callable[[], None] = lambda: None

    @classmethod
    def to_qemu(cls, data: socket.socket, reader: DataStreamReader, qemu: socket.socket) -> ReturnPath:
        path = cls("qemu-return-in", qemu, data)
        path._body = lambda: path._into_qemu(reader)
        return path

    @classmethod
    def from_qemu(cls, qemu: socket.socket, writer: DataStreamWriter, data: socket.socket) -> ReturnPath:
        path = cls("qemu-return-out", qemu, data)
        path._body = lambda: path._out_of_qemu(writer)
        return path

    def start(self) -> ReturnPath:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the relay and break QEMU's connection: a QEMU in post-copy must learn at once that this
        stream is gone (it pauses), however the relay ended. The socket is our own duplicate: close it."""
        self._stop.set()
        _shutdown(self._qemu)
        self._thread.join(timeout=5)
        self._qemu.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _guarded(self) -> None:
        try:
            self._body()
        except BaseException as exc:  # handed to the coordinator's thread, which decides
            if not self._stop.is_set():
                self.error = exc
                log.warning("QEMU's return path failed: %s", exc)
                # The data stream first: a failure only this end saw (a record back that failed authentication
                # at the source) must reach the other end as a broken stream, never as the clean END the
                # source's pump would write once QEMU's connection breaks; then both QEMUs pause.
                _shutdown(self._data)
                _shutdown(self._qemu)

    def _readable(self, sock: socket.socket) -> bool:
        """Wait (without a deadline: the return path is silent for most of a pre-copy) until `sock` has data."""
        while not self._stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                return True
        return False

    def _into_qemu(self, reader: DataStreamReader) -> None:
        while self._readable(self._data):
            event = relay.read_record(self._data, reader)  # raises on a record that fails authentication
            if isinstance(event, StreamEnded):
                self.ended.set()
                return
            if not isinstance(event, OpaqueReceived):
                raise ProtocolError(f"unexpected {type(event).__name__} on QEMU's return path")
            self._qemu.sendall(event.data)
            self.bytes += len(event.data)
            self.records += 1

    def _out_of_qemu(self, writer: DataStreamWriter) -> None:
        while self._readable(self._qemu):
            buf = writer.opaque_buffer()
            n = self._qemu.recv_into(buf)
            if n == 0:  # QEMU closed the connection: the incoming migration is over
                self._data.sendall(writer.end())
                self.ended.set()
                return
            self._data.sendall(writer.finish_opaque(n))
            self.bytes += n
            self.records += 1


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the destination's side --------------------------------------------------------------------


class ForwardFeed:
    """The destination's main stream into QEMU in a thread (post-copy: the manifest comes before END)."""

    def __init__(
        self, data: socket.socket, reader: DataStreamReader, qemu: socket.socket, digest: relay.StreamDigest
    ) -> None:
        self._data, self._reader, self._qemu, self.digest = data, reader, qemu, digest
        self.stream_bytes = 0
        self.ended = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qemu-feed-postcopy", daemon=True)

    def start(self) -> ForwardFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        header = bytearray(DataStreamReader.HEADER_SIZE)
        try:
            while True:  # relay.feed_qemu's loop, counting as it goes (the destination watches it advance)
                event = relay.read_record(self._data, self._reader, header)
                if isinstance(event, StreamEnded):
                    break
                if not isinstance(event, OpaqueReceived):
                    raise ProtocolError(f"unexpected {type(event).__name__} in a QEMU migration stream")
                if self.digest.tag_size:
                    self.digest.update(event.data, self._reader.last_tag)
                else:  # in clear the source's native relay hashes the records' headers: so must we
                    self.digest.absorb_native(bytes(header))
                self._qemu.sendall(event.data)
                self.stream_bytes += len(event.data)
            self._reader.close()
            self.ended = True
        except BaseException as exc:
            self.error = exc
            log.warning("the post-copy stream into QEMU failed: %s", exc)
            _shutdown(self._qemu)  # QEMU pauses (post-copy) or fails (pre-copy): never runs on what is missing

    def join(self, timeout: float) -> bool:
        """True once the whole stream (up to the source's END) was fed."""
        self._thread.join(timeout)
        return not self._thread.is_alive() and self.error is None


@dataclass
class DestinationFlow:
    """What an incoming post-copy-capable migration runs in the background once its QEMU listens."""

    feed: ForwardFeed
    back: ReturnPath
    data: socket.socket  # our own duplicates: the driver's closes do not end them
    qemu: socket.socket

    @classmethod
    def start(
        cls,
        data: socket.socket,
        reader: DataStreamReader,
        writer: DataStreamWriter,
        qemu: socket.socket,
        digest: relay.StreamDigest,
    ) -> DestinationFlow:
        data, qemu = data.dup(), qemu.dup()
        data.settimeout(None)  # post-copy may run long with a quiet link; QEMU and the peer's END end it
        qemu.settimeout(None)
        return cls(
            ForwardFeed(data, reader, qemu, digest).start(),
            ReturnPath.from_qemu(qemu, writer, data).start(),
            data,
            qemu,
        )

    @property
    def error(self) -> BaseException | None:
        return self.feed.error or self.back.error

    def close(self) -> None:
        _shutdown(self.qemu)
        _shutdown(self.data)
        self.back.stop()
        self.feed.join(5)
        self.data.close()
        self.qemu.close()


def migration_status(qemu: QemuVM, timeout: float = 2.0) -> str | None:
    """query-migrate's status, or None when QEMU does not answer in time.

    In post-copy a destination QEMU's main loop can wait for a missing page
    (under TCG a vCPU may hold the big lock while it faults), and then it
    answers no in-band command until the page comes, or until a recovery.
    """
    try:
        return str(qemu.qmp("query-migrate", timeout=timeout).get("status", "none"))
    except QemuError:
        if not qemu.alive():
            raise
        return None


def wait_destination_complete(qemu: QemuVM, flow: DestinationFlow) -> None:
    """The guest runs here: wait until QEMU has every page (its incoming migration completed).

    No deadline: a guest whose pages keep coming takes as long as it takes,
    and a link that breaks shows as the flow's error or as QEMU pausing its
    post-copy. Either raises PostcopyPaused: the guest waits here for a
    recovery, and the source never resumes its copy.
    """
    while True:
        if flow.error is not None:
            raise PostcopyPaused(f"the post-copy stream from the source broke: {flow.error}")
        if not qemu.alive():
            raise QemuError(f"destination QEMU exited during post-copy: {qemu.log_tail()}")
        status = migration_status(qemu)
        if status is None:
            continue  # QEMU's main loop waits on a page (a vCPU holds its lock): ask again
        if status == "completed" and flow.feed.join(0.5):
            return
        if status == "postcopy-paused":
            raise PostcopyPaused("the destination QEMU paused its post-copy (the link to the source broke)")
        if status in ("failed", "cancelled"):
            raise QemuError(f"destination QEMU's post-copy {status}: {qemu.log_tail()}")
        qemu.wait_event(relay.POLL_S)


def receive_manifest(
    session: DestinationSession, flow: DestinationFlow, transport: str, wait_loaded: Callable[[], None]
) -> dict[str, object]:
    """The source's signed manifest while the stream may still flow (a post-copy-capable migration).

    A post-copy manifest comes before the switch and carries no digest (the
    stream is not over): the promise is then about this session, its order
    and a QEMU ready for post-copy, and the digest is checked at the end
    (the running receipt). A pre-copy that converged before any switch sends
    the ordinary manifest after END: the whole stream is checked as without
    post-copy.
    """
    _await_manifest(session, flow)
    manifest, envelope = verify_manifest(session, {"backend": BACKEND, "transport": transport}, "received")
    if manifest.get("postcopy") is True:
        for key in ("image_digest", "stream_bytes"):
            if manifest.get(key) is not None:
                raise DocumentError(f"a post-copy manifest carries no {key}, this one {manifest.get(key)!r}")
        session.audit(Kinds.MIGRATION_DIGEST, image_digest=None, postcopy=True, verified=False, manifest=envelope)
        return manifest
    if not flow.feed.join(session.config.step_timeout_s):
        raise flow.error or MigrationError("the QEMU stream did not end after the source's manifest")
    wait_loaded()
    digest = flow.feed.digest.hexdigest()
    for key, value in {"image_digest": digest, "stream_bytes": flow.feed.stream_bytes}.items():
        if manifest.get(key) != value:
            raise DocumentError(f"manifest {key} is {manifest.get(key)!r}, received {value!r}")
    session.audit(Kinds.MIGRATION_DIGEST, image_digest=digest, verified=True, manifest=envelope)
    return manifest


def _await_manifest(session: DestinationSession, flow: DestinationFlow) -> None:
    """Wait for the source's next message however long pre-copy runs, as long as the stream moves.

    Without post-copy the manifest follows the stream's END within a step;
    here it comes at the switch, which may be minutes of pre-copy away.
    """
    timeout = session.config.step_timeout_s
    last_bytes, last_change = -1, time.monotonic()
    while session.channel.peek(1.0) is None:
        if flow.error is not None:
            raise flow.error
        if flow.feed.stream_bytes != last_bytes:
            last_bytes, last_change = flow.feed.stream_bytes, time.monotonic()
        elif time.monotonic() - last_change > timeout:
            raise TimeoutError(f"neither the QEMU stream nor the manifest came for {timeout:.0f} s")
        session.flight.check()  # a newly revoked source or operator: stop before any promise


Recover = Callable[[BaseException], DestinationFlow]  # a paused post-copy resumed over a fresh channel


def run_destination(
    session: DestinationSession, qemu: QemuVM, flow: DestinationFlow, vms: QemuVmRegistry, recover: Recover
) -> int | None:
    """After Commit: run the guest here while its pages still come; return once every page is here.

    The record goes committed -> postcopy-active at once: the source has
    decided, so the guest is to run here as soon as QEMU has its device
    state (`cont` now: an incoming QEMU takes it as "start when loaded"), and
    -> running once QEMU has every page; the digest of what came goes into
    the running receipt for the source to compare with what it sent (both
    audit it). A failure from here on, even before QEMU has the device state
    (loading it touches guest pages, which may be missing), pauses the
    post-copy for a recovery; it never discards the guest, which the source
    no longer has whole.
    """
    vms.hold_in_doubt(qemu)  # listed, and busy until every page is here
    # What a restarted agent needs to accept the source's reconnection (postcopy_recovery.resume_after_restart):
    # on disk before the record says post-copy, so that every post-copy record has it.
    session.context.store.save_resume(
        session.migration_id, {"hello": session.hello.to_json(), "order_id": session.order_id}
    )
    session.enter(Event.RUN_POSTCOPY)
    _start_when_loaded(qemu, flow)
    session.audit("migration.postcopy_running", vm=qemu.name, pid=qemu.pid)
    return finish_destination(session, qemu, flow, vms, recover)


def finish_destination(
    session: DestinationSession, qemu: QemuVM, flow: DestinationFlow, vms: QemuVmRegistry, recover: Recover
) -> int | None:
    """The guest runs here: until QEMU has every page, recovering each pause; the digest for the receipt."""
    while True:
        try:
            wait_destination_complete(qemu, flow)
            break
        except PostcopyPaused as exc:  # the guest waits on its missing pages: the source reconnects
            session.enter(Event.FAIL, error=str(exc))
            flow = recover(exc)
    digest = flow.feed.digest.hexdigest()
    session.receipt_extra = {"stream_digest": digest, "stream_bytes": flow.feed.stream_bytes}
    session.audit(Kinds.MIGRATION_DIGEST, image_digest=digest, postcopy=True, stream_bytes=flow.feed.stream_bytes)
    session.enter(Event.POSTCOPY_DONE)
    vms.unreserve_incoming_name(qemu.name)
    return qemu.pid


def _start_when_loaded(qemu: QemuVM, flow: DestinationFlow) -> None:
    """`cont` for a guest whose pages may still be missing.

    QEMU's main loop may be waiting on a page (loading the device state
    touches guest memory): QEMU then runs the command once the page comes,
    after a recovery if the link broke meanwhile, so a command that is not
    answered in time still stands. Only a QEMU that refuses it (or exited)
    is an error.
    """
    try:
        qemu.qmp("cont", timeout=2.0)
    except QemuError as exc:
        if not qemu.alive() or not isinstance(exc.__cause__, QmpTimeout):
            raise
        log.info("%s: cont queued while QEMU waits on a page (%s)", qemu.name, "link broken" if flow.error else "busy")


def enable_on_destination(qemu: QemuVM) -> None:
    """`postcopy-ram` on the destination QEMU, before it listens; a host that cannot (no userfaultfd) says so."""
    try:
        qemu.set_migration_capabilities({"postcopy-ram": True})
    except QemuError as exc:
        raise PostcopyUnavailable(f"post-copy is not available on this host: {exc}") from exc
