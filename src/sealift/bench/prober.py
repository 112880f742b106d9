"""Downtime seen from outside: a client probes the guest's UDP service every few ms, like ping.

Probes go out without waiting for answers; the downtime is the longest time
between two consecutive answers while the prober ran (the guest keeps its
address across the migration, on the lab's VM bridge). The socket is made
inside the client's namespace and keeps belonging to it afterwards.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from sealift.lab.netns import enter_netns

INTERVAL_S = 0.005


class GapProber:
    def __init__(self, netns: str | None, address: tuple[str, int], interval_s: float = INTERVAL_S) -> None:
        self.address = address
        self.interval_s = interval_s
        self.answers = 0
        self.longest_gap_s = 0.0
        self.last_answer: float | None = None
        with enter_netns(netns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gap-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sock.sendto(b"probe", self.address)
            except OSError:
                pass  # unreachable for now: that is the gap being measured
            readable, _, _ = select.select([self._sock], [], [], self.interval_s)
            if readable:
                self._drain()

    def _drain(self) -> None:
        now = time.monotonic()
        while True:
            try:
                self._sock.recv(256)
            except OSError:
                return  # EAGAIN: drained
            if self.last_answer is not None:
                self.longest_gap_s = max(self.longest_gap_s, now - self.last_answer)
            self.last_answer = now
            self.answers += 1

    def reset_gap(self) -> None:
        """Forget the gaps so far (the guest's boot), keep probing."""
        self.longest_gap_s = 0.0

    def wait_answer(self, after: float, timeout: float) -> bool:
        """Wait until an answer arrived later than monotonic time `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_answer is not None and self.last_answer > after:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> float:
        """Stop probing; the longest gap between answers, in ms."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return round(self.longest_gap_s * 1000, 1)
