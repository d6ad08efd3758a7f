"""The shared-memory fast path end to end: a real Envoy, the real sidecar, real mock backends.

Cached routes are served by the Lua filter from the segment with no round trip; completions come back through the
rings. Every test here checks the sidecar's own counters as well as what the backends and the client saw.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc_router.fastpath import segment_path
from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import (
    Backends,
    chat,
    model_rule,
    request,
    samples,
    scrape,
    sidecar_stats,
    start_backends,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.envoy

PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a", "b", "c", tokens=3)
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _clear(backends: Backends) -> None:
    backends.clear()


def rules() -> list[dict[str, Any]]:
    return [
        {
            "name": "free",
            "headers": [{"name": "x-user-tier", "value": "free"}],
            "backends": [{"name": "c"}],
        },
        model_rule("llama", "llama3.3", ("a", 3), ("b", 1)),
        model_rule("gpt", "gpt-4o-mini", "b"),
        model_rule("mistral", "mistral-.*", "c", regex=True),
    ]


def stats(s: Stack) -> dict[str, Any]:
    return sidecar_stats(s.socket)


def route_calls(s: Stack) -> int:
    return sum(stats(s)["requests"].get("route", {}).values())


def recorded(s: Stack) -> int:
    return int(stats(s)["records"].get("ring", 0))


def sdk_body(model: str, **extra: Any) -> bytes:
    """The openai SDK's order: messages first, model later."""
    body = {"messages": [{"role": "user", "content": 'say "model": "gpt-4o-mini"'}], "model": model, **extra}
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def stack(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", rules(), backends)
    with Stack(str(cfg), metrics_port=free_port()) as s:
        yield s


def test_segment_exists_beside_the_socket_with_the_sockets_mode(stack: Stack) -> None:
    path = segment_path(stack.socket, stack.workdir)
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o660
    assert stats(stack)["fast_path"]["path"] == path


def test_cache_hits_make_no_round_trip(stack: Stack, backends: Backends) -> None:
    first = request(stack.url, PATH, sdk_body("gpt-4o-mini"))
    assert first.status == 200 and first.headers["x-mock-backend"] == "b"
    before = route_calls(stack)
    n = 50
    for _ in range(n):
        r = request(stack.url, PATH, sdk_body("gpt-4o-mini"))
        assert r.status == 200 and r.headers["x-mock-backend"] == "b"
    assert route_calls(stack) == before  # every one of them was a hit served by the filter
    seen = backends["b"].requests[-1].headers
    assert seen["x-ai-eg-model"] == "gpt-4o-mini"
    assert seen["x-ai-eg-selected-route"] == "gpt"
    assert seen["x-ai-eg-selected-backend"] == "b"
    assert seen["x-ai-eg-original-path"] == PATH
    # ... and every completion came back through a ring.
    assert wait_until(lambda: recorded(stack) >= n + 1)


def test_a_nested_model_key_does_not_fool_the_filter(stack: Stack, backends: Backends) -> None:
    body = json.dumps({"messages": [{"role": "user", "model": "gpt-4o-mini"}], "model": "mistral-large"})
    for _ in range(3):
        r = request(stack.url, PATH, body.encode())
        assert r.status == 200 and r.headers["x-mock-backend"] == "c"


def test_a_header_rule_is_never_shadowed_by_a_cached_model_decision(stack: Stack, backends: Backends) -> None:
    # The issue-9 shape, on the fast path: a decision cached for (model) must not serve (model, tier=free).
    for _ in range(3):
        assert request(stack.url, PATH, sdk_body("gpt-4o-mini")).headers["x-mock-backend"] == "b"
        r = request(stack.url, PATH, sdk_body("gpt-4o-mini"), {"x-user-tier": "free"})
        assert r.headers["x-mock-backend"] == "c"


def test_weighted_split_holds_on_the_fast_path(stack: Stack, backends: Backends) -> None:
    n = 200
    for _ in range(n):
        assert request(stack.url, PATH, sdk_body("llama3.3")).status == 200
    a, b = len(backends["a"].requests), len(backends["b"].requests)
    assert a + b == n
    assert abs(a - 0.75 * n) <= 2, (a, b)  # smooth WRR per worker: exact over every cycle of 4


def test_errors_still_come_from_the_sidecar(stack: Stack) -> None:
    r = request(stack.url, PATH, sdk_body("no-such-model"))
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
    r = request(stack.url, PATH, b'{"model": "gpt-4o-mini",')
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_body"
    r = request(stack.url, PATH, b'{"model": "gpt-4o-mini"} trailing')
    assert r.status == 400


def test_streaming_usage_reaches_the_metrics(stack: Stack, backends: Backends) -> None:
    assert stack.metrics_url
    key = 'gen_ai_token_type="output"'

    def output_tokens() -> float:
        text = scrape(stack.metrics_url or "")
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("gen_ai_client_token_usage_sum{") and key in line and "mistral-small" in line
        )

    before = output_tokens()
    for _ in range(4):
        r = request(stack.url, PATH, json.dumps(chat("mistral-small", stream=True)).encode(), {"x-mock-tokens": "7"})
        assert r.status == 200
    assert wait_until(lambda: output_tokens() - before == 28, timeout=5), output_tokens() - before


def test_frozen_sidecar_cached_routes_keep_flowing_and_are_recorded_after(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", rules(), backends)
    with Stack(str(cfg)) as s:
        assert s.sidecar is not None
        assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        assert wait_until(lambda: recorded(s) == 1)
        os.kill(s.sidecar.pid, signal.SIGSTOP)
        try:
            for _ in range(20):
                r = request(s.url, PATH, sdk_body("gpt-4o-mini"), timeout=5)
                assert r.status == 200 and r.headers["x-mock-backend"] == "b"
            # A miss needs the sidecar: it fails by the filter's timeout, it does not hang.
            t0 = time.monotonic()
            r = request(s.url, PATH, sdk_body("mistral-x"), timeout=5)
            assert r.status == 503 and time.monotonic() - t0 < 2
        finally:
            os.kill(s.sidecar.pid, signal.SIGCONT)
        assert wait_until(lambda: recorded(s) == 21, timeout=5), stats(s)


def test_killed_sidecar_restart_adopts_the_segment_and_loses_nothing(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", rules(), backends)
    with Stack(str(cfg)) as s:
        assert s.sidecar is not None
        assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        s.sidecar.send_signal(signal.SIGKILL)
        s.sidecar.wait()
        # Cached routes still work from the segment; their records wait in the rings.
        for _ in range(5):
            assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        s.start_sidecar()
        # The new sidecar drained what the rings held (5) and serves again.
        assert wait_until(lambda: recorded(s) >= 5, timeout=5), stats(s)
        assert wait_until(lambda: request(s.url, PATH, sdk_body("mistral-x")).status == 200)


def segment_mappings(pid: int, path: str) -> list[str]:
    """The lines of /proc/<pid>/maps that map the segment at ``path`` (a retired one ends in " (deleted)")."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.rstrip("\n") for line in f if path in line]


def test_restarted_sidecars_leave_envoy_mapping_only_the_current_segment(backends: Backends, tmp_path: Path) -> None:
    """A sidecar stopped cleanly removes its segment; the next one creates another. Envoy's filter must unmap the
    retired one as soon as it sees it stopped: a mapping keeps the file's pages allocated, and on a tmpfs sized
    for a few segments (docker-compose.yaml, the Kubernetes emptyDir) retired segments still mapped leave the next
    sidecar no room (ENOSPC: fast path off)."""
    cfg = write_config(tmp_path / "config.yaml", rules(), backends)
    with Stack(str(cfg)) as s:
        assert s.envoy is not None
        path = segment_path(s.socket, s.workdir)
        assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        assert wait_until(lambda: recorded(s) == 1), stats(s)
        for _ in range(3):
            s.stop_sidecar()
            s.start_sidecar()
            # The filter re-opens at most once a second; until then requests take the socket path.
            assert wait_until(
                lambda: request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200 and recorded(s) >= 1,
                timeout=5, interval=0.2,
            ), stats(s)  # fmt: skip
            maps = segment_mappings(s.envoy.pid, path)
            assert maps and not [m for m in maps if m.endswith("(deleted)")], maps


def test_reload_bumps_the_generation_and_old_entries_are_misses(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", [model_rule("m", "model-x", "a"), model_rule("n", "model-y", "b")],
                       backends)  # fmt: skip
    with Stack(str(cfg)) as s:
        for _ in range(3):
            assert request(s.url, PATH, sdk_body("model-x")).headers["x-mock-backend"] == "a"
        write_config(cfg, [model_rule("m", "model-q", "a"), model_rule("n", "model-x", "b")], backends)
        assert wait_until(lambda: request(s.url, PATH, sdk_body("model-x")).headers.get("x-mock-backend") == "b",
                          timeout=3)  # fmt: skip
        for _ in range(5):
            assert request(s.url, PATH, sdk_body("model-x")).headers["x-mock-backend"] == "b"


def test_corrupt_segment_turns_the_fast_path_off_and_envoy_keeps_serving(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", rules(), backends)
    with Stack(str(cfg)) as s:
        assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        path = segment_path(s.socket, s.workdir)
        with open(path, "r+b") as f:
            f.write(b"\xff" * 64)  # magic, version, sizes: garbage
        before = route_calls(s)
        for _ in range(10):
            r = request(s.url, PATH, sdk_body("gpt-4o-mini"))
            assert r.status == 200 and r.headers["x-mock-backend"] == "b"
        assert route_calls(s) >= before + 10  # every request took the socket path
        assert s.envoy is not None and s.envoy.poll() is None


def test_fast_path_off_and_on_route_and_count_alike(backends: Backends, tmp_path: Path) -> None:
    """The differential test: one corpus through Envoy with the fast path on and off gives the same routing at
    the backends and the same token metrics."""
    corpus: list[tuple[bytes, dict[str, str]]] = []
    for i in range(40):
        model = ["gpt-4o-mini", "llama3.3", "mistral-large", "nope"][i % 4]
        headers = {"x-user-tier": "free"} if i % 5 == 0 else {}
        stream = i % 3 == 0
        body = chat(model, stream=stream)
        if i % 7 == 0:
            body = {"messages": body["messages"], "model": model, "temperature": 0.2}  # model not first
        corpus.append((json.dumps(body).encode(), headers))

    def run(shm: bool) -> tuple[Counter[tuple[int, str]], dict[str, float]]:
        cfg = write_config(tmp_path / f"config-{shm}.yaml", rules(), backends)
        with Stack(str(cfg), metrics_port=free_port(), shm=shm) as s:
            seen: Counter[tuple[int, str]] = Counter()
            for body, headers in corpus:
                r = request(s.url, PATH, body, headers)
                seen[r.status, r.headers.get("x-mock-backend", "-")] += 1
            assert s.metrics_url

            def totals() -> dict[str, float]:
                text = scrape(s.metrics_url or "")
                return {
                    t: sum(samples(text, "gen_ai_client_token_usage_sum", gen_ai_token_type=t))
                    for t in ("input", "output")
                } | {"count": sum(samples(text, "gen_ai_server_request_duration_seconds_count"))}

            expected_count = sum(n for (status, _), n in seen.items() if status in (200,))
            wait_until(lambda: totals()["count"] >= expected_count, timeout=5)
            return seen, totals()

    off, off_totals = run(False)
    on, on_totals = run(True)
    # Backends: the same per (status, backend), except the weighted llama rule's split of a/b, which may differ by
    # where each side's round-robin cycle starts.
    for key in set(on) | set(off):
        if key not in ((200, "a"), (200, "b")):
            assert on[key] == off[key], key
    assert on[200, "a"] + on[200, "b"] == off[200, "a"] + off[200, "b"]
    assert abs(on[200, "a"] - off[200, "a"]) <= 1
    assert on_totals == off_totals


def test_a_sidecar_restarted_without_the_fast_path_retires_the_segment(backends: Backends, tmp_path: Path) -> None:
    """kill -9, then a sidecar with --no-shm: the filter must not keep serving from (and writing records into) a
    segment nobody reads. The new sidecar records what the rings held, stops the segment, and the filter takes the
    socket path; a record that still comes over /record is recorded too."""
    cfg = write_config(tmp_path / "config.yaml", rules(), backends)
    with Stack(str(cfg), metrics_port=free_port()) as s:
        assert s.sidecar is not None
        assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        assert wait_until(lambda: recorded(s) == 1)
        s.sidecar.send_signal(signal.SIGKILL)
        s.sidecar.wait()
        for _ in range(3):  # hits from the orphaned segment; their records wait in the rings
            assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        s.shm = False
        s.start_sidecar()
        assert not os.path.exists(segment_path(s.socket, s.workdir))
        assert recorded(s) == 3  # the three completions the rings held
        before = route_calls(s)
        for _ in range(3):
            assert request(s.url, PATH, sdk_body("gpt-4o-mini")).status == 200
        assert route_calls(s) == before + 3  # the socket path now

        def count() -> float:
            return sum(samples(scrape(s.metrics_url or ""), "gen_ai_server_request_duration_seconds_count"))

        assert wait_until(lambda: count() == 6, timeout=5), count()


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_a_backend_that_resets_mid_stream_is_counted_and_leaves_nothing(
    backends: Backends, tmp_path: Path, shm: bool
) -> None:
    """The backend sends the headers and two chunks, then resets its connection. The client gets a cut stream; no
    GenAI metrics are recorded (there is no usage); the request is counted as expired, and no state is left: the
    socket path's in-flight entry expires (--request-ttl 1), the fast path's filter forgets the request after its
    pending_timeout_s and reports it incomplete."""
    cfg = write_config(tmp_path / "config.yaml", [model_rule("m", "m-reset", "a")], backends)
    with Stack(
        str(cfg), metrics_port=free_port(), shm=shm, sidecar_args=["--request-ttl", "1"], pending_timeout_s=0.5
    ) as s:
        assert request(s.url, PATH, sdk_body("m-reset")).status == 200
        backends["a"].config.abort_after = 2
        try:
            with pytest.raises((OSError, http.client.HTTPException)):
                request(s.url, PATH, json.dumps(chat("m-reset", stream=True)).encode())
        finally:
            backends["a"].config.abort_after = None

        def expired() -> int:
            # The fast path's filter notices when later requests arrive (it checks its table then).
            request(s.url, PATH, sdk_body("m-reset"))
            return int(stats(s)["expired"])

        assert wait_until(lambda: expired() >= 1, timeout=8, interval=0.3), stats(s)
        st = stats(s)
        assert st["in_flight"] == 0
        text = scrape(s.metrics_url or "")
        assert samples(text, "gen_ai_server_request_duration_seconds_count", error_type="incomplete") == []
