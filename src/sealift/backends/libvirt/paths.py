"""Paths as libvirt sees them, and where this agent finds the same files.

On a real host both are the same. A lab host's libvirtd runs in a mount
namespace of its own (lab.py) where private directories are bind-mounted
over libvirt's; its agent runs outside and reaches them through their
backing directories under `local_root`.
"""

from __future__ import annotations

from pathlib import Path

from sealift.backends.libvirt.errors import LibvirtError

# libvirt's directory (the mount point in a lab host) -> its backing directory's name under local_root.
MOUNTS: dict[str, str] = {
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/etc/libvirt": "etc",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}


def local_path(inside: str, local_root: str) -> Path:
    """Where this agent finds the file libvirt names `inside`."""
    if not local_root:
        return Path(inside)
    for mount, backing in MOUNTS.items():
        if inside == mount or inside.startswith(mount + "/"):
            return Path(local_root) / backing / inside[len(mount) :].lstrip("/")
    return Path(inside)  # outside libvirt's private directories: shared with the host (e.g. the guest image)


def socket_in_uri(uri: str) -> Path:
    """The unix socket a `qemu[+unix]:///system[?socket=PATH]` URI names (libvirt's default if none)."""
    if not uri.startswith(("qemu:///system", "qemu+unix:///system")):
        raise LibvirtError(f"the libvirt URI must be qemu:///system or qemu+unix:///system?socket=..., not {uri!r}")
    _, _, query = uri.partition("?")
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key == "socket" and value:
            return Path(value)
    return Path("/run/libvirt/libvirt-sock")


def check_under(path: str, directory: str) -> str:
    """`path` if it is a plain absolute path inside `directory`; LibvirtError otherwise (no '..', no links out)."""
    p = Path(path)
    if not p.is_absolute() or ".." in p.parts or p.parent != Path(directory):
        raise LibvirtError(f"disk {path!r} is not a file directly in {directory}")
    return str(p)
