"""Control messages: encoding, strict decoding, field checks, frame headers."""

from __future__ import annotations

import json
import struct

import pytest

from sealift.wire import (
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    Abort,
    Hello,
    Manifest,
    MessageType,
    Outcome,
    ProtocolError,
    Receipt,
    Refuse,
)
from sealift.wire.messages import (
    FRAME_HEADER,
    canonical_json,
    decode_payload,
    encode_frame,
    encode_payload,
    parse_frame_header,
)
from wire_samples import MID, accept, all_messages, hello


def hello_json(**changes: object) -> bytes:
    obj = hello().to_json()
    obj.update(changes)
    return canonical_json(obj)


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: object) -> None:
    assert type(msg).from_json(msg.to_json()) == msg  # type: ignore[attr-defined]
    frame = encode_frame(msg)  # type: ignore[arg-type]
    msg_type, length = parse_frame_header(frame[:8])
    assert msg_type is msg.TYPE  # type: ignore[attr-defined]
    assert length == len(frame) - 8
    assert decode_payload(msg_type, frame[8:]) == msg


def test_payload_is_canonical_json() -> None:
    payload = encode_payload(hello())
    assert (
        payload == json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert b" " not in payload
    assert b'"nonce":"' + b"11" * 32 + b'"' in payload


# -- strict decoding ---------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b'"a string"',
        b"null",
        b"{}",
        b"[" * 5000 + b"]" * 5000,
        b'{"migration_id":' + b"1" * 5000 + b"}",
        b'{"migration_id":NaN}',
        b'{"migration_id":1.5}',
        b'{"migration_id":"' + MID.encode() + b'","migration_id":"' + MID.encode() + b'"}',
        b'{ "migration_id":"' + MID.encode() + b'"}',  # not canonical: whitespace
        b'{"migration_id":"' + MID.upper().encode() + b'"}',
        b'{"migration_id":"' + MID.encode() + b'","extra":1}',
        b'{"migration_id":"\\u0030123456789abcdef0123456789abcdef"}',  # escaped, not canonical
    ],
)
def test_malformed_commit_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_payload(MessageType.COMMIT, payload)


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_bytes": "4096"},  # string for int
        {"memory_bytes": True},  # bool is not an int here
        {"memory_bytes": 4097},  # not a page multiple
        {"memory_bytes": 0},
        {"memory_bytes": (1 << 40) + 4096},  # above 1 TiB
        {"page_size": 8192},
        {"secure": 1},
        {"secure": "yes"},
        {"streams": 0},
        {"streams": 9},
        {"compression": "gzip"},
        {"compression": ""},
        {"backend": "xen"},
        {"vm_name": ""},
        {"vm_name": "a" * 65},
        {"vm_name": "../etc"},
        {"vm_name": "-rf"},
        {"vm_name": "vm name"},
        {"vm_name": "vm\u00e9"},
        {"source_host": ""},
        {"source_host": "a" * 254},
        {"destination_host": "host_b"},
        {"nonce": "11" * 31},
        {"nonce": "11" * 33},
        {"nonce": "AB" * 32},
        {"nonce": "zz" * 32},
        {"nonce": None},
        {"order": ""},
        {"order": "x" * (16 * 1024 + 1)},
        {"order": 5},
        {"psk_proof": "abc"},
        {"psk_proof": "ab" * 65},
        {"psk_proof": "AB"},
        {"psk_proof": ""},
        {"migration_id": MID[:-1]},
        {"migration_id": None},
        {"migration_id": [MID]},
    ],
    ids=repr,
)
def test_hello_field_checks(changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_payload(MessageType.HELLO, hello_json(**changes))
    assert info.value.reason  # operator-readable


def test_hello_missing_and_extra_fields() -> None:
    obj = hello().to_json()
    del obj["streams"]
    with pytest.raises(ProtocolError, match="missing \\['streams'\\]"):
        decode_payload(MessageType.HELLO, canonical_json(obj))
    obj = hello().to_json()
    obj["admin"] = True
    with pytest.raises(ProtocolError, match="unexpected \\['admin'\\]"):
        decode_payload(MessageType.HELLO, canonical_json(obj))


def test_payload_of_one_type_is_not_accepted_as_another() -> None:
    with pytest.raises(ProtocolError):
        decode_payload(MessageType.ACCEPT, encode_payload(hello()))


def test_hello_bounds_accepted_at_the_edges() -> None:
    edge = hello(
        vm_name="a" * 64,
        source_host="h" * 253,
        memory_bytes=1 << 40,
        streams=8,
        order="o" * 16 * 1024,
        psk_proof="f" * 128,
    )
    assert decode_payload(MessageType.HELLO, encode_payload(edge)) == edge


@pytest.mark.parametrize(
    "build",
    [
        lambda: hello(nonce=b"\x00" * 31),
        lambda: hello(nonce=bytearray(32)),
        lambda: accept(session_id=b"\x00" * 15),
        lambda: Refuse(MID, "x" * 1025),
        lambda: Abort(MID, "bad\x1b[31m red"),
        lambda: Abort(MID, "spoof \u202e txt"),
        lambda: Abort(MID, "lone \ud800"),
        lambda: Manifest(MID, "e" * (32 * 1024 + 1)),
        lambda: Manifest(MID, "é" * (16 * 1024 + 1)),  # counted in UTF-8 bytes
        lambda: Manifest(MID, ""),
        lambda: Receipt(MID, "done", "e"),
        lambda: Outcome(MID, "maybe"),
    ],
)
def test_invalid_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(ProtocolError):
        build()  # type: ignore[operator]


def test_long_reason_and_envelope_at_limit() -> None:
    assert len(Refuse(MID, "r" * 1024).reason) == 1024
    manifest = Manifest(MID, "e" * 32 * 1024)
    assert decode_payload(MessageType.MANIFEST, encode_payload(manifest)) == manifest


def test_encoding_refuses_payload_above_limit() -> None:
    # 32 KiB of quotes escapes to 64 KiB: still a valid Manifest, but too big to frame.
    with pytest.raises(ProtocolError, match="exceeds limit"):
        encode_frame(Manifest(MID, '"' * 32 * 1024))


# -- frame headers -----------------------------------------------------------


def test_frame_header_checks() -> None:
    good = FRAME_HEADER.pack(PROTOCOL_VERSION, MessageType.HELLO, 0, 10)
    assert parse_frame_header(good) == (MessageType.HELLO, 10)
    assert parse_frame_header(FRAME_HEADER.pack(1, 9, 0, MAX_CONTROL_PAYLOAD))[1] == 65536
    cases = {
        FRAME_HEADER.pack(2, 1, 0, 10): "version 2",
        FRAME_HEADER.pack(0, 1, 0, 10): "version 0",
        FRAME_HEADER.pack(1, 0, 0, 10): "unknown control message type 0",
        FRAME_HEADER.pack(1, 12, 0, 10): "unknown control message type 12",
        FRAME_HEADER.pack(1, 1, 1, 10): "flags",
        FRAME_HEADER.pack(1, 1, 0x8000, 10): "flags",
        FRAME_HEADER.pack(1, 1, 0, MAX_CONTROL_PAYLOAD + 1): "exceeds limit 65536",
        FRAME_HEADER.pack(1, 1, 0, 2**32 - 1): "length 4294967295 exceeds",
        b"\x01\x01\x00": "8 bytes",
    }
    for header, reason in cases.items():
        with pytest.raises(ProtocolError, match=reason):
            parse_frame_header(header)


def test_hello_is_a_frozen_value() -> None:
    msg = hello()
    with pytest.raises(AttributeError):
        msg.vm_name = "other"  # type: ignore[misc]
    assert msg == hello() and hash(msg) == hash(hello())
    assert isinstance(msg, Hello)


def test_struct_of_frame_header() -> None:
    assert FRAME_HEADER.format == "!BBHI" and FRAME_HEADER.size == 8
    assert struct.unpack("!BBHI", encode_frame(accept())[:8])[:3] == (1, 2, 0)


def test_a_refusal_carries_its_reason_code_both_ways() -> None:
    refuse = Refuse(MID, "host-b has 64 MiB free of 64 MiB; the VM needs 128 MiB", "no_memory_capacity")
    decoded = decode_payload(MessageType.REFUSE, encode_payload(refuse))
    assert decoded == refuse and decoded.code == "no_memory_capacity"
    assert Refuse(MID, "no").code == "refused"  # a refusal without a more precise cause


def test_an_abort_carries_its_reason_code_both_ways() -> None:
    abort = Abort(MID, "record 12 failed authentication", "record_auth_failed")
    decoded = decode_payload(MessageType.ABORT, encode_payload(abort))
    assert decoded == abort and decoded.code == "record_auth_failed"
    assert Abort(MID, "stop").code == "aborted"
    with pytest.raises(ProtocolError, match="invalid field 'code'"):
        Abort(MID, "stop", "Not A Code")


@pytest.mark.parametrize("code", ["", "NoMemory", "no memory", "9lives", "x" * 65, "no-memory", "é"])
def test_a_refusal_code_is_snake_case_or_the_message_is_invalid(code: str) -> None:
    with pytest.raises(ProtocolError, match="invalid field 'code'"):
        Refuse(MID, "no", code)
    payload = encode_payload(Refuse(MID, "no")).replace(b'"code":"refused"', b'"code":' + json.dumps(code).encode())
    with pytest.raises(ProtocolError):
        decode_payload(MessageType.REFUSE, payload)
