"""Fixtures for the QEMU backend tests: the guest image (built once, cached), and VMs that are always stopped.

These tests run real QEMU under TCG. They skip only when qemu-system-x86_64
is not installed (``bash scripts/run.sh setup`` installs it); a guest image
that cannot be built is an error, not a skip.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_testlib import VmPool
from sealift.backends.qemu.host import QEMU_BINARY
from sealift.backends.qemu.image import GuestImagePaths, build_image, default_cache_dir

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which(QEMU_BINARY) is not None:
        return
    skip = pytest.mark.skip(
        reason=f"{QEMU_BINARY} is not installed: run `bash scripts/run.sh setup` (it installs qemu-system-x86)"
    )
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_image() -> GuestImagePaths:
    """The guest image in the normal cache: built on the first run, reused after."""
    return build_image(default_cache_dir())


@pytest.fixture
def vms(guest_image: GuestImagePaths) -> Iterator[VmPool]:
    pool = VmPool(guest_image)
    try:
        yield pool
    finally:
        pool.cleanup()
