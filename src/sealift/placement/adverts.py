"""Signed resource adverts and the placement that trusts them only so far (threat T7).

An agent publishes what it can take (capacity, free memory, load, VM count)
as a document signed with its host key, valid for a short time. A scheduler
(`sealift migrate VM --to auto`, `sealift place VM`) chooses a destination
only among adverts that:

  - verify under the key of the host they name (kind "advert", signer = host),
  - are fresh (not expired, not issued in the future, short-lived),
  - are possible (no negative numbers, no more free memory than capacity, no
    more capacity than the inventory registers for the host),

and it believes a claim only up to the capacity registered for the host minus
what it knows the host holds. The destination still re-checks at admission
(its own memory reservation, backends/builtin/registry.py); when it refuses, the scheduler
reports it here and the host is down-ranked with a penalty that decays, and
the advert that proved false is not used again.

Everything here is sans-IO: time is always passed in as `now` (seconds, the
same clock as the adverts' `issued_at`, i.e. wall-clock time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from sealift.errors import SealiftError
from sealift.security.errors import CertificateError, SecurityError, SignatureError
from sealift.security.identity import validate_hostname
from sealift.security.signing import sign_document, verify_document

ADVERT_KIND = "advert"
DEFAULT_ADVERT_LIFETIME_S = 60.0
MAX_ADVERT_LIFETIME_S = 300.0  # a long-lived advert is a replayable advert
DEFAULT_CLOCK_SKEW_S = 30.0
DEFAULT_PENALTY_HALF_LIFE_S = 3600.0
FORGIVE_BELOW = 0.05  # a penalty that decayed below this no longer counts
_MAX_ABS_INT = 1 << 62  # far above any real memory size; keeps JSON and SQLite exact
_MAX_CPU_LOAD = 1e6
_ADVERT_FIELDS = frozenset({"host", "capacity_memory", "free_memory", "cpu_load", "vms", "issued_at", "expires_at"})


class AdvertError(SecurityError):
    """An advert was refused: forged, for another host, stale, or malformed."""

    code = "advert_refused"


class PlacementError(SealiftError):
    """No host can take the VM; the message and `assessments` say why for each host."""

    code = "no_placement"

    def __init__(self, message: str, assessments: tuple[HostAssessment, ...]) -> None:
        super().__init__(message)
        self.assessments = assessments


# ---------------------------------------------------------------------------
# The advert


@dataclass(frozen=True)
class ResourceAdvert:
    """What a host claims about itself. Numbers are claims: see Placement for what is believed.

    The constructor checks types and that the validity window is well
    formed; it does not reject impossible numbers (negative, free above
    capacity), because a signed impossible claim is evidence Placement uses.
    """

    host: str
    capacity_memory: int  # bytes
    free_memory: int  # bytes
    cpu_load: float  # load per CPU (0.0 idle, 1.0 saturated)
    vms: int
    issued_at: float  # seconds since the epoch
    expires_at: float

    def __post_init__(self) -> None:
        try:
            validate_hostname(self.host)
        except CertificateError as exc:
            raise AdvertError(f"advert names an invalid host: {exc}") from None
        for name in ("capacity_memory", "free_memory", "vms"):
            value = getattr(self, name)
            if type(value) is not int or abs(value) > _MAX_ABS_INT:
                raise AdvertError(f"advert field {name} must be an integer, got {value!r}")
        for name, limit in (("cpu_load", _MAX_CPU_LOAD), ("issued_at", 1e12), ("expires_at", 1e12)):
            value = getattr(self, name)
            # The bound before isfinite: an integer too large for a float makes isfinite raise.
            if type(value) not in (int, float) or abs(value) > limit or not math.isfinite(value):
                raise AdvertError(f"advert field {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # one type, one canonical encoding
        if self.expires_at <= self.issued_at:
            raise AdvertError("advert expires before it is issued")

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    def to_payload(self) -> dict[str, Any]:
        # Every field, in declaration order (the signed payload's key order); all are plain values.
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ResourceAdvert:
        if set(payload) != _ADVERT_FIELDS:
            missing = sorted(_ADVERT_FIELDS - set(payload))
            extra = sorted(str(k)[:64] for k in set(payload) - _ADVERT_FIELDS)
            raise AdvertError(f"malformed advert: missing {missing}, unexpected {extra}")
        return cls(**{name: payload[name] for name in _ADVERT_FIELDS})


@dataclass(frozen=True)
class VerifiedAdvert:
    """An advert whose signature, host and freshness `verify_advert` checked.

    Only `verify_advert` should make these; Placement accepts nothing else.
    """

    advert: ResourceAdvert
    verified_at: float


def make_advert(
    host: str,
    capacity_memory: int,
    free_memory: int,
    cpu_load: float,
    vms: int,
    now: float,
    lifetime: float = DEFAULT_ADVERT_LIFETIME_S,
) -> ResourceAdvert:
    """This host's advert, valid from `now` for `lifetime` seconds."""
    if not 0 < lifetime <= MAX_ADVERT_LIFETIME_S:
        raise ValueError(f"advert lifetime must be in (0, {MAX_ADVERT_LIFETIME_S:g}] seconds")
    return ResourceAdvert(host, capacity_memory, free_memory, cpu_load, vms, now, now + lifetime)


def sign_advert(advert: ResourceAdvert, private_key: ec.EllipticCurvePrivateKey) -> str:
    """The signed envelope (JSON) of `advert`, signed by its host's key."""
    return sign_document(advert.to_payload(), private_key, signer=advert.host, kind=ADVERT_KIND)


def verify_advert(
    envelope: str | bytes,
    public_key: CertificatePublicKeyTypes,  # verify_document checks it is P-256
    expected_host: str,
    now: float,
    *,
    max_skew: float = DEFAULT_CLOCK_SKEW_S,
    max_lifetime: float = MAX_ADVERT_LIFETIME_S,
) -> VerifiedAdvert:
    """Check an advert from `expected_host` (key from its certificate); AdvertError says why not."""
    try:
        payload = verify_document(envelope, public_key, ADVERT_KIND, expected_signer=expected_host)
    except SignatureError as exc:
        raise AdvertError(f"advert from {expected_host} refused: {exc}") from None
    advert = ResourceAdvert.from_payload(payload)
    if advert.host != expected_host:
        raise AdvertError(f"advert signed by {expected_host} describes {advert.host}")
    if advert.issued_at > now + max_skew:
        raise AdvertError(
            f"advert from {expected_host} is issued {advert.issued_at - now:.0f} s in the future "
            f"(more than the {max_skew:g} s clock skew allowed): check the host's clock"
        )
    if advert.lifetime > max_lifetime:
        raise AdvertError(
            f"advert from {expected_host} is valid for {advert.lifetime:.0f} s, "
            f"longer than the {max_lifetime:g} s allowed"
        )
    if now >= advert.expires_at:
        raise AdvertError(f"advert from {expected_host} expired {now - advert.expires_at:.0f} s ago")
    return VerifiedAdvert(advert, now)


# ---------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class HostAssessment:
    """What Placement believes about one host for one VM, and why."""

    host: str
    eligible: bool
    effective_free: int  # bytes believed free (0 when unknown or not believed)
    penalty: float  # decayed penalty for proven false claims (0 = none)
    cpu_load: float | None
    reason: str


@dataclass(frozen=True)
class PlacementChoice:
    host: str
    reason: str
    assessments: tuple[HostAssessment, ...]  # every host considered, best first


@dataclass(frozen=True)
class _Refusal:
    at: float
    claimed_free: int
    reason: str


@dataclass(frozen=True)
class _Placed:
    at: float
    memory: int


class Placement:
    """Chooses a destination among verified adverts; believes claims only up to what is possible.

    `inventory` maps each host to its registered memory capacity in bytes
    (from its certificate or the cluster inventory). Hosts not in it are
    never chosen, so memory here is bounded by the inventory.
    """

    def __init__(
        self,
        inventory: Mapping[str, int],
        *,
        penalty_half_life_s: float = DEFAULT_PENALTY_HALF_LIFE_S,
        max_skew: float = DEFAULT_CLOCK_SKEW_S,
    ) -> None:
        for host, capacity in inventory.items():
            validate_hostname(host)
            if type(capacity) is not int or capacity <= 0:
                raise ValueError(f"registered capacity of {host} must be a positive number of bytes")
        if not penalty_half_life_s > 0:
            raise ValueError("penalty_half_life_s must be positive")
        self._inventory = dict(inventory)
        self._half_life = penalty_half_life_s
        self._max_skew = max_skew
        self._adverts: dict[str, ResourceAdvert] = {}
        self._known_usage: dict[str, int] = {}
        self._placed: dict[str, list[_Placed]] = {}
        self._penalties: dict[str, tuple[float, float]] = {}  # host -> (value, at)
        self._refusals: dict[str, _Refusal] = {}  # the last refused admission per host

    # -- inputs -------------------------------------------------------------

    def consider(self, verified: VerifiedAdvert) -> bool:
        """Take a verified advert into account; False if it is ignored (unknown host, not newer).

        An older advert never replaces a newer one, so replaying an old
        signed advert changes nothing. An advert that claims the impossible
        counts as a false claim (penalty), as a refused admission does.
        """
        if not isinstance(verified, VerifiedAdvert):
            raise TypeError("Placement.consider takes a VerifiedAdvert (see verify_advert)")
        advert = verified.advert
        if advert.host not in self._inventory:
            return False
        held = self._adverts.get(advert.host)
        if held is not None and advert.issued_at <= held.issued_at:
            return False
        self._adverts[advert.host] = advert
        # Placements made before this advert was issued are in its numbers now.
        placed = [p for p in self._placed.get(advert.host, []) if p.at > advert.issued_at]
        self._placed[advert.host] = placed
        if self._impossible(advert) is not None:
            self._add_penalty(advert.host, verified.verified_at)
        return True

    def set_known_usage(self, host: str, memory_bytes: int) -> None:
        """Memory the scheduler knows `host` holds (its VMs as recorded elsewhere)."""
        self._require_known(host)
        if type(memory_bytes) is not int or memory_bytes < 0:
            raise ValueError("memory_bytes must be a non-negative integer")
        self._known_usage[host] = memory_bytes

    def note_placed(self, host: str, vm_memory: int, now: float) -> None:
        """A VM was just sent to `host`: count it until an advert issued after now shows it."""
        self._require_known(host)
        if type(vm_memory) is not int or vm_memory <= 0:
            raise ValueError("vm_memory must be a positive number of bytes")
        # A placement older than any advert's possible lifetime cannot matter
        # any more: the advert it was counted against has expired.
        horizon = now - MAX_ADVERT_LIFETIME_S - self._max_skew
        kept = [p for p in self._placed.get(host, []) if p.at >= horizon]
        self._placed[host] = [*kept, _Placed(now, vm_memory)]

    def report_admission_refused(self, host: str, claimed_free: int, actual_reason: str, now: float) -> None:
        """`host` refused a VM its advert said it could take: down-rank it and distrust that advert.

        Call this for capacity refusals (the claim proved false), not for
        network errors. The penalty decays with a half-life, so a host that
        stops lying is trusted again in time.
        """
        self._require_known(host)
        self._refusals[host] = _Refusal(now, claimed_free, actual_reason[:200])
        self._add_penalty(host, now)

    # -- decisions ------------------------------------------------------------

    def penalty(self, host: str, now: float) -> float:
        value, at = self._penalties.get(host, (0.0, now))
        decayed = value * 0.5 ** (max(0.0, now - at) / self._half_life)
        return decayed if decayed >= FORGIVE_BELOW else 0.0

    def assess(self, vm_memory: int, now: float, exclude: Iterable[str] = ()) -> tuple[HostAssessment, ...]:
        """Every inventory host judged for a VM of `vm_memory` bytes, best candidate first."""
        if type(vm_memory) is not int or vm_memory <= 0:
            raise ValueError("vm_memory must be a positive number of bytes")
        excluded = set(exclude)
        assessments = [self._assess(host, vm_memory, now, excluded) for host in sorted(self._inventory)]
        return tuple(sorted(assessments, key=_rank))

    def choose(self, vm_memory: int, now: float, exclude: Iterable[str] = ()) -> PlacementChoice:
        """The best host for the VM; PlacementError (with every host's reason) if none fits.

        Order among eligible hosts: no penalty before any penalty (then the
        smaller penalty), then the most memory left after placing the VM,
        then the lower CPU load, then the host name (deterministic ties).
        """
        assessments = self.assess(vm_memory, now, exclude)
        eligible = [a for a in assessments if a.eligible]
        if not eligible:
            details = "; ".join(f"{a.host}: {a.reason}" for a in assessments) or "the inventory is empty"
            raise PlacementError(f"no host can take a {_size(vm_memory)} VM: {details}", assessments)
        best = eligible[0]
        others = [f"{a.host}: {a.reason}" for a in assessments if a is not best]
        reason = f"{best.host}: {best.reason}"
        if others:
            reason += "; not chosen: " + "; ".join(others)
        return PlacementChoice(best.host, reason, assessments)

    # -- internals ------------------------------------------------------------

    def _assess(self, host: str, vm_memory: int, now: float, excluded: set[str]) -> HostAssessment:
        penalty = self.penalty(host, now)

        def skip(reason: str, load: float | None = None) -> HostAssessment:
            return HostAssessment(host, False, 0, penalty, load, reason)

        if host in excluded:
            return skip("excluded (the VM's current host, or excluded by the operator)")
        advert = self._adverts.get(host)
        if advert is None:
            return skip("no authenticated advert received")
        if now >= advert.expires_at:
            return skip(f"advert expired {now - advert.expires_at:.0f} s ago", advert.cpu_load)
        if advert.issued_at > now + self._max_skew:
            return skip("advert issued in the future (clock skew?)", advert.cpu_load)
        impossible = self._impossible(advert)
        if impossible is not None:
            return skip(f"impossible claim: {impossible}", advert.cpu_load)
        refusal = self._refusals.get(host)
        if refusal is not None and refusal.at >= advert.issued_at:
            return skip(
                f"its advert claimed {_size(refusal.claimed_free)} free but admission was refused "
                f"({refusal.reason}); waiting for an advert issued after that",
                advert.cpu_load,
            )
        registered = self._inventory[host]
        known = self._known_usage.get(host, 0)
        in_flight = sum(p.memory for p in self._placed.get(host, []))
        believed = min(advert.free_memory, registered - known) - in_flight
        capped = believed < advert.free_memory - in_flight
        detail = f"claims {_size(advert.free_memory)} free"
        if capped:
            detail += f", capped at registered {_size(registered)} minus {_size(known)} known in use"
        if in_flight:
            detail += f", minus {_size(in_flight)} placed since the advert"
        if penalty:
            detail += f", penalty {penalty:.2f} for a false claim"
        if believed < vm_memory:
            return HostAssessment(
                host,
                False,
                max(0, believed),
                penalty,
                advert.cpu_load,
                f"{_size(max(0, believed))} believed free, the VM needs {_size(vm_memory)} ({detail})",
            )
        return HostAssessment(
            host,
            True,
            believed,
            penalty,
            advert.cpu_load,
            f"{_size(believed)} believed free for a {_size(vm_memory)} VM ({detail}), "
            f"load {advert.cpu_load:.2f}, advert {max(0.0, now - advert.issued_at):.0f} s old",
        )

    def _impossible(self, advert: ResourceAdvert) -> str | None:
        registered = self._inventory[advert.host]
        if advert.free_memory < 0 or advert.capacity_memory < 0 or advert.vms < 0 or advert.cpu_load < 0:
            return "negative numbers"
        if advert.free_memory > advert.capacity_memory:
            return f"{_size(advert.free_memory)} free of an advertised {_size(advert.capacity_memory)} capacity"
        if advert.capacity_memory > registered:
            return (
                f"advertises {_size(advert.capacity_memory)} capacity, but {_size(registered)} is registered "
                "(if the host really grew, update the inventory)"
            )
        return None

    def _add_penalty(self, host: str, now: float) -> None:
        value, at = self._penalties.get(host, (0.0, now))
        decayed = value * 0.5 ** (max(0.0, now - at) / self._half_life)
        self._penalties[host] = (decayed + 1.0, now)

    def _require_known(self, host: str) -> None:
        if host not in self._inventory:
            raise ValueError(f"{host} is not in the cluster inventory")


def _rank(a: HostAssessment) -> tuple[int, float, int, float, str]:
    # Eligible first; then unpenalised before penalised (smaller penalty
    # first); then most memory left; then lower load; then the name, so ties
    # are broken the same way on every run.
    return (
        0 if a.eligible else 1,
        a.penalty,
        -a.effective_free,
        a.cpu_load if a.cpu_load is not None else math.inf,
        a.host,
    )


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"
