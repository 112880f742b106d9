"""The destination side of a QEMU guest's migration: the QEMU destination driver of the one handover.

QEMU starts with `-incoming defer` and autostart off, so it never runs the
guest by itself. On the sealift transports the agent feeds it the verified
payloads through its unix socket (relay.py); on a direct transport its QEMU
listens on the address the transport set up (transports.py) and the data
stream only carries the guest description, the ready record and END. The
agent `cont`s the guest only on Commit.
"""

from __future__ import annotations

import functools
import logging
import secrets
import select
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from sealift.backends.builtin.registry import BuiltinVmRegistry
from sealift.backends.qemu import postcopy, postcopy_recovery, relay
from sealift.backends.qemu.direct import Hook, run_after_hooks
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.registry import QemuVmRegistry, network_like
from sealift.backends.qemu.storage_hooks import DestinationDisks
from sealift.backends.qemu.transports import AuditedSa, DirectDestination, QemuTransport, transport_named
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.ipsec.charon import HostCharon
from sealift.ipsec.tunnel import IpsecError
from sealift.migration.destination import admit_hello, verify_manifest
from sealift.migration.errors import AdmissionError, IncomingRefused, MigrationError
from sealift.migration.options import MigrationOptions
from sealift.migration.session import DestinationSession
from sealift.migration.streams import stream_protections
from sealift.security.audit import Kinds
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
from sealift.wire.errors import ProtocolError
from sealift.wire.qemu_stream import GuestSpec, Ready

log = logging.getLogger(__name__)

MiB = 1 << 20
BACKEND = "qemu"


class QemuDestinationDriver:
    """A QEMU guest: QEMU started with -incoming defer and autostart off, `cont` on Commit."""

    backend = BACKEND
    accept_audit: Mapping[str, object] = {"backend": BACKEND}

    def __init__(
        self,
        session: DestinationSession,
        vms: BuiltinVmRegistry,
        qemu_vms: QemuVmRegistry,
        ipsec: HostCharon | None,
    ) -> None:
        self._session = session
        self._vms = vms  # admission (capacity, concurrency, names) counts every guest on this host
        self._qemu_vms = qemu_vms
        self._ipsec = ipsec  # the host's charon (transport "ipsec")
        self._sa: AuditedSa | None = None
        self._qemu: QemuVM | None = None
        self._digest = relay.StreamDigest(0)  # replaced once the data stream's protection is known (_receive)
        self._stream_digests = [self._digest]  # the main stream's, then each multifd stream's
        self._stream_bytes = 0
        self._transport: QemuTransport = transport_named("sealift")
        self._after_hooks: list[Hook] = []
        self._flow: postcopy.DestinationFlow | None = None  # post-copy-capable: the stream in the background
        self._recovery: postcopy_recovery.DestinationRecovery | None = None
        self._disks = DestinationDisks(session, qemu_vms.disk_dir())  # storage migration (storage.py)

    # -- the driver's steps --------------------------------------------------------------------

    def admit(self) -> None:
        s, hello = self._session, self._session.hello
        admit_hello(s)
        # Capacity, concurrency and name clashes with built-in guests: the built-in registry's admission.
        self._vms.reserve_incoming(hello.migration_id, hello.vm_name, hello.memory_bytes)
        try:
            self._qemu_vms.reserve_incoming_name(hello.vm_name)
        except Exception as exc:
            self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
            raise AdmissionError(str(exc)) from exc

    def prepare(self) -> None:
        """Nothing before Accept: QEMU starts once the guest description has come."""

    def take_stream(self) -> dict[str, object]:
        self._receive()
        if self._flow is not None:  # post-copy hook: the manifest may come before the stream ends
            return postcopy.receive_manifest(
                self._session, self._flow, self._transport.name, self._wait_incoming_complete
            )
        self._wait_incoming_complete()
        assert self._qemu is not None  # _receive started it (_wait_incoming_complete checked it too)
        self._disks.stop_server(self._qemu)  # -- storage hook: the source dropped its NBD clients
        run_after_hooks(self._qemu, self._after_hooks)
        return self._verify_manifest()

    def start_guest(self, manifest: Mapping[str, object]) -> tuple[int | None, object]:
        assert self._qemu is not None
        if self._flow is not None and manifest.get("postcopy") is True:  # post-copy hook: runs while pages come
            # From here a reconnecting source is expected: its Hellos wait for this migration, not for admission.
            self._recovery = postcopy_recovery.DestinationRecovery(self._session, self._qemu)
            pid = postcopy.run_destination(self._session, self._qemu, self._flow, self._qemu_vms, self._recover)
            return pid, manifest.get("counter_at_pause")
        self._qemu.resume()  # QEMU announces the guest's MAC by itself after an incoming migration
        self._qemu_vms.adopt_incoming(self._qemu)
        self._qemu_vms.unreserve_incoming_name(self._session.hello.vm_name)
        return self._qemu.pid, manifest.get("counter_at_pause")

    def discard(self, reason: str) -> None:
        hello = self._session.hello
        self._close_flow()
        if self._qemu is not None:
            try:
                self._qemu.kill()  # never a second copy: the source keeps the guest
            except QemuError as exc:
                log.error("could not kill the destination QEMU of %s: %s", hello.vm_name, exc)
            self._qemu_vms.delete_own_tap(self._qemu.net)  # a tap this agent made for it on its bridge
            (self._qemu_vms.vm_dir / f"{hello.vm_name}.sealift").unlink(missing_ok=True)
            self._qemu = None
        self._disks.discard()  # -- storage hook: the target images this migration created go

    def hold(self) -> None:
        """Keep the paused guest, registered and held (busy), for the resolver."""
        if self._qemu is not None:
            self._qemu_vms.hold_in_doubt(self._qemu)

    def release(self, prepared: bool) -> None:
        self._close_flow()
        self._disks.close()  # -- storage hook
        if self._sa is not None:
            self._sa.close_logged(self._session.migration_id)
        hello = self._session.hello
        self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
        if not prepared or self._qemu is None:
            self._qemu_vms.unreserve_incoming_name(hello.vm_name)

    def _close_flow(self) -> None:
        """Post-copy: stop relaying. A QEMU still in post-copy then pauses, its guest kept for a recovery."""
        if self._flow is not None:
            self._flow.close()
            self._flow = None
        if self._recovery is not None:
            self._recovery.release()  # the reconnections' channels may close now

    def _recover(self, cause: BaseException) -> postcopy.DestinationFlow:
        """Post-copy paused: wait for the source to reconnect, and relay the resumed stream (postcopy_recovery.py)."""
        assert self._qemu is not None
        if self._flow is not None:
            self._flow.close()  # QEMU pauses on its broken connection (if it has not yet)
        assert self._recovery is not None  # made with the post-copy (start_guest)
        self._flow = self._recovery.recover(cause)
        return self._flow

    # -- receiving ---------------------------------------------------------------------------

    def _receive(self) -> None:
        s, hello = self._session, self._session.hello
        incoming, outgoing = stream_protections(s.channel, hello.secure, hello.nonce, s.nonce, hello.migration_id)
        data = s.context.sessions.wait(s.session_id, s.config.step_timeout_s, interrupt=s.stop_if_aborted)
        try:
            data.settimeout(s.config.step_timeout_s)  # a silent peer is a dead peer
            reader = DataStreamReader(incoming, hello.memory_bytes // relay.PAGE)
            self._digest = relay.StreamDigest(incoming.overhead)
            self._stream_digests = [self._digest]
            first = relay.read_record(data, reader)
            if not isinstance(first, OpaqueReceived):
                raise ProtocolError(f"the QEMU stream began with {type(first).__name__}, not the guest description")
            self._digest.update(first.data, reader.last_tag)
            spec = GuestSpec.decode(bytes(first.data))
            self._transport = self._check_transport(spec, data)
            ready = DataStreamWriter(outgoing, hello.memory_bytes // relay.PAGE, None)
            if self._transport.direct:
                port = self._start_qemu_direct(spec, self._migration_host(data), data)
                relay.send_opaque(data, ready, Ready(port).encode())
                self._await_direct_end(data, reader)
            else:
                self._receive_through_channel(spec, data, reader, ready)
        finally:
            data.close()

    def _check_transport(self, spec: GuestSpec, data: socket.socket) -> QemuTransport:
        """The transport the source chose, if this host allows it (the source checked the same)."""
        s, hello = self._session, self._session.hello
        name = spec.transport or ("sealift" if hello.secure else "sealift-plain")
        transport = transport_named(name)  # GuestSpec.decode admits only known names
        if not transport.secure and not s.config.allow_insecure:
            raise IncomingRefused(f"the {name!r} transport is disabled on this host (allow_insecure = false)")
        try:
            transport.check(MigrationOptions(secure=hello.secure, multifd_channels=spec.multifd_channels))
            postcopy.check_transport("on" if spec.postcopy else "off", name)
        except ValueError as exc:
            raise IncomingRefused(str(exc)) from None
        if transport.secure and not s.channel.secure:
            raise IncomingRefused(f"the {name!r} transport needs the authenticated control channel")
        try:
            transport.check_destination(self._migration_host(data), str(data.getpeername()[0]), self._ipsec)
        except IpsecError as exc:
            raise IncomingRefused(f"the {name!r} transport is not available on {s.config.name}: {exc}") from None
        return transport

    def _migration_host(self, data: socket.socket) -> str:
        """Where this host's QEMU listens: the agent's own listen address, never a wildcard.

        An agent bound to a wildcard uses the local address its peer reached
        it on (that of the data stream's connection).
        """
        host = self._session.config.listen[0]
        if host in ("", "0.0.0.0", "::"):
            host = str(data.getsockname()[0])
        return host

    def _receive_through_channel(
        self, spec: GuestSpec, data: socket.socket, reader: DataStreamReader, ready: DataStreamWriter
    ) -> None:
        """The sealift transports: QEMU's stream arrives as OPAQUE records; feed it to QEMU's unix socket.

        With multifd, each channel has a data stream of its own (announced in
        the ready record) and a feeder thread into its own QEMU connection.
        """
        s, hello = self._session, self._session.hello
        timeout = s.config.step_timeout_s
        sock_dir = relay.private_dir("sl-qin-")
        qemu_socks: list[socket.socket] = []
        extra_sessions = tuple(secrets.token_bytes(16) for _ in range(spec.multifd_channels))
        feeders: list[relay.StreamFeeder] = []
        try:
            qemu_socks = self._start_qemu_unix(spec, sock_dir, 1 + len(extra_sessions))
            for index, session in enumerate(extra_sessions, 1):
                incoming, _ = stream_protections(
                    s.channel, hello.secure, hello.nonce, s.nonce, relay.stream_label(hello.migration_id, index)
                )
                s.context.sessions.expect(session)
                feeders.append(
                    relay.StreamFeeder(
                        index,
                        functools.partial(s.context.sessions.wait, session, timeout),
                        DataStreamReader(incoming, hello.memory_bytes // relay.PAGE),
                        qemu_socks[index],
                        relay.StreamDigest(incoming.overhead),
                        data,
                        timeout,
                    )
                )
            disk_sessions = self._disks.new_sessions()  # -- storage hook: one stream per copied disk, after multifd's
            relay.send_opaque(data, ready, Ready(None, extra_sessions + disk_sessions).encode())
            if spec.postcopy:  # post-copy hook: the stream and QEMU's return path run in the background
                self._flow = postcopy.DestinationFlow.start(data, reader, ready, qemu_socks[0], self._digest)
                return
            for feeder in feeders:
                feeder.start()
            self._disks.accept_streams(data)  # -- storage hook: a failed disk stream breaks `data`
            try:
                self._disks.wait_for_memory(data)  # -- storage hook: the main stream is silent while disks mirror
                self._stream_bytes += relay.feed_qemu(data, reader, qemu_socks[0], self._digest)
            except (OSError, ProtocolError) as exc:
                failed = next((f for f in feeders if f.error is not None), None)
                if failed is not None:  # it broke the main stream: its error is the cause
                    raise MigrationError(f"multifd stream {failed.index} failed: {failed.error}") from exc
                if self._disks.error is not None:  # a disk stream broke it: the same
                    raise MigrationError(f"a disk stream failed: {self._disks.error}", code="stream_failed") from exc
                raise
            for feeder in feeders:
                feeder.join(timeout)
                self._stream_bytes += feeder.stream_bytes
            self._stream_digests += [feeder.digest for feeder in feeders]
            self._stream_digests += self._disks.join()  # -- storage hook: both ends of every disk stream ended
        finally:
            for sock in qemu_socks:
                sock.close()
            for session in extra_sessions:
                s.context.sessions.cancel(session)
            shutil.rmtree(sock_dir, ignore_errors=True)

    def _await_direct_end(self, data: socket.socket, reader: DataStreamReader) -> None:
        """Direct transports: QEMU's stream comes by its own connection; wait for the source's END.

        The data stream stays silent while QEMU migrates, however long that
        takes: TCP keepalive finds a source host that died; our QEMU failing
        ends the wait at once.
        """
        assert self._qemu is not None
        idle = max(1, int(self._session.config.step_timeout_s / 3))
        data.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        while True:
            if self._sa is not None:
                self._sa.note_installed()  # audited here as soon as the source brought it up
            readable, _, _ = select.select([data], [], [], 0.2)
            if readable:
                event = relay.read_record(data, reader)
                if not isinstance(event, StreamEnded):
                    raise ProtocolError(f"unexpected {type(event).__name__} on a direct transport's data stream")
                reader.close()
                if self._sa is not None and self._sa.note_installed() is None:
                    # The inbound filter admits the stream only through the SA: never seen up means something is wrong.
                    raise IpsecError(
                        "the source says the QEMU stream is complete, but no IPsec SA was ever installed here"
                    )
                return
            if not self._qemu.alive():
                raise QemuError(f"destination QEMU exited during the incoming migration: {self._qemu.log_tail()}")
            status = self._qemu.query_migrate().get("status", "none")
            if status in ("failed", "cancelled"):
                raise QemuError(f"destination QEMU's incoming migration {status}: {self._qemu.log_tail()}")

    # -- the destination QEMU ------------------------------------------------------------------

    def _start_qemu(self, spec: GuestSpec) -> QemuVM:
        hello = self._session.hello
        if spec.memory_mib * MiB != hello.memory_bytes:
            raise ProtocolError(
                f"the guest description says {spec.memory_mib} MiB, the Hello {hello.memory_bytes} bytes"
            )
        # -- storage hook: an operator's own kernel must be here too, the very same files
        image = self._disks.boot_image(spec.definition, spec.image_key) or self._qemu_vms.image()
        if spec.image_key != image.key:
            raise IncomingRefused(
                f"the source booted guest image {spec.image_key[:16]}, this host has {image.key[:16]}: "
                f"run `sealift image build` on both hosts from the same inputs"
            )
        net = network_like(NetConfig.from_json(spec.net))
        # -- storage hook: shared disks checked, copied disks' targets created
        definition = self._disks.definition_here(spec.definition, self._transport.direct)
        qemu = self._qemu = self._qemu_vms.start_incoming(
            hello.vm_name, spec.memory_mib, spec.extra_cmdline, net, definition
        )
        # The same capabilities as the source: QEMU expects both ends to agree.
        qemu.set_migration_capabilities(
            {
                "pause-before-switchover": True,
                "multifd": spec.multifd_channels > 0,
                "xbzrle": spec.xbzrle,
                "events": True,
            }
        )
        if spec.postcopy:  # post-copy hook: QEMU checks userfaultfd here
            postcopy.enable_on_destination(qemu)
        if spec.multifd_channels:
            qemu.set_migration_parameters({"multifd-channels": spec.multifd_channels})
        self._disks.serve(qemu)  # -- storage hook: NBD server and an export per copied disk
        return qemu

    def _start_qemu_direct(self, spec: GuestSpec, host: str, data: socket.socket) -> int:
        s, hello = self._session, self._session.hello
        qemu = self._start_qemu(spec)
        port, plan = self._transport.listen(
            DirectDestination(
                identity=s.context.identity,
                migration_id=hello.migration_id,
                host=s.config.name,
                peer=hello.source_host,
                channel=s.channel,
                nonce_source=hello.nonce,
                nonce_dest=s.nonce,
                listen_address=host,
                source_address=str(data.getpeername()[0]),
                psk=s.psk,
                ipsec=self._ipsec,
                audit=s.audit,
            ),
            qemu,
        )
        self._after_hooks, self._sa = plan.after, plan.sa
        return port

    def _start_qemu_unix(self, spec: GuestSpec, sock_dir: Path, connections: int) -> list[socket.socket]:
        """The destination QEMU listening on a unix socket, and our connections to it, in order.

        QEMU takes the first connection as the main channel and the others as
        multifd channels, so they are made one after the other, main first.
        """
        qemu = self._start_qemu(spec)
        path = sock_dir / "in.sock"
        qemu.migrate_incoming(f"unix:{path}")
        socks: list[socket.socket] = []
        try:
            for _ in range(connections):
                socks.append(self._connect_unix(path))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _connect_unix(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + relay.QEMU_CONNECT_TIMEOUT_S
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise QemuError(
                        f"destination QEMU did not listen on {path} within {relay.QEMU_CONNECT_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.02)
        sock.settimeout(self._session.config.step_timeout_s)
        relay.widen_send_buffer(sock)  # the feeder runs ahead of QEMU instead of taking turns with it
        return sock

    def _wait_incoming_complete(self) -> None:
        """QEMU has the whole stream; wait until it has loaded it (it stays paused: autostart off)."""
        assert self._qemu is not None
        timeout = self._session.config.step_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._qemu.alive():
                raise QemuError(f"destination QEMU exited while loading the stream: {self._qemu.log_tail()}")
            status = self._qemu.query_migrate().get("status", "none")
            if status == "completed" and self._qemu.status() == "paused":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"destination QEMU could not load the stream ({status}): {self._qemu.log_tail()}")
            self._qemu.wait_event(relay.POLL_S)  # QEMU's "completed" event ends the wait at once
        raise QemuError(f"destination QEMU did not finish loading the stream in {timeout:.0f} s")

    def _verify_manifest(self) -> dict[str, object]:
        s = self._session
        digest = relay.combined_digest(self._stream_digests)
        expected = {
            "backend": BACKEND,
            "image_digest": digest,  # checked on the plaintext path too: it costs nothing here
            "stream_bytes": self._stream_bytes,
            "transport": self._transport.name,
        }
        manifest, envelope = verify_manifest(s, expected, "received")
        s.audit_after_promise(Kinds.MIGRATION_DIGEST, image_digest=digest, verified=True, manifest=envelope)
        return manifest
