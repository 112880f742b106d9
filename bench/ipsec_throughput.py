"""TCP throughput through the strongSwan IPsec tunnel vs. plain TCP, on the same namespace testbed, in one run.

    .venv/bin/python bench/ipsec_throughput.py [--mib 256] [--runs 3] [--esp aes256gcm] [--mtu 1500] [--json]

Two hosts (namespaces) joined through a router namespace; a bounded TCP
transfer from host a to host b on the migration port, first in the clear,
then through an IpsecTunnel (libipsec here: user-space ESP over TUN, in UDP
on port 4500; the kernel's ESP where it exists). Reports the median and
min-max MB/s of each, the ratio, and the CPU seconds the two charons spent
per run (with libipsec, that is where ESP runs). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from sealift.ipsec.charon import Charon, detect_backend
from sealift.ipsec.tunnel import IpsecTunnel, TunnelHost
from sealift.lab.ipsec.routed_pair import RoutedPair
from sealift.lab.ipsec.secret_transfer import run_transfer

PORT = 7470
MB = 1_000_000


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="bytes per transfer, MiB (bounded: at most 4096)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--esp", default="aes256gcm", choices=["aes128gcm", "aes256gcm"])
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    size = min(args.mib, 4096) << 20
    backend = detect_backend()
    plain, ipsec, charon_cpu = [], [], []
    with RoutedPair(f"slips-bench-{os.getpid() % 10000}", mtu=args.mtu) as lab:
        source = TunnelHost(lab.a.netns, lab.a.address, "host-a")
        destination = TunnelHost(lab.b.netns, lab.b.address, "host-b")
        with Charon(lab.a.netns, backend) as charon_a, Charon(lab.b.netns, backend) as charon_b:
            for run in range(args.runs):
                result = run_transfer(lab.b.netns, lab.b.address, lab.a.netns, PORT, size, timeout_s=600)
                plain.append(result["bytes"] / result["seconds"] / MB)
                with IpsecTunnel(
                    source,
                    destination,
                    PORT,
                    os.urandom(32),
                    name=f"bench-{run}",
                    psk_generation="bench",
                    esp=args.esp,
                    charons=(charon_a, charon_b),
                ) as tunnel:
                    assert charon_a.pid is not None and charon_b.pid is not None
                    cpu_before = cpu_seconds(charon_a.pid) + cpu_seconds(charon_b.pid)
                    result = run_transfer(lab.b.netns, lab.b.address, lab.a.netns, PORT, size, timeout_s=600)
                    charon_cpu.append(cpu_seconds(charon_a.pid) + cpu_seconds(charon_b.pid) - cpu_before)
                    ipsec.append(result["bytes"] / result["seconds"] / MB)
                    esp = tunnel.esp_algorithm
    report = {
        "backend": backend.value,
        "esp": esp,
        "encapsulation": "ESP in UDP 4500" if backend.value == "libipsec" else "ESP (IP protocol 50)",
        "mib_per_run": size >> 20,
        "runs": args.runs,
        "mtu": args.mtu,
        "plain_MBps": summary(plain),
        "ipsec_MBps": summary(ipsec),
        "ipsec_to_plain": round(statistics.median(ipsec) / statistics.median(plain), 3),
        "charon_cpu_s_per_run": summary(charon_cpu),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"backend {report['backend']} ({report['encapsulation']}), {esp}, {report['mib_per_run']} MiB x {args.runs}, MTU {args.mtu}"
        )
        for name in ("plain_MBps", "ipsec_MBps"):
            s = report[name]
            print(f"  {name:12s} median {s['median']:8.1f}  (min {s['min']:.1f}, max {s['max']:.1f})")  # type: ignore[index]
        print(f"  ipsec/plain  {report['ipsec_to_plain']}")
        print(f"  charon CPU s per {report['mib_per_run']} MiB: {report['charon_cpu_s_per_run']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
