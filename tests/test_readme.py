"""The README's plugin examples are real code: load them as plugins and use them."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ipc_router import x
from ipc_router.filterapi import config_from_dict
from ipc_router.plugins import METRICS_GROUP, ROUTERS_GROUP, load_plugin
from ipc_router.router import Decision, Routing

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> dict[str, str]:
    blocks = re.findall(r"```python\n# (\w+)\.py[^\n]*\n(.*?)```", README.read_text(), re.S)
    return {name: code for name, code in blocks}


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    found = _examples()
    for name, code in found.items():
        (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield found
    for name in found:
        sys.modules.pop(name, None)


CONFIG = config_from_dict(
    {
        "rules": [
            {"name": "gpt", "headers": [{"name": "x-ai-eg-model", "value": "gpt-4o"}], "backends": [{"name": "a"}]},
            {"name": "premium", "headers": [{"name": "x-tenant", "value": "premium"}], "backends": [{"name": "p"}]},
        ]
    }
)


def test_readme_router_example(examples: dict[str, str]) -> None:
    assert "my_router" in examples
    routing = Routing(CONFIG, load_plugin("my_router:new_custom_router", ROUTERS_GROUP))
    premium = routing.route({"x-ai-eg-model": "gpt-4o", "x-tenant": "premium"})
    plain = routing.route({"x-ai-eg-model": "gpt-4o"})
    assert isinstance(premium, Decision) and isinstance(plain, Decision)
    assert (premium.rule.name, plain.rule.name) == ("premium", "gpt")
    assert routing.cache is not None  # it declared cache_key_headers
    with pytest.raises(x.NoMatchingRuleError):
        routing.route({"x-ai-eg-model": "other"})


def test_readme_metrics_example(examples: dict[str, str]) -> None:
    factory = load_plugin("my_metrics:new_custom_chat_completion_metrics", METRICS_GROUP)
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    m = factory(meter)
    m.start_request({"x-user-tier": "gold"})
    m.set_model("gpt-4o")
    m.set_backend(CONFIG.rules[0].backends[0])
    m.record_token_usage(3, 4, 7)
    m.record_request_completion(True)
    data = reader.get_metrics_data()
    points = {
        metric.name: list(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert [dict(p.attributes) for p in points["llm.requests.by_tier"]] == [{"tier": "gold", "success": True}]
    assert points["gen_ai.server.request.duration"][0].count == 1


def test_readme_gives_the_full_signatures_of_the_metrics_methods() -> None:
    import inspect

    text = README.read_text()
    block = text[text.index("class ChatCompletionMetrics(Protocol):") :]
    block = block[: block.index("```")]
    documented = {
        name: " ".join(params.split())
        for name, params in re.findall(r"def (\w+)\(self, (.*?)\) -> None: \.\.\.", block, re.S)
    }
    expected = {}
    for name, fn in inspect.getmembers(x.ChatCompletionMetrics, inspect.isfunction):
        if name.startswith("_"):
            continue
        params = list(inspect.signature(fn).parameters.values())[1:]
        expected[name] = ", ".join(
            f"{p.name}: {p.annotation}" + (f" = {p.default}" if p.default is not inspect.Parameter.empty else "")
            for p in params
        )
    assert documented == expected
