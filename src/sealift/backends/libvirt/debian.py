"""The Debian guest as a libvirt domain: the XML sealift's own tooling writes (the demo, the tests, the bench).

Operators bring their own domains; this one is the Debian guest of
backends/qemu/debian_image.py (nginx, redis with its append-only file
fsynced per write, the secret on disk and in redis), booted directly from
the image's kernel and initrd with the kernel command line the QEMU Debian
guest has (`GuestShape.kernel_cmdline`: root on vda, serial console, its
address on the lab's VM network), a virtio NIC on a bridge with the
guest's fixed MAC, and a qcow2 disk of its own over the image's disk. The
backing file is in the image cache, at the same path on every host;
libvirt's non-shared disk copy (`VIR_MIGRATE_NON_SHARED_DISK`) carries the
whole chain, so the destination's disk is a standalone copy.

It boots cold (24-60 s under TCG): libvirt cannot load the saved booted
state of debian_guest.py, which is a raw QEMU migration stream and not a
`virsh save` image.
"""

from __future__ import annotations

from pathlib import Path

from sealift.backends.libvirt.domain import DomainSpec
from sealift.backends.qemu.debian_guest import GuestShape
from sealift.backends.qemu.debian_image import DebianImage

DEFAULT_BRIDGE = "br0"  # the lab's VM network on each host (lab/testbed.py)


def debian_domain_spec(
    name: str,
    image: DebianImage,
    disk: Path,
    console_log: Path,
    shape: GuestShape,
    bridge: str = DEFAULT_BRIDGE,
) -> DomainSpec:
    """The domain of one Debian guest: `disk` and `console_log` as libvirt sees them, `shape` its memory,
    address and MAC (the lab's guest address by default, one such guest per VM network)."""
    return DomainSpec(
        name=name,
        memory_mib=shape.memory_mib,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=shape.kernel_cmdline(),
        disk=disk,
        console_log=console_log,
        bridge=bridge,
        mac=shape.mac,
    )
