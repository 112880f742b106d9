"""Run inside a network namespace by test_qemu_tap.py: a guest on a bridge migrates from one tap to another.

Usage: ip netns exec NS python tap_child.py WORKDIR BRIDGE_IP GUEST_IP/PREFIX TAP_SRC TAP_DST
Prints one JSON object with what it observed; exits non-zero on an error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from qemu_testlib import GapProber
from sealift.backends.qemu.image import SERVICE_PORT, build_image, default_cache_dir
from sealift.backends.qemu.net import NetConfig, mac_for
from sealift.backends.qemu.vm import QemuVM


def first_answer(vm: QemuVM, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = vm.probe(0.3)
        if answer is not None:
            return answer
    return None


def main(workdir: Path, bridge_ip: str, guest_ip: str, tap_src: str, tap_dst: str) -> dict[str, object]:
    image = build_image(default_cache_dir())
    workload = "sealift.mem_mib=32 sealift.rate_mib=8"
    src = QemuVM.start(
        workdir / "src",
        "tapvm",
        192,
        image,
        accel="tcg",
        extra_cmdline=workload,
        net=NetConfig.tap_device(tap_src, guest_ip, bridge_ip),
    )
    dst = QemuVM.start(
        workdir / "dst",
        "tapvm",
        192,
        image,
        accel="tcg",
        extra_cmdline=workload,
        incoming="defer",
        net=NetConfig.tap_device(tap_dst, guest_ip, bridge_ip),
    )
    try:
        src.wait_counter(0, timeout=90)
        before = first_answer(src, 20)
        incoming = workdir / "dst" / "in.sock"
        dst.migrate_incoming(f"unix:{incoming}")
        src.set_migration_parameters({"max-bandwidth": 8 << 30})
        prober = GapProber((guest_ip.split("/")[0], SERVICE_PORT))
        time.sleep(0.5)  # a baseline of answers before the migration starts
        src.migrate(f"unix:{incoming}")
        done = src.wait_migration({"completed"}, timeout=120)
        last_on_source = src.counter()
        deadline = time.monotonic() + 10
        while dst.status() != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        # Same address as before: with the source stopped, only the destination can answer.
        after = first_answer(dst, 20)
        time.sleep(0.5)  # answers after the switchover close the gap
        gap_ms = prober.stop()
        fdb = subprocess.run(["bridge", "fdb", "show", "dev", tap_dst], capture_output=True, text=True, check=False)
        return {
            "before": before,
            "after": after,
            "last_on_source": last_on_source,
            "src_status": src.status(),
            "dst_status": dst.status(),
            "mac": mac_for("tapvm"),
            "mac_learned_on_destination_tap": mac_for("tapvm") in fdb.stdout,
            "qemu_downtime_ms": done.get("downtime"),
            "qemu_total_ms": done.get("total-time"),
            "probe_gap_ms": round(gap_ms, 1),
            "probe_answers": prober.answers,
        }
    finally:
        src.stop_vm()
        dst.stop_vm()


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    print(json.dumps(result))
