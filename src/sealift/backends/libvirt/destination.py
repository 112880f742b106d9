"""The destination side of a libvirt domain's migration: connect the carried sockets, start on Commit.

The source's first record offers the domain (name, UUID, disks). The
destination creates each disk empty, at the same path, with the same
virtual size (libvirt's NBD copy needs it there; only inside `[libvirt]
images_dir`, never where the source says otherwise), creates the
migration's socket directory, and answers with the sessions of the data
streams that will carry libvirt's connections. Each stream's first record
says which socket it is for: `control` goes to this host's libvirtd,
`memory` and `disk` to the sockets of the same name that this libvirtd's
QEMU opened there. libvirt leaves the domain paused; it is resumed only on
Commit, and the running receipt names its UUID.

libvirt's switchover (its Finish: the source QEMU quits) comes before the
promise. If the handover is cut after it (the link, or the source agent),
the domain here is the only copy: it is not discarded but handed to the
resolver (in doubt, hypervisor-handed-over), which starts it once the source
says it committed, provided what this host could check held (no carried
record failed authentication, every memory and disk stream ended with its
authenticated END, the signed manifest matched if it came). If a check
failed, it is never started: it stays paused and busy for the operator.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import libvirt

from sealift.backends.builtin.registry import BuiltinVmRegistry
from sealift.backends.libvirt.carrier import Carrier
from sealift.backends.libvirt.errors import LibvirtError
from sealift.backends.libvirt.paths import check_under, local_path, socket_in_uri
from sealift.backends.libvirt.registry import BACKEND, LibvirtDomain, LibvirtRegistry
from sealift.backends.libvirt.spec import DomainOffer, decode_kind
from sealift.backends.qemu import relay
from sealift.migration.destination import admit_hello, verify_manifest
from sealift.migration.errors import AdmissionError, IncomingRefused, MigrationError
from sealift.migration.phases import Event
from sealift.migration.session import DestinationSession
from sealift.migration.streams import stream_protections
from sealift.security.audit import Kinds
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
from sealift.wire.errors import ProtocolError
from sealift.wire.qemu_stream import Ready

log = logging.getLogger(__name__)

# Data streams offered for libvirt's connections: the RPC connection, the memory stream and one NBD
# connection per disk (at most spec.MAX_DISKS), with room for a reconnecting client.
STREAM_POOL = 12
CONNECT_TIMEOUT_S = 10.0
# audit kinds: libvirt's switchover done and the handover cut before the promise: to the resolver, or held
HANDED_OVER = "libvirt.handed_over"
HANDOVER_HELD = "libvirt.handover_held"
END_WAIT_S = 2.0  # after a cut: how long each carried connection may take to show how it ended
SOCKET_FILES = {"memory": "mem", "disk": "nbd"}


class LibvirtDestinationDriver:
    backend = BACKEND
    accept_audit: Mapping[str, object] = {"backend": BACKEND}

    def __init__(self, session: DestinationSession, vms: BuiltinVmRegistry, domains: LibvirtRegistry | None) -> None:
        self._session = session
        self._vms = vms  # host-wide admission (capacity, concurrency) counts every guest here
        self._domains = domains
        self._offer: DomainOffer | None = None
        self._created_disks: list[Path] = []
        self._dir: Path | None = None
        self._carriers: list[Carrier] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._sessions: list[bytes] = []
        self._digest = relay.StreamDigest(0)
        self._kept = False  # libvirt had handed the domain over: never destroyed, its name stays busy

    def _registry(self) -> LibvirtRegistry:
        if self._domains is None:
            raise IncomingRefused(f"{self._session.config.name} has no [libvirt] section: it takes no libvirt domains")
        return self._domains

    # -- the driver's steps --------------------------------------------------------------------

    def admit(self) -> None:
        s, hello = self._session, self._session.hello
        domains = self._registry()
        admit_hello(s)
        self._vms.reserve_incoming(hello.migration_id, hello.vm_name, hello.memory_bytes)
        try:
            domains.reserve_name(hello.vm_name)
        except Exception as exc:
            self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
            raise AdmissionError(str(exc)) from exc

    def prepare(self) -> None:
        """Nothing before Accept: the disks are created once the offer has named them."""

    def take_stream(self) -> dict[str, object]:
        try:
            return self._take_stream()
        except BaseException as exc:
            self._settle_cut_handover(exc)
            raise

    def _take_stream(self) -> dict[str, object]:
        s, hello = self._session, self._session.hello
        incoming, outgoing = stream_protections(s.channel, hello.secure, hello.nonce, s.nonce, hello.migration_id)
        data = s.context.sessions.wait(s.session_id, s.config.step_timeout_s, interrupt=s.stop_if_aborted)
        try:
            data.settimeout(s.config.step_timeout_s)
            reader = DataStreamReader(incoming, 1)
            self._digest = relay.StreamDigest(incoming.overhead)
            first = relay.read_record(data, reader)
            if not isinstance(first, OpaqueReceived):
                raise ProtocolError(f"the libvirt stream began with {type(first).__name__}, not the domain offer")
            self._digest.update(first.data, reader.last_tag)
            offer = self._offer = DomainOffer.decode(bytes(first.data))
            self._check_offer(offer)
            self._create_disks(offer)
            self._open_socket_dir(offer)
            self._sessions = [secrets.token_bytes(16) for _ in range(STREAM_POOL)]
            for index, session in enumerate(self._sessions, 1):
                s.context.sessions.expect(session)
                threading.Thread(
                    target=self._serve_stream, args=(index, session), name=f"libvirt-in-{index}", daemon=True
                ).start()
            relay.send_opaque(data, DataStreamWriter(outgoing, 1, None), Ready(None, tuple(self._sessions)).encode())
            self._await_end(data, reader)
        finally:
            data.close()
        self._end_carriers()
        domain = self._received_domain()
        return self._verify_manifest(domain)

    def start_guest(self, manifest: Mapping[str, object]) -> tuple[int | None, object]:
        domain = self._received_domain()
        domain.dom.resume()
        self._registry().unclaim(domain.name)
        self._session.receipt_extra = {"domain_uuid": domain.uuid}  # the running receipt names the domain
        return domain.pid(), manifest.get("counter_at_pause")

    def discard(self, reason: str) -> None:
        """Before the promise. Never destroy a domain libvirt has finished handing over: it may be the only copy."""
        self._stop_streams()
        domain = self._lookup()
        if domain is not None and domain.dom.isPersistent():
            self._kept = True
            log.error(
                "%s: libvirt finished handing the domain over before the migration failed (%s); "
                "it stays here, paused, unstarted and busy, for the operator",
                domain.name,
                reason,
            )
            return
        if domain is not None and domain.dom.isActive():
            try:
                domain.dom.destroy()  # libvirt's own incoming domain, not handed over: the source runs it
            except libvirt.libvirtError as exc:
                log.warning("could not destroy the incoming domain %s: %s", domain.name, exc)
        for path in self._created_disks:
            path.unlink(missing_ok=True)

    def hold(self) -> None:
        """After the promise, a failure: the paused domain stays, held (busy), for the resolver."""
        self._stop_streams()

    def release(self, prepared: bool) -> None:
        self._stop_streams()
        hello = self._session.hello
        self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
        if not prepared and not self._kept and self._domains is not None:
            self._domains.unclaim(hello.vm_name)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- a handover cut after libvirt's switchover ---------------------------------------------------

    def _settle_cut_handover(self, exc: BaseException) -> None:
        """The stream failed before the promise. If libvirt had already handed the domain over, it is the only
        copy (the source QEMU has quit): in doubt for the resolver if every check here held, else kept for the
        operator. If libvirt never finished, nothing here: the coordinator discards and the source runs it."""
        s = self._session
        domain = self._lookup()
        if domain is None or not _handed_over_here(domain):
            return
        self._kept = True
        problems, checked = self._handover_checks(exc)
        if problems:
            log.error(
                "%s: libvirt handed the domain over but %s: it is NEVER started here; it stays paused and busy "
                "for the operator (the source's copy has quit)",
                domain.name,
                "; ".join(problems),
            )
            s.audit(HANDOVER_HELD, vm=domain.name, problems=problems, checked=checked, error=str(exc))
            return
        s.enter(Event.HYPERVISOR_HANDED_OVER, error=f"cut after libvirt's switchover, before the promise: {exc}")
        log.warning(
            "%s: libvirt handed the domain over, then the handover was cut (%s); in doubt: it starts here once "
            "the source says it committed (checked: %s)",
            domain.name,
            exc,
            "; ".join(checked),
        )
        s.audit(HANDED_OVER, vm=domain.name, checked=checked, error=str(exc))

    def _handover_checks(self, exc: BaseException) -> tuple[list[str], list[str]]:
        """(what failed, what held) of what this host can still check of the streams libvirt used."""
        self._done.set()
        for carrier in self._sorted_carriers():
            if not carrier.join(END_WAIT_S):
                carrier.stop()  # libvirt's control connection may linger: its END can no longer come
                carrier.join(END_WAIT_S)
        problems: list[str] = []
        checked: list[str] = []
        if not _is_cut(exc):
            problems.append(f"the handover failed a check: {exc}")  # a bad or mismatched manifest, an abort, ...
        if self._error is not None and not _is_cut(self._error):
            problems.append(f"a carried stream failed: {self._error}")
        for carrier in self._sorted_carriers():
            name = f"{carrier.kind} stream {carrier.index}"
            if carrier.error is not None and not _is_cut(carrier.error):
                problems.append(f"{name} failed: {carrier.error}")  # a record that failed authentication
            elif carrier.ended:
                checked.append(f"{name} ended with its authenticated END")
            elif carrier.kind == "control":
                # libvirt's RPC, not the guest's state: its last call (Finish) demonstrably completed here
                checked.append(f"{name} cut after libvirt's Finish (no END)")
            else:
                problems.append(f"{name} has no authenticated END")
        if not self._sorted_carriers():
            problems.append("no carried stream to check")
        if _is_cut(exc):  # else the manifest (or the source's word) failed: a problem, listed above
            checked.append("the signed manifest never arrived: no digest cross-check of the streams")
        return problems, checked

    # -- the offer -----------------------------------------------------------------------------

    def _check_offer(self, offer: DomainOffer) -> None:
        hello = self._session.hello
        if offer.name != hello.vm_name:
            raise ProtocolError(f"the domain offer names {offer.name!r}, the Hello {hello.vm_name!r}")
        if self._registry().lookup_uuid(offer.uuid) is not None:
            raise IncomingRefused(f"a domain with UUID {offer.uuid} is already defined on {self._session.config.name}")

    def _create_disks(self, offer: DomainOffer) -> None:
        """Each disk empty, where libvirt will copy it: only inside images_dir, never over an existing file."""
        config = self._registry().config
        for disk in offer.disks:
            try:
                inside = check_under(disk.path, config.images_dir)
            except LibvirtError as exc:
                raise IncomingRefused(str(exc), code="libvirt_disk_refused") from None
            path = local_path(inside, config.local_root)
            if path.exists():
                raise IncomingRefused(f"disk {inside} already exists on {self._session.config.name}")
            result = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(disk.virtual_size)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise IncomingRefused(f"could not create disk {inside}: {result.stderr.strip()}")
            self._created_disks.append(path)

    def _open_socket_dir(self, offer: DomainOffer) -> None:
        config = self._registry().config
        self._dir = local_path(f"{config.socket_dir}/{offer.socket_id}", config.local_root)
        self._dir.mkdir(mode=0o700, parents=True)

    # -- the carried connections ----------------------------------------------------------------

    def _serve_stream(self, index: int, session: bytes) -> None:
        """One offered data stream: wait for it (most are never used), read its kind, connect, carry."""
        s, hello = self._session, self._session.hello
        sessions = s.context.sessions
        try:
            try:
                data = sessions.wait(session, 24 * 3600.0, interrupt=self._interrupt)
            except _Done:
                return
            label = relay.stream_label(hello.migration_id, index)
            incoming, outgoing = stream_protections(s.channel, hello.secure, hello.nonce, s.nonce, label)
            reader = DataStreamReader(incoming, 1)
            digest_in = relay.StreamDigest(incoming.overhead)
            data.settimeout(s.config.step_timeout_s)
            first = relay.read_record(data, reader)
            if not isinstance(first, OpaqueReceived):
                raise ProtocolError(f"libvirt stream {index} began with {type(first).__name__}, not its kind")
            digest_in.update(first.data, reader.last_tag)
            kind = decode_kind(bytes(first.data))
            data.settimeout(None)  # libvirt's RPC connection may sit idle while QEMU copies
            conn = self._connect(kind)
            writer = DataStreamWriter(outgoing, 1, None)
            carrier = Carrier(index, kind, conn, data, writer, reader, relay.StreamDigest(outgoing.overhead), digest_in)
            with self._lock:
                self._carriers.append(carrier)
            carrier.start()
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
            log.warning("%s: libvirt stream %d failed: %s", hello.migration_id, index, exc)

    def _interrupt(self) -> None:
        if self._done.is_set():
            raise _Done

    def _connect(self, kind: str) -> socket.socket:
        config = self._registry().config
        if kind == "control":
            path = local_path(str(socket_in_uri(config.uri)), config.local_root)
        else:
            assert self._dir is not None
            path = self._dir / SOCKET_FILES[kind]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise LibvirtError(f"nothing listens on {path} for libvirt's {kind} connection") from None
                time.sleep(0.02)

    def _await_end(self, data: socket.socket, reader: DataStreamReader) -> None:
        """The main stream stays silent while libvirt migrates; the source's END says every connection ended."""
        data.settimeout(None)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(self._session.config.step_timeout_s / 3))
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        event = relay.read_record(data, reader)
        if not isinstance(event, StreamEnded):
            raise ProtocolError(f"unexpected {type(event).__name__} on a libvirt migration's main stream")
        reader.close()

    def _end_carriers(self) -> None:
        self._done.set()
        deadline = time.monotonic() + self._session.config.step_timeout_s
        for carrier in self._sorted_carriers():
            if not carrier.join(max(0.0, deadline - time.monotonic())):
                raise MigrationError(
                    f"libvirt's {carrier.kind} connection did not end with the migration", code="stream_failed"
                )
        errors = [self._error] + [c.error for c in self._sorted_carriers()]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise MigrationError(f"carrying libvirt's connections failed: {error}", code="stream_failed")

    def _sorted_carriers(self) -> list[Carrier]:
        with self._lock:
            return sorted(self._carriers, key=lambda c: c.index)

    def _stop_streams(self) -> None:
        self._done.set()
        for carrier in self._sorted_carriers():
            carrier.close()
        for session in self._sessions:
            self._session.context.sessions.cancel(session)

    # -- the received domain ------------------------------------------------------------------

    def _lookup(self) -> LibvirtDomain | None:
        if self._offer is None or self._domains is None:
            return None
        try:
            return self._domains.lookup_uuid(self._offer.uuid)
        except LibvirtError:
            return None

    def _received_domain(self) -> LibvirtDomain:
        """libvirt's migrated domain: defined here (PERSIST_DEST), paused (VIR_MIGRATE_PAUSED), never started."""
        domain = self._lookup()
        if domain is None:
            raise MigrationError("libvirt's migration ended but no domain with the offered UUID is here")
        if not domain.dom.isPersistent() or domain.state() != "paused":
            raise MigrationError(f"the received domain {domain.name} is {domain.state()}, not defined and paused")
        return domain

    def _verify_manifest(self, domain: LibvirtDomain) -> dict[str, object]:
        s = self._session
        digests = [self._digest]
        for carrier in self._sorted_carriers():
            digests += [carrier.digest_in, carrier.digest_out]  # the source's order: its out, then its in
        digest = relay.combined_digest(digests)
        expected = {
            "backend": BACKEND,
            "image_digest": digest,
            "stream_bytes": sum(c.bytes_out + c.bytes_in for c in self._sorted_carriers()),
            "domain_uuid": domain.uuid,
        }
        manifest, envelope = verify_manifest(s, expected, "received")
        s.audit(Kinds.MIGRATION_DIGEST, image_digest=digest, verified=True, manifest=envelope)
        return manifest


def _handed_over_here(domain: LibvirtDomain) -> bool:
    """libvirt finished the incoming migration: defined here (PERSIST_DEST) and paused (VIR_MIGRATE_PAUSED)."""
    try:
        return bool(domain.dom.isPersistent()) and domain.state() == "paused"
    except libvirt.libvirtError:
        return False


def _is_cut(exc: BaseException) -> bool:
    """A failure of the link or a peer (a reset, a close, silence), not a check that failed here."""
    if isinstance(exc, MigrationError) and exc.code == "stream_failed":
        return True  # a carried connection broke or lingered: each carrier's own error says how (checked apart)
    return isinstance(exc, OSError)


class _Done(Exception):
    """The migration's main stream ended: offered streams never opened are not waited for any more."""
