"""The aggregator against the per-request path: the same completions, through the ledger both ways, into real
SDK MeterProviders, export the same data (points, attributes, buckets, sums, counts, min/max, order) and the same
Prometheus scrape text."""

from __future__ import annotations

import math
import random
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

import ipc_router.aggregate as aggregate
import ipc_router.ledger as ledger
from ipc_router.aggregate import Aggregator
from ipc_router.filterapi import Backend, VersionedAPISchema
from ipc_router.ledger import Completion, Ledger
from ipc_router.metrics import METER_NAME, DefaultChatCompletionMetrics, instruments_for

HEADER_ATTRIBUTES = (("x-team-id", "team_id"), ("x-tier", "tier"))
BACKENDS = [
    Backend("openai-a"),
    Backend("bedrock", VersionedAPISchema("AWSBedrock")),
    Backend("azure", VersionedAPISchema("AzureOpenAI")),
    Backend("selfhosted", VersionedAPISchema("Custom")),
    None,
]
DELTA = {Histogram: AggregationTemporality.DELTA}


def _body(usage: tuple[int, int] | None, stream: bool) -> bytes:
    u = None if usage is None else {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                     "total_tokens": usage[0] + usage[1]}  # fmt: skip
    if not stream:
        return orjson.dumps({"id": "x", "choices": [], **({"usage": u} if u else {})})
    chunks = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n']
    if u is not None:
        chunks.append(b"data: " + orjson.dumps({"choices": [], "usage": u}) + b"\n\n")
    return b"".join(chunks) + b"data: [DONE]\n\n"


def corpus(n: int, seed: int = 7, teams: int = 3) -> list[Completion]:
    """Models, backends, streaming and not, failures (HTTP and no response), missing usage, 0/1/many output
    tokens, header attributes, a negative duration (clock skew: dropped by the SDK), durations past the buckets."""
    rnd = random.Random(seed)
    out: list[Completion] = []
    for _ in range(n):
        stream = rnd.random() < 0.5
        start = rnd.uniform(1000.0, 2000.0)
        dur = rnd.choice([rnd.uniform(0.001, 3.0), rnd.uniform(0.001, 0.05), rnd.uniform(50, 200)])
        if rnd.random() < 0.01:
            dur = -0.5
        first = start + rnd.uniform(0.0001, max(dur, 0.0002)) if stream and rnd.random() < 0.9 else None
        status = rnd.choice([200, 200, 200, 200, 201, 400, 429, 500, 503, 0])
        usage = rnd.choice([None, (rnd.randint(1, 5000), rnd.choice([0, 1, 2, rnd.randint(3, 3000)]))])
        if rnd.random() < 0.1:
            usage = (rnd.randint(1, 10), 1)
        headers: dict[str, str] = {"content-type": "application/json"}
        if rnd.random() < 0.7:
            headers["x-team-id"] = f"team-{rnd.randrange(teams)}"
        if rnd.random() < 0.3:
            headers["x-tier"] = rnd.choice(["gold", "free"])
        body = _body(usage, stream) if rnd.random() < 0.95 else b"not json"
        out.append(Completion(
            headers=headers, model=rnd.choice(["gpt-4o", "llama-3", "claude", ""]), backend=rnd.choice(BACKENDS),
            status=status, stream=stream, start=start, first=first, end=start + dur, body=body,
            truncated=not stream and rnd.random() < 0.05,
        ))  # fmt: skip
    return out


def _provider(readers: list[MetricReader]) -> MeterProvider:
    resource = Resource.create({"service.name": "ipc-router", "service.instance.id": "test"})
    return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)


class Side:
    """One MeterProvider fed through a ledger: per request (``aggregated=False``) or through an Aggregator."""

    def __init__(self, aggregated: bool, make_readers: Callable[[], list[MetricReader]]) -> None:
        self.readers = make_readers()
        self.provider = _provider(self.readers)
        meter = self.provider.get_meter(METER_NAME)
        self.aggregator = Aggregator(self.provider, self.readers) if aggregated else None
        self.ledger = Ledger(meter=meter, header_attributes=HEADER_ATTRIBUTES, aggregator=self.aggregator)

    def feed(self, completions: list[Completion]) -> None:
        for c in completions:
            self.ledger.record(c)
        assert self.ledger.stats.plugin_errors["metrics"] == 0

    def close(self) -> None:
        self.provider.shutdown()


def view(data: MetricsData | None) -> list[Any]:
    """Everything but timestamps, with attribute order and the types of sums/min/max (int vs float)."""
    if data is None:
        return []
    out: list[Any] = []
    for rm in data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            metrics = []
            for m in sm.metrics:
                points = [
                    (list(p.attributes.items()), p.count, (type(p.sum), p.sum), p.bucket_counts, p.explicit_bounds,
                     (type(p.min), p.min), (type(p.max), p.max), p.exemplars)
                    for p in m.data.data_points
                ]  # fmt: skip
                metrics.append((m.name, m.description, m.unit, type(m.data), m.data.aggregation_temporality, points))
            scopes.append((sm.scope, sm.schema_url, metrics))
        out.append((dict(rm.resource.attributes), rm.schema_url, scopes))
    return out


@pytest.fixture
def sides() -> Iterator[Callable[[Callable[[], list[MetricReader]]], tuple[Side, Side]]]:
    made: list[Side] = []

    def make(make_readers: Callable[[], list[MetricReader]]) -> tuple[Side, Side]:
        pair = Side(False, make_readers), Side(True, make_readers)
        made.extend(pair)
        return pair

    yield make
    for s in made:
        s.close()


def _in_memory(**kw: Any) -> Callable[[], list[MetricReader]]:
    return lambda: [InMemoryMetricReader(**kw)]


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_same_metrics_data_as_per_request_path(sides: Any, temporality: str) -> None:
    kw = {"preferred_temporality": DELTA} if temporality == "delta" else {}
    ref, agg = sides(_in_memory(**kw))
    records = corpus(1500)
    # Collections in between: cumulative totals carry over, deltas start over.
    for chunk in (records[:1], records[1:1000], records[1000:1000], records[1000:]):
        ref.feed(chunk)
        agg.feed(chunk)
        expected = view(ref.readers[0].get_metrics_data())  # type: ignore[attr-defined]
        got = view(agg.readers[0].get_metrics_data())  # type: ignore[attr-defined]
        assert got == expected
    assert expected, "the corpus recorded nothing"
    names = {m[0] for rm in expected for sm in rm[2] for m in sm[2]}
    assert names == {
        "gen_ai.client.token.usage", "gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    }  # fmt: skip


def _series(data: MetricsData | None, name: str) -> list[dict[str, Any]]:
    return [
        dict(p.attributes) for rm in view_data(data) for m in rm if m.name == name for p in m.data.data_points
    ]


def view_data(data: MetricsData | None) -> list[Any]:
    return [] if data is None else [sm.metrics for rm in data.resource_metrics for sm in rm.scope_metrics]


def test_corpus_covers_the_rules(sides: Any) -> None:
    """The differential test is only as good as its corpus: failures carry error.type (status or
    "incomplete"), successes and TPOT none; TTFT and TPOT exist; the negative duration was dropped."""
    ref, _ = sides(_in_memory())
    records = corpus(1500)
    ref.feed(records)
    data = ref.readers[0].get_metrics_data()
    durations = _series(data, "gen_ai.server.request.duration")
    errors = {a.get("error.type") for a in durations}
    assert {"500", "429", "incomplete", None} <= errors
    assert all("error.type" not in a for a in _series(data, "gen_ai.server.time_per_output_token"))
    assert _series(data, "gen_ai.server.time_to_first_token")
    providers = {a.get("gen_ai.provider.name") for a in durations}
    assert {"openai", "aws.bedrock", "azure.ai.openai", "selfhosted", None} <= providers
    assert any("gen_ai.request.model" not in a for a in durations)  # the empty model
    total = sum(p.count for ms in view_data(data) for m in ms if m.name == "gen_ai.server.request.duration"
                for p in m.data.data_points)  # fmt: skip
    negative = sum(1 for c in records if c.end < c.start)
    assert negative and total == len(records) - negative


def test_prometheus_scrape_text_is_identical(sides: Any) -> None:
    registries: list[CollectorRegistry] = []

    def prometheus() -> list[MetricReader]:
        registries.append(CollectorRegistry())
        return [PrometheusMetricReader(registry=registries[-1])]

    ref, agg = sides(prometheus)
    records = corpus(800, seed=11)
    for chunk in (records[:700], records[700:]):
        ref.feed(chunk)
        agg.feed(chunk)
        expected, got = generate_latest(registries[0]), generate_latest(registries[1])
        assert b"gen_ai_server_request_duration_seconds_bucket" in expected
        assert got == expected


def test_cumulative_and_delta_readers_on_one_provider(sides: Any) -> None:
    ref, agg = sides(lambda: [InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)])
    records = corpus(2000, seed=3)
    schedule = [(records[:500], (0, 1)), (records[500:900], (1,)), (records[900:1500], (0,)), (records[1500:], (1, 0))]
    for chunk, order in schedule:
        ref.feed(chunk)
        agg.feed(chunk)
        for i in order:
            assert view(agg.readers[i].get_metrics_data()) == view(ref.readers[i].get_metrics_data())


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_cardinality_limit_overflow_matches(sides: Any, temporality: str) -> None:
    kw: dict[str, Any] = {"cardinality_limits": {Histogram: 12}}
    if temporality == "delta":
        kw["preferred_temporality"] = DELTA
    ref, agg = sides(_in_memory(**kw))
    records = corpus(1500, seed=5, teams=400)
    for chunk in (records[:600], records[600:]):
        ref.feed(chunk)
        agg.feed(chunk)
        expected = view(ref.readers[0].get_metrics_data())
        assert "otel.metric.overflow" in repr(expected)
        assert view(agg.readers[0].get_metrics_data()) == expected
        # Unbounded attribute sets cost bounded memory, as in the SDK: at most the limit per instrument.
        assert len(agg.aggregator._series) <= 4 * 12
        assert sum(len(r.accs) for r in agg.aggregator._readers) <= 4 * 12


def _dyadic(records: list[Completion]) -> list[Completion]:
    """Times on a 1/1024 s grid: float sums are exact whatever the order of addition."""
    for c in records:
        c.start, c.end = round(c.start * 1024) / 1024, round(c.end * 1024) / 1024
        c.first = None if c.first is None else round(c.first * 1024) / 1024
    return records


def test_socket_path_and_aggregator_into_one_provider_merge() -> None:
    """The socket path's per-request objects and the aggregator share a provider: one point per series."""
    records = _dyadic(corpus(2000, seed=9))
    ref = Side(False, _in_memory())
    both = Side(True, _in_memory())
    per_request = Ledger(meter=both.provider.get_meter(METER_NAME), header_attributes=HEADER_ATTRIBUTES)
    try:
        ref.feed(records)
        for i, c in enumerate(records):
            (per_request if i % 3 == 0 else both.ledger).record(c)
        assert view(both.readers[0].get_metrics_data()) != []
        expected = sorted(map(repr, _flat(ref.readers[0].get_metrics_data())))
        assert sorted(map(repr, _flat(both.readers[0].get_metrics_data()))) == expected
    finally:
        ref.close()
        both.close()


def _flat(data: MetricsData | None) -> list[Any]:
    """Points keyed by metric and attribute set, order-free (merging changes the order of points, and so the
    order of float additions: sums to 12 digits; the times are dyadic, only TPOT's division rounds)."""
    return [
        (m.name, sorted(p.attributes.items()), p.count, float(f"{p.sum:.12g}"), p.bucket_counts, p.min, p.max)
        for ms in view_data(data) for m in ms for p in m.data.data_points
    ]  # fmt: skip


def test_a_spec_the_plans_do_not_match_is_replayed_every_time(sides: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """When DefaultChatCompletionMetrics computes values differently from the aggregator's arithmetic, the
    aggregator notices on the shape's first completion and follows the spec (slowly) instead of its plan."""

    class Skewed(DefaultChatCompletionMetrics):
        def record_request_completion(self, success: bool, extra_attrs: Any = None) -> None:
            start = self._start
            self._start = start - 0.25  # durations a quarter second longer
            super().record_request_completion(success, extra_attrs)

    monkeypatch.setattr(aggregate, "DefaultChatCompletionMetrics", Skewed)
    monkeypatch.setattr(ledger, "new_default_chat_completion_metrics", lambda meter: Skewed(instruments_for(meter)))
    ref, agg = sides(_in_memory())
    records = corpus(500, seed=2)
    ref.feed(records)
    agg.feed(records)
    assert agg.aggregator is not None
    assert not any(p.exact for p in agg.aggregator._plans.values() if any(s == 3 for s, _ in p.steps))
    assert view(agg.readers[0].get_metrics_data()) == view(ref.readers[0].get_metrics_data())


def test_add_concurrent_with_collection_loses_nothing() -> None:
    """Completions added on one thread while two readers collect on others: the deltas add up to the total and
    the cumulative reader ends equal to the per-request path."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: a thread switch inside add or collect gets likely
    try:
        _concurrent()
    finally:
        sys.setswitchinterval(interval)


def _concurrent() -> None:
    records = _dyadic(corpus(4000, seed=13))
    ref = Side(False, _in_memory())
    agg = Side(True, lambda: [InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)])
    stop = threading.Event()
    deltas: list[MetricsData | None] = []

    def collector(reader: Any, sink: list[MetricsData | None] | None) -> None:
        while not stop.is_set():
            data = reader.get_metrics_data()
            if sink is not None:
                sink.append(data)

    threads = [
        threading.Thread(target=collector, args=(agg.readers[0], None)),
        threading.Thread(target=collector, args=(agg.readers[1], deltas)),
    ]
    try:
        for t in threads:
            t.start()
        ref.feed(records)
        agg.feed(records)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        deltas.append(agg.readers[1].get_metrics_data())
        assert len(deltas) > 2, "the collectors never ran during the adds"
        totals: dict[Any, list[int]] = {}
        for d in deltas:
            for name, attrs, count, *_ in _flat(d):
                totals.setdefault((name, repr(attrs)), []).append(count)
        expected = {(name, repr(attrs)): count for name, attrs, count, *_ in _flat(ref.readers[0].get_metrics_data())}
        assert {k: sum(v) for k, v in totals.items()} == expected
        assert sorted(map(repr, _flat(agg.readers[0].get_metrics_data()))) == sorted(map(repr, _flat(
            ref.readers[0].get_metrics_data())))  # fmt: skip
    finally:
        ref.close()
        agg.close()


class CapturingOTLPExporter(OTLPMetricExporter):
    """The real OTLP/HTTP exporter (its temporality preference, its protobuf encoding), minus the network."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(endpoint="http://127.0.0.1:9/v1/metrics", **kw)
        self.exported: list[bytes] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kw: Any) -> MetricExportResult:
        request = encode_metrics(metrics_data)
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.histogram.data_points:
                        p.start_time_unix_nano = p.time_unix_nano = 0
        self.exported.append(request.SerializeToString(deterministic=True))
        return MetricExportResult.SUCCESS


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_otlp_periodic_reader_exports_the_same_protobuf(sides: Any, temporality: str) -> None:
    """The periodic reader takes its temporality from the exporter; the encoded requests are byte-identical
    (timestamps zeroed)."""
    kw = {"preferred_temporality": DELTA} if temporality == "delta" else {}
    ref, agg = sides(lambda: [PeriodicExportingMetricReader(CapturingOTLPExporter(**kw), math.inf)])
    records = corpus(1500, seed=17)
    for chunk in (records[:500], records[500:]):
        ref.feed(chunk)
        agg.feed(chunk)
        for side in (ref, agg):
            side.readers[0].force_flush()
    sent = [s.readers[0]._exporter.exported for s in (ref, agg)]
    assert len(sent[0]) == 2 and all(sent[0])
    assert sent[1] == sent[0]
    if temporality == "delta":
        assert b"gen_ai.server.request.duration" in sent[0][1]


def test_refuses_views_and_unregistered_readers() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=[View(instrument_name="*")], shutdown_on_exit=False)
    with pytest.raises(ValueError, match="views"):
        Aggregator(provider, [reader])
    provider.shutdown()
    with pytest.raises(ValueError, match="not registered"):
        Aggregator(_provider([]), [InMemoryMetricReader()])


def test_refuses_a_reader_preferring_another_histogram_aggregation() -> None:
    reader = InMemoryMetricReader(preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()})
    provider = _provider([reader])
    with pytest.raises(ValueError, match="aggregation"):
        Aggregator(provider, [reader])
    provider.shutdown()


def test_disabled_sdk_exports_nothing(sides: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    ref, agg = sides(_in_memory())
    ref.feed(corpus(50))
    agg.feed(corpus(50))
    assert ref.readers[0].get_metrics_data() is None
    assert agg.readers[0].get_metrics_data() is None


def test_nothing_recorded_exports_nothing_extra(sides: Any) -> None:
    ref, agg = sides(_in_memory())
    assert agg.readers[0].get_metrics_data() is None
    assert ref.readers[0].get_metrics_data() is None
