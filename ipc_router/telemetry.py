"""Metric export: an OTel MeterProvider with a Prometheus endpoint and/or OTLP/HTTP push.

Both exporters run off the event loop: Prometheus is scraped from prometheus_client's own HTTP thread, OTLP is
pushed by the SDK's periodic reader thread. Recording a metric never waits for either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from ipc_router.metrics import METER_NAME

__all__ = ["Telemetry", "start_telemetry"]

log = logging.getLogger("ipc_router")


@dataclass
class Telemetry:
    provider: MeterProvider
    meter: Meter
    prometheus_server: Any = None
    readers: list[MetricReader] = field(default_factory=list)
    #: ``http://host:port/metrics`` when Prometheus is served.
    prometheus_url: str | None = None
    #: Unregistered from prometheus_client's default registry on shutdown.
    prometheus_collector: Any = None

    def shutdown(self) -> None:
        """Flush (a last OTLP export) and stop the exporters."""
        try:
            self.provider.shutdown()
        except Exception:  # exporters can fail on the way out; nothing left to protect
            log.exception("metrics shutdown failed")
        if self.prometheus_collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.prometheus_collector)
        if self.prometheus_server is not None:
            self.prometheus_server.shutdown()
            self.prometheus_server.server_close()


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_telemetry(
    metrics_addr: str | None = None,
    otlp_endpoint: str | None = None,
    otlp_interval: float = 10.0,
    extra_readers: list[MetricReader] | None = None,
) -> Telemetry:
    """Start the exporters. ``otlp_endpoint`` is the collector's base URL (``http://host:4318``), as in
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``/v1/metrics`` is appended unless present."""
    readers: list[MetricReader] = list(extra_readers or [])
    server = prometheus_url = collector = None
    if metrics_addr:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

        host, port = _split_addr(metrics_addr)
        own = CollectorRegistry(auto_describe=False)
        readers.append(PrometheusMetricReader(registry=own))
        collector = WithoutEmptyLabels(own)
        REGISTRY.register(collector)
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        shown = f"[{host}]" if ":" in host else host
        prometheus_url = f"http://{shown}:{server.server_address[1]}/metrics"
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        url = otlp_endpoint.rstrip("/")
        if not url.endswith("/v1/metrics"):
            url += "/v1/metrics"
        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url), export_interval_millis=otlp_interval * 1000)
        )
    provider = MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": "ipc-router"}))
    return Telemetry(provider, provider.get_meter(METER_NAME), server, readers, prometheus_url, collector)


class WithoutEmptyLabels:
    """The OTel Prometheus exporter's samples without labels whose value is empty.

    The exporter gives every point of a metric the union of the label names of all its points, padding with
    ``""``: once one request failed, every successful series would read ``error_type=""``. Prometheus treats an
    empty label as an absent one, so dropping them changes no query; it only removes the noise.
    """

    def __init__(self, source: Any) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []  # names are not known before the first collection; collecting here would be premature

    def collect(self) -> Iterator[Any]:
        for family in self._source.collect():
            family.samples = [
                s._replace(labels={k: v for k, v in s.labels.items() if v != ""})
                if "" in s.labels.values()
                else s
                for s in family.samples
            ]
            yield family
