"""Soak: a real Envoy and sidecar (fast path on) under a steady request rate, streaming and not, with config
reloads, for a fixed time; then the books are checked.

``python -m tests.support.soak --seconds 600`` (``make soak``) prints the figures as JSON; ``tests/test_soak.py`` runs a
30-second version inside ``make test``. Traffic goes to 127.0.0.1 only, at a bounded rate, for a bounded time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import (
    Backends,
    chat,
    iter_sse,
    model_rule,
    samples,
    scrape,
    sidecar_stats,
    start_backends,
    wait_until,
    write_config,
)

MODELS = ("soak-a", "soak-b", "soak-c")


@dataclass
class Figures:
    seconds: float
    rate: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reloads: int = 0
    recorded: float = 0.0  # gen_ai_server_request_duration_count, all series
    output_tokens_expected: int = 0
    output_tokens_recorded: float = 0.0
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    fds_start: int = 0
    fds_end: int = 0
    in_flight_end: int = 0
    ring_drops: int = 0
    records_by_source: dict[str, int] = field(default_factory=dict)
    #: (seconds since start, sidecar RSS in KiB), every few seconds: a leak grows steadily, a warm-up levels off.
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    #: Token budgets: the total tokens the answers reported for the clients' x-user-id, and what the sidecar's
    #: books (GET /budgets) say they spent.
    budget_expected: int = 0
    budget_spent: int = 0
    #: The first few failures: (seconds since start, model, stream, what).
    failures: list[tuple[float, str, bool, str]] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_kib - self.rss_start_kib) / self.rss_start_kib if self.rss_start_kib else 0.0

    def problems(self) -> list[str]:
        """What the soak must not show: errors, lost or double-counted completions, leaks."""
        out = []
        if self.errors:
            out.append(f"client errors: {self.errors}")
        if self.recorded != self.ok:
            out.append(f"{self.ok} requests completed, {self.recorded:.0f} recorded")
        if self.output_tokens_recorded != self.output_tokens_expected:
            out.append(f"output tokens: {self.output_tokens_expected} sent, {self.output_tokens_recorded:.0f} recorded")
        if self.rss_growth >= 0.05:
            out.append(f"sidecar RSS grew {self.rss_growth:.1%} ({self.rss_start_kib} -> {self.rss_end_kib} KiB)")
        if self.fds_end > self.fds_start + 4:
            out.append(f"sidecar fds {self.fds_start} -> {self.fds_end}")
        if self.in_flight_end:
            out.append(f"{self.in_flight_end} requests left in flight")
        if self.ring_drops:
            out.append(f"{self.ring_drops} records dropped by full rings")
        if self.budget_spent != self.budget_expected:
            out.append(f"token budgets: {self.budget_expected} tokens answered, {self.budget_spent} charged")
        return out


def _proc(pid: int) -> tuple[int, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _rules(flip: bool) -> list[dict[str, Any]]:
    a, b = ("a", "b") if not flip else ("b", "a")
    return [
        model_rule("ra", "soak-a", (a, 3), (b, 1)),
        model_rule("rb", "soak-b", b),
        model_rule("rc", "soak-c", "c"),
    ]


#: A budget every client's requests are checked against and charged to (never spent: the soak's limit is huge).
BUDGETS: dict[str, Any] = {
    "llmRequestCosts": [{"metadataKey": "tokens", "type": "TotalToken"}],
    "tokenBudgets": [
        {"name": "soak", "cost": "tokens", "headers": ["x-user-id"], "limit": 10**12, "unit": "day"}
    ],
}


def _total_tokens(body: bytes, stream: bool) -> int:
    if not stream:
        return int(json.loads(body)["usage"]["total_tokens"])
    found = [e["usage"] for e in iter_sse(body) if e.get("usage")]
    return int(found[-1]["total_tokens"])


def run(seconds: float = 30.0, rate: float = 60.0, clients: int = 4, reload_every: float = 3.0) -> Figures:
    fig = Figures(seconds=seconds, rate=rate)
    work = Path(tempfile.mkdtemp(prefix="soak", dir="/tmp"))
    backends: Backends = start_backends("a", "b", "c", tokens=4)
    lock = threading.Lock()
    try:
        cfg = write_config(work / "config.yaml", _rules(False), backends, **BUDGETS)
        with Stack(str(cfg), metrics_port=free_port()) as stack:
            assert stack.sidecar is not None and stack.metrics_url is not None
            t0 = time.monotonic()
            stop_at = t0 + seconds
            # RSS is compared from a quarter of the run on (first allocations, caches and metric series are warm)
            warm_at = t0 + seconds / 4
            sample_every = max(1.0, seconds / 60)
            next_sample = t0
            measured = threading.Event()

            def client(seed: int) -> None:
                rnd = random.Random(seed)
                host, port = "127.0.0.1", stack.listen_port
                conn = http.client.HTTPConnection(host, port, timeout=10)
                interval = clients / rate
                next_at = time.monotonic()
                while time.monotonic() < stop_at:
                    next_at += interval
                    stream = rnd.random() < 0.4
                    tokens = rnd.randint(1, 8)
                    model = rnd.choice(MODELS)
                    body = json.dumps(chat(model, stream=stream)).encode()
                    headers = {
                        "content-type": "application/json", "x-mock-tokens": str(tokens),
                        "x-user-id": f"user-{seed}",
                    }  # fmt: skip
                    total = 0
                    try:
                        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                        resp = conn.getresponse()
                        answer = resp.read()
                        key = "ok" if resp.status == 200 else f"status {resp.status}"
                        if key == "ok":
                            total = _total_tokens(answer, stream)
                    except (OSError, http.client.HTTPException) as e:
                        key = type(e).__name__
                        conn.close()
                        conn = http.client.HTTPConnection(host, port, timeout=10)
                    with lock:
                        fig.sent += 1
                        if key == "ok":
                            fig.ok += 1
                            fig.output_tokens_expected += tokens
                            fig.budget_expected += total
                        else:
                            fig.errors[key] = fig.errors.get(key, 0) + 1
                            if len(fig.failures) < 20:
                                fig.failures.append((round(time.monotonic() - t0, 2), model, stream, key))
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                conn.close()

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
            for t in threads:
                t.start()
            flip = False
            next_reload = time.monotonic() + reload_every
            while time.monotonic() < stop_at:
                now = time.monotonic()
                if now >= next_sample:
                    fig.rss_samples.append((round(now - t0, 1), _proc(stack.sidecar.pid)[0]))
                    next_sample = now + sample_every
                if not measured.is_set() and now >= warm_at:
                    fig.rss_start_kib, fig.fds_start = _proc(stack.sidecar.pid)
                    measured.set()
                if now >= next_reload:
                    flip = not flip
                    write_config(cfg, _rules(flip), backends, **BUDGETS)
                    fig.reloads += 1
                    next_reload = now + reload_every
                    backends.clear()  # the mocks keep every request: keep the test process small
                time.sleep(0.05)
            for t in threads:
                t.join(timeout=15)

            def settled() -> bool:
                text = scrape(stack.metrics_url or "")
                fig.recorded = sum(samples(text, "gen_ai_server_request_duration_seconds_count"))
                return fig.recorded >= fig.ok

            wait_until(settled, timeout=10)
            text = scrape(stack.metrics_url)
            fig.output_tokens_recorded = sum(samples(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output"))
            fig.rss_end_kib, fig.fds_end = _proc(stack.sidecar.pid)
            st = sidecar_stats(stack.socket)
            fig.in_flight_end = int(st["in_flight"])
            fig.ring_drops = int((st.get("fast_path") or {}).get("drops", 0))
            fig.records_by_source = dict(st.get("records", {}))

            def charged() -> bool:
                rows = sidecar_stats(stack.socket, "/budgets")["budgets"]
                fig.budget_spent = sum(int(r["spent"]) for r in rows if r["budget"] == "soak")
                return fig.budget_spent >= fig.budget_expected

            wait_until(charged, timeout=10)
    finally:
        backends.stop()
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second, all clients together")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--reload-every", type=float, default=5.0)
    a = p.parse_args()
    fig = run(a.seconds, a.rate, a.clients, a.reload_every)
    print(json.dumps({**asdict(fig), "rss_growth": round(fig.rss_growth, 4), "problems": fig.problems()}, indent=2))
    return 1 if fig.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
