"""Recording completions: per request through the OpenTelemetry SDK vs the pre-aggregating
:class:`~ipc_router.aggregate.Aggregator`, both through :meth:`Ledger.record` (usage extraction included) on the
same 1,000-completion corpus, after a warm-up pass (series and plans exist, as in a running sidecar).

Each round is 1,000 completions: completions/s = 1000 / mean. Each benchmark checks the recorded count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pytest_benchmark.fixture import BenchmarkFixture

from ipc_router.aggregate import Aggregator
from ipc_router.ledger import Completion, Ledger
from ipc_router.metrics import METER_NAME, REQUEST_DURATION
from tests.test_aggregate import HEADER_ATTRIBUTES, _provider, corpus

RECORDS = [c for c in corpus(1000, seed=21) if c.end >= c.start]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _durations(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        p.count for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        if m.name == REQUEST_DURATION for p in m.data.data_points
    )  # fmt: skip


def _run(benchmark: BenchmarkFixture, aggregated: bool) -> None:
    reader = InMemoryMetricReader()
    provider = _provider([reader])
    aggregator = Aggregator(provider, [reader]) if aggregated else None
    ledger = Ledger(meter=provider.get_meter(METER_NAME), header_attributes=HEADER_ATTRIBUTES, aggregator=aggregator)
    record = ledger.record

    def feed(records: list[Completion] = RECORDS) -> None:
        for c in records:
            record(c)

    feed()
    rounds = [0]

    def timed() -> None:
        feed()
        rounds[0] += 1

    benchmark(timed)
    assert _durations(reader) == len(RECORDS) * (rounds[0] + 1)
    provider.shutdown()


def test_record_1000_per_request_sdk(benchmark: BenchmarkFixture) -> None:
    _run(benchmark, aggregated=False)


def test_record_1000_aggregated(benchmark: BenchmarkFixture) -> None:
    _run(benchmark, aggregated=True)
