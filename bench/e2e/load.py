"""Load and checks: one wrk run against a configuration (latency percentiles, req/s, CPU per request of each of
the configuration's processes), and a functional check that every request of the mix is routed right."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .configs import Configuration, cpu_seconds, descendants, worker_run_seconds
from .mix import CHAT_PATH, MODELS, Request


class LoadError(RuntimeError):
    pass


def wrk_binary() -> str | None:
    return shutil.which("wrk")


@dataclass
class Run:
    config: str
    concurrency: int
    round: int
    seconds: float
    result: dict[str, Any]  # wrk's numbers, req/s, cpu_us_per_request per process role

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "c": self.concurrency, "round": self.round, **self.result}


def run_wrk(
    url: str, script: str, concurrency: int, seconds: float, processes: Mapping[str, int], timeout_s: float = 5.0
) -> dict[str, Any]:
    """One wrk run (one thread, ``concurrency`` connections); CPU of ``processes`` (and their children) sampled
    around it."""
    wrk = wrk_binary()
    if wrk is None:
        raise LoadError("wrk is not installed")
    pids = {role: [pid, *descendants(pid)] for role, pid in processes.items()}
    cpu0 = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    envoy = processes.get("envoy")
    worker0 = worker_run_seconds(envoy) if envoy is not None else None
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s"]
    cmd += ["-s", script, url]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired:  # wrk is killed; the configuration stopped answering (or the machine stalled)
        raise LoadError(f"wrk -c{concurrency} did not finish within {seconds + 30:g}s") from None
    wall = time.perf_counter() - t0
    cpu = {role: sum(cpu_seconds(p) for p in ps) - cpu0[role] for role, ps in pids.items()}
    worker1 = worker_run_seconds(envoy) if envoy is not None and worker0 is not None else None
    if worker0 is not None and worker1 is not None:
        cpu["envoy_worker"] = worker1 - worker0  # within "envoy": its worker threads alone, to the nanosecond
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]} {out.stderr[-1000:]}")
    r: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    n = r["requests"]
    r["rps"] = n / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["cpu_us_per_request"] = {role: (s * 1e6 / n if n else None) for role, s in cpu.items()}
    r["cpu_pct"] = {role: 100 * s / wall for role, s in cpu.items()}
    return r


def check_routing(c: Configuration, url: str, mix: list[Request], tries_for: float = 10.0) -> None:
    """Every distinct (model, stream) request of the mix through ``url``: a 200 from the backend its model routes
    to (the mock names itself in the completion id), a whole SSE stream for streaming ones. Raises LoadError."""
    u = urlsplit(url)
    seen: set[tuple[str, bool]] = set()
    deadline = time.monotonic() + tries_for
    for req in mix:
        if (req.model, req.stream) in seen:
            continue
        seen.add((req.model, req.stream))
        expected = req.model if c.routes else MODELS[0]
        while True:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            try:
                conn.request("POST", CHAT_PATH, req.body, {**_headers(req), "Host": "127.0.0.1"})
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise LoadError(f"{c.key}: {req.model} stream={req.stream}: {e}") from None
                time.sleep(0.2)
            finally:
                conn.close()
        text = body.decode(errors="replace")
        if status != 200:
            raise LoadError(f"{c.key}: {req.model} stream={req.stream}: status {status}: {text[:300]}")
        if f"chatcmpl-{expected}" not in text:
            raise LoadError(f"{c.key}: {req.model} stream={req.stream}: not from backend {expected}: {text[:300]}")
        if req.stream and "[DONE]" not in text:
            raise LoadError(f"{c.key}: {req.model}: the SSE stream has no [DONE]: {text[-300:]}")


def _headers(req: Request) -> dict[str, str]:
    head = req.http().split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    return dict(h.split(": ", 1) for h in head if not h.lower().startswith(("host:", "content-length:")))
