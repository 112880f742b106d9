"""libvirt's live migration of one domain (qcow2 disk copied by NBD): plain TCP vs through sealift.

Two lab hosts (backends/libvirt/lab.py: one libvirtd each, in its own mount
namespace), the QEMU test guest as a domain, migrated back and forth:

- `plain`: libvirt by itself over TCP on loopback (the destination libvirtd
  listens on TCP without authentication, QEMU's memory and NBD streams in
  clear): what libvirt does without sealift or TLS;
- `tls`: libvirt's native TLS (`qemu+tls://` between the libvirtds,
  `VIR_MIGRATE_TLS`: QEMU's memory and NBD streams in TLS), with a
  throwaway CA and certificates for both libvirtds and both QEMUs, kept in
  each host's private /etc/libvirt/pki (libvirtd.conf's ca_file/cert_file/
  key_file, the client's `pkipath`, qemu.conf's default_tls_x509_cert_dir);
- `ssh`: libvirt tunnelled over SSH (`qemu+ssh://`, `VIR_MIGRATE_TUNNELLED`:
  QEMU's memory stream inside libvirt's RPC stream inside SSH) to an sshd run in
  the destination libvirtd's mount namespace (`nsenter`) with a throwaway
  host key and client key (the client's ~/.ssh is a private bind mount in
  each libvirtd's namespace, so the host's own is untouched). Memory only:
  libvirt 9.0 refuses a non-shared disk when tunnelled ("not supported with
  tunnelled migration and this QEMU"), so the qcow2 is copied to the
  destination beforehand, untimed, and `VIR_MIGRATE_UNSAFE` admits it;
- `plain-mem`: `plain` with the same memory-only setup, `ssh`'s like-for-like
  baseline;
- `sealift`: `sealift migrate` (order, policy, mutual TLS, every libvirt
  connection carried as AEAD records by the agents).

Each run checks the guest's counter goes on at the destination. Prints
medians of total time (libvirt's job time_elapsed and the wall time of the
call), libvirt's downtime (the guest is paused; the test guest has no
network, so this stands for the client-seen outage) and CPU seconds used
during the call by the processes of the two lab hosts (everything in their
mount namespaces: libvirtds, QEMUs, sshd/ssh) plus the agents, sampled
every 50 ms from /proc (a process that exits loses its last <=50 ms).

    python bench/libvirt_migration.py [--runs 3] [--modes plain,tls,ssh,sealift] [--memory-mib 128] [--disk-mib 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from sealift.backends.libvirt.lab import LibvirtLabHost, define_test_domain
from sealift.cluster import LocalCluster, free_port

VM = "slw-bvm"
COUNTER = re.compile(rb"sealift-counter (\d+)")
MODES = ("plain", "tls", "ssh", "sealift", "plain-mem")
PLAIN_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_DISK
)
# Memory only (libvirt 9.0 with this QEMU refuses NON_SHARED_DISK when tunnelled): the disk is copied
# beforehand, untimed, and UNSAFE admits a disk that is not on shared storage.
MEMORY_ONLY_FLAGS = (PLAIN_FLAGS & ~libvirt.VIR_MIGRATE_NON_SHARED_DISK) | libvirt.VIR_MIGRATE_UNSAFE
PKI_INSIDE = "/etc/libvirt/pki"  # each host's own (its /etc/libvirt is a private bind mount)


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


# -- CPU: the lab hosts' processes (their mount namespaces) and the agents ------------------------


def _mnt_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _cpu_ticks(pid: str) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


class CpuSampler:
    """CPU seconds used while it runs by the processes in `namespaces` and the pids in `pids`."""

    def __init__(self, namespaces: set[str], pids: set[int]) -> None:
        self.namespaces = namespaces
        self.pids = {str(p) for p in pids}
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            if pid not in self.first and pid not in self.pids and _mnt_ns(pid) not in self.namespaces:
                continue
            ticks = _cpu_ticks(pid)
            if ticks is None:
                continue
            self.first.setdefault(pid, ticks if initial else 0)  # a process started since counts whole
            self.last[pid] = ticks

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample(False)

    def __enter__(self) -> CpuSampler:
        self._sample(True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(False)

    @property
    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last) / os.sysconf("SC_CLK_TCK")


# -- libvirt by itself: plain TCP, native TLS, tunnelled over SSH ---------------------------------


def libvirt_alone(
    hosts: dict[str, LibvirtLabHost],
    sampler: Callable[[], CpuSampler],
    src: str,
    dst: str,
    dest_uri: str,
    params: dict[str, Any],
    flags: int,
    disk_mib: int,
) -> dict[str, Any]:
    disk = hosts[dst].images / f"{VM}.qcow2"
    disk.unlink(missing_ok=True)
    if flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK:
        # libvirt creates a missing destination disk only in a storage pool; the agents do it themselves.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{disk_mib}M"], check=True)
    else:  # memory only: the disk is there beforehand, as on shared storage (its copy is not timed)
        shutil.copyfile(hosts[src].images / f"{VM}.qcow2", disk)
    conn = libvirt.open(hosts[src].uri)
    try:
        dom = conn.lookupByName(VM)
        before = counter(hosts[src])
        with sampler() as cpu:
            started = time.monotonic()
            dom.migrateToURI3(dest_uri, params, flags)
            wall = time.monotonic() - started
    finally:
        conn.close()
    dconn = libvirt.open(hosts[dst].uri)
    try:
        job = dconn.lookupByName(VM).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        dconn.close()
    wait_counter(hosts[dst], before)
    return {
        "wall_s": wall,
        "total_ms": job.get("time_elapsed"),
        "downtime_ms": job.get("downtime"),
        "cpu_s": cpu.seconds,
    }


def through_sealift(
    cluster: LocalCluster, hosts: dict[str, LibvirtLabHost], sampler: Callable[[], CpuSampler], src: str, dst: str
) -> dict[str, Any]:
    before = counter(hosts[src])
    (hosts[dst].images / f"{VM}.qcow2").unlink(missing_ok=True)  # the source's disk left by an earlier run
    with sampler() as cpu:
        started = time.monotonic()
        report = cluster.migrate(VM, src, dst)
        wall = time.monotonic() - started
    job = cluster.client(src).request("audit.show", kind="libvirt.job_stats", limit=1)["entries"][0]["fields"]
    wait_counter(hosts[dst], before)
    return {
        "wall_s": wall,
        "total_ms": job.get("time_elapsed"),
        "downtime_ms": job.get("downtime"),
        "cpu_s": cpu.seconds,
        "sealift_total_s": report["total_time_s"],
        "sealift_downtime_ms": report["downtime_ms"],
    }


# -- credentials for the baselines -----------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(directory: Path, addresses: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """A throwaway CA, one server and one client certificate for `addresses` (here both hosts share loopback;
    bench/libvirt_debian.py gives the lab hosts' migration addresses)."""
    directory.mkdir(parents=True)
    names = ",".join([*(f"IP:{a}" for a in addresses), "DNS:localhost"])
    ca_key, ca = directory / "ca-key.pem", directory / "ca-cert.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
             "-days", "2", "-subj", "/CN=slw-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        key, csr, cert = (directory / f"{role}-{kind}.pem" for kind in ("key", "csr", "cert"))
        ext = directory / f"{role}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={names}\n"
        )
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/O=slw-bench/CN={addresses[0]}")  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-days", "2", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
    return directory


def install_pki(pki: Path, host: LibvirtLabHost) -> None:
    """libvirt's file names (libvirtd and the remote driver's pkipath) and QEMU's (its cert dir)."""
    libvirt_dir = host.local_path(PKI_INSIDE)
    qemu_dir = libvirt_dir / "qemu"
    qemu_dir.mkdir(parents=True, exist_ok=True)
    for ours, theirs in (("ca-cert", "cacert"), ("server-cert", "servercert"), ("server-key", "serverkey"),
                         ("client-cert", "clientcert"), ("client-key", "clientkey")):  # fmt: skip
        shutil.copyfile(pki / f"{ours}.pem", libvirt_dir / f"{theirs}.pem")
        shutil.copyfile(pki / f"{ours}.pem", qemu_dir / f"{ours}.pem")
        if ours.endswith("key"):
            os.chmod(libvirt_dir / f"{theirs}.pem", 0o600)
            os.chmod(qemu_dir / f"{ours}.pem", 0o600)


def libvirtd_settings(tcp_port: int, tls_port: int, address: str = "127.0.0.1") -> str:
    return (
        f'listen_tcp = 1\ntcp_port = "{tcp_port}"\nlisten_addr = "{address}"\nauth_tcp = "none"\n'
        f'listen_tls = 1\ntls_port = "{tls_port}"\nauth_tls = "none"\n'
        f'ca_file = "{PKI_INSIDE}/cacert.pem"\ncert_file = "{PKI_INSIDE}/servercert.pem"\n'
        f'key_file = "{PKI_INSIDE}/serverkey.pem"\n'
    )


def qemu_settings() -> str:
    return f'default_tls_x509_cert_dir = "{PKI_INSIDE}/qemu"\ndefault_tls_x509_verify = 1\n'


class SshServers:
    """An sshd in each lab host's mount and network namespace (throwaway host key), listening on the host's
    address (`addresses`, default loopback), and a client key in a private ~/.ssh of each libvirtd's
    namespace that knows both sshds' host keys."""

    def __init__(self, root: Path, hosts: dict[str, LibvirtLabHost], addresses: dict[str, str] | None = None) -> None:
        self.root = root
        self.hosts = hosts
        self.addresses = addresses or {name: "127.0.0.1" for name in hosts}
        self.ports = {name: free_port() for name in hosts}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.root.mkdir(parents=True)
        client = self.root / "client"
        client.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "slw-bench", "-f", str(client / "id_ed25519")], check=True)  # fmt: skip
        (self.root / "authorized_keys").write_text((client / "id_ed25519.pub").read_text())
        known = []
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for name, host in self.hosts.items():
            key = self.root / f"{name}-host_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            known.append(f"[{self.addresses[name]}]:{self.ports[name]} {key.with_suffix('.pub').read_text().strip()}\n")
            config = self.root / f"{name}-sshd_config"
            config.write_text(
                f"Port {self.ports[name]}\nListenAddress {self.addresses[name]}\nHostKey {key}\n"
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"PidFile {self.root / (name + '-sshd.pid')}\n"
            )
            log = (self.root / f"{name}-sshd.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    ["nsenter", "-t", str(host.pid), "-m", "-n", "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        (client / "known_hosts").write_text("".join(known))
        for host in self.hosts.values():  # the source libvirtd's ssh reads ~/.ssh: a private one
            subprocess.run(["nsenter", "-t", str(host.pid), "-m", "mount", "--bind", str(client), "/root/.ssh"], check=True)  # fmt: skip
        time.sleep(0.5)
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'host-a-sshd.log').read_text(errors='replace')}")

    def uri(self, dst: str) -> str:
        return f"qemu+ssh://root@{self.addresses[dst]}:{self.ports[dst]}/system?proxy=native"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, run alternately in this order")
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    root = Path(tempfile.mkdtemp(prefix="slw-lvbench-", dir="/tmp"))
    names = ("host-a", "host-b")
    tcp_ports = {name: free_port() for name in names}
    tls_ports = {name: free_port() for name in names}
    pki = make_pki(root / "pki")
    hosts = {
        name: LibvirtLabHost(
            name,
            root / name[-1],
            extra_conf=libvirtd_settings(tcp_ports[name], tls_ports[name]),
            extra_qemu_conf=qemu_settings(),
        )
        for name in names
    }
    for host in hosts.values():
        install_pki(pki, host)
    cluster: LocalCluster | None = None
    ssh = SshServers(root / "ssh", hosts)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    try:
        for host in hosts.values():
            host.start(listen_tcp=True)
        if "ssh" in modes:
            ssh.start()
        settings = {
            n: "[libvirt]\n" + "".join(f'{k} = "{v}"\n' for k, v in h.agent_settings().items())
            for n, h in hosts.items()
        }
        cluster = LocalCluster(host_config=settings)
        cluster.start()
        namespaces = {ns for h in hosts.values() if h.pid is not None and (ns := _mnt_ns(h.pid)) is not None}
        agent_pids = {a.process.pid for a in cluster.agents.values() if a.process is not None}

        def sampler() -> CpuSampler:
            return CpuSampler(namespaces, agent_pids)

        define_test_domain(hosts["host-a"], VM, memory_mib=args.memory_mib, disk_mib=args.disk_mib)
        wait_counter(hosts["host-a"], 0, 90)
        where = "host-a"
        for run in range(args.runs):
            for mode in modes:
                other = "host-b" if where == "host-a" else "host-a"
                time.sleep(1.0)  # the guest settles between migrations
                if mode == "sealift":
                    figures = through_sealift(cluster, hosts, sampler, where, other)
                elif mode in ("plain", "plain-mem"):
                    params = {
                        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
                        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
                    }
                    uri = f"qemu+tcp://127.0.0.1:{tcp_ports[other]}/system"
                    flags = PLAIN_FLAGS if mode == "plain" else MEMORY_ONLY_FLAGS
                    figures = libvirt_alone(hosts, sampler, where, other, uri, params, flags, args.disk_mib)
                elif mode == "tls":
                    params = {
                        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
                        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
                        libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION: "127.0.0.1",
                    }
                    uri = f"qemu+tls://127.0.0.1:{tls_ports[other]}/system?pkipath={PKI_INSIDE}"
                    flags = PLAIN_FLAGS | libvirt.VIR_MIGRATE_TLS
                    figures = libvirt_alone(hosts, sampler, where, other, uri, params, flags, args.disk_mib)
                else:
                    flags = MEMORY_ONLY_FLAGS | libvirt.VIR_MIGRATE_TUNNELLED
                    figures = libvirt_alone(hosts, sampler, where, other, ssh.uri(other), {}, flags, args.disk_mib)
                results[mode].append(figures)
                print(f"run {run + 1} {mode:8s} {where} -> {other}: {figures}", flush=True)
                where = other
    finally:
        if cluster is not None:
            cluster.cleanup()
        ssh.stop()
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
        print_ratios(summary)
    return 0


def print_ratios(summary: dict[str, dict[str, float]]) -> None:
    """sealift's median wall time over each baseline's (bench/libvirt_debian.py prints them too)."""
    if "sealift" not in summary:
        return
    for base in ("plain", "tls", "ssh", "plain-mem"):
        if base in summary:
            print(f"  sealift / {base} wall time: {summary['sealift']['wall_s'] / summary[base]['wall_s']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
