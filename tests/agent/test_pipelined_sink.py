"""The data stream's pipelined sink: order kept, buffers not reused early, errors surfaced."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from sealift.host.transport import PipelinedSink
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, PagesReceived, StreamEnded
from sealift.wire.records import AeadProtection

KEY, IV = b"k" * 32, b"i" * 12


def receive_all(sock: socket.socket, out: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        out += chunk


@pytest.mark.timeout(60)
def test_records_arrive_in_order_and_intact_through_the_sink() -> None:
    a, b = socket.socketpair()
    received = bytearray()
    reader_thread = threading.Thread(target=receive_all, args=(b, received))
    reader_thread.start()
    npages = 4096
    image = np.random.default_rng(1).integers(0, 255, (npages, 4096), dtype=np.uint8)
    writer = DataStreamWriter(AeadProtection(KEY, IV), npages, out_buffers=PipelinedSink.ring_size())
    sink = PipelinedSink(a)
    for first in range(0, npages, 256):
        idx, data = writer.begin_pages(256)
        idx[:] = np.arange(first, first + 256, dtype=np.uint32)
        np.frombuffer(data, dtype=np.uint8).reshape(256, 4096)[:] = image[first : first + 256]
        sink(writer.finish_pages(256))
    sink(writer.end())
    sink.flush()
    sink.close()
    a.close()
    reader_thread.join(30)

    reader = DataStreamReader(AeadProtection(KEY, IV), npages)
    view, rebuilt, events = memoryview(bytes(received)), np.zeros_like(image), []
    while view:
        size = reader.read_header(view[: reader.HEADER_SIZE])
        view = view[reader.HEADER_SIZE :]
        reader.payload_buffer()[:] = view[:size]
        view = view[size:]
        event = reader.finish_record()
        events.append(type(event))
        if isinstance(event, PagesReceived):
            rebuilt[np.asarray(event.indexes)] = np.frombuffer(event.data, dtype=np.uint8).reshape(-1, 4096)
    assert events[-1] is StreamEnded and events.count(PagesReceived) == 16
    assert np.array_equal(rebuilt, image)


@pytest.mark.timeout(30)
def test_a_send_error_is_raised_to_the_engine() -> None:
    a, b = socket.socketpair()
    b.close()  # the peer is gone
    sink = PipelinedSink(a)
    with pytest.raises(OSError):
        for _ in range(100):
            sink(memoryview(b"x" * 65536))
        sink.flush()
    sink.close()
    a.close()
