"""Profile: where the agents' CPU goes while they carry a real QEMU migration.

Two real agents on localhost, one QEMU guest booted on host-a with a
memory-writing workload and migrated to host-b over the chosen transport,
both agents sampled by py-spy without stopping them (`--nonblocking`; time
inside OpenSSL's AES-GCM or a system call shows as the Python function that
called it; `--native` shows the C frames too, but py-spy must then pause the
agent for every sample) from just before the migration order to its report. Writes, under --out:

    agent-host-a.folded, agent-host-b.folded   py-spy's collapsed stacks (flame graph input)
    perf.data, perf-host-a.txt, perf-host-b.txt   with --perf: `perf record` of both agents (every
                                               thread, kernel and C frames, not paused) and its
                                               report per agent (DSO and symbol, self time)
    summary.md                                 per agent and thread: samples, and the functions
                                               that hold the CPU (self and inclusive)
    summary.json                               the same figures, and the migration's report figures

    .venv/bin/python bench/profile_agents.py --memory 1G --out bench/results/profile-1g

py-spy drops the samples of threads it sees waiting (no --idle), but it
cannot always tell a thread blocked in a system call from one running in
it, so samples / rate over-counts CPU: take the CPU seconds from /proc
(printed beside them) and the profile for where they go.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qemu_migration import VM, CpuSampler, _wait_counter  # the same guest and CPU accounting as the QEMU bench

from sealift.bench.harness import warm_guest_image
from sealift.cluster import LocalCluster

ATTACH_S = 1.0  # py-spy needs a moment to attach before the order goes
TOP = 15


@dataclass
class ThreadProfile:
    samples: int = 0
    self_samples: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def py_spy() -> str:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else "py-spy"


def start_profiler(pid: int, out: Path, rate: int, native: bool) -> subprocess.Popen[bytes]:
    command = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
    ]
    command.append("--native" if native else "--nonblocking")  # py-spy cannot unwind C frames without pausing
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profiler(process: subprocess.Popen[bytes], name: str = "py-spy") -> None:
    """py-spy and perf write their output when interrupted, like Ctrl-C."""
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"{name} failed ({process.returncode}): {stderr.decode(errors='replace')[-500:]}")


def start_perf(pids: dict[str, int], out: Path, rate: int) -> subprocess.Popen[bytes]:
    """`perf record` of both agents' every thread: it samples without pausing them, kernel frames included."""
    command = ["perf", "record", "-F", str(rate), "-g", "-o", str(out), "-p", ",".join(str(p) for p in pids.values())]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def perf_report(data: Path, pid: int, out: Path) -> str:
    """Self time by DSO and symbol for one agent (all its threads), the lines above 0.5 %."""
    command = ["perf", "report", "-i", str(data), "--pid", str(pid), "--stdio", "--no-children"]
    command += ["--sort", "dso,symbol", "--percent-limit", "0.5", "-g", "none"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    out.write_text(done.stdout)
    return "\n".join(line for line in done.stdout.splitlines() if line.strip() and not line.startswith("#"))


_FRAME_FILE = re.compile(r" \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str, keep_line: bool = False) -> str:
    """`_run (sealift/backends/qemu/relay.py:180)` -> `_run (qemu_relay.py)`, or `_run (qemu_relay.py:180)`.

    Self time keeps the line: a relay loop's time is in the C call on one
    of its lines (recv, seal, send), which Python frames alone cannot name.
    """
    match = _FRAME_FILE.search(frame)
    if match is None:
        return frame
    where = frame[match.start() + 2 : -1] if keep_line else match["file"]
    return f"{frame[: match.start()]} ({Path(where).name})"


def read_folded(path: Path) -> dict[str, ThreadProfile]:
    """Collapsed stacks with --threads: the first frame names the thread."""
    threads: dict[str, ThreadProfile] = defaultdict(ThreadProfile)
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread, functions = _thread_label(frames[0]), [frame_name(f) for f in frames[1:]]
        count = int(count_text)
        profile = threads[thread]
        profile.samples += count
        if functions:
            profile.self_samples[frame_name(frames[-1], keep_line=True)] += count
        for name in set(functions):
            profile.inclusive[name] += count
    return threads


def _thread_label(frame: str) -> str:
    """py-spy's thread frame is `thread (22808): qemu-pump-out-0`: keep the name, the id differs per run."""
    match = re.fullmatch(r"thread \((?:0x)?[0-9a-f]+\)(?::\s*(?P<name>.+))?", frame.strip())
    if match is None:
        return frame
    return match["name"] or frame


def summarize(threads: dict[str, ThreadProfile], rate: int) -> dict[str, object]:
    ordered = sorted(threads.items(), key=lambda item: -item[1].samples)
    return {
        "cpu_s": round(sum(p.samples for p in threads.values()) / rate, 2),
        "threads": [
            {
                "thread": name,
                "samples": p.samples,
                "cpu_s": round(p.samples / rate, 2),
                "self": [
                    {"function": f, "samples": n, "share": round(n / p.samples, 3)}
                    for f, n in p.self_samples.most_common(TOP)
                ],
                "inclusive": [
                    {"function": f, "samples": n, "share": round(n / p.samples, 3)}
                    for f, n in p.inclusive.most_common(TOP)
                ],
            }
            for name, p in ordered
            if p.samples
        ],
    }


def markdown(args: argparse.Namespace, report: dict, cpu: dict[str, float], agents: dict[str, dict]) -> str:
    lines = [
        f"# Agents' CPU during one {args.transport} migration of a {args.memory} QEMU guest",
        "",
        f"py-spy {'--native ' if args.native else ''}at {args.rate} Hz, from the order to the report. "
        f"Migration: total {report['total_time_s']:.2f} s, downtime {report['downtime_ms']:.0f} ms, "
        f"{report['bytes_sent'] / 2**20:.0f} MiB on the data stream; {report['stop_reason']}.",
        "",
        "CPU seconds from /proc over the same span: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()),
        "",
    ]
    for host, summary in agents.items():
        lines += [f"## agent {host}: {summary['cpu_s']:.2f} CPU-s sampled", ""]
        for thread in summary["threads"]:  # type: ignore[union-attr]
            if thread["cpu_s"] < 0.02:
                continue
            lines += [
                f"### thread `{thread['thread']}`: {thread['cpu_s']:.2f} CPU-s sampled",
                "",
                "| self | function | | inclusive | function |",
                "|---:|---|---|---:|---|",
            ]
            for own, inner in zip(thread["self"], thread["inclusive"]):
                lines.append(
                    f"| {own['share']:.0%} | `{own['function']}` | | {inner['share']:.0%} | `{inner['function']}` |"
                )
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--transport", default="sealift", choices=["sealift", "sealift-plain", "qemu-tls", "plain"])
    parser.add_argument("--cmdline", help="guest workload settings (default: half the memory, 32 MiB/s)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second and thread")
    parser.add_argument("--native", action="store_true", help="C frames too (pauses the agents for every sample)")
    parser.add_argument("--perf", action="store_true", help="`perf record` both agents too (kernel and C frames)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("py-spy attaches to the agents with ptrace: run as root")
    from sealift.host.config import parse_size

    memory_mib = parse_size(args.memory) >> 20
    cmdline = args.cmdline or f"sealift.mem_mib={memory_mib // 2} sealift.rate_mib=32"
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(allow_insecure=True)
    try:
        cluster.start()
        warm_guest_image(cluster, "host-b")
        cluster.client("host-a").request("vm.start", name=VM, backend="qemu", memory=args.memory, cmdline=cmdline)
        _wait_counter(cluster, "host-a", 120)
        time.sleep(args.warmup)
        pids = {host: agent.process.pid for host, agent in cluster.agents.items() if agent.process is not None}
        profilers = {
            host: start_profiler(pid, args.out / f"agent-{host}.folded", args.rate, args.native)
            for host, pid in pids.items()
        }
        perf = start_perf(pids, args.out / "perf.data", args.rate) if args.perf else None
        time.sleep(ATTACH_S)
        sampler = CpuSampler(pids, cluster.vm_root)
        try:
            options = {"secure": args.transport in ("sealift", "qemu-tls"), "transport": args.transport}
            report = cluster.migrate(VM, "host-a", "host-b", options=options)
        finally:
            cpu = sampler.stop()
            for profiler in profilers.values():
                stop_profiler(profiler)
            if perf is not None:
                stop_profiler(perf, "perf record")
    finally:
        cluster.cleanup()
    perf_tops = (
        {host: perf_report(args.out / "perf.data", pid, args.out / f"perf-{host}.txt") for host, pid in pids.items()}
        if args.perf
        else {}
    )
    agents = {host: summarize(read_folded(args.out / f"agent-{host}.folded"), args.rate) for host in pids}
    figures = {
        key: report.get(key)
        for key in ("total_time_s", "downtime_ms", "bytes_sent", "stop_reason", "downtime_breakdown_ms")
    }
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "memory": args.memory,
                "transport": args.transport,
                "cmdline": cmdline,
                "rate": args.rate,
                "native": args.native,
                "report": figures,
                "cpu_s_proc": cpu,
                "agents": agents,
            },
            indent=2,
        )
        + "\n"
    )
    text = markdown(args, report, cpu, agents)
    for host, top in perf_tops.items():
        text += f"\n\n## perf, agent {host}: self time by DSO and symbol (>= 0.5 %)\n\n```\n{top}\n```"
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
