"""A cluster of real agents on this machine: CA, host certificates, configs, processes.

Used by `sealift demo`, the integration tests and the benchmarks, so that all
three exercise exactly what an operator runs: separate agent processes that
talk over real sockets with real certificates.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealift.agent.client import AgentClient, AgentUnavailable
from sealift.lab.netns import netns_argv
from sealift.security.identity import ClusterCA
from sealift.security.operators import OperatorIdentity
from sealift.security.orders import create_order

OPERATOR = "ops-admin"

SHM_ROOT = Path("/dev/shm")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class AgentProcess:
    name: str
    config_path: Path
    socket_path: Path
    listen: tuple[str, int]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.socket_path)


@dataclass
class LocalCluster:
    """Agents named host-a, host-b, ... on 127.0.0.1, in a fresh directory."""

    hosts: tuple[str, ...] = ("host-a", "host-b")
    allow_insecure: bool = False
    extra_config: str = ""
    # (from_host, to_host) -> address: route one agent's traffic to a peer
    # through something in the path (the tests' relay, the lab's attacker).
    peer_routes: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    capacity: str = "16G"  # each host's registered capacity in the cluster inventory
    host_config: dict[str, str] = field(default_factory=dict)  # extra TOML lines for one host
    # The lab: run a host's agent inside a network namespace, listening on that
    # host's address there (host -> namespace, host -> (ip, port)).
    netns: dict[str, str] = field(default_factory=dict)
    listen: dict[str, tuple[str, int]] = field(default_factory=dict)
    # A command a host's agent runs under (e.g. `unshare -m ...`: a file system view of its own).
    command_prefix: dict[str, list[str]] = field(default_factory=dict)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sealift-")))
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vm_root = Path(tempfile.mkdtemp(prefix="sealift-vms-", dir=SHM_ROOT if SHM_ROOT.is_dir() else None))
        self.pki = self.root / "pki"
        ca = ClusterCA.init(self.pki)
        self.ca = ca
        self.operators = self.root / "operators"
        self.operator = ca.issue_operator(OPERATOR, "admin", self.operators)
        self.addresses = {host: self.listen.get(host) or ("127.0.0.1", free_port()) for host in self.hosts}
        addresses = self.addresses
        for host in self.hosts:
            ca.issue_host(host, self.pki)
            self.agents[host] = self._write_config(host, addresses)

    def _write_config(self, host: str, addresses: dict[str, tuple[str, int]]) -> AgentProcess:
        state = self.root / host
        state.mkdir(parents=True)
        routes = {peer: self.peer_routes.get((host, peer), addr) for peer, addr in addresses.items() if peer != host}
        peers = "\n".join(f'"{peer}" = "{addr[0]}:{addr[1]}"' for peer, addr in routes.items())
        config = state / "agent.toml"
        socket_path = state / "control.sock"
        hosts = ", ".join(f'"{h}"' for h in self.hosts)
        (state / "policy.toml").write_text(
            "# The demo cluster: admins and operators may move any VM between its hosts.\n"
            f'[[rule]]\nroles = ["admin", "operator"]\nvms = ["*"]\nfrom = [{hosts}]\nto = [{hosts}]\n'
        )
        config.write_text(
            f'name = "{host}"\n'
            f'listen = "{addresses[host][0]}:{addresses[host][1]}"\n'
            f'control_socket = "{socket_path}"\n'
            f'state_dir = "{state}"\n'
            f'vm_dir = "{self.vm_root / host}"\n'
            f'identity_dir = "{self.pki}"\n'
            f'policy = "{state / "policy.toml"}"\n'
            f"allow_insecure = {'true' if self.allow_insecure else 'false'}\n"
            + (
                f'memory_capacity = "{self.capacity}"\n'
                if "memory_capacity" not in self.host_config.get(host, "")
                else ""
            )
            + f"{self.host_config.get(host, '')}\n"
            f"{self.extra_config}\n"
            f"[peers]\n{peers}\n"
            f"[inventory]\n" + "".join(f'"{h}" = "{self.capacity}"\n' for h in self.hosts)
        )
        return AgentProcess(host, config, socket_path, addresses[host], state / "agent.log")

    # -- processes ------------------------------------------------------------

    def start(self, host: str | None = None, timeout: float = 20.0) -> None:
        for name in [host] if host else list(self.agents):
            agent = self.agents[name]
            log = open(agent.log_path, "ab")
            agent.process = subprocess.Popen(
                netns_argv(
                    self.netns.get(name),
                    [
                        *self.command_prefix.get(name, []),
                        *[sys.executable, "-m", "sealift", "agent", "--config", str(agent.config_path)],
                    ],
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        for name in [host] if host else list(self.agents):
            self._wait_ready(self.agents[name], timeout)

    def _wait_ready(self, agent: AgentProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if agent.process is not None and agent.process.poll() is not None:
                raise RuntimeError(f"agent {agent.name} exited: {agent.log_path.read_text()[-2000:]}")
            try:
                agent.client.request("status")
                return
            except AgentUnavailable:
                time.sleep(0.05)
        raise TimeoutError(f"agent {agent.name} did not come up in {timeout:.0f} s; see {agent.log_path}")

    def kill(self, host: str, sig: int = signal.SIGKILL) -> None:
        process = self.agents[host].process
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=10)

    def client(self, host: str) -> AgentClient:
        return self.agents[host].client

    def order(
        self, vm: str, source: str, destination: str, ttl_s: float = 300, operator: OperatorIdentity | None = None
    ) -> str:
        """A signed migration order from the cluster's admin (or `operator`)."""
        return create_order(operator or self.operator, vm, source, destination, ttl_s=ttl_s)

    def migrate(self, vm: str, source: str, destination: str, options: dict | None = None, on_event=None) -> dict:
        """Sign an order and run it on the source agent; returns the report."""
        return self.client(source).request(
            "migrate",
            on_event=on_event,
            vm=vm,
            to=destination,
            options=options or {},
            order=self.order(vm, source, destination),
        )["report"]

    def stop_guests(self) -> None:
        """Stop every guest through its agent, then kill what is left (guests outlive agents by design)."""
        for host in self.hosts:
            try:
                for vm in self.client(host).request("vm.list")["vms"]:
                    self.client(host).request("vm.stop", name=vm["name"])
            except Exception:  # noqa: BLE001 - best effort: an agent may be down; the kill below is the backstop
                pass
        kill_guests_under(self.vm_root)

    def stop(self) -> None:
        """Stop agents and every guest they started; remove all files."""
        for agent in self.agents.values():
            if agent.process is not None and agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            if agent.process is not None:
                try:
                    agent.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    agent.process.kill()
        kill_guests_under(self.vm_root)
        shutil.rmtree(self.vm_root, ignore_errors=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def kill_guests_under(directory: Path) -> None:
    """Guests (built-in and QEMU) outlive agents by design; tear-down finds them by their paths."""
    needle = str(directory).encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        is_guest = b"sealift.backends.builtin.guest" in cmdline or b"qemu-system" in cmdline
        if is_guest and needle in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
