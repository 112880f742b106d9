"""The libvirt backend's inputs that come from elsewhere: the source's domain offer, the disk paths it names,
the agent's [libvirt] config and the domain XML writer (no libvirtd needed)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sealift.backends.libvirt.domain import DomainSpec, domain_xml
from sealift.backends.libvirt.errors import LibvirtError
from sealift.backends.libvirt.paths import check_under, local_path, socket_in_uri
from sealift.backends.libvirt.spec import Disk, DomainOffer, decode_kind, encode_kind
from sealift.host.config import ConfigError, config_from_dict
from sealift.wire.errors import ProtocolError

UUID = "6f1c2a4e-1b2c-4d5e-8f90-0123456789ab"
OFFER = DomainOffer("lvm", UUID, "0123456789abcdef", (Disk("vda", "/var/lib/libvirt/images/lvm.qcow2", 32 << 20),))


def test_an_offer_survives_its_round_trip() -> None:
    assert DomainOffer.decode(OFFER.encode()) == OFFER
    assert decode_kind(encode_kind("disk")) == "disk"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "../etc"),
        ("uuid", "not-a-uuid"),
        ("socket_id", "../../x"),
        ("disks", [{"target": "vda", "path": "relative.qcow2", "virtual_size": 1}]),
        ("disks", [{"target": "vda", "path": "/x.qcow2", "virtual_size": -1}]),
        ("disks", [{"target": "vda", "path": "/x.qcow2", "virtual_size": 1, "extra": 1}]),
        ("disks", [{"target": "vda", "path": "/x.qcow2", "virtual_size": 1}] * 9),
    ],
)
def test_a_bad_offer_is_a_protocol_error(field: str, value: object) -> None:
    raw = json.loads(OFFER.encode())
    raw[field] = value
    with pytest.raises(ProtocolError):
        DomainOffer.decode(json.dumps(raw).encode())


def test_unknown_stream_kinds_and_extra_keys_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_kind(b'{"kind": "shell"}')
    with pytest.raises(ProtocolError):
        DomainOffer.decode(b'{"name": "x"}')


@pytest.mark.parametrize(
    "path",
    ["/etc/shadow", "/var/lib/libvirt/images/../qemu/x.qcow2", "/var/lib/libvirt/images/sub/x.qcow2", "x.qcow2"],
)
def test_disks_are_created_only_directly_in_the_images_directory(path: str) -> None:
    with pytest.raises(LibvirtError):
        check_under(path, "/var/lib/libvirt/images")
    assert (
        check_under("/var/lib/libvirt/images/a.qcow2", "/var/lib/libvirt/images") == "/var/lib/libvirt/images/a.qcow2"
    )


def test_paths_of_a_lab_host_and_of_a_real_one() -> None:
    assert local_path("/run/libvirt/sealift/x", "") == Path("/run/libvirt/sealift/x")
    assert local_path("/run/libvirt/sealift/x", "/tmp/h") == Path("/tmp/h/run/sealift/x")
    assert local_path("/var/cache/sealift/k", "/tmp/h") == Path("/var/cache/sealift/k")  # shared, like a package
    assert socket_in_uri("qemu:///system") == Path("/run/libvirt/libvirt-sock")
    assert socket_in_uri("qemu+unix:///system?socket=/tmp/s") == Path("/tmp/s")
    with pytest.raises(LibvirtError):
        socket_in_uri("qemu+tcp://h/system")


def test_the_libvirt_config_section() -> None:
    base = {"name": "h", "listen": "127.0.0.1:1", "control_socket": "/c", "state_dir": "/s", "identity_dir": "/i"}
    assert config_from_dict(base).libvirt is None
    config = config_from_dict({**base, "libvirt": {"uri": "qemu:///system"}})
    assert config.libvirt is not None and config.libvirt.socket_dir == "/run/libvirt/sealift"
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({**base, "libvirt": {"uri": "qemu:///system", "step_timeout_s": "1"}})
    with pytest.raises(ConfigError, match="needs 'uri'"):
        config_from_dict({**base, "libvirt": {}})
    with pytest.raises(ConfigError, match="absolute"):
        config_from_dict({**base, "libvirt": {"uri": "qemu:///system", "images_dir": "images"}})


def test_the_domain_xml_escapes_its_inputs_and_pads_tcg_memory() -> None:
    spec = DomainSpec(
        name="a<b",
        memory_mib=96,
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="console=ttyS0 x='1'",
        disk=Path("/var/lib/libvirt/images/a.qcow2"),
        console_log=Path("/var/log/libvirt/a.console"),
    )
    root = ET.fromstring(domain_xml(spec))
    assert root.findtext("name") == "a<b" and root.findtext("os/cmdline") == "console=ttyS0 x='1'"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert "size=98312k" in args and "memory-backend=sealift.ram" in args  # 96 MiB + 8 KiB, not a multiple of 64 pages
    kvm = ET.fromstring(domain_xml(DomainSpec(**{**spec.__dict__, "domain_type": "kvm"})))
    assert not list(kvm.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg"))  # KVM needs no pad


def test_the_debian_domain_boots_the_images_kernel_with_its_nic_on_the_bridge() -> None:
    """The Debian guest's domain: the QEMU Debian guest's command line, its MAC, a virtio NIC on br0 (escaped)."""
    from sealift.backends.libvirt.debian import debian_domain_spec
    from sealift.backends.qemu.debian_guest import GuestShape
    from sealift.backends.qemu.debian_image import DebianImage

    image = DebianImage(Path("/c"), Path("/c/disk.qcow2"), Path("/c/kernel"), Path("/c/initrd.img"), "k", "6.1", {})
    shape = GuestShape(memory_mib=256)
    spec = debian_domain_spec("web", image, Path("/d.qcow2"), Path("/l.console"), shape, bridge="br'0")
    root = ET.fromstring(domain_xml(spec))
    assert root.findtext("os/kernel") == "/c/kernel" and root.findtext("os/cmdline") == shape.kernel_cmdline()
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "br'0" and nic.find("mac").get("address") == shape.mac  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    plain = DomainSpec(**{**spec.__dict__, "bridge": None})
    assert ET.fromstring(domain_xml(plain)).find("devices/interface") is None  # no bridge, no NIC


def test_a_lab_hosts_extra_settings_replace_its_defaults() -> None:
    from sealift.backends.libvirt.lab import LIBVIRTD_CONF, _merge_conf

    merged = _merge_conf(LIBVIRTD_CONF, 'listen_tls = 1\ntls_port = "16514"\n')
    settings = [line.partition("=")[0].strip() for line in merged.splitlines()]
    assert settings.count("listen_tls") == 1 and "listen_tls = 1" in merged.splitlines()
    assert "auth_unix_rw" in settings and "tls_port" in settings
