"""Run inside a network namespace by test_monitor_qemu.py: flood a QEMU guest on a tap, watch the monitor.

Usage: ip netns exec NS python tap_flood_child.py WORKDIR BRIDGE_IP GUEST_IP/PREFIX TAP
The guest answers every UDP datagram on its service port with a short reply.
A light ping (20/s) is its normal traffic; then a bounded flood of 1400-byte
datagrams (3000/s for at most 10 s) comes in from the bridge. The real
collector reads the tap's counters, the real classifier judges. Prints one
JSON object.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

from sealift.backends.qemu.image import SERVICE_PORT, build_image, default_cache_dir
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.vm import QemuVM
from sealift.monitor.baseline import BaselineConfig
from sealift.monitor.classify import ClassifierConfig, HostMonitor
from sealift.monitor.collectors import QemuCollector

PERIOD_S = 0.5


class OneVm:
    """The registry face the collector needs, over one VM."""

    def __init__(self, vm: QemuVM) -> None:
        self.vm = vm

    def list(self) -> list[dict[str, object]]:
        return [{"name": self.vm.name, "migrating": False}]

    def get(self, name: str) -> QemuVM:
        return self.vm


def send(target: tuple[str, int], rate: float, size: int, stop: threading.Event, until: float) -> None:
    payload = b"x" * size
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sent, start = 0, time.monotonic()
        while not stop.is_set() and time.monotonic() < until:
            sock.sendto(payload, target)
            sent += 1
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def main(workdir: Path, bridge_ip: str, guest_ip: str, tap: str) -> dict[str, object]:
    image = build_image(default_cache_dir())
    vm = QemuVM.start(
        workdir,
        "floodvm",
        160,
        image,
        accel="tcg",
        extra_cmdline="sealift.mem_mib=16 sealift.rate_mib=2",
        net=NetConfig.tap_device(tap, guest_ip, bridge_ip),
    )
    stop = threading.Event()
    try:
        vm.wait_counter(0, timeout=90)
        deadline = time.monotonic() + 20
        while vm.probe(0.3) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest never answered on the bridge")
        target = (guest_ip.split("/")[0], SERVICE_PORT)
        threading.Thread(target=send, args=(target, 20, 16, stop, time.monotonic() + 120), daemon=True).start()
        monitor = HostMonitor(ClassifierConfig(baseline=BaselineConfig(warmup=10)))
        collector = QemuCollector(OneVm(vm))
        events, rows = [], []
        flood_started = None
        for i in range(60):
            for sample in collector.collect():
                events += [e for e in monitor.observe(sample) if e.change == "raised"]
            rows.append(monitor.snapshot()[0]["signals"])
            if i == 16:  # warm (10 scored samples after the first rate), then the flood
                flood_started = time.monotonic()
                threading.Thread(target=send, args=(target, 3000, 1400, stop, flood_started + 10), daemon=True).start()
            if any(e.verdict.kind != "reliability" for e in events):
                break
            time.sleep(PERIOD_S)
        return {
            "verdicts": [e.verdict.to_dict() for e in events],
            "seconds_to_verdict": None if flood_started is None else round(time.monotonic() - flood_started, 1),
            "before_flood": rows[15] if len(rows) > 15 else None,
            "last": rows[-1],
        }
    finally:
        stop.set()
        vm.stop_vm()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]), default=str))
