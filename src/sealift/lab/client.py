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

Each service has its own thread, so a slow redis write (fsynced in the
guest) does not delay the HTTP requests; each thread stays inside the
namespace for its whole life (a socket belongs to the namespace it was
made in, and reconnections after a failure must be made there too). It
is bounded: at most ``max_duration_s`` and ``max_rounds`` requests per
service, whichever comes first. A thread's requests are sequential, so a
guest that stops answering delays its next one; rounds missed meanwhile
are skipped (counted), not sent in a burst.
"""

from __future__ import annotations

import http.client
import secrets
import threading
import time
from collections.abc import Callable, Iterator
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
    rounds: int = 0
    skipped: int = 0  # rounds not sent because the previous ones ran late (a silent guest)
    ok: int = 0
    failed: int = 0
    last_answer: float = 0.0  # monotonic; the start until the first answer
    longest_gap_s: float = 0.0
    longest_gap_at_s: float = 0.0  # when that gap began, since the start

    def answered(self, now: float, started: float) -> None:
        self.ok += 1
        self.close_gap(now, started)
        self.last_answer = now

    def close_gap(self, now: float, started: float) -> None:
        gap = now - self.last_answer
        if gap > self.longest_gap_s:
            self.longest_gap_s = gap
            self.longest_gap_at_s = self.last_answer - started


@dataclass
class OutageResult:
    """What the client saw. Times in milliseconds; gaps are the longest time without an answer."""

    guest: str
    duration_s: float
    http_requests: int
    http_ok: int
    http_failed: int
    http_longest_gap_ms: float
    redis_requests: int
    redis_ok: int
    redis_failed: int
    redis_longest_gap_ms: float
    rounds_skipped: int  # rounds not sent because the previous ones ran late (a silent guest)
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
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._failures: list[RequestFailure] = []
        self._acked: list[int] = []  # only the redis thread appends
        self._http, self._redis_svc = _Service("http"), _Service("redis")
        self._started = 0.0

    @property
    def acked_writes(self) -> list[int]:
        """The sequence numbers redis acknowledged so far (read after stop())."""
        return list(self._acked)

    # -- the one-shot checks --------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait until nginx serves the page and redis answers PING; returns the seconds waited."""
        started = time.monotonic()
        last_error = "no attempt"
        with enter_netns(self.netns):
            while time.monotonic() - started < timeout_s:
                try:
                    if _PAGE_MARKER in self.get_page() and self._ping():
                        return time.monotonic() - started
                    last_error = "unexpected answer"
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

    def _ping(self) -> bool:
        client = self._redis()
        try:
            return bool(client.ping())
        finally:
            client.close()

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
        # the very failure this client counts. One connection, made here, in the calling thread (and so
        # in its namespace).
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
        """Start both services' request loops (each in its own thread, inside the namespace)."""
        if self._threads:
            raise ClientError("this client has already run: make a new one")
        self._started = time.monotonic()
        self._http.last_answer = self._redis_svc.last_answer = self._started
        for svc, loop in ((self._http, self._http_loop), (self._redis_svc, self._redis_loop)):
            thread = threading.Thread(target=self._thread_main, args=(svc, loop), name=f"client-{svc.name}")
            thread.daemon = True
            self._threads.append(thread)
            thread.start()

    def stop(self) -> OutageResult:
        """Stop sending, check every acknowledged write, and return what was seen."""
        if not self._threads:
            raise ClientError("the client was never started")
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s * 3 + 10.0)
            if thread.is_alive():
                raise ClientError(f"the client thread {thread.name} did not stop")
        if self._errors:
            raise ClientError(f"the client failed: {self._errors[0]}") from self._errors[0]
        ended = time.monotonic()
        for svc in (self._http, self._redis_svc):
            svc.close_gap(ended, self._started)  # a silence still going on at the stop counts too
        with enter_netns(self.netns):
            found = self._read_back()
        return self._result(ended, found)

    def __enter__(self) -> OutageClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s * 3 + 10.0)

    def _thread_main(self, svc: _Service, loop: Callable[[_Service], None]) -> None:
        try:
            with enter_netns(self.netns):
                loop(svc)
        except BaseException as exc:  # handed to stop(), which raises it in the caller's thread
            self._errors.append(exc)

    def _paced(self, svc: _Service) -> Iterator[int]:
        """Round numbers every ``interval_s`` until stopped or bounded; rounds missed while late are skipped."""
        next_round = self._started
        while not self._stop.is_set() and svc.rounds < self.max_rounds:
            now = time.monotonic()
            if now - self._started > self.max_duration_s:
                return
            if now < next_round:
                self._stop.wait(next_round - now)
                continue
            behind = int((now - next_round) / self.interval_s)
            svc.skipped += behind
            next_round += (behind + 1) * self.interval_s
            svc.rounds += 1
            yield svc.rounds

    def _http_loop(self, svc: _Service) -> None:
        """GETs on a kept-alive connection, reconnecting after a failure."""
        conn: http.client.HTTPConnection | None = None
        try:
            for _ in self._paced(svc):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(self.guest_ip, self.http_port, timeout=self.timeout_s)
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200 or _PAGE_MARKER not in body:
                        raise http.client.HTTPException(f"HTTP {response.status}, {len(body)} bytes")
                except (OSError, http.client.HTTPException) as exc:
                    self._failed(svc, exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                svc.answered(time.monotonic(), self._started)
        finally:
            if conn is not None:
                conn.close()

    def _redis_loop(self, svc: _Service) -> None:
        """RPUSH of each round's number; a number is acknowledged when redis answered the push."""
        writer: redis.Redis | None = None
        try:
            for seq in self._paced(svc):
                try:
                    if writer is None:
                        writer = self._redis()  # connects: a guest that does not answer fails this round
                    writer.rpush(self.list_key, seq)
                except redis.RedisError as exc:
                    self._failed(svc, exc)
                    if writer is not None:
                        writer.close()
                    writer = None
                    continue
                self._acked.append(seq)
                svc.answered(time.monotonic(), self._started)
        finally:
            if writer is not None:
                writer.close()

    def _failed(self, svc: _Service, exc: BaseException) -> None:
        svc.failed += 1
        with self._lock:
            if len(self._failures) < _MAX_FAILURES_KEPT:
                at_ms = round((time.monotonic() - self._started) * 1000, 1)
                self._failures.append(RequestFailure(at_ms, svc.name, f"{type(exc).__name__}: {exc}"))

    def _read_back(self) -> set[int]:
        """The sequence numbers redis holds (bounded retries: the guest may still be settling)."""
        if not self._acked:
            return set()
        last_error: Exception | None = None
        for _ in range(10):
            try:
                reader = self._redis()
            except redis.RedisError as exc:
                last_error = exc
                time.sleep(0.5)
                continue
            try:
                return {int(v) for v in reader.lrange(self.list_key, 0, -1)}
            except redis.RedisError as exc:
                last_error = exc
                time.sleep(0.5)
            finally:
                reader.close()
        raise ClientError(f"cannot read the written list back from {self.guest_ip}: {last_error}")

    def _result(self, ended: float, found: set[int]) -> OutageResult:
        http_svc, redis_svc = self._http, self._redis_svc
        lost = [n for n in self._acked if n not in found]
        longest = max((http_svc, redis_svc), key=lambda s: s.longest_gap_s)
        return OutageResult(
            guest=self.guest_ip,
            duration_s=round(ended - self._started, 3),
            http_requests=http_svc.rounds,
            http_ok=http_svc.ok,
            http_failed=http_svc.failed,
            http_longest_gap_ms=round(http_svc.longest_gap_s * 1000, 1),
            redis_requests=redis_svc.rounds,
            redis_ok=redis_svc.ok,
            redis_failed=redis_svc.failed,
            redis_longest_gap_ms=round(redis_svc.longest_gap_s * 1000, 1),
            rounds_skipped=http_svc.skipped + redis_svc.skipped,
            longest_gap_ms=round(longest.longest_gap_s * 1000, 1),
            longest_gap_started_ms=round(longest.longest_gap_at_s * 1000, 1),
            writes_acked=len(self._acked),
            writes_found=len(found & set(self._acked)),
            writes_lost=len(lost),
            lost_sample=lost[:20],
            failures=list(self._failures),
        )
