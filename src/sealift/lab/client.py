"""The client that measures a migration's outage as a user of the guest sees it.

From a host on the VM network (the lab's ``client`` namespace), every
``interval_s`` (10 ms) it sends one HTTP GET to the guest's nginx and one
write to its redis (``RPUSH`` of the next sequence number onto a list of
its own), each with a timeout. It records every failure, and for each
service the longest time between two answers (from the start, and up to
the stop while the guest has not answered again): the *client-seen
outage*. When stopped, it reads the list back and counts the acknowledged
writes that are missing (``writes_lost``): a write redis acknowledged
must survive a migration.

One thread does the work, inside the namespace for its whole life (a
socket belongs to the namespace it was made in, and reconnections after a
failure must be made there too). It is bounded: at most ``max_duration_s``
and ``max_rounds`` rounds, whichever comes first. Requests are sequential,
so a guest that stops answering delays the next round; missed rounds are
skipped, not sent in a burst.
"""

from __future__ import annotations

import http.client
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sealift.errors import SealiftError
from sealift.lab.netns import enter_netns

__all__ = ["ClientError", "OutageClient", "OutageResult", "RequestFailure"]

_MAX_FAILURES_KEPT = 50
_PAGE_MARKER = b"sealift debian guest"


class ClientError(SealiftError):
    """The outage client could not run, or could not read the guest back afterwards."""

    code = "outage_client_error"


@dataclass(frozen=True)
class RequestFailure:
    at_ms: float  # since the client started
    service: str  # "http" or "redis"
    error: str


@dataclass
class _Service:
    """One service's answers and silences."""

    name: str
    ok: int = 0
    failed: int = 0
    last_answer: float = 0.0  # monotonic; the start until the first answer
    longest_gap_s: float = 0.0
    longest_gap_at_s: float = 0.0  # when that gap began, since the start

    def answered(self, now: float, started: float) -> None:
        self.ok += 1
        self._close_gap(now, started)
        self.last_answer = now

    def _close_gap(self, now: float, started: float) -> None:
        gap = now - self.last_answer
        if gap > self.longest_gap_s:
            self.longest_gap_s = gap
            self.longest_gap_at_s = self.last_answer - started


@dataclass
class OutageResult:
    """What the client saw. Times in milliseconds; gaps are the longest time without an answer."""

    guest: str
    duration_s: float
    rounds: int
    rounds_skipped: int  # rounds not sent because the previous ones ran late (a silent guest)
    http_ok: int
    http_failed: int
    http_longest_gap_ms: float
    redis_ok: int
    redis_failed: int
    redis_longest_gap_ms: float
    longest_gap_ms: float  # the longer of the two: the client-seen outage
    longest_gap_started_ms: float  # when that silence began, since the client started
    writes_acked: int
    writes_found: int
    writes_lost: int  # acknowledged but not in redis afterwards
    lost_sample: list[int] = field(default_factory=list)  # the first few lost sequence numbers
    failures: list[RequestFailure] = field(default_factory=list)  # the first few, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OutageClient:
    """Requests to one guest every ``interval_s`` from namespace ``netns`` until stopped (or bounded)."""

    def __init__(
        self,
        guest_ip: str,
        *,
        netns: str | None = None,
        http_port: int = 80,
        redis_port: int = 6379,
        interval_s: float = 0.010,
        timeout_s: float = 1.0,
        max_duration_s: float = 600.0,
        max_rounds: int = 200_000,
    ) -> None:
        self.guest_ip = guest_ip
        self.netns = netns
        self.http_port = http_port
        self.redis_port = redis_port
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_duration_s = max_duration_s
        self.max_rounds = max_rounds
        self.list_key = f"sealift:client:{secrets.token_hex(4)}"  # a list of this run's own
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: OutageResult | None = None
        self._running = threading.Event()

    # -- the one-shot checks --------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait until nginx serves the page and redis answers PING; returns the seconds waited."""
        started = time.monotonic()
        last_error = "no attempt"
        with enter_netns(self.netns):
            while time.monotonic() - started < timeout_s:
                try:
                    if _PAGE_MARKER not in self.get_page() or not self._redis().ping():
                        last_error = "unexpected answer"
                    else:
                        return time.monotonic() - started
                except (OSError, http.client.HTTPException, redis.RedisError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
        raise ClientError(f"guest {self.guest_ip} did not answer HTTP and redis in {timeout_s:.0f} s: {last_error}")

    def get_page(self) -> bytes:
        """One HTTP GET / (call inside the namespace: from wait_ready, or the caller's enter_netns)."""
        conn = http.client.HTTPConnection(self.guest_ip, self.http_port, timeout=self.timeout_s)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise http.client.HTTPException(f"HTTP {response.status}")
            return body
        finally:
            conn.close()

    def redis_get(self, key: str) -> bytes | None:
        """One redis GET (made inside the namespace)."""
        with enter_netns(self.netns):
            client = self._redis()
            try:
                value = client.get(key)
            finally:
                client.close()
        return value if isinstance(value, bytes) else None

    def _redis(self) -> redis.Redis:
        # No retries: a write retried after a lost reply could be applied twice, and a retry would hide
        # the very failure this client counts. Connections are made on first use, in this thread.
        return redis.Redis(
            host=self.guest_ip,
            port=self.redis_port,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )

    # -- the run --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise ClientError("this client has already run: make a new one")
        self._thread = threading.Thread(target=self._thread_main, name="outage-client", daemon=True)
        self._thread.start()
        if not self._running.wait(10.0) and self._error is None:
            raise ClientError("the client thread did not start")
        if self._error is not None:
            raise ClientError(f"the client could not start: {self._error}") from self._error

    def stop(self) -> OutageResult:
        """Stop sending, check every acknowledged write, and return what was seen."""
        if self._thread is None:
            raise ClientError("the client was never started")
        self._stop.set()
        self._thread.join(self.max_duration_s + 60.0)
        if self._thread.is_alive():
            raise ClientError("the client thread did not stop")
        if self._error is not None:
            raise ClientError(f"the client failed: {self._error}") from self._error
        assert self._result is not None
        return self._result

    def __enter__(self) -> OutageClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._result is None and self._error is None:
            self._stop.set()
            self._thread.join(self.max_duration_s + 60.0)

    def _thread_main(self) -> None:
        try:
            with enter_netns(self.netns):
                self._running.set()
                self._result = self._run()
        except BaseException as exc:  # handed to stop(), which raises it in the caller's thread
            self._error = exc
            self._running.set()

    def _run(self) -> OutageResult:
        http_svc, redis_svc = _Service("http"), _Service("redis")
        failures: list[RequestFailure] = []
        acked: list[int] = []
        started = time.monotonic()
        http_svc.last_answer = redis_svc.last_answer = started
        conn: http.client.HTTPConnection | None = None
        writer = self._redis()
        rounds = skipped = 0
        next_round = started
        try:
            while not self._stop.is_set() and rounds < self.max_rounds:
                now = time.monotonic()
                if now - started > self.max_duration_s:
                    break
                if now < next_round:
                    self._stop.wait(next_round - now)
                    continue
                behind = int((now - next_round) / self.interval_s)
                skipped += behind
                next_round += (behind + 1) * self.interval_s
                rounds += 1
                conn = self._http_round(conn, http_svc, failures, started)
                self._redis_round(writer, rounds, acked, redis_svc, failures, started)
        finally:
            if conn is not None:
                conn.close()
            writer.close()
        ended = time.monotonic()
        for svc in (http_svc, redis_svc):
            svc._close_gap(ended, started)  # a silence still going on at the stop counts too
        found = self._read_back(acked)
        lost = [n for n in acked if n not in found]
        longest = max((http_svc, redis_svc), key=lambda s: s.longest_gap_s)
        return OutageResult(
            guest=self.guest_ip,
            duration_s=round(ended - started, 3),
            rounds=rounds,
            rounds_skipped=skipped,
            http_ok=http_svc.ok,
            http_failed=http_svc.failed,
            http_longest_gap_ms=round(http_svc.longest_gap_s * 1000, 1),
            redis_ok=redis_svc.ok,
            redis_failed=redis_svc.failed,
            redis_longest_gap_ms=round(redis_svc.longest_gap_s * 1000, 1),
            longest_gap_ms=round(longest.longest_gap_s * 1000, 1),
            longest_gap_started_ms=round(longest.longest_gap_at_s * 1000, 1),
            writes_acked=len(acked),
            writes_found=len(found & set(acked)),
            writes_lost=len(lost),
            lost_sample=lost[:20],
            failures=failures,
        )

    def _http_round(
        self,
        conn: http.client.HTTPConnection | None,
        svc: _Service,
        failures: list[RequestFailure],
        started: float,
    ) -> http.client.HTTPConnection | None:
        """One GET on a kept-alive connection; returns the connection to reuse (None after a failure)."""
        try:
            if conn is None:
                conn = http.client.HTTPConnection(self.guest_ip, self.http_port, timeout=self.timeout_s)
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or _PAGE_MARKER not in body:
                raise http.client.HTTPException(f"HTTP {response.status}, {len(body)} bytes")
        except (OSError, http.client.HTTPException) as exc:
            svc.failed += 1
            _note(failures, started, "http", exc)
            if conn is not None:
                conn.close()
            return None
        svc.answered(time.monotonic(), started)
        return conn

    def _redis_round(
        self,
        writer: redis.Redis,
        seq: int,
        acked: list[int],
        svc: _Service,
        failures: list[RequestFailure],
        started: float,
    ) -> None:
        try:
            writer.rpush(self.list_key, seq)
        except redis.RedisError as exc:
            svc.failed += 1
            _note(failures, started, "redis", exc)
            return
        acked.append(seq)
        svc.answered(time.monotonic(), started)

    def _read_back(self, acked: list[int]) -> set[int]:
        """The sequence numbers redis holds (bounded retries: the guest may still be settling)."""
        if not acked:
            return set()
        last_error: Exception | None = None
        for _ in range(10):
            reader = self._redis()
            try:
                values = reader.lrange(self.list_key, 0, -1)
                return {int(v) for v in values}
            except redis.RedisError as exc:
                last_error = exc
                time.sleep(0.5)
            finally:
                reader.close()
        raise ClientError(f"cannot read the written list back from {self.guest_ip}: {last_error}")


def _note(failures: list[RequestFailure], started: float, service: str, exc: BaseException) -> None:
    if len(failures) < _MAX_FAILURES_KEPT:
        at_ms = round((time.monotonic() - started) * 1000, 1)
        failures.append(RequestFailure(at_ms, service, f"{type(exc).__name__}: {exc}"))
