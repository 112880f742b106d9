# Long file: one benchmark run end to end (lab, guest, transports, probes, sampling); short functions.
"""The benchmark against the alternatives: one lab, every transport, interleaved runs.

    source ──mig0── attacker ──mig0── destination        (the migration network; bytes counted here)
      br0 ───────── switch ─────────── br0 ── client    (the VM network; the client probes the guest)

A QEMU guest on a tap of the source's br0 is migrated to the destination's
br0 (same tap name, same address); the client probes its UDP service every
5 ms. Baselines that QEMU drives itself run QEMU to QEMU over QMP
(`transports.py`); `sealift` goes through two real agents in the hosts'
namespaces, under a signed order. The built-in VM has no network service:
its runs compare sealift with the agents' plaintext stream only.

Timing, the same for every transport: `total_time_s` runs from the
migration request to the guest running on the destination, including what
the transport does per migration (starting the destination QEMU; the SSH
connection; sealift's handshake, order checks and handover). A standing
IPsec SA is set up before the clock starts, as a VPN between hosts would be.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealift.backends.qemu.image import SERVICE_PORT, GuestImagePaths, build_image, default_cache_dir
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.qmp import last_event_time
from sealift.backends.qemu.vm import QemuVM
from sealift.bench.errors import BenchError
from sealift.bench.prober import GapProber
from sealift.bench.results import ALL_TRANSPORTS, RunResult, fill_ratios, interleaved_schedule
from sealift.bench.sampling import CpuSampler, LinkCounter, Role, find_descendant, find_process
from sealift.bench.sshtunnel import SshServer
from sealift.bench.transports import MIGRATION_PORT, DirectTransport, Hosts, ipsec_available, make_direct
from sealift.lab.netns import enter_netns
from sealift.lab.testbed import DESTINATION_IP, GUEST_IPS, SOURCE_IP, SOURCE_VM_IP, LinkShape, Testbed

log = logging.getLogger(__name__)

ACCEL = "tcg"
TAP = "sbtap0"
VM_NAME = "benchvm"
AGENT_PORT = 7440
UNCAPPED_BPS = 1 << 40  # QEMU's max-bandwidth, bytes/s: lifted, or every transport looks the same
EVENT_WAIT_S = 0.5  # for the destination's RESUME event once it reports running
DOWNTIME_LIMIT_MS = 300  # sealift's default (migration/options.py), given to every QEMU
BOOT_TIMEOUT_S = 240.0
MIGRATION_TIMEOUT_S = 300.0  # default: a migration that has not converged by then is not live in practice
STALL_S = 30.0  # a stream that moves no byte for this long has failed
# Pre-copy converges only while the link carries more than the guest dirties. Once QEMU has measured
# both over a few passes and the guest still dirties at least as fast, waiting for --timeout only
# burns the machine (user-space VPNs here move ~15 MB/s against a guest dirtying 32-128 MiB/s).
NOT_CONVERGING_AFTER_S = 30.0
NOT_CONVERGING_MIN_SYNCS = 3
NOT_CONVERGING_HOLD_S = 15.0  # QEMU's rates swing under TCG: the verdict must hold this long, not one sample

BUILTIN_TRANSPORTS = ("plain", "sealift")  # the built-in VM moves only through the agents
# Migration options per transport that goes through the agents. For the built-in VM "plain" is the
# agents' stream without protection (its only plaintext path); for QEMU it is QEMU to QEMU (transports.py).
AGENT_OPTIONS: dict[str, dict[str, Any]] = {
    "sealift": {"secure": True},
    "qemu-tls": {"secure": True, "transport": "qemu-tls"},  # QEMU's TLS, certificates and orders from sealift
    "sealift-plain": {"secure": False, "transport": "sealift-plain"},  # the agents' stream, no crypto
    "sealift-ipsec": {"secure": True, "transport": "ipsec"},  # QEMU's stream in a per-migration IPsec SA
}
BUILTIN_OPTIONS: dict[str, dict[str, Any]] = {"sealift": {"secure": True}, "plain": {"secure": False}}
# QEMU guest: the workload writes this fraction of guest memory once, then dirties at RATE_MIB MiB/s.
WORKLOAD_FILL = 0.6
RATE_MIB = {"idle": 0, "moderate": 32, "heavy": 128}
BUILTIN_PROFILE = {"idle": "idle", "moderate": "db", "heavy": "stress"}


@dataclass(frozen=True)
class Cell:
    backend: str
    memory_mib: int
    workload: str
    mtu: int
    fill_mib: int | None = None  # QEMU: memory the workload writes (default WORKLOAD_FILL of the guest)
    rate_mib: int | None = None  # QEMU: dirty rate (default RATE_MIB[workload])

    def guest_cmdline(self) -> str:
        fill = self.fill_mib if self.fill_mib is not None else int(self.memory_mib * WORKLOAD_FILL)
        rate = self.rate_mib if self.rate_mib is not None else RATE_MIB[self.workload]
        return f"sealift.mem_mib={fill} sealift.rate_mib={rate}"


@dataclass
class Plan:
    cells: list[Cell]
    transports: list[str]
    repetitions: int = 3
    warmup_s: float = 1.0
    timeout_s: float = MIGRATION_TIMEOUT_S  # per QEMU-driven migration


class BenchLab:
    """The testbed plus everything the runs share: the guest image, sshd, charon, wireguard-go, the agents."""

    def __init__(self, mtu: int = 1500) -> None:
        self.testbed = Testbed(tag="bench", link=LinkShape(mtu=mtu))
        self.workdir = Path(tempfile.mkdtemp(prefix="sl-bench-", dir="/tmp"))
        self.image: GuestImagePaths | None = None
        self.hosts: Hosts | None = None
        self.cluster: Any = None  # LocalCluster, started on first use

    # -- life cycle -----------------------------------------------------------

    def __enter__(self) -> BenchLab:
        try:
            self.testbed.up()
            self.testbed.add_tap_everywhere(TAP)
            self.image = build_image(default_cache_dir())
            self.hosts = Hosts(self.testbed.ns("source"), self.testbed.ns("destination"), workdir=self.workdir)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()
            self.cluster = None
        if self.hosts is not None:
            self.hosts.stop()
        self.testbed.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def set_mtu(self, mtu: int) -> None:
        if self.testbed.link.mtu != mtu:
            self.testbed.shape(LinkShape(mtu=mtu))

    def ns(self, host: str) -> str:
        return self.testbed.ns(host)

    def ssh_server(self) -> SshServer:
        assert self.hosts is not None
        if self.hosts.ssh_server is None:
            self.hosts.ssh_server = SshServer(self.ns("destination"), DESTINATION_IP).start()
        return self.hosts.ssh_server

    def agents(self) -> Any:
        """Two agents in the hosts' namespaces (allow_insecure: the built-in VM's plaintext baseline)."""
        if self.cluster is None:
            from sealift.cluster import LocalCluster

            cluster = LocalCluster(
                allow_insecure=True,
                netns={"host-a": self.ns("source"), "host-b": self.ns("destination")},
                listen={"host-a": (SOURCE_IP, AGENT_PORT), "host-b": (DESTINATION_IP, AGENT_PORT)},
            )
            self.cluster = cluster
            cluster.start()
            warm_guest_image(cluster, "host-b")
        return self.cluster

    # -- measurement helpers ----------------------------------------------------------

    def guest_net(self) -> NetConfig:
        return NetConfig.tap_device(TAP, f"{GUEST_IPS[0]}/24", SOURCE_VM_IP)

    def prober(self) -> GapProber:
        return GapProber(self.ns("client"), (GUEST_IPS[0], SERVICE_PORT))

    def link_counter(self) -> LinkCounter:
        return LinkCounter(self.ns("attacker"), "to-src")


# -- one QEMU run driven over QMP ---------------------------------------------------------


def _wait_booted(vm: QemuVM, prober: GapProber) -> None:
    vm.wait_counter(0, timeout=BOOT_TIMEOUT_S)  # the counter starts once the workload filled its memory
    if not prober.wait_answer(0.0, timeout=30):
        raise BenchError(f"the guest at {prober.address[0]} does not answer probes from the client")


def not_converging(ram: dict[str, Any], elapsed_s: float) -> str | None:
    """Why this pre-copy cannot finish, from QEMU's `query-migrate` ram figures; None while it still may."""
    syncs = int(ram.get("dirty-sync-count", 0))
    if elapsed_s < NOT_CONVERGING_AFTER_S or syncs < NOT_CONVERGING_MIN_SYNCS:
        return None
    dirty_bps = float(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096))
    link_bps = float(ram.get("mbps", 0.0)) * 1e6 / 8
    if dirty_bps < link_bps:
        return None
    return (
        f"not converging: after {elapsed_s:.0f} s and {syncs} passes the guest dirties "
        f"{dirty_bps / 2**20:.1f} MiB/s and the link carries {link_bps / 2**20:.1f} MiB/s"
    )


class ConvergenceWatch:
    """`not_converging` held without a break for NOT_CONVERGING_HOLD_S: a single bad sample is no verdict."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._since: float | None = None

    def update(self, ram: dict[str, Any], now: float) -> str | None:
        verdict = not_converging(ram, now - self._started)
        if verdict is None:
            self._since = None
            return None
        if self._since is None:
            self._since = now
        return verdict if now - self._since >= NOT_CONVERGING_HOLD_S else None


def _wait_completed(vm: QemuVM, timeout_s: float) -> dict[str, Any]:
    """Poll the source until its migration completes; a stream that stops moving, or that can
    never catch up with the guest, fails the run early."""
    started = time.monotonic()
    deadline = started + timeout_s
    watch = ConvergenceWatch(started)
    moved, moved_at = -1, time.monotonic()
    while True:
        info = vm.query_migrate()
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise BenchError(f"QEMU's migration {status}: {info.get('error-desc', 'no reason given')}")
        transferred = int(info.get("ram", {}).get("transferred", 0))
        now = time.monotonic()
        if transferred != moved:
            moved, moved_at = transferred, now
        elif now - moved_at > STALL_S:
            raise BenchError(
                f"QEMU's migration stalled: still {status!r}, {transferred >> 20} MiB sent, "
                f"nothing more for {STALL_S:.0f} s"
            )
        verdict = watch.update(info.get("ram", {}), now)
        if verdict is not None:
            raise BenchError(f"QEMU's migration is {verdict}")
        if now > deadline:
            raise BenchError(
                f"QEMU's migration did not converge: still {status!r} after {timeout_s:.0f} s, "
                f"{transferred >> 20} MiB sent"
            )
        time.sleep(0.01)


def _wait_running(vm: QemuVM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while vm.status() != "running":
        if time.monotonic() > deadline:
            raise BenchError(f"destination QEMU still {vm.status()!r} {timeout:.0f} s after the stream completed")
        time.sleep(0.005)


def _start_qemu(lab: BenchLab, host: str, cell: Cell, vm_dir: Path, incoming: str | None = None) -> QemuVM:
    """The cell's guest (or, with `incoming`, the QEMU that receives it) started in `host`'s namespace."""
    assert lab.image is not None
    with enter_netns(lab.ns(host)):
        return QemuVM.start(
            vm_dir,
            VM_NAME,
            cell.memory_mib,
            lab.image,
            net=lab.guest_net(),
            extra_cmdline=cell.guest_cmdline(),
            accel=ACCEL,
            incoming=incoming,
        )


def run_qemu_direct(
    lab: BenchLab,
    transport: DirectTransport,
    cell: Cell,
    repetition: int,
    warmup_s: float,
    timeout_s: float = MIGRATION_TIMEOUT_S,
) -> RunResult:
    assert lab.hosts is not None and lab.image is not None
    result = RunResult(transport.name, "qemu", cell.memory_mib, cell.workload, cell.mtu, repetition)
    run_dir = Path(tempfile.mkdtemp(prefix="r", dir=lab.workdir))
    vms: list[QemuVM] = []
    prober: GapProber | None = None
    sampler: CpuSampler | None = None
    try:
        source = _start_qemu(lab, "source", cell, run_dir / "s")
        vms.append(source)
        prober = lab.prober()
        _wait_booted(source, prober)
        transport.before_run(lab.hosts)
        time.sleep(warmup_s)
        prober.reset_gap()
        counter = lab.link_counter().start()
        sampler = CpuSampler([Role("qemu-src", source.pid)]).start()
        started = time.monotonic()
        destination = _start_qemu(lab, "destination", cell, run_dir / "d", incoming="defer")
        vms.append(destination)
        sampler.add(Role("qemu-dst", destination.pid))
        destination.migrate_incoming(f"tcp:{transport.listen_host()}:{MIGRATION_PORT}")
        target = transport.source_target(lab.hosts)
        for role in transport.roles():
            sampler.add(role)
        source.set_migration_parameters({"max-bandwidth": UNCAPPED_BPS, "downtime-limit": DOWNTIME_LIMIT_MS})
        source.migrate(f"tcp:{target[0]}:{target[1]}")
        info = _wait_completed(source, timeout_s)
        _wait_running(destination, 30)
        ended = time.monotonic()
        result.total_time_s = round(ended - started, 3)
        figures = sampler.stop()
        sampler = None
        rx, tx = counter.stop()
        crash = _await_guest(prober, ended, lambda: destination.console_tail(80))
        result.downtime_probe_ms = prober.stop() if crash is None else None
        prober = None
        result.detail["guest_crashed"] = crash
        result.qemu_total_ms = info.get("total-time")
        result.qemu_downtime_ms = info.get("downtime")
        result.downtime_ms = result.qemu_downtime_ms
        result.downtime_to_running_ms = stop_to_resume_ms(source, destination)
        _apply_measurements(result, figures, rx, tx, counter.packets)
        result.detail |= {
            "ram_transferred": info.get("ram", {}).get("transferred"),
            "ram_total": info.get("ram", {}).get("total"),
            **transport.detail(),
        }
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        _record_failure(result, exc)
    finally:
        _stop_unfinished(sampler, prober)
        for vm in vms:
            vm.stop_vm(timeout=5)
        try:
            transport.after_run()
        except Exception as exc:  # noqa: BLE001 - a tear-down failure spoils this run, not the benchmark
            result.error = result.error or f"tear-down of {transport.name}: {exc}"
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def stop_to_resume_ms(source: QemuVM, destination: QemuVM) -> float | None:
    """From the source QEMU's STOP event to the destination's RESUME, by QEMU's own timestamps.

    Both QEMUs run on this machine (namespaces share its clock). None if an
    event is missing (QMP keeps the recent ones only).
    """
    stopped = last_event_time(source.recent_events(), "STOP")
    resumed = last_event_time(destination.recent_events(), "RESUME")
    deadline = time.monotonic() + EVENT_WAIT_S
    while resumed is None and time.monotonic() < deadline:  # QMP delivers the event a moment after the state
        destination.wait_event(0.01)
        resumed = last_event_time(destination.recent_events(), "RESUME")
    if stopped is None or resumed is None or resumed < stopped:
        return None
    return round((resumed - stopped) * 1000.0, 1)


def _stop_unfinished(sampler: CpuSampler | None, prober: GapProber | None) -> None:
    """Stop what a run left running when it failed (a run that got through stopped both and set them to None)."""
    if sampler is not None:
        sampler.stop()
    if prober is not None:
        prober.stop()


def _record_failure(result: RunResult, exc: Exception) -> None:
    log.info("run %s %s %d MiB failed: %s", result.transport, result.backend, result.memory_mib, exc)
    result.error = f"{type(exc).__name__}: {exc}"


def _await_guest(
    prober: GapProber, after: float, console: Callable[[], list[str]], timeout: float = 20.0
) -> str | None:
    """Wait for the guest's first answer from the destination: None, or the reason its kernel died.

    QEMU 7.2 under TCG lost guest writes during migrations (every transport, also QEMU to QEMU over a
    unix socket) until backends/qemu/vm.py padded the RAM size; the destination's kernel then panicked
    at once. Should that happen again, the migration's figures stand, the probed downtime does not
    exist, and the run says so.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prober.wait_answer(after, timeout=0.5):
            time.sleep(0.2)  # answers after the switchover close the gap
            return None
        lines = console()
        reasons = [line.strip() for line in lines if "panic" in line or "BUG" in line]
        if any("Kernel panic" in line for line in reasons):
            return " | ".join(reasons[:2])
    raise BenchError(
        f"the guest does not answer probes on the destination after the migration "
        f"(console: {' | '.join(console()[-3:])})"
    )


def _apply_measurements(result: RunResult, figures: Any, rx: int, tx: int, packets: int) -> None:
    """What every run measures: the bytes on the link each way, and the CPU it took."""
    result.bytes = rx + tx
    result.cpu_s = figures.cpu_s
    result.peak_cpu_pct = figures.peak_pct
    result.machine_cpu_s = figures.machine_cpu_s
    result.cpu_by_role = figures.by_role
    result.peak_by_role = figures.peak_by_role
    result.detail |= {"bytes_to_destination": rx, "bytes_to_source": tx, "packets": packets}


# -- runs through the sealift agents ----------------------------------------------------------


def _agent_roles(cluster: Any, vm_root: Path, backend: str, transport: str) -> list[Role]:
    """Each side's QEMU (or built-in guest process), found by its VM directory, and both agents."""
    roles = []
    label, comm = ("qemu", "qemu-system") if backend == "qemu" else ("guest", "python")
    for host, side in (("host-a", "src"), ("host-b", "dst")):
        vm_dir = str(vm_root / host)
        roles.append(Role(f"{label}-{side}", finder=functools.partial(find_process, vm_dir, comm)))
    for host, side in (("host-a", "src"), ("host-b", "dst")):
        process = cluster.agents[host].process
        roles.append(Role(f"agent-{side}", process.pid if process else None))
        if transport == "sealift-ipsec" and process is not None:
            # The agent starts charon on its first ipsec migration, as its child.
            roles.append(Role(f"charon-{side}", finder=functools.partial(find_descendant, process.pid, "charon")))
    return roles


def _stop_everywhere(cluster: Any, name: str) -> None:
    for host in ("host-a", "host-b"):
        try:
            client = cluster.client(host)
            if name in [v["name"] for v in client.request("vm.list")["vms"]]:
                client.request("vm.stop", name=name)
        except Exception as exc:  # noqa: BLE001 - tear-down goes on; kill_guests_under is the backstop
            log.warning("could not stop %s on %s: %s", name, host, exc)


def _start_qemu_for_agent(lab: BenchLab, cell: Cell) -> None:
    """Start the guest (on the lab's tap) in host-a's agent VM directory, then (re)start host-a's agent,
    which adopts it: the control API starts QEMU guests on user networking only."""
    from sealift.backends.qemu.registry import QemuVmRegistry
    from sealift.host.config import load_config

    cluster = lab.agents()
    cluster.kill("host-a", signal.SIGTERM)
    registry = QemuVmRegistry(load_config(cluster.agents["host-a"].config_path))
    with enter_netns(lab.ns("source")):
        vm = registry.start(VM_NAME, cell.memory_mib, cell.guest_cmdline(), net=lab.guest_net())
    vm.close()  # QMP takes one client: the agent's
    cluster.start("host-a")
    warm_guest_image(cluster, "host-a")


def warm_guest_image(cluster: Any, host: str) -> None:
    """Have an agent look up the guest image now, not inside the timed migration.

    A fresh agent finds the cached image on first use (hashing its inputs takes ~1.2 s here) and keeps
    it; a long-running agent has done so long before. A QEMU start request too small to boot (under
    QEMU's 96 MiB minimum) makes it look the image up and then fail, starting nothing.
    """
    from sealift.agent.client import AgentRequestFailed

    try:
        cluster.client(host).request("vm.start", name="bench-warmup", backend="qemu", memory="1M")
    except AgentRequestFailed:
        pass


def run_through_agents(
    lab: BenchLab, transport: str, cell: Cell, repetition: int, warmup_s: float, timeout_s: float = MIGRATION_TIMEOUT_S
) -> RunResult:
    result = RunResult(transport, cell.backend, cell.memory_mib, cell.workload, cell.mtu, repetition)
    cluster = lab.agents()
    prober: GapProber | None = None
    sampler: CpuSampler | None = None
    options = dict((AGENT_OPTIONS if cell.backend == "qemu" else BUILTIN_OPTIONS)[transport])
    if cell.backend == "qemu":  # the agents give up a pre-copy that runs past --timeout (the built-in VM always ends)
        options["completion_timeout_s"] = timeout_s
    try:
        if cell.backend == "qemu":
            _start_qemu_for_agent(lab, cell)
            prober = lab.prober()
            _wait_agent_guest(cluster, prober)
        else:
            cluster.client("host-a").request(
                "vm.start",
                name=VM_NAME,
                memory=f"{cell.memory_mib}M",
                workload=BUILTIN_PROFILE[cell.workload],
                fill_fraction=WORKLOAD_FILL,
            )
        time.sleep(warmup_s)
        if prober is not None:
            prober.reset_gap()
        counter = lab.link_counter().start()
        sampler = CpuSampler(_agent_roles(cluster, cluster.vm_root, cell.backend, transport)).start()
        started = time.monotonic()
        report = cluster.migrate(VM_NAME, "host-a", "host-b", options=options)
        ended = time.monotonic()
        figures = sampler.stop()
        sampler = None
        rx, tx = counter.stop()
        if prober is not None:
            # The running receipt can reach us a little after the guest's first answer: look back a bit.
            crash = _await_guest(
                prober,
                ended - 0.05,
                lambda: cluster.client("host-b").request("vm.console", name=VM_NAME, lines=80)["lines"],
            )
            result.downtime_probe_ms = prober.stop() if crash is None else None
            prober = None
            result.detail["guest_crashed"] = crash
        if report.get("status", "completed") != "completed":
            raise BenchError(f"migration ended {report.get('status')}: {report.get('error')}")
        result.total_time_s = round(float(report["total_time_s"]), 3)
        result.downtime_ms = round(float(report["downtime_ms"]), 1)
        result.downtime_to_running_ms = result.downtime_ms  # the agent counts from QEMU's STOP to the running receipt
        result.qemu_total_ms, result.qemu_downtime_ms = _qemu_figures(report)
        _apply_measurements(result, figures, rx, tx, counter.packets)
        result.detail |= {
            "wall_s": round(ended - started, 3),
            "report_transport": report.get("transport"),
            "rounds": report.get("rounds"),
            "bytes_sent": report.get("bytes_sent"),
            "stop_reason": report.get("stop_reason"),
            "downtime_breakdown_ms": report.get("downtime_breakdown_ms"),
        }
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        _record_failure(result, exc)
    finally:
        _stop_unfinished(sampler, prober)
        _stop_everywhere(cluster, VM_NAME)
    return result


def _wait_agent_guest(cluster: Any, prober: GapProber) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while (cluster.client("host-a").request("vm.info", name=VM_NAME)["vm"].get("counter") or 0) <= 0:
        if time.monotonic() > deadline:
            raise BenchError(f"the guest did not boot within {BOOT_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    if not prober.wait_answer(0.0, timeout=30):
        raise BenchError("the guest does not answer probes from the client")


def _qemu_figures(report: dict[str, Any]) -> tuple[float | None, float | None]:
    """QEMU's own total time and downtime, which the agent puts in the report's stop reason."""
    reason = str(report.get("stop_reason", ""))
    total = re.search(r"total (\d+) ms", reason)
    downtime = re.search(r"downtime (\d+) ms", reason)
    return (float(total.group(1)) if total else None, float(downtime.group(1)) if downtime else None)


def agent_qemu_transports() -> tuple[str, ...]:
    from sealift.backends.qemu.transports import TRANSPORTS

    return tuple(TRANSPORTS)


# -- the schedule ---------------------------------------------------------------------------------


def available_transports(requested: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The requested transports that can run here, and why the others cannot."""
    skipped: dict[str, str] = {}
    chosen = []
    for name in requested:
        if name not in ALL_TRANSPORTS:
            raise BenchError(f"unknown transport {name!r}; choose from {', '.join(ALL_TRANSPORTS)}")
        reason = ipsec_available() if name == "ipsec" else None
        if name == "wireguard" and shutil.which("wireguard-go") is None:
            reason = "wireguard-go is not installed (Debian package wireguard-go)"
        agent_transport = AGENT_OPTIONS.get(name, {}).get("transport")
        if agent_transport is not None and agent_transport not in agent_qemu_transports():
            reason = f"the agents here have no {agent_transport!r} transport for QEMU guests"
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped


@dataclass
class BenchOutcome:
    runs: list[RunResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def run_plan(
    plan: Plan, progress: Callable[[str], None] | None = None, on_run: Callable[[list[RunResult]], None] | None = None
) -> BenchOutcome:
    """Every cell, every repetition, every transport in the plan's order; ratios filled at the end.
    `on_run` sees the runs so far after each one (a full benchmark takes hours: save as you go)."""
    say = progress or (lambda text: None)
    outcome = BenchOutcome()
    transports, outcome.skipped = available_transports(plan.transports)
    for name, reason in outcome.skipped.items():
        say(f"skipping {name}: {reason}")
    if "ipsec" in transports and "sealift-ipsec" in transports:
        raise BenchError(
            "ipsec and sealift-ipsec cannot share a run: each runs its own strongSwan charon on the "
            "same hosts (IKE ports, libipsec's TUN and routing table); benchmark them separately"
        )

    def record(result: RunResult) -> None:
        say(_progress_line(result))
        outcome.runs.append(result)
        if on_run is not None:
            on_run(outcome.runs)

    debian = [c for c in plan.cells if c.backend == "debian"]
    if debian:
        _run_debian_cells(debian, transports, plan.repetitions, say, record)
    cells = sorted((c for c in plan.cells if c.backend != "debian"), key=lambda c: c.mtu)  # one MTU change each
    if not cells:
        fill_ratios(outcome.runs)
        return outcome
    with BenchLab(mtu=cells[0].mtu) as lab:
        for cell in cells:
            lab.set_mtu(cell.mtu)
            cell_transports = [t for t in transports if cell.backend == "qemu" or t in BUILTIN_TRANSPORTS]
            if "ssh" in cell_transports or "ssh-aesgcm" in cell_transports:
                lab.ssh_server()
            for _, rep, name in interleaved_schedule([cell], cell_transports, plan.repetitions):
                record(_run_one(lab, name, cell, rep, plan))
    fill_ratios(outcome.runs)
    return outcome


def _run_debian_cells(
    cells: Sequence[Cell],
    transports: Sequence[str],
    repetitions: int,
    say: Callable[[str], None],
    record: Callable[[RunResult], None],
) -> None:
    """The Debian guest with its disk under a client: each run builds its own lab (bench/debian.py)."""
    from sealift.bench import debian

    chosen = [t for t in transports if t in debian.TRANSPORTS]
    for name in transports:
        if name not in debian.TRANSPORTS:
            say(f"skipping {name} for the Debian guest: its disk row has {', '.join(debian.TRANSPORTS)}")
    for cell in cells:
        state = debian.saved_state(cell.memory_mib)
        for _, rep, name in interleaved_schedule([cell], chosen, repetitions):
            try:
                figures = debian.run_debian(name, state, cell.memory_mib, cell.fill_mib or 0)
            except Exception as exc:  # noqa: BLE001 - a failed run is a result: it is recorded, the rest go on
                figures = {"status": f"error: {exc}"[:300]}
            record(debian.to_run_result(figures, name, cell, rep))


def _run_one(lab: BenchLab, name: str, cell: Cell, rep: int, plan: Plan) -> RunResult:
    if cell.backend == "qemu" and name not in AGENT_OPTIONS:
        return run_qemu_direct(lab, make_direct(name), cell, rep, plan.warmup_s, plan.timeout_s)
    return run_through_agents(lab, name, cell, rep, plan.warmup_s, plan.timeout_s)


def _progress_line(r: RunResult) -> str:
    head = f"{r.backend} {r.memory_mib}M {r.workload} mtu {r.mtu} #{r.repetition} {r.transport:10s}"
    if r.error:
        return f"{head} FAILED: {r.error}"
    probe = f", probed {r.downtime_probe_ms:.0f} ms" if r.downtime_probe_ms is not None else ""
    if r.detail.get("guest_crashed"):
        probe = f", guest crashed after the switchover ({r.detail['guest_crashed']})"
    if r.disk_bytes is not None:  # a guest with a disk and clients: no link counter, no CPU sampler
        return (
            f"{head} total {r.total_time_s:.2f} s, downtime {r.downtime_ms or 0:.0f} ms, client's longest gap "
            f"{r.downtime_probe_ms or 0:.0f} ms, disk {r.disk_bytes / 1e6:.0f} MB "
            f"in {(r.mirror_ms or 0) / 1000:.1f} s, "
            f"{r.requests_failed} failed requests, {r.writes_lost} writes lost, CPU {r.cpu_s or 0:.2f} s"
        )
    return (
        f"{head} total {r.total_time_s:.2f} s, downtime {r.downtime_ms or 0:.0f} ms{probe}, "
        f"{(r.bytes or 0) / 2**20:.0f} MiB, CPU {r.cpu_s:.2f} s (peak {r.peak_cpu_pct:.0f}%)"
    )
