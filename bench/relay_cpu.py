"""The relay's own CPU seconds per GiB moved, on each side: the Python relay against the native core, side by side.

The QEMU relay's path without QEMU: a writer process (QEMU on the source)
pushes N GiB into a unix socket, the source relay process seals it into
records on a loopback TCP connection, the destination relay process opens
them into a second unix socket, a reader process (QEMU on the destination)
drains it. Both unix sockets get the relay's 4 MiB queue, TCP is tuned as
a data stream. Each relay's CPU is its own thread's (CLOCK_THREAD_CPUTIME_ID
around the relay call), so the writer, the reader and process start-up are
not counted; the stream digest is included (tags hashed once at the end by
the native path, per record by the Python one).

- `python`: the relay as it was before the native core (commit 58b8c26:
  recv_into the writer's buffer, top up, seal with `cryptography`, hash,
  sendall; read header and payload, open, hash, sendall), kept here as the
  baseline.
- `native`: host/relaycore.py (what the QEMU relay runs now).
- `native-other` (with `--compare-core PATH`): the same wrapper driving
  another build of `_relaycore` (e.g. one with OpenSSL's AES-GCM, built
  from an earlier commit), to compare two cores side by side.

Modes: `sealift` (AES-256-GCM) and `sealift-plain` (no protection). The
implementations alternate run by run; medians and min-max of --runs each.
AES-256-GCM's own cost per GiB (cryptography, 1 MiB calls, one core) is
measured in the same run, for the issue's target (AES-GCM + 0.1 CPU-s/GiB).

    .venv/bin/python bench/relay_cpu.py --gib 1 --runs 5 --json > bench/results/relay-cpu.json

SEALIFT_BENCH_MAX_RECORD=N caps the native source's records at N bytes (an experiment knob; the relay uses 1 MiB).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealift.backends.qemu.relay import StreamDigest, read_record, widen_send_buffer
from sealift.host import relaycore
from sealift.host.transport import tune_bulk_socket
from sealift.wire.datastream import DataStreamReader, DataStreamWriter, OpaqueReceived, StreamEnded
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection

GiB = 1 << 30
MiB = 1 << 20
NPAGES = 1 << 20
KEY, IV = os.urandom(32), os.urandom(12)
TIMEOUT = 60.0


def protection(mode: str) -> RecordProtection:
    return AeadProtection(KEY, IV) if mode == "sealift" else NoProtection()


# -- the Python relay of commit 58b8c26 (the baseline) ----------------------------------------


def python_seal(conn: socket.socket, data: socket.socket, writer: DataStreamWriter, digest: StreamDigest) -> int:
    moved = 0
    while True:
        buf = writer.opaque_buffer()
        n = conn.recv_into(buf)
        if n == 0:
            break
        n = _top_up(conn, buf, n)
        moved += n
        sealed = writer.finish_opaque(n)
        digest.update(buf[:n], sealed[len(sealed) - digest.tag_size :])
        data.sendall(sealed)
    data.sendall(writer.end())
    return moved


def _top_up(conn: socket.socket, buf: memoryview, filled: int) -> int:
    while filled < len(buf):
        try:
            more = os.readv(conn.fileno(), [buf[filled:]])
        except BlockingIOError:
            break
        if more == 0:
            break
        filled += more
    return filled


def python_open(data: socket.socket, reader: DataStreamReader, qemu: socket.socket, digest: StreamDigest) -> int:
    fed = 0
    while True:
        event = read_record(data, reader)
        if isinstance(event, StreamEnded):
            break
        assert isinstance(event, OpaqueReceived)
        digest.update(event.data, reader.last_tag)
        fed += len(event.data)
        qemu.sendall(event.data)
    reader.close()
    return fed


IMPLS = ("python", "native", "native-other")

# -- the native core ---------------------------------------------------------------------------


MAX_RECORD = int(os.environ.get("SEALIFT_BENCH_MAX_RECORD", "0")) or None


def native_seal(conn: socket.socket, data: socket.socket, writer: DataStreamWriter, digest: StreamDigest) -> int:
    outcome = relaycore.seal_stream(conn, data, writer, *([MAX_RECORD] if MAX_RECORD else []))
    digest.absorb_native(outcome.digest_input)
    if outcome.error is not None:
        raise outcome.error
    return outcome.plaintext_bytes


def native_open(data: socket.socket, reader: DataStreamReader, qemu: socket.socket, digest: StreamDigest) -> int:
    outcome = relaycore.open_stream(data, qemu, reader)
    digest.absorb_native(outcome.digest_input)
    if outcome.error is not None:
        raise outcome.error
    return outcome.plaintext_bytes


# -- one run: four processes -----------------------------------------------------------------------


def thread_cpu() -> float:
    return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)


def qemu_writer(sock: socket.socket, total: int) -> None:
    chunk = os.urandom(MiB)  # incompressible, and nothing here looks at it
    view = memoryview(chunk)
    left = total
    while left:
        n = sock.send(view[: min(left, MiB)])
        left -= n
    sock.close()


def qemu_reader(sock: socket.socket, report: Connection) -> None:
    buf = bytearray(4 * MiB)
    got = 0
    while n := sock.recv_into(buf):
        got += n
    report.send(got)


OTHER_CORE: str | None = None  # --compare-core: the path of another _relaycore build


def use_core(impl: str) -> None:
    """In a relay's child process: load the other core's build in place of the installed one."""
    if impl != "native-other":
        return
    assert OTHER_CORE is not None
    loader = importlib.machinery.ExtensionFileLoader("sealift.host._relaycore", OTHER_CORE)
    spec = importlib.util.spec_from_file_location("sealift.host._relaycore", OTHER_CORE, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    relaycore._relaycore = module  # type: ignore[attr-defined]


def source_relay(impl: str, mode: str, conn: socket.socket, data: socket.socket, report: Connection) -> None:
    conn.settimeout(TIMEOUT)
    data.settimeout(TIMEOUT)
    use_core(impl)
    seal: Callable[..., int] = python_seal if impl == "python" else native_seal
    writer = DataStreamWriter(protection(mode), NPAGES)
    digest = StreamDigest(writer_overhead(mode))
    start, wall = thread_cpu(), time.monotonic()
    moved = seal(conn, data, writer, digest)
    digest.hexdigest()
    report.send((moved, thread_cpu() - start, time.monotonic() - wall, digest.hexdigest()))


def destination_relay(impl: str, mode: str, data: socket.socket, qemu: socket.socket, report: Connection) -> None:
    data.settimeout(TIMEOUT)
    qemu.settimeout(TIMEOUT)
    use_core(impl)
    feed: Callable[..., int] = python_open if impl == "python" else native_open
    reader = DataStreamReader(protection(mode), NPAGES)
    digest = StreamDigest(writer_overhead(mode))
    start, wall = thread_cpu(), time.monotonic()
    moved = feed(data, reader, qemu, digest)
    report.send((moved, thread_cpu() - start, time.monotonic() - wall, digest.hexdigest()))


def writer_overhead(mode: str) -> int:
    return 16 if mode == "sealift" else 0


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for sock in (client, server):
        tune_bulk_socket(sock)
    return client, server


def _only(target: Callable[..., None], every: list[socket.socket]) -> Callable[..., None]:
    """Run `target` in a child after closing the sockets it was not given (so that EOF reaches the peers)."""

    def child(*args: object) -> None:
        for sock in every:
            if sock not in args:
                sock.close()
        target(*args)

    return child


def run_once(impl: str, mode: str, total: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    qemu_src, relay_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    widen_send_buffer(qemu_src)
    data_out, data_in = tcp_pair()
    relay_out, qemu_dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    widen_send_buffer(relay_out)
    src_rx, src_tx = ctx.Pipe(duplex=False)
    dst_rx, dst_tx = ctx.Pipe(duplex=False)
    read_rx, read_tx = ctx.Pipe(duplex=False)
    every = [qemu_src, relay_in, data_out, data_in, relay_out, qemu_dst]
    processes = [
        ctx.Process(target=_only(destination_relay, every), args=(impl, mode, data_in, relay_out, dst_tx)),
        ctx.Process(target=_only(qemu_reader, every), args=(qemu_dst, read_tx)),
        ctx.Process(target=_only(source_relay, every), args=(impl, mode, relay_in, data_out, src_tx)),
        ctx.Process(target=_only(qemu_writer, every), args=(qemu_src, total)),
    ]
    for process in processes:
        process.start()
    for sock in every:
        sock.close()  # each process holds its own
    src_moved, src_cpu, src_wall, src_digest = src_rx.recv()
    dst_moved, dst_cpu, dst_wall, dst_digest = dst_rx.recv()
    read = read_rx.recv()
    for process in processes:
        process.join(TIMEOUT)
    if not src_moved == dst_moved == read == total or src_digest != dst_digest:
        raise RuntimeError(f"{impl} {mode}: moved {src_moved}/{dst_moved}/{read} of {total}, digests differ")
    gib = total / GiB
    return {
        "source_cpu_s_per_gib": src_cpu / gib,
        "destination_cpu_s_per_gib": dst_cpu / gib,
        "wall_s_per_gib": max(src_wall, dst_wall) / gib,
    }


def aes_gcm_cpu_s_per_gib(runs: int) -> float:
    """AES-256-GCM's own cost: `encrypt_into` over 1 MiB, CPU seconds per GiB (median)."""
    aead, nonce = AESGCM(KEY), IV
    plain, out = bytearray(MiB), bytearray(MiB + 16)
    samples = []
    for _ in range(runs):
        start = thread_cpu()
        for _ in range(1024):
            aead.encrypt_into(nonce, plain, b"header!!", out)
        samples.append(thread_cpu() - start)
    return statistics.median(samples)


def system_aes_gcm_cpu_s_per_gib() -> dict[str, float | str] | None:
    """The same for the native core's libraries: bench/aes_gcm_speed.c (Debian's OpenSSL EVP, Intel's ipsec-mb)."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aes_gcm_speed.c")
    binary = "/tmp/sealift-aes-gcm-speed"
    try:
        subprocess.run(["gcc", "-O2", "-o", binary, source, "-lcrypto", "-lIPSec_MB"], check=True, timeout=60)
        done = subprocess.run([binary], capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    figures: dict[str, float | str] = json.loads(done.stdout)  # the two ciphers' CPU-s/GiB, ipsec-mb's code path
    return figures


def summarize(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode in sorted({r["mode"] for r in rows}):
        for impl in IMPLS:
            picked = [r for r in rows if r["mode"] == mode and r["impl"] == impl]
            if not picked:
                continue
            figures = {}
            for key in ("source_cpu_s_per_gib", "destination_cpu_s_per_gib", "wall_s_per_gib"):
                values = [r[key] for r in picked]
                figures[key] = statistics.median(values)
                figures[key + "_min"] = min(values)
                figures[key + "_max"] = max(values)
            out.setdefault(mode, {})[impl] = figures
    return out


def markdown(summary: dict, aes: float, system_aes: dict[str, float | str] | None, runs: int) -> str:
    system = system_aes or {}
    lines = [
        f"AES-256-GCM alone: {aes:.3f} CPU-s/GiB in `cryptography` (the Python relay's), "
        f"{system.get('ipsec_mb_cpu_s_per_gib', float('nan')):.3f} in ipsec-mb (the native core's), "
        f"{system.get('openssl_cpu_s_per_gib', float('nan')):.3f} in Debian's OpenSSL EVP",
        "",
        f"| mode | relay | source CPU-s/GiB (min-max) | destination CPU-s/GiB (min-max) | wall s/GiB | "
        f"against python (src / dst), medians of {runs} |",
        "|---|---|---|---|---|---|",
    ]
    for mode, impls in summary.items():
        for impl in [i for i in IMPLS if i in impls]:
            f = impls[impl]
            ratio = ""
            p = impls.get("python")
            if impl != "python" and p is not None:
                ratio = (
                    f"{f['source_cpu_s_per_gib'] / p['source_cpu_s_per_gib']:.2f}x / "
                    f"{f['destination_cpu_s_per_gib'] / p['destination_cpu_s_per_gib']:.2f}x"
                )
            lines.append(
                f"| {mode} | {impl} | {f['source_cpu_s_per_gib']:.3f} ({f['source_cpu_s_per_gib_min']:.3f}-"
                f"{f['source_cpu_s_per_gib_max']:.3f}) | {f['destination_cpu_s_per_gib']:.3f} "
                f"({f['destination_cpu_s_per_gib_min']:.3f}-{f['destination_cpu_s_per_gib_max']:.3f}) | "
                f"{f['wall_s_per_gib']:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per implementation and mode (at least 3)")
    parser.add_argument("--modes", default="sealift,sealift-plain")
    parser.add_argument("--compare-core", help="another _relaycore build, run as `native-other` beside the others")
    parser.add_argument(
        "--impls", default="python,native", help="of python, native (native-other is added by --compare-core)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global OTHER_CORE
    impls = args.impls.split(",")
    if args.compare_core:
        OTHER_CORE = os.path.abspath(args.compare_core)
        impls.append("native-other")
    total = int(args.gib * GiB)
    rows = []
    for run in range(args.runs):
        for mode in args.modes.split(","):
            order = impls if run % 2 == 0 else impls[::-1]  # alternate: same noise for every implementation
            for impl in order:
                row = {"run": run, "mode": mode, "impl": impl, **run_once(impl, mode, total)}
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    aes, system_aes = aes_gcm_cpu_s_per_gib(5), system_aes_gcm_cpu_s_per_gib()
    summary = summarize(rows)
    if args.json:
        figures = {"aes_gcm_cpu_s_per_gib": aes, "system_aes_gcm_cpu_s_per_gib": system_aes}
        print(json.dumps({"gib": args.gib, "runs": args.runs, **figures, "summary": summary, "rows": rows}, indent=2))
    print(markdown(summary, aes, system_aes, args.runs), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
