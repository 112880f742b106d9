"""The libvirt backend's tests run two real libvirtds (backends/libvirt/lab.py) and real QEMU under TCG.

They skip only when libvirtd or QEMU is not installed (``bash scripts/run.sh
setup`` installs both); anything else that goes wrong is an error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sealift.backends.qemu.host import QEMU_BINARY

HERE = Path(__file__).resolve().parent
NEEDED = ("libvirtd", "virtlogd", "qemu-img", QEMU_BINARY)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"{', '.join(missing)} not installed: run `bash scripts/run.sh setup`")
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(skip)
