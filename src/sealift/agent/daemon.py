"""The agent daemon: the migration port, the control socket, recovery, resolver."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from OpenSSL import SSL

from sealift.agent.control_api import ControlServer, MigrateRequest
from sealift.agent.expected import ExpectedPeers, resolve_peer_keys
from sealift.agent.guard import EVICTED, SLOW_HANDSHAKE, PeerGuard, PortRefusal, peer_key
from sealift.agent.metrics import AgentMetrics
from sealift.agent.notify import sd_notify
from sealift.agent.port import PortConnection, PortTable, StalledOpening, peek_opening
from sealift.backends.builtin.migration import BuiltinDestinationDriver, BuiltinKeeper, BuiltinSourceDriver
from sealift.backends.builtin.registry import BuiltinVmRegistry
from sealift.backends.libvirt.destination import LibvirtDestinationDriver
from sealift.backends.libvirt.keeper import LibvirtKeeper
from sealift.backends.libvirt.registry import LibvirtRegistry
from sealift.backends.libvirt.source import LibvirtSourceDriver
from sealift.backends.qemu.destination import QemuDestinationDriver
from sealift.backends.qemu.keeper import QemuKeeper
from sealift.backends.qemu.postcopy_recovery import RECOVERIES
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.source import QemuSourceDriver
from sealift.backends.qemu.transports import QemuTransport, default_transport, transport_named
from sealift.guests import VmRegistry
from sealift.host.config import AgentConfig
from sealift.host.store import AgentStore
from sealift.host.transport import (
    INSECURE_CONTROL_MAGIC,
    TLS_HANDSHAKE_BYTE,
    ControlChannel,
    DataSessions,
    PlainStream,
    read_stream_open,
    tune_bulk_socket,
)
from sealift.ipsec.charon import HostCharon
from sealift.migration.authority import Authority
from sealift.migration.destination import DestinationCoordinator
from sealift.migration.drivers import DestinationDriver
from sealift.migration.errors import failure_code
from sealift.migration.phases import UNSETTLED, outcome_for
from sealift.migration.recovery import OPEN_AT_RESTART, Keepers, Resolver, recover
from sealift.migration.report import MigrationReport
from sealift.migration.session import DestinationSession, MigrationContext, SourceSession
from sealift.migration.source import SourceCoordinator
from sealift.monitor.collectors import BuiltinCollector, QemuCollector
from sealift.monitor.service import MonitorService
from sealift.placement.placer import Placer, host_usage, our_advert, vm_memory
from sealift.security.identity import HostIdentity
from sealift.security.tls import TlsStream, server_context
from sealift.wire.control import Role
from sealift.wire.datastream import STREAM_MAGIC
from sealift.wire.errors import ProtocolError
from sealift.wire.messages import Advert, AdvertQuery, Hello, Outcome, OutcomeQuery, Refuse

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = HostIdentity.load(config.identity_dir, config.name)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = AgentStore(config.database_path)
        self.qemu_vms = QemuVmRegistry(config)  # QEMU guests: their own registry (backends/qemu/registry.py)
        self.vms = BuiltinVmRegistry(config, self.store, other_guests=self.qemu_vms.usage)  # admission counts both
        self.qemu_vms.adopt_existing()
        # libvirt domains (issue 19): libvirtd keeps them; the registry asks it. Only with a [libvirt] section.
        self.libvirt_domains = LibvirtRegistry(config.libvirt, config.name) if config.libvirt is not None else None
        self.registries: tuple[VmRegistry, ...] = (self.vms, self.qemu_vms) + (
            (self.libvirt_domains,) if self.libvirt_domains is not None else ()
        )  # every backend's guests
        self.sessions = DataSessions()
        # strongSwan's charon for the ipsec transport: started on the first such migration, stopped with the agent.
        self.ipsec = HostCharon(config.state_dir / "ipsec")
        self._tls_context: SSL.Context = server_context(self.identity)
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        g = config.guard
        self.guard = PeerGuard(
            per_peer_rate=g.per_peer_rate,
            per_peer_burst=g.per_peer_burst,
            max_concurrent_per_peer=g.max_connections_per_peer,
            max_concurrent_total=g.max_connections,
            max_incoming_migrations_per_peer=g.max_incoming_per_peer,
            handshake_rate=g.handshake_rate,
            handshake_burst=g.handshake_burst,
            # Issue 23: part of the port is kept for the hosts this agent expects (agent/expected.py).
            expected=ExpectedPeers(
                resolve_peer_keys(config.peers.values(), peer_key),
                remember_s=g.remember_authenticated_s,
                max_remembered=g.max_remembered_addresses,
            ),
            reserved_for_expected=g.reserved_connections,
            min_tenure_s=g.min_tenure_s,
        )
        self._port = PortTable()  # connections still in pre-authentication: the ones the guard may evict
        self._stopping = threading.Event()
        self._stop_signalled = False  # SIGTERM or SIGINT (serve_forever)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.authority = Authority(config, self.identity)
        self.metrics = AgentMetrics()  # this agent's registry: migrations, handovers, port refusals, monitors
        self.placer = Placer(config, self.identity)
        self.context = MigrationContext(config, self.identity, self.store, self.authority, self.sessions)
        self.keepers = Keepers(
            {
                "builtin": BuiltinKeeper(self.vms),
                "qemu": QemuKeeper(self.qemu_vms, self.context),
                "libvirt": LibvirtKeeper(self.libvirt_domains),
            },
            fallback="builtin",
            legacy_owner=lambda vm: "qemu" if self.qemu_vms.has(vm) else "builtin",
        )
        self.resolver = Resolver(
            config,
            self.identity,
            self.store,
            self.keepers,
            self._active,
            self._active_lock,
            audit=self._resolver_audit,
        )
        self.control = ControlServer(config.control_socket, self)
        # Security and reliability monitors (seed 004, T12): per-VM collectors, host verdicts, port watch.
        self.monitor = MonitorService(
            config.name,
            config.monitor,
            [BuiltinCollector(self.vms), QemuCollector(self.qemu_vms)],
            self.authority.record,
            blocker=self.guard,
            registry=self.metrics.registry,
        )

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        if self.config.metrics_address is not None:
            self.metrics.serve(self.config.metrics_address)  # also with the monitors off
        self._listener = socket.create_server(self.config.listen, reuse_port=False, backlog=128)
        self._spawn(self._accept_loop, "migration-port")
        self.control.start()
        self.resolver.start()
        self.monitor.start()
        self.authority.start_watching()  # live revocation: a changed CRL or policy applies within a second
        log.info(
            "agent %s listening on %s:%d, control socket %s",
            self.config.name,
            *self.config.listen,
            self.config.control_socket,
        )
        # Under systemd (Type=notify): ready only now that the port and the control socket accept.
        listen = f"{self.config.listen[0]}:{self.config.listen[1]}"
        sd_notify("READY=1", f"STATUS=serving on {listen}, control socket {self.config.control_socket}")

    def serve_forever(self) -> None:
        # Before start: SIGHUP's default action would end the agent. Reload the CRL and policy now.
        signal.signal(signal.SIGHUP, lambda *_: self.authority.request_reload())
        # Before start too: start() says READY=1 to systemd, which may stop us at once. The handler
        # only sets a flag: Event.set takes a lock the main thread it interrupts may be holding.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        self.start()
        # Short waits: a signal that another thread received runs its handler only once this thread
        # runs Python again, which a wait without a timeout never does (seen: SIGTERM ignored).
        while not (self._stop_signalled or self._stopping.wait(0.5)):
            pass
        self.shutdown()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._stop_signalled = True

    def shutdown(self) -> None:
        """Stop serving. Guests keep running: they do not belong to this process."""
        sd_notify("STOPPING=1", "STATUS=stopping")
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        self.control.stop()
        self.resolver.stop()
        self.monitor.stop()
        self.metrics.stop()
        self.ipsec.stop()
        self.authority.close()
        if self.libvirt_domains is not None:
            self.libvirt_domains.close()
        self.store.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def recover(self) -> None:
        """After a crash: adopt guests and settle what the crash interrupted (migration/recovery.py)."""
        self.vms.adopt_existing()  # QEMU guests were adopted in __init__
        interrupted = self.store.migrations(limit=1000, phases=OPEN_AT_RESTART)
        recover(self.store, self.keepers, self.authority.record)
        for record in interrupted:  # counted by the phase recovery left each in
            after = self.store.migration(record.id)
            self.metrics.recovered_at_start(record.role, after.phase if after is not None else record.phase)
        try:
            self._remove_leftover_images()
        except Exception:
            log.exception("recovery: could not clean up leftover images")

    def _remove_leftover_images(self) -> None:
        """Images no guest runs from and the store does not count as a live copy: failed incoming migrations."""
        known = {vm.name for vm in self.store.vms()}
        open_incoming = {r.vm for r in self.store.migrations(limit=1000, phases=UNSETTLED)}
        for image in self.config.vm_dir.glob("*.img"):
            name = image.name[: -len(".img")]
            if name in known or name in open_incoming or self.vms.has(name):
                continue
            if self.vms.running_guest(name) is not None:
                continue  # adopted now; it is a live copy
            log.warning("recovery: removing %s, left over from a failed incoming migration", image)
            self.authority.record("recovery.leftover_removed", vm=name, path=str(image))
            image.unlink(missing_ok=True)
            (self.config.vm_dir / f"{name}.dirty").unlink(missing_ok=True)

    # -- migration port -----------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            admission = self.guard.open_slot(peer[0])  # cheap: before reading a byte
            if not admission.allowed or admission.slot is None:
                log.info("connection from %s refused (%s): %s", peer[0], admission.code, admission.reason)
                sock.close()
                self.metrics.port_refused("connection", admission.code)
                self.monitor.port_event(peer[0], "refused_connection")
                continue
            for victim in self._port.evict(admission.evicted):
                log.info("connection from %s evicted (%s) for one from %s", victim.peer_ip, EVICTED, peer[0])
            self.monitor.port_event(peer[0], "connection")
            connection = self._port.add(sock, peer, admission.slot)
            threading.Thread(
                target=self._serve_connection, args=(connection,), name=f"conn-{peer}", daemon=True
            ).start()

    def _serve_connection(self, connection: PortConnection) -> None:
        sock, peer, slot = connection.sock, connection.address, connection.slot
        try:
            accepted = time.monotonic()
            deadline = accepted + self.config.handshake_timeout_s
            # Issue 23: the opening (a whole ClientHello) has a much shorter deadline than the handshake.
            opening_deadline = accepted + min(self.config.hello_timeout_s, self.config.handshake_timeout_s)
            first = self._read_opening(connection, opening_deadline)
            if first[0] == TLS_HANDSHAKE_BYTE:
                admission = self.guard.admit_handshake(peer[0])  # before the expensive ECDHE + ECDSA
                if not admission.allowed:
                    log.info("handshake from %s refused: %s", peer[0], admission.reason)
                    sock.close()
                    self.metrics.port_refused("handshake", admission.code)
                    self.monitor.port_event(peer[0], "handshake_refused")
                    return
                try:
                    stream = TlsStream.accept(sock, self._tls_context, timeout=max(0.1, deadline - time.monotonic()))
                except Exception:
                    self.monitor.port_event(peer[0], EVICTED if slot.evicted else "handshake_failed")
                    raise
                if not self._established(connection, authenticated=True):
                    stream.close()
                    return
                self._serve_control(ControlChannel(stream, Role.SERVER, stream.peer_name), peer[0])
            elif first[:4] == STREAM_MAGIC:
                sock.settimeout(max(0.1, deadline - time.monotonic()))  # the rest of the header: the long deadline
                session_id, _index = read_stream_open(sock)
                tune_bulk_socket(sock)
                # Settled before the hand-over: once delivered, the session's thread owns the socket.
                if not self._established(connection, authenticated=False, report=False):
                    sock.close()
                    return
                if not self.sessions.deliver(session_id, sock):
                    log.warning("data stream from %s names no pending session; closed", peer)
                    sock.close()
                    return
                self.monitor.port_event(peer[0], "established")  # only a real session's stream counts
                return  # the session's thread owns the socket now
            elif first[:4] == INSECURE_CONTROL_MAGIC and self.config.allow_insecure:
                sock.recv(len(INSECURE_CONTROL_MAGIC))
                self._serve_control(ControlChannel(PlainStream(sock), Role.SERVER, None), peer[0])
            else:
                log.warning("connection from %s dropped: unknown or disallowed protocol %r", peer, first[:4])
                sock.close()
                self.monitor.port_event(peer[0], "malformed")
        except (OSError, TimeoutError, ProtocolError, Exception) as exc:  # one bad peer must not hurt the agent
            log.warning("connection from %s closed: %s", peer, exc)
            if isinstance(exc, ProtocolError):
                self.monitor.port_event(peer[0], "malformed")
            sock.close()
        finally:
            self._port.remove(connection)
            self.guard.release_slot(slot)  # a no-op if the guard evicted it (it freed the slot then)

    def _read_opening(self, connection: PortConnection, deadline: float) -> bytes:
        """The first record or magic, by `deadline`; reports to the port watch what went wrong."""
        peer_ip = connection.peer_ip
        try:
            return peek_opening(connection.sock, deadline)
        except StalledOpening as exc:
            # Nothing at all: a scan ("silent"); part of an opening: a stalled handshake.
            self.monitor.port_event(peer_ip, "slow_handshake" if exc.received else "silent")
            raise PortRefusal(f"{exc} ({self.config.hello_timeout_s:g} s)", code=SLOW_HANDSHAKE) from None
        except ConnectionError:
            self.monitor.port_event(peer_ip, EVICTED if connection.slot.evicted else "silent")
            raise

    def _established(self, connection: PortConnection, *, authenticated: bool, report: bool = True) -> bool:
        """Past pre-authentication: no longer evictable. False if it was evicted just before."""
        self._port.remove(connection)
        if not self.guard.mark_established(connection.slot, authenticated=authenticated):
            return False
        if report:
            self.monitor.port_event(connection.peer_ip, "established")
        return True

    def _serve_control(self, channel: ControlChannel, peer_ip: str | None = None) -> None:
        try:
            first = channel.recv(self.config.handshake_timeout_s)
            if isinstance(first, Hello):
                if RECOVERIES.offer(channel, first, 4 * self.config.step_timeout_s):
                    return  # a paused QEMU post-copy's source reconnecting: its migration took the channel
                host = channel.peer_name or first.source_host
                admission = self.guard.admit_migration(host)  # per source host, before verifying orders
                if not admission.allowed:
                    self.metrics.port_refused("migration", admission.code)
                    self.authority.record(
                        "migration.refused",
                        migration_id=first.migration_id,
                        source=host,
                        reason=admission.reason,
                        code="peer_limit",
                    )
                    channel.send(Refuse(first.migration_id, admission.reason[:1000], "peer_limit"))
                    return
                try:
                    self._serve_incoming(channel, first)
                finally:
                    self.guard.release_migration(host)
                if peer_ip is not None and self.store.migration(first.migration_id) is None:
                    # Refused before it began (order, policy, monitor): the port watch counts it.
                    self.monitor.port_event(peer_ip, "order_refused")
            elif isinstance(first, OutcomeQuery):
                self._serve_outcome(channel, first)
            elif isinstance(first, AdvertQuery):
                used, count = host_usage(self.registries)  # built-in and QEMU guests alike
                channel.send(Advert(first.migration_id, our_advert(self.config, self.identity, used, count)))
        finally:
            channel.close()

    def _serve_incoming(self, channel: ControlChannel, hello: Hello) -> None:
        with self._active_lock:
            if hello.migration_id in self._active:
                return
            self._active.add(hello.migration_id)
        backend = hello.backend if hello.backend in ("qemu", "libvirt") else "builtin"
        transport = "tls" if hello.secure else "plain"
        self.metrics.incoming_started(backend, transport)
        session: DestinationSession | None = None
        escaped: str | None = None  # the code of a failure the coordinator did not handle itself
        try:
            session = DestinationSession(self.context, channel, hello)
            driver: DestinationDriver
            if hello.backend == "qemu":
                driver = QemuDestinationDriver(session, self.vms, self.qemu_vms, self.ipsec)
            elif hello.backend == "libvirt":
                driver = LibvirtDestinationDriver(session, self.vms, self.libvirt_domains)
            else:
                driver = BuiltinDestinationDriver(session, self.vms)
            DestinationCoordinator(session, driver).run()
        except BaseException as exc:
            escaped = failure_code(exc)
            raise
        finally:
            code = (session.error_code if session is not None else None) or escaped
            self.metrics.incoming_finished(backend, transport, self._phase(hello.migration_id), code)
            with self._active_lock:
                self._active.discard(hello.migration_id)

    def _serve_outcome(self, channel: ControlChannel, query: OutcomeQuery) -> None:
        record = self.store.migration(query.migration_id)
        if record is not None and channel.peer_name is not None and channel.peer_name != record.peer:
            record = None  # only the other party of a migration may ask about it
        with self._active_lock:
            active = query.migration_id in self._active
        outcome = "unknown" if record is None or active else outcome_for(record.role, record.phase, record.decision)
        channel.send(Outcome(query.migration_id, outcome))

    # -- operations (control API) -------------------------------------------

    def migrate(self, request: MigrateRequest) -> MigrationReport:
        if not request.options.secure and not self.config.allow_insecure:
            raise PermissionError(
                "plaintext migration is disabled on this host (set allow_insecure = true to measure it)"
            )
        backend = self._backend_of(request.vm_name)
        flight = self.metrics.outgoing(request.vm_name)  # its in-flight series, moved by its progress events
        progress = self.metrics.progress_observer(flight, request.progress)
        strategy: QemuTransport | None = None  # QEMU guests: how QEMU's stream travels
        if backend == "libvirt":
            if request.transport not in (None, "sealift"):
                raise ValueError("libvirt domains migrate only through the agents (transport sealift)")
            transport = "tls" if request.options.secure else "plain"
        elif backend == "qemu":
            strategy = (
                transport_named(request.transport) if request.transport else default_transport(request.options.secure)
            )
            transport = strategy.name
        elif request.transport not in (None, "sealift", "plain"):
            raise ValueError(f"transport {request.transport!r} is for QEMU guests only")
        else:
            transport = "tls" if request.options.secure else "plain"
        session = SourceSession(
            self.context, request.vm_name, request.destination, request.options, request.order, transport, progress
        )
        run_migration: Callable[[], MigrationReport]  # the source coordinator of the guest's backend
        if backend == "libvirt":
            assert self.libvirt_domains is not None  # _backend_of found the domain there
            run_migration = SourceCoordinator(session, LibvirtSourceDriver(session, self.libvirt_domains)).run
        elif strategy is None:
            run_migration = SourceCoordinator(session, BuiltinSourceDriver(session, self.vms)).run
        else:
            driver = QemuSourceDriver(session, self.qemu_vms, strategy, self.ipsec)
            run_migration = SourceCoordinator(session, driver).run
        with self._active_lock:
            self._active.add(session.migration_id)
        self.metrics.outgoing_started(flight, session.report, backend)
        code: str | None = None
        try:
            return run_migration()
        except BaseException as exc:
            code = failure_code(exc)
            if code == "no_memory_capacity":
                self.placer.admission_refused(request.destination, str(exc))  # its advert promised room
            raise
        finally:
            with self._active_lock:
                self._active.discard(session.migration_id)
            phase = self._phase(session.migration_id)
            self.metrics.outgoing_finished(flight, session.report, backend, phase, code)

    def _backend_of(self, vm_name: str) -> str:
        """Which backend holds the guest: QEMU's registry, then the built-in one, then libvirt's domains."""
        if self.qemu_vms.has(vm_name):
            return "qemu"
        if not self.vms.has(vm_name) and self.libvirt_domains is not None and self.libvirt_domains.has(vm_name):
            return "libvirt"
        return "builtin"

    def _phase(self, migration_id: str) -> str | None:
        """A migration's phase as its record says (None: it never got one, e.g. refused up front)."""
        record = self.store.migration(migration_id)
        return record.phase if record is not None else None

    def _resolver_audit(self, kind: str, **fields: object) -> None:
        """The resolver's audit entries, and its settlements counted for the metrics."""
        self.authority.record(kind, **fields)
        if kind == "migration.resolved":
            self.metrics.handover_resolved(str(fields["role"]), str(fields["outcome"]))

    def place(self, vm_name: str) -> dict[str, object]:
        """Where should this VM go? Only authenticated, fresh, believable adverts count."""
        choice = self.placer.choose(vm_memory(self.registries, vm_name))  # built-in or QEMU guest
        return {
            "host": choice.host,
            "reason": choice.reason,
            "assessments": [dataclasses.asdict(a) for a in choice.assessments],
        }

    def status(self) -> dict[str, object]:
        return {
            "host": self.config.name,
            "pid": os.getpid(),
            "listen": f"{self.config.listen[0]}:{self.config.listen[1]}",
            "vms": sum(len(registry.list()) for registry in self.registries),  # every backend's guests
            "memory_capacity": self.config.memory_capacity,
            "allow_insecure": self.config.allow_insecure,
            "guard": dataclasses.asdict(self.guard.stats()),
            "monitor": {
                "rounds": self.monitor.rounds,
                "blocks": self.monitor.port_watch.blocks,
                "port_flood": self.monitor.flood_watch.snapshot(),
            },
        }
