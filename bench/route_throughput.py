"""Throughput and latency of the real sidecar over its Unix socket, without Envoy.

Starts ``python -m ipc_router.cli serve`` (default GenAI metrics, no exporter, a 20-rule config) and measures:

* pipelined throughput: one connection, windows of ``--window`` ``/route`` requests written at once, all answers
  read, for ``--seconds`` seconds: requests/s, mean time per request, and the server's CPU time per request
  (from ``/proc/<pid>/stat``);
* round trip latency at c=1: one ``/route`` at a time on one keep-alive connection, p50/p90/p99.

Requests cycle over the 20 models, so after the first round every decision comes from the route cache (the steady
state). Run: ``.venv/bin/python bench/route_throughput.py [--seconds S] [--window W] [--latency-requests N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import orjson

N_RULES = 20


def config_yaml() -> str:
    lines = ["rules:"]
    for i in range(N_RULES):
        lines += [
            f"- name: rule-{i}",
            f"  headers: [{{name: x-ai-eg-model, value: model-{i}}}]",
            f"  backends: [{{name: backend-{i}-a, weight: 3}}, {{name: backend-{i}-b, weight: 1}}]",
        ]
    return "\n".join(lines) + "\n"


HEADERS = {
    ":authority": "gateway.example.com",
    ":method": "POST",
    ":path": "/v1/chat/completions",
    ":scheme": "https",
    "content-type": "application/json",
    "authorization": "Bearer sk-test",
    "user-agent": "openai-python/1.54.0",
    "x-forwarded-proto": "https",
}


def route_request(i: int) -> bytes:
    model = f"model-{i % N_RULES}"
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64})
    msg = {
        "id": f"req-{i}",
        "t": time.monotonic_ns(),
        "path": "/v1/chat/completions",
        "headers": {**HEADERS, "x-request-id": f"req-{i}"},
        "body": body,
    }
    payload = msgpack.packb(msg, use_bin_type=True)
    return b"POST /route HTTP/1.1\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n%s" % (
        len(payload),
        payload,
    )


class Reader:
    """Counts complete responses in a byte stream (every /route answer has a content-length)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def read(self, n: int) -> list[bytes]:
        """Read ``n`` whole responses; return their bodies."""
        bodies: list[bytes] = []
        buf, pos = self.buf, self.pos
        while len(bodies) < n:
            end = buf.find(b"\r\n\r\n", pos)
            if end >= 0:
                cl = buf.rfind(b"content-length: ", pos, end)
                if cl < 0 or not buf.startswith(b"HTTP/1.1 200 ", pos):
                    raise RuntimeError(f"unexpected response: {buf[pos : end + 4]!r}")
                length = int(buf[cl + 16 : buf.find(b"\r\n", cl)])
                if len(buf) >= end + 4 + length:
                    bodies.append(buf[end + 4 : end + 4 + length])
                    pos = end + 4 + length
                    continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("server closed the connection")
            buf = buf[pos:] + chunk
            pos = 0
        self.buf, self.pos = buf, pos
        return bodies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = directory / "config.yaml"
    config.write_text(config_yaml())
    sock = str(directory / "s.sock")
    log = open(directory / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipc_router.cli", "--log-level", "warning", "serve", "--socket", sock,
         "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(directory / 'server.log').read_text()}")
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            s.close()
            return proc, sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def pipelined(path: str, pid: int, seconds: float, window: int) -> dict[str, Any]:
    sock = connect(path)
    reader = Reader(sock)
    # Prepared requests (the client's encoding cost stays out of the loop); "t" is stale but only feeds metrics.
    prepared = [b"".join(route_request(w * window + i) for i in range(window)) for w in range(N_RULES)]
    for batch in prepared[:3]:  # warm-up: caches, metrics instruments
        sock.sendall(batch)
        reader.read(window)
    n = 0
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    deadline = t0 + seconds
    w = 0
    while time.perf_counter() < deadline:
        sock.sendall(prepared[w % len(prepared)])
        bodies = reader.read(window)
        n += window
        w += 1
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    last = msgpack.unpackb(bodies[-1])
    assert last["set"]["x-ai-eg-selected-route"].startswith("rule-"), last
    sock.close()
    return {
        "requests": n,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(n / elapsed),
        "mean_us_per_request": round(elapsed / n * 1e6, 2),
        "server_cpu_us_per_request": round(cpu / n * 1e6, 2),
    }


def round_trips(path: str, count: int) -> dict[str, Any]:
    sock = connect(path)
    reader = Reader(sock)
    prepared = [route_request(i) for i in range(N_RULES * 5)]
    for r in prepared:  # warm-up
        sock.sendall(r)
        reader.read(1)
    lat: list[float] = []
    perf = time.perf_counter
    for i in range(count):
        data = prepared[i % len(prepared)]
        t = perf()
        sock.sendall(data)
        reader.read(1)
        lat.append(perf() - t)
    sock.close()
    q = statistics.quantiles(lat, n=100)
    return {
        "requests": count,
        "p50_us": round(q[49] * 1e6, 1),
        "p90_us": round(q[89] * 1e6, 1),
        "p99_us": round(q[98] * 1e6, 1),
        "mean_us": round(statistics.fmean(lat) * 1e6, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0, help="length of the pipelined run")
    p.add_argument("--window", type=int, default=64, help="requests written at once")
    p.add_argument("--latency-requests", type=int, default=20000, help="round trips for the c=1 latency")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="iprb", dir="/tmp"))
    proc, path = start_server(directory)
    try:
        result = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rules": N_RULES,
            "pipelined": pipelined(path, proc.pid, args.seconds, args.window) | {"window": args.window},
            "c1": round_trips(path, args.latency_requests),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    pl, c1 = result["pipelined"], result["c1"]
    print(f"ipc_router /route over a Unix socket, {N_RULES} rules, cached decisions, default metrics (no exporter)")
    print(f"python {result['python']}, {result['cpus']} CPUs")
    print(
        f"pipelined (window {pl['window']}, {pl['seconds']} s): {pl['requests_per_s']} requests/s, "
        f"{pl['mean_us_per_request']} µs/request, server CPU {pl['server_cpu_us_per_request']} µs/request"
    )
    print(
        f"c=1 round trip ({c1['requests']} requests): p50 {c1['p50_us']} µs, p90 {c1['p90_us']} µs, "
        f"p99 {c1['p99_us']} µs, mean {c1['mean_us']} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
