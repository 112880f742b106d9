"""The benchmark's one error (its own module: the harness and the runs it schedules both raise it)."""

from __future__ import annotations

from sealift.errors import SealiftError


class BenchError(SealiftError):
    """The benchmark cannot run here (not root, a tool missing), or one run went wrong."""

    code = "bench_error"
