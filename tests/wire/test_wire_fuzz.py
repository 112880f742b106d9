"""Property fuzzing: whatever the network sends, the parsers raise ProtocolError or succeed.

Any other exception (IndexError, struct.error, ValueError, MemoryError, ...)
fails these tests. `fuzz_campaign.py` runs the same generators for longer.
"""

from __future__ import annotations

import functools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealift.wire import (
    AeadProtection,
    ControlConnection,
    ControlState,
    MessageType,
    NoProtection,
    ProtocolError,
    Role,
)
from sealift.wire.messages import FRAME_HEADER, MESSAGE_CLASSES, canonical_json, decode_payload
from sealift.wire.records import RecordProtection
from wire_samples import (
    INTERESTING_U32,
    IV,
    KEY,
    MID,
    aead_pair,
    chunked,
    drive_control,
    drive_data,
    hello,
    mutate,
    page_image,
    peer_frames,
    random_record,
    stream_records,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NPAGES = 16
roles = st.sampled_from([Role.CLIENT, Role.SERVER])
# Random generators seeded from hypothesis: byte-level edits of long streams
# would make hypothesis draw thousands of values per example.
seeds = st.integers(0, 2**64 - 1)


def only_protocol_errors(run: object) -> bool:
    """Run; True if it completed, False on ProtocolError. Anything else propagates."""
    try:
        run()  # type: ignore[operator]
    except ProtocolError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return False
    return True


# -- control connection --------------------------------------------------------------


@FUZZ
@given(roles, st.binary(max_size=3000))
def test_control_arbitrary_bytes(role: Role, data: bytes) -> None:
    only_protocol_errors(lambda: drive_control(role, [[data]]))


@FUZZ
@given(roles, st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.binary(max_size=200))
def test_control_headers_then_junk(role: Role, words: list[int], tail: bytes) -> None:
    data = b"".join(FRAME_HEADER.pack(1, (w % 11), (w >> 8) % 3 // 2, w % 70000) for w in words)
    only_protocol_errors(lambda: drive_control(role, [[data + tail]]))


@FUZZ
@given(roles, seeds, st.booleans())
def test_control_valid_stream_chunked_and_mutated(role: Role, seed: int, mutated: bool) -> None:
    rng = random.Random(seed)
    frames = peer_frames(role)
    if mutated:
        victim = rng.randrange(len(frames))
        frames[victim] = mutate(frames[victim], rng)
    turns = [chunked(frame, rng) for frame in frames]
    completed = only_protocol_errors(lambda: drive_control(role, turns))
    if not mutated:
        assert completed and drive_control(role, turns).state is ControlState.DONE


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(INTERESTING_U32),
    st.text(max_size=40),
    st.sampled_from([MID, "11" * 32, "33" * 16, "zstd", "lz4", "builtin", "prepared", "running"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.sampled_from(list(MessageType)), st.data())
def test_control_payload_with_random_field_values(msg_type: MessageType, data: st.DataObject) -> None:
    # Start from a real message's fields so most keys are right and the values are what vary.
    keys = sorted(MESSAGE_CLASSES[msg_type].KEYS)  # type: ignore[attr-defined]
    base = {k: v for k, v in hello().to_json().items() if k in keys}
    base.setdefault("migration_id", MID)
    for key in data.draw(st.lists(st.sampled_from([*keys, "extra"]), max_size=3)):
        base[key] = data.draw(json_values)
    try:
        payload = canonical_json(base)
    except ValueError:
        return
    only_protocol_errors(lambda: decode_payload(msg_type, payload))
    conn = ControlConnection(Role.SERVER)
    frame = FRAME_HEADER.pack(1, msg_type, 0, len(payload)) + payload
    only_protocol_errors(lambda: conn.receive_data(frame))


# -- data streams ---------------------------------------------------------------------


@functools.cache
def valid_stream(kind: str) -> bytes:
    image = page_image(NPAGES, seed=11)
    if kind == "aead":
        send, _ = aead_pair()
        return b"".join(stream_records(send, image, "zstd", rounds=2, per_record=3))
    compression = None if kind == "plain" else kind
    return b"".join(stream_records(NoProtection(), image, compression, rounds=2, per_record=3))


def protection(kind: str) -> RecordProtection:
    return AeadProtection(KEY, IV) if kind == "aead" else NoProtection()


kinds = st.sampled_from(["plain", "zstd", "lz4", "aead"])


@FUZZ
@given(kinds, st.binary(max_size=3000))
def test_data_arbitrary_bytes(kind: str, data: bytes) -> None:
    only_protocol_errors(lambda: drive_data(protection(kind), NPAGES, [data]))


@FUZZ
@given(kinds, seeds, st.booleans())
def test_data_valid_stream_chunked_and_mutated(kind: str, seed: int, mutated: bool) -> None:
    rng = random.Random(seed)
    stream = valid_stream(kind)
    if mutated:
        stream = mutate(stream, rng)
    completed = only_protocol_errors(lambda: drive_data(protection(kind), NPAGES, chunked(stream, rng)))
    if not mutated:
        assert completed


@FUZZ
@given(seeds)
def test_data_structured_random_records(seed: int) -> None:
    rng = random.Random(seed)
    records = [random_record(rng, NPAGES) for _ in range(rng.randint(1, 6))]
    only_protocol_errors(lambda: drive_data(NoProtection(), NPAGES, chunked(b"".join(records), rng)))
