"""Issue 18's story end to end: the Debian guest serving a client moves, disk and all, between two agents.

The lab's testbed (two hosts, the VM network with its client namespace),
two agents in the hosts' namespaces talking over the migration network
(through the attacker's forwarding, which here only forwards), and the
Debian guest started by the source agent (`vm start --guest debian`: its
own qcow2 overlay, not shared, so the migration copies it over the agents'
sealed disk streams). The outage client writes to redis and reads nginx
from the client namespace during the whole migration.

The disk check. A byte comparison of the two images cannot hold once the
destination guest runs (redis fsyncs every write it acknowledges after the
resume, nginx logs, the kernel writes back). What must hold is: the
source's image, frozen at the switchover pause (its QEMU quits then), is
the disk the destination continued from, and the destination's image
holds every write redis acknowledged. Both are read from the images
themselves (a raw copy, its ext4 journal replayed, then redis's
append-only files read with ``debugfs``: the ``RPUSH`` records of this
run's list, which the client's key makes unique):

- every write found on the source's image is on the destination's;
- every acknowledged write is on the destination's image;
- the secret is on the destination's image.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sealift.backends.qemu.debian_guest import GuestShape
from sealift.backends.qemu.debian_image import REDIS_SECRET_KEY
from sealift.backends.qemu.image import DEFAULT_SECRET
from sealift.cluster import LocalCluster
from sealift.errors import SealiftError
from sealift.lab.client import OutageClient, OutageResult
from sealift.lab.relay import Relay
from sealift.lab.testbed import Testbed

__all__ = [
    "DebianMigration",
    "DiskCheck",
    "StartedGuest",
    "debian_lab",
    "lab_agents",
    "migrate_under_client",
    "qemu_target_disk",
    "run_debian_migration",
    "start_debian_guest",
]

SOURCE, DESTINATION, VM = "host-a", "host-b", "debian-vm"
_PORT = 7443  # each agent listens on its own namespace's migration address
OnMigrated = Callable[[LocalCluster, dict[str, Any]], dict[str, Any]]
_AOF_DIR = "/var/lib/redis/appendonlydir"
_SECRET_FILE = "/var/lib/sealift/secret.txt"


class DebianMigrationError(SealiftError):
    """The Debian guest's end-to-end migration could not be set up or checked."""

    code = "debian_migration_error"


@dataclass(frozen=True)
class DiskCheck:
    """What the two images hold (see the module's docstring)."""

    source_image: str
    destination_image: str
    writes_on_source_disk: int  # this run's RPUSH records in the source's image (frozen at the pause)
    writes_on_destination_disk: int
    source_writes_missing_at_destination: int  # must be 0
    acked_writes_missing_on_disk: int  # acknowledged, not on the destination's image: must be 0
    secret_on_disk: bool
    missing_sample: tuple[int, ...] = ()  # the first few acknowledged writes not on the destination's image

    @property
    def ok(self) -> bool:
        return (
            self.source_writes_missing_at_destination == 0
            and self.acked_writes_missing_on_disk == 0
            and self.writes_on_source_disk > 0
            and self.secret_on_disk
        )


@dataclass
class DebianMigration:
    report: dict[str, Any]
    outage: OutageResult
    disk: DiskCheck
    start_s: float  # vm start until nginx and redis answered
    serving_at_destination: bool  # nginx and redis answered after the source's QEMU had quit
    secret_intact: bool  # redis at the destination holds the secret
    extra: dict[str, Any] = field(default_factory=dict)  # what on_migrated returned

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": self.report,
            "outage": self.outage.to_dict(),
            "disk": {**asdict(self.disk), "ok": self.disk.ok},
            "start_s": self.start_s,
            "serving_at_destination": self.serving_at_destination,
            "secret_intact": self.secret_intact,
            **self.extra,
        }


@contextmanager
def debian_lab(with_relay: bool = False) -> Iterator[tuple[Testbed, LocalCluster, Relay | None]]:
    """The lab's testbed with two agents in the source's and the destination's namespaces, removed after.

    ``with_relay``: host-a reaches host-b through a relay in the attacker's namespace (to tamper with).
    """
    with Testbed(tag="sle") as lab, lab_agents(lab, with_relay) as (cluster, relay):
        yield lab, cluster, relay


@contextmanager
def lab_agents(
    lab: Testbed, with_relay: bool = False, host_config: dict[str, str] | None = None
) -> Iterator[tuple[LocalCluster, Relay | None]]:
    """Two agents in `lab`'s source and destination namespaces on its migration network (``host_config``:
    more of each one's agent.toml, e.g. its [libvirt] table); their guests stopped and files removed after."""
    addresses = {SOURCE: (lab.source_ip, _PORT), DESTINATION: (lab.destination_ip, _PORT)}
    relay = Relay((lab.attacker_ip, 0), netns=lab.ns("attacker")) if with_relay else None
    try:
        if relay is not None:
            relay.target = addresses[DESTINATION]
        cluster = LocalCluster(
            netns={SOURCE: lab.ns("source"), DESTINATION: lab.ns("destination")},
            listen=addresses,
            extra_config="step_timeout_s = 30",
            host_config=host_config or {},
            peer_routes={(SOURCE, DESTINATION): relay.address} if relay is not None else {},
        )
        try:
            cluster.start()
            yield cluster, relay
        finally:
            cluster.stop_guests()
            cluster.cleanup()
    finally:
        if relay is not None:
            relay.close()


@dataclass(frozen=True)
class StartedGuest:
    ip: str
    disk: Path  # its own overlay on the source
    start_s: float  # vm start until nginx and redis answered


def start_debian_guest(cluster: LocalCluster, lab: Testbed, memory_mib: int = GuestShape.memory_mib) -> StartedGuest:
    """`vm start --guest debian` on host-a, on the lab's VM network; returns once nginx and redis answer."""
    shape = GuestShape(memory_mib=memory_mib)  # the lab's guest address, as the saved booted state has it
    ip = shape.guest_ip.split("/")[0]
    net = {"mode": "tap", "bridge": "br0", "guest_ip": shape.guest_ip, "gateway": shape.gateway}
    started = time.monotonic()
    vm = cluster.client(SOURCE).request(
        "vm.start", name=VM, backend="qemu", guest="debian", memory=f"{memory_mib}M", net=net
    )
    OutageClient(ip, netns=lab.ns("client")).wait_ready(120.0)  # a cold boot (no saved state) takes up to ~60 s
    return StartedGuest(ip, Path(vm["vm"]["disks"][0]["path"]), round(time.monotonic() - started, 2))


def run_debian_migration(
    say: Callable[..., object] = lambda *a, **k: None,
    warmup_s: float = 2.0,
    settle_s: float = 2.0,
    migration: dict[str, object] | None = None,
    memory_mib: int = GuestShape.memory_mib,
    on_migrated: OnMigrated | None = None,
) -> DebianMigration:
    """Build the lab, start the Debian guest on host-a, migrate it to host-b under the client, check it.

    ``on_migrated(cluster, report)`` runs after the checks, while the agents still run (the demo asks
    them for its own figures); what it returns lands in the result's ``extra``.
    """
    with debian_lab() as (lab, cluster, _):
        say(f"  agents up in the lab: {SOURCE} on {lab.source_ip}, {DESTINATION} on {lab.destination_ip}")
        guest = start_debian_guest(cluster, lab, memory_mib)
        say(f"  {VM} on {SOURCE} serves nginx and redis at {guest.ip} after {guest.start_s} s (disk {guest.disk})")
        run = migrate_under_client(cluster, lab, guest, say, warmup_s, settle_s, migration or {}, qemu_target_disk)
        if on_migrated is not None:
            run.extra = on_migrated(cluster, run.report)
        return run


def qemu_target_disk(cluster: LocalCluster) -> Path:
    """The overlay the destination agent made for the guest (its vm.info names it)."""
    return Path(cluster.client(DESTINATION).request("vm.info", name=VM)["vm"]["disks"][0]["path"])


def migrate_under_client(
    cluster: LocalCluster,
    lab: Testbed,
    guest: StartedGuest,
    say: Callable[..., object],
    warmup_s: float,
    settle_s: float,
    migration: dict[str, object],
    target_disk: Callable[[LocalCluster], Path],
) -> DebianMigration:
    """Migrate `guest` (VM) host-a -> host-b while the outage client runs, then check the client's view and
    both images (`target_disk(cluster)`: the guest's disk on the destination, as this process sees it)."""
    client = OutageClient(guest.ip, netns=lab.ns("client"))
    client.start()
    try:
        time.sleep(warmup_s)
        say(f"  client writing to redis and reading nginx every 10 ms; migrating {VM} {SOURCE} → {DESTINATION}")
        report = cluster.migrate(VM, SOURCE, DESTINATION, options={"secure": True, **migration})
        time.sleep(settle_s)  # the destination serves while the client goes on
    finally:
        outage = client.stop()
    if report.get("status") != "completed":
        raise DebianMigrationError(f"the migration did not complete: {report}")
    after = OutageClient(guest.ip, netns=lab.ns("client"))
    serving = _serves(after)
    secret = after.redis_get(REDIS_SECRET_KEY) == DEFAULT_SECRET.encode()
    check = check_disks(guest.disk, target_disk(cluster), client.list_key, client.acked_writes)
    return DebianMigration(report, outage, check, guest.start_s, serving, secret)


def _serves(client: OutageClient) -> bool:
    try:
        client.wait_ready(10.0)
    except SealiftError:
        return False
    return True


# -- the images -------------------------------------------------------------------------------------


def check_disks(source: Path, destination: Path, list_key: str, acked: list[int]) -> DiskCheck:
    """Read both images (the destination's while its guest runs: -U) and compare what they hold."""
    with tempfile.TemporaryDirectory(prefix="sle-disk-", dir=_scratch_dir()) as scratch:
        on_source, _ = _disk_writes(source, Path(scratch) / "source.raw", list_key)
        on_destination, secret = _disk_writes(destination, Path(scratch) / "destination.raw", list_key)
    return DiskCheck(
        source_image=str(source),
        destination_image=str(destination),
        writes_on_source_disk=len(on_source),
        writes_on_destination_disk=len(on_destination),
        source_writes_missing_at_destination=len(on_source - on_destination),
        acked_writes_missing_on_disk=len(set(acked) - on_destination),
        secret_on_disk=secret,
        missing_sample=tuple(sorted(set(acked) - on_destination)[:10]),
    )


def _scratch_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def _disk_writes(image: Path, raw: Path, list_key: str) -> tuple[set[int], bool]:
    """The sequence numbers of this list's RPUSH records in redis's append-only files on the image, and
    whether the secret file holds the secret.

    Read through the file system: a raw copy of the image (``qemu-img convert``), its ext4 journal
    replayed on the copy (``e2fsck``: an fsync may have reached only the journal), then the files with
    ``debugfs`` (no mount, no loop device).
    """
    _run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], f"cannot read the image {image}")
    try:
        fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True, timeout=120, check=False)
        if fsck.returncode >= 4:  # 1 and 2: errors corrected (a replayed journal, free counts)
            raise DebianMigrationError(f"the file system on {image} is damaged: {fsck.stdout[-500:]}")
        listing = _debugfs(raw, f"ls -p {_AOF_DIR}").decode(errors="replace")
        names = sorted(
            (line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6),
            key=_aof_order,
        )
        aof = b"".join(_debugfs(raw, f"cat {_AOF_DIR}/{name}") for name in names if name.endswith(".incr.aof"))
        secret = DEFAULT_SECRET.encode() in _debugfs(raw, f"cat {_SECRET_FILE}")
    finally:
        raw.unlink(missing_ok=True)
    key = re.escape(list_key.encode())
    record = re.compile(rb"\$5\r\nRPUSH\r\n\$\d+\r\n" + key + rb"\r\n\$\d+\r\n(\d+)\r\n", re.IGNORECASE)
    return {int(m.group(1)) for m in record.finditer(aof)}, secret


def _aof_order(name: str) -> int:
    """appendonly.aof.N.incr.aof: in N's order (redis appends to the newest)."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0


def _debugfs(raw: Path, request: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise DebianMigrationError(f"debugfs {request!r} failed: {done.stderr.decode(errors='replace')[-300:]}")
    return done.stdout


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise DebianMigrationError(f"{what}: {done.stderr.strip()}")
