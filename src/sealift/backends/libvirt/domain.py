"""The domain XML sealift defines: direct kernel boot, one qcow2 virtio disk, a file console, a NIC if asked.

Any kernel, initrd, command line and disk can be given, so the busybox test
guest of backends/qemu/image.py and the Debian guest (debian.py) define
their domains the same way. A NIC is a virtio one on an existing bridge
(`<interface type='bridge'>`: libvirtd makes the tap and plugs it in, on
each host it runs on, so the guest keeps its MAC and address when it
moves). Domains are `type='qemu'` (TCG) unless asked otherwise: KVM is not
available everywhere sealift is tested.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


@dataclass(frozen=True)
class DomainSpec:
    name: str
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path  # a qcow2 image, the guest's vda
    console_log: Path  # the serial console, a file (the guest prints its counter there)
    domain_type: str = "qemu"
    vcpus: int = 1
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    bridge: str | None = None  # a virtio NIC on this bridge of the host (the same name on every host), or none
    mac: str | None = None  # the NIC's MAC (libvirt picks one if None)


# QEMU 7.2 under TCG loses dirty pages of a RAM block whose length is a multiple of 64 pages
# (docs/architecture.md, QEMU guests); libvirt rounds memory to whole MiB, so a TCG domain's
# machine gets a RAM backend of its own, 8 KiB larger, and QEMU's -m once more to match (QEMU
# takes the last -machine property and -m; libvirt's own backend is left unused). Both hosts run
# the same XML, so both QEMUs have the same RAM.
TCG_RAM_PAD_KIB = 8  # QEMU rounds -m up to 8 KiB: the backend must have that size exactly


def _tcg_ram_pad(spec: DomainSpec) -> str:
    if spec.domain_type != "qemu":
        return ""
    kib = spec.memory_mib * 1024 + TCG_RAM_PAD_KIB
    args = ["-object", f"memory-backend-ram,id=sealift.ram,size={kib}k", "-machine", "memory-backend=sealift.ram"]
    args += ["-m", f"size={kib}k"]
    lines = "".join(f"    <qemu:arg value={quoteattr(arg)}/>\n" for arg in args)
    return f"  <qemu:commandline>\n{lines}  </qemu:commandline>\n"


def _interface(spec: DomainSpec) -> str:
    """The NIC: virtio on the host's bridge, without an option ROM (direct kernel boot needs none)."""
    if spec.bridge is None:
        return ""
    mac = f"      <mac address={quoteattr(spec.mac)}/>\n" if spec.mac is not None else ""
    return (
        "    <interface type='bridge'>\n"
        f"{mac}      <source bridge={quoteattr(spec.bridge)}/>\n"
        "      <model type='virtio'/>\n"
        "      <rom enabled='no'/>\n"
        "    </interface>\n"
    )


def domain_xml(spec: DomainSpec) -> str:
    """The <domain> document for `spec` (every value escaped: names and paths come from operators)."""
    return f"""<domain type={quoteattr(spec.domain_type)} xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  <uuid>{escape(spec.uuid)}</uuid>
  <memory unit='MiB'>{int(spec.memory_mib)}</memory>
  <vcpu>{int(spec.vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel>
    <initrd>{escape(str(spec.initrd))}</initrd>
    <cmdline>{escape(spec.cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(spec.disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(str(spec.console_log))} append='on'/>
      <target port='0'/>
    </serial>
{_interface(spec)}    <memballoon model='none'/>
  </devices>
{_tcg_ram_pad(spec)}</domain>
"""
