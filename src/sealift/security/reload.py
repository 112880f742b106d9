"""Live revocation: telling a changed trust file apart, and what an in-flight migration relies on.

The agent re-reads its CRL and policy file when they change (the authority
polls their `FileStamp` about once a second) or on SIGHUP. A newly revoked
host or operator must also stop the migrations already under way that rely
on it: each registers an `InFlightTrust` naming the certificates it relies
on, and every newly loaded CRL is checked against them
(migration/authority.py).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from sealift.security.errors import CertificateRevokedError
from sealift.security.revocation import RevocationList


@dataclass(frozen=True)
class FileStamp:
    """One version of a file, told apart without reading it: an edit, a copy or a rename over it changes this.

    The inode catches a rename over the file (how `sealift ca revoke` writes
    its CRL); size, mtime and ctime catch an edit in place.
    """

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path | None) -> FileStamp | None:
        """The stamp of `path` now; None if there is no such file (or no path)."""
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class InFlightTrust:
    """The certificates one in-flight migration relies on: its peer host's and its operator's.

    The authority re-checks them against every CRL it loads, from its reload
    thread, and marks the migration revoked; the coordinator's own thread sees
    the mark at its next `check()` (in the transfer loop and before its point
    of no return) and aborts. Only the mark crosses threads.
    """

    def __init__(self, migration_id: str) -> None:
        self.migration_id = migration_id
        self._relied_on: list[tuple[str, x509.Certificate]] = []
        self._revoked: CertificateRevokedError | None = None
        self._lock = threading.Lock()

    def rely_on(self, what: str, certificate: x509.Certificate) -> None:
        """From now on this migration relies on `certificate`; `what` names it in messages."""
        with self._lock:
            self._relied_on.append((what, certificate))

    def recheck(self, revocations: RevocationList) -> CertificateRevokedError | None:
        """Mark this migration revoked if `revocations` revokes what it relies on; the error if newly marked."""
        with self._lock:
            if self._revoked is not None:
                return None
            for what, certificate in self._relied_on:
                try:
                    revocations.check(certificate, what)
                except CertificateRevokedError as exc:
                    self._revoked = CertificateRevokedError(
                        f"migration {self.migration_id} stopped before its commit decision: {exc}"
                    )
                    return self._revoked
        return None

    @property
    def revoked(self) -> CertificateRevokedError | None:
        return self._revoked

    def check(self) -> None:
        """Raise CertificateRevokedError if something this migration relies on was revoked since it began."""
        revoked = self._revoked
        if revoked is not None:
            raise CertificateRevokedError(str(revoked))
