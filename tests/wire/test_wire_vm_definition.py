"""The VM definition a QEMU migration carries (vCPUs, disks): strictly parsed on arrival."""

from __future__ import annotations

import json

import pytest

from sealift.wire.errors import ProtocolError
from sealift.wire.qemu_stream import GuestSpec
from sealift.wire.vm_definition import MAX_DISKS, BootSpec, DiskSpec, FirmwareBoot, VmDefinition

COPIED = DiskSpec("/srv/vm/a.qcow2", "qcow2", 64 << 20, False, "/srv/base/debian.qcow2")
SHARED = DiskSpec("/nfs/vm/b.raw", "raw", 1 << 30, True, None, "0123456789abcdef0123456789abcdef")
DEFINITION = VmDefinition(2, (COPIED, SHARED), BootSpec("/srv/boot/vmlinuz", "/srv/boot/initrd.img"))
SPEC = GuestSpec(256, "", {"mode": "none"}, "0123456789abcdef", "sealift", 0, False, definition=DEFINITION)


def test_definition_round_trip_inside_the_guest_description() -> None:
    decoded = GuestSpec.decode(SPEC.encode())
    assert decoded == SPEC
    assert decoded.definition is not None and decoded.definition.copied == (0,)


def test_a_guest_description_without_definition_is_one_vcpu_and_no_disk() -> None:
    raw = json.loads(SPEC.encode())
    del raw["definition"]
    assert GuestSpec.decode(json.dumps(raw).encode()).definition is None


def _with_disk(change: dict[str, object], index: int = 0) -> bytes:
    raw = json.loads(SPEC.encode())
    raw["definition"]["disks"][index].update(change)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("change", "index", "problem"),
    [
        ({"path": "relative/a.qcow2"}, 0, "absolute path"),
        ({"path": "/srv/a.qcow2,file.locking=off"}, 0, "without commas"),  # QEMU option injection
        ({"path": "/srv/../etc/shadow"}, 0, "'..'"),
        ({"path": "/srv/a\nb"}, 0, "control"),
        ({"path": 7}, 0, "absolute path"),
        ({"format": "vmdk"}, 0, "format must be one of"),
        ({"virtual_size": "67108864"}, 0, "virtual_size"),
        ({"virtual_size": 1000}, 0, "multiple of 512"),
        ({"virtual_size": 0}, 0, "multiple of 512"),
        ({"shared": 1}, 0, "shared must be true or false"),
        ({"token": "0123456789abcdef0123456789abcdef"}, 0, "only a shared disk carries a token"),
        ({"token": "XYZ"}, 1, "token must be 32 lowercase hex"),
        ({"backing": "/srv/base.qcow2"}, 1, "only a qcow2 disk has a backing file"),
        ({"extra": True}, 0, "unknown keys"),
    ],
)
def test_each_malformed_disk_is_refused_naming_its_field(change: dict[str, object], index: int, problem: str) -> None:
    with pytest.raises(ProtocolError, match="VM definition in the guest description is malformed") as info:
        GuestSpec.decode(_with_disk(change, index))
    assert problem in str(info.value)
    assert f"disk {index}" in str(info.value)


@pytest.mark.parametrize(
    ("definition", "problem"),
    [
        ({"cpus": 0, "disks": [], "boot": None}, "cpus must be an integer"),
        ({"cpus": "2", "disks": [], "boot": None}, "cpus must be an integer"),
        ({"cpus": 1, "boot": None}, "missing keys ['disks']"),
        ({"cpus": 1, "disks": []}, "missing keys ['boot']"),
        ({"cpus": 1, "disks": [], "boot": {"kernel": "vmlinuz", "initrd": "/i"}}, "boot: kernel must be an absolute"),
        ({"cpus": 1, "disks": [], "boot": {"kernel": "/k,x", "initrd": "/i"}}, "without commas"),
        ({"cpus": 1, "disks": [], "boot": {"kernel": "/k"}}, "missing keys ['initrd']"),
        ({"cpus": 1, "disks": {}, "boot": None}, "disks must be a list"),
        ({"cpus": 1, "boot": None, "disks": [COPIED.to_json()] * (MAX_DISKS + 1)}, f"at most {MAX_DISKS}"),
        ({"cpus": 1, "boot": None, "disks": [COPIED.to_json(), COPIED.to_json()]}, "two disks have the same path"),
        ([], "definition must be an object"),
        ({"cpus": 1, "disks": [COPIED.to_json()], "boot": {"firmware": "bios.bin"}}, "boot: firmware must be an abs"),
        ({"cpus": 1, "disks": [COPIED.to_json()], "boot": {"firmware": "/b,x"}}, "without commas"),
        ({"cpus": 1, "disks": [COPIED.to_json()], "boot": {"firmware": 1}}, "boot: firmware must be an abs"),
        ({"cpus": 1, "disks": [COPIED.to_json()], "boot": {"firmware": None}}, "boot: firmware must be an abs"),
        (
            {"cpus": 1, "disks": [COPIED.to_json()], "boot": {"firmware": "/b", "kernel": "/k"}},
            "boot: missing keys [], unknown keys ['kernel']",
        ),
        ({"cpus": 1, "disks": [], "boot": {"firmware": "/usr/share/seabios/bios-256k.bin"}}, "needs a disk to boot"),
        ({"cpus": 1, "disks": [COPIED.to_json()], "boot": "disk"}, "boot must be an object"),
    ],
)
def test_malformed_definitions_are_refused(definition: object, problem: str) -> None:
    raw = json.loads(SPEC.encode())
    raw["definition"] = definition
    with pytest.raises(ProtocolError, match="malformed") as info:
        GuestSpec.decode(json.dumps(raw).encode())
    assert problem in str(info.value)


def test_a_token_never_reaches_the_destination_s_own_record() -> None:
    assert SHARED.without_token().token is None
    assert SHARED.without_token().path == SHARED.path


def test_a_firmware_boot_round_trips_and_is_told_from_a_kernel_boot() -> None:
    firmware = VmDefinition(1, (COPIED,), FirmwareBoot("/usr/share/seabios/bios-256k.bin"))
    spec = GuestSpec(256, "", {"mode": "none"}, "0123456789abcdef", "sealift", 0, False, definition=firmware)
    raw = json.loads(spec.encode())
    assert raw["definition"]["boot"] == {"firmware": "/usr/share/seabios/bios-256k.bin"}
    decoded = GuestSpec.decode(spec.encode())
    assert decoded == spec
    assert decoded.definition is not None and isinstance(decoded.definition.boot, FirmwareBoot)
    # The kernel boot's form is unchanged on the wire.
    assert json.loads(SPEC.encode())["definition"]["boot"] == {
        "kernel": "/srv/boot/vmlinuz",
        "initrd": "/srv/boot/initrd.img",
    }
