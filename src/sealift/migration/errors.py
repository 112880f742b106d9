"""The handover's own errors: a migration that failed, a migration this host will not take."""

from __future__ import annotations


class MigrationError(Exception):
    """A migration failed; the message says why and where the VM runs now."""


class IncomingRefused(Exception):
    """We will not take this VM; the reason goes back to the source."""


class AdmissionError(Exception):
    """This host cannot hold the VM now (capacity, concurrency, a name in use); the reason goes back to the source."""
