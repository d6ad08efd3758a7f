"""Through a real Envoy: the README's router, copied as a user would, cannot be served a wrong route from the
cache (the issue's reproduction: a rule on a header the router does not declare, listed before the model rules)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ipc_router.tools.stack import Stack
from tests.support.e2e import Backends, chat, model_rule, request, sidecar_stats, start_backends, write_config
from tests.test_readme import _examples

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("free", "gpt", "premium-pool", tokens=2)
    yield b
    b.stop()


@pytest.fixture(scope="module", params=[False, True], ids=["socket", "shm"])
def stack(backends: Backends, tmp_path_factory: pytest.TempPathFactory, request: Any) -> Iterator[Stack]:
    app = tmp_path_factory.mktemp("app")
    (app / "my_router.py").write_text(_examples()["my_router"])
    rules = [
        {"name": "free", "headers": [{"name": "x-user-tier", "value": "free"}], "backends": [{"name": "free"}]},
        model_rule("gpt", "gpt-4o", "gpt"),
        {"name": "premium", "headers": [{"name": "x-tenant", "value": "premium"}],
         "backends": [{"name": "premium-pool"}]},
    ]  # fmt: skip
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", rules, backends)
    with Stack(
        str(cfg), router="my_router:new_custom_router", sidecar_args=("--app-dir", str(app)), shm=request.param
    ) as s:
        yield s
    sys.modules.pop("my_router", None)


def backend_of(stack: Stack, headers: dict[str, str]) -> str:
    r = request(stack.url, "/v1/chat/completions", chat("gpt-4o"), headers)
    assert r.status == 200, r.body
    return r.headers["x-mock-backend"]


def test_a_header_the_router_does_not_declare_never_leaks_through_the_cache(stack: Stack) -> None:
    assert backend_of(stack, {"x-user-tier": "free"}) == "free"
    for _ in range(3):  # before the fix: "free", from the decision cached under (tenant=None, model=gpt-4o)
        assert backend_of(stack, {}) == "gpt"
    assert backend_of(stack, {"x-user-tier": "free"}) == "free"
    assert backend_of(stack, {"x-tenant": "premium"}) == "premium-pool"
    assert backend_of(stack, {"x-user-tier": "paid"}) == "gpt"
    # ... and the cache did answer: the repeated keys were served from it, under the joined key (on the fast path
    # by the filter from the shared segment, so the sidecar saw only the four first requests of each key)
    stats = sidecar_stats(stack.socket)
    if stack.shm:
        assert stats["requests"]["route"] == {"routed_by_router": 4}
    else:
        assert stats["requests"]["route"] == {"routed_by_router": 4, "routed_from_cache": 3}
    assert stats["plugins"]["router"] == "my_router:TenantRouter"


