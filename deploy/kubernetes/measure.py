"""Measure what the pod's two containers use, to size their resource requests (docs/deploy.md, "Sizing").

Starts the real stack of the pod on this machine (:class:`ipc_router.tools.stack.Stack`: the sidecar with its default
metrics and the Prometheus exporter, a real Envoy from the generated bootstrap with ``--concurrency`` workers) in
front of one mock backend answering at once, then reads each process's resident memory (VmRSS, VmHWM) and CPU time
(utime + stime, all threads) from /proc:

* idle: for ``--idle`` seconds after start-up (nothing but the sidecar's reload poll and Envoy's timers);
* load: ``--clients`` keep-alive clients each sending chat completions (non-streaming, usage in the answer; or
  with ``--stream``, streamed with ``include_usage``, 8 chunks) one at a time for ``--seconds``; CPU is reported per
  second of wall time and per request, so it scales to other rates.

The client runs on the same cores, so the request rate says what this machine could drive, not a ceiling.

    .venv/bin/python deploy/kubernetes/measure.py [--concurrency 2] [--clients 16] [--seconds 15] [--stream] [--no-shm]
        [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ipc_router.tools.stack import Stack, free_port, stop_process

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: the whole process, every thread


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def sample(pids: dict[str, int]) -> dict[str, Any]:
    return {name: {"cpu": cpu_seconds(pid), **memory_kib(pid)} for name, pid in pids.items()}


def load(port: int, clients: int, seconds: float, stream: bool = False) -> tuple[int, dict[str, int]]:
    """Requests answered 200, and the others by status and error code (the first bytes of their bodies)."""
    request: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        request.update(stream=True, stream_options={"include_usage": True})
    body = json.dumps(request).encode()
    headers = {"content-type": "application/json"}
    counts = [0] * clients
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            conn.request("POST", "/v1/chat/completions", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 200:
                counts[i] += 1
            else:
                what = f"{resp.status} {data[:120].decode(errors='replace')}"
                errors[what] = errors.get(what, 0) + 1  # dict updates are atomic under the GIL
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--stream", action="store_true", help="streamed completions instead of plain ones")
    p.add_argument("--no-shm", dest="shm", action="store_false", help="the socket path (sidecar --no-shm)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="iprm", dir="/tmp"))
    backend_port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "ipc_router.tools.mock_backend", "--listen", f"127.0.0.1:{backend_port}", "--name", "b",
         "--tokens", "8", "--log-level", "warning"],
    )  # fmt: skip
    config = work / "config.yaml"
    config.write_text(
        "rules:\n- name: m\n  headers: [{name: x-ai-eg-model, value: m}]\n"
        f"  backends: [{{name: b, endpoint: 'http://127.0.0.1:{backend_port}'}}]\n"
    )
    stack = Stack(str(config), metrics_port=free_port(), envoy_concurrency=args.concurrency, shm=args.shm)
    try:
        stack.start()
        assert stack.sidecar is not None and stack.envoy is not None
        pids = {"sidecar": stack.sidecar.pid, "envoy": stack.envoy.pid}
        load(stack.listen_port, 2, 2.0, args.stream)  # warm-up: first connections, route cache, OTel instruments
        t0, s0 = time.monotonic(), sample(pids)
        time.sleep(args.idle)
        t1, s1 = time.monotonic(), sample(pids)
        requests, errors = load(stack.listen_port, args.clients, args.seconds, args.stream)
        t2, s2 = time.monotonic(), sample(pids)
    finally:
        stack.stop()
        stop_process(backend)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    result: dict[str, Any] = {
        "envoy_concurrency": args.concurrency,
        "clients": args.clients,
        "stream": args.stream,
        "requests_per_second": round(requests / (t2 - t1)),
        "errors": errors,
    }
    for name in pids:
        result[name] = {
            "idle_cpu_cores": round((s1[name]["cpu"] - s0[name]["cpu"]) / (t1 - t0), 4),
            "idle_rss_mib": round(s1[name]["VmRSS"] / 1024, 1),
            "load_cpu_cores": round((s2[name]["cpu"] - s1[name]["cpu"]) / (t2 - t1), 3),
            "load_cpu_us_per_request": round((s2[name]["cpu"] - s1[name]["cpu"]) / requests * 1e6, 1),
            "load_rss_mib": round(s2[name]["VmRSS"] / 1024, 1),
            "peak_rss_mib": round(s2[name]["VmHWM"] / 1024, 1),
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        kind = "streamed" if args.stream else "plain"
        print(f"{requests} {kind} requests, {result['requests_per_second']}/s, Envoy --concurrency {args.concurrency}")
        for name in pids:
            print(name, result[name])
        if errors:
            print("not 200:", errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
