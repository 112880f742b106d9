"""Control-connection messages and their frames.

A frame is an 8-byte header (`version u8, type u8, flags u16, length u32`,
network order) followed by `length` bytes of canonical JSON: one object,
UTF-8, sorted keys, no whitespace, no floats/NaN. Every message is a frozen
dataclass whose fields are checked on construction, so a message object
that exists is a valid message, whether it was built locally or parsed.

The decoder accepts only the canonical encoding (it re-encodes and
compares), so one message has exactly one byte representation: no
duplicate keys, no escape variants, no whitespace games.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, NoReturn, Self, TypeAlias

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_CONTROL_PAYLOAD = 65536
FRAME_HEADER = struct.Struct("!BBHI")
FRAME_HEADER_SIZE = FRAME_HEADER.size

PAGE_SIZE = 4096
MAX_MEMORY_BYTES = 1 << 40  # 1 TiB
MAX_STREAMS = 8
MAX_REASON = 1024
MAX_ORDER_BYTES = 16 * 1024
MAX_ENVELOPE_BYTES = 32 * 1024
MAX_PSK_PROOF_HEX = 128
NONCE_SIZE = 32
SESSION_ID_SIZE = 16

COMPRESSIONS = ("zstd", "lz4")
IMAGE_DIGESTS = ("tags", "blake3")
BACKENDS = ("builtin", "qemu")
RECEIPT_STAGES = ("prepared", "running")
OUTCOMES = ("committed", "aborted", "unknown")

_MIGRATION_ID = re.compile(r"[0-9a-f]{32}")
# Starts with a letter or digit so a name is never "..", "-x" or hidden.
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_VM_NAME_RULE = "1-64 characters [A-Za-z0-9._-], the first a letter or digit"
_HOST_RULE = "a host name of 1-253 characters [A-Za-z0-9.-]"
_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})+")
# Shown to operators: no terminal control, no bidi overrides, no surrogates.
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class MessageType(IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    MANIFEST = 4
    RECEIPT = 5
    COMMIT = 6
    ABORT = 7
    OUTCOME_QUERY = 8
    OUTCOME = 9
    ADVERT_QUERY = 10
    ADVERT = 11


# ---------------------------------------------------------------------------
# Field checks: each raises ProtocolError naming the field and what it should be.


def _fail(field: str, problem: str) -> NoReturn:
    raise ProtocolError(f"invalid field {field!r}: {problem}")


def _check_str(field: str, value: object) -> str:
    if type(value) is not str:
        _fail(field, f"expected a string, got {type(value).__name__}")
    return value


def _check_pattern(
    field: str, value: object, pattern: re.Pattern[str], what: str, max_chars: int = 253
) -> str:
    text = _check_str(field, value)
    # Length first so a huge string never reaches the regex engine.
    if len(text) > max_chars or pattern.fullmatch(text) is None:
        _fail(field, f"expected {what}")
    return text


def _check_migration_id(value: object) -> None:
    _check_pattern("migration_id", value, _MIGRATION_ID, "32 lowercase hex digits")


def _check_text(field: str, value: object, max_chars: int) -> None:
    text = _check_str(field, value)
    if len(text) > max_chars:
        _fail(field, f"{len(text)} characters exceeds limit {max_chars}")
    if _UNSAFE_TEXT.search(text):
        _fail(field, "contains control, bidi-override or surrogate characters")


def _check_envelope(field: str, value: object, max_bytes: int) -> None:
    text = _check_str(field, value)
    if len(text) > max_bytes:  # never fewer bytes than characters
        _fail(field, f"longer than {max_bytes} bytes")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        _fail(field, "not encodable as UTF-8 (lone surrogate)")
    if size == 0 or size > max_bytes:
        _fail(field, f"{size} bytes is outside 1..{max_bytes}")


def _check_int(field: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it
        _fail(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        _fail(field, f"{value} is outside {low}..{high}")
    return value


def _check_bool(field: str, value: object) -> None:
    if type(value) is not bool:
        _fail(field, f"expected true or false, got {type(value).__name__}")


def _check_choice(field: str, value: object, choices: tuple[str | None, ...]) -> None:
    if value is not None:
        _check_str(field, value)
    if value not in choices:
        _fail(field, f"expected one of {list(choices)}")


def _check_bytes(field: str, value: object, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        _fail(field, f"expected {size} bytes")


def _check_psk_proof(value: object) -> None:
    if value is not None:
        _check_pattern(
            "psk_proof",
            value,
            _LOWER_HEX,
            f"null or an even number (2..{MAX_PSK_PROOF_HEX}) of lowercase hex digits",
            max_chars=MAX_PSK_PROOF_HEX,
        )


def _hex_field(obj: dict[str, Any], field: str, size: int) -> bytes:
    """Decode a fixed-size lowercase-hex JSON field into bytes."""
    what = f"{2 * size} lowercase hex digits"
    text = _check_pattern(field, obj[field], _LOWER_HEX, what, max_chars=2 * size)
    if len(text) != 2 * size:
        _fail(field, f"expected {what}")
    return bytes.fromhex(text)


def _expect_keys(obj: object, keys: frozenset[str], name: str) -> dict[str, Any]:
    if type(obj) is not dict:
        raise ProtocolError(f"{name} payload must be a JSON object")
    present = set(obj)
    if present != keys:
        missing = sorted(keys - present)
        extra = sorted(str(k)[:64] for k in present - keys)
        raise ProtocolError(f"{name} fields wrong: missing {missing}, unexpected {extra}")
    return obj


# ---------------------------------------------------------------------------
# Messages


class _FlatMessage:
    """to_json/from_json for a message whose fields are its wire keys (KEYS), each a plain JSON value.

    The dataclass's own __post_init__ checks every value, from either side.
    """

    __slots__ = ()
    KEYS: ClassVar[frozenset[str]]

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        d = _expect_keys(obj, cls.KEYS, cls.__name__)
        return cls(**{key: d[key] for key in cls.KEYS})


@dataclass(frozen=True, slots=True)
class Hello:
    """Source → destination: proposes a migration."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "migration_id",
            "vm_name",
            "source_host",
            "destination_host",
            "nonce",
            "memory_bytes",
            "page_size",
            "secure",
            "compression",
            "streams",
            "backend",
            "order",
            "psk_proof",
            "image_digest",
        }
    )

    migration_id: str
    vm_name: str
    source_host: str
    destination_host: str
    nonce: bytes
    memory_bytes: int
    page_size: int
    secure: bool
    compression: str | None
    streams: int
    backend: str
    order: str | None
    psk_proof: str | None
    image_digest: str | None = "tags"  # the image check both sides compute (backends/builtin/digest.py); None = no digest

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_pattern("vm_name", self.vm_name, _VM_NAME, _VM_NAME_RULE)
        _check_pattern("source_host", self.source_host, _HOST, _HOST_RULE)
        _check_pattern("destination_host", self.destination_host, _HOST, _HOST_RULE)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)
        _check_int("page_size", self.page_size, PAGE_SIZE, PAGE_SIZE)
        _check_int("memory_bytes", self.memory_bytes, PAGE_SIZE, MAX_MEMORY_BYTES)
        if self.memory_bytes % PAGE_SIZE:
            _fail(
                "memory_bytes",
                f"{self.memory_bytes} is not a multiple of the page size {PAGE_SIZE}",
            )
        _check_bool("secure", self.secure)
        _check_choice("compression", self.compression, (None, *COMPRESSIONS))
        _check_int("streams", self.streams, 1, MAX_STREAMS)
        _check_choice("backend", self.backend, BACKENDS)
        if self.order is not None:
            _check_envelope("order", self.order, MAX_ORDER_BYTES)
        _check_psk_proof(self.psk_proof)
        _check_choice("image_digest", self.image_digest, (None, *IMAGE_DIGESTS))

    def to_json(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "vm_name": self.vm_name,
            "source_host": self.source_host,
            "destination_host": self.destination_host,
            "nonce": self.nonce.hex(),
            "memory_bytes": self.memory_bytes,
            "page_size": self.page_size,
            "secure": self.secure,
            "compression": self.compression,
            "streams": self.streams,
            "backend": self.backend,
            "order": self.order,
            "psk_proof": self.psk_proof,
            "image_digest": self.image_digest,
        }

    @classmethod
    def from_json(cls, obj: object) -> Self:
        d = _expect_keys(obj, cls.KEYS, "Hello")
        return cls(
            migration_id=d["migration_id"],
            vm_name=d["vm_name"],
            source_host=d["source_host"],
            destination_host=d["destination_host"],
            nonce=_hex_field(d, "nonce", NONCE_SIZE),
            memory_bytes=d["memory_bytes"],
            page_size=d["page_size"],
            secure=d["secure"],
            compression=d["compression"],
            streams=d["streams"],
            backend=d["backend"],
            order=d["order"],
            psk_proof=d["psk_proof"],
            image_digest=d["image_digest"],
        )


@dataclass(frozen=True, slots=True)
class Accept:
    """Destination → source: agrees, with its own nonce and the session id."""

    TYPE: ClassVar[MessageType] = MessageType.ACCEPT
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "nonce", "session_id", "psk_proof"})

    migration_id: str
    nonce: bytes
    session_id: bytes
    psk_proof: str | None

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)
        _check_bytes("session_id", self.session_id, SESSION_ID_SIZE)
        _check_psk_proof(self.psk_proof)

    def to_json(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "nonce": self.nonce.hex(),
            "session_id": self.session_id.hex(),
            "psk_proof": self.psk_proof,
        }

    @classmethod
    def from_json(cls, obj: object) -> Self:
        d = _expect_keys(obj, cls.KEYS, "Accept")
        return cls(
            migration_id=d["migration_id"],
            nonce=_hex_field(d, "nonce", NONCE_SIZE),
            session_id=_hex_field(d, "session_id", SESSION_ID_SIZE),
            psk_proof=d["psk_proof"],
        )


@dataclass(frozen=True, slots=True)
class Refuse(_FlatMessage):
    """Destination → source: will not take this migration (ends the conversation)."""

    TYPE: ClassVar[MessageType] = MessageType.REFUSE
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "reason"})

    migration_id: str
    reason: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_text("reason", self.reason, MAX_REASON)


@dataclass(frozen=True, slots=True)
class Manifest(_FlatMessage):
    """Source → destination: the signed manifest (opaque here)."""

    TYPE: ClassVar[MessageType] = MessageType.MANIFEST
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "envelope"})

    migration_id: str
    envelope: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_envelope("envelope", self.envelope, MAX_ENVELOPE_BYTES)


@dataclass(frozen=True, slots=True)
class Receipt(_FlatMessage):
    """Destination → source: signed receipt for stage "prepared" or "running"."""

    TYPE: ClassVar[MessageType] = MessageType.RECEIPT
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "stage", "envelope"})

    migration_id: str
    stage: str
    envelope: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_choice("stage", self.stage, RECEIPT_STAGES)
        _check_envelope("envelope", self.envelope, MAX_ENVELOPE_BYTES)


@dataclass(frozen=True, slots=True)
class Commit(_FlatMessage):
    """Source → destination: the source has durably decided; start the guest."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id"})

    migration_id: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)


@dataclass(frozen=True, slots=True)
class Abort(_FlatMessage):
    """Either side: the migration is abandoned (ends the conversation)."""

    TYPE: ClassVar[MessageType] = MessageType.ABORT
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "reason"})

    migration_id: str
    reason: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_text("reason", self.reason, MAX_REASON)


@dataclass(frozen=True, slots=True)
class OutcomeQuery(_FlatMessage):
    """Destination (as client) → source: what did you decide for this migration?"""

    TYPE: ClassVar[MessageType] = MessageType.OUTCOME_QUERY
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id"})

    migration_id: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)


@dataclass(frozen=True, slots=True)
class Outcome(_FlatMessage):
    """Answer to OutcomeQuery: "committed", "aborted" or "unknown"."""

    TYPE: ClassVar[MessageType] = MessageType.OUTCOME
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "outcome"})

    migration_id: str
    outcome: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_choice("outcome", self.outcome, OUTCOMES)


@dataclass(frozen=True, slots=True)
class AdvertQuery(_FlatMessage):
    """Client → server: send me your signed resource advert. `migration_id` is a request id."""

    TYPE: ClassVar[MessageType] = MessageType.ADVERT_QUERY
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id"})

    migration_id: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)


@dataclass(frozen=True, slots=True)
class Advert(_FlatMessage):
    """Answer to AdvertQuery: the host's signed, timestamped resource advert (opaque to wire)."""

    TYPE: ClassVar[MessageType] = MessageType.ADVERT
    KEYS: ClassVar[frozenset[str]] = frozenset({"migration_id", "envelope"})

    migration_id: str
    envelope: str

    def __post_init__(self) -> None:
        _check_migration_id(self.migration_id)
        _check_envelope("envelope", self.envelope, MAX_ENVELOPE_BYTES)


Message: TypeAlias = (
    Hello | Accept | Refuse | Manifest | Receipt | Commit | Abort | OutcomeQuery | Outcome | AdvertQuery | Advert
)

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Accept, Refuse, Manifest, Receipt, Commit, Abort, OutcomeQuery, Outcome, AdvertQuery, Advert)
}


# ---------------------------------------------------------------------------
# Canonical JSON and frames


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The one accepted encoding: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ProtocolError("control payload has duplicate JSON keys")
    return result


def _reject_float(text: str) -> NoReturn:
    raise ProtocolError("control payload contains a non-integer number")


def _reject_constant(text: str) -> NoReturn:
    raise ProtocolError(f"control payload contains {text[:16]}, which JSON does not allow")


def _parse_json(payload: bytes) -> object:
    try:
        text = payload.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_float=_reject_float,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError:
        raise ProtocolError("control payload is not valid UTF-8") from None
    except RecursionError:
        raise ProtocolError("control payload JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits
        raise ProtocolError(f"control payload is not valid JSON: {str(exc)[:80]}") from None


def encode_payload(msg: Message) -> bytes:
    payload = canonical_json(msg.to_json())
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(
            f"{type(msg).__name__} payload of {len(payload)} bytes "
            f"exceeds limit {MAX_CONTROL_PAYLOAD}"
        )
    return payload


def encode_frame(msg: Message) -> bytes:
    """Header + canonical JSON payload for one message."""
    payload = encode_payload(msg)
    return FRAME_HEADER.pack(PROTOCOL_VERSION, msg.TYPE, 0, len(payload)) + payload


def parse_frame_header(header: bytes | bytearray | memoryview) -> tuple[MessageType, int]:
    """Validate a frame header before any payload is read; returns (type, payload length)."""
    if len(header) != FRAME_HEADER_SIZE:
        raise ProtocolError(
            f"control frame header must be {FRAME_HEADER_SIZE} bytes, got {len(header)}"
        )
    version, type_code, flags, length = FRAME_HEADER.unpack(header)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {version} is not supported "
            f"(this host speaks {PROTOCOL_VERSION})"
        )
    if type_code not in MESSAGE_CLASSES:
        raise ProtocolError(f"unknown control message type {type_code}")
    if flags != 0:
        raise ProtocolError(f"control frame flags 0x{flags:04x} are not supported (must be 0)")
    if length > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(f"control frame length {length} exceeds limit {MAX_CONTROL_PAYLOAD}")
    return MessageType(type_code), length


def decode_payload(msg_type: MessageType, payload: bytes) -> Message:
    """Parse and check one payload; only the canonical encoding is accepted."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(
            f"control frame length {len(payload)} exceeds limit {MAX_CONTROL_PAYLOAD}"
        )
    cls = MESSAGE_CLASSES[msg_type]
    msg = cls.from_json(_parse_json(payload))
    if canonical_json(msg.to_json()) != payload:
        raise ProtocolError(f"{cls.__name__} payload is not in canonical JSON form")
    return msg
