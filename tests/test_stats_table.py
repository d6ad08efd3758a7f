"""One table (ipc_router.stats.STATS) drives both GET /stats and the sidecar's own OTel instruments."""

from __future__ import annotations

from typing import Any

import orjson
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ipc_router.config import parse_config
from ipc_router.protocol import Request
from ipc_router.router import Routing
from ipc_router.service import Service
from ipc_router.stats import STATS

CONFIG = parse_config("rules:\n  - name: a\n    headers: [{name: x-ai-eg-model, value: m}]\n")


def exported(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def stats_of(svc: Service) -> dict[str, Any]:
    resp = svc.handle(Request("GET", "/stats", {}, b"", True))
    assert not callable(getattr(resp, "__await__", None))
    body: dict[str, Any] = orjson.loads(resp.body)  # type: ignore[union-attr]
    return body


def test_rows_have_unique_keys_and_instruments() -> None:
    keys = [s.key for s in STATS if s.key is not None]
    instruments = [s.instrument for s in STATS if s.instrument is not None]
    assert len(keys) == len(set(keys)) and len(instruments) == len(set(instruments))
    assert all(s.key is not None or s.instrument is not None for s in STATS)


def test_stats_keys_are_the_tables_keys() -> None:
    svc = Service(Routing(CONFIG))
    assert list(stats_of(svc)) == [s.key for s in STATS if s.key is not None]


def test_every_instrument_of_the_table_is_exported_with_its_description() -> None:
    reader = InMemoryMetricReader()
    svc = Service(Routing(CONFIG, generation=3), meter=MeterProvider(metric_readers=[reader]).get_meter("t"))
    svc.stats.reloads["ok"] += 2
    svc.stats.limits["body"] += 1
    svc.stats.plugin_errors["router"] += 6
    svc.stats.records["ring"] += 7
    svc.stats.usage_missing += 3
    svc.stats.expired, svc.stats.evicted = 4, 5
    svc.stats.fallbacks["a", "b"] += 2
    svc.ledger.budgets.events["checks"] += 8
    stats = stats_of(svc)
    metrics = exported(reader)
    for s in STATS:
        if s.instrument is not None and s.instrument != "ipc_router.ring_drops":  # no fast path here: no points
            assert s.instrument in metrics, s.instrument
            assert metrics[s.instrument].description == s.description
    points = {name: [(p.value, dict(p.attributes or {})) for p in m.data.data_points] for name, m in metrics.items()}
    assert points["ipc_router.requests"] == [(1, {"endpoint": "stats", "outcome": "ok"})]
    assert points["ipc_router.config_reloads"] == [(2, {"result": "ok"})]
    assert points["ipc_router.limit_rejections"] == [(1, {"limit": "body"})]
    assert points["ipc_router.plugin_errors"] == [(6, {"plugin": "router"})]
    assert points["ipc_router.completion_records"] == [(7, {"source": "ring"})]
    assert points["ipc_router.usage_missing"] == [(3, {})]
    assert points["ipc_router.requests_expired"] == [(9, {})]
    assert points["ipc_router.config_generation"] == [(3, {})]
    assert points["ipc_router.fallbacks"] == [(2, {"primary": "a", "backend": "b"})]
    assert (stats["reloads"], stats["limits"], stats["usage_missing"]) == ({"ok": 2}, {"body": 1}, 3)
    assert (stats["plugin_errors"], stats["records"]) == ({"router": 6}, {"ring": 7})
    assert (stats["expired"], stats["evicted"]) == (4, 5)
