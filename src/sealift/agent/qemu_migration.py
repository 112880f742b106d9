"""Live migration of a QEMU guest through the sealift channel.

The protocol is the built-in one (docs/architecture.md, "Migration
protocol"): operator order checked on both sides, mutual TLS control
channel, AEAD data stream keyed from the TLS exporter, signed manifest,
"prepared" receipt, the source's durable commit decision, Commit, "running"
receipt. Only the payload differs: QEMU's own migration stream, carried as
OPAQUE records.

Source: QEMU migrates to a unix socket in a private directory; the agent
reads it into the data stream writer. `pause-before-switchover` stops QEMU
after the guest is paused and before the final state leaves; the agent
checks the destination is still there, then lets it go on.

Destination: QEMU starts with `-incoming defer` and autostart off, so it
never runs the guest by itself; the agent feeds it the verified payloads and
`cont`s it only on Commit.

The first OPAQUE record is a small JSON description of the guest (memory,
kernel arguments, network shape, image key, transport, multifd channels) so
that the destination starts an identical machine; it is covered by the
stream digest like every byte after it. The destination answers, once its
QEMU listens, with one sealed record on the data stream's back direction
(keyed dest->source): "ready", and the TCP port of its QEMU for the direct
transports.

Transports (recorded in the report):

    sealift        QEMU's stream as AEAD records on the agents' data stream (default)
    qemu-tls       QEMU's native TLS straight to the destination QEMU, with the hosts'
                   cluster-CA certificates installed as tls-creds-x509 (backends/qemu/direct.py)
    ipsec          QEMU straight to the destination QEMU over TCP inside a per-migration IPsec SA
                   (strongSwan, IKEv2 with a PSK derived per migration from the control channel;
                   ipsec/, "IPsec transport" in docs/architecture.md)
    plain          QEMU straight to the destination QEMU over TCP in clear (--insecure only)
    sealift-plain  the agents' data stream without encryption (--insecure only)

On the direct transports (qemu-tls, ipsec, plain) the agents carry only the guest
description, the ready record and the END record on their data stream; the
control channel still does the whole handover (manifest, prepared receipt,
commit, running receipt), QEMU still stops at pre-switchover until the
source agent has checked the destination, and the source resumes on any
failure. QEMU's multifd (several TCP connections) works only there: the
sealift transport carries QEMU's stream as one stream.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from sealift.agent.authority import Authority
from sealift.agent.config import AgentConfig
from sealift.agent.incoming import DestinationCoordinator, IncomingRefused, check_source_psk, verify_hello
from sealift.agent.documents import DocumentError, DocumentSigner, channel_binding
from sealift.agent.outgoing import MigrationError, ProgressCallback, ProgressEvent, SourceCoordinator
from sealift.agent.qemu_relay import (
    MAX_EXTRA_STREAMS,
    QEMU_CONNECT_TIMEOUT_S,
    Ready,
    SourcePump,
    SourcePumps,
    StreamDigest,
    StreamFeeder,
    combined_digest,
    feed_qemu,
    read_record,
    send_opaque,
    stream_label,
    widen_send_buffer,
)
from sealift.agent.qemu_vms import QemuVmRegistry, network_like
from sealift.agent.store import IN_DOUBT, SOURCE_OPEN_PHASES, AgentStore, MigrationRecord
from sealift.agent.transport import ControlChannel, DataSessions, open_data_stream
from sealift.agent.vms import AdmissionError, VmRegistry
from sealift.backends.qemu.direct import (
    Hook,
    QemuTls,
    TlsMaterial,
    incoming_port,
    listen_direct,
    run_after_hooks,
    start_direct,
    tcp_uri,
)
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.qmp import last_event_time
from sealift.backends.qemu.vm import QemuError, QemuVM
from sealift.engine.options import MigrationOptions
from sealift.ipsec.charon import CharonError, HostCharon
from sealift.ipsec.sa_key import ipsec_key_id, psk_for_migration
from sealift.ipsec.tunnel import IpsecEndpoint, IpsecError, SaRecord, TunnelHost, migration_endpoint, wait_tcp_closed
from sealift.engine.report import MigrationReport, RoundReport
from sealift.security.audit import Kinds
from sealift.security.identity import HostIdentity
from sealift.security.keys import channel_secret, derive_session_keys
from sealift.security.psk import PskSession
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Abort, Accept, Hello, Manifest
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection

log = logging.getLogger(__name__)

MiB = 1 << 20
PAGE = 4096
UNCAPPED_BPS = 8 << 30  # QEMU's default max-bandwidth (128 MiB/s) would be the bottleneck
SA_CLOSE_WAIT_S = 2.0  # at most this long for QEMU's TCP connection to close before its SA goes
POLL_S = 0.02  # query-migrate period: also the precision of the pre-switchover stop
TRANSPORTS = ("sealift", "qemu-tls", "ipsec", "plain", "sealift-plain")
SECURE_TRANSPORTS = ("sealift", "qemu-tls", "ipsec")  # the others need --insecure and allow_insecure on both agents
DIRECT_TRANSPORTS = ("qemu-tls", "ipsec", "plain")  # QEMU's own TCP connection(s) to the destination QEMU


def _private_dir(prefix: str) -> Path:
    """A mode 0700 directory with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _protections(channel: ControlChannel, secure: bool, nonce_s: bytes, nonce_d: bytes,
                 migration_id: str) -> tuple[RecordProtection, RecordProtection]:  # fmt: skip
    """(source -> destination, destination -> source) protection of the data stream."""
    if not secure:
        return NoProtection(), NoProtection()
    secret = channel_secret(channel.stream, nonce_s, nonce_d, migration_id)  # type: ignore[arg-type]
    keys = derive_session_keys(secret, nonce_s, nonce_d, migration_id)
    return (AeadProtection(keys.source_to_dest_key, keys.source_to_dest_iv),
            AeadProtection(keys.dest_to_source_key, keys.dest_to_source_iv))  # fmt: skip


def _tls_material(identity: HostIdentity | None) -> TlsMaterial:
    """This host's certificate and key and the cluster CA, read now (a renewed certificate is used at once)."""
    if identity is None:
        raise MigrationError("the qemu-tls transport needs this host's identity (certificate and key)")
    return TlsMaterial.from_files(identity.ca_path, identity.cert_path, identity.key_path)


def check_transport(transport: str, options: MigrationOptions) -> None:
    """Whether a transport fits the options (both agents check it); ValueError with the reason."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} for a QEMU guest; use one of {TRANSPORTS}")
    if transport in SECURE_TRANSPORTS and not options.secure:
        raise ValueError(f"the {transport!r} transport is the secure one: drop --insecure, or use 'plain'")
    if transport not in SECURE_TRANSPORTS and options.secure:
        raise ValueError(f"the {transport!r} transport carries guest memory in clear: it needs --insecure")
    if options.multifd_channels > MAX_EXTRA_STREAMS and transport not in DIRECT_TRANSPORTS:
        raise ValueError(f"the {transport!r} transport carries at most {MAX_EXTRA_STREAMS} multifd channels, "
                         f"not {options.multifd_channels}")  # fmt: skip


def check_ipsec_addresses(local: str | None, peer: str) -> None:
    """The ipsec transport needs two hosts: an SA between an address and itself (loopback) means nothing,
    and two charons in one network namespace would fight over its IKE ports and routing rules."""
    if ipaddress.ip_address(peer).is_loopback or peer == local:
        raise IpsecError(f"the 'ipsec' transport needs the two hosts on distinct, non-loopback migration "
                         f"addresses (the peer is at {peer})")  # fmt: skip


def running_charon(ipsec: HostCharon | None) -> None:
    """Can this agent run strongSwan's charon for the ipsec transport? IpsecError with the reason if not."""
    if ipsec is None:
        raise IpsecError("this agent has no IPsec support (no strongSwan charon configured)")
    try:
        ipsec.get()
    except (CharonError, OSError, subprocess.SubprocessError) as exc:
        raise IpsecError(f"cannot run strongSwan's charon on this host: {exc}") from exc


class AuditedSa:
    """One agent's end of the ipsec transport's SA for one migration, with its audit entries.

    The PSK is derived here from the control channel and the pair's dynamic
    PSK, if one is provisioned (psk_for_migration),
    handed to charon and dropped; the audit log gets the SA's SPIs, backend,
    cipher, key id, PSK generation and fingerprint, never the key.
    """

    def __init__(self, endpoint: IpsecEndpoint, audit: Callable[..., None], port: int | None = None) -> None:
        self.endpoint = endpoint
        self.port = port  # the destination QEMU's port: QEMU's connection must be closed before the SA goes
        self.record: SaRecord | None = None
        self._audit = audit
        self._closed = False

    @classmethod
    def derive(cls, ipsec: HostCharon | None, *, role: str, migration_id: str, channel: ControlChannel,
               nonce_source: bytes, nonce_dest: bytes, local: TunnelHost, remote: TunnelHost, port: int,
               psk_session: PskSession | None, audit: Callable[..., None]) -> "AuditedSa":  # fmt: skip
        running_charon(ipsec)
        assert ipsec is not None
        # The pair's dynamic PSK at the epoch both proofs agreed on (if one is provisioned) and this
        # connection's TLS exporter: a new key for every migration, even when the epoch did not move.
        psk, epoch = psk_for_migration(channel.stream, migration_id, nonce_source, nonce_dest,  # type: ignore[arg-type]
                                       psk_session)  # fmt: skip
        endpoint = migration_endpoint(ipsec.get(), role=role, migration_id=migration_id, local=local, remote=remote,
                                      port=port, psk=psk, key_id=ipsec_key_id(migration_id, epoch),
                                      psk_generation=f"epoch {epoch}")  # fmt: skip
        return cls(endpoint, audit, port)

    def note_installed(self) -> SaRecord | None:
        """Audit the SA once it is installed here; its record (None while it is not up)."""
        if self.record is None:
            child = self.endpoint.installed_child()
            if child is not None:
                self.record = self.endpoint.record(child)
                self._audit("ipsec.sa_up", **self.record.as_dict())
        return self.record

    def bring_up(self, timeout_s: float) -> SaRecord:
        """Source: load, initiate, wait until installed."""
        self.endpoint.prepare()
        self.endpoint.initiate(timeout_s=timeout_s)
        self.endpoint.wait_installed(timeout_s=timeout_s)
        record = self.note_installed()
        if record is None:
            raise IpsecError(f"the SA {self.endpoint.end.name} went away right after it came up")
        return record

    def close(self) -> None:
        """Terminate the SA, unload connection and PSK, check nothing is left (idempotent); audited."""
        if self._closed:
            return
        self._closed = True
        if self.port is not None and not wait_tcp_closed(self.port, SA_CLOSE_WAIT_S):
            log.warning("QEMU's connection on port %d still open %.0f s after the migration; closing the SA anyway",
                        self.port, SA_CLOSE_WAIT_S)  # fmt: skip
        fields: dict[str, object] = {
            "name": self.endpoint.end.name, "key_id": self.endpoint.key_id,
            "psk_generation": self.endpoint.psk_generation, "psk_fingerprint": self.endpoint.psk_fingerprint,
            "spi_in": self.record.spi_in if self.record else None,
            "spi_out": self.record.spi_out if self.record else None,
        }  # fmt: skip
        try:
            self.endpoint.close()
        except IpsecError as exc:
            self._audit("ipsec.sa_down", **fields, clean=False, error=str(exc))
            raise
        self._audit("ipsec.sa_down", **fields, clean=True)


def _free_port(host: str) -> int:
    """A free TCP port on `host`: the ipsec transport protects the port before QEMU listens on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class GuestSpec:
    """What the destination needs to start a QEMU identical to the source's."""

    memory_mib: int
    extra_cmdline: str
    net: dict[str, object]
    image_key: str
    transport: str | None = None  # None: a source from before the transport choice ("sealift"[-plain])
    multifd_channels: int = 0  # QEMU's multifd must be set the same on both ends
    xbzrle: bool = False

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "GuestSpec":
        try:
            raw = json.loads(data)
            transport = raw.get("transport")
            return cls(int(raw["memory_mib"]), str(raw["extra_cmdline"]), dict(raw["net"]), str(raw["image_key"]),
                       None if transport is None else str(transport), int(raw.get("multifd_channels", 0)),
                       bool(raw.get("xbzrle", False)))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"the guest description at the head of the QEMU stream is malformed: {exc}") from None


# =============================================================================
# Source
# =============================================================================


@dataclass
class _Transfer:
    paused_at: float
    stream_bytes: int
    digest: str
    qemu: dict[str, object]
    wire_bytes: int
    rounds: int


class QemuOutgoingMigration(SourceCoordinator):
    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        qemu_vms: QemuVmRegistry,
        vm_name: str,
        destination: str,
        options: MigrationOptions,
        authority: Authority,
        order: str | None,
        progress: ProgressCallback | None = None,
        transport: str = "sealift",
        ipsec: HostCharon | None = None,
    ) -> None:
        check_transport(transport, options)
        self._ipsec = ipsec  # the host's charon (transport "ipsec")
        self._sa: AuditedSa | None = None
        self._accept_nonce: bytes | None = None
        self._channel: ControlChannel | None = None
        self._psk: PskSession | None = None  # the pair's second factor, when a PSK is provisioned
        self._psk_binding = b""
        self._config = config
        self._identity = identity
        self._store = store
        self._vms = qemu_vms
        self._vm_name = vm_name
        self._destination = destination
        self._options = options
        self._authority = authority
        self._order = order
        self._progress = progress or (lambda event: None)
        self._signer = DocumentSigner(config.name, identity if options.secure else None)
        self._transport = transport
        self.migration_id = secrets.token_hex(16)
        self.report = MigrationReport(
            migration_id=self.migration_id, vm=vm_name, source=config.name, destination=destination,
            transport=self._transport,
        )  # fmt: skip
        self._binding: str | None = None
        self._nonce = secrets.token_bytes(32)
        self._pump: SourcePumps | None = None
        self._digest = StreamDigest(0)  # replaced once the data stream's protection is known (_transfer)
        self._after_hooks: list[Hook] = []  # direct transports: clean-up once QEMU's migration is over

    IN_DOUBT_PHASE = IN_DOUBT
    START_AUDIT = {"backend": "qemu"}

    # -- steps --------------------------------------------------------------------

    def _preflight(self, address: tuple[str, int]) -> None:
        if self._transport == "ipsec":
            try:
                check_ipsec_addresses(None, address[0])
                running_charon(self._ipsec)
            except IpsecError as exc:
                raise MigrationError(str(exc)) from exc

    def _claim(self) -> tuple[QemuVM, int]:
        vm = self._vms.claim(self._vm_name)
        return vm, vm.memory_mib * MiB

    def _describe(self, vm: QemuVM, psk_proof: bytes | None) -> Hello:
        return Hello(
            migration_id=self.migration_id, vm_name=vm.name, source_host=self._config.name,
            destination_host=self._destination, nonce=self._nonce, memory_bytes=vm.memory_mib * MiB, page_size=PAGE,
            secure=self._options.secure, compression=None, streams=1, backend="qemu", order=self._order,
            psk_proof=psk_proof, image_digest=None,
        )  # fmt: skip

    def _cleanup(self, vm: QemuVM) -> None:
        if self._pump is not None:
            self._pump.stop()
        run_after_hooks(vm, self._after_hooks)  # after _abort: QEMU's migration has ended either way
        if self._sa is not None:
            try:
                self._sa.close()  # normally done by the after hook; this covers a failure before it was set
            except IpsecError as exc:
                log.error("IPsec tear-down of migration %s: %s", self.migration_id, exc)

    def _configure(self, vm: QemuVM) -> None:
        options = self._options
        capabilities = {  # pause-before-switchover: our chance to check the destination before the switchover
            "pause-before-switchover": True, "auto-converge": options.auto_converge,
            "multifd": options.multifd_channels > 0, "xbzrle": options.xbzrle,
            "events": True,  # MIGRATION events wake _follow at pre-switchover instead of its next poll
        }  # fmt: skip
        vm.set_migration_capabilities(capabilities)  # all of them: a VM migrated before may have others set
        parameters: dict[str, object] = {
            "max-bandwidth": options.bandwidth_limit_bps or UNCAPPED_BPS,
            "downtime-limit": options.downtime_limit_ms,
        }
        if options.multifd_channels:
            parameters["multifd-channels"] = options.multifd_channels
        if options.xbzrle and options.xbzrle_cache_bytes:
            parameters["xbzrle-cache-size"] = options.xbzrle_cache_bytes
        vm.set_migration_parameters(parameters)

    def _transfer(self, channel: ControlChannel, accept: Accept, address: tuple[str, int], vm: QemuVM) -> _Transfer:
        outgoing, incoming = _protections(channel, self._options.secure, self._nonce, accept.nonce, self.migration_id)
        self._binding = channel_binding(channel, self._nonce, accept.nonce, self.migration_id)
        self._channel, self._accept_nonce = channel, accept.nonce  # the ipsec transport keys its PSK from them
        npages = vm.memory_mib * MiB // PAGE
        writer = DataStreamWriter(outgoing, npages, None)
        self._digest = StreamDigest(outgoing.overhead)
        data = open_data_stream(address, accept.session_id, 0, self._config.step_timeout_s)
        try:
            spec = GuestSpec(vm.memory_mib, self._vms.extra_cmdline(vm.name), vm.net.to_json(), self._vms.image().key,
                             self._transport, self._options.multifd_channels, self._options.xbzrle)  # fmt: skip
            send_opaque(data, writer, spec.encode(), self._digest)
            ready = self._await_destination_ready(channel, data, DataStreamReader(incoming, npages))
            self._configure(vm)
            if self._transport in DIRECT_TRANSPORTS:
                if ready.port is None:
                    raise MigrationError(f"{self._destination} reported no QEMU port for the {self._transport} transport")
                return self._transfer_direct(vm, data, writer, (address[0], ready.port))
            if len(ready.extra_sessions) != self._options.multifd_channels:
                raise MigrationError(f"{self._destination} opened {len(ready.extra_sessions)} streams for "
                                     f"{self._options.multifd_channels} multifd channels")  # fmt: skip
            return self._transfer_through_channel(vm, data, writer, ready.extra_sessions, address)
        finally:
            data.close()

    def _transfer_through_channel(self, vm: QemuVM, data: socket.socket, writer: DataStreamWriter,
                                  extra_sessions: tuple[bytes, ...], address: tuple[str, int]) -> _Transfer:  # fmt: skip
        """QEMU -> unix socket -> OPAQUE records on data streams (the sealift and sealift-plain transports).

        One data stream per QEMU connection: the main channel on the stream
        already open, each multifd channel on one more, keyed on its own.
        """
        # Only multifd needs a listener: QEMU opens those channels itself. The main channel alone goes by fd:.
        sock_dir = _private_dir("sl-qout-") if extra_sessions else None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if extra_sessions else None
        timeout = self._config.step_timeout_s
        pumps = [SourcePump(0, writer, data, timeout, self._digest)]
        extra_sockets: list[socket.socket] = []
        try:
            for index, session in enumerate(extra_sessions, 1):
                outgoing, _ = _protections(self._channel, self._options.secure, self._nonce, self._accept_nonce,
                                           stream_label(self.migration_id, index))  # fmt: skip
                extra_sockets.append(open_data_stream(address, session, index, timeout))
                pumps.append(SourcePump(index, DataStreamWriter(outgoing, vm.memory_mib * MiB // PAGE, None),
                                        extra_sockets[-1], timeout, StreamDigest(outgoing.overhead)))  # fmt: skip
            group = self._pump = self._start_pumps(vm, pumps, listener, sock_dir)
            info, paused_at = self._follow(vm, data, group)
            group.wait(timeout)
            return _Transfer(
                paused_at=paused_at, stream_bytes=group.stream_bytes, digest=group.digest(),
                qemu=_qemu_figures(info), wire_bytes=group.wire_bytes or group.stream_bytes,
                rounds=int(info.get("ram", {}).get("dirty-sync-count", 0)),
            )  # fmt: skip
        finally:
            if listener is not None:
                listener.close()
            for sock in extra_sockets:
                sock.close()
            if sock_dir is not None:
                shutil.rmtree(sock_dir, ignore_errors=True)

    def _start_pumps(self, vm: QemuVM, pumps: list[SourcePump], listener: socket.socket | None,
                     sock_dir: Path | None) -> SourcePumps:  # fmt: skip
        """Start QEMU migrating into the pumps: one socket of ours (``fd:``), or ``unix:`` for multifd.

        Our own socket gets a deep send buffer, so that QEMU writes on while
        the pump seals and sends; QEMU's multifd channels connect by themselves.
        """
        self._phase("precopy")
        if listener is None or sock_dir is None:
            ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            widen_send_buffer(qemus)
            group = SourcePumps(pumps, first=ours)
            group.start()
            try:
                vm.migrate_to_socket(qemus)
            except BaseException:
                group.stop()
                raise
            finally:
                qemus.close()  # QEMU holds its own copy
            return group
        path = sock_dir / "m.sock"
        listener.bind(str(path))
        listener.listen(len(pumps))
        group = SourcePumps(pumps, listener=listener)
        group.start()
        vm.migrate(f"unix:{path}")
        return group

    def _transfer_direct(self, vm: QemuVM, data: socket.socket, writer: DataStreamWriter,
                         destination: tuple[str, int]) -> _Transfer:  # fmt: skip
        """QEMU's own TCP connection(s) straight to the destination QEMU (qemu-tls, ipsec, plain)."""
        before, after = self._direct_hooks(data, destination)
        self._after_hooks = after
        self._phase("precopy")
        start_direct(vm, destination, before)
        info, paused_at = self._follow(vm, data, None)
        data.sendall(writer.end())  # the destination's cue that QEMU's stream is complete
        ram = info.get("ram", {})
        return _Transfer(
            paused_at=paused_at, stream_bytes=0, digest=self._digest.hexdigest(), qemu=_qemu_figures(info),
            wire_bytes=int(ram.get("transferred", 0)), rounds=int(ram.get("dirty-sync-count", 0)),
        )  # fmt: skip

    def _direct_hooks(self, data: socket.socket, destination: tuple[str, int]) -> tuple[list[Hook], list[Hook]]:
        """What the source QEMU needs before and after a direct transport."""
        if self._transport == "qemu-tls":
            tls = QemuTls(_tls_material(self._identity), "client", self._destination, self.migration_id[:8])
            return [tls.install], [tls.remove]
        if self._transport == "ipsec":
            assert self._channel is not None and self._accept_nonce is not None
            # Our migration address is the one we reach the destination agent from; QEMU connects exactly there.
            local = TunnelHost(None, str(data.getsockname()[0]), self._config.name)
            sa = self._sa = AuditedSa.derive(
                self._ipsec, role="source", migration_id=self.migration_id, channel=self._channel,
                nonce_source=self._nonce, nonce_dest=self._accept_nonce, local=local,
                remote=TunnelHost(None, destination[0], self._destination), port=destination[1],
                psk_session=self._psk, audit=self._audit,
            )  # fmt: skip
            timeout = self._config.step_timeout_s

            def bring_up(vm: QemuVM) -> None:
                sa.bring_up(timeout)

            def take_down(vm: QemuVM) -> None:
                sa.close()

            return [bring_up], [take_down]
        return [], []

    def _await_destination_ready(self, channel: ControlChannel, data: socket.socket,
                                 reader: DataStreamReader) -> Ready:  # fmt: skip
        """Start QEMU's migration only once the destination QEMU listens (its port on a direct transport,
        its extra data streams for multifd on the channel).

        A source QEMU whose stream stalls for its first few hundred ms (the
        destination still starting its QEMU) sometimes produced a stream the
        destination guest crashed on (QEMU 7.2, TCG; ~1 run in 5 in the tests).
        The ready record is sealed with the destination -> source key, so the
        port in it comes from the authenticated destination agent.
        """
        data.settimeout(self._config.step_timeout_s)
        try:
            event = read_record(data, reader)
        except (OSError, ConnectionError, ProtocolError) as exc:
            reason = self._peer_abort_reason(channel)
            if reason is not None:
                raise MigrationError(f"{self._destination} aborted: {reason}") from None
            if isinstance(exc, socket.timeout):
                raise MigrationError(f"{self._destination} did not start its QEMU within "
                                     f"{self._config.step_timeout_s:.0f} s") from None  # fmt: skip
            raise MigrationError(f"{self._destination} closed the data stream before its QEMU was ready: {exc}") from exc
        if not isinstance(event, OpaqueReceived):
            raise MigrationError(f"{self._destination} sent {type(event).__name__} instead of its ready record")
        return Ready.decode(bytes(event.data))

    def _peer_abort_reason(self, channel: ControlChannel) -> str | None:
        """The destination's Abort, if it sent one (it says why it gave up), within a second."""
        try:
            reply = channel.recv(1.0)
        except (OSError, TimeoutError, ConnectionError, ProtocolError):
            return None
        return reply.reason if isinstance(reply, Abort) else None

    def _follow(self, vm: QemuVM, data: socket.socket, pump: SourcePumps | None) -> tuple[dict[str, Any], float]:
        """Poll QEMU until the migration completes; handle the pre-switchover stop."""
        paused_at: float | None = None
        last_bytes, last_progress = -1, time.monotonic()
        last_sync = 0
        round_started = followed_since = time.monotonic()
        while True:
            if pump is not None and pump.error is not None:
                raise MigrationError(f"the data stream to {self._destination} failed: {pump.error}")
            info = vm.query_migrate()
            status = info.get("status", "none")
            ram = info.get("ram", {})
            if status in ("failed", "cancelled"):
                raise MigrationError(f"QEMU reported the migration {status}: {info.get('error-desc', 'no reason given')}")
            if paused_at is None and status in ("setup", "active"):
                self._check_completion_timeout(time.monotonic() - followed_since, ram)
            if status == "pre-switchover" and paused_at is None:  # once: QEMU leaves the state asynchronously
                paused_at = _stop_time(vm, time.monotonic())
                self.report.counter_at_pause = vm.counter()
                self._phase("stop-and-copy")
                self._check_destination(data)
                vm.migrate_continue("pre-switchover")
                self._mark("switchover_check", paused_at)  # how much of QEMU's downtime our check holds it
            elif status == "completed":
                if paused_at is None:  # too quick to see pre-switchover: take QEMU's stop event
                    paused_at = _stop_time(vm, time.monotonic())
                return _final_figures(vm, info), paused_at
            sync = int(ram.get("dirty-sync-count", 0))
            if sync > last_sync:
                self._on_round(last_sync, ram, round_started)
                last_sync, round_started = sync, time.monotonic()
            transferred = int(ram.get("transferred", 0))
            if transferred != last_bytes:
                last_bytes, last_progress = transferred, time.monotonic()
                self._progress(ProgressEvent("transfer", {
                    "round": sync, "pages_done": min(transferred // PAGE, vm.memory_mib * MiB // PAGE),
                    "pages_total": vm.memory_mib * MiB // PAGE,
                    "wire_bytes": pump.stream_bytes if pump is not None else transferred,
                }))  # fmt: skip
            elif time.monotonic() - last_progress > self._config.step_timeout_s:
                raise MigrationError(f"QEMU's migration made no progress for {self._config.step_timeout_s:.0f} s ({status})")
            vm.wait_event(POLL_S)  # QEMU's MIGRATION events (pre-switchover, completed) end the wait at once

    def _check_completion_timeout(self, elapsed_s: float, ram: dict[str, Any]) -> None:
        """Before the switchover only: past it the guest is already stopped and giving up gains nothing."""
        limit = self._options.completion_timeout_s
        if limit is None or elapsed_s <= limit:
            return
        dirty_mib_s = float(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", PAGE)) / MiB
        link_mib_s = float(ram.get("mbps", 0.0)) * 1e6 / 8 / MiB
        raise MigrationError(f"pre-copy did not reach its switchover within the completion timeout of {limit:g} s "
                             f"({int(ram.get('dirty-sync-count', 0))} passes; the guest dirties {dirty_mib_s:.1f} "
                             f"MiB/s, the link carries {link_mib_s:.1f} MiB/s)")  # fmt: skip

    def _check_destination(self, data: socket.socket) -> None:
        """At pre-switchover: is the destination still there? It never writes on the data stream,
        so anything readable there means it closed or reset the connection."""
        readable, _, _ = select.select([data], [], [], 0)
        if not readable:
            return  # nothing to read: the connection is open
        try:
            peek = data.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            raise MigrationError(f"{self._destination} is gone before the switchover: {exc}") from exc
        raise MigrationError(f"{self._destination} closed the data stream before the switchover ({peek!r})")

    def _manifest_fields(self, transfer: _Transfer) -> tuple[dict[str, object], dict[str, object]]:
        fields = {"backend": "qemu", "image_digest": transfer.digest, "state_digest": None,
                  "stream_bytes": transfer.stream_bytes, "transport": self._transport, "qemu": transfer.qemu}  # fmt: skip
        return fields, {"image_digest": transfer.digest, "stream_bytes": transfer.stream_bytes}

    def _resume_source(self, vm: QemuVM) -> bool:
        if self._pump is not None:
            # A QEMU stuck writing its final state to a stream nobody reads holds its big lock (QMP
            # does not answer) until that connection breaks: break it first, then QEMU fails and answers.
            self._pump.stop()
        try:
            return resume_source(vm)
        except QemuError as error:
            log.error("could not resume %s after the failed migration: %s", vm.name, error)
            return False

    # -- reporting -----------------------------------------------------------------

    def _on_round(self, index: int, ram: dict[str, Any], started: float) -> None:
        duration = max(1e-6, time.monotonic() - started)
        sent = int(ram.get("transferred", 0))
        report = RoundReport(
            round=index, pages_sent=int(ram.get("normal", 0)), bytes_sent=sent, duration_s=round(duration, 3),
            dirty_pages_left=int(ram.get("remaining", 0)) // PAGE,
            throughput_mib_s=round(float(ram.get("mbps", 0.0)) / 8.0, 1), decision="continue", reason="qemu dirty sync",
        )  # fmt: skip
        self.report.round_reports.append(report)
        self._progress(ProgressEvent("round", report.to_dict()))

    def _fill_report(self, transfer: _Transfer) -> None:
        report = self.report
        report.rounds = transfer.rounds
        report.pages_sent = int(transfer.qemu.get("ram_normal_pages", 0))  # type: ignore[arg-type]
        report.bytes_sent = transfer.wire_bytes
        report.image_digest = transfer.digest
        report.stop_reason = (f"qemu: total {transfer.qemu.get('total_time_ms')} ms, downtime "
                              f"{transfer.qemu.get('downtime_ms')} ms" + self._feature_note())  # fmt: skip

    def _feature_note(self) -> str:
        options = self._options
        notes = [f"multifd {options.multifd_channels} channels"] if options.multifd_channels else []
        notes += ["xbzrle"] if options.xbzrle else []
        notes += ["auto-converge"] if options.auto_converge else []
        if self._sa is not None and self._sa.record is not None:
            record = self._sa.record
            notes.append(f"ipsec backend {record.backend}, {record.encryption}, {record.dh_group}")
        return "".join(f"; {note}" for note in notes)


def resume_source(vm: QemuVM, timeout: float = 15.0) -> bool:
    """Get the source guest running again after a failed migration; True if it runs."""
    if not vm.alive():
        return False
    status = vm.query_migrate().get("status", "none")
    if status in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
        # QEMU waiting at pre-switchover never notices a dead link by itself.
        vm.migrate_cancel()
        try:
            vm.wait_migration({"cancelled", "failed", "completed"}, timeout=timeout)
        except QemuError:
            pass  # "cancelled" raises in wait_migration when not awaited; either way it ended
    deadline = time.monotonic() + timeout
    while vm.status() in ("finish-migrate", "inmigrate") and time.monotonic() < deadline:
        time.sleep(0.05)
    if vm.status() != "running":
        vm.resume()  # from paused or postmigrate: QEMU allows cont on both
    return vm.status() == "running"


def recover_after_restart(store: AgentStore, qemu_vms: QemuVmRegistry) -> set[str]:
    """Before the agent's general recovery: settle QEMU guests a crash caught mid-migration.

    A source without a durable commit decision resumes its guest (QEMU waiting
    at pre-switchover would otherwise stay paused for ever); a destination that
    had not yet promised ("receiving") discards its QEMU. Undecided handovers
    (the source committed, or the destination prepared) keep their paused guest
    held for the resolver, which asks the peer. Returns the migrations settled
    or held here, which the built-in recovery must leave alone.
    """
    handled: set[str] = set()
    for record in store.migrations(limit=1000, phases=SOURCE_OPEN_PHASES + ("receiving", "prepared", "committed", IN_DOUBT)):
        if not qemu_vms.has(record.vm):
            continue
        handled.add(record.id)
        try:
            _recover_one(store, qemu_vms, record)
        except QemuError as exc:
            log.error("recovery: QEMU guest %s: %s", record.vm, exc)
    return handled


def _recover_one(store: AgentStore, qemu_vms: QemuVmRegistry, record: MigrationRecord) -> None:
    if record.role == "source" and record.phase in SOURCE_OPEN_PHASES:
        resumed = resume_source(qemu_vms.get(record.vm))
        store.decide(record.id, "aborted")
        store.set_phase(record.id, "aborted", error="source agent restarted before commit")
        log.warning("recovery: QEMU guest %s %s after the interrupted migration %s", record.vm,
                    "resumed" if resumed else "could NOT be resumed", record.id)  # fmt: skip
    elif record.role == "destination" and record.phase == "receiving":
        qemu_vms.release_migrated(record.vm)  # never promised: the source still has the guest
        store.set_phase(record.id, "aborted", error="destination agent restarted while receiving")
        log.warning("recovery: discarded the half-received QEMU guest %s (%s)", record.vm, record.id)
    else:
        qemu_vms.claim(record.vm)  # paused and undecided: held until the resolver settles it
        log.warning("recovery: QEMU migration %s of %s is %s (%s); held for the resolver", record.id, record.vm,
                    record.phase, record.role)  # fmt: skip


def _stop_time(vm: QemuVM, fallback: float) -> float:
    """When the guest stopped (QEMU's STOP event), on our monotonic clock."""
    wall = last_event_time(vm.recent_events(), "STOP")
    if wall is None:
        return fallback
    age = time.time() - wall
    return time.monotonic() - age if 0 <= age < 60 else fallback


def _final_figures(vm: QemuVM, info: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """query-migrate once QEMU has filled in its totals.

    QEMU 7.2 reports "completed" a moment before it computes total-time and
    downtime (they read 0 until then).
    """
    deadline = time.monotonic() + timeout
    while not info.get("total-time") and time.monotonic() < deadline:
        time.sleep(POLL_S)
        info = vm.query_migrate()
    return info


def _qemu_figures(info: dict[str, Any]) -> dict[str, object]:
    ram = info.get("ram", {})
    return {
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_time_ms": info.get("setup-time"),
        "ram_transferred": ram.get("transferred"),
        "ram_total": ram.get("total"),
        "ram_normal_pages": ram.get("normal"),
        "ram_duplicate_pages": ram.get("duplicate"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
    }


# =============================================================================
# Destination
# =============================================================================


class QemuIncomingRefused(IncomingRefused):
    """We will not take this QEMU guest; the reason goes back to the source."""


class QemuIncomingMigration(DestinationCoordinator):
    """A QEMU guest: QEMU started with -incoming defer and autostart off, `cont` on Commit."""

    KIND = "QEMU "
    ACCEPT_AUDIT = {"backend": "qemu"}

    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        vms: VmRegistry,
        qemu_vms: QemuVmRegistry,
        sessions: DataSessions,
        channel: ControlChannel,
        hello: Hello,
        authority: Authority,
        ipsec: HostCharon | None = None,
    ) -> None:
        super().__init__(config, identity, store, vms, sessions, channel, hello, authority)
        self._ipsec = ipsec  # the host's charon (transport "ipsec")
        self._sa: AuditedSa | None = None
        self._qemu_vms = qemu_vms
        self._qemu: QemuVM | None = None
        self._digest = StreamDigest(0)  # replaced once the data stream's protection is known (_receive)
        self._stream_digests = [self._digest]  # the main stream's, then each multifd stream's
        self._stream_bytes = 0
        self._transport = "sealift"
        self._after_hooks: list[Hook] = []
        self._identity = identity

    # -- steps ----------------------------------------------------------------------

    def _take_stream(self) -> dict:
        self._receive()
        self._wait_incoming_complete()
        run_after_hooks(self._qemu, self._after_hooks)  # type: ignore[arg-type]
        return self._verify_manifest()

    def _hold_in_doubt(self, exc: BaseException) -> None:
        """Keep the paused guest, registered and held (busy), for the resolver."""
        hello = self._hello
        log.warning("QEMU migration %s in doubt after prepare (%s): %s kept paused; asking %s",
                    hello.migration_id, exc, hello.vm_name, hello.source_host)  # fmt: skip
        self._store.set_phase(hello.migration_id, IN_DOUBT, error=str(exc))
        if self._qemu is not None:
            self._qemu_vms.hold_in_doubt(self._qemu)

    def _release(self, prepared: bool) -> None:
        self._close_sa()
        self._vms.unreserve_incoming(self._hello.migration_id, self._hello.vm_name)
        if not prepared or self._qemu is None:
            self._qemu_vms.unreserve_incoming_name(self._hello.vm_name)

    def _admit(self) -> None:
        hello = self._hello
        self._order_id = verify_hello(self._config, self._channel, hello, self._authority).order.id
        if self._channel.secure:
            self._psk, self._psk_binding = check_source_psk(self._authority, self._channel, hello)
        # Capacity, concurrency and name clashes with built-in guests: the built-in registry's admission.
        self._vms.reserve_incoming(hello.migration_id, hello.vm_name, hello.memory_bytes)
        try:
            self._qemu_vms.reserve_incoming_name(hello.vm_name)
        except Exception as exc:
            self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
            raise AdmissionError(str(exc)) from exc

    def _receive(self) -> None:
        hello = self._hello
        incoming, outgoing = _protections(self._channel, hello.secure, hello.nonce, self._nonce, hello.migration_id)
        data = self._sessions.wait(self._session_id, self._config.step_timeout_s)
        try:
            data.settimeout(self._config.step_timeout_s)  # a silent peer is a dead peer
            reader = DataStreamReader(incoming, hello.memory_bytes // PAGE)
            self._digest = StreamDigest(incoming.overhead)
            self._stream_digests = [self._digest]
            first = read_record(data, reader)
            if not isinstance(first, OpaqueReceived):
                raise ProtocolError(f"the QEMU stream began with {type(first).__name__}, not the guest description")
            self._digest.update(first.data, reader.last_tag)
            spec = GuestSpec.decode(bytes(first.data))
            self._transport = self._check_transport(spec, data)
            ready = DataStreamWriter(outgoing, hello.memory_bytes // PAGE, None)
            if self._transport in DIRECT_TRANSPORTS:
                port = self._start_qemu_direct(spec, self._migration_host(data), data)
                send_opaque(data, ready, Ready(port).encode())
                self._await_direct_end(data, reader)
            else:
                self._receive_through_channel(spec, data, reader, ready)
        finally:
            data.close()

    def _check_transport(self, spec: GuestSpec, data: socket.socket) -> str:
        """The transport the source chose, if this host allows it (the source checked the same)."""
        hello = self._hello
        transport = spec.transport or ("sealift" if hello.secure else "sealift-plain")
        if transport not in SECURE_TRANSPORTS and not self._config.allow_insecure:
            raise QemuIncomingRefused(f"the {transport!r} transport is disabled on this host (allow_insecure = false)")
        options = MigrationOptions(secure=hello.secure, multifd_channels=spec.multifd_channels)
        try:
            check_transport(transport, options)
        except ValueError as exc:
            raise QemuIncomingRefused(str(exc)) from None
        if transport in SECURE_TRANSPORTS and not self._channel.secure:
            raise QemuIncomingRefused(f"the {transport!r} transport needs the authenticated control channel")
        if transport == "ipsec":
            try:
                check_ipsec_addresses(self._migration_host(data), str(data.getpeername()[0]))
                running_charon(self._ipsec)
            except IpsecError as exc:
                raise QemuIncomingRefused(f"the 'ipsec' transport is not available on {self._config.name}: {exc}") from None
        return transport

    def _migration_host(self, data: socket.socket) -> str:
        """Where this host's QEMU listens: the agent's own listen address, never a wildcard.

        An agent bound to a wildcard uses the local address its peer reached
        it on (that of the data stream's connection).
        """
        host = self._config.listen[0]
        if host in ("", "0.0.0.0", "::"):
            host = str(data.getsockname()[0])
        return host

    def _receive_through_channel(self, spec: GuestSpec, data: socket.socket, reader: DataStreamReader,
                                 ready: DataStreamWriter) -> None:  # fmt: skip
        """The sealift transports: QEMU's stream arrives as OPAQUE records; feed it to QEMU's unix socket.

        With multifd, each channel has a data stream of its own (announced in
        the ready record) and a feeder thread into its own QEMU connection.
        """
        hello = self._hello
        timeout = self._config.step_timeout_s
        sock_dir = _private_dir("sl-qin-")
        qemu_socks: list[socket.socket] = []
        extra_sessions = tuple(secrets.token_bytes(16) for _ in range(spec.multifd_channels))
        feeders: list[StreamFeeder] = []
        try:
            qemu_socks = self._start_qemu_unix(spec, sock_dir, 1 + len(extra_sessions))
            for index, session in enumerate(extra_sessions, 1):
                incoming, _ = _protections(self._channel, hello.secure, hello.nonce, self._nonce,
                                           stream_label(hello.migration_id, index))  # fmt: skip
                self._sessions.expect(session)
                feeders.append(StreamFeeder(index, functools.partial(self._sessions.wait, session, timeout),
                                            DataStreamReader(incoming, hello.memory_bytes // PAGE), qemu_socks[index],
                                            StreamDigest(incoming.overhead), data, timeout))  # fmt: skip
            send_opaque(data, ready, Ready(None, extra_sessions).encode())
            for feeder in feeders:
                feeder.start()
            try:
                self._stream_bytes += feed_qemu(data, reader, qemu_socks[0], self._digest)
            except (OSError, ProtocolError) as exc:
                failed = next((f for f in feeders if f.error is not None), None)
                if failed is not None:  # it broke the main stream: its error is the cause
                    raise MigrationError(f"multifd stream {failed.index} failed: {failed.error}") from exc
                raise
            for feeder in feeders:
                feeder.join(timeout)
                self._stream_bytes += feeder.stream_bytes
            self._stream_digests += [feeder.digest for feeder in feeders]
        finally:
            for sock in qemu_socks:
                sock.close()
            for session in extra_sessions:
                self._sessions.cancel(session)
            shutil.rmtree(sock_dir, ignore_errors=True)

    def _await_direct_end(self, data: socket.socket, reader: DataStreamReader) -> None:
        """Direct transports: QEMU's stream comes by its own connection; wait for the source's END.

        The data stream stays silent while QEMU migrates, however long that
        takes: TCP keepalive finds a source host that died; our QEMU failing
        ends the wait at once.
        """
        assert self._qemu is not None
        idle = max(1, int(self._config.step_timeout_s / 3))
        data.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        while True:
            if self._sa is not None:
                self._sa.note_installed()  # audited here as soon as the source brought it up
            readable, _, _ = select.select([data], [], [], 0.2)
            if readable:
                event = read_record(data, reader)
                if not isinstance(event, StreamEnded):
                    raise ProtocolError(f"unexpected {type(event).__name__} on a direct transport's data stream")
                reader.close()
                if self._sa is not None and self._sa.note_installed() is None:
                    # The inbound filter admits the stream only through the SA: never seen up means something is wrong.
                    raise IpsecError("the source says the QEMU stream is complete, but no IPsec SA was ever installed here")
                return
            if not self._qemu.alive():
                raise QemuError(f"destination QEMU exited during the incoming migration: {self._qemu.log_tail()}")
            status = self._qemu.query_migrate().get("status", "none")
            if status in ("failed", "cancelled"):
                raise QemuError(f"destination QEMU's incoming migration {status}: {self._qemu.log_tail()}")

    def _start_qemu(self, spec: GuestSpec) -> QemuVM:
        hello = self._hello
        if spec.memory_mib * MiB != hello.memory_bytes:
            raise ProtocolError(f"the guest description says {spec.memory_mib} MiB, the Hello {hello.memory_bytes} bytes")
        image = self._qemu_vms.image()
        if spec.image_key != image.key:
            raise QemuIncomingRefused(
                f"the source booted guest image {spec.image_key[:16]}, this host has {image.key[:16]}: "
                f"run `sealift image build` on both hosts from the same inputs"
            )
        net = network_like(NetConfig.from_json(spec.net))
        qemu = self._qemu = self._qemu_vms.start_incoming(hello.vm_name, spec.memory_mib, spec.extra_cmdline, net)
        # The same capabilities as the source: QEMU expects both ends to agree.
        qemu.set_migration_capabilities({"pause-before-switchover": True, "multifd": spec.multifd_channels > 0,
                                         "xbzrle": spec.xbzrle, "events": True})  # fmt: skip
        if spec.multifd_channels:
            qemu.set_migration_parameters({"multifd-channels": spec.multifd_channels})
        return qemu

    def _start_qemu_direct(self, spec: GuestSpec, host: str, data: socket.socket) -> int:
        qemu = self._start_qemu(spec)
        if self._transport == "ipsec":
            return self._listen_ipsec(qemu, host, str(data.getpeername()[0]))
        before: list[Hook] = []
        if self._transport == "qemu-tls":
            tls = QemuTls(_tls_material(self._identity), "server", self._hello.source_host,
                          self._hello.migration_id[:8])  # fmt: skip
            before, self._after_hooks = [tls.install], [tls.remove]
        return listen_direct(qemu, host, before)

    def _listen_ipsec(self, qemu: QemuVM, host: str, source_address: str) -> int:
        """The ipsec transport: the SA's connection, PSK, rules and inbound filter first, then QEMU listens.

        The port is chosen before QEMU listens, so that it is never open
        outside the SA; the source initiates once it has the ready record.
        """
        hello = self._hello
        port = _free_port(host)
        sa = self._sa = AuditedSa.derive(
            self._ipsec, role="destination", migration_id=hello.migration_id, channel=self._channel,
            nonce_source=hello.nonce, nonce_dest=self._nonce, local=TunnelHost(None, host, self._config.name),
            remote=TunnelHost(None, source_address, hello.source_host), port=port, psk_session=self._psk,
            audit=self._audit,
        )  # fmt: skip
        sa.endpoint.prepare()
        self._after_hooks = [lambda vm: self._close_sa()]
        qemu.migrate_incoming(tcp_uri(host, port))
        listening = incoming_port(qemu)
        if listening != port:
            raise QemuError(f"destination QEMU listens on port {listening}, not the SA's port {port}")
        return port

    def _close_sa(self) -> None:
        if self._sa is not None:
            try:
                self._sa.close()
            except IpsecError as exc:
                log.error("IPsec tear-down of migration %s: %s", self._hello.migration_id, exc)

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
        deadline = time.monotonic() + QEMU_CONNECT_TIMEOUT_S
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise QemuError(f"destination QEMU did not listen on {path} within {QEMU_CONNECT_TIMEOUT_S:.0f} s")
                time.sleep(0.02)
        sock.settimeout(self._config.step_timeout_s)
        widen_send_buffer(sock)  # the feeder runs ahead of QEMU instead of taking turns with it
        return sock

    def _wait_incoming_complete(self) -> None:
        """QEMU has the whole stream; wait until it has loaded it (it stays paused: autostart off)."""
        assert self._qemu is not None
        deadline = time.monotonic() + self._config.step_timeout_s
        while time.monotonic() < deadline:
            if not self._qemu.alive():
                raise QemuError(f"destination QEMU exited while loading the stream: {self._qemu.log_tail()}")
            status = self._qemu.query_migrate().get("status", "none")
            if status == "completed" and self._qemu.status() == "paused":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"destination QEMU could not load the stream ({status}): {self._qemu.log_tail()}")
            self._qemu.wait_event(POLL_S)  # QEMU's "completed" event ends the wait at once
        raise QemuError(f"destination QEMU did not finish loading the stream in {self._config.step_timeout_s:.0f} s")

    def _verify_manifest(self) -> dict:
        reply = self._channel.recv(self._config.step_timeout_s)
        if isinstance(reply, Abort):
            raise QemuIncomingRefused(f"the source aborted: {reply.reason}")
        assert isinstance(reply, Manifest)
        manifest = self._signer.verify(reply.envelope, "manifest", self._hello.source_host, self._channel)
        digest = combined_digest(self._stream_digests)
        expected = {
            "migration_id": self._hello.migration_id,
            "vm": self._hello.vm_name,
            "source": self._hello.source_host,
            "destination": self._config.name,
            "memory_bytes": self._hello.memory_bytes,
            "backend": "qemu",
            "channel_binding": self._binding,
            "order_id": self._order_id,
            "image_digest": digest,  # checked on the plaintext path too: it costs nothing here
            "stream_bytes": self._stream_bytes,
            "transport": self._transport,
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise DocumentError(f"manifest {key} is {manifest.get(key)!r}, received {value!r}")
        self._audit(Kinds.MIGRATION_DIGEST, image_digest=digest, verified=True, manifest=reply.envelope)
        return manifest

    def _start_guest(self, manifest: dict, cpu_started: float) -> None:
        hello = self._hello
        assert self._qemu is not None
        self._store.set_phase(hello.migration_id, "committed")
        self._lab_pause("committed")
        self._qemu.resume()  # QEMU announces the guest's MAC by itself after an incoming migration
        self._qemu_vms.adopt_incoming(self._qemu)
        self._qemu_vms.unreserve_incoming_name(hello.vm_name)
        self._store.set_phase(hello.migration_id, "running")
        receipt = self._receipt(manifest, "running", counter_at_resume=manifest.get("counter_at_pause"),
                                pid=self._qemu.pid, cpu_s=round(time.process_time() - cpu_started, 3))  # fmt: skip
        self._audit(Kinds.MIGRATION_HANDOVER, decision="committed", vm=hello.vm_name, pid=self._qemu.pid, receipt=receipt)
        self._send_running_receipt(receipt)

    def _discard(self, reason: str) -> None:
        hello = self._hello
        log.warning("QEMU migration %s of %s from %s failed: %s", hello.migration_id, hello.vm_name, hello.source_host, reason)
        if self._qemu is not None:
            try:
                self._qemu.kill()  # never a second copy: the source keeps the guest
            except QemuError as exc:
                log.error("could not kill the destination QEMU of %s: %s", hello.vm_name, exc)
            (self._qemu_vms.vm_dir / f"{hello.vm_name}.sealift").unlink(missing_ok=True)
            self._qemu = None
        self._record_abort(reason)
