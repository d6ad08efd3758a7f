"""What the sidecar answers: turns a decoded request into a response, using the routing and the metrics.

No sockets here; :mod:`ipc_router.server` feeds it :class:`~ipc_router.protocol.Request` objects. Each handler
returns a :class:`Response`, or an awaitable of one when an async router is involved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import msgspec
import orjson
from opentelemetry.metrics import Meter, NoOpMeter

from ipc_router import extensions, stats
from ipc_router.config import ORIGINAL_PATH_HEADER_KEY, SELECTED_BACKEND_HEADER_KEY, Backend, Config
from ipc_router.envoy_upstreams import CLUSTER_HEADER, cluster_map
from ipc_router.fastpath import backends_by_name, record_message
from ipc_router.ledger import CompletionAggregator, Ledger, Stats
from ipc_router.metrics import new_default_chat_completion_metrics
from ipc_router.protocol import (
    JSON,
    MSGPACK,
    BadMessage,
    CompleteMessage,
    RecordMessage,
    Request,
    RouteMessage,
    decode_message,
    encode_body,
)
from ipc_router.router import Decision, Routing, UnknownRuleError

__all__ = ["FastPathSink", "Response", "Service", "Stats", "parse_header_attributes"]

log = logging.getLogger("ipc_router")

M = TypeVar("M", RouteMessage, CompleteMessage, RecordMessage)


class FastPathSink(Protocol):
    """Where decisions made for the shared-memory fast path go, and completion records come from
    (:class:`ipc_router.fastpath.FastPath`)."""

    def learn(self, routing: Routing, headers: dict[str, str], decision: Decision) -> None: ...

    def record(self, msg: RecordMessage) -> None: ...

    def snapshot(self) -> Mapping[str, Any]: ...


class _ChatRequest(msgspec.Struct):
    """The one field of an OpenAI request body the sidecar reads; the rest is skipped, not built."""

    model: object = None


_CHAT_DECODER = msgspec.json.Decoder(_ChatRequest)

_NS = 1e-9


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = MSGPACK
    #: Work to run after the response is written (the completion's metrics).
    after: Callable[[], None] | None = None


@dataclass(slots=True)
class _Routed:
    """A /route request between its decision and its answer."""

    started: float
    fmt: str
    routing: Routing
    config: Config
    path: str
    headers: dict[str, str]
    model: str
    t: float
    #: The filter reports the completion as a record (shared-memory fast path), not by ``/complete``.
    ring: bool


def parse_header_attributes(spec: str | None) -> tuple[tuple[str, str], ...]:
    """``"x-team-id:team_id,x-user-tier:tier"`` → ``(("x-team-id", "team_id"), ("x-user-tier", "tier"))``."""
    if not spec:
        return ()
    out: list[tuple[str, str]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        header, sep, attr = item.partition(":")
        header, attr = header.strip().lower(), attr.strip()
        if not sep or not header or not attr:
            raise ValueError(f"bad header attribute mapping {item!r}; expected 'header-name:attribute_name'")
        out.append((header, attr))
    return tuple(out)


def _error(status: int, message: str, type_: str, code: str) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    return Response(status, body, JSON)


class Service:
    """Handles ``/route``, ``/complete``, ``/record``, ``/healthz``, ``/v1/models``, ``/stats`` and ``/budgets``.

    ``routing`` may be replaced at any time (hot reload); each request uses the object it started with.
    """

    def __init__(
        self,
        routing: Routing,
        *,
        meter: Meter | None = None,
        metrics_factory: extensions.NewCustomChatCompletionMetricsFn | None = None,
        header_attributes: Sequence[tuple[str, str]] = (),
        router_timeout: float = 0.2,
        request_ttl: float = 600.0,
        max_in_flight: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        aggregator: CompletionAggregator | None = None,
    ) -> None:
        self.routing = routing
        self.meter: Meter = meter if meter is not None else NoOpMeter("ipc_router")
        self.ledger: Ledger = Ledger(
            meter=self.meter, metrics_factory=metrics_factory, header_attributes=header_attributes,
            request_ttl=request_ttl, max_in_flight=max_in_flight, clock=clock, aggregator=aggregator,
        )  # fmt: skip
        self.stats: Stats = self.ledger.stats
        self.router_timeout = router_timeout
        self.clock = clock
        #: The shared-memory fast path, when the sidecar runs one (see :mod:`ipc_router.fastpath`).
        self.fast_path: FastPathSink | None = None
        self._models: tuple[Routing, bytes] | None = None
        self._targets_of: tuple[Routing, dict[tuple[str, str | None], str | None], dict[str, Backend]] | None = None
        self._route_duration = self.meter.create_histogram(
            "ipc_router.route.duration", unit="s", description="Time the sidecar spent deciding one route.",
            explicit_bucket_boundaries_advisory=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5),
        )  # fmt: skip
        # Route durations wait here for flush(): a histogram record costs more than the rest of a cached route.
        self._durations: list[float] = []
        stats.register_instruments(self.meter, self)

    @property
    def in_flight(self) -> Mapping[str, object]:
        """Routed requests waiting for their ``/complete``."""
        return self.ledger.in_flight

    def expire(self, now: float | None = None) -> int:
        """Drop requests whose completion never came (see :meth:`Ledger.expire`)."""
        return self.ledger.expire(now)

    # --- dispatch -------------------------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response | Awaitable[Response]:
        path, method = req.path, req.method
        if path == "/route":
            if method != "POST":
                return self._reject(req, "route", 405, "use POST")
            return self.route(req)
        if path == "/complete":
            if method != "POST":
                return self._reject(req, "complete", 405, "use POST")
            return self.complete(req)
        if path == "/record":
            if method != "POST":
                return self._reject(req, "record", 405, "use POST")
            return self.record(req)
        if path == "/healthz":
            self.stats.requests["healthz", "ok"] += 1
            return Response(200, orjson.dumps({"status": "ok", "generation": self.routing.generation}), JSON)
        if path == "/v1/models":
            self.stats.requests["models", "ok"] += 1
            return Response(200, self._models_body(), JSON)
        if path == "/stats":
            self.stats.requests["stats", "ok"] += 1
            return Response(200, orjson.dumps(self.snapshot()), JSON)
        if path == "/budgets":
            self.stats.requests["budgets", "ok"] += 1
            books = self.ledger.budgets
            body = {"budgets": books.snapshot(), "events": dict(books.events), "last_cost_error": books.last_cost_error}
            return Response(200, orjson.dumps(body), JSON)
        return self._reject(req, "unknown", 404, f"unknown path {path!r}")

    def _reject(self, req: Request, endpoint: str, status: int, message: str) -> Response:
        self.stats.requests[endpoint, "bad_request"] += 1
        fmt = JSON if req.content_type == JSON else MSGPACK
        return Response(status, encode_body({"error": message}, fmt), fmt)

    def _message(self, req: Request, endpoint: str, kind: type[M]) -> M | Response:
        fmt = req.content_type
        if fmt not in (MSGPACK, JSON):
            return self._reject(req, endpoint, 415, f"unsupported content-type {fmt!r}; use {MSGPACK} or {JSON}")
        try:
            return decode_message(req.body, fmt, kind)
        except BadMessage as e:
            if e.limit is not None:
                self.stats.limits[e.limit] += 1
            return self._reject(req, endpoint, 400, str(e))

    # --- /route ---------------------------------------------------------------------------------------------------

    def route(self, req: Request) -> Response | Awaitable[Response]:
        started = time.perf_counter()
        msg = self._message(req, "route", RouteMessage)
        if isinstance(msg, Response):
            return msg
        fmt = req.content_type
        headers = msg.headers
        if fmt == JSON:
            headers = {k.lower(): v for k, v in headers.items()}
        t = msg.t * _NS if msg.t is not None else self.clock()

        routing = self.routing
        config = routing.config
        try:
            model = _CHAT_DECODER.decode(msg.body).model
        except msgspec.ValidationError:
            return self._client_error("request body must be a JSON object", "invalid_body", fmt)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            return self._client_error(f"request body is not valid JSON: {e}", "invalid_body", fmt)
        except RecursionError:  # msgspec gives up near 1000 levels of nesting, even in fields it skips
            self.stats.limits["message_depth"] += 1
            return self._client_error("request body is nested too deeply", "invalid_body", fmt)
        if not isinstance(model, str) or not model:
            return self._client_error("request body has no 'model' string", "missing_model", fmt)
        path = msg.path
        headers[config.model_name_header_key] = model

        try:
            decided = routing.route(headers)
        except Exception as e:
            return self._route_failed(e, model, fmt)
        routed = _Routed(started, fmt, routing, config, path, headers, model, t, msg.ring)
        if not isinstance(decided, Decision):
            return self._route_async(decided, routed)
        return self._routed(decided, routed)

    async def _route_async(self, pending: Awaitable[Decision], r: _Routed) -> Response:
        try:
            decided = await asyncio.wait_for(pending, self.router_timeout)
        except TimeoutError:
            self.stats.requests["route", "router_timeout"] += 1
            self.stats.plugin_errors["router_timeout"] += 1
            resp = _error(504, f"router took longer than {self.router_timeout}s", "server_error", "router_timeout")
            return self._answer_respond(resp, r.fmt)
        except Exception as e:
            return self._route_failed(e, r.model, r.fmt)
        return self._routed(decided, r)

    def _client_error(self, message: str, code: str, fmt: str) -> Response:
        self.stats.requests["route", code] += 1
        return self._answer_respond(_error(400, message, "invalid_request_error", code), fmt)

    def _route_failed(self, e: Exception, model: str, fmt: str) -> Response:
        if isinstance(e, extensions.NoMatchingRuleError):
            self.stats.requests["route", "no_match"] += 1
            resp = _error(
                404, f"no matching rule found for model {model!r}", "invalid_request_error", "model_not_found"
            )
        else:
            self.stats.requests["route", "router_error"] += 1
            self.stats.plugin_errors["router"] += 1
            if isinstance(e, UnknownRuleError):
                log.error("router error: %s", e)
            else:
                log.exception("custom router raised")
            resp = _error(500, f"router failed: {type(e).__name__}: {e}", "server_error", "router_error")
        return self._answer_respond(resp, fmt)

    def _answer_respond(self, resp: Response, fmt: str) -> Response:
        # An immediate response for the client travels inside a 200 answer to the filter.
        directive = {
            "respond": {"status": resp.status, "headers": {"content-type": resp.content_type}, "body": resp.body}
        }
        return Response(200, encode_body(directive, fmt), fmt)

    def _routed(self, decided: Decision, r: _Routed) -> Response:
        headers, model, config = r.headers, r.model, r.config
        rule, backend = decided.rule, decided.backend
        key: str | None = None
        if r.ring and self.fast_path is not None:
            # The filter reports this request's completion as a self-contained record: nothing to keep here,
            # and the decision goes to the shared-memory cache for the next request with the same key.
            self.fast_path.learn(r.routing, headers, decided)
        else:
            key = self.ledger.start(headers, model, backend, r.t)
        set_headers = {
            config.model_name_header_key: model,
            config.selected_route_header_key: rule.name,
            ORIGINAL_PATH_HEADER_KEY: r.path,
        }
        if backend is not None:
            set_headers[SELECTED_BACKEND_HEADER_KEY] = backend.name
        cluster = self._targets(r.routing)[0].get((rule.name, backend.name if backend is not None else None))
        if cluster is not None:
            set_headers[CLUSTER_HEADER] = cluster
        # Both are routed requests; the name says who decided (the router just now, or the cache it filled).
        self.stats.requests["route", "routed_from_cache" if decided.cached else "routed_by_router"] += 1
        if len(self._durations) < 100_000:
            self._durations.append(time.perf_counter() - r.started)
        answer: dict[str, Any] = {"set": set_headers}
        if key is not None:
            answer["id"] = key
        return Response(200, encode_body(answer, r.fmt), r.fmt)

    def _targets(
        self, routing: Routing
    ) -> tuple[dict[tuple[str, str | None], str | None], dict[str, Backend]]:
        """Per config: the cluster header's value of each (rule, backend), and the backends by name."""
        cached = self._targets_of
        if cached is None or cached[0] is not routing:
            config = routing.config
            backends = {b.name: b for r in config.rules for b in r.backends}
            cached = self._targets_of = (routing, cluster_map(config), backends)
        return cached[1], cached[2]

    def flush(self) -> None:
        """Record buffered route durations (the server calls this off the request path, periodically)."""
        durations, self._durations = self._durations, []
        record = self._route_duration.record
        for d in durations:
            record(d)

    # --- /complete ------------------------------------------------------------------------------------------------

    def complete(self, req: Request) -> Response:
        msg = self._message(req, "complete", CompleteMessage)
        if isinstance(msg, Response):
            return msg
        body = msg.body if isinstance(msg.body, bytes) else msg.body.encode()
        end = msg.t_end * _NS if msg.t_end is not None else self.clock()
        first = msg.t_first * _NS if msg.t_first is not None else None
        served = None
        if msg.served is not None:
            served = self._targets(self.routing)[1].get(msg.served) or Backend(name=msg.served)
        record = self.ledger.complete(msg.id, msg.status, first, end, msg.stream, body, msg.truncated, served)
        if record is None:
            self.stats.requests["complete", "unknown_id"] += 1
            return Response(204)
        self.stats.requests["complete", "ok"] += 1
        return Response(204, after=record)

    # --- /record --------------------------------------------------------------------------------------------------

    def record(self, req: Request) -> Response:
        """A self-contained completion record the filter could not put into a ring (full, none free)."""
        msg = self._message(req, "record", RecordMessage)
        if isinstance(msg, Response):
            return msg
        self.stats.requests["record", "ok"] += 1
        self.stats.records["socket"] += 1
        sink = self.fast_path
        if sink is not None:
            return Response(204, after=lambda: sink.record(msg))
        # A filter still on a fast path this sidecar does not run (it was restarted with --no-shm): the record is
        # self-contained, so it is recorded all the same.
        backends = backends_by_name(self.routing)
        return Response(204, after=lambda: record_message(self.ledger, msg, backends))

    # --- /v1/models, /stats ---------------------------------------------------------------------------------------

    def _models_body(self) -> bytes:
        routing = self.routing
        cached = self._models
        if cached is not None and cached[0] is routing:
            return cached[1]
        config = routing.config
        now = int(time.time())
        data: list[dict[str, Any]] = []
        seen: set[str] = set()
        for rule in config.rules:
            created = _unix(rule.models_created_at, now)
            for h in rule.headers:
                if h.name == config.model_name_header_key and h.type == "Exact" and h.value not in seen:
                    seen.add(h.value)
                    data.append(
                        {"id": h.value, "object": "model", "created": created, "owned_by": rule.models_owned_by}
                    )
        body = orjson.dumps({"object": "list", "data": data})
        self._models = (routing, body)
        return body

    def snapshot(self) -> dict[str, Any]:
        """``GET /stats``: the figures of :data:`ipc_router.stats.STATS`."""
        return stats.snapshot(self)

    def plugin_names(self) -> dict[str, str]:
        """The router and the metrics factory in use, as ``module:name`` (``default`` for ours)."""
        routing = self.routing
        return {
            "router": _plugin_name(routing.router) if routing.custom else "default",
            "metrics": _plugin_name(self.ledger.metrics_factory),
        }


def _plugin_name(obj: object) -> str:
    """``module:qualname`` of a plugin object (for a router object, of its class); ``default`` for ours."""
    if obj is new_default_chat_completion_metrics:
        return "default"
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(named, '__module__', '?')}:{getattr(named, '__qualname__', '?')}"


def _unix(iso: str | None, default: int) -> int:
    if not iso:
        return default
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return default
