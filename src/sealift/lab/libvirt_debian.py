"""Issue 19 with a real guest: the Debian guest as a libvirt domain, serving a client, migrated through sealift.

The lab's testbed (lab/testbed.py); a libvirtd per host, each in the
host's network namespace and in a mount namespace of its own
(backends/libvirt/lab.py); two agents in the hosts' namespaces on the
migration network (lab/debian_migration.py's `lab_agents`, optionally
through a relay in the attacker's namespace that records every byte
between the hosts); the Debian guest defined as a domain of host-a by
sealift's tooling (backends/libvirt/debian.py: its NIC on host-a's br0, a
tap libvirt makes; at the destination libvirt makes another on host-b's
br0, so the guest keeps its address), booted cold; and the outage client
(lab/client.py) in the client namespace, writing to redis and reading
nginx every 10 ms through the whole migration.

The checks are the QEMU Debian guest's (lab/debian_migration.py): the
client's failed requests, longest gap and lost writes; both images read
through their file systems (the source's image is frozen when libvirt's
source QEMU quits at the switchover: every write on it is on the
destination's image, and so is every acknowledged write); plus libvirt's
own view, `virsh domstate` on both libvirtds: the domain runs at the
destination and the source's libvirtd no longer has it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.backends.libvirt.lab import IMAGES_DIR, LibvirtLabHost, define_debian_domain
from sealift.backends.qemu.debian_guest import GuestShape
from sealift.cluster import LocalCluster
from sealift.errors import SealiftError
from sealift.lab.client import OutageClient
from sealift.lab.debian_migration import (
    DESTINATION,
    SOURCE,
    VM,
    DebianMigration,
    StartedGuest,
    lab_agents,
    migrate_under_client,
)
from sealift.lab.relay import Relay
from sealift.lab.testbed import Testbed

__all__ = [
    "LibvirtDebianLab",
    "LibvirtDebianMigration",
    "domstate",
    "guest_ip",
    "libvirt_debian_lab",
    "migrate_domain",
    "run_libvirt_debian_migration",
    "start_debian_domain",
]

BOOT_TIMEOUT_S = 180.0  # a cold boot under TCG: 24-60 s alone, longer on a loaded machine
HostFactory = Callable[[str, Path, str], LibvirtLabHost]  # (name, root, network namespace) -> an unstarted host


class LibvirtDomstateError(SealiftError):
    """virsh could not say a domain's state."""

    code = "libvirt_domstate_error"


@dataclass
class LibvirtDebianLab:
    lab: Testbed
    cluster: LocalCluster
    relay: Relay | None
    hosts: dict[str, LibvirtLabHost]  # by agent name: host-a, host-b


@dataclass
class LibvirtDebianMigration:
    run: DebianMigration  # the report, the client's view, the disk check
    domstate: dict[str, str | None]  # `virsh domstate` after the migration, by host (None: not defined there)


def _lab_host(name: str, root: Path, netns: str) -> LibvirtLabHost:
    # Reaping its QEMUs at once, as a real host's init does (backends/libvirt/lab.py says why).
    return LibvirtLabHost(name, root, netns=netns, reap_children=True)


@contextmanager
def libvirt_debian_lab(
    with_relay: bool = False, make_host: HostFactory = _lab_host, listen_tcp: bool = False
) -> Iterator[LibvirtDebianLab]:
    """The testbed, a libvirtd in each host's namespaces, the agents; everything removed after.

    ``make_host`` and ``listen_tcp``: the benchmark's libvirtds also listen on TCP and TLS, for its baselines.
    """
    root = Path(tempfile.mkdtemp(prefix="slw-", dir="/tmp"))  # short: unix socket paths are limited
    with Testbed(tag="slw") as lab:
        namespaces = {SOURCE: lab.ns("source"), DESTINATION: lab.ns("destination")}
        hosts = {name: make_host(name, root / name[-1], netns) for name, netns in namespaces.items()}
        try:
            for host in hosts.values():
                host.start(listen_tcp=listen_tcp)
            config = {name: host.agent_table() for name, host in hosts.items()}
            with lab_agents(lab, with_relay, config) as (cluster, relay):
                yield LibvirtDebianLab(lab, cluster, relay, hosts)
        finally:
            for host in hosts.values():
                host.stop()
            shutil.rmtree(root, ignore_errors=True)


def guest_ip(memory_mib: int = GuestShape.memory_mib) -> str:
    """The Debian guest's address on the lab's VM network (its kernel command line sets it)."""
    return GuestShape(memory_mib=memory_mib).guest_ip.split("/")[0]


def start_debian_domain(
    env: LibvirtDebianLab, memory_mib: int = 256, base_disk: Path | None = None, host: str = SOURCE
) -> StartedGuest:
    """Define and boot the Debian domain on `host` (cold); returns once nginx and redis answer the client."""
    started = time.monotonic()
    lab_host = env.hosts[host]
    define_debian_domain(lab_host, VM, memory_mib=memory_mib, base_disk=base_disk)
    ip = guest_ip(memory_mib)
    try:
        OutageClient(ip, netns=env.lab.ns("client")).wait_ready(BOOT_TIMEOUT_S)
    except SealiftError as exc:
        console = lab_host.local_path(f"/var/log/libvirt/{VM}.console")
        tail = console.read_bytes()[-1500:].decode(errors="replace") if console.exists() else "(no console)"
        raise SealiftError(f"the Debian domain did not serve within {BOOT_TIMEOUT_S:.0f} s: {exc}; {tail}") from exc
    disk = lab_host.local_path(f"{IMAGES_DIR}/{VM}.qcow2")
    return StartedGuest(ip, disk, round(time.monotonic() - started, 2))


def migrate_domain(
    env: LibvirtDebianLab,
    guest: StartedGuest,
    say: Callable[..., object] = lambda *a, **k: None,
    warmup_s: float = 2.0,
    settle_s: float = 2.0,
    migration: dict[str, object] | None = None,
) -> LibvirtDebianMigration:
    """host-a -> host-b through sealift under the outage client; the client's view, the disks, virsh's view."""
    destination = env.hosts[DESTINATION]

    def target_disk(_cluster: LocalCluster) -> Path:
        return destination.local_path(f"{IMAGES_DIR}/{VM}.qcow2")  # libvirt copied it to the same path

    run = migrate_under_client(env.cluster, env.lab, guest, say, warmup_s, settle_s, migration or {}, target_disk)
    return LibvirtDebianMigration(run, {name: domstate(host) for name, host in env.hosts.items()})


def domstate(host: LibvirtLabHost, name: str = VM) -> str | None:
    """`virsh domstate` on `host`'s libvirtd ("running", "paused", "shut off", ...); None if no such domain."""
    done = subprocess.run(
        ["virsh", "-c", host.uri, "domstate", name], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode == 0:
        return done.stdout.strip()
    if "failed to get domain" in done.stderr:
        return None
    raise LibvirtDomstateError(f"virsh domstate {name} on {host.name}: {done.stderr.strip()}")


def run_libvirt_debian_migration(
    say: Callable[..., object] = lambda *a, **k: None,
    memory_mib: int = 256,
    migration: dict[str, object] | None = None,
    on_migrated: Callable[[LibvirtDebianLab, LibvirtDebianMigration], dict[str, Any]] | None = None,
) -> LibvirtDebianMigration:
    """The whole story in a fresh lab (the demo's): boot, migrate under the client, check.

    ``on_migrated(env, result)`` runs after the checks while the agents still run; what it returns
    lands in ``result.run.extra``.
    """
    with libvirt_debian_lab() as env:
        say(f"  libvirtd and an agent for {SOURCE} and {DESTINATION}, each host in its own namespaces")
        say(f"  defined libvirt domain {VM} on {SOURCE}: Debian 12, {memory_mib} MiB, NIC on br0; booting (cold)...")
        guest = start_debian_domain(env, memory_mib)
        say(f"  {VM} serves nginx and redis at {guest.ip} after {guest.start_s} s (disk {guest.disk})")
        result = migrate_domain(env, guest, say, migration=migration)
        if on_migrated is not None:
            result.run.extra = on_migrated(env, result)
        return result
