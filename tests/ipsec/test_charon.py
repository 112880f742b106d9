"""charon per host: private configuration, VICI socket and /run; the right IPsec backend; clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sealift.ipsec.charon import Charon, CharonError, IpsecBackend, detect_backend, plugin_list, render_strongswan_conf
from sealift.ipsec.vici_client import ViciClient
from sealift.lab.ipsec.routed_pair import RoutedPair, in_netns

from .conftest import needs_namespaces


def test_config_is_private_to_one_charon_and_holds_no_secret(tmp_path: Path) -> None:
    conf = render_strongswan_conf(tmp_path, IpsecBackend.LIBIPSEC, subsystem_levels={"mgr": 2})
    assert f"socket = unix://{tmp_path}/charon.vici" in conf
    assert f"path = {tmp_path}/charon.log" in conf
    assert "allow_peer_ts = yes" in conf and "routing_table_prio = 40000" in conf
    assert "secret" not in conf.lower() and "psk" not in conf.lower() and "include" not in conf
    kernel = render_strongswan_conf(tmp_path, IpsecBackend.KERNEL)
    assert "kernel-libipsec" not in kernel and "routing_table" not in kernel
    # libipsec must register as the IPsec backend before kernel-netlink does.
    plugins = plugin_list(IpsecBackend.LIBIPSEC)
    assert plugins.index("kernel-libipsec") < plugins.index("kernel-netlink")
    with pytest.raises(ValueError, match="log secrets"):
        render_strongswan_conf(tmp_path, IpsecBackend.KERNEL, log_level=4)


@needs_namespaces
def test_backend_detection_agrees_with_the_kernel(lab: RoutedPair) -> None:
    probe = in_netns(
        lab.a.netns,
        [
            "ip",
            "xfrm",
            "state",
            "add",
            "src",
            lab.a.address,
            "dst",
            lab.b.address,
            "proto",
            "esp",
            "spi",
            "0x77",
            "mode",
            "tunnel",
            "aead",
            "rfc4106(gcm(aes))",
            "0x" + "11" * 20,
            "128",
        ],
        check=False,
    )
    expected = IpsecBackend.KERNEL if probe.returncode == 0 else IpsecBackend.LIBIPSEC
    assert detect_backend() is expected
    print(f"IPsec backend here: {expected.value} ({probe.stderr.strip() or 'kernel ESP present'})")


@needs_namespaces
def test_two_charons_run_side_by_side_and_stop_cleanly(lab: RoutedPair) -> None:
    backend = detect_backend()
    host_pidfile = Path("/run/charon.pid")
    pidfile_before = host_pidfile.read_text() if host_pidfile.exists() else None
    first, second = Charon(lab.a.netns, backend), Charon(lab.b.netns, backend)
    with first, second:
        assert first.vici_socket != second.vici_socket and first.pid != second.pid
        for charon in (first, second):
            with ViciClient(str(charon.vici_socket)) as vici:
                assert vici.version().startswith("charon 5.") or vici.version().startswith("charon 6.")
            assert "loaded plugins: charon random nonce openssl kdf" in charon.log_text()
            # Each charon's pid file is in its private /run, not the host's.
            assert (charon.run_dir / "run" / "charon.pid").read_text().strip() == str(charon.pid)
        if backend is IpsecBackend.LIBIPSEC:
            for host in (lab.a, lab.b):
                assert "ipsec0" in in_netns(host.netns, ["ip", "-br", "link"]).stdout
        pids, run_dirs = (first.pid, second.pid), (first.run_dir, second.run_dir)
    assert (host_pidfile.read_text() if host_pidfile.exists() else None) == pidfile_before
    for pid, run_dir in zip(pids, run_dirs):
        assert pid is not None and not Path(f"/proc/{pid}").exists()
        assert not run_dir.exists()
    for host in (lab.a, lab.b):
        assert "ipsec0" not in in_netns(host.netns, ["ip", "-br", "link"]).stdout


@needs_namespaces
def test_a_charon_that_cannot_start_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    charon = Charon("slips-no-such-netns", detect_backend(), run_dir=tmp_path / "charon")
    with pytest.raises(CharonError, match="exited"):
        charon.start()
    assert charon.pid is None
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [] or leftovers == [str(os.getpid())]


@needs_namespaces
def test_the_host_charon_starts_once_restarts_after_a_crash_and_stops(lab: RoutedPair, tmp_path: Path) -> None:
    from sealift.ipsec.charon import HostCharon

    host = HostCharon(tmp_path / "ipsec", netns=lab.a.netns)
    try:
        first = host.get()
        assert first.running and host.get() is first
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        for _ in range(100):
            if not first.running:
                break
            time.sleep(0.05)
        second = host.get()
        assert second.running and second.pid != first.pid
        with ViciClient(str(second.vici_socket)) as vici:
            assert vici.conn_names() == []
    finally:
        host.stop()
    assert not second.running
