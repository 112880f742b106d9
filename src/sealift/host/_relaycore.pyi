from array import array

# Types of the native relay core (_relaycore.c); host/relaycore.py is its only caller.

def seal_stream(
    in_fd: int,
    out_fd: int,
    key: bytes | None,
    iv: bytes | None,
    sequence: int,
    epoch_records: int,
    epoch_bytes: int,
    rekey_interval: int,
    rekey_bytes: int,
    records: int,
    pages: int,
    payload_bytes: int,
    max_record: int,
    in_timeout_ms: int,
    out_timeout_ms: int,
    progress: array[int] = ...,
    wake_fd: int = ...,
) -> tuple[int, int, str, int, int, int, int, bytes]: ...
def open_stream(
    in_fd: int,
    out_fd: int,
    key: bytes | None,
    iv: bytes | None,
    sequence: int,
    epoch_records: int,
    epoch_bytes: int,
    rekey_interval: int,
    rekey_bytes: int,
    records: int,
    pages: int,
    payload_bytes: int,
    max_record: int,
    in_timeout_ms: int,
    out_timeout_ms: int,
    progress: array[int] = ...,
    wake_fd: int = ...,
) -> tuple[int, int, str, int, int, int, int, bytes]: ...
