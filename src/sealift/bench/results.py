"""Benchmark results without I/O: one run's record, ratios to plain, medians, the Table 4 layout.

A *cell* is what one comparison holds fixed (backend, guest size, workload,
MTU); within a cell and a repetition every transport ran back to back, so a
transport's ratio to plain is taken against the plain run of the same
repetition (noise that hits one repetition hits all its transports alike).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The keys `sealift bench --json` prints per run, in this order (issue 6).
JSON_KEYS = (
    "transport",
    "backend",
    "memory_mib",
    "workload",
    "total_time_s",
    "downtime_ms",
    "downtime_probe_ms",
    "bytes",
    "cpu_s",
    "ratio_to_plain",
)

BASELINE = "plain"
ALL_TRANSPORTS = (
    "plain",
    "qemu-tls",
    "ssh",
    "ssh-aesgcm",
    "ipsec",
    "wireguard",
    "sealift",
    "sealift-ipsec",
    "sealift-plain",
)
# sealift-ipsec is not in the default set: it cannot share a run with ipsec (both run charon on the hosts).
DEFAULT_TRANSPORTS = ("plain", "qemu-tls", "ssh", "ssh-aesgcm", "ipsec", "wireguard", "sealift")
WORKLOADS = ("idle", "moderate", "heavy")  # the test guest's and the built-in VM's memory writers
DEBIAN_WORKLOAD = "serving"  # the Debian guest's load is its client (reads and writes every 10 ms)
BACKENDS = ("qemu", "builtin", "debian")


@dataclass(frozen=True)
class TransportInfo:
    """What a transport protects and how it is built (the qualitative rows of Table 4)."""

    confidentiality_integrity: str
    authentication: str
    implementation: str
    live: bool = True


TRANSPORT_INFO: dict[str, TransportInfo] = {
    "plain": TransportInfo("no", "none", "QEMU `tcp:` straight to the destination QEMU"),
    "qemu-tls": TransportInfo(
        "yes (TLS 1.3, GnuTLS)",
        "x509 both ways (cluster CA) + signed order",
        "QEMU native TLS, driven by the sealift agents",
    ),
    "ssh": TransportInfo("yes (OpenSSH default cipher)", "SSH host + user keys", "`ssh -N -L` tunnel, sshd"),
    "ssh-aesgcm": TransportInfo("yes (aes128-gcm@openssh.com)", "SSH host + user keys", "`ssh -N -L` tunnel, sshd"),
    "ipsec": TransportInfo("yes (ESP AES-256-GCM)", "IKEv2 static PSK", "strongSwan charon, standing SA"),
    "wireguard": TransportInfo("yes (ChaCha20-Poly1305)", "static Curve25519 keys", "wireguard-go (user space)"),
    "sealift-plain": TransportInfo(
        "no", "mutual TLS 1.3 + signed order (control only)", "sealift agents, data stream without protection"
    ),
    "sealift-ipsec": TransportInfo(
        "yes (ESP AES-256-GCM)",
        "IKEv2 PSK derived per migration + signed order",
        "sealift agents drive a strongSwan SA per migration",
    ),
    "sealift": TransportInfo(
        "yes (AES-256-GCM records)", "mutual TLS 1.3 + signed order", "sealift agents (own channel, 2PC handover)"
    ),
}


# The built-in VM's only plaintext path.
BUILTIN_PLAIN = TransportInfo(
    "no", "mutual TLS 1.3 + signed order (control only)", "sealift agents, stream without protection (--insecure)"
)


@dataclass
class RunResult:
    """One migration: what was moved, how, and what it cost."""

    transport: str
    backend: str  # "qemu" or "builtin"
    memory_mib: int
    workload: str  # "idle", "moderate", "heavy"; "serving" for the Debian guest (its client is the load)
    mtu: int
    repetition: int
    total_time_s: float | None = None  # request to the guest running on the destination
    downtime_ms: float | None = None  # as the migrating system reports it (QEMU, or sealift's report)
    downtime_probe_ms: float | None = None  # longest silence seen by the client's probes
    # Source stopped -> guest runs on the destination, the same span for every transport: QEMU's STOP
    # and RESUME events (one clock in the lab) on the direct ones; sealift's report (to the running
    # receipt, so a little longer) on the agents'. QEMU's own downtime ends when the source has sent all.
    downtime_to_running_ms: float | None = None
    qemu_total_ms: float | None = None  # QEMU's own total-time (stream only), when QEMU migrated
    qemu_downtime_ms: float | None = None  # QEMU's own downtime figure
    bytes: int | None = None  # on the wire, both directions, at the attacker's source-side link
    cpu_s: float | None = None  # CPU seconds of every process involved
    peak_cpu_pct: float | None = None  # highest summed CPU over a sampling interval (100 = one core)
    machine_cpu_s: float | None = None  # the whole machine's busy CPU over the run (kernel included)
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    peak_by_role: dict[str, float] = field(default_factory=dict)
    ratio_to_plain: float | None = None
    # A guest with a disk and clients (the Debian guest): what the disk and the clients saw.
    disk_bytes: int | None = None  # the disk mirror's length (what the copy had to move)
    mirror_ms: float | None = None  # the mirror's start to every disk job ready
    requests_failed: int | None = None  # the client's failed HTTP reads and redis writes
    writes_lost: int | None = None  # acknowledged writes missing afterwards (must be 0)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def cell(self) -> tuple[str, int, str, int]:
        return (self.backend, self.memory_mib, self.workload, self.mtu)

    @property
    def ok(self) -> bool:
        return self.error is None and self.total_time_s is not None

    @property
    def throughput_mib_s(self) -> float | None:
        if not self.bytes or not self.total_time_s:
            return None
        return self.bytes / (1 << 20) / self.total_time_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_mib_s"] = self.throughput_mib_s
        return data

    def to_brief_json(self) -> dict[str, Any]:
        """Exactly the keys of `sealift bench --json`."""
        return {key: getattr(self, key) for key in JSON_KEYS}


def fill_ratios(runs: Iterable[RunResult]) -> None:
    """Each run's total time over the plain run of its cell and repetition (None if plain failed)."""
    runs = list(runs)
    plain = {(r.cell, r.repetition): r.total_time_s for r in runs if r.transport == BASELINE and r.ok}
    for run in runs:
        base = plain.get((run.cell, run.repetition))
        run.ratio_to_plain = (
            round(run.total_time_s / base, 3) if run.ok and run.total_time_s is not None and base else None
        )


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))

    def text(self, digits: int = 2, scale: float = 1.0) -> str:
        m, lo, hi = (round(x * scale, digits) for x in (self.median, self.low, self.high))
        fmt = f"{{:.{digits}f}}"
        if self.n == 1 or lo == hi:
            return fmt.format(m)
        return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


NOTE_KEYS = ("cipher", "ipsec_backend", "esp")  # run details worth showing next to the implementation
SUMMARY_METRICS = (
    "total_time_s",
    "downtime_ms",
    "downtime_to_running_ms",
    "downtime_probe_ms",
    "qemu_total_ms",
    "qemu_downtime_ms",
    "bytes",
    "throughput_mib_s",
    "cpu_s",
    "peak_cpu_pct",
    "machine_cpu_s",
    "ratio_to_plain",
    "disk_bytes",
    "mirror_ms",
    "requests_failed",
    "writes_lost",
)


@dataclass
class Summary:
    cell: tuple[str, int, str, int]
    transport: str
    runs: int
    failures: int
    metrics: dict[str, Spread | None]
    guest_crashes: int = 0  # completed migrations after which the guest's kernel died (no probed downtime)
    notes: str = ""  # what the runs found out about the transport (negotiated cipher, IPsec back end)

    def to_json(self) -> dict[str, Any]:
        backend, memory_mib, workload, mtu = self.cell
        return {
            "backend": backend,
            "memory_mib": memory_mib,
            "workload": workload,
            "mtu": mtu,
            "transport": self.transport,
            "runs": self.runs,
            "failures": self.failures,
            "guest_crashes": self.guest_crashes,
            "notes": self.notes,
            "metrics": {k: (asdict(v) if v else None) for k, v in self.metrics.items()},
        }


def summarise(runs: Sequence[RunResult], transport_order: Sequence[str] = ()) -> list[Summary]:
    """Median and min–max per cell and transport, over the runs that completed."""
    groups: dict[tuple[tuple[str, int, str, int], str], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.cell, run.transport), []).append(run)
    rank = {name: i for i, name in enumerate(transport_order)}
    cell_rank = {cell: i for i, cell in enumerate(dict.fromkeys(run.cell for run in runs))}  # in run order

    def key(item: tuple[tuple[tuple[str, int, str, int], str], list[RunResult]]) -> tuple:
        (cell, transport), _ = item
        return (cell_rank[cell], rank.get(transport, len(rank)), transport)

    summaries = []
    for (cell, transport), group in sorted(groups.items(), key=key):
        done = [r for r in group if r.ok]
        metrics = {name: Spread.of(getattr(r, name) for r in done) for name in SUMMARY_METRICS}
        crashes = sum(1 for r in done if r.detail.get("guest_crashed"))
        found = dict.fromkeys(f"{k}: {r.detail[k]}" for r in done for k in NOTE_KEYS if r.detail.get(k))
        summaries.append(
            Summary(cell, transport, len(done), len(group) - len(done), metrics, crashes, ", ".join(found))
        )
    return summaries


def _cell_title(cell: tuple[str, int, str, int]) -> str:
    backend, memory_mib, workload, mtu = cell
    guest = {"qemu": "QEMU guest", "builtin": "built-in VM", "debian": "Debian guest with its disk"}.get(
        backend, backend
    )
    return f"{guest}, {memory_mib} MiB, {workload} workload, MTU {mtu}"


def _cell(spread: Spread | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    return f"{spread.text(digits, scale)}{unit}" if spread else "–"


def table4_markdown(summaries: Sequence[Summary]) -> str:
    """One table per cell in the layout of the dissertation's Table 4: metrics as rows, transports as columns.

    Figures are medians with (min–max) over the runs.
    """
    by_cell: dict[tuple[str, int, str, int], list[Summary]] = {}
    for summary in summaries:
        by_cell.setdefault(summary.cell, []).append(summary)
    out: list[str] = []
    for cell, group in by_cell.items():
        out.append(f"#### {_cell_title(cell)}\n")
        out.append("| | " + " | ".join(s.transport for s in group) + " |")
        out.append("|---" * (len(group) + 1) + "|")
        rows: list[tuple[str, list[str]]] = [
            ("Migration time (s)", [_cell(s.metrics["total_time_s"]) for s in group]),
            ("  vs plain", [_cell(s.metrics["ratio_to_plain"]) for s in group]),
            ("  QEMU's own stream time (s)", [_cell(s.metrics["qemu_total_ms"], 2, 1e-3) for s in group]),
            ("Downtime, reported (ms)", [_cell(s.metrics["downtime_ms"], 0) for s in group]),
            ("Downtime, stop to running (ms)", [_cell(s.metrics["downtime_to_running_ms"], 0) for s in group]),
            ("Downtime, probed (ms)", [_cell(s.metrics["downtime_probe_ms"], 0) for s in group]),
            ("Peak CPU (% of one core)", [_cell(s.metrics["peak_cpu_pct"], 0) for s in group]),
            ("CPU (s), processes involved", [_cell(s.metrics["cpu_s"]) for s in group]),
            ("CPU (s), whole machine", [_cell(s.metrics["machine_cpu_s"]) for s in group]),
            ("On the wire (MiB)", [_cell(s.metrics["bytes"], 0, 1 / (1 << 20)) for s in group]),
            *_disk_rows(group),
            ("Throughput (MiB/s)", [_cell(s.metrics["throughput_mib_s"], 0) for s in group]),
            ("Confidentiality and integrity", [_info(s).confidentiality_integrity for s in group]),
            ("Authentication", [_info(s).authentication for s in group]),
            ("Implementation", [_info(s).implementation + (f" ({s.notes})" if s.notes else "") for s in group]),
            ("Live migration", ["yes" if _info(s).live else "no" for s in group]),
            ("Runs (failed)", [f"{s.runs} ({s.failures})" for s in group]),
            ("Guest crashed after the switchover", [str(s.guest_crashes) for s in group]),
        ]
        for label, cells in rows:
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _disk_rows(group: Sequence[Summary]) -> list[tuple[str, list[str]]]:
    """The rows of a guest with a disk and clients; none for the others."""
    if all(s.metrics["disk_bytes"] is None for s in group):
        return []
    return [
        ("Disk mirrored (MB)", [_cell(s.metrics["disk_bytes"], 0, 1e-6) for s in group]),
        ("Disk mirror time (s)", [_cell(s.metrics["mirror_ms"], 2, 1e-3) for s in group]),
        ("Client's failed requests", [_cell(s.metrics["requests_failed"], 0) for s in group]),
        ("Acknowledged writes lost", [_cell(s.metrics["writes_lost"], 0) for s in group]),
    ]


# The Debian guest's direct variants are driven over QMP by the benchmark (sealift.bench.debian), disk included.
DEBIAN_INFO: dict[str, TransportInfo] = {
    "plain": TransportInfo("no", "none", "QEMU's NBD mirror and migration over TCP, straight to the destination"),
    "qemu-tls": TransportInfo(
        "yes (TLS 1.3, GnuTLS)", "x509 both ways (throwaway CA)", "QEMU's NBD and migration with tls-creds-x509"
    ),
    "ssh": TransportInfo(
        "yes (OpenSSH default cipher)", "SSH host + user keys", "NBD and migration sockets through `ssh -N -L`"
    ),
    "ssh-aesgcm": TransportInfo(
        "yes (aes128-gcm@openssh.com)", "SSH host + user keys", "NBD and migration sockets through `ssh -N -L`"
    ),
}


def _info(summary: Summary) -> TransportInfo:
    if summary.cell[0] == "builtin" and summary.transport == BASELINE:
        return BUILTIN_PLAIN
    if summary.cell[0] == "debian" and summary.transport in DEBIAN_INFO:
        return DEBIAN_INFO[summary.transport]
    return TRANSPORT_INFO.get(summary.transport, TransportInfo("?", "?", "?"))


def interleaved_schedule(
    cells: Sequence[Any], transports: Sequence[str], repetitions: int
) -> list[tuple[Any, int, str]]:
    """(cell, repetition, transport) in run order: per cell, every transport once per repetition."""
    return [(cell, rep, transport) for cell in cells for rep in range(repetitions) for transport in transports]
