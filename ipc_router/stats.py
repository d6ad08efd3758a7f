"""The sidecar's own counters, as one table: each row names a figure, says what it counts and how to read it,
and so drives both ``GET /stats`` (its key) and the OpenTelemetry instrument exported for it.

A row without a ``key`` is exported only, one without an ``instrument`` is shown only in ``/stats``. The
instruments are observable: the exporter's thread reads the figures when it collects, so the request path only
ever increments plain ints (:class:`ipc_router.ledger.Stats`). Readers copy what they read, as the event loop
may be counting while they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

if TYPE_CHECKING:
    from ipc_router.service import Service

__all__ = ["STATS", "Stat", "register_instruments", "snapshot"]


def _one(value: Any) -> list[Observation]:
    return [Observation(int(value))]


def _by(label: str) -> Callable[[Mapping[str, int]], list[Observation]]:
    def observe(value: Mapping[str, int]) -> list[Observation]:
        return [Observation(n, {label: k}) for k, n in value.items()]

    return observe


@dataclass(frozen=True, slots=True)
class Stat:
    #: The key in ``/stats``; ``None``: exported only.
    key: str | None
    #: The OpenTelemetry instrument (an observable counter, or a gauge); ``None``: ``/stats`` only.
    instrument: str | None
    description: str
    #: The figure, as ``/stats`` shows it.
    read: Callable[[Service], Any]
    #: The figure as observations of the instrument.
    observe: Callable[[Any], Iterable[Observation]] = _one
    gauge: bool = False


def _requests(svc: Service) -> dict[str, dict[str, int]]:
    by_endpoint: dict[str, dict[str, int]] = {}
    for (endpoint, outcome), n in sorted(svc.stats.requests.items()):
        by_endpoint.setdefault(endpoint, {})[outcome] = n
    return by_endpoint


def _observe_requests(value: Mapping[str, Mapping[str, int]]) -> list[Observation]:
    return [Observation(n, {"endpoint": e, "outcome": o}) for e, by in value.items() for o, n in by.items()]


def _cache(svc: Service) -> dict[str, Any]:
    cache = svc.routing.cache
    return {
        "enabled": cache is not None,
        "hits": cache.hits if cache else 0,
        "misses": cache.misses if cache else 0,
        "size": len(cache) if cache else 0,
    }


def _observe_cache(value: Mapping[str, Any]) -> list[Observation]:
    if not value["enabled"]:
        return []
    return [Observation(value["hits"], {"result": "hit"}), Observation(value["misses"], {"result": "miss"})]


def _config(svc: Service) -> dict[str, Any]:
    routing = svc.routing
    return {"generation": routing.generation, "rules": len(routing.config.rules), "custom_router": routing.custom}


def _fast_path(svc: Service) -> dict[str, Any] | None:
    return dict(svc.fast_path.snapshot()) if svc.fast_path is not None else None


def _observe_drops(value: Mapping[str, Any] | None) -> list[Observation]:
    return [Observation(int(value["drops"]))] if value is not None else []


def _observe_fallbacks(value: Mapping[str, int]) -> list[Observation]:
    out = []
    for pair, n in value.items():
        primary, _, backend = pair.partition("->")
        out.append(Observation(n, {"primary": primary, "backend": backend}))
    return out


# fmt: off
#: In the order of ``/stats``' keys.
STATS: tuple[Stat, ...] = (
    Stat("requests", "ipc_router.requests", "Sidecar requests by endpoint and outcome.",
         _requests, _observe_requests),
    Stat("cache", "ipc_router.route_cache", "Route cache lookups by result.", _cache, _observe_cache),
    Stat("config", "ipc_router.config_generation", "How many configs have been loaded.",
         _config, lambda v: [Observation(v["generation"])], gauge=True),
    Stat("plugins", None, "The router and the metrics factory in use ('module:name', or 'default').",
         lambda svc: svc.plugin_names()),
    Stat("reloads", "ipc_router.config_reloads", "Config loads by result.",
         lambda svc: dict(svc.stats.reloads), _by("result")),
    Stat("plugin_errors", "ipc_router.plugin_errors", "Errors raised by plugins.",
         lambda svc: dict(svc.stats.plugin_errors), _by("plugin")),
    Stat("in_flight", "ipc_router.requests_in_flight", "Routed requests waiting for their completion.",
         lambda svc: len(svc.in_flight), gauge=True),
    Stat("expired", None, "Routed requests expired after the request TTL without a completion.",
         lambda svc: svc.stats.expired),
    Stat("evicted", None, "Routed requests dropped because the in-flight table was full.",
         lambda svc: svc.stats.evicted),
    Stat(None, "ipc_router.requests_expired", "Routed requests whose completion never arrived.",
         lambda svc: svc.stats.expired + svc.stats.evicted),
    Stat("unknown_completions", None, "Completions for no request in flight.",
         lambda svc: svc.stats.unknown_completions),
    Stat("usage_missing", "ipc_router.usage_missing", "Successful responses that carried no token usage.",
         lambda svc: svc.stats.usage_missing),
    Stat("records", "ipc_router.completion_records",
         "Self-contained completion records (fast path) by source: ring, socket (/record), bad.",
         lambda svc: dict(svc.stats.records), _by("source")),
    Stat("fallbacks", "ipc_router.fallbacks",
         "Requests of failover rules answered by a later backend than the first, by both.",
         lambda svc: {f"{a}->{b}": n for (a, b), n in list(svc.stats.fallbacks.items())}, _observe_fallbacks),
    Stat("fast_path", "ipc_router.ring_drops",
         "Completion records the filter could not put into a full ring (it sent them to /record).",
         _fast_path, _observe_drops),
    Stat("limits", "ipc_router.limit_rejections", "Requests and connections refused by a limit.",
         lambda svc: dict(svc.stats.limits), _by("limit")),
    Stat("refused_peers", "ipc_router.peers_refused",
         "Connections refused because the peer's uid/gid is not allowed.", lambda svc: svc.stats.refused_peers),
    Stat("budgets", "ipc_router.budget_events",
         "Token budgets: descriptors checked, over_limit, requests charged, cost_errors, unknown_budget, evicted keys.",
         lambda svc: dict(svc.ledger.budgets.events), _by("event")),
)
# fmt: on


def snapshot(svc: Service) -> dict[str, Any]:
    """``GET /stats``' body (before JSON)."""
    return {s.key: s.read(svc) for s in STATS if s.key is not None}


def register_instruments(meter: Meter, svc: Service) -> None:
    """One observable instrument per exported row, reading ``svc`` when the meter's readers collect."""
    for s in STATS:
        if s.instrument is None:
            continue
        create = meter.create_observable_gauge if s.gauge else meter.create_observable_counter
        create(s.instrument, [_callback(s, svc)], description=s.description)


def _callback(stat: Stat, svc: Service) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return stat.observe(stat.read(svc))

    return observe
