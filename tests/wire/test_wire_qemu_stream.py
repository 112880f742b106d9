"""The QEMU stream's own documents: the guest description and the ready record, strictly parsed."""

from __future__ import annotations

import json

import pytest

from sealift.wire.errors import ProtocolError
from sealift.wire.qemu_stream import MAX_EXTRA_STREAMS, GuestSpec, Ready

SPEC = GuestSpec(256, "console=ttyS0", {"model": "user"}, "0123456789abcdef", "sealift", 2, True)


def test_ready_record_round_trip_and_rejections() -> None:
    ready = Ready(None, (b"\x01" * 16, b"\x02" * 16))
    assert Ready.decode(ready.encode()) == ready
    assert Ready.decode(Ready(4444).encode()) == Ready(4444)
    for bad in (
        b"{}",
        b'{"ready": true, "port": 0, "streams": []}',
        b'{"ready": true, "port": null, "streams": ["00"]}',
        b'{"ready": true, "port": null, "streams": '
        + str(["00" * 16] * (MAX_EXTRA_STREAMS + 1)).replace("'", '"').encode()
        + b"}",
        b"not json",
    ):
        with pytest.raises(ProtocolError, match="ready record is malformed"):
            Ready.decode(bad)


def test_guest_spec_round_trip() -> None:
    assert GuestSpec.decode(SPEC.encode()) == SPEC


def test_guest_spec_carries_post_copy() -> None:
    spec = GuestSpec(128, "", {}, "0123456789abcdef", "sealift", postcopy=True)
    assert GuestSpec.decode(spec.encode()).postcopy is True


def test_guest_spec_from_a_source_before_the_transport_choice() -> None:
    old = {"memory_mib": 128, "extra_cmdline": "", "net": {}, "image_key": "0123456789abcdef"}
    assert GuestSpec.decode(json.dumps(old).encode()) == GuestSpec(128, "", {}, "0123456789abcdef")


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": "256"},  # a string is not a number, even when it reads like one
        {"memory_mib": 0},
        {"memory_mib": 256.0},
        {"memory_mib": True},
        {"extra_cmdline": 7},
        {"extra_cmdline": "x" * 5000},
        {"net": []},
        {"image_key": "../../etc"},
        {"transport": "carrier-pigeon"},
        {"multifd_channels": -1},
        {"xbzrle": "yes"},
        {"postcopy": 1},
        {"surprise": 1},
    ],
)
def test_guest_spec_rejects_each_wrong_field(change: dict[str, object]) -> None:
    raw = json.loads(SPEC.encode())
    raw.update(change)
    with pytest.raises(ProtocolError, match="guest description at the head of the QEMU stream is malformed"):
        GuestSpec.decode(json.dumps(raw).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"not json",
        b'{"memory_mib": 1, "memory_mib": 2}',
        SPEC.encode().replace(b'"memory_mib"', b'"memory"'),
    ],
)
def test_guest_spec_rejects_what_is_not_one_object_with_the_known_keys(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        GuestSpec.decode(data)
