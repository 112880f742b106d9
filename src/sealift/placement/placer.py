"""Choosing a destination from signed, fresh resource adverts (THREATS.md T7).

The source agent asks each peer in its inventory for a signed advert over
mutual TLS, verifies it with the key the peer proved in the handshake, and
lets `adverts.Placement` believe each claim only up to the capacity the
cluster inventory registers for that host. A host that refuses at admission
a VM its advert said it could take is down-ranked.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence

from sealift.guests import VmRegistry
from sealift.host.config import AgentConfig
from sealift.host.transport import ControlChannel
from sealift.placement.adverts import AdvertError, Placement, PlacementChoice, make_advert, sign_advert, verify_advert
from sealift.security.identity import HostIdentity
from sealift.wire.messages import Advert, AdvertQuery

log = logging.getLogger(__name__)

ADVERT_LIFETIME_S = 30.0


def vm_memory(registries: Sequence[VmRegistry], name: str) -> int:
    """The memory (bytes) a VM of this host needs at its destination, whichever backend runs it."""
    for registry in registries:
        if registry.has(name):
            return int(registry.get(name).memory_bytes)  # what its source driver announces in its Hello
    raise KeyError(f"no VM named {name!r} on this host")


def host_usage(registries: Sequence[VmRegistry]) -> tuple[int, int]:
    """(memory in use in bytes, number of VMs) on this host: every backend's guests and incoming reservations,
    so an honest advert never offers memory another backend's guest holds."""
    used = [registry.usage() for registry in registries]
    return sum(memory for memory, _ in used), sum(count for _, count in used)


def our_advert(config: AgentConfig, identity: HostIdentity, used_memory: int, vms: int) -> str:
    """This host's signed advert: what it can still take, now."""
    cpus = os.cpu_count() or 1
    capacity = config.memory_capacity
    if config.lab_advertise_free_memory is not None:  # a liar lies consistently
        capacity = max(capacity, config.inventory.get(config.name, capacity))
    advert = make_advert(
        host=config.name,
        capacity_memory=capacity,
        free_memory=(
            config.lab_advertise_free_memory  # the lab's lying host
            if config.lab_advertise_free_memory is not None
            else max(0, config.memory_capacity - used_memory)
        ),
        cpu_load=round(os.getloadavg()[0] / cpus, 3),
        vms=vms,
        now=time.time(),
        lifetime=ADVERT_LIFETIME_S,
    )
    return sign_advert(advert, identity.private_key())


class Placer:
    def __init__(self, config: AgentConfig, identity: HostIdentity) -> None:
        self._config = config
        self._identity = identity
        self._lock = threading.Lock()
        self.placement = Placement(config.inventory)
        self._claimed_free: dict[str, int] = {}

    def choose(self, vm_memory: int) -> PlacementChoice:
        """Ask every known peer for its advert and pick the best believable host."""
        for host in sorted(self._config.inventory):
            if host == self._config.name or host not in self._config.peers:
                continue
            self._collect(host)
        with self._lock:
            return self.placement.choose(vm_memory, time.time(), exclude={self._config.name})

    def _collect(self, host: str) -> None:
        try:
            channel = ControlChannel.connect(
                self._config.peer_address(host), self._identity, host, True, self._config.handshake_timeout_s
            )
        except Exception as exc:  # an unreachable host is simply not a candidate
            log.info("no advert from %s: %s", host, exc)
            return
        try:
            channel.send(AdvertQuery(secrets.token_hex(16)))
            reply = channel.recv(self._config.handshake_timeout_s)
            assert isinstance(reply, Advert)
            key = channel.tls.peer_certificate.public_key()
            verified = verify_advert(reply.envelope, key, host, time.time())
            with self._lock:
                self.placement.consider(verified)
                self._claimed_free[host] = verified.advert.free_memory
        except (AdvertError, Exception) as exc:
            log.warning("advert from %s ignored: %s", host, exc)
        finally:
            channel.close()

    def admission_refused(self, host: str, reason: str) -> None:
        """The host refused what its advert promised: believe it less from now on."""
        with self._lock:
            if host in self._claimed_free:
                self.placement.report_admission_refused(host, self._claimed_free[host], reason, time.time())
