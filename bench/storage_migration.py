"""Benchmark: a QEMU guest with a copied disk migrated between two agents (storage migration).

Two real agents on localhost, a fresh guest per run (the test image, with
`sealift.disk=write`: it writes a 4 KiB record with fsync to its disk
without pause) on a qcow2 image of `--disk-size` whose first `--allocated`
bytes are random data, migrated to host-b through the `sealift` transport.
Prints one JSON object per run and the medians:

    .venv/bin/python bench/storage_migration.py --disk-size 1G --allocated 256M --runs 3

`mirror_time_s`: from the first mirror job to every disk ready (the whole
image copied, writes mirrored synchronously from then on);
`disk_bytes_sent`: sealed bytes of the disk stream, source to destination;
`total_time_s` and `downtime_ms` as in bench/qemu_migration.py (the memory
migration starts after the mirror is ready, so the total includes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sealift.cluster import LocalCluster
from sealift.host.config import parse_size

CMDLINE = "sealift.mem_mib=32 sealift.rate_mib=8 sealift.disk=write"


def make_disk(path: Path, size: int, allocated: int) -> None:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(allocated // (16 << 20)):
            f.write(os.urandom(16 << 20))
        f.truncate(size)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def one_run(memory: str, size: int, allocated: int, workdir: Path) -> dict[str, object]:
    image = workdir / "disk.qcow2"
    make_disk(image, size, allocated)
    cluster = LocalCluster(extra_config="step_timeout_s = 60")
    cluster.start()
    try:
        src = cluster.client("host-a")
        src.request("vm.start", name="bvm", backend="qemu", memory=memory, cmdline=CMDLINE, disks=[str(image)])
        time.sleep(5)  # boot, and the disk writer under way
        report = cluster.migrate("bvm", "host-a", "host-b")
        return {
            key: report[key]
            for key in ("status", "total_time_s", "downtime_ms", "mirror_time_s", "disk_bytes_sent", "bytes_sent")
        }
    finally:
        cluster.stop_guests()
        cluster.cleanup()
        image.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--disk-size", default="1G")
    parser.add_argument("--allocated", default="256M", help="random data written into the image before boot")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sls-bench-disk-", dir="/var/tmp"))
    results = []
    try:
        for _ in range(args.runs):
            result = one_run(args.memory, parse_size(args.disk_size), parse_size(args.allocated), workdir)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    done = [r for r in results if r["status"] == "completed"]
    if done:
        summary = {
            key: statistics.median(float(r[key]) for r in done)  # type: ignore[arg-type]
            for key in ("total_time_s", "downtime_ms", "mirror_time_s", "disk_bytes_sent")
        }
        print(json.dumps({"median": summary, "runs": len(results), "completed": len(done)}))
    return 0 if len(done) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
