"""The QEMU stream relay without QEMU: pumps and feeders over real sockets, the ready record, digests."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from sealift.backends.qemu.relay import (
    RELAY_SOCKET_BUFFER,
    SourcePump,
    SourcePumps,
    StreamDigest,
    StreamFeeder,
    combined_digest,
    feed_qemu,
    stream_label,
    widen_send_buffer,
)
from sealift.migration.errors import MigrationError
from sealift.security.keys import derive_session_keys
from sealift.wire.datastream import DataStreamReader, DataStreamWriter
from sealift.wire.records import AeadProtection

NPAGES = 1 << 12
TIMEOUT = 10.0


def keys_for(index: int) -> tuple[bytes, bytes]:
    keys = derive_session_keys(b"s" * 32, b"a" * 32, b"b" * 32, stream_label("m-1", index))
    return keys.source_to_dest_key, keys.source_to_dest_iv


def test_every_stream_has_its_own_keys() -> None:
    """Two streams under one key would reuse AES-GCM nonces: each index derives its own."""
    assert len({keys_for(i) for i in range(4)}) == 4
    assert stream_label("m-1", 0) == "m-1"


def test_combined_digest_depends_on_every_stream_and_their_order() -> None:
    a, b = StreamDigest(16), StreamDigest(16)
    a.update(b"x", b"t" * 16)
    b.update(b"y", b"u" * 16)
    assert combined_digest([a]) == a.hexdigest()
    assert combined_digest([a, b]).startswith("blake3-tags-x2:")
    assert combined_digest([a, b]) != combined_digest([b, a])
    plain = StreamDigest(0)
    plain.update(b"page bytes", b"")
    assert plain.hexdigest().startswith("blake3:")


def _fake_qemu_source(path: str, payloads: list[bytes]) -> None:
    """Connect once per channel, in order (as QEMU does: main first), and write each channel's bytes."""
    conns = []
    for _ in payloads:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
        conns.append(conn)
    for conn, payload in zip(conns, payloads):
        conn.sendall(payload)
        conn.close()


def _drain(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        into += chunk


def test_three_channels_cross_the_relay_intact_and_in_their_own_streams() -> None:
    payloads = [os.urandom(300_000), os.urandom(2_000_000), os.urandom(1_500_000)]
    workdir = Path(tempfile.mkdtemp(prefix="sl-relay-", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(workdir / "m.sock"))
    listener.listen(3)
    wires = [socket.socketpair() for _ in payloads]  # the data streams between the agents
    qemu_side = [socket.socketpair() for _ in payloads]  # the destination agent -> destination QEMU
    pumps = []
    for index, (send_end, _) in enumerate(wires):
        key, iv = keys_for(index)
        pumps.append(
            SourcePump(index, DataStreamWriter(AeadProtection(key, iv), NPAGES), send_end, TIMEOUT, StreamDigest(16))
        )
    group = SourcePumps(pumps, listener=listener)
    group.start()
    received = [bytearray() for _ in payloads]
    drains = [threading.Thread(target=_drain, args=(q[1], received[i])) for i, q in enumerate(qemu_side)]
    for thread in drains:
        thread.start()
    feeders, digests = [], [StreamDigest(16)]
    for index in (1, 2):
        key, iv = keys_for(index)
        feeders.append(
            StreamFeeder(
                index,
                lambda i=index: wires[i][1],
                DataStreamReader(AeadProtection(key, iv), NPAGES),
                qemu_side[index][0],
                StreamDigest(16),
                wires[0][1],
                TIMEOUT,
            )
        )
        feeders[-1].start()
    threading.Thread(target=_fake_qemu_source, args=(str(workdir / "m.sock"), payloads)).start()

    key, iv = keys_for(0)
    fed = feed_qemu(wires[0][1], DataStreamReader(AeadProtection(key, iv), NPAGES), qemu_side[0][0], digests[0])
    for feeder in feeders:
        feeder.join(TIMEOUT)
    group.wait(TIMEOUT)
    for sock, _ in qemu_side:
        sock.close()
    for thread in drains:
        thread.join(TIMEOUT)

    assert [bytes(r) for r in received] == payloads  # each channel into its own QEMU connection, in order
    assert fed == len(payloads[0]) and group.stream_bytes == sum(map(len, payloads))
    assert combined_digest(digests + [f.digest for f in feeders]) == group.digest()


def test_a_tampered_multifd_stream_fails_its_feeder_and_breaks_the_main_stream() -> None:
    key, iv = keys_for(1)
    writer = DataStreamWriter(AeadProtection(key, iv), NPAGES)
    writer.opaque_buffer()[:5] = b"pages"
    record = bytearray(writer.finish_opaque(5))
    record[-1] ^= 1  # one bit of the tag
    wire_send, wire_recv = socket.socketpair()
    main_send, main_recv = socket.socketpair()
    qemu_send, _qemu_recv = socket.socketpair()
    wire_send.sendall(bytes(record))
    feeder = StreamFeeder(
        1,
        lambda: wire_recv,
        DataStreamReader(AeadProtection(key, iv), NPAGES),
        qemu_send,
        StreamDigest(16),
        main_recv,
        TIMEOUT,
    )
    feeder.start()
    with pytest.raises(MigrationError, match="multifd stream 1 failed"):
        feeder.join(TIMEOUT)
    main_recv.settimeout(2)
    assert main_recv.recv(1) == b""  # the main stream was shut down: the coordinator stops at once


def _queued_without_reader(sock: socket.socket) -> int:
    """How many bytes `sock` takes before a send would block (nobody reads the other end)."""
    sock.setblocking(False)
    chunk, queued = bytes(64 * 1024), 0
    try:
        while queued < 64 * RELAY_SOCKET_BUFFER:
            queued += sock.send(chunk)
    except BlockingIOError:
        pass
    return queued


def test_a_widened_unix_socket_queues_whole_records_before_its_writer_blocks() -> None:
    """Linux's default unix send buffer holds less than one record, so QEMU and the relay took turns."""
    narrow, _narrow_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wide, _wide_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    widen_send_buffer(wide)
    assert wide.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= RELAY_SOCKET_BUFFER
    assert _queued_without_reader(narrow) < 1024 * 1024 < RELAY_SOCKET_BUFFER <= _queued_without_reader(wide)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may exceed net.core.wmem_max")
def test_root_widens_past_the_kernels_cap() -> None:
    """On a stock kernel wmem_max is 208 KiB: a capped SO_SNDBUF would leave the queue as narrow as before."""
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
    sock, _peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    widen_send_buffer(sock, 2 * cap)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 * cap  # the kernel doubles what it grants


def test_a_main_channel_handed_over_as_a_socket_crosses_without_a_listener() -> None:
    """The fd: path: QEMU writes into a socket of ours; the pump takes it without accepting anything."""
    payload = os.urandom(3_000_000)
    ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wire_send, wire_recv = socket.socketpair()
    qemu_in, qemu_out = socket.socketpair()
    key, iv = keys_for(0)
    group = SourcePumps(
        [SourcePump(0, DataStreamWriter(AeadProtection(key, iv), NPAGES), wire_send, TIMEOUT, StreamDigest(16))],
        first=ours,
    )
    group.start()
    threading.Thread(target=lambda: (qemus.sendall(payload), qemus.close())).start()
    received = bytearray()
    drain = threading.Thread(target=_drain, args=(qemu_out, received))
    drain.start()
    digest = StreamDigest(16)
    fed = feed_qemu(wire_recv, DataStreamReader(AeadProtection(key, iv), NPAGES), qemu_in, digest)
    qemu_in.close()
    drain.join(TIMEOUT)
    group.wait(TIMEOUT)
    assert bytes(received) == payload and fed == len(payload) == group.stream_bytes
    assert digest.hexdigest() == group.digest()


def test_extra_channels_need_a_listener() -> None:
    key, iv = keys_for(0)
    pumps = [
        SourcePump(
            i, DataStreamWriter(AeadProtection(key, iv), NPAGES), socket.socketpair()[0], TIMEOUT, StreamDigest(16)
        )
        for i in range(2)
    ]
    with pytest.raises(ValueError, match="need a listener"):
        SourcePumps(pumps, first=socket.socketpair()[0])
    with pytest.raises(ValueError, match="need a listener"):
        SourcePumps(pumps[:1])


@pytest.mark.parametrize("secure", [True, False])
def test_the_post_copy_feed_digests_the_stream_as_the_source_pump_does(secure: bool) -> None:
    """Post-copy's destination feeds QEMU from Python (ForwardFeed); the source's pump is native. Both must
    commit to the same stream: the records' tags, or in clear (`sealift-plain`) their headers, as the native
    relay hashes them (a plain post-copy through the agents failed its digest check at the end before)."""
    from sealift.backends.qemu.postcopy import ForwardFeed
    from sealift.wire.records import NoProtection

    def protection() -> AeadProtection | NoProtection:
        return AeadProtection(*keys_for(0)) if secure else NoProtection()

    payload = os.urandom(3_000_000)
    ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wire_send, wire_recv = socket.socketpair()
    qemu_in, qemu_out = socket.socketpair()
    tag = 16 if secure else 0
    group = SourcePumps(
        [SourcePump(0, DataStreamWriter(protection(), NPAGES), wire_send, TIMEOUT, StreamDigest(tag))], first=ours
    )
    group.start()
    threading.Thread(target=lambda: (qemus.sendall(payload), qemus.close())).start()
    received = bytearray()
    drain = threading.Thread(target=_drain, args=(qemu_out, received))
    drain.start()
    feed = ForwardFeed(wire_recv, DataStreamReader(protection(), NPAGES), qemu_in, StreamDigest(tag)).start()
    assert feed.join(TIMEOUT) and feed.error is None
    qemu_in.close()
    drain.join(TIMEOUT)
    group.wait(TIMEOUT)
    assert bytes(received) == payload and feed.stream_bytes == len(payload)
    assert feed.digest.hexdigest() == group.digest()
