"""Switch a running guest to another workload profile: the attack lab's knob, served by the agent's control API.

Built-in guests (`switch_workload`):

The built-in guest reads its workload parameters once when its process
starts (they live in the image's state area, so a migrated guest keeps its
behaviour). Switching therefore restarts the guest process on the same
image: stop it cleanly between ticks (SIGTERM), rewrite the workload fields
of the state area, start a new guest process that continues from the same
counter. Memory contents are untouched and stay verifiable (every page
carries its own index and counter). The VM is claimed meanwhile, so no
migration can start under the switch; if anything fails after the stop, the
guest is restarted on the image as it is, so the VM keeps running.

QEMU guests (`drive_qemu_guest`): nothing restarts. The agent tells the
running guest's workload what to do over its control channel
(backends/qemu/guest_control.py, with the token the agent gave it at
start): the profile names set its dirty rate ("stress" is a write storm,
every page of its region as fast as it can), "flood" starts a bounded
outbound UDP flood toward a target, "restore" brings back what it booted
with. A QEMU guest's memory region is fixed at boot: a profile changes the
rate, not the size.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sealift.backends.builtin.image import GuestImage
from sealift.backends.builtin.workload import WorkloadError, WorkloadParams, WorkloadProfile, get_profile
from sealift.backends.qemu.guest_control import GuestState

if TYPE_CHECKING:
    from sealift.backends.builtin.registry import BuiltinVmRegistry
    from sealift.backends.qemu.registry import QemuVmRegistry

log = logging.getLogger(__name__)


def switch_workload(registry: BuiltinVmRegistry, name: str, profile_name: str) -> dict[str, object]:
    """Restart built-in VM `name` with workload profile `profile_name`; returns its new info."""
    if profile_name in QEMU_ONLY_PROFILES:
        raise WorkloadError(
            f"{profile_name!r} is for QEMU guests: a built-in VM has no network device to "
            "flood from, and is switched by restarting it (profiles idle, web, db, stress)"
        )
    profile = get_profile(profile_name)  # WorkloadError (a ValueError) for an unknown profile
    vm = registry.claim(name)
    try:
        old_pid = vm.pid
        vm.stop()
        vm.close()
        try:
            _rewrite_profile(registry.vm_dir / f"{name}.img", profile_name, profile)
        except Exception:
            log.exception("could not switch %s to %s; restarting it unchanged", name, profile_name)
            registry.start_incoming(name, None)
            raise
        registry.start_incoming(name, profile_name)
    finally:
        registry.unclaim(name)
    info = registry.info(name)
    info["previous_pid"] = old_pid
    return info


def _rewrite_profile(image_path: Path, profile_name: str, profile: WorkloadProfile) -> None:
    with GuestImage.open(image_path) as image:
        state = image.state
        params = WorkloadParams.for_profile(profile, state.npages, state.seed, state.secret_page)
        new_state = dataclasses.replace(
            state,
            profile=profile_name,
            tick_hz=params.tick_hz,
            pages_per_tick=params.pages_per_tick,
            hot_set_pages=params.hot_set_pages,
            hot_set_start=params.hot_set_start,
        )
        image.write_state(new_state.to_bytes())


# QEMU guests: the built-in profile names as dirty rates (MiB/s), as the lab boots them (lab/session.py).
QEMU_PROFILE_RATES = {"idle": 0, "web": 4, "db": 8}
QEMU_PROFILES = ("idle", "web", "db", "stress", "flood", "restore")
QEMU_ONLY_PROFILES = ("flood", "restore")
DEFAULT_FLOOD_PPS = 2000
DEFAULT_FLOOD_S = 20
DEFAULT_FLOOD_BYTES = 1000


@dataclass(frozen=True)
class FloodRequest:
    """`flood`'s parameters: toward `target` (IPv4, port) at `pps` datagrams/s of `size` bytes for `seconds`."""

    target: tuple[str, int]
    pps: int = DEFAULT_FLOOD_PPS
    seconds: int = DEFAULT_FLOOD_S
    size: int = DEFAULT_FLOOD_BYTES

    @classmethod
    def parse(cls, target: object, pps: object = None, seconds: object = None, size: object = None) -> FloodRequest:
        """From a control request's fields; target is "A.B.C.D:PORT". ValueError with a clear message."""
        if not isinstance(target, str) or target.count(":") != 1:
            raise ValueError("profile 'flood' needs target=\"A.B.C.D:PORT\" (where the guest sends its datagrams)")
        host, _, port = target.partition(":")
        if not port.isdigit():
            raise ValueError(f"bad flood target port in {target!r}")

        def number(value: object, default: int, what: str) -> int:
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"flood {what} must be an integer, not {value!r}")
            return value

        return cls(
            (host, int(port)),
            number(pps, DEFAULT_FLOOD_PPS, "pps"),
            number(seconds, DEFAULT_FLOOD_S, "seconds"),
            number(size, DEFAULT_FLOOD_BYTES, "size"),
        )


def drive_qemu_guest(
    registry: QemuVmRegistry, name: str, profile: str, flood: FloodRequest | None = None
) -> GuestState:
    """Make QEMU guest `name` behave as `profile` now; returns what its workload reports.

    Raises ValueError for a profile a QEMU guest cannot do, GuestControlError
    if the guest refuses or does not answer, QemuVmError if it cannot be reached.
    """
    if profile not in QEMU_PROFILES:
        raise WorkloadError(f"unknown workload profile {profile!r} for a QEMU guest; known: {', '.join(QEMU_PROFILES)}")
    if (profile == "flood") != (flood is not None):
        raise ValueError("a flood target goes with profile 'flood' only" if flood else "profile 'flood' needs a target")
    control = registry.guest_control(name)
    if profile == "stress":
        return control.storm()
    if profile == "flood":
        assert flood is not None
        return control.flood(flood.target, flood.pps, flood.seconds, flood.size)
    if profile == "restore":
        return control.restore()
    control.stop()  # a named profile is the whole behaviour: no flood goes on under it
    return control.rate(QEMU_PROFILE_RATES[profile])
