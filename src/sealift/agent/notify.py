"""systemd's readiness protocol (sd_notify), in the few lines it takes.

Under `Type=notify` systemd names a unix datagram socket in $NOTIFY_SOCKET;
a service says "READY=1" there once it serves, "STOPPING=1" when it begins
to stop, and "STATUS=..." for `systemctl status`. A name that starts with
'@' is in the abstract namespace. Without $NOTIFY_SOCKET (not under systemd,
or another Type=) nothing is sent: the agent runs the same either way.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_address(value: str | None) -> str | None:
    """The socket address $NOTIFY_SOCKET names, or None if it names none we can reach."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:... (systemd in a VM's host): not used by an agent on a host


def sd_notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") as one datagram; True if it was sent.

    A failure is logged, never raised: systemd's bookkeeping must not stop the agent.
    """
    address = notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
