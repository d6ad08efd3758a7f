"""End-to-end latency that ipc_router adds to a request through Envoy, measured side by side in one run.

Variants, each a separate Envoy (``--concurrency 1``) in front of one mock backend process:

``direct``
    Envoy routes straight to the mock: the generated bootstrap without the Lua filter, one plain route.
``lua+instant``
    The generated bootstrap (Lua filter included) whose "sidecar" is an instant responder (this script with
    ``--serve-instant``): it answers every ``/route`` with one pre-encoded msgpack ``set`` answer, without parsing,
    and ``/complete`` with a 204. This is the cost of Envoy's ``httpCall`` and the Lua work alone.
``ipc_router``
    The real stack (:class:`ipc_router.tools.stack.Stack`): the sidecar with its default metrics, exported to
    Prometheus as deployed, behind the same generated bootstrap.

With ``--extra``, three more real stacks show where the sidecar's time goes: ``no-export`` (default metrics,
no exporter), ``no-metrics`` (a no-op metrics plugin, no exporter) and ``no-cache`` (a custom router without a
route cache, so every request runs the router).

One client, one keep-alive connection per variant, one request at a time (c=1). After a warm-up, the variants
run in rounds in rotating order, so drift (CPU frequency, neighbours) hits them alike. Latency is from sending
the request to having read the whole response.

Run: ``make e2e-bench`` or ``.venv/bin/python bench/e2e_latency.py [--seconds S] [--rounds N] [--extra] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from opentelemetry.metrics import Meter

from ipc_router.envoy_config import SIDECAR_CLUSTER
from ipc_router.filterapi import (
    DEFAULT_MODEL_NAME_HEADER_KEY,
    DEFAULT_SELECTED_ROUTE_HEADER_KEY,
    ORIGINAL_PATH_HEADER_KEY,
    SELECTED_BACKEND_HEADER_KEY,
    Backend,
    Config,
)
from ipc_router.protocol import JSON, MSGPACK, encode_body, encode_response
from ipc_router.router import DefaultRouter
from ipc_router.tools.mock_backend import new_event_loop
from ipc_router.tools.stack import Stack, StackError, envoy_binary, free_port, read_tail, stop_process

MODEL = "bench-model"
RULE = "bench"
BACKEND = "mock"
CHAT_PATH = "/v1/chat/completions"
MOCK_TOKENS = 2
REQUEST_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": MOCK_TOKENS},
    separators=(",", ":"),
).encode()
GOAL_RATIO = 0.25
HERE = Path(__file__).resolve().parent


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# the instant "sidecar" (runs in its own process: python bench/e2e_latency.py --serve-instant SOCKET)

#: The fixed /route answer: the headers the real sidecar sets for this config, and an id, so that Envoy's Lua
#: filter also sends its /complete (the same work as with the real sidecar).
ROUTE_ANSWER = encode_response(
    200,
    encode_body(
        {
            "set": {
                DEFAULT_MODEL_NAME_HEADER_KEY: MODEL,
                DEFAULT_SELECTED_ROUTE_HEADER_KEY: RULE,
                ORIGINAL_PATH_HEADER_KEY: CHAT_PATH,
                SELECTED_BACKEND_HEADER_KEY: BACKEND,
            },
            "id": "bench-1",
        },
        MSGPACK,
    ),
    MSGPACK,
)
COMPLETE_ANSWER = encode_response(204)
OTHER_ANSWER = encode_response(200, b'{"status":"ok"}', JSON)


class InstantProtocol(asyncio.Protocol):
    """Finds request boundaries (head end + content-length; Envoy sends lower-case names) and answers by prefix."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            i = buf.find(b"\r\ncontent-length:", 0, end)
            length = int(buf[i + 17 : buf.find(b"\r\n", i + 2)]) if i >= 0 else 0
            total = end + 4 + length
            if len(buf) < total:
                break
            if buf.startswith(b"POST /route "):
                out.append(ROUTE_ANSWER)
            elif buf.startswith(b"POST /complete "):
                out.append(COMPLETE_ANSWER)
            else:
                out.append(OTHER_ANSWER)
            del buf[:total]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


def serve_instant(path: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(InstantProtocol, path)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


# --------------------------------------------------------------------------------------------------------------
# plugins for the --extra stacks (the sidecar imports them as e2e_latency:<name>, with this directory on its path)


class NoopMetrics:
    def start_request(self, headers: Mapping[str, str]) -> None:
        pass

    def set_model(self, model: str) -> None:
        pass

    def set_backend(self, backend: Backend) -> None:
        pass

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: Mapping[str, Any] | None = None
    ) -> None:
        pass

    def record_request_completion(self, success: bool, extra_attrs: Mapping[str, Any] | None = None) -> None:
        pass

    def record_token_latency(self, tokens: int, extra_attrs: Mapping[str, Any] | None = None) -> None:
        pass


_NOOP_METRICS = NoopMetrics()


def noop_metrics(meter: Meter) -> NoopMetrics:
    return _NOOP_METRICS


class UncachedRouter:
    """The default router without ``cache_key_headers``: ipc_router then keeps no route cache."""

    def __init__(self, default: DefaultRouter) -> None:
        self.calculate = default.calculate


def uncached_router(default: DefaultRouter, config: Config) -> UncachedRouter:
    return UncachedRouter(default)


# --------------------------------------------------------------------------------------------------------------
# processes: the mock backend and the three kinds of stack


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{read_tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.02)
    raise BenchError(f"{what} did not answer {url} within {timeout}s:\n{read_tail(log)}")


def start_mock(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = workdir / "mock.log"
    cmd = [sys.executable, "-m", "ipc_router.tools.mock_backend", "--listen", f"127.0.0.1:{port}", "--name", BACKEND]
    cmd += ["--tokens", str(MOCK_TOKENS)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, "mock backend", log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


class DirectStack(Stack):
    """Envoy alone: the generated bootstrap minus the Lua filter and the sidecar, one route to the mock."""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        pass

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        resources = doc["static_resources"]
        hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        host = hcm["route_config"]["virtual_hosts"][0]
        rule_route = next((r for r in host["routes"] if r.get("name") == RULE), None)
        if rule_route is None:
            raise BenchError(f"the generated bootstrap has no route named {RULE!r}: update DirectStack")
        host["routes"] = [{"name": "direct", "match": {"prefix": "/"}, "route": rule_route["route"]}]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.lua"]
        resources["clusters"] = [c for c in resources["clusters"] if c["name"] != SIDECAR_CLUSTER]
        return doc


class InstantStack(Stack):
    """The generated bootstrap, with this script's instant responder as the sidecar."""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        log = Path(self.workdir) / "sidecar.log"
        with log.open("ab") as out:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-instant", self.socket]
            self.sidecar = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.sidecar.poll() is not None:
                raise StackError(f"instant sidecar exited with {self.sidecar.returncode}:\n{read_tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"instant sidecar did not listen on {self.socket} within {timeout}s")
            time.sleep(0.02)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    make: Callable[[str], Stack]  # config path -> a stack, not started


def real(*sidecar_args: str, export: bool = True) -> Callable[[str], Stack]:
    def make(config: str) -> Stack:
        return Stack(
            config,
            metrics_port=free_port() if export else None,
            sidecar_args=sidecar_args,
            env={"PYTHONPATH": str(HERE)},  # for the e2e_latency:<plugin> specs
            shm=False,  # this bench decomposes the socket path; bench/e2e measures the fast path
        )

    return make


BASE = (
    VariantSpec("direct", DirectStack),
    VariantSpec("lua+instant", lambda config: InstantStack(config, shm=False)),
    VariantSpec("ipc_router", real()),
)
EXTRA = (
    VariantSpec("no-export", real(export=False)),
    VariantSpec("no-metrics", real("--metrics", "e2e_latency:noop_metrics", export=False)),
    VariantSpec("no-cache", real("--router", "e2e_latency:uncached_router")),
)


# --------------------------------------------------------------------------------------------------------------
# the client

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Client:
    """One keep-alive HTTP/1.1 connection, one pre-built request, responses read by content-length."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def get(self) -> bytes:
        """Send the request; return the response head (the whole response has been read)."""
        self.sock.sendall(self.request)
        recv = self.sock.recv
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = recv(65536)
            if not chunk:
                raise BenchError("the connection was closed")
            buf += chunk
        head = buf[:end]
        m = _CONTENT_LENGTH.search(head)
        if m is None:
            raise BenchError(f"a response without content-length: {head!r}")
        total = end + 4 + int(m.group(1))
        while len(buf) < total:
            chunk = recv(65536)
            if not chunk:
                raise BenchError("the connection was closed in a response body")
            buf += chunk
        self.buf = buf[total:]
        if not head.startswith(b"HTTP/1.1 200 "):
            raise BenchError(f"unexpected response: {buf[:total]!r}")
        return head

    def run(self, n: int) -> list[int]:
        """``n`` requests back to back; their latencies in ns."""
        clock = time.perf_counter_ns
        get = self.get
        out = [0] * n
        for i in range(n):
            t0 = clock()
            get()
            out[i] = clock() - t0
        return out


def sidecar_stats(socket_path: str) -> dict[str, Any]:
    """The sidecar's ``GET /stats`` (JSON), read over its Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(socket_path)
        s.sendall(b"GET /stats HTTP/1.1\r\nhost: ipc-router\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"GET /stats from the sidecar: {data[:200]!r}")
    stats: dict[str, Any] = json.loads(body)
    return stats


def check_sidecar(name: str, stats: Mapping[str, Any], sent: int) -> list[str]:
    """What looks wrong in a real sidecar's stats after ``sent`` requests (the last /complete may still be on
    its way)."""
    route, complete = stats["requests"].get("route", {}), stats["requests"].get("complete", {})
    problems = []
    if set(route) - {"routed_by_router", "routed_from_cache"} or sum(route.values()) != sent:
        problems.append(f"{name}: /route outcomes {route}, expected {sent} routed by the router or from the cache")
    if set(complete) - {"ok"} or not sent - 1 <= complete.get("ok", 0) <= sent:
        problems.append(f"{name}: /complete outcomes {complete}, expected {sent} ok")
    if stats["plugin_errors"] or stats["usage_missing"]:
        problems.append(f"{name}: plugin errors {stats['plugin_errors']}, usage missing {stats['usage_missing']}")
    return problems


def chat_request(port: int) -> bytes:
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"x-mock-tokens: {MOCK_TOKENS}\r\ncontent-length: {len(REQUEST_BODY)}\r\n\r\n"
    )
    return head.encode() + REQUEST_BODY


# --------------------------------------------------------------------------------------------------------------
# statistics and output


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(samples_ns: Sequence[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {
        "n": len(s),
        "p50_us": percentile(s, 0.5) / 1e3,
        "p90_us": percentile(s, 0.9) / 1e3,
        "p99_us": percentile(s, 0.99) / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
    }


@dataclass
class Variant:
    spec: VariantSpec
    stack: Stack
    client: Client | None = None
    sent: int = 0  # requests sent, warm-up included
    rounds: list[list[int]] = field(default_factory=list)
    stats: dict[str, Any] | None = None  # the real sidecar's /stats at the end

    @property
    def samples(self) -> list[int]:
        return [x for r in self.rounds for x in r]


def added(over: Variant, base: Variant) -> dict[str, float]:
    """Added latency of ``over`` relative to ``base``: differences of percentiles, and the spread over rounds
    of the per-round p50 difference (a noise gauge)."""
    a, b = summary(over.samples), summary(base.samples)
    per_round = sorted(
        percentile(sorted(x), 0.5) - percentile(sorted(y), 0.5) for x, y in zip(over.rounds, base.rounds, strict=True)
    )
    return {
        "p50_us": a["p50_us"] - b["p50_us"],
        "p99_us": a["p99_us"] - b["p99_us"],
        "mean_us": a["mean_us"] - b["mean_us"],
        "round_p50_p25_us": percentile(per_round, 0.25) / 1e3,
        "round_p50_p75_us": percentile(per_round, 0.75) / 1e3,
    }


def cpu_busy(interval: float = 0.5) -> float | None:
    """Percent of all CPUs' time spent busy over ``interval`` seconds (from /proc/stat), None where unknown."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    envoy = envoy_binary()
    out = subprocess.run([envoy, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "cpu_busy_before_pct": cpu_busy(),
        "python": platform.python_version(),
        "envoy": m.group(1) if m else out.strip(),
        "platform": platform.platform(),
    }


def print_report(result: Mapping[str, Any]) -> None:
    mc, p = result["machine"], result["params"]
    busy = mc["cpu_busy_before_pct"]
    print(f"{mc['date']}  {mc['nproc']} CPUs ({mc['cpu']})  Python {mc['python']}  Envoy {mc['envoy']}")
    if busy is not None:
        note = "  (other work is running: expect noise)" if busy > 10 else ""
        print(f"CPU busy just before the run: {busy:.0f}%{note}")
    print(
        f"c=1, keep-alive, POST {CHAT_PATH} ({len(REQUEST_BODY)} B, x-mock-tokens: {MOCK_TOKENS}); "
        f"{p['rounds']} rounds x {p['requests_per_round']} requests per variant, rotating order"
    )
    print(f"\n{'variant':<14}{'n':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}   (µs)")
    for name, s in result["variants"].items():
        print(f"{name:<14}{s['n']:>8}{s['p50_us']:>9.1f}{s['p90_us']:>9.1f}{s['p99_us']:>9.1f}{s['mean_us']:>9.1f}")
    print(f"\n{'added latency':<36}{'p50':>9}{'p99':>9}   (µs; per-round p50 diff p25..p75)")
    for label, a in result["added"].items():
        spread = f"{a['round_p50_p25_us']:.1f}..{a['round_p50_p75_us']:.1f}"
        print(f"{label:<36}{a['p50_us']:>+9.1f}{a['p99_us']:>+9.1f}   ({spread})")
    ratio = result["ratio_sidecar_over_httpcall"]
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    print(f"\nsidecar / httpCall cost (p50): {ratio:.2f}  (goal <= {GOAL_RATIO}: {verdict})")
    for name, stats in result["sidecar_stats"].items():
        route, complete = stats["requests"].get("route", {}), stats["requests"].get("complete", {})
        print(
            f"{name} sidecar: {sum(route.values())} /route ({route.get('routed_from_cache', 0)} from the cache), "
            f"{complete.get('ok', 0)} /complete"
        )
    for problem in result["problems"]:
        print(f"WARNING: {problem}")


# --------------------------------------------------------------------------------------------------------------
# the run


def measure(variants: list[Variant], seconds: float, rounds: int, warmup: float) -> int:
    """Warm up, size the rounds from the slowest variant, run them; return requests per round."""
    slowest = 0.0
    for v in variants:
        assert v.client is not None
        head = v.client.get()
        if f"x-mock-backend: {BACKEND}".encode() not in head.lower():
            raise BenchError(f"{v.spec.name}: the response did not come from the mock backend: {head!r}")
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < warmup:
            v.client.run(50)
            n += 50
        slowest = max(slowest, (time.perf_counter() - t0) / n)
        v.sent += 1 + n
    per_round = max(20, int(seconds / rounds / slowest))
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for r in range(rounds):
            for i in range(len(variants)):
                v = variants[(r + i) % len(variants)]
                assert v.client is not None
                v.rounds.append(v.client.run(per_round))
                v.sent += per_round
    finally:
        gc.enable()
        gc.unfreeze()
    return per_round


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Let the clean-up finish: SIGINT/SIGTERM received meanwhile raise KeyboardInterrupt only afterwards.

    (Ctrl-C also reaches the children, which may close the client's connection before this process sees it.)
    """
    received: list[int] = []
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


def run(args: argparse.Namespace) -> dict[str, Any]:
    specs = BASE + (EXTRA if args.extra else ())
    host = machine()
    workdir = Path(tempfile.mkdtemp(prefix="e2eb", dir="/tmp"))
    mock: subprocess.Popen[bytes] | None = None
    variants: list[Variant] = []
    try:
        mock, mock_port = start_mock(workdir)
        config = workdir / "config.yaml"
        rule = {
            "name": RULE,
            "headers": [{"type": "Exact", "name": DEFAULT_MODEL_NAME_HEADER_KEY, "value": MODEL}],
            "backends": [{"name": BACKEND, "schema": {"name": "OpenAI"}, "endpoint": f"http://127.0.0.1:{mock_port}"}],
        }
        config.write_text(yaml.safe_dump({"schema": {"name": "OpenAI"}, "rules": [rule]}, sort_keys=False))
        for spec in specs:
            v = Variant(spec, spec.make(str(config)))
            variants.append(v)
            v.stack.start()
            v.client = Client(v.stack.listen_port, chat_request(v.stack.listen_port))
        per_round = measure(variants, args.seconds, args.rounds, args.warmup)
        time.sleep(0.05)  # the last /complete
        for v in variants:
            if type(v.stack) is Stack:
                v.stats = sidecar_stats(v.stack.socket)
    finally:
        with signals_held():
            for v in reversed(variants):
                if v.client is not None:
                    v.client.close()
                v.stack.stop()
            stop_process(mock)
            shutil.rmtree(workdir, ignore_errors=True)

    by_name = {v.spec.name: v for v in variants}
    direct, instant, ipc = by_name["direct"], by_name["lua+instant"], by_name["ipc_router"]
    added_rows = {
        "Envoy httpCall + Lua (2 - 1)": added(instant, direct),
        "the Python sidecar (3 - 2)": added(ipc, instant),
        "total ipc_router (3 - 1)": added(ipc, direct),
    }
    for spec in EXTRA if args.extra else ():
        added_rows[f"sidecar, {spec.name} (- 2)"] = added(by_name[spec.name], instant)
    http_call = added_rows["Envoy httpCall + Lua (2 - 1)"]["p50_us"]
    sidecar = added_rows["the Python sidecar (3 - 2)"]["p50_us"]
    problems = [p for v in variants if v.stats is not None for p in check_sidecar(v.spec.name, v.stats, v.sent)]
    return {
        "machine": host,
        "params": {"seconds": args.seconds, "rounds": args.rounds, "requests_per_round": per_round},
        "variants": {v.spec.name: summary(v.samples) for v in variants},
        "added": added_rows,
        "ratio_sidecar_over_httpcall": sidecar / http_call if http_call > 0 else float("inf"),
        "goal_ratio": GOAL_RATIO,
        "sidecar_stats": {v.spec.name: v.stats for v in variants if v.stats is not None},
        "problems": problems,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=3.0, help="measured time per variant (default 3)")
    p.add_argument("--rounds", type=int, default=20, help="rounds the time is split into (default 20)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per variant (default 0.5)")
    p.add_argument("--extra", action="store_true", help="also run the no-export, no-metrics and no-cache sidecars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--serve-instant", metavar="SOCKET", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_instant:
        serve_instant(args.serve_instant)
        return 0
    if args.seconds <= 0 or args.rounds < 1 or args.warmup < 0:
        p.error("--seconds and --rounds must be positive, --warmup >= 0")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # clean up on SIGTERM as on Ctrl-C
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (BenchError, StackError) as e:
        print(f"e2e_latency: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
