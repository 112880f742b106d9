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
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from functools import cache, partial
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
BACKENDS = ("builtin", "qemu", "libvirt")
RECEIPT_STAGES = ("prepared", "running")
OUTCOMES = ("committed", "aborted", "unknown")

_MIGRATION_ID = re.compile(r"[0-9a-f]{32}")
# Starts with a letter or digit so a name is never "..", "-x" or hidden.
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_VM_NAME_RULE = "1-64 characters [A-Za-z0-9._-], the first a letter or digit"
_HOST_RULE = "a host name of 1-253 characters [A-Za-z0-9.-]"
# A refusal's machine-readable reason (errors.py SealiftError.code): scripts and the audit log key on it.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CODE_RULE = "a snake_case reason code of 1-64 characters [a-z0-9_], the first a letter"
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
# Each takes (field, value) first, so the one table of wire fields (_FIELDS) can name them all.


def _fail(field: str, problem: str) -> NoReturn:
    raise ProtocolError(f"invalid field {field!r}: {problem}")


def _check_str(field: str, value: object) -> str:
    if type(value) is not str:
        _fail(field, f"expected a string, got {type(value).__name__}")
    return value


def _check_pattern(field: str, value: object, pattern: re.Pattern[str], what: str, max_chars: int = 253) -> str:
    text = _check_str(field, value)
    # Length first so a huge string never reaches the regex engine.
    if len(text) > max_chars or pattern.fullmatch(text) is None:
        _fail(field, f"expected {what}")
    return text


def _check_migration_id(field: str, value: object) -> None:
    _check_pattern(field, value, _MIGRATION_ID, "32 lowercase hex digits")


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


def _check_optional_envelope(field: str, value: object, max_bytes: int) -> None:
    if value is not None:
        _check_envelope(field, value, max_bytes)


def _check_int(field: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it
        _fail(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        _fail(field, f"{value} is outside {low}..{high}")
    return value


def _check_memory_bytes(field: str, value: object) -> None:
    memory_bytes = _check_int(field, value, PAGE_SIZE, MAX_MEMORY_BYTES)
    if memory_bytes % PAGE_SIZE:
        _fail(field, f"{memory_bytes} is not a multiple of the page size {PAGE_SIZE}")


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


def _check_psk_proof(field: str, value: object) -> None:
    if value is not None:
        _check_pattern(
            field,
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
# Wire fields: one table for every message


@dataclass(frozen=True, slots=True)
class _Field:
    """How one wire key is checked and carried in the JSON payload."""

    check: Callable[[str, object], object]  # (key, value); raises ProtocolError
    hex_size: int | None = None  # bytes of this size, carried as lowercase hex; None: a plain JSON value


# A key means the same in every message that has it, so one entry serves them all.
# A message's fields are checked in this order, whatever their order in the dataclass
# (page_size is checked before memory_bytes, whose check names the page size).
_FIELDS: dict[str, _Field] = {
    "migration_id": _Field(_check_migration_id),
    "vm_name": _Field(partial(_check_pattern, pattern=_VM_NAME, what=_VM_NAME_RULE)),
    "source_host": _Field(partial(_check_pattern, pattern=_HOST, what=_HOST_RULE)),
    "destination_host": _Field(partial(_check_pattern, pattern=_HOST, what=_HOST_RULE)),
    "nonce": _Field(partial(_check_bytes, size=NONCE_SIZE), hex_size=NONCE_SIZE),
    "session_id": _Field(partial(_check_bytes, size=SESSION_ID_SIZE), hex_size=SESSION_ID_SIZE),
    "page_size": _Field(partial(_check_int, low=PAGE_SIZE, high=PAGE_SIZE)),
    "memory_bytes": _Field(_check_memory_bytes),
    "secure": _Field(_check_bool),
    "compression": _Field(partial(_check_choice, choices=(None, *COMPRESSIONS))),
    "streams": _Field(partial(_check_int, low=1, high=MAX_STREAMS)),
    "backend": _Field(partial(_check_choice, choices=BACKENDS)),
    "order": _Field(partial(_check_optional_envelope, max_bytes=MAX_ORDER_BYTES)),
    "psk_proof": _Field(_check_psk_proof),
    "image_digest": _Field(partial(_check_choice, choices=(None, *IMAGE_DIGESTS))),
    "stage": _Field(partial(_check_choice, choices=RECEIPT_STAGES)),
    "reason": _Field(partial(_check_text, max_chars=MAX_REASON)),
    "code": _Field(partial(_check_pattern, pattern=_CODE, what=_CODE_RULE)),
    "envelope": _Field(partial(_check_envelope, max_bytes=MAX_ENVELOPE_BYTES)),
    "outcome": _Field(partial(_check_choice, choices=OUTCOMES)),
}


@cache
def _wire_fields(cls: type) -> tuple[tuple[str, _Field], ...]:
    """A message class's wire keys (its dataclass fields) with their entries, in _FIELDS order."""
    names = {f.name for f in fields(cls)}
    unknown = names - _FIELDS.keys()
    if unknown:
        raise TypeError(f"{cls.__name__} has fields with no wire entry: {sorted(unknown)}")
    return tuple((key, spec) for key, spec in _FIELDS.items() if key in names)


# ---------------------------------------------------------------------------
# Messages


class _Message:
    """Checks, to_json and from_json for a message, from its dataclass fields and _FIELDS.

    __post_init__ checks every value, so a message object that exists is valid
    whether it was built locally or parsed.
    """

    __slots__ = ()
    TYPE: ClassVar[MessageType]
    KEYS: ClassVar[frozenset[str]]  # the wire keys, set below for every message class

    def __post_init__(self) -> None:
        for key, spec in _wire_fields(type(self)):  # type: ignore[arg-type]  # classes are hashable (mypy#11470)
            spec.check(key, getattr(self, key))

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, spec in _wire_fields(type(self)):  # type: ignore[arg-type]  # classes are hashable (mypy#11470)
            value = getattr(self, key)
            obj[key] = value.hex() if spec.hex_size is not None else value
        return obj

    @classmethod
    def from_json(cls, obj: object) -> Self:
        d = _expect_keys(obj, cls.KEYS, cls.__name__)
        values = {
            key: d[key] if spec.hex_size is None else _hex_field(d, key, spec.hex_size)
            for key, spec in _wire_fields(cls)  # type: ignore[arg-type]  # classes are hashable (mypy#11470)
        }
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """Source → destination: proposes a migration."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO

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
    image_digest: str | None = (
        "tags"  # the image check both sides compute (backends/builtin/digest.py); None = no digest
    )


@dataclass(frozen=True, slots=True)
class Accept(_Message):
    """Destination → source: agrees, with its own nonce and the session id."""

    TYPE: ClassVar[MessageType] = MessageType.ACCEPT

    migration_id: str
    nonce: bytes
    session_id: bytes
    psk_proof: str | None


@dataclass(frozen=True, slots=True)
class Refuse(_Message):
    """Destination → source: will not take this migration (ends the conversation)."""

    TYPE: ClassVar[MessageType] = MessageType.REFUSE

    migration_id: str
    reason: str
    code: str = "refused"  # why, for machines: the refusing error's code (e.g. no_memory_capacity, expired)


@dataclass(frozen=True, slots=True)
class Manifest(_Message):
    """Source → destination: the signed manifest (opaque here)."""

    TYPE: ClassVar[MessageType] = MessageType.MANIFEST

    migration_id: str
    envelope: str


@dataclass(frozen=True, slots=True)
class Receipt(_Message):
    """Destination → source: signed receipt for stage "prepared" or "running"."""

    TYPE: ClassVar[MessageType] = MessageType.RECEIPT

    migration_id: str
    stage: str
    envelope: str


@dataclass(frozen=True, slots=True)
class Commit(_Message):
    """Source → destination: the source has durably decided; start the guest."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT

    migration_id: str


@dataclass(frozen=True, slots=True)
class Abort(_Message):
    """Either side: the migration is abandoned (ends the conversation)."""

    TYPE: ClassVar[MessageType] = MessageType.ABORT

    migration_id: str
    reason: str
    code: str = "aborted"  # why, for machines: the failing error's code (e.g. record_auth_failed)


@dataclass(frozen=True, slots=True)
class OutcomeQuery(_Message):
    """Destination (as client) → source: what did you decide for this migration?"""

    TYPE: ClassVar[MessageType] = MessageType.OUTCOME_QUERY

    migration_id: str


@dataclass(frozen=True, slots=True)
class Outcome(_Message):
    """Answer to OutcomeQuery: "committed", "aborted" or "unknown"."""

    TYPE: ClassVar[MessageType] = MessageType.OUTCOME

    migration_id: str
    outcome: str


@dataclass(frozen=True, slots=True)
class AdvertQuery(_Message):
    """Client → server: send me your signed resource advert. `migration_id` is a request id."""

    TYPE: ClassVar[MessageType] = MessageType.ADVERT_QUERY

    migration_id: str


@dataclass(frozen=True, slots=True)
class Advert(_Message):
    """Answer to AdvertQuery: the host's signed, timestamped resource advert (opaque to wire)."""

    TYPE: ClassVar[MessageType] = MessageType.ADVERT

    migration_id: str
    envelope: str


Message: TypeAlias = (
    Hello | Accept | Refuse | Manifest | Receipt | Commit | Abort | OutcomeQuery | Outcome | AdvertQuery | Advert
)

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Accept, Refuse, Manifest, Receipt, Commit, Abort, OutcomeQuery, Outcome, AdvertQuery, Advert)
}

# Each class's KEYS are its dataclass fields; one missing from _FIELDS fails here, at import.
for _cls in MESSAGE_CLASSES.values():
    _cls.KEYS = frozenset(key for key, _ in _wire_fields(_cls))  # type: ignore[arg-type]  # classes are hashable (mypy#11470)
del _cls


# ---------------------------------------------------------------------------
# Canonical JSON and frames


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The one accepted encoding: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


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
        raise ProtocolError(f"{type(msg).__name__} payload of {len(payload)} bytes exceeds limit {MAX_CONTROL_PAYLOAD}")
    return payload


def encode_frame(msg: Message) -> bytes:
    """Header + canonical JSON payload for one message."""
    payload = encode_payload(msg)
    return FRAME_HEADER.pack(PROTOCOL_VERSION, msg.TYPE, 0, len(payload)) + payload


def parse_frame_header(header: bytes | bytearray | memoryview) -> tuple[MessageType, int]:
    """Validate a frame header before any payload is read; returns (type, payload length)."""
    if len(header) != FRAME_HEADER_SIZE:
        raise ProtocolError(f"control frame header must be {FRAME_HEADER_SIZE} bytes, got {len(header)}")
    version, type_code, flags, length = FRAME_HEADER.unpack(header)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {version} is not supported (this host speaks {PROTOCOL_VERSION})"
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
        raise ProtocolError(f"control frame length {len(payload)} exceeds limit {MAX_CONTROL_PAYLOAD}")
    cls = MESSAGE_CLASSES[msg_type]
    msg = cls.from_json(_parse_json(payload))
    if canonical_json(msg.to_json()) != payload:
        raise ProtocolError(f"{cls.__name__} payload is not in canonical JSON form")
    return msg
