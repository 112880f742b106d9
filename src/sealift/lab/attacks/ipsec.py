# Long file: the ipsec transport's three attacks (T1, T4, T13) share its testbed helpers; one attack per function.
"""Attacks on the `ipsec` transport of QEMU guests: snooping (T1), IKE replay (T4), old or guessed PSK (T13).

The transport (backends/qemu/transports.py) runs QEMU's own TCP stream straight
to the destination QEMU inside an IKEv2/ESP SA of each host's charon, keyed
by a PSK the two agents derive for that one migration; the destination loads
the connection and the PSK when the migration starts and unloads them when
it ends. Each attack runs on the lab's real agents, QEMU guests and charons.

Baselines: QEMU's `plain` transport for snooping; for T4 and T13 the
benchmark's static-PSK IPsec VPN (ipsec/tunnel.py `static_psk_tunnel`, seed
003's configuration: one PSK configured once, the connection always loaded),
between charons of the lab's own in the same two namespaces.

The attacker is the router between the hosts (the lab's attacker
namespace): it captures, it replays with spoofed source addresses, and for
T13 it takes a host's address for itself (lab/ipsec/intruder.py) and runs a
charon of its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

from sealift.cluster import LocalCluster
from sealift.ipsec.charon import Charon, detect_backend
from sealift.ipsec.sa_key import ipsec_psk_fingerprint
from sealift.ipsec.tunnel import TunnelHost, migration_identity, static_psk_tunnel
from sealift.ipsec.vici_client import ViciClient
from sealift.lab.attacks.base import AttackResult, Baseline, attack
from sealift.lab.attacks.channel import SECRET, VM, _describe, _plain, _short, _where
from sealift.lab.capture import Capture, dropped_note, find_in_capture, read_packets, tcp_streams
from sealift.lab.ipsec.intruder import ClaimedAddress, LoadedConn, LoadedPsk, ViciTap, try_sa, vici_state
from sealift.lab.ipsec.replay_attack import (
    IKE_NATT_PORT,
    IKE_PORT,
    UdpDatagram,
    ike_initiator_messages,
    is_ike,
    send_datagrams,
)
from sealift.lab.ipsec.routed_pair import UdpPacket, udp_packets
from sealift.lab.netns import enter_netns
from sealift.lab.session import Backend, LabSession

TRANSPORT = "ipsec"
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ESP = 6, 17, 50
QEMU_STREAM_MAGIC = b"QEVM"  # the first bytes of QEMU's migration stream
MiB = 1 << 20
STATIC_PORT = 7461  # the static VPN's protected TCP port (any: nothing is sent through it here)
ATTEMPT_TIMEOUT_S = 8.0


def _migrate_ipsec(lab: LabSession, cluster: LocalCluster, source: str = "host-a", destination: str = "host-b") -> dict:
    return lab.migrate(cluster, VM, {"secure": True}, transport=TRANSPORT, source=source, destination=destination)


def _charon_dir(cluster: LocalCluster, host: str) -> Path:
    return cluster.root / host / "ipsec"  # HostCharon's run directory (agent/daemon.py: state_dir / "ipsec")


def _charon_log(cluster: LocalCluster, host: str) -> str:
    path = _charon_dir(cluster, host) / "charon.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _keep_log(lab: LabSession, text: str, name: str) -> Path:
    """A charon log is evidence: keep it in the results folder (the cluster's folder goes at the end)."""
    path = lab.results_dir / name
    path.write_text(text)
    return path


def _host_state(cluster: LocalCluster, host: str) -> dict[str, list[str]]:
    return vici_state(_charon_dir(cluster, host) / "charon.vici")


def _state_text(state: dict[str, list[str]]) -> str:
    return f"SAs {state['sas'] or 'none'}, connections {state['conns'] or 'none'}, PSKs {state['shared'] or 'none'}"


def _lines(log: str, pattern: str, limit: int = 2) -> list[str]:
    """The log lines matching `pattern`, without their time stamps."""
    found = [line.split(" ", 1)[-1].strip() for line in log.splitlines() if re.search(pattern, line)]
    return found[:limit]


# -- T1: snooping on the ipsec transport --------------------------------------------------------------


def _plain_baseline(lab: LabSession) -> tuple[bool, str, dict]:
    """QEMU's `plain` transport captured on the same link: the secret is there (the positive control)."""
    cluster = lab.cluster("qemu", insecure=True)
    lab.start_vm(cluster, "host-a", VM, "qemu")
    capture = lab.capture("T1-qemu-ipsec-baseline-plain")
    report = _plain(lab, cluster, "qemu")
    pcap = capture.stop()
    hit = find_in_capture(pcap, SECRET)
    copies = lab.running_copies(cluster, VM)
    lab.finish(cluster)  # one guest named vm1 at a time on the VM network
    evidence = f"baseline ({report.get('transport')}): secret in {_describe(hit, pcap)}{dropped_note(capture.dropped)}"
    return (
        hit.found,
        evidence,
        {
            "baseline_pcap": str(pcap),
            "baseline_offsets": hit.file_offsets,
            "baseline_flows": hit.flows,
            "baseline_copies": copies,
            "baseline_dropped": capture.dropped,
        },
    )


def traffic_between(pcap: Path, a: str, b: str) -> dict[str, int]:
    """Packets between addresses a and b by kind: esp (IP protocol 50), esp-in-udp-4500, ike-udp-500,
    ike-udp-4500 (non-ESP marker), tcp:<port> (the lower port of each TCP packet), other:<protocol>."""
    pair = {a, b}
    counts: dict[str, int] = {}
    for packet in read_packets(pcap):
        frame = packet.data
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        if {src, dst} != pair:
            continue
        protocol, payload = ip[9], ip[header:]
        if protocol == IPPROTO_ESP:
            kind = "esp"
        elif protocol == IPPROTO_UDP and len(payload) >= 8:
            sport, dport = struct.unpack("!HH", payload[:4])
            if IKE_PORT in (sport, dport):
                kind = "ike-udp-500"
            elif IKE_NATT_PORT in (sport, dport):
                kind = "ike-udp-4500" if payload[8:12] == b"\0\0\0\0" else "esp-in-udp-4500"
            else:
                kind = f"udp:{min(sport, dport)}"
        elif protocol == IPPROTO_TCP and len(payload) >= 4:
            kind = f"tcp:{min(struct.unpack('!HH', payload[:4]))}"
        else:
            kind = f"other:{protocol}"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@attack("T1", "passive snooping on the IPsec transport (tshark on the attacker's link)", backends=("qemu",))
def ipsec_snooping(lab: LabSession, backend: Backend) -> list[AttackResult]:
    baseline_found, baseline_evidence, details = _plain_baseline(lab)

    cluster = lab.cluster("qemu")
    lab.start_vm(cluster, "host-a", VM, "qemu")
    capture = lab.capture("T1-qemu-ipsec")
    report = _migrate_ipsec(lab, cluster)
    pcap = capture.stop()
    source_ip, destination_ip = cluster.addresses["host-a"][0], cluster.addresses["host-b"][0]
    kinds = traffic_between(pcap, source_ip, destination_ip)
    agent_ports = {port for _, port in cluster.addresses.values()}
    tcp_ports = sorted(int(k.split(":")[1]) for k in kinds if k.startswith("tcp:"))
    other_tcp = [port for port in tcp_ports if port not in agent_ports]  # QEMU's stream in clear would be here
    hit = find_in_capture(pcap, SECRET)
    qemu_in_clear = [flow for flow, data in tcp_streams(pcap).items() if QEMU_STREAM_MAGIC in data[:64]]
    esp = kinds.get("esp", 0) + kinds.get("esp-in-udp-4500", 0)
    size_mib = pcap.stat().st_size / MiB
    states = {host: _host_state(cluster, host) for host in ("host-a", "host-b")}
    left_over = {host: state for host, state in states.items() if any(state.values())}
    copies = lab.running_copies(cluster, VM)
    on_b = lab.copies(cluster, VM).get("host-b")
    # The capture must hold the guest's memory as ESP, or "not found" proves nothing.
    saw_migration = esp >= 8 * MiB // 1500 and size_mib >= 8
    blocked = (
        report["status"] == "completed"
        and saw_migration
        and not hit.found
        and not other_tcp
        and not qemu_in_clear
        and on_b == "running"
        and not left_over
    )
    summary = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    evidence = (
        f"{baseline_evidence}; sealift (ipsec, {_sa_note(report)}): between {source_ip} and {destination_ip} "
        f"the capture holds {summary}; TCP only on the agents' TLS ports {sorted(agent_ports)}"
        f"{'' if not other_tcp else f' AND on {other_tcp}'}; QEMU stream in clear: "
        f"{'YES ' + str(qemu_in_clear[:1]) if qemu_in_clear else 'no'}; secret: {_describe(hit, pcap)} "
        f"({size_mib:.0f} MiB); guest: {_where(lab, cluster)}; after the migration neither charon holds an SA, "
        f"a connection or a PSK: {'yes' if not left_over else f'NO {left_over}'}"
    )
    details.update(
        transport=TRANSPORT,
        sealift_pcap=str(pcap),
        packets_between_hosts=kinds,
        sealift_offsets=hit.file_offsets,
        sealift_capture_mib=round(size_mib, 1),
        tcp_ports=tcp_ports,
        agent_ports=sorted(agent_ports),
        qemu_stream_in_clear=[str(f) for f in qemu_in_clear],
        charon_state_after=states,
        migration_id=report.get("migration_id"),
        stop_reason=report.get("stop_reason"),
    )
    return [
        AttackResult(
            "T1",
            "passive snooping on the IPsec transport: search the capture for the guest's secret",
            "qemu",
            "succeeded" if baseline_found else "blocked",
            "blocked" if blocked else "succeeded",
            evidence,
            copies,
            details=details,
        )
    ]


def _sa_note(report: dict) -> str:
    """The SA as the report states it (e.g. "ipsec backend libipsec, AES_GCM_16-256, CURVE_25519")."""
    match = re.search(r"ipsec backend [^;)]*", str(report.get("stop_reason", "")))
    return match.group(0) if match else "SA details not in the report"


# -- the static-PSK baseline ------------------------------------------------------------------------------


@contextmanager
def _static_charons(lab: LabSession) -> Iterator[tuple[Charon, Charon, TunnelHost, TunnelHost]]:
    """Charons of our own on the lab's two hosts for the static-PSK VPN (no agent runs one meanwhile)."""
    backend = detect_backend()
    source = TunnelHost(lab.testbed.ns("source"), lab.testbed.source_ip, "host-a")
    destination = TunnelHost(lab.testbed.ns("destination"), lab.testbed.destination_ip, "host-b")
    charons: list[Charon] = []
    try:
        for host in (source, destination):
            # mgr 2: charon logs messages for IKE SAs it does not know ("IKE_SA checkout not successful").
            charon = Charon(host.netns, backend, subsystem_levels={"mgr": 2})
            charon.start()
            charons.append(charon)
        yield charons[0], charons[1], source, destination
    finally:
        for charon in charons:
            charon.stop()


@contextmanager
def _static_vpn(lab: LabSession, psk: bytes) -> Iterator[tuple[Charon, Charon, TunnelHost, TunnelHost]]:
    """The static-PSK VPN between the lab's two hosts, up (its connection and PSK loaded on both)."""
    with _static_charons(lab) as (source_charon, destination_charon, source, destination):
        with static_psk_tunnel(source, destination, STATIC_PORT, psk, charons=(source_charon, destination_charon)):
            yield source_charon, destination_charon, source, destination


def _static_ids(name: str = "static-baseline") -> tuple[str, str]:
    return migration_identity("host-a", name), migration_identity("host-b", name)


# -- T13: an old or guessed PSK ------------------------------------------------------------------------------

# The attacker's charon uses its own IKE ports: the claimed address then stays the real host's for
# everything else (IKE and ESP of a running migration included), and only these come to the attacker.
ROGUE_PORTS = (5500, 5501)
REFUSAL = r"no IKE config found|MAC mismatched|AUTH_FAILED|no matching peer config|peer config.* not found"


@dataclass(frozen=True)
class Try:
    """One try of the attacker to bring up an SA with a victim's charon, and what the victim logged."""

    what: str  # e.g. "the stolen static PSK after ..."
    established: bool
    refusals: list[str]  # the victim charon's log lines about it
    error: str  # the attacker charon's error
    victim_sas: list[str]  # the victim's IKE SAs while the attacker's was up (or after the try)

    @property
    def text(self) -> str:
        if self.established:
            return f"{self.what}: SA ESTABLISHED (the victim then held {self.victim_sas})"
        return f'{self.what}: no SA, the victim\'s charon: "{"; ".join(self.refusals) or _short(self.error, 80)}"'


def _try(
    lab: LabSession,
    what: str,
    victim_log: Callable[[], str],
    victim_vici: Path,
    *,
    claimed: str,
    victim_ip: str,
    name: str,
    ids: tuple[str, str],
    port: int,
    psk: bytes,
) -> Try:
    """The attacker, claiming `claimed` (for its own IKE ports only), tries `psk` with identities `ids`."""
    seen: dict[str, list[str]] = {}
    log_before = len(victim_log())
    with ClaimedAddress(lab.testbed.ns("attacker"), claimed, udp_ports=ROGUE_PORTS):
        attempt = try_sa(
            lab.testbed.ns("attacker"),
            detect_backend(),
            name=name,
            local_address=claimed,
            remote_address=victim_ip,
            local_id=ids[0],
            remote_id=ids[1],
            port=port,
            psk=psk,
            ike_port=ROGUE_PORTS[0],
            natt_port=ROGUE_PORTS[1],
            timeout_s=ATTEMPT_TIMEOUT_S,
            on_up=lambda: seen.update(vici_state(victim_vici)),
        )
    time.sleep(0.2)  # the victim logs its refusal as it sends it
    refusals = _lines(victim_log()[log_before:], REFUSAL, 2)
    sas = seen.get("sas") if attempt.established else vici_state(victim_vici)["sas"]
    return Try(what, attempt.established, refusals, attempt.error, list(sas or []))


def _static_baseline_t13(lab: LabSession) -> dict[str, Try]:
    """The static VPN, connection and PSK always loaded: {"old": the stolen PSK, "guessed": a random one}."""
    psk = os.urandom(32)
    tries: dict[str, Try] = {}
    with _static_vpn(lab, psk) as (_, destination_charon, source, destination):
        for what, key, text in (("old", psk, "the stolen static PSK"), ("guessed", os.urandom(32), "a guessed PSK")):
            tries[what] = _try(
                lab,
                text,
                destination_charon.log_text,
                destination_charon.vici_socket,
                claimed=source.address,
                victim_ip=destination.address,
                name="static-baseline",
                ids=_static_ids(),
                port=STATIC_PORT,
                psk=key,
            )
        _keep_log(lab, destination_charon.log_text(), "T13-qemu-ipsec-baseline-destination-charon.log")
    return tries


def _stolen_psk(lab: LabSession, cluster: LocalCluster) -> tuple[dict, LoadedPsk, LoadedConn]:
    """Migrate there and back over ipsec, tapping host-b's charon control socket during the way back.

    The tap stands for an attacker with root on host-b while that migration
    ran (or one who cracked its PSK later): it gets the PSK and the IKE
    identities host-b's agent loaded. The first migration starts host-b's
    charon, whose socket the tap then takes over.
    """
    _migrate_ipsec(lab, cluster, "host-a", "host-b")
    tap = ViciTap(_charon_dir(cluster, "host-b") / "charon.vici")
    with tap:
        report = _migrate_ipsec(lab, cluster, "host-b", "host-a")
    if not tap.psks or not tap.conns:
        raise RuntimeError(
            f"the VICI tap on host-b saw no PSK or connection loaded (psks {len(tap.psks)}, conns {len(tap.conns)})"
        )
    return report, tap.psks[-1], tap.conns[-1]


def _port_of(conn: LoadedConn) -> int:
    """The migration's TCP port, from the connection's traffic selectors (e.g. 10.77.1.1/32[tcp/41234])."""
    for selector in (*conn.remote_ts, *conn.local_ts):
        match = re.search(r"\[tcp/(\d+)\]", selector)
        if match:
            return int(match.group(1))
    return STATIC_PORT


T = TypeVar("T")


# The migration under attack is held to this rate, so that it still runs when the strike (several
# IKE tries, each awaiting the victim's refusal) is over: an idle guest's migration over user-space
# ESP took a few seconds on a faster machine and once ended before the strike did.
STRIKE_MIGRATION_BPS = 4 * 1024 * 1024


def _while_migrating(
    lab: LabSession,
    cluster: LocalCluster,
    source: str,
    destination: str,
    strike: Callable[[str], T],
    *,
    sa_installed: bool = False,
) -> tuple[dict, T, bool]:
    """Run `strike(connection name)` as soon as the destination's charon has this migration's connection
    loaded (or, with sa_installed, its child SA up); (the migration's report, what strike returned,
    whether the connection was still loaded after it)."""
    vici_path = _charon_dir(cluster, destination) / "charon.vici"
    running = lab.migrate_in_background(
        cluster,
        VM,
        {"secure": True, "bandwidth_limit_bps": STRIKE_MIGRATION_BPS},
        transport=TRANSPORT,
        source=source,
        destination=destination,
    )
    names: list[str] = []

    def ready() -> bool:
        if running.done():
            raise RuntimeError(f"the migration ended before the attack: {running.error or 'completed'}")
        if not vici_path.exists():
            return False
        names[:] = [n for n in vici_state(vici_path)["conns"] if n.startswith("sealift-")]
        return bool(names) and (not sa_installed or _installed_children(vici_path, names[0]) > 0)

    lab.wait_for(ready, 60, f"{destination}'s charon loads the migration's connection")
    outcome = strike(names[0])
    still_loaded = names[0] in vici_state(vici_path)["conns"]
    return running.wait(180), outcome, still_loaded


def _installed_children(vici_path: Path, name: str) -> int:
    with ViciClient(str(vici_path)) as vici:
        return sum(1 for ike in vici.list_sas(name) for child in ike.children if child.state == "INSTALLED")


def _established_ike(vici_path: Path, name: str) -> int:
    with ViciClient(str(vici_path)) as vici:
        return sum(1 for ike in vici.list_sas(name) if ike.state == "ESTABLISHED")


@attack("T13", "an old (stolen) or guessed IKE PSK against the IPsec transport", backends=("qemu",))
def ipsec_old_psk(lab: LabSession, backend: Backend) -> list[AttackResult]:
    baselines = _static_baseline_t13(lab)

    cluster = lab.cluster("qemu")
    lab.start_vm(cluster, "host-a", VM, "qemu", workload="idle")
    report, stolen, conn = _stolen_psk(lab, cluster)  # migration 2, host-b -> host-a, its PSK stolen on host-b
    fingerprint = ipsec_psk_fingerprint(stolen.psk)
    guessed = os.urandom(32)
    address = {host: cluster.addresses[host][0] for host in ("host-a", "host-b")}
    host_a_state = _host_state(cluster, "host-a")

    def impersonate(victim: str, impostor: str, what: str, name: str, ids: tuple[str, str], psk: bytes) -> Try:
        """A try at `victim`'s charon from `impostor`'s address, on the stolen migration's port."""
        return _try(
            lab,
            what,
            lambda: _charon_log(cluster, victim),
            _charon_dir(cluster, victim) / "charon.vici",
            claimed=address[impostor],
            victim_ip=address[victim],
            name=name,
            ids=ids,
            port=_port_of(conn),
            psk=psk,
        )

    # After migration 2: the attacker claims host-b's address and identity towards host-a, its destination.
    after = {
        what: impersonate(
            "host-a",
            "host-b",
            f"{text} after it ended, with its identities",
            conn.name,
            (conn.local_id, conn.remote_id),
            key,
        )
        for what, key, text in (("old", stolen.psk, "the PSK of that migration"), ("guessed", guessed, "a guessed PSK"))
    }

    # During migration 3 (host-a -> host-b): host-b holds that migration's connection and PSK. The attacker
    # claims host-a's address for its own IKE ports only (the migration's IKE and ESP pass untouched) and,
    # generously, knows this migration's identities (the lab reads them from host-b's charon).
    def strike(name: str) -> list[Try]:
        ids = (migration_identity("host-a", name), migration_identity("host-b", name))
        return [
            impersonate("host-b", "host-a", f"{text} with the running migration's identities", name, ids, key)
            for key, text in ((stolen.psk, "the old PSK"), (guessed, "a guessed PSK"))
        ]

    next_report, during, still_loaded = _while_migrating(lab, cluster, "host-a", "host-b", strike)
    _keep_log(lab, _charon_log(cluster, "host-a"), "T13-qemu-ipsec-host-a-charon.log")
    _keep_log(lab, _charon_log(cluster, "host-b"), "T13-qemu-ipsec-host-b-charon.log")
    states = {host: _host_state(cluster, host) for host in ("host-a", "host-b")}
    copies = lab.running_copies(cluster, VM)
    on_b = lab.copies(cluster, VM).get("host-b")
    common_evidence = (
        f"host-a's charon held before the tries: {_state_text(host_a_state)} (a destination loads a migration's "
        f"connection and PSK only while that migration runs); migration {next_report.get('migration_id')} under "
        f"attack: {next_report.get('status')}, its connection {'still ' if still_loaded else 'no longer '}loaded on "
        f"host-b after the tries; afterwards neither charon holds anything: "
        f"{'yes' if not any(v for st in states.values() for v in st.values()) else f'NO {states}'}; "
        f"guest: {_where(lab, cluster)} (charon logs T13-qemu-ipsec-host-a/b-charon.log)"
    )
    results = []
    for what, title, baseline_try, tries in (
        (
            "old",
            "IPsec: bring up an SA with the PSK of a finished migration",
            baselines["old"],
            [after["old"], during[0]],
        ),
        ("guessed", "IPsec: bring up an SA with a guessed PSK", baselines["guessed"], [after["guessed"], during[1]]),
    ):
        baseline: Baseline = (
            "succeeded" if baseline_try.established and len(baseline_try.victim_sas) >= 2 else "blocked"
        )
        blocked = (
            not any(t.established for t in tries)
            and all(t.refusals for t in tries)
            and still_loaded
            and next_report.get("status") == "completed"
            and on_b == "running"
        )
        stolen_text = (
            f"the PSK of migration {report.get('migration_id')} (host-b -> host-a, fingerprint {fingerprint}, "
            f"taken from host-b's charon control socket while it ran)"
            if what == "old"
            else "a random PSK"
        )
        evidence = (
            f"baseline (static-PSK VPN, always loaded), attacker claiming {address['host-a']}: {baseline_try.text}; "
            f"sealift, {stolen_text}: (1) to host-a from {address['host-b']}: {tries[0].text}; (2) to host-b from "
            f"{address['host-a']} during the next migration: {tries[1].text}; {common_evidence}"
        )
        results.append(
            AttackResult(
                "T13",
                title,
                "qemu",
                baseline,
                "blocked" if blocked else "succeeded",
                evidence,
                copies,
                details={
                    "transport": TRANSPORT,
                    "stolen_migration_id": report.get("migration_id"),
                    "stolen_key_id": stolen.key_id,
                    "stolen_psk_fingerprint": fingerprint,
                    "baseline_try": dataclasses.asdict(baseline_try),
                    "after_migration_try": dataclasses.asdict(tries[0]),
                    "during_migration_try": dataclasses.asdict(tries[1]),
                    "migration_under_attack": next_report.get("migration_id"),
                    "migration_under_attack_status": next_report.get("status"),
                    "connection_loaded_during_tries": still_loaded,
                    "charon_state_after": states,
                },
            )
        )
    return results


def _tail(text: str, lines: int) -> list[str]:
    return [line.split(" ", 1)[-1] for line in text.strip().splitlines()[-lines:]]


# -- T4: replaying a recorded IKE exchange --------------------------------------------------------------------


def _replay(lab: LabSession, packets: Sequence[UdpDatagram], gap_s: float = 0.2) -> int:
    """Send the recorded datagrams again from the attacker's namespace, source addresses spoofed."""
    with enter_netns(lab.testbed.ns("attacker")):  # this thread only; the raw socket is made in there
        return send_datagrams(packets, gap_s)


def _static_baseline_t4(lab: LabSession) -> tuple[Baseline, str, dict]:
    """The static VPN: record one exchange, replay it while the same connection and PSK are loaded again."""
    psk = os.urandom(32)
    with _static_charons(lab) as (source_charon, destination_charon, source, destination):
        capture = lab.capture("T4-qemu-ipsec-baseline-static")
        with static_psk_tunnel(source, destination, STATIC_PORT, psk, charons=(source_charon, destination_charon)):
            pass  # one legitimate exchange, recorded
        pcap = capture.stop()
        recorded = ike_initiator_messages(udp_packets(str(pcap)), source.address, destination.address)
        with static_psk_tunnel(source, destination, STATIC_PORT, psk, charons=(source_charon, destination_charon)):
            log_before = len(destination_charon.log_text())
            established_before = _established(vici_state(destination_charon.vici_socket))
            sent = _replay(lab, recorded)
            time.sleep(1.0)
            log = destination_charon.log_text()[log_before:]
            established_after = _established(vici_state(destination_charon.vici_socket))
    _keep_log(lab, log, "T4-qemu-ipsec-baseline-destination-charon.log")
    answered_init = log.count("generating IKE_SA_INIT response 0 [ SA KE No")  # its own fresh nonce and key share
    unknown = log.count("IKE_SA checkout not successful")
    gained = established_after > established_before
    evidence = (
        f"baseline (static-PSK VPN, configured again with the same PSK): replayed the initiator's {sent} IKE "
        f"messages; the responder answered {answered_init} IKE_SA_INIT with a new nonce and key share, and "
        f"{unknown} later messages named an IKE SA it does not know; ESTABLISHED IKE SAs {established_before} "
        f"-> {established_after}"
    )
    return (
        ("succeeded" if gained else "blocked"),
        evidence,
        {
            "baseline_pcap": str(pcap),
            "baseline_replayed": sent,
            "baseline_answered_init": answered_init,
            "baseline_unknown_spi": unknown,
        },
    )


def _established(state: dict[str, list[str]]) -> int:
    return len([sa for sa in state["sas"] if "ESTABLISHED" in sa])


def _replay_watched(
    lab: LabSession, recorded: Sequence[UdpDatagram], name: str
) -> tuple[int, int, list[UdpPacket], Path]:
    """Replay towards host-b, capturing the attacker's link to it: (sent, seen there, host-b's answers, pcap)."""
    towards_b = Capture(lab.testbed.ns("attacker"), "to-dst", lab.results_dir / f"{name}.pcap")
    towards_b.start()
    try:
        sent = _replay(lab, recorded) if recorded else 0
        time.sleep(1.0)
    finally:
        pcap = towards_b.stop()
    on_link = udp_packets(str(pcap))
    source, destination = recorded[0].src, recorded[0].dst
    replayed = {p.payload for p in recorded}
    seen = sum(1 for p in ike_initiator_messages(on_link, source, destination) if p.payload in replayed)
    answers = [p for p in on_link if p.src == destination and p.dst == source and is_ike(p)]
    return sent, seen, answers, pcap


class _ReplayDuring(TypedDict):
    """T4's replay during a migration, on the destination (host-b)."""

    sent: int
    established_before: int
    established_after: int
    init_requests: int
    init_responses: int
    log: list[str]


@attack("T4", "replay of a recorded IKE exchange against the IPsec transport", backends=("qemu",))
def ipsec_ike_replay(lab: LabSession, backend: Backend) -> list[AttackResult]:
    baseline, baseline_evidence, details = _static_baseline_t4(lab)

    cluster = lab.cluster("qemu")
    lab.start_vm(cluster, "host-a", VM, "qemu")  # db workload: the migrations last long enough to strike during one
    capture = lab.capture("T4-qemu-ipsec")
    report = _migrate_ipsec(lab, cluster)
    pcap = capture.stop()
    source_ip, destination_ip = cluster.addresses["host-a"][0], cluster.addresses["host-b"][0]
    recorded = ike_initiator_messages(udp_packets(str(pcap)), source_ip, destination_ip)
    if len(recorded) < 3:
        raise RuntimeError(
            f"the capture holds {len(recorded)} IKE messages from host-a, expected IKE_SA_INIT, "
            f"IKE_AUTH and CREATE_CHILD_SA at least: {pcap}"
        )
    host_b_vici = _charon_dir(cluster, "host-b") / "charon.vici"

    # (1) After the migration: host-b holds no connection and no PSK for it any more.
    log_before = len(_charon_log(cluster, "host-b"))
    sent, seen, answers, replay_pcap = _replay_watched(lab, recorded, "T4-qemu-ipsec-replay-after")
    log = _charon_log(cluster, "host-b")[log_before:]
    state_after = _host_state(cluster, "host-b")
    refusals = _lines(log, r"no IKE config found", 1)
    after_blocked = seen == len(recorded) and bool(refusals) and not any(state_after.values())

    # (2) During the next migration host-a -> host-b (the guest comes back first), once its SA is up:
    # host-b has a connection for host-a's address loaded, so the replayed IKE_SA_INIT gets a real answer.
    _migrate_ipsec(lab, cluster, "host-b", "host-a")

    def strike(name: str) -> _ReplayDuring:
        # Quick: the migration's SA lives only as long as the migration (a few seconds here).
        before_log, before = len(_charon_log(cluster, "host-b")), _established_ike(host_b_vici, name)
        sent2 = _replay(lab, recorded, gap_s=0.05)
        time.sleep(0.3)
        after = _established_ike(host_b_vici, name)
        text = _charon_log(cluster, "host-b")[before_log:]
        return {
            "sent": sent2,
            "established_before": before,
            "established_after": after,
            "init_requests": text.count("parsed IKE_SA_INIT request"),
            "init_responses": text.count("generating IKE_SA_INIT response 0 [ SA KE No"),
            "log": _lines(text, r"IKE_SA_INIT|is initiating|AUTH|checkout|no IKE config", 4),
        }

    next_report, during, still_loaded = _while_migrating(lab, cluster, "host-a", "host-b", strike, sa_installed=True)
    log_path = _keep_log(lab, _charon_log(cluster, "host-b"), "T4-qemu-ipsec-host-b-charon.log")
    final_state = _host_state(cluster, "host-b")
    during_blocked = (
        during["init_requests"] >= 1
        and during["established_after"] == during["established_before"] == 1
        and still_loaded
        and next_report.get("status") == "completed"
    )
    copies = lab.running_copies(cluster, VM)
    on_b = lab.copies(cluster, VM).get("host-b")
    # What the replayed IKE_SA_INIT left: a half-open IKE SA (CONNECTING: nothing authenticated, no keys for
    # ESP) that charon drops after its half-open timeout; never an ESTABLISHED one, a connection or a PSK.
    half_open = [sa for sa in final_state["sas"] if "CONNECTING" in sa]
    left_over = (
        [sa for sa in final_state["sas"] if "CONNECTING" not in sa] + final_state["conns"] + final_state["shared"]
    )
    blocked = after_blocked and during_blocked and on_b == "running" and not left_over
    half_open_text = (
        f" ({len(half_open)} half-open from the replayed IKE_SA_INIT: unauthenticated, dropped after "
        f"charon's half-open timeout)"
        if half_open
        else ""
    )
    evidence = (
        f"{baseline_evidence}; sealift: recorded the initiator's {len(recorded)} IKE messages of migration "
        f"{report.get('migration_id')} (host-a -> host-b) on the attacker's link and replayed them to host-b from "
        f"{source_ip} (spoofed): (1) after it ended: {seen}/{sent} on the link to host-b ({replay_pcap.name}), "
        f'{len(answers)} answer(s), host-b\'s charon: "{"; ".join(refusals) or "no refusal logged"}", it holds '
        f"{_state_text(state_after)}; (2) during migration {next_report.get('migration_id')} (host-a -> host-b, its "
        f"connection and PSK loaded on host-b, its SA up; {during['sent']} sent, "
        f"{'the connection still loaded after' if still_loaded else 'the migration had ended by then'}): host-b "
        f"parsed {during['init_requests']} IKE_SA_INIT and answered "
        f"{during['init_responses']} with its own new nonce and key share; the replayed IKE_AUTH and "
        f"CREATE_CHILD_SA name the recorded IKE SA's SPIs, which host-b no longer has, and are dropped; "
        f"ESTABLISHED IKE SAs of that migration on host-b {during['established_before']} -> "
        f"{during['established_after']} (its own); the migration {next_report.get('status')}; afterwards host-b "
        f"holds {_state_text(final_state)}"
        f"{half_open_text}; "
        f"charon log {log_path.name}; guest: {_where(lab, cluster)}"
    )
    details.update(
        transport=TRANSPORT,
        sealift_pcap=str(pcap),
        recorded=len(recorded),
        replayed=sent,
        replayed_seen_towards_destination=seen,
        destination_answers=len(answers),
        destination_refusals=refusals,
        destination_state=state_after,
        migration_id=report.get("migration_id"),
        during=during,
        migration_under_attack=next_report.get("migration_id"),
        migration_under_attack_status=next_report.get("status"),
        connection_loaded_during=still_loaded,
        destination_state_final=final_state,
    )
    return [
        AttackResult(
            "T4",
            "IPsec: replay a recorded IKE exchange to the destination",
            "qemu",
            baseline,
            "blocked" if blocked else "succeeded",
            evidence,
            copies,
            details=details,
        )
    ]
