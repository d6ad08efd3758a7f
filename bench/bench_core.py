"""Micro-benchmarks of the hot paths: routing (cached and not), one metrics lifecycle, usage extraction.

``make bench`` runs them with timing; plain ``pytest bench`` (``--benchmark-disable`` is the default) runs each
once as a smoke test. Every benchmark also checks its result, so a broken hot path fails here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from pytest_benchmark.fixture import BenchmarkFixture

from ipc_router import x
from ipc_router.filterapi import Backend, Config, VersionedAPISchema, config_from_dict
from ipc_router.metrics import (
    METER_NAME,
    REQUEST_DURATION,
    Usage,
    extract_usage,
    new_default_chat_completion_metrics,
)
from ipc_router.router import Decision, DefaultRouter, Routing

MODEL = "x-ai-eg-model"
N_RULES = 100


def hundred_rules() -> Config:
    """100 rules, half exact and half regex, each with two header entries and two weighted backends."""
    rules = []
    for i in range(N_RULES):
        kind = "Exact" if i % 2 == 0 else "RegularExpression"
        value = f"model-{i}" if kind == "Exact" else rf"model-{i}-v\d+"
        rules.append(
            {
                "name": f"rule-{i}",
                "headers": [
                    {"type": kind, "name": MODEL, "value": value},
                    {"name": "x-tenant", "value": f"tenant-{i}"},
                ],
                "backends": [{"name": f"b{i}-a", "weight": 3}, {"name": f"b{i}-b", "weight": 1}],
            }
        )
    return config_from_dict({"rules": rules})


CONFIG = hundred_rules()
LAST_RULE_HEADERS = {MODEL: "other", "x-tenant": f"tenant-{N_RULES - 1}", "content-type": "application/json"}
NO_MATCH_HEADERS = {MODEL: "unknown-model", "x-tenant": "nobody", "content-type": "application/json"}


def test_cached_route(benchmark: BenchmarkFixture) -> None:
    routing = Routing(CONFIG)
    headers = {MODEL: "model-42", "content-type": "application/json", ":path": "/v1/chat/completions"}
    routing.route(headers)  # fill the cache

    result = benchmark(routing.route, headers)
    assert isinstance(result, Decision)
    assert result.cached
    assert result.rule.name == "rule-42"


def test_uncached_route_last_rule(benchmark: BenchmarkFixture) -> None:
    router = DefaultRouter(CONFIG)
    assert benchmark(router.calculate, LAST_RULE_HEADERS) == f"rule-{N_RULES - 1}"


def test_uncached_route_no_match(benchmark: BenchmarkFixture) -> None:
    router = DefaultRouter(CONFIG)

    def no_match() -> bool:
        try:
            router.calculate(NO_MATCH_HEADERS)
        except x.NoMatchingRuleError:
            return True
        return False

    assert benchmark(no_match) is True


@pytest.fixture
def reader_and_provider() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def test_metrics_request_lifecycle(
    benchmark: BenchmarkFixture, reader_and_provider: tuple[InMemoryMetricReader, MeterProvider]
) -> None:
    reader, provider = reader_and_provider
    meter = provider.get_meter(METER_NAME)
    backend = Backend(name="openai.default", schema=VersionedAPISchema("OpenAI"))
    headers = {MODEL: "gpt-4o", "content-type": "application/json"}

    def lifecycle() -> None:
        m = new_default_chat_completion_metrics(meter)
        m.start_request(headers)
        m.set_model("gpt-4o")
        m.set_backend(backend)
        m.record_token_latency(120)
        m.record_token_usage(50, 120, 170)
        m.record_request_completion(True)

    benchmark(lifecycle)
    data = reader.get_metrics_data()
    assert data is not None
    counts = [
        p.count
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == REQUEST_DURATION
        for p in metric.data.data_points
        if isinstance(p, HistogramDataPoint)
    ]
    assert len(counts) == 1 and counts[0] >= 1


def stream_tail(size: int = 4096) -> bytes:
    chunk = {
        "id": "chatcmpl-C4HqHBe4xca0k0EzsCnf1t6V3YFXp",
        "object": "chat.completion.chunk",
        "created": 1755137933,
        "model": "gpt-5-nano-2025-08-07",
        "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
        "usage": None,
    }
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 377, "total_tokens": 385}}
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for _ in range(40))
    body += f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
    tail = body.encode()[-size:]
    assert len(tail) == size
    return tail


def test_usage_extraction_4k_tail(benchmark: BenchmarkFixture) -> None:
    tail = stream_tail()
    assert benchmark(extract_usage, tail, True) == Usage(8, 377, 385)
