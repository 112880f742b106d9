"""The lab's world for one run: the testbed, agents, guests, relays, captures and migrations an attack uses.

`LabSession` is what every attack (sealift.lab.attacks) gets; the runner
(sealift.lab.runner.LabRun) is a LabSession that also runs the attacks. Its
API is stable; attacks should need nothing else:

    with LabSession(out_dir=Path("lab-results")) as lab:  # builds the testbed (root)
        lab.testbed            # Testbed: namespaces source/destination/attacker/client/switch
        lab.results_dir        # Path: this run's folder, lab-results/<UTC timestamp>/ (pcaps,
                               # results.md/json, agent-logs/<cluster>-<host>.log, errors)
        lab.say("message")     # progress line (to stderr, via the runner's callback)
        lab.quick              # bool: run a covering subset of many-scenario attacks (CI, --quick)

        cluster = lab.cluster("builtin")            # fresh agents host-a (source ns) and
                                                    # host-b (destination ns), fresh ports, started;
                                                    # stopped when the attack ends (clusters, relays
                                                    # and captures all live for one attack)
        cluster = lab.cluster("builtin", insecure=True)   # allow_insecure = true on both agents
        cluster = lab.cluster("qemu", via=relay)    # host-a reaches host-b through `relay`
                                                    # (relay.target is set to host-b if unset)
        cluster = lab.cluster("qemu", via={("host-b", "host-a"): relay2, ...})   # any direction
        cluster = lab.cluster(..., hosts=("host-a", "host-b", "host-c"))
                                                    # host-c: a third agent with a valid
                                                    # certificate, in the attacker's namespace
        cluster = lab.cluster(..., extra_config="max_incoming = 1", host_config={"host-b": "..."},
                              start=False)          # TOML lines; start=False: call cluster.start()
        lab.finish(cluster)                         # stop it (agents, guests) before the attack ends

        vm = lab.start_vm(cluster, "host-a", "vm1", backend)   # built-in 64 MiB db workload, or a
                                                    # QEMU guest (160 MiB) on a tap on the VM network
                                                    # with an address from GUEST_IPS, booted (answers the
                                                    # client); returns vm.info. workload= idle|web|db|stress
                                                    # (QEMU: mapped to its dirty rate), memory="32M"
        lab.probe(vm)                               # QEMU: the guest's counter over UDP 7777 from
                                                    # the client namespace (None if no answer)
        lab.running_copies(cluster, "vm1") -> int   # running, un-paused copies on all agents
        lab.copies(cluster, "vm1") -> dict          # host -> "running" | "paused" | ... (evidence)

        relay = lab.relay()                         # Relay in the attacker namespace, on the
        relay = lab.relay(target)                   # attacker's source-side address
        capture = lab.capture("t1-plain")           # tshark on attacker's to-src, started, into
                                                    # results_dir/t1-plain.pcap; capture.stop() -> Path

        report = lab.migrate(cluster, "vm1")        # the `sealift migrate` control call under a
                                                    # freshly signed order: report dict, or raises
                                                    # MigrationFailed(error text)
        report = lab.migrate(cluster, "vm1", {"secure": False}, source="host-a", destination="host-b",
                             order=None, transport=None, on_event=callback)
                                                    # transport (QEMU): sealift|qemu-tls|plain|sealift-plain
        running = lab.migrate_in_background(cluster, "vm1", options)  # -> BackgroundMigration:
                                                    # .events, .wait(timeout) -> report | raises,
                                                    # .error, .report, .done()
        lab.wait_for(predicate, timeout=20, what="...")          # poll; raises TimeoutError(what)
        lab.secure_options(backend) / lab.plain_options(backend) # option dicts for migrate()

A built-in guest's memory can be checked from inside (`vm.check`); a QEMU
guest's only through its counter and its probe service.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, Self

from sealift.agent.client import AgentRequestFailed, AgentUnavailable
from sealift.backends.libvirt.lab import LibvirtLabHost, define_test_domain
from sealift.cluster import LocalCluster
from sealift.errors import SealiftError
from sealift.lab.capture import Capture
from sealift.lab.relay import Relay
from sealift.lab.testbed import (
    ATTACKER_SOURCE_SIDE_IP,
    GUEST_IPS,
    SOURCE_VM_IP,
    VM_PREFIX,
    LinkShape,
    Testbed,
)

__all__ = ["Backend", "BackgroundMigration", "LabSession", "MigrationFailed", "BUILTIN_MEMORY", "QEMU_MEMORY"]

Backend = Literal["builtin", "qemu", "libvirt"]


class _Closable(Protocol):
    """What the run closes at the end of an attack: its relays (an attack may add a tunnel of its own)."""

    def close(self) -> None: ...


BUILTIN_MEMORY = "64M"
QEMU_MEMORY = "160M"
GUEST_SERVICE_PORT = 7777
QEMU_BOOT_TIMEOUT_S = 90.0
LIBVIRT_MEMORY_MIB = 96  # the test guest as a libvirt domain, with a 32 MiB qcow2 disk
# The QEMU guest's workload (kernel arguments of guest/workload.c) for the built-in profile names.
QEMU_WORKLOADS = {
    "idle": "sealift.mem_mib=16 sealift.rate_mib=0",
    "web": "sealift.mem_mib=32 sealift.rate_mib=4",
    "db": "sealift.mem_mib=48 sealift.rate_mib=8",
    "stress": "sealift.mem_mib=96 sealift.rate_mib=64",
    # Outruns a 16 MiB/s link fourfold (never converges in pre-copy): the post-copy rows (attacks/postcopy.py).
    "postcopy": "sealift.mem_mib=32 sealift.rate_mib=64",
    # The busybox guest's disk writer: numbered 4 KiB records on /dev/vda from block 8192, each fsync'd.
    "disk": "sealift.mem_mib=16 sealift.rate_mib=4 sealift.disk=write",
}
FIRST_PORT = 7400
# Short deadlines keep every attack bounded: a silent peer is dead after 8 s.
LAB_AGENT_CONFIG = {
    "step_timeout_s": "8",
    "resolve_interval_s": "0.5",
    "handshake_timeout_s": "5",
}
# A destination QEMU (TCG) can take seconds to start on a loaded machine.
QEMU_AGENT_CONFIG = {"step_timeout_s": "20"}
HOST_NAMESPACES = {"host-a": "source", "host-b": "destination", "host-c": "attacker"}


class MigrationFailed(SealiftError):
    """The agent refused or aborted the migration; str() is its error message."""

    code = "lab_migration_failed"


@dataclass
class BackgroundMigration:
    """A migration running in a thread (for attacks that strike during one)."""

    events: list[dict] = field(default_factory=list)
    report: dict | None = None
    error: str | None = None
    _thread: threading.Thread | None = None

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def saw(self, predicate: Callable[[dict], bool]) -> bool:
        return any(predicate(event) for event in list(self.events))

    def wait(self, timeout: float = 60.0) -> dict:
        """The report, or MigrationFailed; TimeoutError if still running after `timeout`."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the migration did not end within {timeout:.0f} s")
        if self.error is not None:
            raise MigrationFailed(self.error)
        assert self.report is not None
        return self.report


class LabSession:
    """The lab's namespaces and what an attack uses in them; see the module docstring for the API."""

    def __init__(
        self,
        out_dir: Path | str = "lab-results",
        *,
        keep: bool = False,
        quick: bool = False,
        link: LinkShape | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.results_dir = _fresh_dir(Path(out_dir) / stamp)
        self.keep = keep  # keep the clusters' directories (logs, state) under results_dir/clusters
        self.quick = quick  # attacks with many scenarios run a covering subset (CI)
        self.testbed = Testbed(tag=secrets.token_hex(3)[:6], link=link or LinkShape())
        self._say = say or (lambda message: None)
        self._ports = itertools.count(FIRST_PORT)
        self._guest_ips = iter(GUEST_IPS)
        self._taps = itertools.count(0)
        self._clusters: list[LocalCluster] = []
        self._relays: list[_Closable] = []
        self._captures: list[Capture] = []
        # libvirt: one libvirtd per host of each cluster, in the host's namespace (backends/libvirt/lab.py)
        self._libvirt_hosts: dict[str, list[LibvirtLabHost]] = {}

    # -- life cycle ---------------------------------------------------------------

    def __enter__(self) -> Self:
        self.testbed.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop captures, relays and agents (and their guests), then remove the testbed."""
        for capture in self._captures:
            _quietly(capture.stop)
        for relay in self._relays:
            _quietly(relay.close)
        for cluster in self._clusters:
            self._finish_cluster(cluster)
        self._captures, self._relays, self._clusters = [], [], []
        self.testbed.down()

    def _finish_cluster(self, cluster: LocalCluster) -> None:
        _quietly(cluster.stop)
        for lab_host in self._libvirt_hosts.pop(str(cluster.root), []):
            _quietly(lab_host.stop)
            shutil.rmtree(lab_host.root.parent, ignore_errors=True)  # the run's /tmp/slv-lab-* folder
        # The agents' logs are small and explain any failed result: always kept.
        logs = self.results_dir / "agent-logs"
        for host, agent in cluster.agents.items():
            if agent.log_path.exists():
                logs.mkdir(exist_ok=True)
                _quietly(shutil.copyfile, agent.log_path, logs / f"{cluster.root.name}-{host}.log")
        if self.keep:
            _quietly(
                shutil.copytree, cluster.root, self.results_dir / "clusters" / cluster.root.name, dirs_exist_ok=True
            )
        _quietly(cluster.cleanup)

    def end_attack(self) -> None:
        """Stop the clusters, relays and captures the attack that just ran used: each attack gets fresh ones."""
        for cluster in self._clusters:
            self._finish_cluster(cluster)
        for relay in self._relays:
            _quietly(relay.close)
        for capture in self._captures:
            _quietly(capture.stop)
        self._clusters, self._relays, self._captures = [], [], []

    def say(self, message: str) -> None:
        self._say(message)

    # -- agents --------------------------------------------------------------------

    def cluster(
        self,
        backend: Backend,
        insecure: bool = False,
        extra_config: str = "",
        host_config: dict[str, str] | None = None,
        *,
        via: Relay | dict[tuple[str, str], Relay] | None = None,
        hosts: tuple[str, ...] = ("host-a", "host-b"),
        start: bool = True,
    ) -> LocalCluster:
        """Fresh agents in the lab's namespaces, listening on the migration addresses."""
        unknown = [h for h in hosts if h not in HOST_NAMESPACES]
        if unknown:
            raise ValueError(f"lab hosts are {tuple(HOST_NAMESPACES)}, not {unknown}")
        addresses = {host: (self._host_ip(host), next(self._ports)) for host in hosts}
        relays = {("host-a", "host-b"): via} if isinstance(via, Relay) else dict(via or {})
        routes: dict[tuple[str, str], tuple[str, int]] = {}
        for (from_host, to_host), relay in relays.items():
            routes[(from_host, to_host)] = relay.address
            if relay.target is None:
                relay.target = addresses[to_host]
        host_config = dict(host_config or {})
        libvirt_hosts = self._start_libvirt_hosts(hosts, host_config) if backend == "libvirt" else []
        cluster = LocalCluster(
            hosts=hosts,
            allow_insecure=insecure,
            extra_config=_with_lab_defaults(extra_config, backend),
            host_config=host_config,
            peer_routes=routes,
            netns={host: self.testbed.ns(HOST_NAMESPACES[host]) for host in hosts},
            listen=addresses,
        )
        self._clusters.append(cluster)
        self._libvirt_hosts[str(cluster.root)] = libvirt_hosts
        if start:
            cluster.start()
        return cluster

    def _start_libvirt_hosts(self, hosts: tuple[str, ...], host_config: dict[str, str]) -> list[LibvirtLabHost]:
        """A libvirtd per host in the host's network namespace; its [libvirt] table goes into host_config."""
        root = Path(tempfile.mkdtemp(prefix="slv-lab-", dir="/tmp"))  # short: unix socket paths are limited
        started: list[LibvirtLabHost] = []
        try:
            for host in hosts:
                lab_host = LibvirtLabHost(host, root / host, netns=self.testbed.ns(HOST_NAMESPACES[host]))
                lab_host.start()
                started.append(lab_host)
                # Dotted keys, not a [libvirt] header: the top-level keys LocalCluster writes after stay top-level.
                table = "".join(f'libvirt.{key} = "{value}"\n' for key, value in lab_host.agent_settings().items())
                host_config[host] = host_config.get(host, "") + "\n" + table
        except BaseException:
            for lab_host in started:
                _quietly(lab_host.stop)
            raise
        return started

    def libvirt_host(self, cluster: LocalCluster, host: str) -> LibvirtLabHost:
        return next(h for h in self._libvirt_hosts[str(cluster.root)] if h.name == host)

    def finish(self, cluster: LocalCluster) -> None:
        """Stop a cluster's agents and guests now rather than at the end of the attack."""
        if cluster in self._clusters:
            self._clusters.remove(cluster)
            self._finish_cluster(cluster)

    def _host_ip(self, host: str) -> str:
        return {
            "host-a": self.testbed.source_ip,
            "host-b": self.testbed.destination_ip,
            "host-c": ATTACKER_SOURCE_SIDE_IP,
        }[host]

    # -- guests --------------------------------------------------------------------

    def start_vm(
        self,
        cluster: LocalCluster,
        host: str,
        name: str,
        backend: Backend,
        workload: str = "db",
        memory: str | None = None,
        disks: list[str] | None = None,
    ) -> dict:
        """Start a guest on `host` (QEMU: with these disks, `PATH[,shared]`); returns its vm.info."""
        client = cluster.client(host)
        if backend == "builtin":
            vm = client.request("vm.start", name=name, memory=memory or BUILTIN_MEMORY, workload=workload)["vm"]
            time.sleep(0.3)  # the workload writes its secret and starts counting
            return vm
        if backend == "libvirt":
            define_test_domain(self.libvirt_host(cluster, host), name, memory_mib=LIBVIRT_MEMORY_MIB)
            self.wait_for(
                lambda: (client.request("vm.info", name=name)["vm"].get("counter") or 0) > 0,
                QEMU_BOOT_TIMEOUT_S,
                f"libvirt domain {name} counting on its console",
            )
            return client.request("vm.info", name=name)["vm"]
        tap = f"lt{next(self._taps)}"
        self.testbed.add_tap_everywhere(tap)  # the destination's QEMU finds the same tap on its br0
        guest_ip = next(self._guest_ips)
        net = {"mode": "tap", "tap": tap, "guest_ip": f"{guest_ip}/{VM_PREFIX}", "gateway": SOURCE_VM_IP}
        vm = client.request(
            "vm.start",
            name=name,
            backend="qemu",
            memory=memory or QEMU_MEMORY,
            net=net,
            cmdline=QEMU_WORKLOADS.get(workload, QEMU_WORKLOADS["db"]),
            disks=disks or [],
        )["vm"]
        # Booted when its workload answers the client across the VM network.
        self.wait_for(
            lambda: self.probe(vm, timeout=0.5) is not None,
            QEMU_BOOT_TIMEOUT_S,
            f"QEMU guest {name} answering on {guest_ip}:{GUEST_SERVICE_PORT}",
        )
        return client.request("vm.info", name=name)["vm"]

    def probe(self, vm: dict, timeout: float = 2.0) -> int | None:
        """A QEMU guest's counter, asked over UDP from the client namespace (None: no answer)."""
        net = vm.get("net") or {}
        if net.get("mode") != "tap":
            return None
        address = str(net["guest_ip"]).split("/")[0]
        return _probe_from(self.testbed, address, timeout)

    def copies(self, cluster: LocalCluster, vm: str) -> dict[str, str]:
        """Where `vm` exists and in what state: host -> running | paused | exited | agent-down:N."""
        states: dict[str, str] = {}
        for host in cluster.agents:
            try:
                infos = cluster.client(host).request("vm.list")["vms"]
            except (AgentUnavailable, AgentRequestFailed, OSError):
                processes = _guest_processes(cluster.vm_root / host, vm)
                if processes:
                    states[host] = f"agent-down:{processes}"
                continue
            for info in infos:
                if info.get("name") == vm:
                    states[host] = _state(info)
        return states

    def running_copies(self, cluster: LocalCluster, vm: str) -> int:
        """Running, un-paused copies of `vm` across the cluster's agents.

        An agent that is down cannot be asked: its live guest processes for
        `vm` are counted instead (conservatively, as running).
        """
        count = 0
        for state in self.copies(cluster, vm).values():
            if state == "running":
                count += 1
            elif state.startswith("agent-down:"):
                count += int(state.split(":")[1])
        return count

    # -- the attacker's tools ------------------------------------------------------------

    def relay(self, target: tuple[str, int] | None = None) -> Relay:
        """A relay in the attacker's namespace, listening on its source-side address."""
        relay = Relay((ATTACKER_SOURCE_SIDE_IP, 0), netns=self.testbed.ns("attacker"))
        relay.target = target
        self._relays.append(relay)
        return relay

    def capture(self, name: str) -> Capture:
        """tshark on the attacker's link to the source, into results_dir/<name>.pcap (started)."""
        capture = Capture(self.testbed.ns("attacker"), "to-src", self.results_dir / f"{name}.pcap")
        capture.start()
        self._captures.append(capture)
        return capture

    # -- migrations --------------------------------------------------------------------

    @staticmethod
    def secure_options(backend: Backend) -> dict[str, object]:
        return {"secure": True}

    @staticmethod
    def plain_options(backend: Backend) -> dict[str, object]:
        return {"secure": False}

    def migrate(
        self,
        cluster: LocalCluster,
        vm: str,
        options: dict | None = None,
        *,
        source: str = "host-a",
        destination: str = "host-b",
        order: str | None = None,
        transport: str | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> dict:
        """Run `sealift migrate` through the source's control API; the report, or MigrationFailed."""
        options = dict(options or {})
        if transport is not None:  # QEMU guests: sealift, qemu-tls, plain, sealift-plain
            options["transport"] = transport
        request: dict[str, object] = {
            "vm": vm,
            "to": destination,
            "options": options,
            "order": order if order is not None else cluster.order(vm, source, destination),
        }
        try:
            report = cluster.client(source).request("migrate", on_event=on_event, **request)["report"]
        except (AgentRequestFailed, AgentUnavailable) as exc:
            raise MigrationFailed(str(exc)) from None
        if report.get("status") != "completed":
            raise MigrationFailed(f"migration ended {report.get('status')!r}: {report.get('error', '')}")
        return report

    def migrate_in_background(
        self, cluster: LocalCluster, vm: str, options: dict | None = None, **kwargs: object
    ) -> BackgroundMigration:
        running = BackgroundMigration()

        def target() -> None:
            try:
                running.report = self.migrate(cluster, vm, options, on_event=running.events.append, **kwargs)  # type: ignore[arg-type]  # migrate's keywords
            except MigrationFailed as exc:
                running.error = str(exc)
            except Exception as exc:  # reported, never lost
                running.error = f"{type(exc).__name__}: {exc}"

        running._thread = threading.Thread(target=target, name=f"lab-migrate-{vm}", daemon=True)
        running._thread.start()
        return running

    @staticmethod
    def wait_for(
        predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout:.0f} s")
            time.sleep(interval)


# -- helpers -------------------------------------------------------------------------


def _fresh_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def _with_lab_defaults(extra_config: str, backend: str) -> str:
    """The lab's short deadlines, unless the attack sets the same key itself."""
    given = {line.split("=", 1)[0].strip() for line in extra_config.splitlines() if "=" in line}
    lab_config = {**LAB_AGENT_CONFIG, **(QEMU_AGENT_CONFIG if backend == "qemu" else {})}
    defaults = [f"{key} = {value}" for key, value in lab_config.items() if key not in given]
    return "\n".join(defaults + [extra_config])


def _state(info: dict) -> str:
    if not info.get("alive", True):
        return "exited"
    status = info.get("status")  # QEMU's run state: "running", "paused", "inmigrate", "guest-panicked", ...
    if status is not None:
        return str(status)
    return "paused" if info.get("paused") else "running"


def _guest_processes(directory: Path, vm: str) -> int:
    """Live, not stopped guest processes of `vm` under `directory` (an agent's VM folder)."""
    needle = str(directory).encode()
    marker = f"/{vm}.".encode()
    count = 0
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
            stat = (pid_dir / "stat").read_text()
        except OSError:
            continue
        is_guest = b"sealift.backends.builtin.guest" in cmdline or b"qemu-system" in cmdline
        state = stat.rsplit(")", 1)[-1].split()[0]
        if is_guest and needle in cmdline and marker in cmdline and state not in ("T", "Z"):
            count += 1
    return count


def _probe_from(testbed: Testbed, address: str, timeout: float) -> int | None:
    from sealift.backends.qemu.vm import probe_udp
    from sealift.lab.netns import enter_netns

    with enter_netns(testbed.ns("client")):
        return probe_udp((address, GUEST_SERVICE_PORT), timeout)


def _quietly(fn: Callable, *args: object, **kwargs: object) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:  # tear-down goes on regardless
        pass
