"""libvirt's live migration of one domain (qcow2 disk copied by NBD): plain TCP vs through sealift.

Two lab hosts (backends/libvirt/lab.py: one libvirtd each, in its own mount
namespace), the QEMU test guest as a domain, migrated back and forth:

- `plain`: libvirt by itself over TCP on loopback (the destination libvirtd
  listens on TCP without authentication, QEMU's memory and NBD streams in
  clear): what libvirt does without sealift or TLS;
- `sealift`: `sealift migrate` (order, policy, mutual TLS, every libvirt
  connection carried as AEAD records by the agents).

libvirt's own TLS (`--tls`) is not measured: it needs x509 credentials for
both libvirtds and both QEMUs, which this script does not set up (see
docs/benchmarks.md). Each run checks the guest's counter goes on at the
destination. Prints medians of total time (libvirt's job time_elapsed and
the wall time of the call) and libvirt's downtime.

    python bench/libvirt_migration.py [--runs 3] [--memory-mib 128] [--disk-mib 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from sealift.backends.libvirt.lab import LibvirtLabHost, define_test_domain
from sealift.cluster import LocalCluster, free_port

VM = "bvm"
COUNTER = re.compile(rb"sealift-counter (\d+)")
PLAIN_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_DISK
)


def counter(host: LibvirtLabHost) -> int:
    path = host.local_path(f"/var/log/libvirt/{VM}.console")
    found = COUNTER.findall(path.read_bytes()[-16384:]) if path.exists() else []
    return int(found[-1]) if found else -1


def wait_counter(host: LibvirtLabHost, above: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = counter(host)
        if value > above:
            return value
        time.sleep(0.2)
    tail = host.local_path(f"/var/log/libvirt/{VM}.console").read_bytes()[-600:].decode(errors="replace")
    raise RuntimeError(f"{VM}'s counter on {host.name} did not pass {above}: {tail}")


def plain_tcp(
    hosts: dict[str, LibvirtLabHost], ports: dict[str, int], src: str, dst: str, disk_mib: int
) -> dict[str, Any]:
    # libvirt creates a missing destination disk only in a storage pool; the agents do it themselves.
    disk = hosts[dst].images / f"{VM}.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{disk_mib}M"], check=True)
    conn = libvirt.open(hosts[src].uri)
    try:
        dom = conn.lookupByName(VM)
        before = counter(hosts[src])
        started = time.monotonic()
        dom.migrateToURI3(
            f"qemu+tcp://127.0.0.1:{ports[dst]}/system",
            {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1", libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"},
            PLAIN_FLAGS,
        )
        wall = time.monotonic() - started
    finally:
        conn.close()
    dconn = libvirt.open(hosts[dst].uri)
    try:
        job = dconn.lookupByName(VM).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        dconn.close()
    wait_counter(hosts[dst], before)
    return {"wall_s": wall, "total_ms": job.get("time_elapsed"), "downtime_ms": job.get("downtime")}


def through_sealift(cluster: LocalCluster, hosts: dict[str, LibvirtLabHost], src: str, dst: str) -> dict[str, Any]:
    before = counter(hosts[src])
    started = time.monotonic()
    (hosts[dst].images / f"{VM}.qcow2").unlink(missing_ok=True)  # the source's disk left by an earlier run
    report = cluster.migrate(VM, src, dst)
    wall = time.monotonic() - started
    job = cluster.client(src).request("audit.show", kind="libvirt.job_stats", limit=1)["entries"][0]["fields"]
    wait_counter(hosts[dst], before)
    return {
        "wall_s": wall,
        "total_ms": job.get("time_elapsed"),
        "downtime_ms": job.get("downtime"),
        "sealift_total_s": report["total_time_s"],
        "sealift_downtime_ms": report["downtime_ms"],
    }


def tcp_settings(port: int) -> str:
    return f'listen_tcp = 1\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\nauth_tcp = "none"\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slv-bench-", dir="/tmp"))
    names = ("host-a", "host-b")
    ports = {name: free_port() for name in names}
    hosts = {name: LibvirtLabHost(name, root / name[-1], extra_conf=tcp_settings(ports[name])) for name in names}
    cluster: LocalCluster | None = None
    results: dict[str, list[dict[str, Any]]] = {"plain": [], "sealift": []}
    try:
        for host in hosts.values():
            host.start(listen_tcp=True)
        settings = {
            n: "[libvirt]\n" + "".join(f'{k} = "{v}"\n' for k, v in h.agent_settings().items())
            for n, h in hosts.items()
        }
        cluster = LocalCluster(host_config=settings)
        cluster.start()
        define_test_domain(hosts["host-a"], VM, memory_mib=args.memory_mib, disk_mib=args.disk_mib)
        wait_counter(hosts["host-a"], 0, 90)
        where = "host-a"
        for run in range(args.runs):
            for mode in ("plain", "sealift"):
                other = "host-b" if where == "host-a" else "host-a"
                time.sleep(1.0)  # the guest settles between migrations
                if mode == "plain":
                    figures = plain_tcp(hosts, ports, where, other, args.disk_mib)
                else:
                    figures = through_sealift(cluster, hosts, where, other)
                results[mode].append(figures)
                print(f"run {run + 1} {mode:8s} {where} -> {other}: {figures}", flush=True)
                where = other
    finally:
        if cluster is not None:
            cluster.cleanup()
        for host in hosts.values():
            host.stop()
        shutil.rmtree(root, ignore_errors=True)
    summary = {
        mode: {key: statistics.median(float(r[key]) for r in runs) for key in runs[0]}
        for mode, runs in results.items()
        if runs
    }
    if args.json:
        print(json.dumps({"runs": results, "medians": summary}, indent=2))
    else:
        print(f"\n{args.memory_mib} MiB guest, {args.disk_mib} MiB qcow2 disk, medians of {args.runs}:")
        for mode, figures in summary.items():
            print(f"  {mode:8s} " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        if "plain" in summary and "sealift" in summary:
            ratio = summary["sealift"]["wall_s"] / summary["plain"]["wall_s"]
            print(f"  sealift / plain wall time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
