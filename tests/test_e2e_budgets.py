"""Token budgets end to end (issue #15): costs from each response's usage, enforced by Envoy's own rate limit
filter asking the sidecar's rate limit service, on the fast path and on the socket path, streaming included.

Each test reads the usage the backend reported in its responses and sums it itself: the books the sidecar keeps
(``GET /budgets``) must match that sum exactly, and the first request after the sum reached the limit must get a
429 with an OpenAI-style JSON error without reaching the backend.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import (
    Backends,
    Reply,
    chat,
    iter_sse,
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

CHAT = "/v1/chat/completions"
USER_LIMIT = 100
TEAM_LIMIT = 400


def budget_config(path: Path, backends: Backends, user_limit: int = USER_LIMIT) -> Path:
    return write_config(
        path,
        [model_rule("small", "m-small", "a"), model_rule("big", "m-big", "a")],
        backends,
        llmRequestCosts=[
            {"metadataKey": "tokens", "type": "TotalToken"},
            {"metadataKey": "weighted", "type": "CEL", "cel": "model == 'm-big' ? total_tokens * 10 : total_tokens"},
            {"metadataKey": "output", "type": "OutputToken"},
        ],
        tokenBudgets=[
            {"name": "per-user", "cost": "tokens", "headers": ["x-user-id"], "limit": user_limit, "unit": "day"},
            {"name": "per-team", "cost": "weighted", "headers": ["x-team"], "limit": TEAM_LIMIT, "unit": "day"},
            {"name": "burst", "cost": "output", "headers": ["x-burst"], "limit": 1, "unit": "second"},
        ],
    )


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a", tokens=8, prompt_tokens=12)
    yield b
    b.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["fast_path", "socket_path"])
def stack(
    request: pytest.FixtureRequest, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    cfg = budget_config(tmp_path_factory.mktemp("budgets") / "config.yaml", backends)
    s = Stack(str(cfg), shm=request.param, metrics_port=free_port(), sidecar_args=["--reload-interval", "0.1"])
    s.start()
    yield s
    s.stop()


def spent(stack: Stack, budget: str, **key: str) -> int:
    for row in sidecar_stats(stack.socket, "/budgets")["budgets"]:
        if row["budget"] == budget and row["key"] == key:
            return int(row["spent"])
    return 0


def usage_of(reply: Reply, stream: bool) -> dict[str, int]:
    if not stream:
        return dict(reply.json()["usage"])
    found = [e["usage"] for e in iter_sse(reply.body) if e.get("usage")]
    assert len(found) == 1, reply.body
    return dict(found[0])


def send(stack: Stack, model: str, headers: dict[str, str], stream: bool = False) -> Reply:
    return request(stack.url, CHAT, chat(model, stream=stream), headers=headers)


def assert_over_budget(reply: Reply, budget: str) -> None:
    assert reply.status == 429, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    retry = int(reply.headers["retry-after"])
    assert 1 <= retry <= 86400
    error = json.loads(reply.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert budget in error["message"]


def spend_until_refused(stack: Stack, backends: Backends, model: str, headers: dict[str, str], budget: str,
                        key: dict[str, str], limit: int, cost: Any, stream: bool = False,
                        already: int = 0) -> int:  # fmt: skip
    """Send requests until one is refused; every accepted one must be charged exactly ``cost(usage)``. Returns
    the total spent (``already`` when the first is sent)."""
    total = already
    for _ in range(limit + 1):
        before = len(backends["a"].requests)
        reply = send(stack, model, headers, stream)
        if total >= limit:
            assert_over_budget(reply, budget)
            assert len(backends["a"].requests) == before, "a refused request reached the backend"
            return total
        assert reply.status == 200, (reply.status, reply.body)
        total += cost(usage_of(reply, stream))
        assert wait_until(lambda t=total: spent(stack, budget, **key) == t), (spent(stack, budget, **key), total)
    raise AssertionError("never refused")


def test_a_user_over_budget_gets_429_and_others_do_not(stack: Stack, backends: Backends) -> None:
    user = f"alice-{stack.shm}"
    total = spend_until_refused(
        stack, backends, "m-small", {"x-user-id": user}, "per-user", {"x-user-id": user}, USER_LIMIT,
        lambda u: u["total_tokens"],
    )  # fmt: skip
    assert total >= USER_LIMIT
    # Still refused: a check charges nothing.
    assert_over_budget(send(stack, "m-small", {"x-user-id": user}), "per-user")
    assert spent(stack, "per-user", **{"x-user-id": user}) == total
    # Another user, and a request that names no user, go through.
    assert send(stack, "m-small", {"x-user-id": f"bob-{stack.shm}"}).status == 200
    assert send(stack, "m-small", {}).status == 200


def test_streaming_responses_are_charged_and_enforced(stack: Stack, backends: Backends) -> None:
    user = f"carol-{stack.shm}"
    spend_until_refused(
        stack, backends, "m-small", {"x-user-id": user}, "per-user", {"x-user-id": user}, USER_LIMIT,
        lambda u: u["total_tokens"], stream=True,
    )  # fmt: skip
    assert_over_budget(send(stack, "m-small", {"x-user-id": user}, stream=True), "per-user")


def test_a_cel_cost_weighs_by_model(stack: Stack, backends: Backends) -> None:
    team = f"red-{stack.shm}"
    reply = send(stack, "m-small", {"x-team": team})
    small = usage_of(reply, False)["total_tokens"]
    assert wait_until(lambda: spent(stack, "per-team", **{"x-team": team}) == small)
    total = spend_until_refused(
        stack, backends, "m-big", {"x-team": team}, "per-team", {"x-team": team}, TEAM_LIMIT,
        lambda u: 10 * u["total_tokens"], already=small,
    )  # fmt: skip
    assert spent(stack, "per-team", **{"x-team": team}) == total
    # The small model costs its tokens once, the big one ten times: 1 + 10k small requests' worth.
    assert (total - small) % (10 * small) == 0 and total > TEAM_LIMIT - 10 * small


def test_a_window_starts_afresh(stack: Stack, backends: Backends) -> None:
    key = f"b-{stack.shm}"
    for _ in range(5):  # a second boundary may fall between the charge and the check: try again
        assert send(stack, "m-small", {"x-burst": key}).status == 200
        started = int(time.time())
        wait_until(lambda: spent(stack, "burst", **{"x-burst": key}) > 0, timeout=0.5, interval=0.01)
        refused = send(stack, "m-small", {"x-burst": key})
        if int(time.time()) == started:
            assert_over_budget(refused, "burst")
            time.sleep(max(0.0, started + 1.05 - time.time()))
            assert send(stack, "m-small", {"x-burst": key}).status == 200
            return
        time.sleep(max(0.0, started + 1.05 - time.time()))  # next second: start over
    raise AssertionError("no try fitted in one second")


def test_a_limit_changes_live(stack: Stack, backends: Backends, tmp_path: Path) -> None:
    user = f"dave-{stack.shm}"
    spend_until_refused(
        stack, backends, "m-small", {"x-user-id": user}, "per-user", {"x-user-id": user}, USER_LIMIT,
        lambda u: u["total_tokens"],
    )  # fmt: skip
    generation = sidecar_stats(stack.socket)["config"]["generation"]
    budget_config(Path(stack.config), backends, user_limit=100 * USER_LIMIT)
    assert wait_until(lambda: sidecar_stats(stack.socket)["config"]["generation"] > generation)
    assert send(stack, "m-small", {"x-user-id": user}).status == 200  # what was spent stays; the limit grew
    budget_config(Path(stack.config), backends)
    assert wait_until(lambda: send(stack, "m-small", {"x-user-id": user}).status == 429)


def envoy_counter(stack: Stack, suffix: str) -> int:
    """The sum of Envoy's counters whose names end in ``suffix`` (``cluster.<c>.ratelimit.over_limit``...)."""
    text = request(f"http://127.0.0.1:{stack.admin_port}", "/stats?filter=ratelimit").body.decode()
    return sum(int(v) for k, _, v in (line.partition(": ") for line in text.splitlines()) if k.endswith(suffix))


def test_envoy_refuses_by_its_rate_limit_filter(stack: Stack, backends: Backends) -> None:
    user = f"erin-{stack.shm}"
    before = envoy_counter(stack, ".ratelimit.over_limit")
    spend_until_refused(
        stack, backends, "m-small", {"x-user-id": user}, "per-user", {"x-user-id": user}, USER_LIMIT,
        lambda u: u["total_tokens"],
    )  # fmt: skip
    assert envoy_counter(stack, ".ratelimit.over_limit") == before + 1
    assert envoy_counter(stack, ".ratelimit.ok") > 0


def test_a_frozen_sidecar_fails_open_and_charges_later(stack: Stack, backends: Backends) -> None:
    if not stack.shm:
        pytest.skip("without the fast path a frozen sidecar cannot route at all (fail_closed: 503)")
    user = f"frank-{stack.shm}"
    assert send(stack, "m-small", {"x-user-id": user}).status == 200  # the route is cached now
    assert wait_until(lambda: spent(stack, "per-user", **{"x-user-id": user}) > 0)
    first = spent(stack, "per-user", **{"x-user-id": user})
    allowed = envoy_counter(stack, ".ratelimit.failure_mode_allowed")
    assert stack.sidecar is not None
    stack.sidecar.send_signal(signal.SIGSTOP)
    try:
        reply = send(stack, "m-small", {"x-user-id": user})  # the check times out (500 ms): let through
    finally:
        stack.sidecar.send_signal(signal.SIGCONT)
    assert reply.status == 200
    assert envoy_counter(stack, ".ratelimit.failure_mode_allowed") == allowed + 1
    expected = first + usage_of(reply, False)["total_tokens"]
    assert wait_until(lambda: spent(stack, "per-user", **{"x-user-id": user}) == expected)


def test_a_refused_request_is_recorded_as_an_error_and_leaves_nothing_in_flight(
    stack: Stack, backends: Backends
) -> None:
    def refused() -> float:
        text = scrape(stack.metrics_url or "")
        return sum(samples(text, "gen_ai_server_request_duration_seconds_count", error_type="429"))

    before = refused()
    user = f"gina-{stack.shm}"
    spend_until_refused(
        stack, backends, "m-small", {"x-user-id": user}, "per-user", {"x-user-id": user}, USER_LIMIT,
        lambda u: u["total_tokens"],
    )  # fmt: skip
    assert wait_until(lambda: refused() == before + 1)
    assert sidecar_stats(stack.socket)["in_flight"] == 0


def test_a_repeated_budget_header_is_refused(stack: Stack, backends: Backends) -> None:
    # Envoy's rate limit filter would check the first value and the charge would see both joined: refused.
    before = len(backends["a"].requests)
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
    try:
        body = json.dumps(chat("m-small")).encode()
        conn.putrequest("POST", CHAT)
        for name, value in (("content-type", "application/json"), ("content-length", str(len(body))),
                            ("x-user-id", "victim"), ("x-user-id", f"mallory-{stack.shm}")):  # fmt: skip
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        status, error = resp.status, json.loads(resp.read())["error"]
    finally:
        conn.close()
    assert status == 400 and error["code"] == "repeated_header" and "x-user-id" in error["message"]
    assert len(backends["a"].requests) == before
    assert spent(stack, "per-user", **{"x-user-id": "victim"}) == 0
    # One value is fine, and so is a repeated header that no budget reads.
    assert send(stack, "m-small", {"x-user-id": f"mallory-{stack.shm}"}).status == 200
