"""What the engine tells the operator: one report per round, one per migration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RoundReport:
    round: int
    pages_sent: int
    bytes_sent: int
    duration_s: float
    dirty_pages_left: int
    throughput_mib_s: float
    decision: str
    reason: str
    throttle_pct: int = 0
    final: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class MigrationReport:
    migration_id: str
    vm: str
    source: str
    destination: str
    transport: str  # "tls" (AEAD records keyed from mutual TLS 1.3) or "plain"
    status: str = "running"  # "completed" | "failed"
    error: str | None = None
    error_code: str | None = None  # the failure's reason code (errors.py), the same at both ends when known
    total_time_s: float = 0.0
    downtime_ms: float = 0.0
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    memory_bytes: int = 0
    counter_before: int | None = None
    counter_at_pause: int | None = None
    counter_after: int | None = None
    image_digest: str | None = None
    source_cpu_s: float = 0.0
    destination_cpu_s: float = 0.0
    stop_reason: str = ""
    order_id: str | None = None
    operator: str | None = None
    disks: int = 0  # QEMU: the VM's disks, and how many of them the migration copied (not shared)
    disks_copied: int = 0
    disk_bytes_sent: int = 0  # sealed bytes of the disk streams, source -> destination
    mirror_time_s: float | None = None  # from the first mirror job to every disk ready
    downtime_breakdown_ms: dict[str, float] = field(default_factory=dict)
    # QEMU post-copy, when the migration switched: reason, precopy_s, postcopy_s, postcopy_requests (page
    # requests served), postcopy_bytes, return_path_bytes; None for a migration that stayed in pre-copy
    postcopy: dict[str, object] | None = None
    round_reports: list[RoundReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["round_reports"] = [r.to_dict() for r in self.round_reports]
        return data
