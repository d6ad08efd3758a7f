"""The request ledger: every routed request is started, completed or expired here, exactly once.

Two ways in, one set of books:

* the socket path: ``/route`` calls :meth:`Ledger.start` (a per-request metrics object waits in a bounded,
  expiring in-flight table) and ``/complete`` calls :meth:`Ledger.complete` with the request's id;
* self-contained completions (:class:`Completion`): a record the Lua filter wrote into a shared-memory ring, or
  sent to ``/record`` when no ring could take it, carries everything a metrics object needs (arrival time, the
  headers the metrics read, model, backend); :meth:`Ledger.record` replays the same calls in the same order.

With the default metrics and an aggregator, completions skip the per-request objects altogether: the
aggregator records exactly what :class:`~ipc_router.metrics.DefaultChatCompletionMetrics` would, without one
OpenTelemetry SDK call per value. No I/O here.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.metrics import Meter, NoOpMeter

from ipc_router import extensions
from ipc_router.budgets import Budgets
from ipc_router.config import Backend
from ipc_router.metrics import ERROR_TYPE, Usage, extract_usage, new_default_chat_completion_metrics

__all__ = ["Completion", "CompletionAggregator", "Ledger", "Stats"]

log = logging.getLogger("ipc_router")


@dataclass
class Stats:
    """The sidecar's own counters (plain ints: reading them costs the hot path nothing)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    plugin_errors: Counter[str] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)
    #: Requests and connections turned away by a limit, by limit (docs/reliability.md lists them).
    limits: Counter[str] = field(default_factory=Counter)
    #: Connections closed at accept because the peer's uid/gid is not in the allowlist.
    refused_peers: int = 0
    usage_missing: int = 0
    expired: int = 0
    evicted: int = 0
    unknown_completions: int = 0
    #: Completions taken from shared-memory rings / from ``/record``.
    records: Counter[str] = field(default_factory=Counter)
    #: Requests of failover rules that another backend than the first answered, by (first, served).
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass(slots=True)
class Completion:
    """A finished request with everything its metrics need (times in seconds on the ``time.monotonic`` clock)."""

    headers: Mapping[str, str]
    model: str
    backend: Backend | None
    status: int
    stream: bool
    start: float
    first: float | None
    end: float
    body: bytes
    truncated: bool
    #: The response phase never ran (the stream was reset): nothing to record but the count, as the socket
    #: path's expiry counts a ``/complete`` that never came.
    incomplete: bool = False


class CompletionAggregator(Protocol):
    """Records the default GenAI metrics of many completions at once (see :mod:`ipc_router.aggregate`)."""

    def add(
        self,
        model: str,
        backend: Backend | None,
        status: int,
        stream: bool,
        t_start: float,
        t_first: float | None,
        t_end: float,
        usage: Usage | None,
        attrs: Mapping[str, str],
    ) -> None: ...


@dataclass(slots=True)
class _InFlight:
    #: ``None`` when the aggregator records this request: then the facts below are all it needs.
    metrics: extensions.ChatCompletionMetrics | None
    attrs: Mapping[str, str]
    expires: float
    model: str = ""
    backend: Backend | None = None
    start: float = 0.0
    #: The request headers its token budgets are keyed by (:meth:`Budgets.keep`).
    budget_headers: Mapping[str, str] = field(default_factory=dict)


class Ledger:
    """Starts, completes and expires requests; drives each request's
    :class:`~ipc_router.extensions.ChatCompletionMetrics`."""

    def __init__(
        self,
        *,
        meter: Meter | None = None,
        metrics_factory: extensions.NewCustomChatCompletionMetricsFn | None = None,
        header_attributes: Sequence[tuple[str, str]] = (),
        request_ttl: float = 600.0,
        max_in_flight: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        stats: Stats | None = None,
        aggregator: CompletionAggregator | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.meter: Meter = meter if meter is not None else NoOpMeter("ipc_router")
        custom = metrics_factory or extensions.new_custom_chat_completion_metrics
        self.custom_metrics = custom is not None
        self.metrics_factory: extensions.NewCustomChatCompletionMetricsFn = (
            custom or new_default_chat_completion_metrics
        )
        self.header_attributes = tuple(header_attributes)
        self.request_ttl = request_ttl
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.stats = stats if stats is not None else Stats()
        # Only the default metrics can be aggregated: a plugin gets its per-request objects.
        self.aggregator = aggregator if not self.custom_metrics else None
        #: Token budgets, charged with each completed request's costs (none until configured).
        self.budgets = budgets if budgets is not None else Budgets()
        self.in_flight: OrderedDict[str, _InFlight] = OrderedDict()
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()):x}-"

    def attributes(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The extra metric attributes of a request (``--metrics-request-header-attributes``)."""
        return {attr: headers[h] for h, attr in self.header_attributes if h in headers}

    def record_header_names(self) -> tuple[str, ...] | None:
        """The request headers a self-contained completion must carry; ``None``: all of them (a metrics plugin
        may read any header in ``start_request``)."""
        if self.custom_metrics:
            return None
        return tuple(dict.fromkeys([*(h for h, _ in self.header_attributes), *self.budgets.header_names]))

    # --- the socket path: start ... complete ----------------------------------------------------------------------

    def start(self, headers: Mapping[str, str], model: str, backend: Backend | None, t: float) -> str:
        """A request was routed. Returns its id for :meth:`complete` (an id is issued even when the metrics
        failed to start: that request is simply not tracked)."""
        key = self._id_prefix + str(next(self._ids))
        expires = self.clock() + self.request_ttl
        kept = self.budgets.keep(headers) if self.budgets.header_names else {}
        if self.aggregator is not None:
            self._track(key, _InFlight(None, self.attributes(headers), expires, model, backend, t, kept))
            return key
        metrics = self._begin(headers, model, backend, t)
        if metrics is not None:
            self._track(key, _InFlight(metrics, self.attributes(headers), expires, model, backend, t, kept))
        return key

    def complete(
        self,
        key: str,
        status: int,
        first: float | None,
        end: float,
        stream: bool,
        body: bytes,
        truncated: bool,
        served: Backend | None = None,
    ) -> Callable[[], None] | None:
        """The request ``key`` ended. Returns the recording to run once the filter has its answer (``None`` for an
        unknown id: expired, evicted, or never issued)."""
        entry = self.in_flight.pop(key, None)
        if entry is None:
            self.stats.unknown_completions += 1
            return None

        metrics = entry.metrics
        backend = self.served_by(entry.backend, served)
        if metrics is None:
            done = Completion(entry.attrs, entry.model, backend, status, stream, entry.start, first, end, body,
                              truncated)  # fmt: skip
            return lambda: self._aggregate(done, entry.attrs, entry.budget_headers)

        def record() -> None:
            if backend is not entry.backend and backend is not None:
                try:  # a failover: the metrics learn the backend that answered (set_backend once more)
                    metrics.set_backend(backend)
                except Exception:
                    self._metrics_failed()
            usage = self._finish(metrics, entry.attrs, status, first, end, stream, body, truncated)
            self._charge(entry.budget_headers, entry.model, backend, usage)

        return record

    # --- self-contained completions -------------------------------------------------------------------------------

    def served_by(self, chosen: Backend | None, served: Backend | None) -> Backend | None:
        """The backend to record: ``served`` when Envoy failed over to it (counted), else ``chosen``."""
        if served is None or (chosen is not None and served.name == chosen.name):
            return chosen
        self.stats.fallbacks[(chosen.name if chosen is not None else "", served.name)] += 1
        return served

    def record(self, c: Completion) -> None:
        """Record a completion that carries its own start (a ring record, or ``/record``). Never raises."""
        if c.incomplete:
            self.stats.expired += 1
            return
        if self.aggregator is not None:
            self._aggregate(c, self.attributes(c.headers), c.headers)
            return
        metrics = self._begin(c.headers, c.model, c.backend, c.start)
        if metrics is not None:
            usage = self._finish(
                metrics, self.attributes(c.headers), c.status, c.first, c.end, c.stream, c.body, c.truncated
            )
        else:
            usage = self._usage(c.status, c.stream, c.body, c.truncated) if self.budgets.active else None
        self._charge(c.headers, c.model, c.backend, usage)

    def _aggregate(self, c: Completion, attrs: Mapping[str, str], budget_headers: Mapping[str, str]) -> None:
        assert self.aggregator is not None
        usage = self._usage(c.status, c.stream, c.body, c.truncated)
        try:
            self.aggregator.add(c.model, c.backend, c.status, c.stream, c.start, c.first, c.end, usage, attrs)
        except Exception:
            self._metrics_failed()
        self._charge(budget_headers, c.model, c.backend, usage)

    def _charge(self, headers: Mapping[str, str], model: str, backend: Backend | None, usage: Usage | None) -> None:
        """A completed request's costs go to its token budgets (a response without usage costs nothing)."""
        if usage is None or not self.budgets.active:
            return
        try:
            self.budgets.charge(
                headers, model, backend.name if backend is not None else "",
                usage.input_tokens, usage.output_tokens, usage.total_tokens,
            )  # fmt: skip
        except Exception:  # a bug in the books must not lose the metrics recorded above
            self.budgets.events["charge_errors"] += 1
            log.exception("charging a token budget failed")

    # --- expiry ---------------------------------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Drop requests whose completion never came (client reset, lost call). Cheap: the table is in age order."""
        now = self.clock() if now is None else now
        table = self.in_flight
        n = 0
        while table:
            first = next(iter(table.values()))
            if first.expires > now:
                break
            table.popitem(last=False)
            n += 1
        self.stats.expired += n
        return n

    # --- the metrics calls, in the contract's order ---------------------------------------------------------------

    def _begin(
        self, headers: Mapping[str, str], model: str, backend: Backend | None, t: float
    ) -> extensions.ChatCompletionMetrics | None:
        try:
            metrics = self.metrics_factory(self.meter)
        except Exception:
            self._metrics_failed()
            return None
        token = extensions.set_request_time(t)
        try:
            metrics.start_request(headers)
            metrics.set_model(model)
            if backend is not None:
                metrics.set_backend(backend)
        except Exception:
            self._metrics_failed()
            return None
        finally:
            extensions.reset_request_time(token)
        return metrics

    def _usage(self, status: int, stream: bool, body: bytes, truncated: bool) -> Usage | None:
        usage = extract_usage(body, stream) if body and (stream or not truncated) else None
        if usage is None and 200 <= status < 300:
            self.stats.usage_missing += 1
        return usage

    def _finish(
        self,
        m: extensions.ChatCompletionMetrics,
        attrs: Mapping[str, str],
        status: int,
        first: float | None,
        end: float,
        stream: bool,
        body: bytes,
        truncated: bool,
    ) -> Usage | None:
        success = 200 <= status < 300
        usage = self._usage(status, stream, body, truncated)
        token = extensions.set_request_time(end)
        try:
            if stream and first is not None:
                extensions.set_request_time(first)
                m.record_token_latency(usage.output_tokens if usage is not None else 0, attrs or None)
                extensions.set_request_time(end)
            if usage is not None:
                m.record_token_usage(usage.input_tokens, usage.output_tokens, usage.total_tokens, attrs or None)
            m.record_request_completion(
                success, attrs if success else {**attrs, ERROR_TYPE: str(status or "incomplete")}
            )
        except Exception:
            self._metrics_failed()
        finally:
            extensions.reset_request_time(token)
        return usage

    def _metrics_failed(self) -> None:
        self.stats.plugin_errors["metrics"] += 1
        log.exception("metrics plugin raised; the request goes on")

    def _track(self, key: str, entry: _InFlight) -> None:
        table = self.in_flight
        table[key] = entry
        self.expire(entry.expires - self.request_ttl)
        while len(table) > self.max_in_flight:
            table.popitem(last=False)
            self.stats.evicted += 1
