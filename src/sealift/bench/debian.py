"""The Debian guest with its disk, migrated by sealift, plain QEMU, SSH tunnels and QEMU's TLS (issue 18).

One run per call (`run_debian`); `sealift bench --backends debian` and
bench/debian_disk_alternatives.py schedule them.

Every run: a fresh lab testbed (lab/testbed.py), the Debian guest restored
from its saved booted state (``--memory`` MiB) on the source host's
``br0``, its root disk a qcow2 overlay of its own over the saved disk
(the same backing file on both hosts, so ``sync=top`` copies the overlay:
what the guest wrote since the save). Before the migration the guest
writes ``--fill`` MiB of data to its own disk: the lab's client sends
redis ``SET`` of 4 MiB random values, each followed by ``DEL`` (redis's
append-only file, ``appendfsync always``, keeps both on disk; AOF rewrites
off), so the data is on the guest's file system and the guest's memory does
not grow with it. Then the outage client runs (GET + RPUSH every 10 ms),
2 s, the migration, 2 s after; the disk check of lab/debian_migration.py
reads redis's files from both images.

Variants (alternated within each round, so they see the same machine):

- ``sealift``: two agents in the hosts' namespaces, `vm start --guest
  debian`, a secure migration (disk through the sealed disk stream).
- ``plain``: two QEMUs driven over QMP, no agents: destination
  ``nbd-server-start`` on TCP + writable ``block-export-add``, source
  ``blockdev-add driver=nbd`` + ``blockdev-mirror sync=top
  copy-mode=write-blocking``, ready, ``pause-before-switchover``, ``migrate
  tcp:``, at the pause ``block-job-cancel``, ``migrate-continue``.
- ``ssh`` / ``ssh-aesgcm``: the same, with NBD and migration on unix sockets at
  the destination, forwarded by one ``ssh -L`` tunnel (sshd in the
  destination's namespace, OpenSSH's default cipher or aes128-gcm@openssh.com,
  no compression) as Proxmox does.
- ``qemu-tls``: the same over TCP with ``tls-creds-x509`` objects on both
  ends (one CA, server certificate for the destination's address, client
  certificate, verify-peer on both): ``nbd-server-start tls-creds``, the
  NBD client node's ``tls-creds``, the migration parameter ``tls-creds``.

Figures: total time (sealift: the agent's report, from the channel's start
to the destination's guest running, so it includes creating the target and
starting the destination's QEMU; the others likewise: from before the
destination's overlay is created and its QEMU started, to the migration
completed; ``from_mirror_ms`` is their time from the mirror's start alone),
disk mirror time (mirror start to every job ready), QEMU's
downtime (sealift: the agent's), the client's longest gap, failed requests,
acknowledged writes lost, the disk check, CPU seconds (utime+stime) of every
process in the source and destination namespaces from just before the
migration to just after (QEMUs, agents, ssh, sshd), QEMU's share apart.
Needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from sealift.backends.qemu.debian_guest import (
    GuestProcess,
    GuestShape,
    SavedState,
    ensure_saved_state,
    guest_argv,
    new_overlay,
    restore_guest,
)
from sealift.backends.qemu.debian_image import build_debian_image
from sealift.bench.errors import BenchError
from sealift.bench.results import RunResult
from sealift.bench.sshtunnel import AES_GCM
from sealift.lab.client import OutageClient
from sealift.lab.debian_migration import (
    check_disks,
    debian_lab,
    migrate_under_client,
    qemu_target_disk,
    start_debian_guest,
)
from sealift.lab.netns import enter_netns
from sealift.lab.testbed import Testbed

TAP = "slb-tap0"
NBD_PORT, MIG_PORT, SSH_PORT = 10809, 4444, 2222
CHUNK = 4 << 20
# ssh: OpenSSH's default cipher; ssh-aesgcm: AES-GCM, which Proxmox users pick for speed.
TRANSPORTS = ("plain", "qemu-tls", "ssh", "ssh-aesgcm", "sealift")
SSH_CIPHERS = {"ssh": None, "ssh-aesgcm": AES_GCM}


# -- common ---------------------------------------------------------------------------------------


def fill_disk(ip: str, netns: str, mib: int) -> float:
    """The guest writes ``mib`` MiB to its disk (redis SET + DEL of random 4 MiB values); returns seconds."""
    started = time.monotonic()
    with enter_netns(netns):
        r = redis.Redis(host=ip, socket_timeout=60)
        r.config_set("auto-aof-rewrite-percentage", 0)
        for n in range(max(0, mib) * (1 << 20) // CHUNK):
            r.set(f"slb:fill:{n}", os.urandom(CHUNK))
            r.delete(f"slb:fill:{n}")
        r.close()
    return time.monotonic() - started


def cpu_seconds(namespaces: list[str]) -> dict[str, float]:
    """utime+stime (s) of every process in these namespaces, per pid, with its name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[f"{pid}:{name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(all processes, QEMU only) CPU seconds spent between the two snapshots."""
    total = qemu = 0.0
    for key, value in after.items():
        spent = value - before.get(key, 0.0)
        total += spent
        if "qemu" in key.split(":", 1)[1]:
            qemu += spent
    return round(total, 2), round(qemu, 2)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 300.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not after {timeout:.0f} s")
        time.sleep(step)


# -- sealift ----------------------------------------------------------------------------------------


def sealift_run(memory: int, fill: int) -> dict[str, Any]:
    with debian_lab() as (lab, cluster, _):
        guest = start_debian_guest(cluster, lab, memory)
        fill_s = fill_disk(guest.ip, lab.ns("client"), fill)
        spaces = [lab.ns("source"), lab.ns("destination")]
        before = cpu_seconds(spaces)
        cpu_box: dict[str, tuple[float, float]] = {}
        original = cluster.migrate

        def migrate(*args: Any, **kwargs: Any) -> dict[str, Any]:
            report = original(*args, **kwargs)
            cpu_box["cpu"] = cpu_delta(before, cpu_seconds(spaces))
            return report

        cluster.migrate = migrate  # type: ignore[method-assign]
        run = migrate_under_client(cluster, lab, guest, lambda *a, **k: None, 2.0, 2.0, {}, qemu_target_disk)
    report, outage = run.report, run.outage
    cpu, qemu_cpu = cpu_box.get("cpu", (float("nan"), float("nan")))
    return {
        "status": report["status"],
        "fill_s": round(fill_s, 1),
        "total_ms": round(report["total_time_s"] * 1000, 1),
        "mirror_ms": round(float(report.get("mirror_time_s") or 0) * 1000, 1),
        "downtime_ms": report["downtime_ms"],
        "disk_mb": round(float(report.get("disk_bytes_sent") or 0) / 1e6, 1),
        "longest_gap_ms": outage.longest_gap_ms,
        "failed": outage.http_failed + outage.redis_failed,
        "writes_acked": outage.writes_acked,
        "writes_lost": outage.writes_lost,
        "disk_ok": run.disk.ok,
        "cpu_s": cpu,
        "qemu_cpu_s": qemu_cpu,
    }


# -- QEMU alone: plain, ssh, qemu-tls -----------------------------------------------------------------


def make_certs(directory: Path, server_ip: str) -> tuple[Path, Path]:
    """A CA, a server certificate for ``server_ip``, a client certificate: QEMU's tls-creds-x509 layout."""
    server, client = directory / "server", directory / "client"
    server.mkdir(parents=True)
    client.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca = directory / "ca-key.pem", directory / "ca-cert.pem"
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca), "-days", "2", "-subj", "/CN=slb-ca")  # fmt: skip
    for where, role, ext in ((server, "server", f"subjectAltName=IP:{server_ip}"), (client, "client", "")):
        key, csr, cert = where / f"{role}-key.pem", where / f"{role}.csr", where / f"{role}-cert.pem"
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN=slb-{role}")  # fmt: skip
        extfile = directory / f"{role}.ext"
        usage = "serverAuth" if role == "server" else "clientAuth"
        extfile.write_text("\n".join(filter(None, [ext, f"extendedKeyUsage={usage}"])) + "\n")
        ssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extfile))  # fmt: skip
        shutil.copy(ca, where / "ca-cert.pem")
    return server, client


class SshTunnel:
    """sshd in the destination's namespace (throwaway host key, one authorized key); ssh -L from the source's."""

    def __init__(self, bed: Testbed, workdir: Path, cipher: str | None) -> None:
        d = workdir / "ssh"
        d.mkdir()
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        shutil.copy(d / "user.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)
        config = d / "sshd_config"
        config.write_text(
            f"ListenAddress {bed.destination_ip}:{SSH_PORT}\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin yes\nUsePAM no\nStrictModes no\n"
            f"PasswordAuthentication no\nAllowStreamLocalForwarding yes\nPidFile none\n"
            + (f"Ciphers {cipher}\n" if cipher else "")
        )
        self.sshd = bed.popen(
            "destination", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL
        )
        time.sleep(0.3)
        self.dir = d
        self.ssh: subprocess.Popen[bytes] | None = None
        self.bed = bed
        self.cipher = cipher

    def connect(self, forwards: list[tuple[Path, Path]]) -> None:
        """The client side, per migration (Proxmox opens its tunnel per migration): ssh -L, until forwarding."""
        d, bed = self.dir, self.bed
        argv = ["ssh", "-N", "-i", str(d / "user"), "-p", str(SSH_PORT), "-o", "Compression=no",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d / 'known'}",
                "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes"]  # fmt: skip
        if self.cipher:
            argv += ["-c", self.cipher]
        for local, remote in forwards:
            argv += ["-L", f"{local}:{remote}"]
        self.ssh = bed.popen("source", [*argv, f"root@{bed.destination_ip}"], stderr=subprocess.DEVNULL)
        locals_ = [local for local, _ in forwards]
        wait_for("the ssh tunnel", lambda: all(p.exists() for p in locals_), 30.0, 0.05)

    def close(self) -> None:
        for proc in (self.ssh, self.sshd):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def node_of(guest: GuestProcess) -> str:
    return str(next(b for b in guest.qmp("query-block") if b["device"] == "disk0")["inserted"]["node-name"])


def qemu_run(bed: Testbed, state: SavedState, variant: str, fill: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="slb-", dir="/tmp"))
    tunnel: SshTunnel | None = None
    src: GuestProcess | None = None
    dst: GuestProcess | None = None
    try:
        (workdir / "dst").mkdir()
        src, _ = restore_guest(state, workdir, TAP, netns=bed.ns("source"))
        source = src  # never None: the closures below poll it
        ip = state.shape.guest_ip.split("/")[0]
        OutageClient(ip, netns=bed.ns("client")).wait_ready(60.0)
        fill_s = fill_disk(ip, bed.ns("client"), fill)
        # What a host has before any migration: certificates, sshd. Then the client, 2 s, and the clock.
        if variant == "qemu-tls":
            server_dir, client_dir = make_certs(workdir / "pki", bed.destination_ip)
        if variant in SSH_CIPHERS:
            tunnel = SshTunnel(bed, workdir, SSH_CIPHERS[variant])  # sshd runs on the destination host anyway
        client = OutageClient(ip, netns=bed.ns("client"))
        client.start()
        time.sleep(2.0)
        spaces = [bed.ns("source"), bed.ns("destination")]
        before = cpu_seconds(spaces)
        started = time.monotonic()  # as the agent's total: the destination's QEMU is not started yet
        dst_disk = new_overlay(state, workdir / "dst" / "disk.qcow2")
        argv = guest_argv(
            state.image,
            state.shape,
            disk=dst_disk,
            tap=TAP,
            console=workdir / "dst" / "console.log",
            qmp=workdir / "dst" / "qmp.sock",
            incoming="defer",
        )
        dst = GuestProcess.start(argv, workdir / "dst", netns=bed.ns("destination"))
        tls: dict[str, str] = {}
        if variant == "qemu-tls":
            dst.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(server_dir),
                                   "endpoint": "server", "verify-peer": True})  # fmt: skip
            src.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(client_dir),
                                   "endpoint": "client", "verify-peer": True})  # fmt: skip
            tls = {"tls-creds": "tls0"}
        if variant in SSH_CIPHERS:
            nbd_remote, mig_remote = workdir / "dst" / "nbd.sock", workdir / "dst" / "mig.sock"
            nbd_local, mig_local = workdir / "nbd-fwd.sock", workdir / "mig-fwd.sock"
            dst.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_remote)}}})
            dst.qmp("migrate-incoming", {"uri": f"unix:{mig_remote}"})
            nbd_server: dict[str, Any] = {"type": "unix", "path": str(nbd_local)}
            mig_uri = f"unix:{mig_local}"
        else:
            dst.qmp("nbd-server-start", {"addr": {"type": "inet", "data": {"host": bed.destination_ip,
                                                                           "port": str(NBD_PORT)}}, **tls})  # fmt: skip
            if tls:
                dst.qmp("migrate-set-parameters", tls)
            dst.qmp("migrate-incoming", {"uri": f"tcp:{bed.destination_ip}:{MIG_PORT}"})
            nbd_server = {"type": "inet", "host": bed.destination_ip, "port": str(NBD_PORT)}
            mig_uri = f"tcp:{bed.destination_ip}:{MIG_PORT}"
        dst.qmp("block-export-add", {"type": "nbd", "id": "exp0", "node-name": node_of(dst), "name": "disk0",
                                     "writable": True})  # fmt: skip
        mirror_started = time.monotonic()
        if tunnel is not None:  # the tunnel is part of the migration's time
            tunnel.connect([(nbd_local, nbd_remote), (mig_local, mig_remote)])
        src.qmp("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "server": nbd_server, "export": "disk0", **tls})
        src.qmp("blockdev-mirror", {"job-id": "mirror0", "device": node_of(src), "target": "nbd0", "sync": "top",
                                    "copy-mode": "write-blocking", "auto-dismiss": False})  # fmt: skip

        def job() -> dict[str, Any]:
            jobs = [j for j in source.qmp("query-block-jobs") if j["device"] == "mirror0"]
            if not jobs:
                raise BenchError(f"the mirror job is gone: {source.qmp('query-jobs')}")
            return dict(jobs[0])

        wait_for("the mirror ready", lambda: bool(job()["ready"]), 600.0, 0.05)
        mirror_s = time.monotonic() - mirror_started
        disk_bytes = int(job()["len"])
        src.qmp(
            "migrate-set-capabilities", {"capabilities": [{"capability": "pause-before-switchover", "state": True}]}
        )
        src.qmp("migrate-set-parameters", {"max-bandwidth": 8 << 30, "downtime-limit": 300, **tls})
        src.qmp("migrate", {"uri": mig_uri})

        def status() -> str:
            return str(source.qmp("query-migrate").get("status"))

        wait_for("pre-switchover", lambda: status() in ("pre-switchover", "failed", "cancelled"), 600.0, 0.005)
        if status() != "pre-switchover":
            raise BenchError(f"migration {status()}: {src.qmp('query-migrate')}")
        src.qmp("block-job-cancel", {"device": "mirror0"})
        wait_for("the mirror concluded", lambda: source.qmp("query-jobs")[0]["status"] == "concluded", 60.0, 0.005)
        src.qmp("migrate-continue", {"state": "pre-switchover"})
        wait_for("the migration", lambda: status() in ("completed", "failed", "cancelled"), 120.0, 0.01)
        total_s = time.monotonic() - started
        from_mirror_s = time.monotonic() - mirror_started
        info = dict(src.qmp("query-migrate"))
        dst.wait_restored(30.0)
        after = cpu_seconds(spaces)
        src.qmp("job-dismiss", {"id": "mirror0"})
        src.qmp("blockdev-del", {"node-name": "nbd0"})
        # hard: the NBD client's disconnect may not have reached the export yet (seen once through ssh)
        dst.qmp("block-export-del", {"id": "exp0", "mode": "hard"})
        dst.qmp("nbd-server-stop")
        time.sleep(2.0)
        outage = client.stop()
        src.kill()
        src = None
        check = check_disks(workdir / "disk.qcow2", dst_disk, client.list_key, client.acked_writes)
        cpu, qemu_cpu = cpu_delta(before, after)
        return {
            "status": info.get("status"),
            "fill_s": round(fill_s, 1),
            "total_ms": round(total_s * 1000, 1),
            "mirror_ms": round(mirror_s * 1000, 1),
            "from_mirror_ms": round(from_mirror_s * 1000, 1),
            "downtime_ms": info.get("downtime"),
            "disk_mb": round(disk_bytes / 1e6, 1),
            "longest_gap_ms": outage.longest_gap_ms,
            "failed": outage.http_failed + outage.redis_failed,
            "writes_acked": outage.writes_acked,
            "writes_lost": outage.writes_lost,
            "disk_ok": check.ok,
            "cpu_s": cpu,
            "qemu_cpu_s": qemu_cpu,
        }
    finally:
        if tunnel is not None:
            tunnel.close()
        for guest in (src, dst):
            if guest is not None:
                guest.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def run_debian(transport: str, state: SavedState, memory_mib: int, fill_mib: int) -> dict[str, Any]:
    """One migration of the Debian guest (restored from ``state``) over ``transport``, in a fresh lab."""
    if transport not in TRANSPORTS:
        raise BenchError(f"the Debian guest has no {transport!r} variant; choose from {', '.join(TRANSPORTS)}")
    if transport == "sealift":
        return sealift_run(memory_mib, fill_mib)
    with Testbed(tag="slb") as bed:
        bed.add_tap_everywhere(TAP)
        return qemu_run(bed, state, transport, fill_mib)


def saved_state(memory_mib: int) -> SavedState:
    """The Debian image and a booted guest of this size saved (built once, then cached)."""
    return ensure_saved_state(build_debian_image(), GuestShape(memory_mib=memory_mib))


def to_run_result(figures: dict[str, Any], transport: str, cell: Any, repetition: int) -> RunResult:
    """`sealift bench`'s record of one run; a run that lost a write or failed its disk check failed."""
    result = RunResult(transport, cell.backend, cell.memory_mib, cell.workload, cell.mtu, repetition)
    result.detail = {k: figures[k] for k in DETAIL_KEYS if k in figures}
    if figures.get("status") != "completed":
        result.error = str(figures.get("status"))
        return result
    if figures.get("writes_lost") or not figures.get("disk_ok"):
        check = "passed" if figures.get("disk_ok") else "FAILED"
        result.error = f"{figures.get('writes_lost')} acknowledged writes lost, disk check {check}"
    result.total_time_s = round(figures["total_ms"] / 1000, 3)
    result.downtime_ms = figures.get("downtime_ms")
    result.downtime_probe_ms = figures.get("longest_gap_ms")
    result.cpu_s = figures.get("cpu_s")
    result.disk_bytes = int(float(figures.get("disk_mb") or 0) * 1e6)
    result.mirror_ms = figures.get("mirror_ms")
    result.requests_failed = figures.get("failed")
    result.writes_lost = figures.get("writes_lost")
    return result


DETAIL_KEYS = ("fill_s", "from_mirror_ms", "qemu_cpu_s", "writes_acked", "disk_ok")
