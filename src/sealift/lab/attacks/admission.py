# Long file: the admission attacks T5-T7, T9 and T10, each a function, share the insider host's helpers.
"""Control-plane and admission attacks (THREATS.md T5, T6, T7, T9, T10), on real agents in the lab.

The insider is host-c: a third agent with a perfectly valid host
certificate from the cluster CA, running in the attacker's namespace
(`LabSession.cluster(..., hosts=HOSTS_WITH_INSIDER)`). Where it speaks the
protocol itself, bypassing its own agent, it does so from the attacker's
namespace with its own key (`_as_host_c`).

Baselines: sealift's agents check orders, policy, the guard and admission
in every mode, the plaintext baseline included, so most of these attacks
have no unguarded set-up to be run against ("n/a", with the reason in
`details["baseline_note"]`). Where an honest baseline exists it is run:
T6 against a destination with its admission caps lifted, T7 against a
scheduler that believes the same signed adverts without bounding them.

Every result names its evidence: the error the agent returned, the audit
entries (host, seq, kind, code) it wrote, counts, and where the VM runs.
"""

from __future__ import annotations

import datetime
import json
import secrets
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.host.transport import ControlChannel
from sealift.lab.attacks.base import AttackResult, attack
from sealift.lab.netns import enter_netns
from sealift.lab.session import Backend, LabSession
from sealift.placement.adverts import AdvertError, verify_advert
from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.orders import ORDER_KIND, ORDER_VERSION, create_order, format_time
from sealift.security.signing import sign_document
from sealift.wire.messages import Accept, Advert, AdvertQuery, Hello, Refuse

VM = "vm1"
HOSTS_WITH_INSIDER = ("host-a", "host-b", "host-c")
VICTIM_AND_INSIDER = ("host-b", "host-c")  # a push flood needs no source host
NO_UNGUARDED_MODE = (
    "sealift's agents check orders and policy in every mode, the plaintext baseline included: "
    "there is no set-up without them to attack"
)


# -- small helpers ------------------------------------------------------------------------


def audit_head(cluster: LocalCluster, host: str) -> int:
    """The newest audit entry's seq on `host` (0 for an empty log)."""
    entries = cluster.client(host).request("audit.show", limit=1)["entries"]
    return int(entries[0]["seq"]) if entries else 0


def audit_since(cluster: LocalCluster, host: str, after_seq: int, kind: str | None = None) -> list[dict]:
    """Audit entries on `host` newer than `after_seq`, oldest first (optionally of one kind)."""
    entries = cluster.client(host).request("audit.show", limit=500, kind=kind)["entries"]
    return sorted((e for e in entries if int(e["seq"]) > after_seq), key=lambda e: int(e["seq"]))


def clip(text: str, limit: int) -> str:
    """`text` cut at a word boundary to fit `limit` characters (for the report's evidence column)."""
    if len(text) <= limit:
        return text
    return text[: limit - 1].rsplit(" ", 1)[0] + "…"


def entry_ref(entry: dict) -> str:
    """`host-a audit #12 order.refused (wrong_destination)`: an entry, as evidence."""
    code = (entry.get("fields") or {}).get("code")
    return f"{entry['host']} audit #{entry['seq']} {entry['kind']}" + (f" ({code})" if code else "")


def ask_source(
    cluster: LocalCluster, vm: str, to: str, order: str | None, options: dict | None = None
) -> tuple[bool, str]:
    """Ask the source's control API to migrate `vm` to `to` with `order` (None: no order at all).

    Returns (migrated, error text). Called directly, not through LabSession.migrate,
    because that one signs a fresh, valid order whenever none is given.
    """
    try:
        report = cluster.client("host-a").request("migrate", vm=vm, to=to, options=options or {}, order=order)["report"]
    except AgentRequestFailed as exc:
        return False, str(exc)
    return report.get("status") == "completed", str(report.get("error") or "")


def _host_signed_order(cluster: LocalCluster, signer: str, vm: str, source: str, destination: str) -> str:
    """An order in the right format, signed with a *host* key: hosts are not operators."""
    identity = HostIdentity.load(cluster.pki, signer)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    payload = {
        "v": ORDER_VERSION,
        "id": secrets.token_hex(16),
        "vm": vm,
        "source": source,
        "destination": destination,
        "not_before": format_time(now),
        "expires": format_time(now + datetime.timedelta(minutes=5)),
        "issued_at": format_time(now),
        "issuer": signer,
        "labels": {},
        "issuer_certificate": identity.cert_path.read_text(),
    }
    return sign_document(payload, identity.private_key(), signer=signer, kind=ORDER_KIND)


def _hello(
    vm: str, source: str, destination: str, order: str | None, memory_bytes: int, backend: Backend, secure: bool = True
) -> Hello:
    return Hello(
        migration_id=secrets.token_hex(16),
        vm_name=vm,
        source_host=source,
        destination_host=destination,
        nonce=secrets.token_bytes(32),
        memory_bytes=memory_bytes,
        page_size=4096,
        secure=secure,
        compression=None,
        streams=1,
        backend=backend,
        order=order,
        psk_proof=None,
    )


def _as_host_c(
    run: LabSession, cluster: LocalCluster, target: str, secure: bool = True, timeout: float = 5.0
) -> ControlChannel:
    """A control connection from the attacker's namespace, authenticated as host-c (secure) or not."""
    identity = HostIdentity.load(cluster.pki, "host-c") if secure else None
    with enter_netns(run.testbed.ns("attacker")):
        return ControlChannel.connect(cluster.addresses[target], identity, target, secure, timeout)


@dataclass(frozen=True)
class _OrderTry:
    """One order sent to host-a's control API for VM, and what came of it (T5 and T10 send bad orders)."""

    destination: str
    migrated: bool
    error: str
    refusals: list[dict]  # host-a's order.refused audit entries written meanwhile
    copies: dict[str, str]  # where VM is afterwards

    @classmethod
    def send(cls, run: LabSession, cluster: LocalCluster, destination: str, order: str | None) -> _OrderTry:
        head = audit_head(cluster, "host-a")
        migrated, error = ask_source(cluster, VM, destination, order)
        refusals = audit_since(cluster, "host-a", head, "order.refused")
        return cls(destination, migrated, error, refusals, run.copies(cluster, VM))

    def result(
        self,
        run: LabSession,
        cluster: LocalCluster,
        backend: Backend,
        *,
        threat: str,
        attack: str,
        expected_code: str,
        ran: str,
        more_evidence: str = "",
        more_details: dict[str, object] | None = None,
    ) -> AttackResult:
        """The attack's result: blocked when host-a refused and VM still runs there only.

        `ran` opens the evidence when the migration went ahead.
        """
        blocked = not self.migrated and self.copies.get("host-a") == "running" and self.destination not in self.copies
        return AttackResult(
            threat=threat,
            attack=attack,
            backend=backend,
            baseline="n/a",
            sealift="blocked" if blocked else "succeeded",
            evidence=(
                (ran if self.migrated else f"refused by host-a: {clip(self.error, 200)!r}; ")
                + (entry_ref(self.refusals[-1]) if self.refusals else "no order.refused audit entry")
                + more_evidence
            ),
            vm_running_copies=run.running_copies(cluster, VM),
            details={
                "error": self.error,
                "refusal_code": self.refusals[-1]["fields"].get("code") if self.refusals else None,
                "expected_code": expected_code,
                "copies": self.copies,
                "audit_entries": [entry_ref(e) for e in self.refusals],
                "baseline_note": NO_UNGUARDED_MODE,
                **(more_details or {}),
            },
        )


def _describe(reply: object) -> str:
    if isinstance(reply, Refuse):
        return f"Refuse: {reply.reason}"
    return type(reply).__name__


# -- T5: pulling a VM to a host that has no order for it ---------------------------------------


@attack("T5", "pull a VM to an insider host without an order for it", backends=("builtin", "qemu", "libvirt"))
def pull(run: LabSession, backend: Backend) -> list[AttackResult]:
    """host-c (valid certificate) tries to get vm1 sent to it, four ways; each is refused by the source.

    The source agent is the only party that can start a migration, and it
    does so only under an order naming this VM, itself and the peer it then
    authenticates. The attacker's requests reach host-a's migration control
    as any request does (an insider with access to an orchestration tool or
    to a stolen order); host-a's policy does not list host-c as a
    destination (host-c is untrusted), so even an admin's order for host-c
    is refused.
    """
    cluster = run.cluster(backend, hosts=HOSTS_WITH_INSIDER, start=False)
    policy = cluster.agents["host-a"].config_path.parent / "policy.toml"
    policy.write_text(
        "# host-c is not a trusted destination: VMs may move only between host-a and host-b.\n"
        '[[rule]]\nroles = ["admin", "operator"]\nvms = ["*"]\nfrom = ["host-a", "host-b"]\nto = ["host-a", "host-b"]\n'
    )
    cluster.start()
    run.start_vm(cluster, "host-a", VM, backend, workload="web")
    attempts = [
        ("no order at all", None, "malformed"),
        ("an order for host-b, redirected to host-c", cluster.order(VM, "host-a", "host-b"), "wrong_destination"),
        (
            "an order host-c signed with its own host key",
            _host_signed_order(cluster, "host-c", VM, "host-a", "host-c"),
            "untrusted_issuer",
        ),
        (
            "an admin's order for host-c, which the policy does not allow",
            cluster.order(VM, "host-a", "host-c"),
            "denied_by_policy",
        ),
    ]
    results = []
    for what, order, expected_code in attempts:
        head_c = audit_head(cluster, "host-c")
        tried = _OrderTry.send(run, cluster, "host-c", order)
        reached_c = audit_since(cluster, "host-c", head_c, "order.received")
        results.append(
            tried.result(
                run,
                cluster,
                backend,
                threat="T5",
                attack=f"pull {VM} to host-c with {what}",
                expected_code=expected_code,
                ran="the migration to host-c RAN; ",
                more_evidence=f"; host-c received {len(reached_c)} order(s); VM on {sorted(tried.copies)}",
                more_details={"orders_reaching_host_c": len(reached_c)},
            )
        )
    return results


# -- T6: a push flood at a victim host -------------------------------------------------------


@dataclass
class PushOutcome:
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason (abridged) -> count
    failed: list[str] = field(default_factory=list)  # connections that never got an answer
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.accepted + sum(self.refused.values()) + len(self.failed)

    def add_refusal(self, reason: str) -> None:
        key = _reason_class(reason)
        self.refused[key] = self.refused.get(key, 0) + 1


def _reason_class(reason: str) -> str:
    """Group refusals by what refused them (the text after the host-specific part)."""
    for marker, label in (
        ("no migration order", "no order"),
        ("per source host", "guard: migrations per source host"),
        ("limit", "admission: concurrent incoming migrations"),
        ("free of", "admission: memory capacity"),
        ("vCPU", "admission: vCPU capacity"),
    ):
        if marker in reason:
            return label
    return reason[:80]


FLOOD_COUNT = 20
FLOOD_VM_BYTES = 16 << 20


def _push_flood(
    run: LabSession,
    cluster: LocalCluster,
    *,
    with_orders: bool,
    backend: Backend,
    secure: bool,
    held: list[ControlChannel],
    count: int = FLOOD_COUNT,
    memory_bytes: int = FLOOD_VM_BYTES,
) -> PushOutcome:
    """host-c pushes `count` migrations at host-b, one Hello per connection, keeping accepted ones open.

    Accepted conversations are appended to `held` (the caller closes them):
    an accepted push holds the destination's reservation until it times out.
    """
    outcome = PushOutcome()
    started = time.monotonic()
    for i in range(count):
        name = f"flood{i:02d}-{secrets.token_hex(2)}"
        order = cluster.order(name, "host-c", "host-b") if with_orders else None
        try:
            channel = _as_host_c(run, cluster, "host-b", secure=secure)
        except Exception as exc:  # the guard closed the connection before or during the handshake
            outcome.failed.append(f"connect: {type(exc).__name__}: {exc}"[:200])
            continue
        try:
            channel.send(_hello(name, "host-c", "host-b", order, memory_bytes, backend, secure=secure))
            reply = channel.recv(5)
        except Exception as exc:
            outcome.failed.append(f"no answer: {type(exc).__name__}: {exc}"[:200])
            channel.close()
            continue
        if isinstance(reply, Accept):
            outcome.accepted += 1
            held.append(channel)
        else:
            outcome.add_refusal(reply.reason if isinstance(reply, Refuse) else _describe(reply))
            channel.close()
    outcome.seconds = round(time.monotonic() - started, 2)
    return outcome


def _close_all(channels: list[ControlChannel]) -> None:
    for channel in channels:
        try:
            channel.close()
        except OSError:
            pass
    channels.clear()


RESIDENT = "resident"  # host-b's own VM: the victim host must keep serving it


def _blocks(cluster: LocalCluster, host: str, after_seq: int) -> list[dict]:
    """The port watch's blocks (sealift.monitor) audited on `host` since `after_seq`."""
    return audit_since(cluster, host, after_seq, "monitor.peer_blocked")


def _layers(outcome: PushOutcome) -> str:
    closed = len(outcome.failed)
    return f"{outcome.accepted} accepted, refused {outcome.refused or 'none'}" + (
        f", {closed} closed before TLS completed (peer blocked)" if closed else ""
    )


@attack("T6", "push flood at a victim host by an insider", backends=("builtin", "qemu", "libvirt"))
def push_flood(run: LabSession, backend: Backend) -> list[AttackResult]:
    """host-c pushes 20 migrations at host-b, first without orders, then with valid orders.

    Three layers answer, cheapest first: the port watch (sealift.monitor)
    blocks a peer whose refused pushes add up (after about ten), the guard
    caps concurrent migrations per source host (2), and admission caps
    memory, vCPUs and concurrent incoming migrations. The two floods run
    against separate, fresh agents, so that the second is not simply
    blocked by what the first earned.
    """
    results = [_orderless_flood(run, backend)]
    baseline_accepted, baseline_setup = _push_flood_baseline(run, backend)
    results.append(_ordered_flood(run, backend, baseline_accepted, baseline_setup))
    return results


def _orderless_flood(run: LabSession, backend: Backend) -> AttackResult:
    cluster = run.cluster(backend, hosts=VICTIM_AND_INSIDER)
    run.start_vm(cluster, "host-b", RESIDENT, "builtin", workload="idle")
    head_b = audit_head(cluster, "host-b")
    held: list[ControlChannel] = []
    outcome = _push_flood(run, cluster, with_orders=False, backend=backend, secure=True, held=held)
    _close_all(held)
    refusals = audit_since(cluster, "host-b", head_b, "order.refused")
    blocks = _blocks(cluster, "host-b", head_b)
    alive = bool(cluster.client("host-b").request("vm.info", name=RESIDENT)["vm"].get("alive"))
    return AttackResult(
        threat="T6",
        attack=f"host-c pushes {FLOOD_COUNT} migrations without orders at host-b in {outcome.seconds:.1f} s",
        backend=backend,
        baseline="n/a",
        sealift="blocked" if outcome.accepted == 0 and refusals and alive else "succeeded",
        evidence=(
            f"{_layers(outcome)}; {len(refusals)} order.refused entries on host-b"
            + (
                f" (#{refusals[0]['seq']}..#{refusals[-1]['seq']}, code {refusals[0]['fields'].get('code')})"
                if refusals
                else ""
            )
            + (f"; {entry_ref(blocks[0])}: {clip(blocks[0]['fields'].get('reason', ''), 120)}" if blocks else "")
            + f"; host-b's own VM alive: {alive}"
        ),
        vm_running_copies=run.running_copies(cluster, RESIDENT),
        details={
            "refused": outcome.refused,
            "closed": outcome.failed,
            "audit_refusals": len(refusals),
            "peer_blocks": [entry_ref(b) for b in blocks],
            "resident_alive": alive,
            "vm": RESIDENT,
            "baseline_note": NO_UNGUARDED_MODE,
        },
    )


def _ordered_flood(run: LabSession, backend: Backend, baseline_accepted: int, baseline_setup: str) -> AttackResult:
    cluster = run.cluster(backend, hosts=HOSTS_WITH_INSIDER)
    run.start_vm(cluster, "host-a", VM, backend, workload="web")
    run.start_vm(cluster, "host-b", RESIDENT, "builtin", workload="idle")
    head_b = audit_head(cluster, "host-b")
    held: list[ControlChannel] = []
    # A VM larger than the host, then twenty held open at once; a legitimate migration runs meanwhile.
    too_big = _push_flood(
        run, cluster, with_orders=True, backend=backend, secure=True, held=held, count=1, memory_bytes=64 << 30
    )
    _close_all(held)
    flood = _push_flood(run, cluster, with_orders=True, backend=backend, secure=True, held=held)
    try:
        guard = cluster.client("host-b").request("status")["status"].get("guard")
        try:
            report = run.migrate(cluster, VM, run.secure_options(backend))
            legit, legit_ok = f"completed in {report.get('total_time_s')} s", True
        except Exception as exc:
            legit, legit_ok = f"failed: {exc}", False
    finally:
        _close_all(held)
    refused_entries = audit_since(cluster, "host-b", head_b, "migration.refused")
    blocks = _blocks(cluster, "host-b", head_b)
    alive = bool(cluster.client("host-b").request("vm.info", name=RESIDENT)["vm"].get("alive"))
    capped = flood.accepted <= 2 and too_big.accepted == 0
    return AttackResult(
        threat="T6",
        attack=f"host-c pushes {FLOOD_COUNT} ordered migrations at once at host-b (and one larger than the host)",
        backend=backend,
        baseline="succeeded" if baseline_accepted >= FLOOD_COUNT else "blocked",
        sealift="blocked" if capped and legit_ok and alive else "succeeded",
        evidence=(
            f"baseline (caps lifted, plaintext): {baseline_accepted}/{FLOOD_COUNT} accepted; "
            f"sealift: {_layers(flood)}; 64 GiB push: {_layers(too_big)}; "
            f"{len(refused_entries)} migration.refused entries on host-b"
            + (f" (first {entry_ref(refused_entries[0])})" if refused_entries else "")
            + (f"; {entry_ref(blocks[0])}" if blocks else "")
            + f"; legitimate migration of {VM} host-a -> host-b during the flood {legit}; "
            f"host-b's own VM alive: {alive}"
        ),
        vm_running_copies=run.running_copies(cluster, VM),
        details={
            "baseline_setup": baseline_setup,
            "baseline_accepted": baseline_accepted,
            "accepted": flood.accepted,
            "refused": flood.refused,
            "closed": flood.failed,
            "oversized": {"accepted": too_big.accepted, "refused": too_big.refused},
            "flood_seconds": flood.seconds,
            "guard_during_flood": guard,
            "peer_blocks": [entry_ref(b) for b in blocks],
            "legitimate_migration": legit,
            "legitimate_when": "during the flood, while host-c held its slots (the caps and the block are per source)",
            "resident_alive": alive,
            "copies": run.copies(cluster, VM),
        },
    )


def _push_flood_baseline(run: LabSession, backend: Backend) -> tuple[int, str]:
    """The same ordered flood at a destination with its caps lifted, over the plaintext channel."""
    setup = (
        "plaintext (allow_insecure), admission caps lifted on host-b: max_incoming, vcpu_capacity, "
        "guard.max_incoming_per_peer and guard.max_connections_per_peer = 64; orders still signed by the admin"
    )
    cluster = run.cluster(
        backend,
        insecure=True,
        hosts=VICTIM_AND_INSIDER,
        host_config={
            "host-b": "max_incoming = 64\nvcpu_capacity = 64\nguard.max_incoming_per_peer = 64\n"
            "guard.max_connections_per_peer = 64"
        },
    )
    held: list[ControlChannel] = []
    try:
        outcome = _push_flood(run, cluster, with_orders=True, backend=backend, secure=False, held=held)
    finally:
        _close_all(held)
        cluster.stop()  # its reservations and the 20 half-open migrations go with it
    return outcome.accepted, setup


# -- T7: false resource advertising -----------------------------------------------------------


def _naive_choice(run: LabSession, cluster: LocalCluster) -> tuple[str | None, dict[str, int]]:
    """The baseline scheduler: fetch the same signed adverts and believe them (most free memory wins).

    It checks signatures and freshness, as sealift's does, but not whether a
    claim is possible for that host.
    """
    identity = HostIdentity.load(cluster.pki, "host-a")
    claims: dict[str, int] = {}
    for host in ("host-b", "host-c"):
        try:
            with enter_netns(run.testbed.ns("source")):
                channel = ControlChannel.connect(cluster.addresses[host], identity, host, True, 5)
        except Exception:  # an unreachable host is no candidate
            continue
        try:
            channel.send(AdvertQuery(secrets.token_hex(16)))
            reply = channel.recv(5)
            if isinstance(reply, Advert):
                key = channel.tls.peer_certificate.public_key()
                claims[host] = verify_advert(reply.envelope, key, host, time.time()).advert.free_memory
        except (AdvertError, OSError, TimeoutError, ConnectionError):  # no signed, fresh advert: no candidate
            pass
        finally:
            channel.close()
    return (max(claims, key=claims.__getitem__) if claims else None), claims


def _rounded(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else value


def _assessment(placement: dict, host: str) -> dict:
    return next((a for a in placement["assessments"] if a["host"] == host), {})


@attack("T7", "false resource advertising by an insider")
def false_advertising(run: LabSession, backend: Backend) -> list[AttackResult]:
    """host-c lies in its signed adverts; `--to auto` placement must not send the VM there.

    Both backends: placement sizes a QEMU guest from the QEMU registry, and a
    QEMU incoming migration reserves its memory at admission as a built-in one does.
    """
    results = []
    # 1. An impossible claim: 1 TiB free on a host the inventory registers at 16 GiB.
    cluster = run.cluster(backend, hosts=HOSTS_WITH_INSIDER, host_config={"host-c": 'lab_advertise_free_memory = "1T"'})
    run.start_vm(cluster, "host-a", VM, backend, workload="idle")
    naive, claims = _naive_choice(run, cluster)
    placement = cluster.client("host-a").request("place", vm=VM)["placement"]
    liar = _assessment(placement, "host-c")
    results.append(
        AttackResult(
            threat="T7",
            attack="host-c advertises 1 TiB free (registered capacity 16 GiB) to attract VMs",
            backend=backend,
            baseline="succeeded" if naive == "host-c" else "blocked",
            sealift="blocked" if placement["host"] != "host-c" and not liar.get("eligible", False) else "succeeded",
            evidence=(
                f"claims { ({h: f'{v >> 20} MiB' for h, v in claims.items()}) }; baseline scheduler picks {naive}; "
                f"sealift placement picks {placement['host']}; host-c: {liar.get('reason')!r} "
                f"(eligible {liar.get('eligible')}, penalty {_rounded(liar.get('penalty'))})"
            ),
            vm_running_copies=run.running_copies(cluster, VM),
            details={
                "claims": claims,
                "baseline_choice": naive,
                "placement": placement,
                "baseline_setup": "a scheduler that believes signed, fresh adverts without bounding them",
            },
        )
    )
    cluster.stop()

    # 2. A plausible lie: 15 GiB free (within the 16 GiB registered) on a host that holds 64 MiB.
    cluster = run.cluster(
        backend,
        hosts=HOSTS_WITH_INSIDER,
        host_config={
            "host-b": 'memory_capacity = "1G"',
            "host-c": 'memory_capacity = "64M"\nlab_advertise_free_memory = "15G"',
        },
    )
    run.start_vm(cluster, "host-a", VM, backend, workload="idle", memory="128M")
    head_a, head_c = audit_head(cluster, "host-a"), audit_head(cluster, "host-c")
    first = cluster.client("host-a").request("place", vm=VM)["placement"]
    migrated, error = ask_source(cluster, VM, first["host"], cluster.order(VM, "host-a", first["host"]))
    second = cluster.client("host-a").request("place", vm=VM)["placement"]
    copies = run.copies(cluster, VM)
    liar = _assessment(second, "host-c")
    entries = audit_since(cluster, "host-c", head_c, "migration.refused") + audit_since(
        cluster, "host-a", head_a, "migration.aborted"
    )
    caught = first["host"] != "host-c" or (not migrated and "free of" in error)
    results.append(
        AttackResult(
            threat="T7",
            attack="host-c advertises 15 GiB free (plausible) but can hold 64 MiB; migrate --to auto",
            backend=backend,
            baseline="n/a",
            sealift="blocked" if caught and "host-c" not in copies and second["host"] != "host-c" else "succeeded",
            evidence=(
                f"first placement {first['host']}; migration there: "
                + ("completed" if migrated else f"refused at admission: {clip(error, 160)!r}")
                + f"; next placement {second['host']}; host-c penalty {_rounded(liar.get('penalty'))}; "
                f"VM on {sorted(copies)}" + "".join(f"; {entry_ref(e)}" for e in entries)
            ),
            vm_running_copies=run.running_copies(cluster, VM),
            details={
                "first_placement": first,
                "second_placement": second,
                "error": error,
                "copies": copies,
                "audit_entries": [entry_ref(e) for e in entries],
                "baseline_note": "the destination's admission re-check is the same code in every mode",
            },
        )
    )
    return results


# -- T9: handshake flood and slow clients during a legitimate migration ----------------------------


FLOOD_CONNECTIONS = 200
SLOW_CLIENTS = 20
ATTACK_WINDOW_S = 10.0
FLOOD_SPREAD_S = 8.0  # the handshakes are spread over this long, to overlap the whole migration
REFUSED_AT_ONCE_S = 0.5  # a slow client closed sooner than this was refused at accept, not evicted


@dataclass
class FloodReport:
    attempts: int = 0
    closed_by_server: int = 0  # accepted then closed before TLS: the guard's refusal at accept or handshake
    handshakes_failed: int = 0  # TLS refused (no client certificate)
    handshakes_completed: int = 0  # must stay 0: the attacker has no client certificate
    connect_errors: int = 0
    seconds: float = 0.0


@dataclass
class SlowReport:
    opened: int = 0
    connect_errors: int = 0
    refused_at_accept: int = 0  # closed at once (the guard's per-address cap)
    evicted: list[float] = field(default_factory=list)  # seconds until the server hung up on the others
    still_open: int = 0  # not closed by the server within the attack window


def _handshake_flood(ns: str, target: tuple[str, int], count: int, spread_s: float, report: FloodReport) -> None:
    """TLS handshakes without a client certificate, `count` of them spread over `spread_s`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with enter_netns(ns):  # this thread's sockets belong to the attacker's namespace
        for i in range(count):
            pause = started + i * spread_s / count - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            report.attempts += 1
            try:
                raw = socket.create_connection(target, timeout=2)
            except OSError:
                report.connect_errors += 1
                continue
            try:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"x")
                    if tls.recv(1):
                        report.handshakes_completed += 1
                    else:
                        report.handshakes_failed += 1
            except ssl.SSLError:
                report.handshakes_failed += 1
            except OSError:
                report.closed_by_server += 1
            finally:
                raw.close()
    report.seconds = round(time.monotonic() - started, 2)


def _slow_clients(ns: str, target: tuple[str, int], count: int, hold_s: float, report: SlowReport) -> None:
    """Slowloris: open, send the first 3 bytes of a TLS record, then nothing; see when the server hangs up."""
    sockets: list[tuple[socket.socket, float]] = []
    with enter_netns(ns):
        for _ in range(count):
            try:
                sock = socket.create_connection(target, timeout=2)
                sock.sendall(b"\x16\x03\x01")
                sockets.append((sock, time.monotonic()))
                report.opened += 1
            except OSError:
                report.connect_errors += 1
    deadline = time.monotonic() + hold_s
    for sock, opened_at in sockets:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except OSError:  # reset by the server
            closed = True
        finally:
            sock.close()
        after = round(time.monotonic() - opened_at, 2)
        if not closed:
            report.still_open += 1
        elif after < REFUSED_AT_ONCE_S:
            report.refused_at_accept += 1
        else:
            report.evicted.append(after)


def _status_latency(cluster: LocalCluster, host: str, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            cluster.client(host).request("status")
            samples.append(time.monotonic() - started)
        except Exception:
            samples.append(float("inf"))
        stop.wait(0.25)


@attack("T9", "handshake flood and slow clients during a migration")
def handshake_flood(run: LabSession, backend: Backend) -> list[AttackResult]:
    """The VM goes host-a -> host-b in quiet, then back under attack on host-a's migration port.

    One VM both ways, so both timings are of the same guest (and a QEMU run
    boots one guest only). The attacker reaches host-a's port from its own
    address on host-a's link; host-b, the legitimate peer, from another.
    """
    cluster = run.cluster(backend)
    options = dict(run.secure_options(backend))
    if backend == "builtin":
        options["bandwidth_limit_bps"] = 32 << 20  # a migration of a few seconds, for the flood to land on
    run.start_vm(cluster, "host-a", VM, backend, workload="db")
    quiet = run.migrate(cluster, VM, options)
    time.sleep(0.5)  # the guest settles on host-b

    target = cluster.addresses["host-a"]
    ns = run.testbed.ns("attacker")
    flood, slow = FloodReport(), SlowReport()
    latencies: list[float] = []
    stop = threading.Event()
    attackers = [
        threading.Thread(target=_slow_clients, args=(ns, target, SLOW_CLIENTS, ATTACK_WINDOW_S, slow), daemon=True),
        threading.Thread(
            target=_handshake_flood, args=(ns, target, FLOOD_CONNECTIONS, FLOOD_SPREAD_S, flood), daemon=True
        ),
    ]
    watcher = threading.Thread(target=_status_latency, args=(cluster, "host-a", stop, latencies), daemon=True)
    head = audit_head(cluster, "host-a")
    started = time.monotonic()
    for thread in [*attackers, watcher]:
        thread.start()
    time.sleep(0.5)  # the attack is under way before the migration starts
    try:
        report = run.migrate(cluster, VM, options, source="host-b", destination="host-a")
        error = ""
    except Exception as exc:
        report, error = {}, str(exc)
    finally:
        for thread in attackers:
            thread.join(ATTACK_WINDOW_S + 10)
        stop.set()
        watcher.join(5)
    attack_s = round(time.monotonic() - started, 1)
    guard = cluster.client("host-a").request("status")["status"]["guard"]
    blocks = audit_since(cluster, "host-a", head, "monitor.peer_blocked")
    worst = max(latencies) if latencies else float("inf")
    completed = report.get("status") == "completed"
    responsive = worst < 2.0
    evicted = sorted(slow.evicted)
    blocked = completed and flood.handshakes_completed == 0 and responsive and slow.still_open == 0
    return [
        AttackResult(
            threat="T9",
            attack=(
                f"{flood.attempts} TLS handshakes without a certificate + {SLOW_CLIENTS} slow clients "
                f"in {attack_s} s at the destination's port during a migration"
            ),
            backend=backend,
            baseline="n/a",
            sealift="blocked" if blocked else "succeeded",
            evidence=(
                f"migration under attack {'completed' if completed else 'FAILED: ' + clip(error, 160)} in "
                f"{report.get('total_time_s')} s (quiet: {quiet.get('total_time_s')} s); "
                f"handshakes: {flood.handshakes_completed} completed, {flood.handshakes_failed} failed TLS, "
                f"{flood.closed_by_server} closed by the guard; slow clients: {slow.refused_at_accept} refused at "
                f"accept, {len(evicted)} evicted"
                + (f" after {evicted[0]}-{evicted[-1]} s" if evicted else "")
                + f", {slow.still_open} left open; guard refused {guard.get('refused_connections')} connections and "
                f"{guard.get('refused_handshakes')} handshakes; agent status worst {worst * 1000:.0f} ms"
                + (f"; {entry_ref(blocks[0])}" if blocks else "")
            ),
            vm_running_copies=run.running_copies(cluster, VM),
            details={
                "migration_time_s": report.get("total_time_s"),
                "migration_time_without_attack_s": quiet.get("total_time_s"),
                "downtime_ms": report.get("downtime_ms"),
                "downtime_without_attack_ms": quiet.get("downtime_ms"),
                "options": options,
                "error": error,
                "attack_seconds": attack_s,
                "flood": dict(flood.__dict__),
                "slow_clients": {**slow.__dict__, "evicted": evicted},
                "guard": guard,
                "status_latency_ms": {
                    "samples": len(latencies),
                    "worst": round(worst * 1000, 1),
                    "median": round(sorted(latencies)[len(latencies) // 2] * 1000, 1) if latencies else None,
                },
                "peer_blocks": [entry_ref(e) for e in blocks],
                "baseline_note": "the guard runs in every mode; there is no unguarded port to compare with",
            },
        )
    ]


# -- T10: unauthorised operators and audit tampering -----------------------------------------------


@attack("T10", "unauthorised operator and audit-log tampering")
def operators_and_audit(run: LabSession, backend: Backend) -> list[AttackResult]:
    cluster = run.cluster(backend)
    run.start_vm(cluster, "host-a", VM, backend, workload="web")
    results = []

    # 1. and 2.: orders from an operator of another CA, and from a role that may not order.
    with tempfile.TemporaryDirectory(prefix="sealift-lab-evil-ca-") as evil_dir:
        evil_ca = ClusterCA.init(Path(evil_dir) / "ca", name="look-alike cluster CA")
        outsider = evil_ca.issue_operator("mallory", "admin", Path(evil_dir) / "ops")
        auditor = cluster.ca.issue_operator("eve", "auditor", cluster.operators)
        attempts = [
            (
                "an admin certificate from another CA",
                create_order(outsider, VM, "host-a", "host-b"),
                "untrusted_issuer",
            ),
            (
                "an operator whose role (auditor) may not order migrations",
                create_order(auditor, VM, "host-a", "host-b"),
                "denied_by_policy",
            ),
        ]
        for what, order, expected_code in attempts:
            tried = _OrderTry.send(run, cluster, "host-b", order)
            results.append(
                tried.result(
                    run,
                    cluster,
                    backend,
                    threat="T10",
                    attack=f"order {VM} to host-b signed by {what}",
                    expected_code=expected_code,
                    ran="the migration RAN; ",
                )
            )

    # 3. The audit log edited and cut on disk by someone with the file (but not the host's key).
    results.append(_tamper_with_audit(run, cluster, backend))
    return results


def _audit_verify_cli(cluster: LocalCluster, host: str) -> tuple[int, dict]:
    """`sealift audit verify --json` against the agent, as an operator runs it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sealift",
            "audit",
            "verify",
            "--socket",
            str(cluster.agents[host].socket_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        return done.returncode, {"ok": None, "output": (done.stdout + done.stderr)[-500:]}


def _tamper_with_audit(run: LabSession, cluster: LocalCluster, backend: Backend) -> AttackResult:
    before_code, before = _audit_verify_cli(cluster, "host-a")
    db = cluster.agents["host-a"].config_path.parent / "audit.sqlite3"
    with sqlite3.connect(db) as conn:
        # An attacker with the file drops the guards (UPDATE/DELETE triggers) first.
        for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f'DROP TRIGGER "{trigger}"')
        refused = conn.execute("SELECT seq FROM audit_log WHERE kind='order.refused' ORDER BY seq").fetchall()
        received = conn.execute("SELECT seq FROM audit_log WHERE kind='order.received' ORDER BY seq").fetchall()
        edited = int(refused[-1][0])  # hide the refusal of the last order: make it look accepted
        conn.execute(
            "UPDATE audit_log SET body = replace(replace(body, 'order.refused', 'order.accepted'), "
            "'denied_by_policy', 'accepted'), kind = 'order.accepted' WHERE seq = ?",
            (edited,),
        )
        deleted = int(received[0][0])  # and remove the trace of the first attempt altogether
        conn.execute("DELETE FROM audit_log WHERE seq = ?", (deleted,))
    code, verification = _audit_verify_cli(cluster, "host-a")
    named = sorted({p.get("seq") for p in verification.get("problems", []) if p.get("seq") is not None})
    detected = code != 0 and verification.get("ok") is False and edited in named and deleted in named
    problems = [f"#{p.get('seq')}: {p.get('what')}" for p in verification.get("problems", [])]
    return AttackResult(
        threat="T10",
        attack="edit an audit entry (hide a refusal) and delete another, on disk",
        backend=backend,
        baseline="n/a",
        sealift="blocked" if detected and before_code == 0 else "succeeded",
        evidence=(
            f"`sealift audit verify` exit {code} (before: {before_code}); edited #{edited}, deleted #{deleted}; "
            f"named: {named}; " + "; ".join(problems[:3])
        ),
        vm_running_copies=run.running_copies(cluster, VM),
        details={
            "edited_seq": edited,
            "deleted_seq": deleted,
            "named_seqs": named,
            "problems": problems,
            "before": before,
            "verify_exit_code": code,
            "baseline_note": "a log without hash chain and signatures cannot show an edit; nothing to compare",
        },
    )
