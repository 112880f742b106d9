"""A synchronous, time-bounded QMP connection on top of the asyncio ``qemu.qmp`` library.

sealift's agent is built on threads, and ``qemu.qmp`` is asyncio. Rather
than the library's legacy sync wrapper (which runs a loop in the calling
thread, so it cannot be used from two threads or from inside another
loop), every connection of the process lives on one private event loop in
a daemon thread; callers submit coroutines to it and wait for the result
with a deadline. A QMP command that does not answer in time raises
:class:`QmpTimeout` instead of hanging its caller.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError, StateError

__all__ = ["QmpCommandError", "QmpConnection", "QmpDisconnected", "QmpError", "QmpTimeout", "last_event_time"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
_EVENT_HISTORY = 256  # recent events kept for diagnostics; older ones are dropped


class QmpError(Exception):
    """A QMP conversation with QEMU failed."""


class QmpTimeout(QmpError):
    """QEMU did not answer in time."""


class QmpDisconnected(QmpError):
    """The QMP connection is gone (QEMU exited, or was never reached)."""


class QmpCommandError(QmpError):
    """QEMU refused a command; ``error_class`` and the message are QEMU's own."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QEMU refused {command}: {description} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.description = description


class _Loop:
    """The process's one QMP event loop, in a daemon thread, started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="qmp-loop", daemon=True).start()
                cls._loop = loop
            return cls._loop


def _run(coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
    """Run ``coro`` on the QMP loop and wait for it, at most ``timeout`` seconds."""
    loop = _Loop.get()
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
    try:
        # The in-loop wait_for cancels the coroutine; the margin here only covers a stalled loop.
        return future.result(timeout + 5.0)
    except (TimeoutError, concurrent.futures.TimeoutError) as exc:
        future.cancel()
        raise QmpTimeout(f"{what}: no answer from QEMU within {timeout:.1f} s") from exc


class QmpConnection:
    """One QMP session with one QEMU, usable from any thread (commands are serialised by QEMU)."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._client: QMPClient | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_EVENT_HISTORY)
        self._event_arrived = threading.Event()  # wakes wait_event(): react to QEMU at once, not at the next poll

    # -- connection --------------------------------------------------------------

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Connect, retrying while the socket is not there yet (QEMU still starting)."""
        _run(self._connect(timeout), timeout, f"connecting to QMP at {self.socket_path}")

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            client = QMPClient(self.name)
            try:
                await client.connect(str(self.socket_path))
            except ConnectError as exc:
                last_error = exc
                await asyncio.sleep(0.05)
                continue
            self._client = client
            # Drain the library's default listener (it queues every event until read).
            self._event_task = asyncio.get_running_loop().create_task(self._collect_events(client.events))
            return
        raise QmpDisconnected(f"cannot connect to QMP socket {self.socket_path}: {last_error}")

    async def _collect_events(self, listener: EventListener) -> None:
        async for event in listener:
            self._events.append(dict(event))
            self._event_arrived.set()

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect (QEMU keeps running); safe to call twice or after QEMU exited."""
        client, self._client = self._client, None
        task, self._event_task = self._event_task, None
        if client is not None:
            try:
                _run(self._disconnect(client, task), timeout, "closing QMP")
            except QmpTimeout:
                pass  # a dead peer: the socket is dropped with the client object

    @staticmethod
    async def _disconnect(client: QMPClient, event_task: asyncio.Task[None] | None) -> None:
        if event_task is not None:
            event_task.cancel()  # it waits for events forever otherwise
        try:
            await client.disconnect()
        except (QMPError, OSError, EOFError):
            pass  # disconnect() re-raises why the session ended (e.g. QEMU exited): closed either way

    @property
    def connected(self) -> bool:
        return self._client is not None

    def recent_events(self) -> list[dict[str, Any]]:
        """The last QMP events QEMU sent (for diagnostics), oldest first."""
        return list(self._events)

    def wait_event(self, timeout: float) -> bool:
        """Sleep up to `timeout` s, less if QEMU sends an event meanwhile; True if one came.

        A poller calls this between queries: the state an event announces is
        then read by the next query, so an event landing between the wait
        and the clear is never lost, only noticed by that query.
        """
        arrived = self._event_arrived.wait(timeout)
        self._event_arrived.clear()
        return arrived

    # -- commands ----------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        oob: bool = False,
    ) -> Any:
        """Run one QMP command and return its ``return`` value (`oob`: as exec-oob, which QEMU offers on its
        QMP socket and qemu.qmp enables at negotiation)."""
        client = self._client
        if client is None:
            raise QmpDisconnected(f"{command}: not connected to QEMU's QMP socket {self.socket_path}")
        return _run(self._execute(client, command, arguments, oob), timeout, command)

    def pass_fd(self, fd: int, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Give QEMU a copy of `fd` (SCM_RIGHTS) under `name`, for URIs such as ``fd:name``."""
        client = self._client
        if client is None:
            raise QmpDisconnected(f"getfd: not connected to QEMU's QMP socket {self.socket_path}")
        _run(self._pass_fd(client, fd, name), timeout, "getfd")

    @classmethod
    async def _pass_fd(cls, client: QMPClient, fd: int, name: str) -> None:
        try:
            client.send_fd_scm(fd)  # on the loop's thread: it writes to the QMP socket directly
        except (QMPError, OSError) as exc:
            raise QmpDisconnected(f"getfd: could not pass the descriptor ({exc!r}): did QEMU exit?") from exc
        await cls._execute(client, "getfd", {"fdname": name})

    @staticmethod
    async def _execute(client: QMPClient, command: str, arguments: Mapping[str, Any] | None, oob: bool = False) -> Any:
        try:
            return await client.execute(command, dict(arguments) if arguments is not None else None, oob=oob)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, exc.error.error.desc) from exc
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            raise QmpDisconnected(f"{command}: the QMP connection was lost ({exc!r}): did QEMU exit?") from exc


def last_event_time(events: list[dict[str, Any]], name: str) -> float | None:
    """When QEMU sent the most recent event `name` (its own timestamp, seconds since the epoch), or None."""
    for event in reversed(events):
        if event.get("event") == name:
            stamp = event.get("timestamp", {})
            return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    return None
