"""What a libvirt destination checks before it hands a domain libvirt already switched over to the resolver.

The carriers are stand-ins here (each with the end state a real one reports:
its authenticated END, a cut, or a record that failed authentication); the
real streams, libvirtds and resolver are in tests/libvirt_domains.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sealift.backends.libvirt.destination import LibvirtDestinationDriver
from sealift.migration.documents import DocumentError
from sealift.migration.errors import MigrationError
from sealift.wire.errors import RecordAuthError


@dataclass
class EndedCarrier:
    index: int
    kind: str
    ended: bool = True
    error: BaseException | None = None

    def join(self, timeout: float) -> bool:
        return True

    def stop(self) -> None:
        pass


def checks(carriers: list[EndedCarrier], exc: BaseException) -> tuple[list[str], list[str]]:
    driver = LibvirtDestinationDriver(None, None, None)  # type: ignore[arg-type]  # the checks read no session
    driver._carriers = carriers  # type: ignore[assignment]
    return driver._handover_checks(exc)


CUT = ConnectionError("TLS receive from host-a failed: connection closed during TLS exchange")


def test_a_cut_after_every_memory_and_disk_stream_ended_passes_and_says_what_it_could_not_check() -> None:
    carriers = [
        EndedCarrier(1, "control", ended=False, error=ConnectionError("reset")),  # libvirt's RPC, cut after Finish
        EndedCarrier(2, "disk"),
        EndedCarrier(3, "memory"),
    ]
    problems, checked = checks(carriers, CUT)
    assert problems == []
    assert "memory stream 3 ended with its authenticated END" in checked
    assert any("no digest cross-check" in c for c in checked)


@pytest.mark.parametrize(
    ("carriers", "exc", "problem"),
    [
        # a record that failed authentication, even on libvirt's RPC connection
        (
            [EndedCarrier(1, "control", ended=False, error=RecordAuthError("tampered")), EndedCarrier(2, "memory")],
            MigrationError("carrying libvirt's connections failed", code="stream_failed"),
            "control stream 1 failed: tampered",
        ),
        # a memory stream cut short: no END
        (
            [EndedCarrier(1, "control"), EndedCarrier(2, "memory", ended=False, error=CUT)],
            CUT,
            "has no authenticated END",
        ),
        # the signed manifest came and did not match
        (
            [EndedCarrier(1, "control"), EndedCarrier(2, "memory")],
            DocumentError("manifest image_digest is 'x'"),
            "check",
        ),
        ([], CUT, "no carried stream"),
    ],
)
def test_anything_that_failed_a_check_keeps_the_domain_from_the_resolver(
    carriers: list[EndedCarrier], exc: BaseException, problem: str
) -> None:
    problems, _ = checks(carriers, exc)
    assert any(problem in p for p in problems), problems
