"""The native relay core (host/relaycore.py, _relaycore.c) against the sans-IO reference, over real socketpairs.

Both ways: records the native core seals are read by the Python
DataStreamReader, records the Python DataStreamWriter seals are opened by
the native core; with and without protection, random record sizes, keys
stepped every few records (the rekeying must line up too), and tampered or
truncated streams that must end with the reference's errors.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealift.backends.qemu.relay import read_record
from sealift.host import relaycore
from sealift.wire.datastream import (
    HEADER_SIZE,
    MAX_OPAQUE,
    DataStreamReader,
    DataStreamWriter,
    OpaqueReceived,
    StreamEnded,
)
from sealift.wire.errors import ProtocolError, RecordAuthError
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection

NPAGES = 1 << 12
KEY, IV = bytes(range(32)), bytes(range(100, 112))
TIMEOUT = 10.0
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def protection(secure: bool, rekey: int) -> RecordProtection:
    return AeadProtection(KEY, IV, rekey_interval=rekey) if secure else NoProtection()


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()
    return thread, result


def pairs() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def python_records(writer: DataStreamWriter, chunks: list[bytes]) -> tuple[bytes, bytes]:
    """The wire bytes of `chunks` as OPAQUE records then END, and their tags, sealed by the reference writer."""
    wire, tags = bytearray(), bytearray()
    for chunk in chunks:
        writer.opaque_buffer()[: len(chunk)] = chunk
        wire += writer.finish_opaque(len(chunk))
        tags += writer.last_tag
    wire += writer.end()
    return bytes(wire), bytes(tags)


def open_natively(wire: bytes, reader: DataStreamReader) -> tuple[relaycore.RelayOutcome, bytes]:
    """Feed `wire` (then EOF) to the native reader; what it wrote to its sink."""
    data_in, data_out = pairs()
    sink_in, sink_out = pairs()
    feeder, _ = in_thread(lambda: (data_in.sendall(wire), data_in.close()))
    received = bytearray()
    drain, _ = in_thread(lambda: _drain(sink_out, received))
    outcome = relaycore.open_stream(data_out, sink_in, reader)
    sink_in.close()
    feeder.join(TIMEOUT)
    drain.join(TIMEOUT)
    return outcome, bytes(received)


def _drain(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        into += chunk


chunk_lists = st.lists(st.integers(1, 70_000), min_size=0, max_size=12).map(
    lambda sizes: [os.urandom(n) for n in sizes]
)


@PROPERTY
@given(chunks=chunk_lists, secure=st.booleans(), rekey=st.integers(1, 4), max_record=st.integers(1, 100_000))
def test_native_writer_to_python_reader(chunks: list[bytes], secure: bool, rekey: int, max_record: int) -> None:
    writer = DataStreamWriter(protection(secure, rekey), NPAGES)
    reader = DataStreamReader(protection(secure, rekey), NPAGES)
    source_in, source_out = pairs()
    data_in, data_out = pairs()
    # A first record from Python, as the QEMU relay sends the guest description before handing over.
    writer.opaque_buffer()[:4] = b"spec"
    data_in.sendall(writer.finish_opaque(4))
    feeder, _ = in_thread(lambda: ([source_in.sendall(c) for c in chunks], source_in.close()))
    sealer, result = in_thread(lambda: relaycore.seal_stream(source_out, data_in, writer, max_record))

    assert bytes(read_opaque(data_out, reader)) == b"spec"
    received, tags = bytearray(), bytearray()
    while not isinstance(event := read_record(data_out, reader), StreamEnded):
        assert isinstance(event, OpaqueReceived) and 1 <= len(event.data) <= max_record
        received += event.data
        tags += reader.last_tag
    reader.close()  # the END totals matched what the reference reader counted
    sealer.join(TIMEOUT)
    feeder.join(TIMEOUT)
    outcome = result[0]
    assert isinstance(outcome, relaycore.RelayOutcome) and outcome.error is None
    assert bytes(received) == b"".join(chunks) and outcome.plaintext_bytes == len(received)
    assert outcome.records == reader.records - 1 and writer.records == reader.records
    if secure:
        assert outcome.digest_input == bytes(tags)  # the tags, in order: what StreamDigest hashes
    else:
        assert len(outcome.digest_input) == HEADER_SIZE * outcome.records


def read_opaque(sock: socket.socket, reader: DataStreamReader) -> memoryview:
    event = read_record(sock, reader)
    assert isinstance(event, OpaqueReceived)
    return event.data


@PROPERTY
@given(chunks=chunk_lists, secure=st.booleans(), rekey=st.integers(1, 4))
def test_python_writer_to_native_reader(chunks: list[bytes], secure: bool, rekey: int) -> None:
    writer = DataStreamWriter(protection(secure, rekey), NPAGES)
    reader = DataStreamReader(protection(secure, rekey), NPAGES)
    # The first record is read by Python before the hand-over, as the relay reads the guest description.
    writer.opaque_buffer()[:4] = b"spec"
    assert [bytes(e.data) for e in reader.receive_data(writer.finish_opaque(4))] == [b"spec"]  # type: ignore[union-attr]
    wire, tags = python_records(writer, chunks)
    outcome, received = open_natively(wire, reader)
    assert outcome.error is None and reader.ended
    assert received == b"".join(chunks) and outcome.plaintext_bytes == len(received)
    assert outcome.records == len(chunks) and reader.records == len(chunks) + 1
    if secure:
        assert outcome.digest_input == tags


@PROPERTY
@given(
    chunks=st.lists(st.integers(1, 40_000), min_size=1, max_size=6), flip=st.integers(0, 2**31), bit=st.integers(0, 7)
)
def test_a_flipped_bit_anywhere_ends_the_native_reader_before_that_record_reaches_qemu(
    chunks: list[int], flip: int, bit: int
) -> None:
    payloads = [os.urandom(n) for n in chunks]
    wire, _ = python_records(DataStreamWriter(AeadProtection(KEY, IV), NPAGES), payloads)
    where = flip % len(wire)
    tampered = bytearray(wire)
    tampered[where] ^= 1 << bit
    outcome, received = open_natively(bytes(tampered), DataStreamReader(AeadProtection(KEY, IV), NPAGES))
    assert isinstance(outcome.error, ProtocolError | ConnectionError)  # auth, a bad header, or a length past the end
    # Only the records wholly before the flipped byte may have reached QEMU, and nothing of a later one.
    before = record_starts(wire, len(payloads))
    intact = sum(1 for start, end in before if end <= where)
    assert received == b"".join(payloads[:intact])


def record_starts(wire: bytes, count: int) -> list[tuple[int, int]]:
    spans, at = [], 0
    for _ in range(count):
        length = int.from_bytes(wire[at + 4 : at + 8], "big")
        spans.append((at, at + HEADER_SIZE + length))
        at += HEADER_SIZE + length
    return spans


def test_a_tampered_payload_is_the_readers_authentication_error() -> None:
    wire, _ = python_records(DataStreamWriter(AeadProtection(KEY, IV), NPAGES), [b"a" * 1000, b"b" * 1000])
    tampered = bytearray(wire)
    tampered[HEADER_SIZE + 1008 + HEADER_SIZE + 10] ^= 0x40  # inside the second record's ciphertext
    outcome, received = open_natively(bytes(tampered), DataStreamReader(AeadProtection(KEY, IV), NPAGES))
    assert isinstance(outcome.error, RecordAuthError) and outcome.error.code == "record_auth_failed"
    assert received == b"a" * 1000 and outcome.records == 1


@pytest.mark.parametrize("secure", [True, False])
def test_every_truncation_fails_and_only_a_whole_stream_succeeds(secure: bool) -> None:
    wire, _ = python_records(DataStreamWriter(protection(secure, 2), NPAGES), [b"x" * 300, b"y" * 5, b"z" * 70])
    for cut in [0, 1, 7, 8, 9, 100, len(wire) - 40, len(wire) - 1]:
        outcome, _ = open_natively(wire[:cut], DataStreamReader(protection(secure, 2), NPAGES))
        assert isinstance(outcome.error, ConnectionError), cut
        assert "peer closed the data stream" in str(outcome.error)
    outcome, received = open_natively(wire, DataStreamReader(protection(secure, 2), NPAGES))
    assert outcome.error is None and received == b"x" * 300 + b"y" * 5 + b"z" * 70


def test_a_dropped_record_without_protection_is_caught_by_the_end_totals() -> None:
    wire, _ = python_records(DataStreamWriter(NoProtection(), NPAGES), [b"x" * 300, b"y" * 5])
    dropped = wire[: HEADER_SIZE + 300] + wire[HEADER_SIZE + 300 + HEADER_SIZE + 5 :]
    outcome, _ = open_natively(dropped, DataStreamReader(NoProtection(), NPAGES))
    assert isinstance(outcome.error, ProtocolError) and "END totals mismatch" in str(outcome.error)


def test_a_record_type_a_qemu_stream_never_carries_is_refused() -> None:
    writer = DataStreamWriter(AeadProtection(KEY, IV), NPAGES)
    wire = bytes(writer.round_end(0, 1)) + bytes(writer.end())
    outcome, received = open_natively(wire, DataStreamReader(AeadProtection(KEY, IV), NPAGES))
    assert isinstance(outcome.error, ProtocolError) and "unexpected ROUND_END" in str(outcome.error)
    assert received == b""


def test_an_oversized_length_is_refused_before_it_is_read() -> None:
    header = bytes([6, 0, 0, 0]) + (MAX_OPAQUE + 17).to_bytes(4, "big")
    outcome, _ = open_natively(header, DataStreamReader(AeadProtection(KEY, IV), NPAGES))
    assert isinstance(outcome.error, ProtocolError) and "exceeds limit" in str(outcome.error)


def test_a_silent_peer_times_out_as_the_socket_says() -> None:
    data_in, data_out = pairs()
    sink_in, _sink_out = pairs()
    data_out.settimeout(0.2)
    outcome = relaycore.open_stream(data_out, sink_in, DataStreamReader(AeadProtection(KEY, IV), NPAGES))
    assert isinstance(outcome.error, TimeoutError)
    data_in.close()


def test_keys_handed_to_the_native_core_seal_nothing_more_in_python() -> None:
    """Both would seal under the same sequence numbers: AES-GCM nonce reuse. The handed-over writer refuses."""
    writer = DataStreamWriter(AeadProtection(KEY, IV), NPAGES)
    state = writer.hand_over()
    assert state is not None and state.sequence == 0
    with pytest.raises(ProtocolError, match="already ended"):
        writer.opaque_buffer()
    protection = AeadProtection(KEY, IV)
    protection.hand_over()
    with pytest.raises(ProtocolError, match="handed to the native relay"):
        protection.seal_into(bytes(8), memoryview(b"x"), memoryview(bytearray(17)))
    with pytest.raises(ProtocolError, match="handed to the native relay"):
        protection.open_into(bytes(8), memoryview(bytes(17)), memoryview(bytearray(1)))


def test_native_to_native_moves_a_large_stream_intact() -> None:
    payload = os.urandom(5_000_000)
    writer = DataStreamWriter(AeadProtection(KEY, IV), NPAGES)
    reader = DataStreamReader(AeadProtection(KEY, IV), NPAGES)
    source_in, source_out = pairs()
    data_in, data_out = pairs()
    sink_in, sink_out = pairs()
    threads = [
        in_thread(lambda: (source_in.sendall(payload), source_in.close()))[0],
        in_thread(lambda: relaycore.seal_stream(source_out, data_in, writer))[0],
    ]
    received = bytearray()
    threads.append(in_thread(lambda: _drain(sink_out, received))[0])
    outcome = relaycore.open_stream(data_out, sink_in, reader)
    sink_in.close()
    for thread in threads:
        thread.join(TIMEOUT)
    assert outcome.error is None and bytes(received) == payload
    assert writer.wire_bytes == outcome.wire_bytes and writer.records == reader.records


def test_progress_is_readable_while_the_stream_runs() -> None:
    """The agent reports bytes in flight (progress events, metrics) from another thread while the core runs."""
    writer = DataStreamWriter(AeadProtection(KEY, IV), NPAGES)
    source_in, source_out = pairs()
    data_in, data_out = pairs()
    progress = relaycore.Progress()
    sealer, result = in_thread(lambda: relaycore.seal_stream(source_out, data_in, writer, progress=progress))
    source_in.sendall(b"q" * 300_000)  # and stays open: the stream is still running
    received = bytearray()
    drain, _ = in_thread(lambda: _drain(data_out, received))
    deadline = threading.Event()
    for _ in range(100):
        if progress.plaintext_bytes == 300_000:
            break
        deadline.wait(0.05)
    assert progress.plaintext_bytes == 300_000 and progress.wire_bytes >= 300_000 + HEADER_SIZE + 16
    assert sealer.is_alive()
    source_in.close()
    sealer.join(TIMEOUT)
    outcome = result[0]
    assert isinstance(outcome, relaycore.RelayOutcome) and outcome.error is None
    assert progress.wire_bytes == outcome.wire_bytes  # END included at the end
    data_in.close()
    drain.join(TIMEOUT)


# -- duplex streams (a disk's NBD connection, a libvirt connection) and stopping ------------------

KEY_BACK, IV_BACK = bytes(range(50, 82)), bytes(range(200, 212))


def protection_back(secure: bool) -> RecordProtection:
    return AeadProtection(KEY_BACK, IV_BACK, rekey_interval=3) if secure else NoProtection()


@pytest.mark.parametrize("secure", [True, False])
def test_a_duplex_stream_runs_both_native_directions_on_one_socket_against_the_python_reference(secure: bool) -> None:
    """storage.DiskStream and libvirt's Carrier: seal_stream and open_stream at once on one data socket.

    The far end is the Python reference (writer and reader on the same
    socket, as the code before the native core carried them); both
    directions flow at the same time, each under its own key, and the digest
    inputs are the reference's tags (or headers without protection).
    """
    out_chunks = [os.urandom(n) for n in (1, 70_000, 5, 300_000, 4096)]
    back_chunks = [os.urandom(n) for n in (33, 1 << 20, 2, 9000)]
    conn_near, conn_app = pairs()  # the application's (QEMU's) connection at the native end
    data_native, data_python = pairs()  # the data stream between the two agents
    writer = DataStreamWriter(protection(secure, 2), 1)
    reader = DataStreamReader(protection_back(secure), 1)
    ref_reader = DataStreamReader(protection(secure, 2), 1)
    ref_writer = DataStreamWriter(protection_back(secure), 1)
    back_wire, back_tags = python_records(ref_writer, back_chunks)

    sealer, sealed = in_thread(lambda: relaycore.seal_stream(conn_near, data_native, writer))
    opener, opened = in_thread(lambda: relaycore.open_stream(data_native, conn_near, reader))
    python_sender, _ = in_thread(lambda: data_python.sendall(back_wire))
    app_received = bytearray()
    app_drain, _ = in_thread(lambda: _drain(conn_app, app_received))
    ref_received, ref_tags = bytearray(), bytearray()

    def python_reader() -> None:
        while not isinstance(event := read_record(data_python, ref_reader), StreamEnded):
            assert isinstance(event, OpaqueReceived)
            ref_received.extend(event.data)
            ref_tags.extend(ref_reader.last_tag if secure else b"")
        ref_reader.close()

    python_receiver, _ = in_thread(python_reader)
    for chunk in out_chunks:
        conn_app.sendall(chunk)
    conn_app.shutdown(socket.SHUT_WR)  # the application is done talking: END follows
    python_receiver.join(TIMEOUT)
    for thread in (sealer, opener, python_sender):
        thread.join(TIMEOUT)
    conn_near.shutdown(socket.SHUT_WR)  # what the carriers do once the peer's END is in
    app_drain.join(TIMEOUT)

    out, back = sealed[0], opened[0]
    assert isinstance(out, relaycore.RelayOutcome) and isinstance(back, relaycore.RelayOutcome)
    assert out.error is None and back.error is None
    assert bytes(ref_received) == b"".join(out_chunks) and bytes(app_received) == b"".join(back_chunks)
    assert back.records == reader.records == len(back_chunks) and out.records == ref_reader.records
    if secure:
        assert out.digest_input == bytes(ref_tags) and back.digest_input == back_tags
    else:
        assert len(back.digest_input) == HEADER_SIZE * len(back_chunks)


def test_a_tampered_record_back_fails_only_its_direction_and_never_reaches_the_application() -> None:
    conn_near, conn_app = pairs()
    data_native, data_python = pairs()
    back_wire, _ = python_records(DataStreamWriter(protection_back(True), 1), [b"request " * 100, b"more"])
    tampered = bytearray(back_wire)
    tampered[HEADER_SIZE + 3] ^= 0x01  # inside the first record's ciphertext
    data_python.sendall(tampered)
    outcome = relaycore.open_stream(data_native, conn_near, DataStreamReader(protection_back(True), 1))
    assert isinstance(outcome.error, RecordAuthError) and outcome.plaintext_bytes == 0
    conn_near.close()
    assert conn_app.recv(100) == b""  # nothing of the tampered record, nor of the one after it


@pytest.mark.parametrize("direction", ["open", "seal"])
def test_a_stop_signal_ends_a_stream_that_waits_forever(direction: str) -> None:
    """Post-copy's return path idles for a whole pre-copy: no timeout ends it, its StopSignal does."""
    near, _far = pairs()
    data, _peer = pairs()
    near.settimeout(0.05)  # ignored under wait_forever: the stream outlives it
    data.settimeout(0.05)
    stop = relaycore.StopSignal()
    if direction == "open":
        run = lambda: relaycore.open_stream(  # noqa: E731
            data, near, DataStreamReader(protection_back(True), 1), stop=stop, wait_forever=True
        )
    else:
        run = lambda: relaycore.seal_stream(  # noqa: E731
            near, data, DataStreamWriter(protection(True, 4), 1), stop=stop, wait_forever=True
        )
    thread, result = in_thread(run)
    thread.join(0.5)
    assert thread.is_alive()  # ten times the sockets' timeout, still waiting
    stop.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    outcome = result[0]
    assert isinstance(outcome, relaycore.RelayOutcome) and isinstance(outcome.error, relaycore.StreamStopped)
    stop.close()


def test_a_stream_with_an_unused_stop_signal_ends_as_the_protocol_says() -> None:
    wire, _ = python_records(DataStreamWriter(protection_back(True), 1), [b"x" * 1000])
    data_native, data_python = pairs()
    sink, sink_peer = pairs()
    data_python.sendall(wire)
    stop = relaycore.StopSignal()
    outcome = relaycore.open_stream(
        data_native, sink, DataStreamReader(protection_back(True), 1), stop=stop, wait_forever=True
    )
    assert outcome.error is None and sink_peer.recv(2000) == b"x" * 1000
    stop.close()
