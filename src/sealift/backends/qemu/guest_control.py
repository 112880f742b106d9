"""The QEMU test guest's control channel: drive its workload at run time, over its UDP service.

The guest workload (guest/workload.c) obeys control lines on its probe port
when its kernel command line carries a token (``sealift.ctl=HEX``), so an
agent can turn a running guest abnormal, as a compromised VM would be (the
monitors' tests and the lab's T12):

- ``storm``: a write storm, every page of its region as fast as it can;
- ``rate MIB``: a paced dirty rate again;
- ``flood A.B.C.D PORT PPS SECONDS [BYTES]``: an outbound UDP flood, bounded
  by the guest (at most 20000 packets/s, 30 s, 1400 bytes a datagram);
- ``stop``: the flood ends; ``restore``: the boot behaviour again;
- ``status``: nothing changes.

A request is ``sealift-ctl TOKEN ID COMMAND ARGS``; the answer
``sealift-ack ID COMMAND key=value...`` or ``sealift-nak ID REASON``. UDP
may lose either, so the client sends again with the same ID, and the guest
answers a repeated ID without acting twice.

The token is a capability against other hosts on the VM network, not
secrecy against a sniffer of it: it travels in clear (see workload.c).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import time
from dataclasses import dataclass

__all__ = [
    "GuestControl",
    "GuestControlError",
    "GuestState",
    "MAX_FLOOD_BYTES",
    "MAX_FLOOD_PPS",
    "MAX_FLOOD_S",
    "TOKEN_ARG",
    "new_token",
    "parse_answer",
    "request_line",
    "token_from_cmdline",
    "with_token",
]

TOKEN_ARG = "sealift.ctl"
CTL_WORD = "sealift-ctl"
# The guest's own caps (workload.c): checked here too, for a clear error before sending.
MAX_FLOOD_PPS = 20_000
MAX_FLOOD_S = 30
MIN_FLOOD_BYTES = 16
MAX_FLOOD_BYTES = 1400
MAX_RATE_MIB = 4096
_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{16,64}$")
_STATE_RE = re.compile(r"(\w+)=(-?\d+)")


class GuestControlError(Exception):
    """The guest refused a control request, or did not answer it."""


def new_token() -> str:
    """A fresh per-VM control token (128 bits, hex)."""
    return secrets.token_hex(16)


def token_from_cmdline(cmdline: str) -> str | None:
    """The control token in a guest kernel command line, if it has a valid one."""
    for word in cmdline.split():
        if word.startswith(TOKEN_ARG + "="):
            value = word.split("=", 1)[1]
            return value if _TOKEN_RE.match(value) else None
    return None


def with_token(cmdline: str, token: str) -> str:
    """`cmdline` with `token` as its control token (an existing one is kept)."""
    if not _TOKEN_RE.match(token):
        raise ValueError("a control token is 16-64 hex digits")
    if token_from_cmdline(cmdline) is not None:
        return cmdline
    return " ".join(filter(None, (cmdline.strip(), f"{TOKEN_ARG}={token}")))


@dataclass(frozen=True)
class GuestState:
    """What the guest reports in an acknowledgement."""

    command: str
    counter: int
    rate_mib: int
    storm: bool
    flood_pps: int
    flood_left_ms: int
    flood_sent: int

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def request_line(token: str, request_id: str, command: str, *args: object) -> bytes:
    words = [CTL_WORD, token, request_id, command, *(str(a) for a in args)]
    if any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"control words must be non-empty and without spaces: {words[2:]}")
    return " ".join(words).encode()


def parse_answer(data: bytes, request_id: str) -> GuestState | None:
    """The guest's state from an ack to `request_id`; None if `data` answers something else.

    A nak raises GuestControlError with the guest's reason.
    """
    text = data.decode("ascii", "replace").strip()
    kind, _, rest = text.partition(" ")
    answered, _, rest = rest.partition(" ")
    if kind not in ("sealift-ack", "sealift-nak") or answered != request_id:
        return None
    if kind == "sealift-nak":
        raise GuestControlError(f"the guest refused: {rest}")
    command, _, fields = rest.partition(" ")
    values = {key: int(value) for key, value in _STATE_RE.findall(fields)}
    try:
        return GuestState(
            command,
            values["counter"],
            values["rate_mib"],
            bool(values["storm"]),
            values["flood_pps"],
            values["flood_left_ms"],
            values["flood_sent"],
        )
    except KeyError as exc:
        raise GuestControlError(f"the guest's acknowledgement lacks {exc}: {text!r}") from None


class GuestControl:
    """Drives one guest's workload over UDP (`address`: where its service is reachable from here)."""

    def __init__(self, address: tuple[str, int], token: str, timeout: float = 0.5, attempts: int = 6) -> None:
        if not _TOKEN_RE.match(token):
            raise ValueError("a control token is 16-64 hex digits")
        self.address = address
        self._token = token
        self._timeout = timeout
        self._attempts = attempts

    def request(self, command: str, *args: object) -> GuestState:
        """Send one command (again, with the same ID, until answered); the guest's state after it."""
        request_id = secrets.token_hex(6)
        line = request_line(self._token, request_id, command, *args)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(self._attempts):
                try:
                    sock.sendto(line, self.address)
                except OSError as exc:
                    raise GuestControlError(f"cannot reach the guest at {_where(self.address)}: {exc}") from exc
                deadline = time.monotonic() + self._timeout
                while (remaining := deadline - time.monotonic()) > 0:
                    sock.settimeout(remaining)
                    try:
                        data = sock.recv(512)
                    except TimeoutError:
                        break
                    except OSError as exc:  # ICMP refused: nothing listens there (yet)
                        raise GuestControlError(f"the guest at {_where(self.address)} refused: {exc}") from exc
                    state = parse_answer(data, request_id)
                    if state is not None:
                        return state
        raise GuestControlError(
            f"no answer from the guest at {_where(self.address)} to {command!r} after {self._attempts} tries"
        )

    def storm(self) -> GuestState:
        return self.request("storm")

    def rate(self, mib_per_s: int) -> GuestState:
        if not 0 <= mib_per_s <= MAX_RATE_MIB:
            raise GuestControlError(f"a dirty rate is within 0..{MAX_RATE_MIB} MiB/s, not {mib_per_s}")
        return self.request("rate", mib_per_s)

    def flood(self, target: tuple[str, int], pps: int, seconds: int, size: int = 1000) -> GuestState:
        check_flood(target, pps, seconds, size)
        return self.request("flood", target[0], target[1], pps, seconds, size)

    def stop(self) -> GuestState:
        return self.request("stop")

    def restore(self) -> GuestState:
        return self.request("restore")

    def status(self) -> GuestState:
        return self.request("status")


def check_flood(target: tuple[str, int], pps: int, seconds: int, size: int) -> None:
    """Raises GuestControlError unless the guest would accept this flood."""
    try:
        address = ipaddress.IPv4Address(target[0])
    except ValueError:
        raise GuestControlError(f"a flood target is an IPv4 address, not {target[0]!r}") from None
    if address.is_multicast or address.is_unspecified or int(address) >> 24 == 0 or int(address) >> 24 >= 224:
        raise GuestControlError(f"a flood target is a unicast IPv4 address, not {address}")
    if not 0 < target[1] < 65536:
        raise GuestControlError(f"a flood target port is within 1..65535, not {target[1]}")
    if not (0 < pps <= MAX_FLOOD_PPS and 0 < seconds <= MAX_FLOOD_S and MIN_FLOOD_BYTES <= size <= MAX_FLOOD_BYTES):
        raise GuestControlError(
            f"a guest flood is at most {MAX_FLOOD_PPS} packets/s for {MAX_FLOOD_S} s of "
            f"{MIN_FLOOD_BYTES}-{MAX_FLOOD_BYTES} bytes; asked {pps}/s for {seconds} s "
            f"of {size}"
        )


def _where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
