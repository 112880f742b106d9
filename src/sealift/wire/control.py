"""Sans-IO state machine for the control connection (inside mutual TLS 1.3).

Both ends run the same conversation model; each knows its role, so
`send` checks what this side may say now and `receive_data` checks what
the peer may say now. The client's first message picks the conversation:

    migration: C Hello -> S Accept | Refuse(end) -> C Manifest
               -> S Receipt(prepared) -> C Commit -> S Receipt(running) -> done
               (Abort from either side at any point after Hello ends it)
    outcome:   C OutcomeQuery -> S Outcome -> done
    advert:    C AdvertQuery -> S Advert -> done

Any protocol violation moves the connection to FAILED and raises
ProtocolError; the caller closes the socket. Nothing is accepted after
the conversation ended.
"""

from __future__ import annotations

from enum import Enum

from .errors import ProtocolError
from .messages import (
    FRAME_HEADER_SIZE,
    Accept,
    AdvertQuery,
    Hello,
    Message,
    MessageType,
    OutcomeQuery,
    Receipt,
    decode_payload,
    encode_frame,
    parse_frame_header,
)


class Role(Enum):
    CLIENT = "client"  # the side that connected: source, or destination asking an outcome
    SERVER = "server"


class ControlState(Enum):
    IDLE = "idle"  # nothing exchanged yet
    HELLO_SENT = "hello_sent"  # server to answer Accept or Refuse
    ACCEPTED = "accepted"  # client to send Manifest
    MANIFEST_SENT = "manifest_sent"  # server to answer Receipt(prepared)
    PREPARED = "prepared"  # client to send Commit
    COMMITTED = "committed"  # server to answer Receipt(running)
    QUERIED = "queried"  # server to answer Outcome
    ADVERT_QUERIED = "advert_queried"  # server to answer Advert
    DONE = "done"
    REFUSED = "refused"
    ABORTED = "aborted"
    FAILED = "failed"


_C, _S = Role.CLIENT, Role.SERVER
_ST = ControlState
_T = MessageType

# (state, sender, message type) -> next state. Anything absent is out of order.
_TRANSITIONS: dict[tuple[ControlState, Role, MessageType], ControlState] = {
    (_ST.IDLE, _C, _T.HELLO): _ST.HELLO_SENT,
    (_ST.IDLE, _C, _T.OUTCOME_QUERY): _ST.QUERIED,
    (_ST.HELLO_SENT, _S, _T.ACCEPT): _ST.ACCEPTED,
    (_ST.HELLO_SENT, _S, _T.REFUSE): _ST.REFUSED,
    (_ST.ACCEPTED, _C, _T.MANIFEST): _ST.MANIFEST_SENT,
    (_ST.MANIFEST_SENT, _S, _T.RECEIPT): _ST.PREPARED,
    (_ST.PREPARED, _C, _T.COMMIT): _ST.COMMITTED,
    (_ST.COMMITTED, _S, _T.RECEIPT): _ST.DONE,
    (_ST.QUERIED, _S, _T.OUTCOME): _ST.DONE,
    (_ST.IDLE, _C, _T.ADVERT_QUERY): _ST.ADVERT_QUERIED,
    (_ST.ADVERT_QUERIED, _S, _T.ADVERT): _ST.DONE,
}
for _state in (_ST.HELLO_SENT, _ST.ACCEPTED, _ST.MANIFEST_SENT, _ST.PREPARED, _ST.COMMITTED):
    for _role in Role:
        _TRANSITIONS[(_state, _role, _T.ABORT)] = _ST.ABORTED

# The receipt stage each waiting state expects.
_RECEIPT_STAGE = {_ST.MANIFEST_SENT: "prepared", _ST.COMMITTED: "running"}

_ENDED = frozenset({_ST.DONE, _ST.REFUSED, _ST.ABORTED, _ST.FAILED})


class ControlConnection:
    """One control connection, one conversation. Bytes in, messages out; messages in, bytes out."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self._peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._state = ControlState.IDLE
        self._migration_id: str | None = None
        self._hello: Hello | None = None
        self._buffer = bytearray()
        self._pending: tuple[MessageType, int] | None = None  # parsed header awaiting payload
        self._failure: str | None = None

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def closed(self) -> bool:
        """True once the conversation ended (done, refused, aborted or failed)."""
        return self._state in _ENDED

    @property
    def migration_id(self) -> str | None:
        return self._migration_id

    @property
    def hello(self) -> Hello | None:
        """The Hello of a migration conversation, once sent or received."""
        return self._hello

    @property
    def failure(self) -> str | None:
        """The reason of the protocol error that failed this connection, if any."""
        return self._failure

    # -- sending ----------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Encode `msg` after checking this side may send it now; raises ProtocolError otherwise."""
        self._check_allowed(self.role, msg)  # local misuse: state is left unchanged
        frame = encode_frame(msg)
        self._advance(self.role, msg)
        return frame

    # -- receiving --------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of a frame received but not yet complete (what a peer that stalls mid-frame left)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Feed bytes from the peer; returns the complete messages they finish, in order."""
        if self._state is ControlState.FAILED:
            raise ProtocolError(f"control connection already failed: {self._failure}")
        if not data:
            return []
        try:
            if self.closed:
                raise ProtocolError(f"data received after the conversation ended ({self._state.value})")
            self._buffer += data
            return self._drain()
        except ProtocolError as exc:
            self._state = ControlState.FAILED
            self._failure = exc.reason
            self._buffer.clear()
            raise

    def _drain(self) -> list[Message]:
        messages: list[Message] = []
        while (msg := self._next_message()) is not None:
            self._check_allowed(self._peer, msg)
            self._advance(self._peer, msg)
            messages.append(msg)
            if self.closed and self._buffer:
                raise ProtocolError(f"data received after the conversation ended ({self._state.value})")
        return messages

    def _next_message(self) -> Message | None:
        if self._pending is None:
            if len(self._buffer) < FRAME_HEADER_SIZE:
                return None
            # The header alone decides type and length bound, before the payload arrives.
            self._pending = parse_frame_header(bytes(self._buffer[:FRAME_HEADER_SIZE]))
        msg_type, length = self._pending
        end = FRAME_HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[FRAME_HEADER_SIZE:end])
        del self._buffer[:end]
        self._pending = None
        return decode_payload(msg_type, payload)

    # -- the conversation rules --------------------------------------------

    def _check_allowed(self, sender: Role, msg: Message) -> None:
        who = "this side" if sender is self.role else "peer"
        name = type(msg).__name__
        if self.closed:
            raise ProtocolError(
                f"{who} ({sender.value}) sent {name} after the conversation ended ({self._state.value})"
            )
        if (self._state, sender, msg.TYPE) not in _TRANSITIONS:
            raise ProtocolError(f"{who} ({sender.value}) may not send {name} in state {self._state.value}")
        if self._migration_id is not None and msg.migration_id != self._migration_id:
            raise ProtocolError(
                f"{name} is for migration {msg.migration_id}, but this connection is for {self._migration_id}"
            )
        if isinstance(msg, Receipt):
            expected = _RECEIPT_STAGE[self._state]
            if msg.stage != expected:
                raise ProtocolError(f"Receipt stage {msg.stage!r} out of order: expected {expected!r}")
        if isinstance(msg, Accept) and self._hello is not None and msg.nonce == self._hello.nonce:
            # A reflected nonce would let one side's freshness stand for both.
            raise ProtocolError("Accept nonce equals the Hello nonce (reflection)")

    def _advance(self, sender: Role, msg: Message) -> None:
        if isinstance(msg, (Hello, OutcomeQuery, AdvertQuery)):
            self._migration_id = msg.migration_id
        if isinstance(msg, Hello):
            self._hello = msg
        self._state = _TRANSITIONS[(self._state, sender, msg.TYPE)]
