"""Benchmark (issue 19): the Debian domain with its disk, by libvirt alone (TCP, TLS, SSH) and through sealift.

    PYTHONPATH=src:bench .venv/bin/python bench/libvirt_debian.py [--runs 3] [--memory-mib 1024] \
        [--fill-mib 512] [--modes plain,tls,ssh,sealift,plain-mem] [--no-subreaper] [--json]

One lab (lab/libvirt_debian.py): the testbed's namespaces, a libvirtd per
host in its host's network namespace and a mount namespace of its own,
two agents, the Debian guest as a domain of host-a (``--memory-mib``, its
NIC on br0, a qcow2 disk of its own over the image's disk, 4 GiB virtual), booted
once (cold, under TCG). The guest then writes ``--fill-mib`` of random data
to its own disk through its redis (sealift.bench.debian's ``fill_disk``),
so the disk holds the image's ~0.25 GiB plus that. The
domain then migrates back and forth, the modes alternated within each
round; every migration runs under the outage client (GET to nginx and
RPUSH to redis every 10 ms from the lab's client namespace, 2 s before and
2 s after):

- ``plain``: libvirt by itself, peer to peer over TCP on the migration
  network (the destination libvirtd listens on TCP without authentication;
  QEMU's memory stream and the NBD disk copy in clear);
- ``tls``: libvirt's native TLS (``qemu+tls://``, ``VIR_MIGRATE_TLS``: the
  memory stream and the NBD copy in TLS; a throwaway CA, certificates for
  both libvirtds and both QEMUs);
- ``ssh``: libvirt tunnelled over SSH (``qemu+ssh://``,
  ``VIR_MIGRATE_TUNNELLED``) to an sshd in the destination libvirtd's
  namespaces. Memory only: libvirt 9.0 refuses to copy a non-shared disk
  when tunnelled, so the disk is shared: the destination's path is a hard
  link to the source's image (the same file, as on shared storage; QEMU
  hands it over at the switchover) and ``VIR_MIGRATE_UNSAFE`` admits it;
- ``plain-mem``: ``plain`` with that shared disk, ``ssh``'s like-for-like
  baseline;
- ``sealift``: ``sealift migrate`` (signed order, mutual TLS, every one of
  libvirt's connections carried as AEAD records by the agents, the disk
  copied by libvirt's NBD through them).

plain, tls and sealift copy the whole disk (``VIR_MIGRATE_NON_SHARED_DISK``:
libvirt mirrors the full chain into an empty image at the destination).
Figures per migration: wall time of the migration call (libvirt's
migrateToURI3; sealift's ``migrate`` request, order to running receipt),
libvirt's own job time and downtime, the client's longest gap, failed
requests and acknowledged writes lost, and the CPU seconds used during the
call by every process of the two libvirt hosts (libvirtds, QEMUs, sshd,
ssh) plus the agents (bench/libvirt_migration.py's CpuSampler). Needs root.

The libvirtds run under a subreaper (`LibvirtLabHost.reap_children`): this
machine's init reaps orphaned processes ~1.7 s late, and libvirt's Confirm
step waits until the QEMU it killed is gone, so without it every migration
here took ~1.7 s longer than on a real host (``--no-subreaper`` measures
that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
from libvirt_migration import (
    MEMORY_ONLY_FLAGS,
    PKI_INSIDE,
    PLAIN_FLAGS,
    CpuSampler,
    SshServers,
    _mnt_ns,
    install_pki,
    libvirtd_settings,
    make_pki,
    print_ratios,
    qemu_settings,
)

from sealift.backends.libvirt.lab import IMAGES_DIR, LibvirtLabHost
from sealift.backends.qemu.debian_image import build_debian_image
from sealift.bench.debian import fill_disk
from sealift.cluster import free_port
from sealift.lab.client import OutageClient
from sealift.lab.debian_migration import DESTINATION, SOURCE, VM
from sealift.lab.libvirt_debian import LibvirtDebianLab, guest_ip, libvirt_debian_lab, start_debian_domain
from sealift.lab.testbed import Testbed

MODES = ("plain", "tls", "ssh", "sealift", "plain-mem")
ADDRESSES = {SOURCE: Testbed.source_ip, DESTINATION: Testbed.destination_ip}
DISK_INSIDE = f"{IMAGES_DIR}/{VM}.qcow2"


class Bench:
    """The lab, the baselines' credentials and ports, and where the domain is now."""

    def __init__(self, env: LibvirtDebianLab, ports: dict[str, dict[str, int]], ssh: SshServers | None) -> None:
        self.env = env
        self.ports = ports
        self.ssh = ssh
        self.where = SOURCE
        namespaces = {ns for h in env.hosts.values() if h.pid is not None and (ns := _mnt_ns(h.pid)) is not None}
        agent_pids = {a.process.pid for a in env.cluster.agents.values() if a.process is not None}
        self.sampler: Callable[[], CpuSampler] = lambda: CpuSampler(namespaces, agent_pids)

    def disk(self, host: str) -> Path:
        return self.env.hosts[host].local_path(DISK_INSIDE)

    def run(self, mode: str) -> dict[str, Any]:
        src, dst = self.where, DESTINATION if self.where == SOURCE else SOURCE
        self.disk(dst).unlink(missing_ok=True)  # the domain's image left there by an earlier migration
        load = os.getloadavg()[0]
        client = OutageClient(guest_ip(), netns=self.env.lab.ns("client"))
        client.start()
        try:
            time.sleep(2.0)
            figures = self._sealift(src, dst) if mode == "sealift" else self._libvirt(mode, src, dst)
            time.sleep(2.0)
        finally:
            outage = client.stop()
        self.where = dst
        return {
            **figures,
            "client_gap_ms": outage.longest_gap_ms,
            "requests_failed": outage.http_failed + outage.redis_failed,
            "writes_lost": outage.writes_lost,
            "writes_acked": outage.writes_acked,
            "load_1min": round(load, 2),
            "from": src,
        }

    def _sealift(self, src: str, dst: str) -> dict[str, Any]:
        cluster = self.env.cluster
        with self.sampler() as cpu:
            started = time.monotonic()
            report = cluster.migrate(VM, src, dst, options={"secure": True})
            wall = time.monotonic() - started
        job = cluster.client(src).request("audit.show", kind="libvirt.job_stats", limit=1)["entries"][0]["fields"]
        return {
            "wall_s": round(wall, 3),
            "job_ms": job.get("time_elapsed"),
            "libvirt_downtime_ms": job.get("downtime"),
            "cpu_s": round(cpu.seconds, 2),
            "sealift_total_s": report["total_time_s"],
            "sealift_downtime_ms": report["downtime_ms"],
            "disk_bytes": report["disk_bytes_sent"],
        }

    def _libvirt(self, mode: str, src: str, dst: str) -> dict[str, Any]:
        dst_ip = ADDRESSES[dst]
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst_ip}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: dst_ip,
        }
        if mode in ("plain", "tls"):
            # libvirt creates a missing destination disk only in a storage pool; the agents do it themselves.
            size = _virtual_size(self.disk(src))
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk(dst)), str(size)], check=True)
        else:  # memory only: the same file at the same path on both hosts, as on shared storage
            os.link(self.disk(src), self.disk(dst))
        if mode == "plain":
            uri, flags = f"qemu+tcp://{dst_ip}:{self.ports['tcp'][dst]}/system", PLAIN_FLAGS
        elif mode == "plain-mem":
            uri, flags = f"qemu+tcp://{dst_ip}:{self.ports['tcp'][dst]}/system", MEMORY_ONLY_FLAGS
        elif mode == "tls":
            params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = dst_ip
            uri = f"qemu+tls://{dst_ip}:{self.ports['tls'][dst]}/system?pkipath={PKI_INSIDE}"
            flags = PLAIN_FLAGS | libvirt.VIR_MIGRATE_TLS
        else:
            assert self.ssh is not None
            uri, params, flags = self.ssh.uri(dst), {}, MEMORY_ONLY_FLAGS | libvirt.VIR_MIGRATE_TUNNELLED
        conn = libvirt.open(self.env.hosts[src].uri)
        try:
            dom = conn.lookupByName(VM)
            with self.sampler() as cpu:
                started = time.monotonic()
                dom.migrateToURI3(uri, params, flags)
                wall = time.monotonic() - started
        finally:
            conn.close()
        dconn = libvirt.open(self.env.hosts[dst].uri)
        try:
            job = dconn.lookupByName(VM).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        finally:
            dconn.close()
        return {
            "wall_s": round(wall, 3),
            "job_ms": job.get("time_elapsed"),
            "libvirt_downtime_ms": job.get("downtime"),
            "cpu_s": round(cpu.seconds, 2),
            "disk_bytes": None,  # the destination's completed job has no disk figures; the source's is gone
        }


def _virtual_size(image: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True, check=True
    )
    return int(json.loads(info.stdout)["virtual-size"])


def host_factory(
    pki: Path, ports: dict[str, dict[str, int]], reap: bool = True
) -> Callable[[str, Path, str], LibvirtLabHost]:
    """Lab hosts whose libvirtds also listen on TCP and TLS on their migration address (the baselines);
    `reap`: under a subreaper, so a killed QEMU is gone at once, as on a real host (lab.py)."""

    def make(name: str, root: Path, netns: str) -> LibvirtLabHost:
        host = LibvirtLabHost(
            name,
            root,
            netns=netns,
            extra_conf=libvirtd_settings(ports["tcp"][name], ports["tls"][name], ADDRESSES[name]),
            extra_qemu_conf=qemu_settings(),
            reap_children=reap,
        )
        install_pki(pki, host)
        return host

    return make


def medians(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for mode, runs in results.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)] if runs else []
        summary[mode] = {k: statistics.median(float(r[k]) for r in runs if r.get(k) is not None) for k in keys}
    return summary


def run_modes(
    args: argparse.Namespace,
    modes: list[str],
    ports: dict[str, dict[str, int]],
    pki: Path,
    scratch: Path,
    results: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Boot and fill the domain once, then every mode `args.runs` times, alternated; the set-up's figures."""
    with libvirt_debian_lab(make_host=host_factory(pki, ports, not args.no_subreaper), listen_tcp=True) as env:
        ssh = SshServers(scratch / "ssh", env.hosts, ADDRESSES) if "ssh" in modes else None
        try:
            if ssh is not None:
                ssh.start()
            guest = start_debian_domain(env, memory_mib=args.memory_mib)
            fill_s = fill_disk(guest.ip, env.lab.ns("client"), args.fill_mib)
            setup = {"boot_s": guest.start_s, "fill_s": round(fill_s, 1), "disk_mib": _allocated_mib(guest.disk)}
            print(f"booted in {guest.start_s} s, wrote {args.fill_mib} MiB in {fill_s:.0f} s: {setup}", flush=True)
            bench = Bench(env, ports, ssh)
            for run in range(args.runs):
                for mode in modes:
                    time.sleep(1.0)  # the guest settles between migrations
                    figures = bench.run(mode)
                    results[mode].append(figures)
                    print(f"run {run + 1} {mode:9s} {figures}", flush=True)
        finally:
            if ssh is not None:
                ssh.stop()
    return setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, run alternately in this order")
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--fill-mib", type=int, default=512)
    parser.add_argument(
        "--no-subreaper",
        action="store_true",
        help="leave the QEMUs' zombies to this machine's init (reaps ~1.7 s late): libvirt's Confirm waits for them",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    build_debian_image()
    scratch = Path(tempfile.mkdtemp(prefix="slw-bench-", dir="/tmp"))
    ports = {kind: {name: free_port() for name in ADDRESSES} for kind in ("tcp", "tls")}
    pki = make_pki(scratch / "pki", tuple(ADDRESSES.values()))
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    setup: dict[str, Any] = {}
    try:
        setup = run_modes(args, modes, ports, pki, scratch, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = medians(results)
    if args.json:
        print(json.dumps({"setup": setup, "runs": results, "medians": summary}, indent=2))
    print(f"\n{args.memory_mib} MiB Debian domain, {setup.get('disk_mib')} MiB disk allocated, medians of {args.runs}:")
    for mode, figures in summary.items():
        print(f"  {mode:9s} " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    print_ratios(summary)
    return 0


def _allocated_mib(image: Path) -> int:
    """The data the disk holds (its whole chain, without the zeros): what a full copy carries."""
    done = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)], capture_output=True, text=True, check=True
    )
    return sum(e["length"] for e in json.loads(done.stdout) if e.get("data") and not e.get("zero")) >> 20


if __name__ == "__main__":
    raise SystemExit(main())
