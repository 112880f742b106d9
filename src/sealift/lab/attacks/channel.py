"""Attacks on the migration channel: snooping (T1), tampering (T2), man-in-the-middle (T3),
replay (T4) and stolen or revoked keys (T13).

Each runs on real agents in the lab's namespaces, first against the plaintext
baseline where there is one (the built-in guest: the agents' `allow_insecure`
stream; a QEMU guest: QEMU's own `plain` TCP migration), then against sealift.
"""

from __future__ import annotations

import datetime
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealift.cluster import LocalCluster
from sealift.lab.attacks.base import AttackResult, Backend, attack
from sealift.lab.capture import Finding, find_in_capture, ip_protocols
from sealift.lab.netns import enter_netns
from sealift.lab.relay import Relay, Tamper
from sealift.lab.runner import LabRun, MigrationFailed
from sealift.security.identity import ClusterCA, HostIdentity

VM = "vm1"
SECRET = b"The bank amount transferred"  # the start of both guests' secret line
STOLEN = b"The bank amount STOLEN!!!!!"  # same length: the attacker's version
PLAIN_TRANSPORT = {"builtin": None, "qemu": "plain"}  # QEMU: its own TCP stream in clear
SEALIFT_TRANSPORT = {"builtin": None, "qemu": "sealift"}
MiB = 1 << 20


def _plain(lab: LabRun, cluster: LocalCluster, backend: Backend, **kwargs: object) -> dict:
    return lab.migrate(cluster, VM, {"secure": False}, transport=PLAIN_TRANSPORT[backend], **kwargs)  # type: ignore[arg-type]


def _secure(lab: LabRun, cluster: LocalCluster, backend: Backend, options: dict | None = None, **kwargs: object) -> dict:
    return lab.migrate(cluster, VM, {"secure": True, **(options or {})}, transport=SEALIFT_TRANSPORT[backend], **kwargs)  # type: ignore[arg-type]


def _where(lab: LabRun, cluster: LocalCluster) -> str:
    copies = lab.copies(cluster, VM)
    return ", ".join(f"{host}: {state}" for host, state in sorted(copies.items())) or "nowhere"


def _last_migration(cluster: LocalCluster, host: str) -> dict:
    records = cluster.client(host).request("migrations", limit=1)["migrations"]
    return records[0] if records else {}


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- T1: passive snooping ------------------------------------------------------------------------


def _describe(finding: Finding, path: Path) -> str:
    if not finding.found:
        return f"0 hits in {path.name}"
    offsets = ", ".join(str(o) for o in finding.file_offsets[:3]) or "none (only after reassembly)"
    flow = finding.flows[0] if finding.flows else "?"
    return f"{path.name} at file offsets {offsets} (flow {flow})"


@attack("T1", "passive snooping (tshark on the attacker's link)")
def passive_snooping(lab: LabRun, backend: Backend) -> list[AttackResult]:
    # Baseline: the same migration in clear, captured on the same link.
    plain = lab.cluster(backend, insecure=True)
    lab.start_vm(plain, "host-a", VM, backend)
    capture = lab.capture(f"T1-{backend}-plain")
    plain_report = _plain(lab, plain, backend)
    plain_pcap = capture.stop()
    plain_hit = find_in_capture(plain_pcap, SECRET)
    plain_copies = lab.running_copies(plain, VM)
    lab.finish(plain)  # one guest named vm1 at a time on the VM network (its MAC comes from its name)

    secure = lab.cluster(backend)
    lab.start_vm(secure, "host-a", VM, backend)
    capture = lab.capture(f"T1-{backend}-sealift")
    report = _secure(lab, secure, backend)
    pcap = capture.stop()
    hit = find_in_capture(pcap, SECRET)
    tcp_packets = ip_protocols(pcap).get(6, 0)
    size_mib = pcap.stat().st_size / MiB
    # The capture must hold the migration, or "not found" proves nothing.
    saw_migration = size_mib >= 8 and tcp_packets > 0
    copies = lab.running_copies(secure, VM)
    blocked = not hit.found and saw_migration and report["status"] == "completed"
    evidence = (
        f"baseline ({plain_report.get('transport')}): secret in {_describe(plain_hit, plain_pcap)}; "
        f"sealift ({report.get('transport')}): {_describe(hit, pcap)} ({size_mib:.0f} MiB, {tcp_packets} TCP packets)"
    )
    return [AttackResult(
        "T1", "passive snooping: search the capture for the guest's secret", backend,
        "succeeded" if plain_hit.found else "blocked", "blocked" if blocked else "succeeded", evidence, copies,
        details={"baseline_pcap": str(plain_pcap), "baseline_offsets": plain_hit.file_offsets,
                 "baseline_flows": plain_hit.flows, "sealift_pcap": str(pcap), "sealift_offsets": hit.file_offsets,
                 "sealift_capture_mib": round(size_mib, 1), "sealift_tcp_packets": tcp_packets,
                 "baseline_copies": plain_copies},
    )]  # fmt: skip


# -- T2: active manipulation -----------------------------------------------------------------------


class _QemuStreamHijack:
    """For QEMU's direct `plain` transport: the destination tells the source its QEMU port
    through the relay (in clear); the attacker opens a tampering relay on that port of its
    own address before passing the answer on, so the source's QEMU connects through it."""

    READY = re.compile(rb'"ready": true, "port": (\d+)')

    def __init__(self, lab: LabRun, destination_ip: str) -> None:
        self._lab = lab
        self._destination_ip = destination_ip
        self.tamper = Tamper(replace=(SECRET, STOLEN), data_stream_only=False)
        self.relays: list[Relay] = []

    def __call__(self, chunk: bytes) -> None:
        match = self.READY.search(chunk)
        if match is None:
            return
        port = int(match.group(1))
        relay = Relay((self._lab.testbed.attacker_ip, port), netns=self._lab.testbed.ns("attacker"))
        relay.target = (self._destination_ip, port)
        relay.tamper = self.tamper
        self.relays.append(relay)
        self._lab._relays.append(relay)  # closed with the run's other relays


def _probe_until_answered(lab: LabRun, vm: dict, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counter = lab.probe(vm, timeout=0.5)
        if counter is not None:
            return counter
    return None


def _tamper_baseline(lab: LabRun, backend: Backend) -> tuple[str, str, dict]:
    relay = lab.relay()
    cluster = lab.cluster(backend, insecure=True, via=relay)
    vm = lab.start_vm(cluster, "host-a", VM, backend)
    if backend == "builtin":
        relay.tamper = tamper = Tamper(replace=(SECRET, STOLEN))
    else:
        hijack = _QemuStreamHijack(lab, lab.testbed.destination_ip)
        relay.on_reply = hijack
        tamper = hijack.tamper
    report = _plain(lab, cluster, backend)
    details: dict[str, object] = {"baseline_transport": report.get("transport")}
    if backend == "builtin":
        check = cluster.client("host-b").request("vm.check", name=VM)["check"]
        altered = tamper.done.is_set() and check["secret_intact"] is False
        details["baseline_check"] = check
        evidence = (f"baseline: relay rewrote the secret in flight; destination guest runs, vm.check "
                    f"secret_intact={check['secret_intact']}")  # fmt: skip
        lab.finish(cluster)
        return ("succeeded" if altered else "blocked"), evidence, details
    counter = _probe_until_answered(lab, vm, 15.0)  # the bridges learn the guest's new port from QEMU's announce
    runs = lab.copies(cluster, VM).get("host-b") == "running" and counter is not None
    altered = tamper.done.is_set() and runs
    evidence = (f"baseline: the relay hijacked QEMU's plain stream and rewrote the secret page "
                f"({'done' if tamper.done.is_set() else 'not seen'}); QEMU accepted it unchecked and the guest runs on "
                f"host-b (probe counter {counter}); its memory is not inspected from inside")  # fmt: skip
    lab.finish(cluster)
    return ("succeeded" if altered else "blocked"), evidence, details


@attack("T2", "active manipulation (relay rewrites bytes in flight)")
def active_manipulation(lab: LabRun, backend: Backend) -> list[AttackResult]:
    baseline, baseline_evidence, details = _tamper_baseline(lab, backend)

    relay = lab.relay()
    cluster = lab.cluster(backend, via=relay)
    lab.start_vm(cluster, "host-a", VM, backend)
    # A single flipped bit in the data stream, well inside the guest's memory.
    relay.tamper = tamper = Tamper(flip_offset=(3 if backend == "builtin" else 1) * MiB)
    error = ""
    try:
        _secure(lab, cluster, backend)
    except MigrationFailed as exc:
        error = str(exc)
    lab.wait_for(lambda: _last_migration(cluster, "host-b").get("phase") in ("aborted", None), 20,
                 "the destination discards the tampered migration")  # fmt: skip
    destination_error = _last_migration(cluster, "host-b").get("error") or ""
    copies = lab.copies(cluster, VM)
    running = lab.running_copies(cluster, VM)
    blocked = bool(error) and tamper.done.is_set() and copies == {"host-a": "running"}
    evidence = (f"{baseline_evidence}; sealift: one bit flipped at stream offset {tamper.flip_offset}, "
                f"aborted: \"{_short(error, 120)}\"; destination: \"{_short(destination_error, 80)}\"; "
                f"guest: {_where(lab, cluster)}")  # fmt: skip
    details.update(sealift_error=error, destination_error=destination_error, copies=copies)
    return [AttackResult("T2", "active manipulation: rewrite guest memory in flight", backend, baseline,  # type: ignore[arg-type]
                         "blocked" if blocked else "succeeded", evidence, running, details=details)]


# -- T3: man in the middle ---------------------------------------------------------------------------


class Impostor:
    """A fake host-b at the attacker's address: terminates TLS with whatever certificate it is
    given (no client check: it wants the VM, not to authenticate anyone) and records what arrives."""

    def __init__(self, lab: LabRun) -> None:
        with enter_netns(lab.testbed.ns("attacker")):
            self._server = socket.create_server((lab.testbed.attacker_ip, 0))
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.context: ssl.SSLContext | None = None
        self.received = 0
        self.handshakes = 0
        threading.Thread(target=self._serve, name="impostor", daemon=True).start()

    def present(self, cert: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.context = context

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            assert self.context is not None
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                while chunk := tls.recv(65536):
                    self.received += len(chunk)
        except (OSError, ssl.SSLError, AssertionError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._server.close()


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def _forged_identities(cluster: LocalCluster) -> dict[str, tuple[Path, Path]]:
    """The three certificates a man in the middle can get hold of, each claiming or being a host."""
    forged = cluster.root / "attacker"
    other_ca = ClusterCA.init(forged / "other-ca")
    other = other_ca.issue_host("host-b", forged / "other-ca-host-b")
    insider = cluster.ca.issue_host("host-c", forged / "host-c")
    return {
        "a self-signed certificate for host-b": _self_signed(forged / "self-signed", "host-b"),
        "host-b's name from another CA": (other.cert_path, other.key_path),
        "host-c's valid certificate (same CA)": (insider.cert_path, insider.key_path),
    }


def _mitm_baseline(lab: LabRun, backend: Backend) -> tuple[str, str]:
    """Plaintext: nothing tells the source that the attacker's address is not host-b."""
    relay = lab.relay()
    cluster = lab.cluster(backend, insecure=True, via=relay)
    lab.start_vm(cluster, "host-a", VM, backend)
    try:  # QEMU: its stream on the agents' data stream in clear (QEMU's direct plain TCP would bypass the relay)
        lab.migrate(cluster, VM, {"secure": False}, transport=None if backend == "builtin" else "sealift-plain")
    except MigrationFailed as exc:
        return "blocked", f"baseline: the plaintext migration through the impostor failed: {_short(str(exc), 100)}"
    finally:
        lab.finish(cluster)
    seen = relay.captured()
    return ("succeeded" if SECRET in seen else "blocked"), (
        f"baseline (plaintext): the source migrated to the impostor at {relay.address[0]}:{relay.address[1]} "
        f"without noticing; it read {len(seen) // MiB} MiB including the secret and passed them on")


@attack("T3", "man in the middle with forged or borrowed certificates")
def man_in_the_middle(lab: LabRun, backend: Backend) -> list[AttackResult]:
    baseline, baseline_evidence = _mitm_baseline(lab, backend)
    impostor = Impostor(lab)
    try:
        cluster = lab.cluster(backend, via=None, start=False)
        _route_to(cluster, "host-a", "host-b", impostor.address)
        cluster.start()
        lab.start_vm(cluster, "host-a", VM, backend)
        results = []
        for what, (cert, key) in _forged_identities(cluster).items():
            impostor.present(cert, key)
            before = impostor.received
            error = ""
            try:
                _secure(lab, cluster, backend)
            except MigrationFailed as exc:
                error = str(exc)
            copies = lab.copies(cluster, VM)
            stolen = impostor.received - before
            blocked = bool(error) and stolen == 0 and copies == {"host-a": "running"}
            evidence = (f"{baseline_evidence}; sealift: refused: \"{_short(error, 150)}\"; the impostor got "
                        f"{stolen} bytes of application data; guest: {_where(lab, cluster)}")  # fmt: skip
            results.append(AttackResult("T3", f"man in the middle with {what}", backend, baseline,  # type: ignore[arg-type]
                                        "blocked" if blocked else "succeeded", evidence,
                                        lab.running_copies(cluster, VM), details={"error": error}))
        return results
    finally:
        impostor.close()


def _route_to(cluster: LocalCluster, host: str, peer: str, address: tuple[str, int]) -> None:
    """Point `host`'s route to `peer` at `address` (the spoofed route of an ARP/DNS hijack)."""
    cluster.peer_routes[(host, peer)] = address
    agent = cluster.agents[host]
    text = agent.config_path.read_text()
    real = cluster.addresses[peer]
    agent.config_path.write_text(text.replace(f'"{peer}" = "{real[0]}:{real[1]}"', f'"{peer}" = "{address[0]}:{address[1]}"'))


# -- T4: replay ---------------------------------------------------------------------------------------


def _accepted(cluster: LocalCluster, host: str) -> int:
    return len(cluster.client(host).request("audit.show", kind="migration.accepted", limit=500)["entries"])


@attack("T4", "replay of a recorded session and of a used order")
def replay(lab: LabRun, backend: Backend) -> list[AttackResult]:
    relay = lab.relay()
    cluster = lab.cluster(backend, via=relay)
    lab.start_vm(cluster, "host-a", VM, backend)
    order = cluster.order(VM, "host-a", "host-b")
    report = _secure(lab, cluster, backend, order=order)
    recorded = [bytes(s) for s in relay.sessions if s]
    cluster.client("host-b").request("vm.stop", name=VM)  # make room: only the replay's own merit decides
    accepted_before = _accepted(cluster, "host-b")
    for session in recorded:
        _send_from_attacker(lab, cluster.addresses["host-b"], session)
    time.sleep(0.5)
    accepted_after = _accepted(cluster, "host-b")
    on_b = lab.copies(cluster, VM).get("host-b")
    session_blocked = accepted_after == accepted_before and on_b is None
    session_result = AttackResult(
        "T4", "replay a recorded migration to the destination", backend, "n/a",
        "blocked" if session_blocked else "succeeded",
        f"recorded {len(recorded)} connections ({sum(map(len, recorded)) // MiB} MiB) of a {report['status']} "
        f"migration and sent them again to host-b from the attacker: migrations accepted by host-b "
        f"{accepted_before} -> {accepted_after}; {VM} on host-b: {on_b or 'absent'}",
        0 if on_b is None else 1, details={"connections": len(recorded)},
    )  # fmt: skip

    # The same signed order again, for a new guest of the same name, also after both agents restart.
    lab.start_vm(cluster, "host-a", VM, backend)
    errors = []
    for restart in (False, True):
        if restart:
            for host in ("host-a", "host-b"):
                cluster.kill(host, signal.SIGTERM)
                cluster.start(host)
        try:
            _secure(lab, cluster, backend, order=order)
            errors.append("")
        except MigrationFailed as exc:
            errors.append(str(exc))
    refusals = cluster.client("host-a").request("audit.show", kind="order.refused", limit=10)["entries"]
    copies = lab.copies(cluster, VM)
    order_blocked = all(errors) and copies == {"host-a": "running"}
    order_result = AttackResult(
        "T4", "reuse a used migration order (also after agent restarts)", backend, "n/a",
        "blocked" if order_blocked else "succeeded",
        f"refused: \"{_short(errors[0], 90)}\"; after restarting both agents: \"{_short(errors[1], 90)}\"; "
        f"audit order.refused entries on host-a: {len(refusals)}; guest: {_where(lab, cluster)}",
        lab.running_copies(cluster, VM), details={"errors": errors},
    )  # fmt: skip
    # The replayed session's guest count: the recorded guest was stopped on purpose; the new one runs once.
    session_result.vm_running_copies = 1 if session_blocked and lab.running_copies(cluster, VM) == 1 else session_result.vm_running_copies
    return [session_result, order_result]


def _send_from_attacker(lab: LabRun, address: tuple[str, int], payload: bytes) -> None:
    with enter_netns(lab.testbed.ns("attacker")):
        sock = socket.create_connection(address, timeout=5)
    with sock:
        sock.settimeout(5)
        try:
            sock.sendall(payload)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # reset by the agent: fine


# -- T13: revoked certificates and old captures ----------------------------------------------------------


@attack("T13", "revoked host certificate; old captures and later keys")
def stolen_keys(lab: LabRun, backend: Backend) -> list[AttackResult]:
    return [_revoked_host(lab, backend), _old_captures(lab, backend)]


def _revoked_host(lab: LabRun, backend: Backend) -> AttackResult:
    cluster = lab.cluster(backend)
    lab.start_vm(cluster, "host-a", VM, backend)
    # host-b's key is stolen: the CA revokes its certificate, every agent gets the new CRL.
    cluster.ca.revoke(HostIdentity.load(cluster.pki, "host-b").certificate(), "key_compromise")
    cluster.kill("host-a", signal.SIGTERM)
    cluster.start("host-a")  # agents read the CRL at start
    error = ""
    try:
        _secure(lab, cluster, backend)
    except MigrationFailed as exc:
        error = str(exc)
    refused = cluster.client("host-a").request("audit.show", kind="peer.refused", limit=5)["entries"]
    copies = lab.copies(cluster, VM)
    blocked = bool(error) and "revoked" in error and copies == {"host-a": "running"}
    evidence = (f"host-b's certificate revoked (key_compromise) and the CRL published: \"{_short(error, 140)}\"; "
                f"audit peer.refused on host-a: {len(refused)}; guest: {_where(lab, cluster)}")  # fmt: skip
    return AttackResult("T13", "migrate to a host whose certificate was revoked", backend, "n/a",
                        "blocked" if blocked else "succeeded", evidence, lab.running_copies(cluster, VM),
                        details={"error": error})


def _old_captures(lab: LabRun, backend: Backend) -> AttackResult:
    cluster = lab.cluster(backend)
    lab.start_vm(cluster, "host-a", VM, backend)
    pcaps = []
    for index, (source, destination) in enumerate((("host-a", "host-b"), ("host-b", "host-a"))):
        capture = lab.capture(f"T13-{backend}-session{index + 1}")
        _secure(lab, cluster, backend, source=source, destination=destination)
        pcaps.append(capture.stop())
    ports = sorted({address[1] for address in cluster.addresses.values()})
    shares = [_server_key_shares(lab, pcap, ports) for pcap in pcaps]
    secret_found = any(find_in_capture(pcap, SECRET).found for pcap in pcaps)
    all_shares = [share for session in shares for share in session]
    distinct = len(all_shares) >= 2 and len(set(all_shares)) == len(all_shares)
    tls13 = all(session for session in shares)
    copies = lab.running_copies(cluster, VM)
    blocked = distinct and tls13 and not secret_found
    evidence = (f"two sessions captured ({', '.join(p.name for p in pcaps)}): {len(all_shares)} TLS 1.3 "
                f"handshakes, every server key share ephemeral and distinct "
                f"({', '.join(s[:12] + '…' for s in all_shares[:4])}); host keys only sign (ECDSA), so a key "
                f"leaked later decrypts neither capture; secret in the captures: {'YES' if secret_found else 'no'}")  # fmt: skip
    return AttackResult("T13", "read old captures with keys stolen later", backend, "n/a",
                        "blocked" if blocked else "succeeded", evidence, copies,
                        details={"key_shares": shares, "pcaps": [str(p) for p in pcaps]})


def _server_key_shares(lab: LabRun, pcap: Path, ports: list[int]) -> list[str]:
    """The servers' ephemeral key shares in the capture's TLS 1.3 ServerHellos (tshark decodes)."""
    argv = ["tshark", "-n", "-r", str(pcap)]
    for port in ports:
        argv += ["-d", f"tcp.port=={port},tls"]
    argv += ["-Y", "tls.handshake.type == 2", "-T", "fields", "-e", "tls.handshake.extensions_key_share_key_exchange",
             "-e", "tls.handshake.extensions.supported_version"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    shares = []
    for line in done.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0] and "0x0304" in fields[1]:  # TLS 1.3
            shares.append(fields[0].replace(":", ""))
    return shares
