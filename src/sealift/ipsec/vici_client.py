"""Talking to one charon over VICI: connection and PSK messages (pure) and a thin client.

One migration is one IKEv2 connection between the two hosts' migration
addresses, authenticated with a pre-shared key, with one ESP child SA whose
traffic selectors admit only TCP between the two addresses with the
migration port on the destination's side (both directions: the return
traffic is the same flow reversed). Proposals: AES-GCM (128 or 256), and a
Diffie-Hellman group on the child SA as well, so every child SA has fresh
keys (PFS) even if the IKE SA's were ever recovered.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import vici
from vici.exception import CommandException, SessionException

from sealift.errors import SealiftError

Role = Literal["initiator", "responder"]
Mode = Literal["tunnel", "transport"]

# IKE: AES-256-GCM, PRF HMAC-SHA-256, X25519; ESP: AES-GCM with X25519 again (PFS).
DEFAULT_IKE_PROPOSAL = "aes256gcm16-prfsha256-x25519"
DEFAULT_ESP_PROPOSAL = "aes256gcm16-x25519"
ESP_PROPOSALS = {
    "aes128gcm": "aes128gcm16-x25519",
    "aes256gcm": "aes256gcm16-x25519",
    "aes256gcm-ecp256": "aes256gcm16-ecp256",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VICI_TIMEOUT_S = 15.0


class ViciError(SealiftError, RuntimeError):
    """A VICI command failed or charon could not be reached."""

    code = "vici_error"


@dataclass(frozen=True)
class TunnelEnd:
    """One host's view of a migration tunnel.

    name:        connection (and child) name, unique per migration on this host
    role:        the source initiates, the destination (which listens on `port`) responds
    local_id / remote_id: IKE identities; the PSK is bound to this pair
    """

    name: str
    role: Role
    local_address: str
    remote_address: str
    local_id: str
    remote_id: str
    port: int
    mode: Mode = "tunnel"
    ike_proposal: str = DEFAULT_IKE_PROPOSAL
    esp_proposal: str = DEFAULT_ESP_PROPOSAL

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tunnel name {self.name!r} must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)")
        if self.role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', not {self.role!r}")
        if self.mode not in ("tunnel", "transport"):
            raise ValueError(f"mode must be 'tunnel' or 'transport', not {self.mode!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")

    @property
    def local_ts(self) -> str:
        # The destination's side of the flow carries the port; the source's is any TCP port.
        if self.role == "responder":
            return f"{self.local_address}/32[tcp/{self.port}]"
        return f"{self.local_address}/32[tcp]"

    @property
    def remote_ts(self) -> str:
        if self.role == "initiator":
            return f"{self.remote_address}/32[tcp/{self.port}]"
        return f"{self.remote_address}/32[tcp]"


def connection_message(end: TunnelEnd) -> dict[str, Any]:
    """The VICI load-conn message for one end (pure; holds no secret)."""
    child = {
        "mode": end.mode,
        "local_ts": [end.local_ts],
        "remote_ts": [end.remote_ts],
        "esp_proposals": [end.esp_proposal],
        "start_action": "none",
        "close_action": "none",
        "dpd_action": "clear",
        # One migration never needs a rekey; a long one rekeys after an hour.
        "rekey_time": "3600",
        "life_time": "4000",
    }
    return {
        end.name: {
            "version": "2",
            "local_addrs": [end.local_address],
            "remote_addrs": [end.remote_address],
            "local_port": "500",
            "remote_port": "500",
            "proposals": [end.ike_proposal],
            "mobike": "no",
            # The child SA is made by its own CREATE_CHILD_SA exchange with a
            # key exchange (PFS) instead of inside IKE_AUTH from the IKE keys.
            "childless": "force" if end.role == "initiator" else "allow",
            # Concurrent migrations between one pair are separate IKE SAs with the same identities.
            "unique": "never",
            "reauth_time": "0",
            "rekey_time": "3600",
            "dpd_delay": "10",
            "local-psk": {"auth": "psk", "id": end.local_id},
            "remote-psk": {"auth": "psk", "id": end.remote_id},
            "children": {end.name: child},
        }
    }


def shared_key_message(key_id: str, psk: bytes, owners: Iterable[str]) -> dict[str, Any]:
    """The VICI load-shared message: an IKE PSK bound to the two identities, under a unique id."""
    if not isinstance(psk, bytes) or len(psk) < 16:
        raise ValueError("an IKE PSK must be at least 16 bytes")
    if not _NAME.match(key_id):
        raise ValueError(f"key id {key_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return {"id": key_id, "type": "IKE", "data": psk, "owners": list(owners)}


@dataclass(frozen=True)
class ChildSa:
    ike_name: str
    ike_state: str
    name: str
    state: str
    mode: str
    protocol: str
    spi_in: str
    spi_out: str
    encryption: str  # e.g. "AES_GCM_16-256"
    dh_group: str  # the child SA's PFS group ("" if none)
    udp_encapsulated: bool
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class IkeSa:
    name: str
    state: str
    local_host: str
    remote_host: str
    children: tuple[ChildSa, ...]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def parse_list_sas(events: Iterable[Mapping[str, Any]]) -> list[IkeSa]:
    """The list-sas event stream (one {ike_name: {...}} per event) as IkeSa objects (pure)."""
    result = []
    for event in events:
        for ike_key, ike in event.items():
            ike_name, ike_state = _text(ike_key), _text(ike.get("state"))  # the IKE SA's, and each child's
            children = []
            for child in (ike.get("child-sas") or {}).values():
                keysize = _text(child.get("encr-keysize"))
                encryption = _text(child.get("encr-alg")) + (f"-{keysize}" if keysize else "")
                children.append(
                    ChildSa(
                        ike_name=ike_name,
                        ike_state=ike_state,
                        name=_text(child.get("name")),
                        state=_text(child.get("state")),
                        mode=_text(child.get("mode")),
                        protocol=_text(child.get("protocol")),
                        spi_in=_text(child.get("spi-in")),
                        spi_out=_text(child.get("spi-out")),
                        encryption=encryption,
                        dh_group=_text(child.get("dh-group")),
                        udp_encapsulated=_text(child.get("encap")) == "yes",
                        bytes_in=int(_text(child.get("bytes-in")) or 0),
                        bytes_out=int(_text(child.get("bytes-out")) or 0),
                    )
                )
            result.append(
                IkeSa(
                    name=ike_name,
                    state=ike_state,
                    local_host=_text(ike.get("local-host")),
                    remote_host=_text(ike.get("remote-host")),
                    children=tuple(children),
                )
            )
    return result


class ViciClient:
    """A VICI session to one charon (one Unix socket); every failure is a ViciError with charon's message."""

    def __init__(self, socket_path: str, *, timeout: float = VICI_TIMEOUT_S) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path)
        except OSError as error:
            self._sock.close()
            raise ViciError(f"cannot reach charon's VICI socket {socket_path}: {error}") from error
        self._session = vici.Session(self._sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ViciClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            result = function(*args)
            # Streamed commands are generators: drain them here so errors surface here.
            return list(result) if hasattr(result, "__next__") else result
        except (CommandException, SessionException, OSError) as error:
            raise ViciError(f"{what} failed: {error}") from error

    def version(self) -> str:
        info = self._call("version", self._session.version)
        return f"{_text(info.get('daemon'))} {_text(info.get('version'))}"

    def load_conn(self, end: TunnelEnd) -> None:
        self._call(f"load-conn {end.name}", self._session.load_conn, connection_message(end))

    def unload_conn(self, name: str) -> None:
        self._call(f"unload-conn {name}", self._session.unload_conn, {"name": name})

    def conn_names(self) -> list[str]:
        return [_text(name) for name in self._call("get-conns", self._session.get_conns).get("conns", [])]

    def load_shared(self, key_id: str, psk: bytes, owners: Iterable[str]) -> None:
        self._call(f"load-shared {key_id}", self._session.load_shared, shared_key_message(key_id, psk, owners))

    def unload_shared(self, key_id: str) -> None:
        self._call(f"unload-shared {key_id}", self._session.unload_shared, {"id": key_id})

    def shared_key_ids(self) -> list[str]:
        """Ids of the shared secrets charon holds that were loaded over VICI (get-shared)."""
        return [_text(key) for key in self._call("get-shared", self._session.get_shared).get("keys", [])]

    def initiate(self, name: str, *, timeout_ms: int = 10_000) -> list[str]:
        """Bring up the child SA `name` (and its IKE SA); returns charon's log lines; ViciError if it fails."""
        previous = self._sock.gettimeout()
        self._sock.settimeout(timeout_ms / 1000 + 5)  # charon answers by its own timeout; do not give up first
        try:
            events = self._call(
                f"initiate {name}",
                self._session.initiate,
                {"child": name, "ike": name, "timeout": str(timeout_ms), "loglevel": "1"},
            )
        finally:
            self._sock.settimeout(previous)
        return [_text(event.get("msg")) for event in events]

    def terminate(self, name: str, *, timeout_ms: int = 5_000) -> None:
        """Close the IKE SA `name` with all its children (force: do not wait for a dead peer's reply)."""
        self._call(
            f"terminate {name}", self._session.terminate, {"ike": name, "timeout": str(timeout_ms), "force": "yes"}
        )

    def list_sas(self, name: str | None = None) -> list[IkeSa]:
        filters = None if name is None else {"ike": name}
        return parse_list_sas(self._call("list-sas", self._session.list_sas, filters))
