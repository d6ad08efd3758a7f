"""Envoy with several workers on the fast path (issues #12 and #14): the e2e core cases with ``--concurrency 2`` and
``4``, one ring per worker that served, and nothing lost or counted twice, also under load.

Each request here opens its own connection (or a few per connection under load), so Envoy spreads them over its
workers; Envoy's per-worker listener counters say which workers served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import Backends, chat, iter_sse, model_rule, request, start_backends, write_config
from tests.support.shm_e2e import (
    PATH,
    Load,
    envoy_workers_with_connections,
    metric_totals,
    records,
    route_calls,
    stats,
    usage_of,
    wait_for,
)

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a", "b", "c", tokens=3)
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _clear(backends: Backends) -> None:
    backends.clear()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"concurrency{n}")
def stack(
    request: pytest.FixtureRequest, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    rules = [
        model_rule("gpt", "gpt-4o-mini", "b"),
        model_rule("llama", "llama3.3", ("a", 3), ("b", 1)),
        model_rule("mistral", "mistral-.*", "c", regex=True),
    ]
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", rules, backends)
    # (A generous /route budget: the machine is shared, and a starved sidecar's 503 is not what is tested here.)
    with Stack(str(cfg), metrics_port=free_port(), envoy_concurrency=request.param, route_timeout_ms=3000) as s:
        yield s


def body(model: str, **extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": model, **extra}).encode()


def test_two_models_to_two_backends_with_the_headers_at_the_backend(stack: Stack, backends: Backends) -> None:
    for _ in range(6):
        for model, backend, rule in (("gpt-4o-mini", "b", "gpt"), ("mistral-large", "c", "mistral")):
            r = request(stack.url, PATH, body(model))
            assert r.status == 200 and r.headers["x-mock-backend"] == backend
            seen = backends[backend].requests[-1].headers
            assert seen["x-ai-eg-model"] == model
            assert seen["x-ai-eg-selected-route"] == rule
            assert seen["x-ai-eg-selected-backend"] == backend
            assert seen["x-ai-eg-original-path"] == PATH


def test_weighted_split_over_all_workers(stack: Stack, backends: Backends) -> None:
    n = 200
    for _ in range(n):
        assert request(stack.url, PATH, body("llama3.3")).status == 200
    a, b = len(backends["a"].requests), len(backends["b"].requests)
    assert a + b == n
    # Each worker's smooth round robin (a a b a ...), and the sidecar's for misses, is within 3/4 of 3:1 over any
    # run of consecutive picks, wherever in its cycle it starts.
    assert abs(a - 0.75 * n) <= 0.75 * (stack.envoy_concurrency + 1), (a, b)


def test_errors_are_openai_json(stack: Stack) -> None:
    for _ in range(4):
        r = request(stack.url, PATH, body("no-such-model"))
        assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
        r = request(stack.url, PATH, b'{"model": "gpt-4o-mini",')
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_body"


def test_streaming_passes_through_with_its_usage(stack: Stack) -> None:
    for _ in range(4):
        r = request(stack.url, PATH, json.dumps(chat("mistral-small", stream=True)).encode(), {"x-mock-tokens": "5"})
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(iter_sse(r.body))
        assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) == 5
        assert events[-1]["usage"]["completion_tokens"] == 5


def test_every_worker_that_served_claimed_its_own_ring(stack: Stack) -> None:
    for i in range(60):  # 60 connections: every worker gets some (the kernel spreads them by reuse_port)
        assert request(stack.url, PATH, body(("gpt-4o-mini", "llama3.3")[i % 2])).status == 200
    served = {w for w, n in envoy_workers_with_connections(stack).items() if n > 0}
    assert len(served) > 1, served
    st = wait_for(lambda: (x := stats(stack)) and x["fast_path"]["claimed"] == len(served) and x, timeout=5)
    assert st, (stats(stack)["fast_path"], served)
    rings = [r for r in st["fast_path"]["rings"].values() if r["claimed"]]
    assert all(r["drained"] > 0 for r in rings)  # each of them carried records


def test_n_requests_with_usage_are_counted_exactly_once(stack: Stack) -> None:
    """N requests -> exactly N in the duration histogram and the exact token sums, streaming or not."""
    base = metric_totals(stack)
    base_stats = stats(stack)
    n, want_in, want_out = 120, 0, 0
    for i in range(n):
        prompt, out = 7 + i % 3, 1 + i % 5
        want_in, want_out = want_in + prompt, want_out + out
        model = ("gpt-4o-mini", "llama3.3", "mistral-tiny")[i % 3]
        r = request(stack.url, PATH, json.dumps(chat(model, stream=i % 2 == 0)).encode(),
                    {"x-mock-tokens": str(out), "x-mock-prompt-tokens": str(prompt)})  # fmt: skip
        assert r.status == 200
    assert wait_for(lambda: metric_totals(stack)["count"] - base["count"] >= n, timeout=5)
    time.sleep(0.3)  # anything counted twice would show now
    got = metric_totals(stack)
    assert {k: got[k] - base[k] for k in got} == {"count": n, "input": want_in, "output": want_out}
    st = stats(stack)
    assert records(st) - records(base_stats) == n
    assert st["records"].get("socket", 0) == base_stats["records"].get("socket", 0)  # all through the rings
    assert st["fast_path"]["drops"] == 0


def test_nothing_lost_under_load(stack: Stack) -> None:
    """Client threads at full speed for a bounded time: every answered request is in the histograms' counts and
    sums, streaming and not, and no ring dropped a record."""
    base, base_stats = metric_totals(stack), stats(stack)

    def plan(t: int, i: int) -> tuple[str, bool, dict[str, str]]:
        return ("gpt-4o-mini", "llama3.3")[i % 2], i % 3 == 0, {"x-mock-tokens": str(1 + (t + i) % 4)}

    results = Load(stack.url, plan, threads=6, max_seconds=3.0, per_connection=50).run()
    assert all(r.status == 200 for r in results), {(r.status, r.error) for r in results if r.status != 200}
    want_in = want_out = 0
    for r in results:
        prompt, out = usage_of(r)
        want_in, want_out = want_in + prompt, want_out + out
    n = len(results)
    assert n >= 300, n
    assert wait_for(lambda: metric_totals(stack)["count"] - base["count"] >= n, timeout=10)
    got = metric_totals(stack)
    assert {k: got[k] - base[k] for k in got} == {"count": n, "input": want_in, "output": want_out}
    st = stats(stack)
    hits = n - (route_calls(st) - route_calls(base_stats))
    elapsed = max(r.t_recv for r in results) - min(r.t_send for r in results)
    per_ring = [r["drained"] for r in st["fast_path"]["rings"].values() if r["claimed"]]
    print(f"concurrency {stack.envoy_concurrency}: {n} requests in {elapsed:.1f} s ({n / elapsed:.0f}/s), "
          f"{hits} cache hits, records per ring {per_ring}")  # fmt: skip
    # A full ring never loses a record: whatever a ring could not take (a starved sidecar drains late on this
    # shared machine; the bench measures how often at speed) came over /record instead, and nothing was counted twice.
    dropped = st["fast_path"]["drops"] - base_stats["fast_path"]["drops"]
    assert st["records"].get("socket", 0) - base_stats["records"].get("socket", 0) == dropped
    assert records(st) - records(base_stats) == n
