# Long file: one SA's whole life (connection, PSK, rules, initiate, wait, tear-down) for both ends.
"""An IPsec security association for one migration: one end per host, or both ends on a namespace testbed.

`IpsecEndpoint` is one host's part: load the connection and the PSK into
that host's charon (VICI), add the narrow routing rules libipsec needs,
initiate (source) or wait (destination) until the child SA is INSTALLED,
and on close terminate the SA, unload the connection and the PSK, remove
the rules and check that nothing is left. An agent runs one endpoint per
migration; the destination prepares before the source initiates.

`IpsecTunnel` runs both endpoints (and, unless given, a charon per host) for
hosts that are network namespaces of this machine: the lab, the tests and
the benchmark.

Inbound, an nftables table per migration drops the migration flow when it
arrives outside the SA (see `IpsecEndpoint.inbound_filter`).

Routing with libipsec (no kernel ESP): cleartext enters the TUN device
through a route to the peer in our own table. Only the migration flow is
sent there, by a rule that matches TCP to the migration port (source) or
from it (destination). Without an installed SA libipsec drops what the TUN
device hands it, and a second rule right after the first prohibits the flow
should the route be missing, so the flow fails instead of leaving in clear. Everything else between the two hosts
(the agents' own TLS channel, IKE itself, ping) keeps its normal route.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sealift.errors import SealiftError
from sealift.ipsec.charon import Charon, IpsecBackend, detect_backend
from sealift.ipsec.sa_key import ipsec_psk_fingerprint
from sealift.ipsec.vici_client import ESP_PROPOSALS, ChildSa, Mode, TunnelEnd, ViciClient, ViciError

LIBIPSEC_TUN = "ipsec0"  # the TUN device kernel-libipsec creates (one per charon, so one per namespace)
FLOW_TABLE = 221  # our routes into the TUN device (charon's own table is 220)
RULE_PRIORITY = 1000  # before the main table (32766); the fail-closed rule takes the next number
_ROUTES_LOCK = threading.Lock()  # the peer route is shared by this process's concurrent endpoints
INSTALL_TIMEOUT_S = 15.0


class IpsecError(SealiftError, RuntimeError):
    """The SA could not be brought up, or tear-down left state behind."""

    code = "ipsec_error"


@dataclass(frozen=True)
class TunnelHost:
    """A host of one migration: its network namespace (None: this process's) and migration address."""

    netns: str | None
    address: str
    ike_id: str  # the host's name, e.g. "host-a"; its IKE identity adds the migration (migration_identity)


@dataclass(frozen=True)
class SaRecord:
    """What the audit log keeps about one migration's SA (no secret)."""

    name: str
    backend: str
    mode: str
    encryption: str
    dh_group: str
    spi_in: str
    spi_out: str
    udp_encapsulated: bool
    key_id: str
    psk_generation: str
    psk_fingerprint: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


# The child SA's figures an SaRecord keeps: the same name and meaning in ChildSa and SaRecord.
_CHILD_SA_FIGURES = ("encryption", "dh_group", "spi_in", "spi_out", "udp_encapsulated")


def _tear_down(close: Callable[[], None], error: BaseException | None) -> None:
    """Run close() after a with block or a failed set-up that ended with `error` (None: it succeeded).

    A tear-down failure is raised only when nothing else failed; otherwise it is
    noted on the error already on its way, which stays the one raised.
    """
    try:
        close()
    except IpsecError as teardown_error:
        if error is None:
            raise
        error.add_note(f"also, the IPsec tear-down failed: {teardown_error}")


def _ip(netns: str | None, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run([*prefix, "ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise IpsecError(f"ip {' '.join(args)} in {netns or 'this namespace'} failed: {result.stderr.strip()}")
    return result


def migration_identity(host_id: str, conn_name: str) -> str:
    """The IKE identity of one host in one migration, e.g. "sealift-m42.host-a".

    Per migration, so that the responder picks this migration's connection
    (charon selects the peer config by identities and addresses, which are
    otherwise the same for every migration between one pair) and the PSK is
    bound to this migration's pair of identities only.
    """
    return f"{conn_name}.{host_id}"


def default_mode(backend: IpsecBackend) -> Mode:
    # libipsec implements tunnel mode only; the kernel does host-to-host transport mode.
    return "tunnel" if backend is IpsecBackend.LIBIPSEC else "transport"


class IpsecEndpoint:
    """One host's end of one migration's SA, in a running charon. Use as a context manager or call close()."""

    def __init__(
        self,
        charon: Charon,
        end: TunnelEnd,
        psk: bytes,
        *,
        key_id: str,
        psk_generation: str,
    ) -> None:
        self.charon = charon
        self.end = end
        self.key_id = key_id
        self.psk_generation = psk_generation
        self.psk_fingerprint = ipsec_psk_fingerprint(psk)
        self._psk: bytes | None = psk  # dropped as soon as charon has it
        self._vici: ViciClient | None = None
        self._rules: list[list[str]] = []
        self._loaded_conn = False
        self._loaded_psk = False
        self._filter_installed = False

    @property
    def backend(self) -> IpsecBackend:
        return self.charon.backend

    def __enter__(self) -> IpsecEndpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _tear_down(self.close, exc)

    # -- set-up ---------------------------------------------------------------

    def prepare(self) -> None:
        """Load connection and PSK into charon, add the routing rules and the inbound filter.

        The destination does this before the source initiates. On failure, close() undoes what was done.
        """
        self._vici = ViciClient(str(self.charon.vici_socket))
        self._vici.load_conn(self.end)
        self._loaded_conn = True
        assert self._psk is not None
        self._vici.load_shared(self.key_id, self._psk, [self.end.local_id, self.end.remote_id])
        self._loaded_psk = True
        self._psk = None
        if self.backend is IpsecBackend.LIBIPSEC:
            self._add_rules()
        self._add_inbound_filter()

    def initiate(self, *, timeout_s: float = INSTALL_TIMEOUT_S) -> None:
        """Source only: bring up the IKE SA and the child SA; IpsecError with charon's reason if refused."""
        if self.end.role != "initiator":
            raise ValueError("only the source (initiator) initiates")
        try:
            self._client().initiate(self.end.name, timeout_ms=int(timeout_s * 1000))
        except ViciError as error:
            raise IpsecError(f"the IPsec SA for {self.end.name} did not come up: {error}") from error

    def wait_installed(self, *, timeout_s: float = INSTALL_TIMEOUT_S) -> ChildSa:
        """Wait until this host's child SA is INSTALLED; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            child = self.installed_child()
            if child is not None:
                return child
            if time.monotonic() >= deadline:
                raise IpsecError(f"the child SA {self.end.name} was not installed within {timeout_s:.0f} s")
            time.sleep(0.05)

    def installed_child(self) -> ChildSa | None:
        for ike in self._client().list_sas(self.end.name):
            for child in ike.children:
                if child.name == self.end.name and child.state == "INSTALLED":
                    return child
        return None

    def record(self, child: ChildSa) -> SaRecord:
        return SaRecord(
            name=self.end.name,
            backend=self.backend.value,
            mode=child.mode.lower(),
            key_id=self.key_id,
            psk_generation=self.psk_generation,
            psk_fingerprint=self.psk_fingerprint,
            **{key: getattr(child, key) for key in _CHILD_SA_FIGURES},
        )

    # -- tear-down ------------------------------------------------------------

    def close(self) -> None:
        """Terminate the SA, unload conn and PSK, remove the rules, then check nothing is left. Idempotent."""
        self._psk = None
        problems: list[str] = []
        vici = self._vici
        if vici is not None:
            for what, step in (
                ("terminate", lambda: vici.terminate(self.end.name)),
                ("unload-conn", lambda: vici.unload_conn(self.end.name) if self._loaded_conn else None),
                ("unload-shared", lambda: vici.unload_shared(self.key_id) if self._loaded_psk else None),
            ):
                try:
                    step()
                except ViciError as error:
                    # terminate fails when there is no SA (never came up, or the peer deleted it): not a problem.
                    if what != "terminate":
                        problems.append(str(error))
            self._loaded_conn = self._loaded_psk = False
        self._remove_rules(problems)
        self._remove_inbound_filter(problems)
        if vici is not None:
            problems.extend(self._leftovers(vici))
            vici.close()
            self._vici = None
        if problems:
            raise IpsecError(f"tear-down of {self.end.name} on {self.charon.netns}: " + "; ".join(problems))

    def _leftovers(self, vici: ViciClient) -> list[str]:
        left = []
        deadline = time.monotonic() + 5.0
        while True:
            try:
                sas = vici.list_sas(self.end.name)
                if not sas:
                    break
            except ViciError as error:
                return [f"cannot check the SA is gone: {error}"]
            if time.monotonic() >= deadline:
                left.append(f"SA still present: {[ike.state for ike in sas]}")
                break
            time.sleep(0.05)
        try:
            if self.key_id in vici.shared_key_ids():
                left.append(f"PSK {self.key_id} still loaded")
            if self.end.name in vici.conn_names():
                left.append(f"connection {self.end.name} still loaded")
        except ViciError as error:
            left.append(f"cannot check the PSK is unloaded: {error}")
        return left

    # -- helpers --------------------------------------------------------------

    def _client(self) -> ViciClient:
        if self._vici is None:
            raise RuntimeError("prepare() the endpoint first")
        return self._vici

    def _flow_selector(self) -> list[str]:
        port_match = "dport" if self.end.role == "initiator" else "sport"
        # No "from": a connecting socket's first route lookup has no source address yet.
        return ["to", f"{self.end.remote_address}/32", "ipproto", "tcp", port_match, str(self.end.port)]

    def _add_rules(self) -> None:
        # Our own table with one route per peer into the TUN device, not the
        # per-SA route libipsec puts in charon's table: that one is shared by
        # every SA to the peer and goes with the first SA deleted, which would
        # cut a concurrent migration to the same peer. Packets that reach the
        # TUN device without an installed SA are dropped by libipsec.
        with _ROUTES_LOCK:
            _ip(
                self.charon.netns,
                [
                    "route",
                    "replace",
                    f"{self.end.remote_address}/32",
                    "dev",
                    LIBIPSEC_TUN,
                    "src",
                    self.end.local_address,
                    "table",
                    str(FLOW_TABLE),
                ],
            )
            selector = self._flow_selector()
            for rule in (
                [*selector, "lookup", str(FLOW_TABLE), "priority", str(RULE_PRIORITY)],
                [*selector, "prohibit", "priority", str(RULE_PRIORITY + 1)],
            ):
                _ip(self.charon.netns, ["rule", "add", *rule])
                self._rules.append(rule)

    @property
    def nft_table(self) -> str:
        return "sealift_" + re.sub(r"[^A-Za-z0-9_]", "_", self.end.name)

    def inbound_filter(self) -> str:
        """The nftables table that drops the migration flow arriving outside the SA (pure text).

        Routing protects what leaves; this protects what arrives: the
        destination's QEMU port accepts only decrypted traffic, and the
        source accepts the destination's replies only decrypted, so nobody
        can feed a cleartext stream into QEMU's -incoming port.
        """
        if self.end.role == "responder":
            flow = f"tcp dport {self.end.port}"
        else:
            flow = f"ip saddr {self.end.remote_address} tcp sport {self.end.port}"
        if self.backend is IpsecBackend.LIBIPSEC:
            outside_sa = f'iifname != "{LIBIPSEC_TUN}"'  # libipsec hands decrypted packets in through its TUN device
        else:
            outside_sa = "meta ipsec missing"  # no XFRM security path: it was not decrypted by the kernel
        return (
            f"table inet {self.nft_table} {{\n"
            "    chain input {\n"
            "        type filter hook input priority filter; policy accept;\n"
            f"        {flow} {outside_sa} counter drop\n"
            "    }\n"
            "}\n"
        )

    def _add_inbound_filter(self) -> None:
        prefix = ["ip", "netns", "exec", self.charon.netns] if self.charon.netns else []
        result = subprocess.run(
            [*prefix, "nft", "-f", "-"], input=self.inbound_filter(), capture_output=True, text=True, timeout=10
        )
        if result.returncode != 0:
            raise IpsecError(
                f"cannot install the inbound filter (nftables) for {self.end.name}: {result.stderr.strip()}"
            )
        self._filter_installed = True

    def _remove_inbound_filter(self, problems: list[str]) -> None:
        if not self._filter_installed:
            return
        prefix = ["ip", "netns", "exec", self.charon.netns] if self.charon.netns else []
        result = subprocess.run(
            [*prefix, "nft", "delete", "table", "inet", self.nft_table], capture_output=True, text=True, timeout=10
        )
        self._filter_installed = False
        if result.returncode != 0:
            problems.append(f"nft delete table {self.nft_table}: {result.stderr.strip()}")

    def _remove_rules(self, problems: list[str]) -> None:
        if not self._rules:
            return
        with _ROUTES_LOCK:
            while self._rules:
                rule = self._rules.pop()
                result = _ip(self.charon.netns, ["rule", "del", *rule], check=False)
                if result.returncode != 0:
                    problems.append(f"ip rule del {' '.join(rule)}: {result.stderr.strip()}")
            # The peer's route goes when no flow rule to that peer is left (other migrations may still use it).
            remaining = _ip(self.charon.netns, ["rule", "show", "table", str(FLOW_TABLE)], check=False).stdout
            if f"to {self.end.remote_address} " not in remaining:
                _ip(
                    self.charon.netns,
                    ["route", "del", f"{self.end.remote_address}/32", "table", str(FLOW_TABLE)],
                    check=False,
                )


class IpsecTunnel:
    """Both ends of one migration's SA on namespace hosts; up on enter, torn down and checked on exit.

    source/destination: the two hosts; port: the TCP port the destination
    listens on for the migration; psk: this migration's IKE PSK (bytes, never
    written to disk); psk_generation: how the audit log names its generation
    (e.g. "epoch 7, migration m-42"). charons: running charons to use (the
    caller keeps them); by default one is started per host and stopped on exit.
    """

    def __init__(
        self,
        source: TunnelHost,
        destination: TunnelHost,
        port: int,
        psk: bytes,
        *,
        name: str,
        psk_generation: str,
        key_id: str | None = None,
        backend: IpsecBackend | None = None,
        esp: str = "aes256gcm",
        charons: tuple[Charon, Charon] | None = None,
        timeout_s: float = INSTALL_TIMEOUT_S,
    ) -> None:
        if esp not in ESP_PROPOSALS:
            raise ValueError(f"esp must be one of {sorted(ESP_PROPOSALS)}")
        self.backend = charons[0].backend if charons else (backend or detect_backend())
        self.source, self.destination, self.port = source, destination, port
        self.name = name
        self._timeout_s = timeout_s
        self._own_charons = charons is None
        self._charons = charons
        mode = default_mode(self.backend)
        key_id = key_id or f"{name}-psk"
        source_id, destination_id = (
            migration_identity(source.ike_id, name),
            migration_identity(destination.ike_id, name),
        )
        ends = (
            TunnelEnd(
                name,
                "initiator",
                source.address,
                destination.address,
                source_id,
                destination_id,
                port,
                mode,
                esp_proposal=ESP_PROPOSALS[esp],
            ),
            TunnelEnd(
                name,
                "responder",
                destination.address,
                source.address,
                destination_id,
                source_id,
                port,
                mode,
                esp_proposal=ESP_PROPOSALS[esp],
            ),
        )
        self._ends = ends
        self._psk: bytes | None = psk
        self._key_id = key_id
        self._psk_generation = psk_generation
        self.endpoints: tuple[IpsecEndpoint, IpsecEndpoint] | None = None
        self.source_sa: SaRecord | None = None
        self.destination_sa: SaRecord | None = None

    def __enter__(self) -> IpsecTunnel:
        try:
            self._open()
        except BaseException as error:
            _tear_down(self.close, error)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _tear_down(self.close, exc)

    @property
    def spis(self) -> tuple[str, str]:
        """(source -> destination SPI, destination -> source SPI)."""
        if self.source_sa is None:
            raise RuntimeError("the tunnel is not up")
        return self.source_sa.spi_out, self.source_sa.spi_in

    @property
    def esp_algorithm(self) -> str:
        if self.source_sa is None:
            raise RuntimeError("the tunnel is not up")
        return self.source_sa.encryption

    def _open(self) -> None:
        if self._charons is None:
            started = []
            try:
                for host in (self.source, self.destination):
                    if host.netns is None:
                        raise ValueError("IpsecTunnel runs both ends here: both hosts need a network namespace")
                    charon = Charon(host.netns, self.backend)
                    charon.start()
                    started.append(charon)
            except BaseException:
                for charon in started:
                    charon.stop()
                raise
            self._charons = (started[0], started[1])
        assert self._psk is not None
        source_end = IpsecEndpoint(
            self._charons[0], self._ends[0], self._psk, key_id=self._key_id, psk_generation=self._psk_generation
        )
        destination_end = IpsecEndpoint(
            self._charons[1], self._ends[1], self._psk, key_id=self._key_id, psk_generation=self._psk_generation
        )
        self._psk = None
        self.endpoints = (source_end, destination_end)
        destination_end.prepare()  # the responder is ready before the initiator sends anything
        source_end.prepare()
        source_end.initiate(timeout_s=self._timeout_s)
        source_child = source_end.wait_installed(timeout_s=self._timeout_s)
        destination_child = destination_end.wait_installed(timeout_s=self._timeout_s)
        if (source_child.spi_out, source_child.spi_in) != (destination_child.spi_in, destination_child.spi_out):
            raise IpsecError(
                f"the two ends disagree on the SPIs: source {source_child.spi_out}/{source_child.spi_in}, "
                f"destination {destination_child.spi_in}/{destination_child.spi_out}"
            )
        self.source_sa = source_end.record(source_child)
        self.destination_sa = destination_end.record(destination_child)

    def close(self) -> None:
        problems = []
        if self.endpoints is not None:
            for endpoint in self.endpoints:  # source first: it sends the DELETE
                try:
                    endpoint.close()
                except IpsecError as error:
                    problems.append(str(error))
            self.endpoints = None
        if self._own_charons and self._charons is not None:
            for charon in self._charons:
                charon.stop()
            self._charons = None
        if problems:
            raise IpsecError("; ".join(problems))


# ---------------------------------------------------------------------------
# Entry points for the agents (transport "ipsec") and the benchmark (static-PSK baseline)


# /proc/net/tcp states that still send packets on a connection: anything but TIME_WAIT (06),
# CLOSE (07) and LISTEN (0A).
_TCP_DONE_STATES = {"06", "07", "0A"}


def tcp_connections_open(port: int) -> int:
    """TCP connections of this network namespace with `port` at either end that can still send packets."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] in _TCP_DONE_STATES:
                continue
            ports = {int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)}
            count += port in ports
    return count


def wait_tcp_closed(port: int, timeout_s: float) -> bool:
    """Wait (bounded) until no connection on `port` can still send: True if so.

    An SA torn down while QEMU's connection is still closing lets its last
    FIN and ACK leave in clear (headers only, no data), which the lab's
    capture caught; waiting for the close first keeps the wire ESP-only.
    """
    deadline = time.monotonic() + timeout_s
    while tcp_connections_open(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    time.sleep(0.05)  # the last ACK, sent as the socket closed, is still on its way through user-space ESP
    return True


def migration_conn_name(migration_id: str) -> str:
    """The charon connection name of one migration (unique per host while it runs)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in migration_id)[:48]
    return f"sealift-{safe}"


def migration_endpoint(
    charon: Charon,
    *,
    role: str,
    migration_id: str,
    local: TunnelHost,
    remote: TunnelHost,
    port: int,
    psk: bytes,
    key_id: str,
    psk_generation: str,
    esp: str = "aes256gcm",
) -> IpsecEndpoint:
    """One agent's end of a migration's SA. role: "source" (initiates) or "destination" (listens on `port`).

    The destination calls prepare() and tells the source it is ready; the
    source then calls prepare(), initiate() and wait_installed(), and runs the
    migration to remote.address:port; both close() in a finally.
    """
    if role not in ("source", "destination"):
        raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
    if esp not in ESP_PROPOSALS:
        raise ValueError(f"esp must be one of {sorted(ESP_PROPOSALS)}")
    name = migration_conn_name(migration_id)
    end = TunnelEnd(
        name,
        "initiator" if role == "source" else "responder",
        local.address,
        remote.address,
        migration_identity(local.ike_id, name),
        migration_identity(remote.ike_id, name),
        port,
        default_mode(charon.backend),
        esp_proposal=ESP_PROPOSALS[esp],
    )
    return IpsecEndpoint(charon, end, psk, key_id=key_id, psk_generation=psk_generation)


STATIC_KEY_ID = "sealift-static-psk"


def static_psk_tunnel(
    source: TunnelHost,
    destination: TunnelHost,
    port: int,
    static_psk: bytes,
    *,
    name: str = "static-baseline",
    esp: str = "aes256gcm",
    charons: tuple[Charon, Charon] | None = None,
) -> IpsecTunnel:
    """The benchmark's IPsec VPN baseline (seed 003's model): the same SA, but one PSK configured once and
    used for every migration, instead of one derived per migration."""
    return IpsecTunnel(
        source,
        destination,
        port,
        static_psk,
        name=name,
        key_id=STATIC_KEY_ID,
        psk_generation="static",
        esp=esp,
        charons=charons,
    )
