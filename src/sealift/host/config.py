"""The agent's configuration file (TOML), with every field checked at load."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sealift.errors import SealiftError
from sealift.migration.options import MigrationOptions
from sealift.monitor.service import MonitorConfig

_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(SealiftError, ValueError):
    """The configuration file is missing, unreadable or wrong."""

    code = "config_error"


def parse_size(text: str | int) -> int:
    """'256M' / '4G' / '1048576' -> bytes (binary units, as QEMU's -m)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 256M, 1G or 4G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class GuardConfig:
    """Limits on the migration port, checked before any cryptography (agent/guard.py)."""

    per_peer_rate: float = 20.0  # new connections per second per address
    per_peer_burst: float = 40.0
    handshake_rate: float = 10.0  # TLS handshakes per second per address
    handshake_burst: float = 20.0
    max_connections_per_peer: int = 16
    max_connections: int = 64
    max_incoming_per_peer: int = 2  # concurrent incoming migrations per source host
    # Issue 23 (a flood from many addresses): places only expected hosts ([peers], and addresses that
    # authenticated as a cluster host in the last remember_authenticated_s) may use; an unexpected
    # connection that has not authenticated is evicted for another only after min_tenure_s.
    reserved_connections: int = 16
    min_tenure_s: float = 0.5
    remember_authenticated_s: float = 3600.0
    max_remembered_addresses: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.reserved_connections < self.max_connections:
            raise ValueError(
                f"reserved_connections ({self.reserved_connections}) must be at least 0 and below "
                f"max_connections ({self.max_connections}): unexpected hosts need at least one place"
            )


@dataclass(frozen=True)
class LibvirtConfig:
    """[libvirt]: this host's libvirtd, whose domains the agent lists and migrates (backends/libvirt)."""

    uri: str  # e.g. "qemu:///system", or "qemu+unix:///system?socket=PATH" (a lab host's libvirtd)
    # Where the migration sockets live, as libvirt and its QEMUs see them: the same path on every host
    # (libvirt gives QEMU the same unix:// URI at both ends).
    socket_dir: str = "/run/libvirt/sealift"
    # Where this agent sees the host's /run/libvirt, /var/lib/libvirt, ... if not at those paths (a lab
    # host in a mount namespace of its own: backends/libvirt/paths.py); "" = the same paths.
    local_root: str = ""
    images_dir: str = "/var/lib/libvirt/images"  # the only place an incoming domain's disks may be created


@dataclass(frozen=True)
class AgentConfig:
    name: str
    listen: tuple[str, int]
    control_socket: Path
    state_dir: Path
    vm_dir: Path
    identity_dir: Path
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)
    allow_insecure: bool = False
    memory_capacity: int = 16 << 30
    vcpu_capacity: int = 0  # vCPUs this host may run (0 = 4 per core, a common overcommit)
    max_incoming: int = 4
    handshake_timeout_s: float = 10.0
    hello_timeout_s: float = 2.0  # the whole first TLS record (ClientHello) or magic; at most handshake_timeout_s
    step_timeout_s: float = 30.0
    resolve_interval_s: float = 2.0
    migration: MigrationOptions = field(default_factory=MigrationOptions)
    guard: GuardConfig = field(default_factory=lambda: GuardConfig())
    inventory: dict[str, int] = field(default_factory=dict)  # registered capacity per host (bytes)
    # Attack lab only (THREATS.md T7): make this agent lie about its free memory.
    lab_advertise_free_memory: int | None = None
    # Tests only: an incoming built-in migration stops for lab_pause_s at this named point
    # (see migration/destination.py, LAB_PAUSE_POINTS), so a test can kill the agent exactly there.
    lab_pause_at: str | None = None
    lab_pause_s: float = 600.0  # how long it holds there (tests: until killed; the lab: a strike window)
    policy_path: Path | None = None  # RBAC rules (TOML); none = deny every order
    crl_path: Path | None = None  # the cluster CA's revocation list
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig())  # [monitor]: sealift.monitor
    metrics_listen: tuple[str, int] | None = None  # the agent's Prometheus endpoint (agent/metrics.py)
    libvirt: LibvirtConfig | None = None  # [libvirt]: this host's libvirt domains (none: no libvirt backend)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the agent serves its metrics: `metrics_listen`, else the older `[monitor] metrics_listen`."""
        return self.metrics_listen or self.monitor.metrics_listen

    @property
    def database_path(self) -> Path:
        return self.state_dir / "agent.sqlite3"

    def peer_address(self, host: str) -> tuple[str, int]:
        try:
            return self.peers[host]
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ConfigError(f"unknown host {host!r}: add it under [peers] (known: {known})") from None


def load_config(path: Path) -> AgentConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(raw, base=Path(path).parent)


def config_from_dict(raw: dict, base: Path = Path(".")) -> AgentConfig:
    def need(key: str) -> object:
        if key not in raw:
            raise ConfigError(f"config needs '{key}'")
        return raw[key]

    def path(key: str, default: str | None = None) -> Path:
        value = raw.get(key, default)
        if value is None:
            raise ConfigError(f"config needs '{key}'")
        p = Path(str(value))
        return p if p.is_absolute() else base / p

    name = str(need("name"))
    if not _HOST_RE.match(name):
        raise ConfigError(f"host name {name!r} may only use letters, digits, '.' and '-'")
    peers = {str(host): parse_address(str(addr)) for host, addr in raw.get("peers", {}).items()}
    try:
        migration = MigrationOptions.from_dict(raw.get("migration", {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[migration]: {exc}") from None
    return AgentConfig(
        name=name,
        listen=parse_address(str(need("listen"))),
        control_socket=path("control_socket"),
        state_dir=path("state_dir"),
        vm_dir=path("vm_dir", f"/dev/shm/sealift/{name}"),
        identity_dir=path("identity_dir"),
        peers=peers,
        allow_insecure=bool(raw.get("allow_insecure", False)),
        memory_capacity=parse_size(raw.get("memory_capacity", "16G")),
        vcpu_capacity=int(raw.get("vcpu_capacity", 0)) or 4 * (os.cpu_count() or 1),
        max_incoming=int(raw.get("max_incoming", 4)),
        handshake_timeout_s=float(raw.get("handshake_timeout_s", 10.0)),
        hello_timeout_s=_positive("hello_timeout_s", raw.get("hello_timeout_s", 2.0)),
        step_timeout_s=float(raw.get("step_timeout_s", 30.0)),
        resolve_interval_s=float(raw.get("resolve_interval_s", 2.0)),
        migration=migration,
        guard=_guard_config(raw.get("guard", {})),
        inventory={str(h): parse_size(v) for h, v in raw.get("inventory", {}).items()},
        lab_advertise_free_memory=(
            parse_size(raw["lab_advertise_free_memory"]) if "lab_advertise_free_memory" in raw else None
        ),
        lab_pause_at=_lab_pause_at(raw.get("lab_pause_at")),
        lab_pause_s=float(raw.get("lab_pause_s", 600.0)),
        policy_path=path("policy") if "policy" in raw else None,
        crl_path=path("crl") if "crl" in raw else path("identity_dir") / "ca.crl.pem",
        monitor=_monitor_config(raw.get("monitor", {})),
        metrics_listen=parse_address(str(raw["metrics_listen"])) if "metrics_listen" in raw else None,
        libvirt=_libvirt_config(raw["libvirt"]) if "libvirt" in raw else None,
    )


# Tests only (`lab_pause_at`): named points of an incoming handover (migration/destination.py; QEMU guests,
# backends/qemu/destination.py, hold at the first two).
# "commit-received": Commit read, nothing recorded; "committed": decision recorded, guest not
# started; "launched": guest runs, not yet registered; "adopted": registered, phase not "running".
LAB_PAUSE_POINTS = ("commit-received", "committed", "launched", "adopted")


def _lab_pause_at(value: object) -> str | None:
    if value is None:
        return None
    if value not in LAB_PAUSE_POINTS:
        raise ConfigError(f"lab_pause_at {value!r} is not one of {', '.join(LAB_PAUSE_POINTS)}")
    return str(value)


def _positive(key: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}") from None
    if not number > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    return number


def _guard_config(raw: dict) -> GuardConfig:
    unknown = set(raw) - set(GuardConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"[guard] has unknown keys: {', '.join(sorted(unknown))}")
    try:
        return GuardConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[guard]: {exc}") from None


def _monitor_config(raw: dict) -> MonitorConfig:
    unknown = set(raw) - set(MonitorConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"[monitor] has unknown keys: {', '.join(sorted(unknown))}")
    values = dict(raw)
    if "metrics_listen" in values:
        values["metrics_listen"] = parse_address(str(values["metrics_listen"]))
    try:
        return MonitorConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[monitor]: {exc}") from None


def _libvirt_config(raw: dict) -> LibvirtConfig:
    unknown = set(raw) - set(LibvirtConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"[libvirt] has unknown keys: {', '.join(sorted(unknown))}")
    if "uri" not in raw:
        raise ConfigError("[libvirt] needs 'uri' (e.g. \"qemu:///system\")")
    values = {key: str(value) for key, value in raw.items()}
    for key in ("socket_dir", "images_dir"):
        if key in values and not values[key].startswith("/"):
            raise ConfigError(f"[libvirt] {key} must be an absolute path, not {values[key]!r}")
    return LibvirtConfig(**values)
