"""The opening deadline and eviction on real loopback sockets (agent/port.py); no agent, bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.agent.guard import Slot
from sealift.agent.port import PortTable, StalledOpening, opening_length, peek_opening
from sealift.wire.errors import ProtocolError

JOIN_TIMEOUT = 10.0  # a guard against a hung test, never a measurement


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def record(length: int) -> bytes:
    return b"\x16\x03\x01" + length.to_bytes(2, "big") + b"\x01" * length


def test_opening_length_grows_with_what_has_arrived() -> None:
    assert opening_length(b"") == 1
    assert opening_length(b"\x16") == 5
    assert opening_length(b"\x16\x03\x01\x02\x00") == 5 + 512
    assert opening_length(b"SLD") == 4  # a magic: four bytes
    for bad in (b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x40\x01"):  # empty, or over 2^14
        with pytest.raises(ProtocolError):
            opening_length(bad)


def test_a_whole_client_hello_is_peeked_and_left_in_the_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    hello = record(600)
    client.sendall(hello)
    assert peek_opening(server, time.monotonic() + 2) == hello
    server.settimeout(2)
    assert server.recv(len(hello), socket.MSG_WAITALL) == hello, "nothing was consumed"
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


def test_a_client_hello_trickled_within_the_deadline_is_accepted(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    hello = record(300)

    def trickle() -> None:
        for start in range(0, len(hello), 60):
            client.sendall(hello[start : start + 60])
            time.sleep(0.05)

    sender = threading.Thread(target=trickle)
    sender.start()
    assert peek_opening(server, time.monotonic() + 3) == hello
    sender.join(JOIN_TIMEOUT)


@pytest.mark.parametrize("sent", [b"", b"\x16", b"\x16\x03\x01\x01\x00" + b"\x01" * 100])
def test_a_stalled_opening_ends_at_the_deadline(pair: tuple[socket.socket, socket.socket], sent: bytes) -> None:
    client, server = pair
    client.sendall(sent)
    started = time.monotonic()
    with pytest.raises(StalledOpening) as stalled:
        peek_opening(server, started + 0.3)
    assert 0.25 < time.monotonic() - started < 2.0
    assert stalled.value.received == len(sent)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03"])
def test_a_client_that_closes_is_noticed_at_once(pair: tuple[socket.socket, socket.socket], sent: bytes) -> None:
    client, server = pair
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        peek_opening(server, started + 5)
    assert time.monotonic() - started < 1.0, "no waiting for the deadline"


def test_eviction_wakes_the_thread_blocked_on_the_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"\x16")  # the slow client of issue 23
    table = PortTable()
    slot = Slot(1, "127.0.0.1", expected=False, opened=0.0)
    connection = table.add(server, ("127.0.0.1", 1), slot)
    failure: list[BaseException] = []

    def owner() -> None:
        try:
            peek_opening(server, time.monotonic() + 30)
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever it was
            failure.append(exc)
        finally:
            table.remove(connection)
            server.close()

    thread = threading.Thread(target=owner)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert table.evict((slot,)) == [connection]
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive() and time.monotonic() - started < 1.0
    assert failure and isinstance(failure[0], ConnectionError)
    client.settimeout(2)
    assert client.recv(1) == b"", "the client sees the connection closed"
    assert len(table) == 0
    connection.evict()  # after settle: a no-op, never touches a reused descriptor


def test_a_settled_connection_is_not_evicted(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    table = PortTable()
    slot = Slot(2, "127.0.0.1", expected=False, opened=0.0)
    connection = table.add(server, ("127.0.0.1", 1), slot)
    table.remove(connection)  # established: the owner keeps the socket
    assert table.evict((slot,)) == []
    connection.evict()
    client.sendall(b"still open")
    server.settimeout(2)
    assert server.recv(64) == b"still open"
