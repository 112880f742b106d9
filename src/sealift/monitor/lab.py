"""Attack-lab knob: switch a running built-in guest to another workload profile.

The built-in guest reads its workload parameters once when its process
starts (they live in the image's state area, so a migrated guest keeps its
behaviour). Switching therefore restarts the guest process on the same
image: stop it cleanly between ticks (SIGTERM), rewrite the workload fields
of the state area, start a new guest process that continues from the same
counter. Memory contents are untouched and stay verifiable (every page
carries its own index and counter). The VM is claimed meanwhile, so no
migration can start under the switch; if anything fails after the stop, the
guest is restarted on the image as it is, so the VM keeps running.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sealift.backends.builtin.image import GuestImage
from sealift.backends.builtin.workload import WorkloadParams, WorkloadProfile, get_profile

if TYPE_CHECKING:
    from sealift.agent.vms import VmRegistry

log = logging.getLogger(__name__)


def switch_workload(registry: VmRegistry, name: str, profile_name: str) -> dict[str, object]:
    """Restart built-in VM `name` with workload profile `profile_name`; returns its new info."""
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
