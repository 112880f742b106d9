"""The IPsec transport on real namespaces: strongSwan charons, ESP on the wire, captures from the router.

Host a is the source (initiator), host b the destination listening on the
migration port; the router between them is where the attacker captures and
injects. Each test builds its own namespaces (prefix "slips-").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sealift.ipsec.charon import ROUTING_TABLE, Charon, IpsecBackend, detect_backend
from sealift.ipsec.sa_key import derive_ipsec_psk, ipsec_key_id, ipsec_psk_fingerprint
from sealift.ipsec.tunnel import FLOW_TABLE, IpsecEndpoint, IpsecError, IpsecTunnel, TunnelHost, default_mode
from sealift.ipsec.vici_client import TunnelEnd, ViciClient
from sealift.lab.ipsec.routed_pair import Capture, RoutedPair, in_netns, read_capture, udp_packets
from sealift.lab.ipsec.secret_transfer import SECRET_LINE, run_transfer

from .conftest import MIGRATION_PORT, needs_namespaces

pytestmark = [needs_namespaces, pytest.mark.timeout(120)]

TRANSFER = 8 << 20  # 8 MiB, holding the secret line in every 64 KiB


def _connect_from(netns: str, address: str, port: int) -> subprocess.CompletedProcess[str]:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2).close()"
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )


def _listen(netns: str, port: int) -> subprocess.Popen[str]:
    """A transfer receiver on all addresses of `netns`, already listening when this returns."""
    listener = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-m",
            "sealift.lab.ipsec.secret_transfer",
            "serve",
            "0.0.0.0",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    return listener


def test_migration_stream_is_esp_only_and_the_secret_never_shows(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], tmp_path: Path
) -> None:
    source, destination = hosts
    plain_pcap, ipsec_pcap = str(tmp_path / "plain.pcap"), str(tmp_path / "ipsec.pcap")

    # Control: the same transfer without the tunnel shows the secret to the router.
    with Capture(lab.router, lab.router_iface_a, plain_pcap):
        assert run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, TRANSFER)["bytes"] == TRANSFER
    assert SECRET_LINE in Path(plain_pcap).read_bytes()

    with IpsecTunnel(
        source, destination, MIGRATION_PORT, os.urandom(32), name="mig-1", psk_generation="test"
    ) as tunnel:
        with Capture(lab.router, lab.router_iface_a, ipsec_pcap):
            received = run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, TRANSFER)
            # Traffic outside the selectors keeps its normal route (the agents' own channel, ping, IKE).
            in_netns(lab.a.netns, ["ping", "-c", "1", "-W", "2", lab.b.address])
        sa = tunnel.source_sa
        assert sa is not None and tunnel.destination_sa is not None
        spi_out, spi_in = tunnel.spis

    assert received["bytes"] == TRANSFER
    assert tunnel.backend == detect_backend()
    assert tunnel.esp_algorithm == "AES_GCM_16-256"
    assert sa.dh_group == "CURVE_25519"  # the child SA had its own key exchange (PFS)
    assert sa.mode == default_mode(tunnel.backend)
    captured = Path(ipsec_pcap).read_bytes()
    assert SECRET_LINE not in captured
    assert not read_capture(ipsec_pcap, f"tcp.port == {MIGRATION_PORT}", ["frame.number"])  # no cleartext flow
    esp = read_capture(ipsec_pcap, "esp", ["esp.spi", "udp.dstport", "ip.proto"])
    assert len(esp) > TRANSFER // 1500  # the whole stream went as ESP
    spis = {int(row[0], 16) for row in esp}
    assert spis == {int(spi_out, 16), int(spi_in, 16)}
    if tunnel.backend is IpsecBackend.LIBIPSEC:
        # libipsec sends ESP in UDP (RFC 3948) on port 4500, through charon's socket.
        assert sa.udp_encapsulated and {row[1] for row in esp} == {"4500"}
    else:
        assert {row[2] for row in esp} == {"50"}


def test_only_the_migration_flow_is_tunnelled_and_it_fails_closed(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon], tmp_path: Path
) -> None:
    source, destination = hosts
    other_port_pcap = str(tmp_path / "other.pcap")
    with IpsecTunnel(
        source, destination, MIGRATION_PORT, os.urandom(32), name="mig-narrow", psk_generation="test", charons=charons
    ) as tunnel:
        # Another TCP port is outside the traffic selectors: it is not protected by this SA.
        with Capture(lab.router, lab.router_iface_a, other_port_pcap):
            run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT + 1, 1 << 20)
        assert SECRET_LINE in Path(other_port_pcap).read_bytes()
        if tunnel.backend is IpsecBackend.LIBIPSEC:
            # The SA disappears under a running migration (e.g. the peer deleted it):
            # the migration flow must fail, never fall back to cleartext.
            with ViciClient(str(charons[0].vici_socket)) as vici:
                vici.terminate("mig-narrow")
            fallback_pcap = str(tmp_path / "fallback.pcap")
            listener = _listen(lab.b.netns, MIGRATION_PORT)
            try:
                with Capture(lab.router, lab.router_iface_a, fallback_pcap):
                    attempt = _connect_from(lab.a.netns, destination.address, MIGRATION_PORT)
            finally:
                listener.kill()
                listener.wait()
            assert attempt.returncode != 0 and "timed out" in attempt.stderr
            assert not read_capture(fallback_pcap, f"tcp.port == {MIGRATION_PORT}", ["frame.number"])


def test_teardown_leaves_no_sa_no_psk_no_rules_and_nothing_on_disk(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    source, destination = hosts
    psk = os.urandom(32)
    with IpsecTunnel(
        source,
        destination,
        MIGRATION_PORT,
        psk,
        name="mig-td",
        key_id="sealift-mig-td-e0",
        psk_generation="test",
        charons=charons,
    ):
        with ViciClient(str(charons[1].vici_socket)) as vici:
            assert vici.shared_key_ids() == ["sealift-mig-td-e0"]
            assert [child.state for ike in vici.list_sas() for child in ike.children] == ["INSTALLED"]
        rules_up = in_netns(lab.a.netns, ["ip", "rule"]).stdout
        assert f"dport {MIGRATION_PORT}" in rules_up
    for charon, host in zip(charons, (lab.a, lab.b)):
        with ViciClient(str(charon.vici_socket)) as vici:
            assert vici.list_sas() == []
            assert vici.shared_key_ids() == []
            assert vici.conn_names() == []
        assert str(MIGRATION_PORT) not in in_netns(host.netns, ["ip", "rule"]).stdout
        assert "sealift_" not in in_netns(host.netns, ["nft", "list", "tables"]).stdout
        for table in (ROUTING_TABLE, FLOW_TABLE):
            assert in_netns(host.netns, ["ip", "route", "show", "table", str(table)], check=False).stdout.strip() == ""
        # The PSK went to charon over VICI only: not in its config, log or any file of its run directory.
        for path in charon.run_dir.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert psk not in content and psk.hex().encode() not in content, path
        assert "unloaded shared key with id 'sealift-mig-td-e0'" in charon.log_text()


def test_a_wrong_psk_cannot_bring_up_the_sa_and_the_next_tunnel_works(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    source, destination = hosts
    backend = charons[0].backend
    mode = default_mode(backend)
    right, guessed = os.urandom(32), os.urandom(32)
    ends = (
        TunnelEnd(
            "mig-bad", "initiator", source.address, destination.address, "host-a", "host-b", MIGRATION_PORT, mode
        ),
        TunnelEnd(
            "mig-bad", "responder", destination.address, source.address, "host-b", "host-a", MIGRATION_PORT, mode
        ),
    )
    # The "source" holds an old or guessed key; the destination holds this migration's key.
    with (
        IpsecEndpoint(charons[1], ends[1], right, key_id="k-right", psk_generation="2") as responder,
        IpsecEndpoint(charons[0], ends[0], guessed, key_id="k-guess", psk_generation="1") as initiator,
    ):
        responder.prepare()
        initiator.prepare()
        with pytest.raises(IpsecError, match="did not come up"):
            initiator.initiate(timeout_s=8)
        assert responder.installed_child() is None and initiator.installed_child() is None
        with ViciClient(str(charons[1].vici_socket)) as vici:
            assert not [ike for ike in vici.list_sas() if ike.state == "ESTABLISHED"]
    assert re.search(
        r"MAC mismatched|AUTHENTICATION_FAILED|authentication of 'host-a' .* failed", charons[1].log_text()
    )

    # The failure left nothing behind: the next migration's tunnel comes up in the same charons.
    with IpsecTunnel(
        source, destination, MIGRATION_PORT, os.urandom(32), name="mig-next", psk_generation="3", charons=charons
    ) as tunnel:
        assert run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, 1 << 20)["bytes"] == 1 << 20
        assert tunnel.source_sa is not None


@pytest.mark.parametrize("psk_changed", [True, False], ids=["psk-changed", "same-psk"])
def test_a_replayed_ike_exchange_gives_no_sa(
    lab: RoutedPair,
    hosts: tuple[TunnelHost, TunnelHost],
    charons: tuple[Charon, Charon],
    tmp_path: Path,
    psk_changed: bool,
) -> None:
    source, destination = hosts
    first_psk = os.urandom(32)
    pcap = str(tmp_path / "ike.pcap")
    with Capture(lab.router, lab.router_iface_a, pcap):
        with IpsecTunnel(
            source, destination, MIGRATION_PORT, first_psk, name="mig-r1", psk_generation="1", charons=charons
        ):
            pass
    # The initiator's IKE messages: IKE_SA_INIT on 500, then IKE_AUTH and CREATE_CHILD_SA on
    # 4500 behind the 4-byte non-ESP marker (ESP packets there start with their SPI instead).
    recorded = [
        p
        for p in udp_packets(pcap)
        if p.src == source.address and (p.dport == 500 or (p.dport == 4500 and p.payload[:4] == b"\0\0\0\0"))
    ]
    assert len(recorded) >= 3

    # The destination now waits for the next migration (new PSK), or still holds the old one.
    next_psk = os.urandom(32) if psk_changed else first_psk
    end = TunnelEnd(
        "mig-r2",
        "responder",
        destination.address,
        source.address,
        "host-b",
        "host-a",
        MIGRATION_PORT,
        default_mode(charons[1].backend),
    )
    with IpsecEndpoint(charons[1], end, next_psk, key_id="k-next", psk_generation="2") as responder:
        responder.prepare()
        log_before = charons[1].log_text()
        packets = [
            {"src": p.src, "dst": p.dst, "sport": p.sport, "dport": p.dport, "payload": p.payload.hex()}
            for p in recorded
        ]
        replay = subprocess.run(
            ["ip", "netns", "exec", lab.router, sys.executable, str(Path(__file__).with_name("replay_udp.py"))],
            input=json.dumps(packets),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert replay.returncode == 0, replay.stderr
        time.sleep(1.0)
        log = charons[1].log_text()
        # It arrived: IKE_SA_INIT makes a new half-open SA (a fresh SPI, nonce and key share of b's)...
        init_line = f"received packet: from {source.address}[500]"
        assert log.count(init_line) - log_before.count(init_line) == 1
        # ...and every later message names the old exchange's SPIs, which b no longer knows.
        unknown = "IKE_SA checkout not successful"
        assert log.count(unknown) - log_before.count(unknown) >= len(recorded) - 1
        assert responder.installed_child() is None
        with ViciClient(str(charons[1].vici_socket)) as vici:
            sas = vici.list_sas()
        assert not [ike for ike in sas if ike.state == "ESTABLISHED"]
        assert not [child for ike in sas for child in ike.children]


def test_each_migration_gets_its_own_psk_and_a_failed_one_does_not_block_the_next(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    """Derive per migration as the agents would (same inputs on both sides), run three tunnels, fail one."""
    source, destination = hosts
    ratchet = os.urandom(32)
    fingerprints = []
    spis = []
    for number in range(3):
        migration = f"m-{number}"
        psk = derive_ipsec_psk(
            channel_secret=os.urandom(32),
            ratchet_key=ratchet,
            epoch=number,
            migration_id=migration,
            nonce_source=os.urandom(32),
            nonce_dest=os.urandom(32),
        )
        fingerprints.append(ipsec_psk_fingerprint(psk))
        tunnel = IpsecTunnel(
            source,
            destination,
            MIGRATION_PORT,
            psk,
            name=migration,
            key_id=ipsec_key_id(migration, number),
            psk_generation=str(number),
            charons=charons,
        )
        if number == 1:
            with pytest.raises(RuntimeError, match="migration failed"):
                with tunnel:
                    spis.append(tunnel.spis)
                    raise RuntimeError("migration failed half-way")
        else:
            with tunnel:
                spis.append(tunnel.spis)
                assert (
                    run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, 1 << 20)["bytes"] == 1 << 20
                )
                assert tunnel.source_sa is not None
                assert tunnel.source_sa.psk_fingerprint == fingerprints[-1]
    assert len(set(fingerprints)) == 3
    assert len(set(spis)) == 3
    with ViciClient(str(charons[0].vici_socket)) as vici:
        assert vici.list_sas() == [] and vici.shared_key_ids() == []


def test_the_static_psk_baseline_reuses_one_key_across_migrations(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    from sealift.ipsec.tunnel import STATIC_KEY_ID, static_psk_tunnel

    source, destination = hosts
    configured = os.urandom(32)
    records = []
    for _ in range(2):
        with static_psk_tunnel(source, destination, MIGRATION_PORT, configured, charons=charons) as tunnel:
            assert run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, 1 << 20)["bytes"] == 1 << 20
            records.append(tunnel.source_sa)
    assert records[0] is not None and records[1] is not None
    assert records[0].key_id == records[1].key_id == STATIC_KEY_ID
    assert records[0].psk_fingerprint == records[1].psk_fingerprint  # the same key both times...
    assert records[0].spi_out != records[1].spi_out  # ...while IKE still makes fresh ESP keys per SA


def test_an_agent_side_endpoint_pair_as_the_transport_would_run_it(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    """The `ipsec` transport's sequence: destination prepares, source prepares and initiates, both close."""
    from sealift.ipsec.tunnel import migration_endpoint

    source, destination = hosts
    psk = derive_ipsec_psk(
        channel_secret=os.urandom(32),
        ratchet_key=None,
        epoch=0,
        migration_id="mig-77",
        nonce_source=os.urandom(32),
        nonce_dest=os.urandom(32),
    )
    common = {
        "migration_id": "mig-77",
        "port": MIGRATION_PORT,
        "psk": psk,
        "key_id": ipsec_key_id("mig-77", 0),
        "psk_generation": "epoch 0",
    }
    with (
        migration_endpoint(charons[1], role="destination", local=destination, remote=source, **common) as dst,
        migration_endpoint(charons[0], role="source", local=source, remote=destination, **common) as src,
    ):
        dst.prepare()
        src.prepare()
        src.initiate()
        record = src.record(src.wait_installed())
        assert dst.wait_installed().spi_in == record.spi_out
        assert run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT, 1 << 20)["bytes"] == 1 << 20
        assert record.as_dict()["key_id"] == "sealift-mig-77-e0"
    for charon in charons:
        with ViciClient(str(charon.vici_socket)) as vici:
            assert vici.list_sas() == [] and vici.shared_key_ids() == [] and vici.conn_names() == []


def test_the_destination_port_takes_no_cleartext_while_the_tunnel_is_up(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon]
) -> None:
    """The attacker on the router cannot feed a cleartext stream into the port QEMU -incoming listens on."""
    source, destination = hosts
    listener = _listen(lab.b.netns, MIGRATION_PORT)
    try:
        with IpsecTunnel(
            source, destination, MIGRATION_PORT, os.urandom(32), name="mig-in", psk_generation="test", charons=charons
        ) as tunnel:
            attempt = _connect_from(lab.router, destination.address, MIGRATION_PORT)
            assert attempt.returncode != 0 and "timed out" in attempt.stderr
            table = tunnel.endpoints[1].nft_table if tunnel.endpoints else ""
            counters = in_netns(lab.b.netns, ["nft", "list", "table", "inet", table]).stdout
            assert re.search(r"counter packets [1-9]", counters), counters
        # Without the tunnel (and its filter) the same connection goes through: the filter made the difference.
        assert _connect_from(lab.router, destination.address, MIGRATION_PORT).returncode == 0
        assert "sealift_" not in in_netns(lab.b.netns, ["nft", "list", "tables"]).stdout
    finally:
        listener.kill()
        listener.wait()


def test_two_concurrent_migrations_between_one_pair_do_not_cut_each_other(
    lab: RoutedPair, hosts: tuple[TunnelHost, TunnelHost], charons: tuple[Charon, Charon], tmp_path: Path
) -> None:
    source, destination = hosts
    first = IpsecTunnel(
        source, destination, MIGRATION_PORT, os.urandom(32), name="mig-c1", psk_generation="1", charons=charons
    )
    with first:
        with IpsecTunnel(
            source, destination, MIGRATION_PORT + 2, os.urandom(32), name="mig-c2", psk_generation="1", charons=charons
        ) as second:
            assert set(first.spis).isdisjoint(second.spis)
            first.close()  # the first migration ends while the second still runs
            pcap = str(tmp_path / "second.pcap")
            with Capture(lab.router, lab.router_iface_a, pcap):
                got = run_transfer(lab.b.netns, lab.b.address, lab.a.netns, MIGRATION_PORT + 2, 2 << 20)
            assert got["bytes"] == 2 << 20
            assert SECRET_LINE not in Path(pcap).read_bytes()
            assert {int(row[0], 16) for row in read_capture(pcap, "esp", ["esp.spi"])} == {
                int(x, 16) for x in second.spis
            }
