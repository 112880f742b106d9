"""The handover's own errors: a migration that failed, a migration this host will not take."""

from __future__ import annotations

from sealift.errors import SealiftError


class MigrationError(SealiftError):
    """A migration failed; the message says why and where the VM runs now.

    `code` is the cause's code when one is known (the destination's refusal code, a SecurityError's).
    """

    code = "migration_failed"


class IncomingRefused(SealiftError):
    """We will not take this VM; the reason (and code) goes back to the source."""

    code = "incoming_refused"


def failure_code(exc: BaseException) -> str:
    """The reason code of any failure: a SealiftError's own, else one for the kind of OS failure."""
    if isinstance(exc, SealiftError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "connection_lost"
    if isinstance(exc, OSError):
        return "io_error"
    return "internal_error"  # a bug: the logs have its traceback


class AdmissionError(SealiftError):
    """This host cannot hold the VM now (capacity, concurrency, a name in use); the reason goes back to the source."""

    code = "admission_refused"


class PostcopyPaused(MigrationError):
    """Post-copy stopped part-way (a link or an agent failed): the guest waits at the destination for its pages.

    Never an abort: past the switch neither host has the whole guest, so the source never resumes it.
    """

    code = "postcopy_paused"


class PostcopyDigestMismatch(MigrationError):
    """The destination received another stream than the source sent (found only once the guest already runs)."""

    code = "postcopy_digest_mismatch"
