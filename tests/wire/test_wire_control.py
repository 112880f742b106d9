"""The control connection state machine: conversations and their violations."""

from __future__ import annotations

import pytest

from sealift.wire import (
    Abort,
    Commit,
    ControlConnection,
    ControlState,
    Manifest,
    Message,
    Outcome,
    OutcomeQuery,
    ProtocolError,
    Receipt,
    Refuse,
    Role,
)
from sealift.wire.messages import FRAME_HEADER, encode_frame
from wire_samples import MID, OTHER_MID, accept, hello, migration_conversation


def pair() -> tuple[ControlConnection, ControlConnection]:
    return ControlConnection(Role.CLIENT), ControlConnection(Role.SERVER)


def deliver(ends: dict[Role, ControlConnection], sender: Role, msg: Message) -> None:
    receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
    assert ends[receiver].receive_data(ends[sender].send(msg)) == [msg]
    assert ends[sender].state is ends[receiver].state


def run(steps: list[tuple[Role, Message]]) -> dict[Role, ControlConnection]:
    client, server = pair()
    ends = {Role.CLIENT: client, Role.SERVER: server}
    for sender, msg in steps:
        deliver(ends, sender, msg)
    return ends


def test_migration_conversation_happy_path() -> None:
    client, server = pair()
    ends = {Role.CLIENT: client, Role.SERVER: server}
    expected_states = [
        ControlState.HELLO_SENT,
        ControlState.ACCEPTED,
        ControlState.MANIFEST_SENT,
        ControlState.PREPARED,
        ControlState.COMMITTED,
        ControlState.DONE,
    ]
    assert client.state is ControlState.IDLE and not client.closed
    for (sender, msg), state in zip(migration_conversation(), expected_states, strict=True):
        deliver(ends, sender, msg)
        assert client.state is state
    assert client.closed and server.closed
    assert server.hello == hello() and server.migration_id == MID


def test_refuse_ends_the_conversation() -> None:
    ends = run([(Role.CLIENT, hello()), (Role.SERVER, Refuse(MID, "no capacity"))])
    assert ends[Role.CLIENT].state is ControlState.REFUSED and ends[Role.CLIENT].closed
    with pytest.raises(ProtocolError):
        ends[Role.CLIENT].send(Manifest(MID, "m"))


@pytest.mark.parametrize("after", range(1, 6))
@pytest.mark.parametrize("aborter", [Role.CLIENT, Role.SERVER])
def test_abort_from_either_side_after_hello(after: int, aborter: Role) -> None:
    ends = run(migration_conversation()[:after])
    deliver(ends, aborter, Abort(MID, "operator cancelled"))
    for end in ends.values():
        assert end.state is ControlState.ABORTED and end.closed
    # After the end, nothing more is accepted.
    with pytest.raises(ProtocolError):
        ends[Role.SERVER].receive_data(encode_frame(Commit(MID)))
    assert ends[Role.SERVER].state is ControlState.FAILED


def test_abort_not_allowed_before_hello_or_after_done() -> None:
    client, server = pair()
    with pytest.raises(ProtocolError):
        client.send(Abort(MID, "x"))
    with pytest.raises(ProtocolError):
        server.receive_data(encode_frame(Abort(MID, "x")))
    ends = run(migration_conversation())
    with pytest.raises(ProtocolError):
        ends[Role.SERVER].send(Abort(MID, "too late"))


def test_outcome_conversation() -> None:
    ends = run([(Role.CLIENT, OutcomeQuery(MID)), (Role.SERVER, Outcome(MID, "committed"))])
    assert ends[Role.CLIENT].state is ControlState.DONE
    assert ends[Role.SERVER].hello is None


def test_outcome_conversation_rejects_migration_messages() -> None:
    client, server = pair()
    server.receive_data(client.send(OutcomeQuery(MID)))
    with pytest.raises(ProtocolError):
        server.send(accept())
    with pytest.raises(ProtocolError):
        server.send(Abort(MID, "no"))  # abort belongs to the migration conversation
    with pytest.raises(ProtocolError, match="migration"):
        server.send(Outcome(OTHER_MID, "aborted"))


def out_of_order_cases() -> list[tuple[list[tuple[Role, Message]], Role, Message]]:
    convo = migration_conversation()
    return [
        ([], Role.CLIENT, Manifest(MID, "m")),  # no Hello yet
        ([], Role.CLIENT, Commit(MID)),
        ([], Role.SERVER, accept()),  # server speaks first
        ([], Role.CLIENT, Outcome(MID, "committed")),  # client cannot answer
        (convo[:1], Role.CLIENT, hello()),  # duplicate Hello
        (convo[:1], Role.CLIENT, Manifest(MID, "m")),  # before Accept
        (convo[:1], Role.SERVER, Receipt(MID, "prepared", "r")),
        (convo[:2], Role.SERVER, accept()),  # duplicate Accept
        (convo[:2], Role.CLIENT, Commit(MID)),  # commit before receipt
        (convo[:2], Role.SERVER, Refuse(MID, "late")),  # refuse after accept
        (convo[:3], Role.SERVER, Receipt(MID, "running", "r")),  # wrong stage
        (convo[:3], Role.CLIENT, Manifest(MID, "m")),  # duplicate manifest
        (convo[:4], Role.SERVER, Receipt(MID, "prepared", "r")),  # duplicate receipt
        (convo[:5], Role.SERVER, Receipt(MID, "prepared", "r")),  # wrong stage
        (convo[:5], Role.CLIENT, Commit(MID)),  # duplicate commit
        (convo[:3], Role.SERVER, Receipt(OTHER_MID, "prepared", "r")),  # wrong migration
        (convo[:2], Role.CLIENT, Abort(OTHER_MID, "x")),  # wrong migration
        (convo, Role.CLIENT, Commit(MID)),  # after done
        (convo, Role.CLIENT, hello()),  # a second conversation on one connection
    ]


@pytest.mark.parametrize("prefix,sender,msg", out_of_order_cases())
def test_out_of_order_is_rejected_on_both_ends(prefix: list[tuple[Role, Message]], sender: Role, msg: Message) -> None:
    ends = run(prefix)
    sending, receiving = ends[sender], ends[Role.SERVER if sender is Role.CLIENT else Role.CLIENT]
    state = sending.state
    with pytest.raises(ProtocolError):
        sending.send(msg)
    assert sending.state is state  # local misuse leaves the state alone
    with pytest.raises(ProtocolError):
        receiving.receive_data(encode_frame(msg))
    assert receiving.state is ControlState.FAILED and receiving.closed
    with pytest.raises(ProtocolError, match="already failed"):
        receiving.receive_data(b"\x01")


def test_reflected_accept_nonce_is_rejected() -> None:
    client, server = pair()
    server.receive_data(client.send(hello()))
    with pytest.raises(ProtocolError, match="reflection"):
        client.receive_data(encode_frame(accept(nonce=hello().nonce)))


def test_byte_by_byte_delivery_and_coalesced_frames() -> None:
    client, server = pair()
    frame = client.send(hello())
    got: list[Message] = []
    for i in range(len(frame)):
        got += server.receive_data(frame[i : i + 1])
    assert got == [hello()]
    # Two frames in one chunk (an Abort right behind a Manifest).
    client2, server2 = pair()
    server2.receive_data(client2.send(hello()))
    client2.receive_data(server2.send(accept()))
    data = client2.send(Manifest(MID, "m")) + client2.send(Abort(MID, "changed my mind"))
    assert [type(m) for m in server2.receive_data(data)] == [Manifest, Abort]


def test_oversized_length_rejected_from_header_alone() -> None:
    server = ControlConnection(Role.SERVER)
    with pytest.raises(ProtocolError, match="exceeds limit"):
        server.receive_data(FRAME_HEADER.pack(1, 1, 0, 10_000_000))


@pytest.mark.parametrize(
    "header",
    [
        FRAME_HEADER.pack(9, 1, 0, 2),
        FRAME_HEADER.pack(1, 77, 0, 2),
        FRAME_HEADER.pack(1, 1, 4, 2),
    ],
)
def test_bad_header_rejected_before_payload(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        ControlConnection(Role.SERVER).receive_data(header)


def test_trailing_bytes_after_end_are_rejected() -> None:
    ends = run(migration_conversation()[:5])
    frame = ends[Role.SERVER].send(Receipt(MID, "running", "r"))
    with pytest.raises(ProtocolError, match="after the conversation ended"):
        ends[Role.CLIENT].receive_data(frame + b"\x01")


def test_non_json_payload_fails_connection() -> None:
    server = ControlConnection(Role.SERVER)
    with pytest.raises(ProtocolError):
        server.receive_data(FRAME_HEADER.pack(1, 1, 0, 5) + b"hello")
    assert server.failure and server.state is ControlState.FAILED


def test_empty_data_is_a_no_op() -> None:
    server = ControlConnection(Role.SERVER)
    assert server.receive_data(b"") == []
    assert server.state is ControlState.IDLE


def test_advert_conversation() -> None:
    """Client asks for the server's signed advert; one answer, then the conversation is over."""
    import pytest

    from sealift.wire.control import ControlConnection, Role
    from sealift.wire.errors import ProtocolError
    from sealift.wire.messages import Advert, AdvertQuery

    client, server = ControlConnection(Role.CLIENT), ControlConnection(Role.SERVER)
    query = AdvertQuery("a" * 32)
    assert server.receive_data(client.send(query)) == [query]
    answer = Advert("a" * 32, '{"signed": true}')
    assert client.receive_data(server.send(answer)) == [answer]
    assert client.closed and server.closed
    from sealift.wire.messages import encode_frame

    with pytest.raises(ProtocolError, match="may not send Advert"):
        ControlConnection(Role.CLIENT).receive_data(encode_frame(answer))  # unsolicited
