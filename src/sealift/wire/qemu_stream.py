"""The two small documents a QEMU migration carries on its data stream besides QEMU's bytes.

`GuestSpec` is the first OPAQUE record of the stream (source -> destination):
what the destination needs to start a QEMU identical to the source's.
`Ready` is the one record of the back direction (destination -> source): its
QEMU listens, on this port (direct transports), with these extra data
streams for multifd. Both are sealed and covered by the stream digest like
every other record; these checks are about shape, so that a bug or a peer
that sends nonsense gets a ProtocolError naming the field, never a
TypeError deep in the agent. JSON objects with exactly the known keys, each
of its exact type (no "256" for 256, no floats, no duplicates).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from .errors import ProtocolError
from .vm_definition import MAX_DISKS, VmDefinition

QEMU_TRANSPORTS = ("sealift", "qemu-tls", "ipsec", "plain", "sealift-plain")
MAX_MULTIFD = 16  # multifd channels QEMU allows are more; more than this gains nothing on few cores
MAX_EXTRA_STREAMS = MAX_MULTIFD + MAX_DISKS  # multifd channels, then one per copied disk
SESSION_ID_BYTES = 16
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MAX_CMDLINE = 4096
MAX_SPEC_BYTES = 64 * 1024
_IMAGE_KEY = re.compile(r"[0-9a-f]{16,128}")


def _fail(document: str, problem: str) -> NoReturn:
    raise ProtocolError(f"the {document} is malformed: {problem}")


def _object(data: bytes, document: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if len(data) > MAX_SPEC_BYTES:
        _fail(document, f"{len(data)} bytes, at most {MAX_SPEC_BYTES}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            _fail(document, "a key appears twice")
        return dict(pairs)

    def no_float(text: str) -> NoReturn:
        _fail(document, f"a number with a fraction ({text})")

    try:
        raw = json.loads(data, object_pairs_hook=no_duplicates, parse_float=no_float, parse_constant=no_float)
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(document, f"not JSON ({exc})")
    if not isinstance(raw, dict):
        _fail(document, f"a JSON {type(raw).__name__}, not an object")
    missing, unknown = required - raw.keys(), raw.keys() - required - optional
    if missing or unknown:
        _fail(document, f"missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return raw


def _int(document: str, field: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        _fail(document, f"{field} must be an integer from {low} to {high}, not {value!r}")
    return value


def _str(document: str, field: str, value: object, max_chars: int) -> str:
    if type(value) is not str or len(value) > max_chars:
        _fail(document, f"{field} must be a string of at most {max_chars} characters")
    return value


@dataclass(frozen=True)
class GuestSpec:
    """What the destination needs to start a QEMU identical to the source's (the stream's first record)."""

    memory_mib: int
    extra_cmdline: str
    net: dict[str, object]  # NetConfig.to_json(); NetConfig.from_json checks its contents
    image_key: str
    transport: str | None = None  # None: a source from before the transport choice ("sealift"[-plain])
    multifd_channels: int = 0  # QEMU's multifd must be set the same on both ends
    xbzrle: bool = False
    postcopy: bool = False  # QEMU's postcopy-ram on both ends (its return path comes back on the stream)
    definition: VmDefinition | None = None  # None: one vCPU and no disk (and a source from before disks)

    def encode(self) -> bytes:
        data = asdict(self)
        data["definition"] = None if self.definition is None else self.definition.to_json()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> GuestSpec:
        doc = "guest description at the head of the QEMU stream"
        optional = {"transport", "multifd_channels", "xbzrle", "postcopy", "definition"}
        raw = _object(data, doc, {"memory_mib", "extra_cmdline", "net", "image_key"}, optional)
        net = raw["net"]
        if not isinstance(net, dict):
            _fail(doc, "net must be an object")
        image_key = _str(doc, "image_key", raw["image_key"], 128)
        if not _IMAGE_KEY.fullmatch(image_key):
            _fail(doc, "image_key must be 16-128 lowercase hex digits")
        transport = raw.get("transport")
        if transport is not None and transport not in QEMU_TRANSPORTS:
            _fail(doc, f"transport must be one of {QEMU_TRANSPORTS}, not {transport!r}")
        xbzrle, postcopy = raw.get("xbzrle", False), raw.get("postcopy", False)
        if type(xbzrle) is not bool:
            _fail(doc, "xbzrle must be true or false")
        if type(postcopy) is not bool:
            _fail(doc, "postcopy must be true or false")
        return cls(
            memory_mib=_int(doc, "memory_mib", raw["memory_mib"], 1, MAX_MEMORY_MIB),
            extra_cmdline=_str(doc, "extra_cmdline", raw["extra_cmdline"], MAX_CMDLINE),
            net=net,
            image_key=image_key,
            transport=transport,
            multifd_channels=_int(doc, "multifd_channels", raw.get("multifd_channels", 0), 0, 255),
            xbzrle=xbzrle,
            postcopy=postcopy,
            definition=None if raw.get("definition") is None else VmDefinition.from_json(raw["definition"]),
        )


@dataclass(frozen=True)
class Ready:
    """The destination QEMU listens: its port (direct transports), and the sessions of the extra data streams."""

    port: int | None
    extra_sessions: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {"ready": True, "port": self.port, "streams": [s.hex() for s in self.extra_sessions]}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Ready:
        doc = "destination's ready record"
        raw = _object(data, doc, {"ready", "port"}, {"streams"})
        if raw["ready"] is not True:
            _fail(doc, f"ready must be true, not {raw['ready']!r}")
        port = raw["port"]
        if port is not None:
            port = _int(doc, "port", port, 1, 65535)
        streams = raw.get("streams", [])
        if not isinstance(streams, list) or len(streams) > MAX_EXTRA_STREAMS:
            _fail(doc, f"streams must be a list of at most {MAX_EXTRA_STREAMS} session ids")
        sessions = []
        for stream in streams:
            if type(stream) is not str or not re.fullmatch(f"[0-9a-f]{{{2 * SESSION_ID_BYTES}}}", stream):
                _fail(doc, f"a session id must be {SESSION_ID_BYTES} bytes in lowercase hex, not {stream!r}")
            sessions.append(bytes.fromhex(stream))
        return cls(port, tuple(sessions))
