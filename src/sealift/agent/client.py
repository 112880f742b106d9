"""A client for the agent's control socket (used by the CLI, the demo and tests)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from sealift.errors import SealiftError


class AgentUnavailable(SealiftError):
    """No agent answers on that control socket."""

    code = "agent_unavailable"


class AgentRequestFailed(SealiftError):
    """The agent answered with an error; `code` is the agent's reason code when it sent one."""

    code = "agent_request_failed"


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _lines(self, request: dict) -> Iterator[dict]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"no agent on {self.socket_path}: {exc.strerror or exc}") from None
        with sock, sock.makefile("rwb") as stream:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            for line in stream:
                yield json.loads(line)

    def request(self, op: str, on_event: Callable[[dict], None] | None = None, **fields: object) -> dict:
        """Send one request; events go to `on_event`; returns the final reply."""
        for message in self._lines({"op": op, **fields}):
            if "event" in message:
                if on_event is not None:
                    on_event(message)
                continue
            if not message.get("ok"):
                code = message.get("code")
                raise AgentRequestFailed(
                    str(message.get("error", "unknown error")), code=code if isinstance(code, str) and code else None
                )
            return message
        raise AgentUnavailable(f"the agent on {self.socket_path} closed the connection without a reply")
