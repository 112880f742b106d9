"""The systemd unit (deploy/systemd/sealift-agent.service) and the agent's readiness notification.

`systemd-analyze verify` checks the unit as systemd would load it; it also
insists that ExecStart's binary exists, so the check runs on a copy that
points at this environment's `sealift`. The readiness protocol needs no
systemd: a real agent process is given a datagram socket as $NOTIFY_SOCKET,
as systemd would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.notify import notify_address, sd_notify
from sealift.cluster import LocalCluster

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "sealift-agent.service"
INSTALLED = "/usr/local/bin/sealift"  # where the unit expects the command


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: bash scripts/run.sh setup installs systemd")
    here = Path(sys.executable).with_name("sealift")  # the venv's console script
    assert here.exists(), f"{here}: install sealift into this environment (pip install -e .)"
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED, str(here)))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on unknown keys too, only warning: any word about our unit is a failure.
    assert done.returncode == 0, done.stderr
    assert UNIT.name not in done.stdout + done.stderr, done.stderr


def test_the_unit_is_a_hardened_notify_service() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == [f"{INSTALLED} agent --config /etc/sealift/agent.toml"]
    assert settings["ExecStartPre"] == [f"{INSTALLED} agent --check-config --config /etc/sealift/agent.toml"]
    assert settings["KillMode"] == ["process"], "guests must outlive a restart of the agent"
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the agent re-reads its CRL and policy
    for key, value in {
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "sealift",
        "RuntimeDirectory": "sealift",
    }.items():
        assert settings[key] == [value], key
    capabilities = set(settings["CapabilityBoundingSet"][0].split())
    assert capabilities == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_ADMIN"}


def test_notify_addresses() -> None:
    assert notify_address(None) is None and notify_address("") is None
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@sealift-test") == "\0sealift-test"
    assert notify_address("vsock:2:1234") is None


def test_sd_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sealift-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1", "STATUS=here")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=here"


def test_sd_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert not sd_notify("READY=1")  # logged, never raised


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="sealift-notify-") as directory:  # short: unix paths fit in 108 bytes
        path = Path(directory) / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(str(path))
            receiver.settimeout(30)
            monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # the agent process inherits it
            yield receiver


def receive(receiver: socket.socket, log_path: Path) -> str:
    try:
        return receiver.recv(4096).decode()
    except TimeoutError:
        pytest.fail(f"no notification from the agent; its log:\n{log_path.read_text()}")


def test_a_real_agent_notifies_ready_once_it_serves_and_stopping(notify_socket: socket.socket) -> None:
    cluster = LocalCluster(hosts=("host-a",))
    agent = cluster.agents["host-a"]
    try:
        # Started by hand, not with cluster.start(), which would wait by polling the control socket itself.
        with agent.log_path.open("ab") as log:
            agent.process = subprocess.Popen(
                [sys.executable, "-m", "sealift", "agent", "--config", str(agent.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        fields = receive(notify_socket, agent.log_path).split("\n")
        assert fields[0] == "READY=1", agent.log_path.read_text()
        listen = "{}:{}".format(*agent.listen)
        assert fields[1] == f"STATUS=serving on {listen}, control socket {agent.socket_path}"
        # At once, without retrying: READY means the control socket and the migration port accept.
        assert agent.client.request("status")["status"]["host"] == "host-a"
        socket.create_connection(agent.listen, timeout=5).close()

        agent.process.send_signal(signal.SIGTERM)
        assert receive(notify_socket, agent.log_path) == "STOPPING=1\nSTATUS=stopping"
        # The agent's threads get up to 5 s each to finish: a loaded machine needs longer than cluster.kill waits.
        assert agent.process.wait(timeout=60) == 0, agent.log_path.read_text()
    finally:
        cluster.cleanup()
