"""A bounded TCP transfer between two namespace hosts, standing in for a migration stream.

    python -m sealift.lab.ipsec.secret_transfer serve ADDRESS PORT
        # one connection; prints {"bytes": n, "seconds": t}
    python -m sealift.lab.ipsec.secret_transfer send ADDRESS PORT BYTES
        # sends BYTES of a payload holding SECRET_LINE

The payload repeats a 64 KiB block that contains the secret line, like a VM
image with a secret in its memory, so a cleartext capture of any part of
the stream shows it.
"""

from __future__ import annotations

import json
import socket
import sys
import time

SECRET_LINE = b"The bank amount transferred is 1000000 EUR"
BLOCK_SIZE = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 30.0


def payload_block() -> bytes:
    filler = bytes(range(256)) * (BLOCK_SIZE // 256)
    line = b"\n" + SECRET_LINE + b"\n"
    return line + filler[len(line) :]


def serve(address: str, port: int, *, ready: bool = True) -> dict[str, float]:
    """Accept one connection, read to EOF, report bytes and the time from first to last byte."""
    with socket.create_server((address, port), reuse_port=False) as server:
        server.settimeout(CONNECT_TIMEOUT_S * 3)
        if ready:
            print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(IDLE_TIMEOUT_S)
            buffer = bytearray(1 << 20)
            view = memoryview(buffer)
            total = 0
            start = None
            while True:
                n = conn.recv_into(view)
                if n == 0:
                    break
                if start is None:
                    start = time.perf_counter()
                total += n
            elapsed = time.perf_counter() - start if start is not None else 0.0
            conn.sendall(b"ok")
    return {"bytes": total, "seconds": elapsed}


def send(address: str, port: int, size: int) -> dict[str, float]:
    block = payload_block()
    start = time.perf_counter()
    with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S) as conn:
        conn.settimeout(IDLE_TIMEOUT_S)
        remaining = size
        while remaining > 0:
            chunk = block if remaining >= len(block) else block[:remaining]
            conn.sendall(chunk)
            remaining -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(2) != b"ok":
            raise RuntimeError("the receiver did not confirm the transfer")
    return {"bytes": size, "seconds": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        print(json.dumps(serve(argv[1], int(argv[2]))), flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "send":
        print(json.dumps(send(argv[1], int(argv[2]), int(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


def run_transfer(
    server_netns: str, server_address: str, client_netns: str, port: int, size: int, *, timeout_s: float = 120.0
) -> dict[str, float]:
    """Run `serve` in one namespace and `send` in another; returns the receiver's figures (bytes, seconds)."""
    import subprocess

    python = sys.executable
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            server_netns,
            python,
            "-m",
            "sealift.lab.ipsec.secret_transfer",
            "serve",
            server_address,
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the transfer receiver did not start: {server.stderr.read() if server.stderr else ''}")
        client = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                client_netns,
                python,
                "-m",
                "sealift.lab.ipsec.secret_transfer",
                "send",
                server_address,
                str(port),
                str(size),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if client.returncode != 0:
            raise RuntimeError(f"the transfer sender failed: {client.stderr.strip()[-500:]}")
        out, err = server.communicate(timeout=timeout_s)
        if server.returncode != 0:
            raise RuntimeError(f"the transfer receiver failed: {err.strip()[-500:]}")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
