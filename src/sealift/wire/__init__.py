"""sealift wire protocol: sans-IO control frames, data records, record protection.

Bytes in, events out; events in, bytes out. No sockets here: the agent and
engine do the I/O and drive these state machines.
"""

from .control import ControlConnection, ControlState, Role
from .datastream import (
    HEADER_SIZE,
    MAX_PAGES_PER_RECORD,
    STREAM_OPEN,
    STREAM_OPEN_SIZE,
    DataEvent,
    DataStreamReader,
    DataStreamWriter,
    DeviceStateReceived,
    PagesReceived,
    RecordType,
    RoundEnded,
    StreamEnded,
    ZeroPagesReceived,
    decode_stream_open,
    encode_stream_open,
)
from .errors import ProtocolError, RecordAuthError
from .messages import (
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    Abort,
    Accept,
    Commit,
    Hello,
    Manifest,
    Message,
    MessageType,
    Outcome,
    OutcomeQuery,
    Receipt,
    Refuse,
)
from .records import AeadProtection, NoProtection, RecordProtection

__all__ = [
    "HEADER_SIZE",
    "MAX_CONTROL_PAYLOAD",
    "MAX_PAGES_PER_RECORD",
    "PROTOCOL_VERSION",
    "STREAM_OPEN",
    "STREAM_OPEN_SIZE",
    "Abort",
    "Accept",
    "AeadProtection",
    "Commit",
    "ControlConnection",
    "ControlState",
    "DataEvent",
    "DataStreamReader",
    "DataStreamWriter",
    "DeviceStateReceived",
    "Hello",
    "Manifest",
    "Message",
    "MessageType",
    "NoProtection",
    "Outcome",
    "OutcomeQuery",
    "PagesReceived",
    "ProtocolError",
    "Receipt",
    "RecordAuthError",
    "RecordProtection",
    "RecordType",
    "Refuse",
    "Role",
    "RoundEnded",
    "StreamEnded",
    "ZeroPagesReceived",
    "decode_stream_open",
    "encode_stream_open",
]
