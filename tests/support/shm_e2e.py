"""Helpers of the fast path's acceptance tests (tests/test_e2e_shm_stress.py, tests/test_e2e_workers.py): the
sidecar's /stats over its socket, a load generator of client threads with a bounded run time, Envoy's per-worker
counters and the scraped metric totals."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipc_router.shm import Segment
from ipc_router.tools.stack import Stack
from tests.support.e2e import samples, scrape, sidecar_stats

PATH = "/v1/chat/completions"


def stats(s: Stack) -> dict[str, Any]:
    """The sidecar's /stats, over its socket."""
    return sidecar_stats(s.socket)


def route_calls(st: Mapping[str, Any]) -> int:
    """/route calls the sidecar answered (any outcome), from a /stats snapshot."""
    return sum(st["requests"].get("route", {}).values())


def records(st: Mapping[str, Any]) -> int:
    """Completions the sidecar recorded, from a /stats snapshot: records from the rings and over /record, and the
    /complete calls of requests that took the socket path (no segment mapped at that moment)."""
    complete = int(st["requests"].get("complete", {}).get("ok", 0))
    return int(st["records"].get("ring", 0)) + int(st["records"].get("socket", 0)) + complete


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    """A config rewrite as editors and kubelet do it: never a half-written file for the watcher to read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def metric_totals(s: Stack) -> dict[str, float]:
    """Request count and token sums over every attribute set, from the sidecar's Prometheus endpoint."""
    text = scrape(s.metrics_url or "")
    return {
        "count": sum(samples(text, "gen_ai_server_request_duration_seconds_count")),
        "input": sum(samples(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input")),
        "output": sum(samples(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output")),
    }


def envoy_workers_with_connections(s: Stack) -> dict[int, int]:
    """Envoy's own per-worker listener counters: worker index -> downstream connections it accepted."""
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/stats?filter=worker_", timeout=5) as r:
        text = r.read().decode()
    out: dict[int, int] = {}
    prefix = f"listener.127.0.0.1_{s.listen_port}.worker_"
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and name.endswith(".downstream_cx_total"):
            out[int(name[len(prefix) :].split(".")[0])] = int(value)
    return out


@dataclass
class Result:
    """One request as the client saw it."""

    t_send: float
    t_recv: float
    model: str
    status: int
    backend: str | None
    body: bytes
    stream: bool
    tag: str
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Load:
    """Client threads sending chat requests through Envoy until stopped or ``max_seconds`` have passed.

    ``plan(thread, i)`` gives each request: (model, stream, extra headers). Each thread opens a new connection every
    ``per_connection`` requests (so Envoy spreads them over its workers); with ``split_body`` the headers and the
    body go out in two writes a little apart, so the filter's ``body()`` really yields between them.
    """

    url: str
    plan: Callable[[int, int], tuple[str, bool, dict[str, str]]]
    threads: int = 4
    max_seconds: float = 20.0
    max_requests: int = 100_000
    per_connection: int = 20
    split_body: Callable[[int, int], bool] = lambda t, i: False
    timeout: float = 10.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        host, port = self.url.removeprefix("http://").split(":")
        self._addr = (host, int(port))

    def start(self) -> Load:
        self._deadline = time.monotonic() + self.max_seconds
        for t in range(self.threads):
            th = threading.Thread(target=self._run, args=(t,), daemon=True, name=f"load-{t}")
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        for th in self._threads:
            th.join(self.timeout + 5)
        assert not any(th.is_alive() for th in self._threads), "a client thread hung"
        return self.results

    def run(self) -> list[Result]:
        """Start and wait for the bounds (time or count) to end it."""
        self.start()
        for th in self._threads:
            th.join(self.max_seconds + self.timeout + 5)
        return self.stop()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        return len(self.results)

    def _run(self, t: int) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        per_thread = self.max_requests // self.threads
        while not self._stop.is_set() and time.monotonic() < self._deadline and i < per_thread:
            if conn is None or i % self.per_connection == 0:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection(*self._addr, timeout=self.timeout)
            model, stream, headers = self.plan(t, i)
            tag = f"{t}-{i}"
            res = self._one(conn, model, stream, {**headers, "x-test-id": tag}, tag, self.split_body(t, i))
            if res.error is not None:
                conn.close()
                conn = None
            with self._lock:
                self.results.append(res)
            i += 1
        if conn is not None:
            conn.close()

    def _one(
        self, conn: http.client.HTTPConnection, model: str, stream: bool, headers: dict[str, str], tag: str,
        split: bool,
    ) -> Result:  # fmt: skip
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "model": model}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body).encode()
        t_send = time.monotonic()
        try:
            conn.putrequest("POST", PATH, skip_accept_encoding=True)
            for k, v in {"content-type": "application/json", "content-length": str(len(data)), **headers}.items():
                conn.putheader(k, v)
            if split:
                conn.endheaders()
                time.sleep(0.003)
                conn.send(data)
            else:
                conn.endheaders(data)
            resp = conn.getresponse()
            payload = resp.read()
            status, backend = resp.status, resp.getheader("x-mock-backend")
        except (OSError, http.client.HTTPException) as e:
            return Result(t_send, time.monotonic(), model, 0, None, b"", stream, tag, error=repr(e))
        return Result(t_send, time.monotonic(), model, status, backend, payload, stream, tag)


def usage_of(res: Result) -> tuple[int, int]:
    """(prompt, completion) tokens of a 200 answer, streaming or not."""
    if res.stream:
        for line in res.body.split(b"\n"):
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    return chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]
        raise AssertionError(f"no usage in stream {res.body[-300:]!r}")
    usage = json.loads(res.body)["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def default_segment_bytes(tmp_path: Path) -> int:
    """The size of the segment the sidecar creates with its defaults (as `ipc-router serve` opens it)."""
    path = str(tmp_path / "segment.shm")
    segment, _ = Segment.open(path)
    try:
        return os.path.getsize(path)
    finally:
        segment.stop()
