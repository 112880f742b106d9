"""This host's libvirt domains, as sealift's guests (the libvirt backend's VmRegistry).

libvirt owns the domains: the registry keeps no copy of its own, it asks
libvirtd each time (so `virsh define` on the host shows up at once) and
only remembers which names a migration holds (busy).
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from sealift.backends.libvirt.errors import LibvirtError
from sealift.backends.libvirt.paths import local_path
from sealift.backends.process import file_tail
from sealift.host.config import LibvirtConfig

BACKEND = "libvirt"


def _quiet(_ctx: object, _error: object) -> None:
    """libvirt's default handler prints every error on stderr; sealift raises and logs them itself."""


libvirt.registerErrorHandler(_quiet, None)
_COUNTER_RE = re.compile(rb"sealift-counter (\d+)")
# virDomainState -> the names virsh prints (what `sealift vm list` shows as status)
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class DiskInfo:
    target: str
    path: str  # as libvirt sees it
    fmt: str


class LibvirtDomain:
    """One domain of this host's libvirtd (a GuestVM)."""

    def __init__(self, dom: libvirt.virDomain, config: LibvirtConfig) -> None:
        self.dom = dom
        self._config = config

    @property
    def name(self) -> str:
        return str(self.dom.name())

    @property
    def uuid(self) -> str:
        return str(self.dom.UUIDString())

    @property
    def memory_bytes(self) -> int:
        return int(self.dom.maxMemory()) * 1024  # libvirt counts KiB

    def state(self) -> str:
        state, _reason = self.dom.state()
        return STATES.get(state, str(state))

    def xml(self) -> ET.Element:
        return ET.fromstring(self.dom.XMLDesc(0))

    def disks(self) -> list[DiskInfo]:
        """Its file-backed disks (what a migration copies unless shared)."""
        disks = []
        for disk in self.xml().findall("./devices/disk[@device='disk']"):
            source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
            if source is None or target is None or source.get("file") is None:
                continue
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            disks.append(DiskInfo(str(target.get("dev")), str(source.get("file")), fmt))
        return disks

    def console_path(self) -> Path | None:
        """Its serial console's file, where this agent sees it (the test guest prints its counter there)."""
        source = self.xml().find("./devices/serial[@type='file']/source")
        if source is None or source.get("path") is None:
            return None
        return local_path(str(source.get("path")), self._config.local_root)

    def counter(self) -> int | None:
        path = self.console_path()
        if path is None or not path.exists():
            return None
        matches = _COUNTER_RE.findall(file_tail(path, 16 * 1024))
        return int(matches[-1]) if matches else None

    def pid(self) -> int | None:
        """QEMU's pid, from libvirt's pid file (where this agent sees it)."""
        pidfile = local_path(f"/run/libvirt/qemu/{self.name}.pid", self._config.local_root)
        try:
            return int(pidfile.read_text().strip()) if self.dom.isActive() else None
        except (OSError, ValueError):
            return None

    def resume(self) -> None:
        if self.state() == "paused":
            self.dom.resume()


class LibvirtRegistry:
    """The domains of the libvirtd at `config.uri`; `busy` names are held by a migration."""

    backend = BACKEND

    def __init__(self, config: LibvirtConfig, host: str) -> None:
        self.config = config
        self._host = host
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._conn: libvirt.virConnect | None = None

    # -- the connection --------------------------------------------------------------

    def connection(self) -> libvirt.virConnect:
        """One connection, shared (libvirt's are thread-safe), reopened if libvirtd restarted."""
        with self._lock:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
            try:
                self._conn = libvirt.open(self.config.uri)
            except libvirt.libvirtError as exc:
                raise LibvirtError(f"cannot reach libvirtd at {self.config.uri}: {exc}") from None
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    def lookup(self, name: str) -> LibvirtDomain | None:
        try:
            return LibvirtDomain(self.connection().lookupByName(name), self.config)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtError(f"libvirt could not look up {name!r}: {exc}") from None

    def lookup_uuid(self, uuid: str) -> LibvirtDomain | None:
        try:
            return LibvirtDomain(self.connection().lookupByUUIDString(uuid), self.config)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtError(f"libvirt could not look up domain {uuid}: {exc}") from None

    # -- VmRegistry ------------------------------------------------------------------

    def has(self, name: str) -> bool:
        with self._lock:
            if name in self._busy:
                return True
        try:
            return self.lookup(name) is not None
        except LibvirtError:
            return False  # libvirtd down: none of its domains can be migrated now

    def get(self, name: str) -> LibvirtDomain:
        domain = self.lookup(name)
        if domain is None:
            raise LibvirtError(f"no libvirt domain named {name!r} on {self._host}")
        return domain

    def info(self, name: str) -> dict[str, Any]:
        domain = self.get(name)
        status = domain.state()
        console = domain.console_path()
        return {  # the same keys as every backend's (docs/schemas/common.schema.json, vm)
            "name": name,
            "backend": BACKEND,
            "pid": domain.pid(),
            "alive": bool(domain.dom.isActive()),
            "paused": status != "running",
            "migrating": self.is_busy(name),
            "memory_bytes": domain.memory_bytes,
            "memory_mib": domain.memory_bytes >> 20,
            "profile": "libvirt",
            "counter": domain.counter(),
            "throttle_pct": None,
            "status": status,
            "accel": "tcg" if domain.xml().get("type") == "qemu" else domain.xml().get("type"),
            "image_path": None,
            "console": str(console) if console is not None else None,
            "net": None,
            "probe": None,
        }

    def list(self) -> list[dict[str, Any]]:
        try:
            names = [str(dom.name()) for dom in self.connection().listAllDomains()]
        except (LibvirtError, libvirt.libvirtError):
            return []  # libvirtd down: nothing to list (the other backends still are)
        infos = []
        for name in names:
            try:
                infos.append(self.info(name))
            except (LibvirtError, libvirt.libvirtError):
                continue  # undefined meanwhile
        return infos

    def stop(self, name: str) -> None:
        if self.is_busy(name):
            raise LibvirtError(f"libvirt domain {name!r} is being migrated; wait for the migration to end")
        domain = self.get(name)
        if domain.dom.isActive():
            domain.dom.destroy()

    def is_busy(self, name: str) -> bool:
        with self._lock:
            return name in self._busy

    def claim(self, name: str) -> LibvirtDomain:
        domain = self.get(name)
        with self._lock:
            if name in self._busy:
                raise LibvirtError(f"libvirt domain {name!r} is already being migrated")
            self._busy.add(name)
        return domain

    def reserve_name(self, name: str) -> None:
        """An incoming domain's name, held until it runs or is dropped; LibvirtError if it is taken here."""
        if self.lookup(name) is not None:
            raise LibvirtError(f"a libvirt domain named {name!r} already exists on {self._host}")
        with self._lock:
            if name in self._busy:
                raise LibvirtError(f"libvirt domain {name!r} is already arriving on {self._host}")
            self._busy.add(name)

    def unclaim(self, name: str) -> None:
        with self._lock:
            self._busy.discard(name)

    def release_migrated(self, name: str) -> None:
        """It runs at the destination: libvirt already stopped our copy; drop its definition (disks stay)."""
        self.unclaim(name)
        domain = self.lookup(name)
        if domain is None:
            return
        if domain.dom.isActive():
            domain.dom.destroy()
        if domain.dom.isPersistent():
            domain.dom.undefine()

    def usage(self) -> tuple[int, int]:
        """(memory bytes, guests) of the active domains."""
        try:
            doms = self.connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except (LibvirtError, libvirt.libvirtError):
            return 0, 0
        return sum(int(d.maxMemory()) * 1024 for d in doms), len(doms)
