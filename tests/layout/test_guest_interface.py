"""Both backends' guests and registries are one interface (sealift/guests.py) to the daemon, placement and monitors."""

from __future__ import annotations

import inspect

import pytest

from sealift.backends.builtin.registry import BuiltinVmRegistry
from sealift.backends.builtin.vm import BuiltinVM
from sealift.backends.libvirt.registry import LibvirtDomain, LibvirtRegistry
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.vm import QemuVM
from sealift.guests import GuestVM, VmRegistry


def members(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


@pytest.mark.parametrize("registry", [BuiltinVmRegistry, QemuVmRegistry, LibvirtRegistry])
def test_each_registry_has_every_member_of_the_interface(registry: type) -> None:
    missing = {name for name in members(VmRegistry) if not hasattr(registry, name)}
    assert missing == set(), f"{registry.__name__} lacks {sorted(missing)}"
    assert registry.backend in ("builtin", "qemu", "libvirt")


@pytest.mark.parametrize("guest", [BuiltinVM, QemuVM, LibvirtDomain])
def test_each_guest_has_every_member_of_the_interface(guest: type) -> None:
    missing = {name for name in members(GuestVM) if not hasattr(guest, name)}
    assert missing == set(), f"{guest.__name__} lacks {sorted(missing)}"


@pytest.mark.parametrize("registry", [BuiltinVmRegistry, QemuVmRegistry, LibvirtRegistry])
@pytest.mark.parametrize("method", ["has", "get", "info", "stop", "claim", "unclaim", "release_migrated"])
def test_the_methods_take_a_vm_name(registry: type, method: str) -> None:
    parameters = list(inspect.signature(getattr(registry, method)).parameters)
    assert parameters[:2] == ["self", "name"], f"{registry.__name__}.{method}{parameters}"
