"""The host's waits stop for a reason, and say what they saw (host/transport.py), without agents."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from sealift.host.transport import ControlChannel, DataSessions, PlainStream
from sealift.wire.control import Role
from sealift.wire.messages import Abort, Hello, encode_frame

MID = "ab" * 16


class Stop(Exception):
    pass


def test_a_data_stream_wait_stops_when_the_interrupt_raises_and_forgets_the_session() -> None:
    sessions = DataSessions()
    sessions.expect(b"s" * 16)
    calls = 0

    def interrupt() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Stop

    started = time.monotonic()
    with pytest.raises(Stop):
        sessions.wait(b"s" * 16, timeout=30, interrupt=interrupt)
    assert time.monotonic() - started < 2  # three checks ~0.1 s apart, not the 30 s timeout
    a, b = socket.socketpair()
    assert not sessions.deliver(b"s" * 16, a)  # cancelled: a late stream finds nobody waiting
    a.close()
    b.close()


def test_a_data_stream_that_arrives_is_returned_and_an_absent_one_times_out() -> None:
    sessions = DataSessions()
    sessions.expect(b"t" * 16)
    a, b = socket.socketpair()
    threading.Timer(0.2, sessions.deliver, args=(b"t" * 16, a)).start()
    assert sessions.wait(b"t" * 16, timeout=5, interrupt=lambda: None) is a
    sessions.expect(b"u" * 16)
    with pytest.raises(TimeoutError, match="did not open its data stream within 0 s"):
        sessions.wait(b"u" * 16, timeout=0.3)
    a.close()
    b.close()


def channel_pair() -> tuple[ControlChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    return ControlChannel(PlainStream(ours), Role.SERVER, None), theirs


def test_peek_shows_the_next_message_without_taking_it() -> None:
    channel, peer = channel_pair()
    assert channel.peek(0) is None  # nothing yet: no wait, no error
    hello_frame = encode_frame(
        Hello(MID, "vm1", "host-a", "host-b", b"n" * 32, 1 << 20, 4096, True, None, 1, "builtin", None, None)
    )
    peer.sendall(hello_frame + encode_frame(Abort(MID, "gone", "record_auth_failed")))
    first = channel.peek(1)
    assert isinstance(first, Hello) and channel.recv(1) is first
    abort = channel.recv(1)
    assert isinstance(abort, Abort) and abort.code == "record_auth_failed"
    channel.close()
    peer.close()


def test_a_peer_that_stalls_mid_frame_is_described_as_such() -> None:
    channel, peer = channel_pair()
    with pytest.raises(TimeoutError, match="^peer sent nothing for 0 s$"):
        channel.recv(0.2)
    peer.sendall(encode_frame(Abort(MID, "gone"))[:5])
    with pytest.raises(TimeoutError, match="^peer sent 5 bytes of an incomplete frame, then nothing for 0 s$"):
        channel.recv(0.2)
    channel.close()
    peer.close()
