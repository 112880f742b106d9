# Long file: the channel attacks T1-T4 and T13, each a function, share the capture and relay helpers.
"""Attacks on the migration channel: snooping (T1), tampering (T2), man-in-the-middle (T3),
replay (T4) and stolen or revoked keys (T13).

Each runs on real agents in the lab's namespaces, first against the plaintext
baseline where there is one (the built-in guest: the agents' `allow_insecure`
stream; a QEMU guest: QEMU's own `plain` TCP migration), then against sealift.
"""

from __future__ import annotations

import datetime
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sealift.cluster import LocalCluster
from sealift.lab.attacks.base import AttackResult, Baseline, attack
from sealift.lab.capture import Finding, dropped_note, find_in_capture, ip_protocols
from sealift.lab.netns import enter_netns
from sealift.lab.relay import Relay, Tamper, accepted
from sealift.lab.session import Backend, LabSession, MigrationFailed
from sealift.security.certificates import certificate_builder
from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.psk import PskStore, new_psk, psk_to_hex, wrap_key_from_private_key

VM = "vm1"
SECRET = b"The bank amount transferred"  # the start of both guests' secret line
STOLEN = b"The bank amount STOLEN!!!!!"  # same length: the attacker's version
# QEMU: its own TCP stream in clear; libvirt: its connections carried by the agents without protection
PLAIN_TRANSPORT = {"builtin": None, "qemu": "plain", "libvirt": None}
SEALIFT_TRANSPORT = {"builtin": None, "qemu": "sealift", "libvirt": None}
MiB = 1 << 20


def _plain(lab: LabSession, cluster: LocalCluster, backend: Backend, **kwargs: object) -> dict:
    return lab.migrate(cluster, VM, {"secure": False}, transport=PLAIN_TRANSPORT[backend], **kwargs)  # type: ignore[arg-type]  # migrate's keywords


def _secure(
    lab: LabSession, cluster: LocalCluster, backend: Backend, options: dict | None = None, **kwargs: object
) -> dict:
    return lab.migrate(cluster, VM, {"secure": True, **(options or {})}, transport=SEALIFT_TRANSPORT[backend], **kwargs)  # type: ignore[arg-type]  # migrate's keywords


def _where(lab: LabSession, cluster: LocalCluster) -> str:
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


@attack("T1", "passive snooping (tshark on the attacker's link)", backends=("builtin", "qemu", "libvirt"))
def passive_snooping(lab: LabSession, backend: Backend) -> list[AttackResult]:
    # Baseline: the same migration in clear, captured on the same link.
    plain = lab.cluster(backend, insecure=True)
    lab.start_vm(plain, "host-a", VM, backend)
    capture = lab.capture(f"T1-{backend}-plain")
    plain_report = _plain(lab, plain, backend)
    plain_pcap = capture.stop()
    plain_dropped = capture.dropped
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
        f"baseline ({plain_report.get('transport')}): secret in {_describe(plain_hit, plain_pcap)}"
        f"{dropped_note(plain_dropped)}; sealift ({report.get('transport')}): {_describe(hit, pcap)} "
        f"({size_mib:.0f} MiB, {tcp_packets} TCP packets){dropped_note(capture.dropped)}"
    )
    return [
        AttackResult(
            "T1",
            "passive snooping: search the capture for the guest's secret",
            backend,
            "succeeded" if plain_hit.found else "blocked",
            "blocked" if blocked else "succeeded",
            evidence,
            copies,
            details={
                "baseline_pcap": str(plain_pcap),
                "baseline_offsets": plain_hit.file_offsets,
                "baseline_flows": plain_hit.flows,
                "sealift_pcap": str(pcap),
                "sealift_offsets": hit.file_offsets,
                "sealift_capture_mib": round(size_mib, 1),
                "sealift_tcp_packets": tcp_packets,
                "baseline_copies": plain_copies,
                "baseline_dropped": plain_dropped,
                "sealift_dropped": capture.dropped,
            },
        )
    ]


# -- T2: active manipulation -----------------------------------------------------------------------


class _QemuStreamHijack:
    """For QEMU's direct `plain` transport: the destination tells the source its QEMU port
    through the relay (in clear); the attacker opens a tampering relay on that port of its
    own address before passing the answer on, so the source's QEMU connects through it."""

    READY = re.compile(rb'"ready": true, "port": (\d+)')

    def __init__(self, lab: LabSession, destination_ip: str) -> None:
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


def _probe_until_answered(lab: LabSession, vm: dict, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counter = lab.probe(vm, timeout=0.5)
        if counter is not None:
            return counter
    return None


def _tamper_baseline(lab: LabSession, backend: Backend) -> tuple[Baseline, str, dict]:
    relay = lab.relay()
    cluster = lab.cluster(backend, insecure=True, via=relay)
    vm = lab.start_vm(cluster, "host-a", VM, backend)
    if backend in ("builtin", "libvirt"):  # libvirt: its memory stream on the agents' unprotected data streams
        relay.tamper = tamper = Tamper(replace=(SECRET, STOLEN))
    else:
        hijack = _QemuStreamHijack(lab, lab.testbed.destination_ip)
        relay.on_reply = hijack
        tamper = hijack.tamper
    if backend == "libvirt":
        return _libvirt_tamper_baseline(lab, cluster, tamper)
    report = _plain(lab, cluster, backend)
    details: dict[str, object] = {"baseline_transport": report.get("transport")}
    if backend == "builtin":
        check = cluster.client("host-b").request("vm.check", name=VM)["check"]
        altered = tamper.done.is_set() and check["secret_intact"] is False
        details["baseline_check"] = check
        evidence = (
            f"baseline: relay rewrote the secret in flight; destination guest runs, vm.check "
            f"secret_intact={check['secret_intact']}"
        )
        lab.finish(cluster)
        return ("succeeded" if altered else "blocked"), evidence, details
    counter = _probe_until_answered(lab, vm, 15.0)  # the bridges learn the guest's new port from QEMU's announce
    runs = lab.copies(cluster, VM).get("host-b") == "running" and counter is not None
    altered = tamper.done.is_set() and runs
    evidence = (
        f"baseline: the relay hijacked QEMU's plain stream and rewrote the secret page "
        f"({'done' if tamper.done.is_set() else 'not seen'}); QEMU accepted it unchecked and the guest runs on "
        f"host-b (probe counter {counter}); its memory is not inspected from inside"
    )
    lab.finish(cluster)
    return ("succeeded" if altered else "blocked"), evidence, details


def _libvirt_tamper_baseline(lab: LabSession, cluster: LocalCluster, tamper: Tamper) -> tuple[Baseline, str, dict]:
    """libvirt's streams carried without protection (--insecure): QEMU loads the rewritten memory unchecked.

    The agents' plaintext digest in the signed manifest still catches it, but
    only after libvirt's own switchover: the domain is then left paused on
    host-b, unstarted, and host-a has no copy to resume (docs/security.md).
    """
    error = ""
    try:
        _plain(lab, cluster, "libvirt")
    except MigrationFailed as exc:
        error = str(exc)
    copies = lab.copies(cluster, VM)
    altered = tamper.done.is_set() and copies.get("host-b") == "running"
    evidence = (
        f"baseline (libvirt's streams carried in clear): the relay rewrote the secret in the memory stream "
        f"({'done' if tamper.done.is_set() else 'not seen'}); QEMU loaded it unchecked; "
        + (f'the manifest digest caught it after libvirt\'s switchover: "{_short(error, 100)}"; ' if error else "")
        + f"guest: {_where(lab, cluster)}"
    )
    lab.finish(cluster)
    return ("succeeded" if altered else "blocked"), evidence, {"baseline_error": error, "baseline_copies": copies}


@attack("T2", "active manipulation (relay rewrites bytes in flight)", backends=("builtin", "qemu", "libvirt"))
def active_manipulation(lab: LabSession, backend: Backend) -> list[AttackResult]:
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
    lab.wait_for(
        lambda: _last_migration(cluster, "host-b").get("phase") in ("aborted", None),
        20,
        "the destination discards the tampered migration",
    )
    destination_error = _last_migration(cluster, "host-b").get("error") or ""
    copies = lab.copies(cluster, VM)
    running = lab.running_copies(cluster, VM)
    blocked = bool(error) and tamper.done.is_set() and copies == {"host-a": "running"}
    evidence = (
        f"{baseline_evidence}; sealift: one bit flipped at stream offset {tamper.flip_offset}, "
        f'aborted: "{_short(error, 120)}"; destination: "{_short(destination_error, 80)}"; '
        f"guest: {_where(lab, cluster)}"
    )
    details.update(sealift_error=error, destination_error=destination_error, copies=copies)
    return [
        AttackResult(
            "T2",
            "active manipulation: rewrite guest memory in flight",
            backend,
            baseline,
            "blocked" if blocked else "succeeded",
            evidence,
            running,
            details=details,
        )
    ]


# -- T3: man in the middle ---------------------------------------------------------------------------


class Impostor:
    """A fake host-b at the attacker's address: terminates TLS with whatever certificate it is
    given (no client check: it wants the VM, not to authenticate anyone) and records what arrives."""

    def __init__(self, lab: LabSession) -> None:
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
        for conn in accepted(self._server):
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


def _self_signed(
    directory: Path,
    name: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (a fresh P-256 key unless one is given): (cert, key) paths."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        certificate_builder(
            subject, subject, key.public_key(), now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption()))
    key_path.chmod(0o600)
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


def _mitm_baseline(lab: LabSession, backend: Backend) -> tuple[Baseline, str]:
    """Plaintext: nothing tells the source that the attacker's address is not host-b."""
    relay = lab.relay()
    cluster = lab.cluster(backend, insecure=True, via=relay)
    lab.start_vm(cluster, "host-a", VM, backend)
    # QEMU: its stream on the agents' data stream in clear (QEMU's direct plain TCP would bypass the relay);
    # libvirt: its connections always go on the agents' data streams
    transport = None if backend in ("builtin", "libvirt") else "sealift-plain"
    try:
        lab.migrate(cluster, VM, {"secure": False}, transport=transport)
    except MigrationFailed as exc:
        return "blocked", f"baseline: the plaintext migration through the impostor failed: {_short(str(exc), 100)}"
    finally:
        lab.finish(cluster)
    seen = relay.captured()
    return ("succeeded" if SECRET in seen else "blocked"), (
        f"baseline (plaintext): the source migrated to the impostor at {relay.address[0]}:{relay.address[1]} "
        f"without noticing; it read {len(seen) // MiB} MiB including the secret and passed them on"
    )


@attack("T3", "man in the middle with forged or borrowed certificates", backends=("builtin", "qemu", "libvirt"))
def man_in_the_middle(lab: LabSession, backend: Backend) -> list[AttackResult]:
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
            evidence = (
                f'{baseline_evidence}; sealift: refused: "{_short(error, 150)}"; the impostor got '
                f"{stolen} bytes of application data; guest: {_where(lab, cluster)}"
            )
            results.append(
                AttackResult(
                    "T3",
                    f"man in the middle with {what}",
                    backend,
                    baseline,
                    "blocked" if blocked else "succeeded",
                    evidence,
                    lab.running_copies(cluster, VM),
                    details={"error": error},
                )
            )
        return results
    finally:
        impostor.close()


def _route_to(cluster: LocalCluster, host: str, peer: str, address: tuple[str, int]) -> None:
    """Point `host`'s route to `peer` at `address` (the spoofed route of an ARP/DNS hijack)."""
    cluster.peer_routes[(host, peer)] = address
    agent = cluster.agents[host]
    text = agent.config_path.read_text()
    real = cluster.addresses[peer]
    agent.config_path.write_text(
        text.replace(f'"{peer}" = "{real[0]}:{real[1]}"', f'"{peer}" = "{address[0]}:{address[1]}"')
    )


# -- T4: replay ---------------------------------------------------------------------------------------


def _accepted(cluster: LocalCluster, host: str) -> int:
    return len(cluster.client(host).request("audit.show", kind="migration.accepted", limit=500)["entries"])


@attack("T4", "replay of a recorded session and of a used order")
def replay(lab: LabSession, backend: Backend) -> list[AttackResult]:
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
        "T4",
        "replay a recorded migration to the destination",
        backend,
        "n/a",
        "blocked" if session_blocked else "succeeded",
        f"recorded {len(recorded)} connections ({sum(map(len, recorded)) // MiB} MiB) of a {report['status']} "
        f"migration and sent them again to host-b from the attacker: migrations accepted by host-b "
        f"{accepted_before} -> {accepted_after}; {VM} on host-b: {on_b or 'absent'}",
        0 if on_b is None else 1,
        details={"connections": len(recorded)},
    )

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
        "T4",
        "reuse a used migration order (also after agent restarts)",
        backend,
        "n/a",
        "blocked" if order_blocked else "succeeded",
        f'refused: "{_short(errors[0], 90)}"; after restarting both agents: "{_short(errors[1], 90)}"; '
        f"audit order.refused entries on host-a: {len(refusals)}; guest: {_where(lab, cluster)}",
        lab.running_copies(cluster, VM),
        details={"errors": errors},
    )
    # The replayed session's guest count: the recorded guest was stopped on purpose; the new one runs once.
    session_result.vm_running_copies = (
        1 if session_blocked and lab.running_copies(cluster, VM) == 1 else session_result.vm_running_copies
    )
    return [session_result, order_result]


def _send_from_attacker(lab: LabSession, address: tuple[str, int], payload: bytes) -> None:
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
def stolen_keys(lab: LabSession, backend: Backend) -> list[AttackResult]:
    return [_revoked_host(lab, backend), _old_captures(lab, backend)]


def _revoked_host(lab: LabSession, backend: Backend) -> AttackResult:
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
    evidence = (
        f'host-b\'s certificate revoked (key_compromise) and the CRL published: "{_short(error, 140)}"; '
        f"audit peer.refused on host-a: {len(refused)}; guest: {_where(lab, cluster)}"
    )
    return AttackResult(
        "T13",
        "migrate to a host whose certificate was revoked",
        backend,
        "n/a",
        "blocked" if blocked else "succeeded",
        evidence,
        lab.running_copies(cluster, VM),
        details={"error": error},
    )


# Old captures and keys stolen later. The baseline is the same kind of session over a channel without
# forward secrecy: the plaintext migration relayed through a TLS 1.2 tunnel with RSA key transport
# (the client encrypts the premaster secret under the server's RSA key), so whoever steals that key
# later decrypts the capture. tshark does the decrypting in both cases, given the stolen keys the same way.

TUNNEL_CIPHER = "AES128-GCM-SHA256"  # TLS_RSA_WITH_AES_128_GCM_SHA256: RSA key transport, no (EC)DHE
TUNNEL_CHUNK = 1 << 16
TSHARK_TIMEOUT_S = 300
# The tunnel paces what it sends: on a loaded lab machine tshark's capture drops segments of a
# faster stream, and after a lost segment tshark cannot find the TLS records that follow it.
TUNNEL_RATE_BPS = 32 * MiB


class _BioSession:
    """One TLS session over a raw socket through memory BIOs: one thread per direction.

    The lock guards only the in-memory TLS work; sends and receives happen
    outside it, so a blocked send in one direction never stalls the other.
    After the handshake, TLS 1.2 reads produce no output, so only the
    encrypting thread sends on the raw socket (records stay in order).
    """

    def __init__(self, context: ssl.SSLContext, raw: socket.socket, server: bool) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._in, self._out, server_side=server, server_hostname=None if server else "tunnel-exit"
        )
        self._raw = raw
        self._lock = threading.Lock()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._send(self._out.read())
                return
            except ssl.SSLWantReadError:
                self._send(self._out.read())
                data = self._raw.recv(TUNNEL_CHUNK)
                if not data:
                    raise ConnectionError("the tunnel's peer closed during the handshake") from None
                self._in.write(data)

    def encrypt_from(self, plain: socket.socket) -> None:
        """plain -> TLS records on the raw socket, until `plain` ends."""
        started, sent = time.monotonic(), 0
        try:
            while data := plain.recv(TUNNEL_CHUNK):
                with self._lock:
                    self.tls.write(data)
                    records = self._out.read()
                self._send(records)
                sent += len(records)
                ahead = sent / TUNNEL_RATE_BPS - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            pass
        _shutdown_write(self._raw)

    def decrypt_into(self, plain: socket.socket) -> None:
        """TLS records from the raw socket -> plain, until the raw socket ends."""
        try:
            while data := self._raw.recv(TUNNEL_CHUNK):
                chunks = []
                with self._lock:
                    self._in.write(data)
                    try:
                        while chunk := self.tls.read(TUNNEL_CHUNK):
                            chunks.append(chunk)
                    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                        pass
                if chunks:
                    plain.sendall(b"".join(chunks))
        except (OSError, ssl.SSLError):
            pass
        _shutdown_write(plain)

    def _send(self, data: bytes) -> None:
        if data:
            self._raw.sendall(data)


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _RsaTunnel:
    """A TLS 1.2 tunnel with RSA key transport from the source namespace to the destination namespace.

    The entry takes the source agent's plain connections and carries each in its own TLS session to
    the exit, which passes it on to `target` (host-b's agent); in between it crosses the attacker's link.
    """

    def __init__(self, lab: LabSession, directory: Path) -> None:
        self.key_path, self.cert_path = _rsa_identity(directory, "tunnel-exit")
        self._server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server.load_cert_chain(self.cert_path, self.key_path)
        self._client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client.load_verify_locations(self.cert_path)
        for context in (self._server, self._client):
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(TUNNEL_CIPHER)
        self._namespaces = {True: lab.testbed.ns("source"), False: lab.testbed.ns("destination")}
        with enter_netns(self._namespaces[True]):
            self._entry = socket.create_server((lab.testbed.source_ip, 0))
        with enter_netns(self._namespaces[False]):
            self._exit = socket.create_server((lab.testbed.destination_ip, 0))
        self.address: tuple[str, int] = self._entry.getsockname()[:2]  # where host-a is sent instead of host-b
        self.exit_address: tuple[str, int] = self._exit.getsockname()[:2]
        self.target: tuple[str, int] | None = None
        self.sessions: list[str] = []  # "TLSv1.2 AES128-GCM-SHA256" per tunnelled connection (the entry's view)
        self._sockets: list[socket.socket] = [self._entry, self._exit]
        for listener, entry in ((self._entry, True), (self._exit, False)):
            threading.Thread(target=self._accept, args=(listener, entry), daemon=True).start()

    def _accept(self, listener: socket.socket, entry: bool) -> None:
        for conn in accepted(listener):
            threading.Thread(target=self._serve, args=(conn, entry), daemon=True).start()

    def _serve(self, conn: socket.socket, entry: bool) -> None:
        onward: socket.socket | None = None
        try:
            assert self.target is not None
            with enter_netns(self._namespaces[entry]):
                onward = socket.create_connection(self.exit_address if entry else self.target, timeout=5)
            onward.settimeout(None)
            self._sockets += [conn, onward]
            raw, plain = (onward, conn) if entry else (conn, onward)
            session = _BioSession(self._client if entry else self._server, raw, server=not entry)
            session.handshake()
            if entry:
                cipher = session.tls.cipher()
                assert cipher is not None  # the handshake is done
                self.sessions.append(f"{session.tls.version()} {cipher[0]}")
            threading.Thread(target=session.decrypt_into, args=(plain,), daemon=True).start()
            session.encrypt_from(plain)
        except (OSError, ssl.SSLError, AssertionError, ConnectionError):
            conn.close()
            if onward is not None:
                onward.close()

    def close(self) -> None:
        for sock in list(self._sockets):
            try:
                sock.close()
            except OSError:
                pass


def _rsa_identity(directory: Path, name: str) -> tuple[Path, Path]:
    """A fresh RSA-2048 key and self-signed certificate for the baseline tunnel's server: (key, cert) paths."""
    cert_path, key_path = _self_signed(
        directory,
        name,
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        serialization.PrivateFormat.TraditionalOpenSSL,
    )
    return key_path, cert_path


@dataclass
class _Decryption:
    """What tshark decrypted from a capture with the keys it was given."""

    tls_streams: int  # TCP connections to the given ports
    decrypted_bytes: int  # application data tshark decrypted, both directions
    secret_found: bool  # the secret in the decrypted application data
    key_errors: list[str]  # tshark's complaints about the keys it was given


def _tshark_decrypt(pcap: Path, keys: list[Path], ports: list[int]) -> _Decryption:
    """Give tshark the stolen private keys (`uat:rsa_keys`) and follow every TLS stream to `ports`."""
    base = ["tshark", "-n", "-r", str(pcap)]
    for key in keys:
        base += ["-o", f'uat:rsa_keys:"{key}",""']
    for port in ports:
        base += ["-d", f"tcp.port=={port},tls"]
    ports_filter = " || ".join(f"tcp.dstport == {port}" for port in ports)
    opened = subprocess.run(
        base
        + ["-Y", f"tcp.flags.syn == 1 && tcp.flags.ack == 0 && ({ports_filter})", "-T", "fields", "-e", "tcp.stream"],
        capture_output=True,
        text=True,
        timeout=TSHARK_TIMEOUT_S,
        check=False,
    )
    streams = sorted({int(line) for line in opened.stdout.split() if line.isdigit()})
    key_errors = sorted({_named(line.strip(), keys) for line in opened.stderr.splitlines() if "Error loading" in line})
    if not streams:
        return _Decryption(0, 0, False, key_errors)
    argv = base + ["-q"] + [arg for stream in streams for arg in ("-z", f"follow,tls,raw,{stream}")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TSHARK_TIMEOUT_S, check=False)
    # One block per stream; the second node's lines are indented. Keep each direction in sequence,
    # so a secret split across two TLS records is still found.
    directions: list[bytearray] = []
    for line in done.stdout.splitlines():
        if line.startswith("Follow: "):
            directions += [bytearray(), bytearray()]
        elif directions and (text := line.strip()) and all(c in "0123456789abcdef" for c in text):
            directions[-1 if line.startswith("\t") else -2] += bytes.fromhex(text)
    decrypted = sum(len(d) for d in directions)
    return _Decryption(len(streams), decrypted, any(SECRET in d for d in directions), key_errors)


def _named(text: str, keys: list[Path]) -> str:
    for key in keys:
        text = text.replace(str(key), key.name)
    return text


def _key_complaints(errors: list[str]) -> str:
    """tshark's "Error loading RSA key file K: why" lines, as "tshark refused K1, K2: why"."""
    by_reason: dict[str, list[str]] = {}
    for error in errors:
        match = re.match(r"Error loading RSA key file (.+?): (.+)", error)
        if match:
            by_reason.setdefault(match.group(2), []).append(match.group(1))
    if not by_reason:
        return "tshark loaded them without complaint"
    return "; ".join(f"tshark refused {', '.join(keys)}: {reason!r}" for reason, keys in by_reason.items())


def _rsa_baseline(lab: LabSession, backend: Backend) -> tuple[Baseline, str, dict]:
    """The plaintext migration inside a TLS 1.2 RSA-key-transport tunnel; then the tunnel's key is stolen."""
    loot = lab.results_dir / f"T13-{backend}-baseline-loot"
    tunnel = _RsaTunnel(lab, loot)
    lab._relays.append(tunnel)  # closed with the run's relays
    cluster = lab.cluster(backend, insecure=True, start=False)
    tunnel.target = cluster.addresses["host-b"]
    _route_to(cluster, "host-a", "host-b", tunnel.address)
    cluster.start()
    lab.start_vm(cluster, "host-a", VM, backend, workload="idle")  # a short stream: it is paced
    capture = lab.capture(f"T13-{backend}-baseline")
    # QEMU: its stream on the agents' data stream in clear, so it takes the agents' route (the tunnel).
    report = lab.migrate(cluster, VM, {"secure": False}, transport=None if backend == "builtin" else "sealift-plain")
    pcap = capture.stop()
    lab.finish(cluster)
    tunnel.close()
    raw_hit = find_in_capture(pcap, SECRET).found
    # Later: the attacker steals the tunnel server's RSA key and decrypts the old capture.
    decryption = _tshark_decrypt(pcap, [tunnel.key_path], [tunnel.exit_address[1]])
    kinds = sorted(set(tunnel.sessions))
    succeeded = decryption.secret_found and not raw_hit and bool(kinds) and report["status"] == "completed"
    evidence = (
        f"baseline: the plaintext migration through a TLS 1.2 tunnel without forward secrecy "
        f"({', '.join(kinds) or 'no session'}, {len(tunnel.sessions)} connections) captured in {pcap.name} "
        f"(secret in the raw capture: {'YES' if raw_hit else 'no'}); with the tunnel server's stolen RSA key "
        f"tshark decrypted {decryption.decrypted_bytes // MiB} MiB of application data in "
        f"{decryption.tls_streams} streams, secret "
        f"{'found' if decryption.secret_found else 'NOT found'}"
    )
    details = {
        "baseline_pcap": str(pcap),
        "baseline_key": str(tunnel.key_path),
        "baseline_sessions": kinds,
        "baseline_decrypted_bytes": decryption.decrypted_bytes,
        "baseline_streams": decryption.tls_streams,
        "baseline_secret_found": decryption.secret_found,
        "baseline_secret_in_raw_capture": raw_hit,
    }
    return ("succeeded" if succeeded else "blocked"), evidence, details


def _steal_psks(cluster: LocalCluster, loot: Path) -> dict[str, dict[str, object]]:
    """Copy each agent's PSK database and unwrap it with that host's stolen key (what a thief with both can do)."""
    stolen: dict[str, dict[str, object]] = {}
    for host in ("host-a", "host-b"):
        peer = "host-b" if host == "host-a" else "host-a"
        copy = loot / host
        copy.mkdir(parents=True, exist_ok=True)
        for path in (cluster.root / host).glob("psk.sqlite3*"):  # the database and its WAL
            shutil.copyfile(path, copy / path.name)
        stolen_key = HostIdentity.load(cluster.pki, host).private_key()
        store = PskStore(copy / "psk.sqlite3", wrap_key_from_private_key(stolen_key))
        try:
            status = store.status(peer)  # unwraps the keys: the thief holds the pair's current PSK
        finally:
            store.close()
        agents_view = cluster.client(host).request("psk.status")["peers"]
        stolen[host] = {
            "peer": peer,
            "epoch": status.epoch,
            "fingerprint": status.fingerprint,
            "matches_agent": any(p["fingerprint"] == status.fingerprint for p in agents_view),
        }
    return stolen


def _old_captures(lab: LabSession, backend: Backend) -> AttackResult:
    baseline, baseline_evidence, details = _rsa_baseline(lab, backend)

    cluster = lab.cluster(backend)
    psk = psk_to_hex(new_psk())  # the optional second factor too: the thief takes its state as well
    for host, peer in (("host-a", "host-b"), ("host-b", "host-a")):
        cluster.client(host).request("psk.provision", peer=peer, key=psk)
    lab.start_vm(cluster, "host-a", VM, backend)
    pcaps = []
    for index, (source, destination) in enumerate((("host-a", "host-b"), ("host-b", "host-a"))):
        capture = lab.capture(f"T13-{backend}-session{index + 1}")
        _secure(lab, cluster, backend, source=source, destination=destination)
        pcaps.append(capture.stop())
    ports = sorted({address[1] for address in cluster.addresses.values()})
    shares = [_server_key_shares(lab, pcap, ports) for pcap in pcaps]
    all_shares = [share for session in shares for share in session]
    distinct = len(all_shares) >= 2 and len(set(all_shares)) == len(all_shares)
    tls13 = all(session for session in shares)
    # Later: both hosts' private keys and their PSK state leak; the attacker decrypts the old captures as above.
    loot = lab.results_dir / f"T13-{backend}-sealift-loot"
    keys = []
    for host in ("host-a", "host-b"):
        keys.append(loot / f"{host}.key")
        loot.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HostIdentity.load(cluster.pki, host).key_path, keys[-1])
    psks = _steal_psks(cluster, loot)
    decryptions = [_tshark_decrypt(pcap, keys, ports) for pcap in pcaps]
    raw_hit = any(find_in_capture(pcap, SECRET).found for pcap in pcaps)
    decrypted = sum(d.decrypted_bytes for d in decryptions)
    secret_found = raw_hit or any(d.secret_found for d in decryptions)
    key_errors = sorted({error for d in decryptions for error in d.key_errors})
    copies = lab.running_copies(cluster, VM)
    blocked = baseline == "succeeded" and decrypted == 0 and not secret_found and distinct and tls13
    psk_note = "; ".join(
        f"{host}'s PSK for {p['peer']} unwrapped with its stolen key (epoch {p['epoch']}, "
        f"fingerprint {str(p['fingerprint'])[:12]}…)"
        for host, p in psks.items()
    )
    evidence = (
        f"{baseline_evidence}; sealift: two sessions captured ({', '.join(p.name for p in pcaps)}); "
        f"both hosts' "
        f"private keys and PSK state stolen ({psk_note}); tshark given both stolen keys the same way: "
        f"{_key_complaints(key_errors)}; decrypted {decrypted} bytes of application data "
        f"in {sum(d.tls_streams for d in decryptions)} streams, secret "
        f"{'FOUND' if secret_found else 'not found'}; {len(all_shares)} TLS 1.3 handshakes, every server key "
        f"share ephemeral and distinct ({', '.join(s[:12] + '…' for s in all_shares[:4])}): the session keys "
        f"came from ECDHE secrets that were never stored; host keys only sign, and the PSK only "
        f"authenticates"
    )
    details.update(
        key_shares=shares,
        pcaps=[str(p) for p in pcaps],
        stolen_keys=[str(k) for k in keys],
        stolen_psks=psks,
        sealift_decrypted_bytes=decrypted,
        sealift_secret_found=secret_found,
        tshark_key_errors=key_errors,
        sealift_streams=[d.tls_streams for d in decryptions],
    )
    return AttackResult(
        "T13",
        "read old captures with keys stolen later",
        backend,
        baseline,
        "blocked" if blocked else "succeeded",
        evidence,
        copies,
        details=details,
    )


def _server_key_shares(lab: LabSession, pcap: Path, ports: list[int]) -> list[str]:
    """The servers' ephemeral key shares in the capture's TLS 1.3 ServerHellos (tshark decodes)."""
    argv = ["tshark", "-n", "-r", str(pcap)]
    for port in ports:
        argv += ["-d", f"tcp.port=={port},tls"]
    argv += [
        "-Y",
        "tls.handshake.type == 2",
        "-T",
        "fields",
        "-e",
        "tls.handshake.extensions_key_share_key_exchange",
        "-e",
        "tls.handshake.extensions.supported_version",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    shares = []
    for line in done.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0] and "0x0304" in fields[1]:  # TLS 1.3
            shares.append(fields[0].replace(":", ""))
    return shares
