"""Pre-aggregated default GenAI metrics: what :class:`~ipc_router.metrics.DefaultChatCompletionMetrics` records,
for many completions, without one OpenTelemetry SDK ``record()`` per value.

Each SDK ``Histogram.record`` cleans, copies and hashes its attribute dict and walks the exemplar machinery: a
completion's up to five values cost ~20 µs of SDK work on the dev machine (the issue measured 60 µs), too slow for
completions drained from shared-memory rings. Here a completion costs ~2 µs (``bench/bench_aggregate.py``).
:class:`Aggregator` instead keeps, per attribute set and per metric reader, the very fields the SDK's
explicit-bucket histogram aggregation keeps (bucket counts, sum, min, max; cumulative or delta as the reader
prefers) in plain Python, and hands the SDK finished ``Metric`` objects when a reader collects.

Single spec: the attribute sets and which instruments a completion feeds are not re-implemented here. The first
completion of each *shape* (model, backend, status, stream, whether there is a first-token time and usage,
output tokens 0/1/more, header attributes) is replayed through a real ``DefaultChatCompletionMetrics`` over
tap instruments (made by :func:`~ipc_router.metrics.instruments_for`, so names, units, descriptions and
buckets come from there too), in the ledger's call order. That gives the shape's *plan*: which series each of
the five values (TTFT, input tokens, output tokens, duration, TPOT) goes to. Later completions of the shape
compute the values with the same arithmetic and update the series; the replay checks the arithmetic against
what the metrics object recorded, and a shape whose values do not match is replayed every time (slower, never
wrong).

Bridge to the SDK: the Python SDK (1.45) has no ``MetricProducer`` yet. A reader's collection runs
``MetricReader._collect`` (set by the ``MeterProvider``); :func:`_hook_collect` wraps it, so every reader
(Prometheus, OTLP periodic, in-memory) exports the SDK's own data plus ours, merged into the meter's scope (a
series the SDK also has, e.g. from the socket path's per-request objects, is summed into one point). The SDK
internals used are all in the ``_sdk_*`` functions below; ``pyproject.toml`` pins the SDK's minor version and
``tests/test_aggregate.py`` compares the output with the SDK's own histograms.

Threads: :meth:`Aggregator.add` runs on the event loop; collection runs on exporter threads (Prometheus'
HTTP thread, the OTLP reader's thread). One lock guards the accumulators: ``add`` holds it for its ~2 µs, a
collection for one swap per attribute set; the cumulative sums and the SDK objects are made outside it.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from math import isfinite as _isfinite
from time import time_ns
from typing import TYPE_CHECKING, Any, cast

from opentelemetry.metrics import Histogram as APIHistogram
from opentelemetry.metrics import NoOpHistogram, NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import DefaultAggregation, ExplicitBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes

from ipc_router.config import Backend
from ipc_router.metrics import (
    ERROR_TYPE,
    METER_NAME,
    DefaultChatCompletionMetrics,
    Usage,
    instruments_for,
)

if TYPE_CHECKING:
    from ipc_router.ledger import CompletionAggregator

__all__ = ["Aggregator"]

_OVERFLOW_ATTRIBUTES: dict[str, Any] = {"otel.metric.overflow": True}

# Value slots of a completion, in the order DefaultChatCompletionMetrics records them.
_TTFT, _IN, _OUT, _DUR, _TPOT = range(5)


# --- the SDK internals this module relies on (opentelemetry-sdk 1.45) --------------------------------------------


def _sdk_reader_settings(reader: MetricReader) -> tuple[AggregationTemporality, int]:
    """A reader's temporality and cardinality limit for synchronous histograms (its constructor's
    ``preferred_temporality`` / ``cardinality_limits``, or the exporter's for a periodic reader). A reader that
    prefers another aggregation than the default (explicit buckets from the instrument's advisory) is refused."""
    from opentelemetry.sdk.metrics._internal.instrument import _Histogram

    r: Any = reader
    agg = r._instrument_class_aggregation[_Histogram]
    # The OTLP exporters prefer ExplicitBucketHistogramAggregation() (no boundaries: the advisory ones): the same.
    explicit = type(agg) is ExplicitBucketHistogramAggregation and agg._boundaries is None and agg._record_min_max
    if type(agg) is not DefaultAggregation and not explicit:
        raise ValueError(f"{reader!r} prefers a non-default histogram aggregation; the aggregator cannot follow it")
    return r._instrument_class_temporality[_Histogram], r._instrument_class_cardinality_limit[_Histogram]


def _sdk_hook_collect(reader: MetricReader, produce: Callable[[MetricsData | None], MetricsData | None]) -> None:
    """Make ``reader`` export ``produce(<what the SDK collected>)``. ``MetricReader.collect`` calls the callback
    the ``MeterProvider`` registered; we wrap it (the SDK's stand-in for a spec ``MetricProducer``)."""
    r: Any = reader
    inner = r._collect
    if inner is None:
        raise ValueError(f"{reader!r} is not registered on a MeterProvider")

    def collect(reader_: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        return produce(inner(reader_, timeout_millis=timeout_millis))

    r._set_collect_callback(collect)


def _sdk_provider_config(provider: MeterProvider) -> tuple[Resource, Sequence[Any], bool]:
    """The provider's resource (for collections where the SDK itself has no data), its views, and whether it
    is disabled (``OTEL_SDK_DISABLED``: its meters are no-ops, so the per-request path exports nothing)."""
    p: Any = provider
    config = p._sdk_config
    return config.resource, config.views, bool(p._disabled)


# --- the spec: DefaultChatCompletionMetrics over tap instruments -------------------------------------------------


class _Tap(NoOpHistogram):
    """A histogram that appends ``(instrument index, value, attributes)`` to its meter's log."""

    def __init__(self, meter: _TapMeter, index: int, name: str, unit: str, description: str,
                 bounds: Sequence[float] | None) -> None:  # fmt: skip
        super().__init__(name, unit=unit, description=description, explicit_bucket_boundaries_advisory=bounds)
        self.index, self.name, self.unit, self.description = index, name, unit, description
        self.bounds: tuple[float, ...] = tuple(bounds) if bounds is not None else ()
        self._log = meter.log

    def record(self, amount: float, attributes: Attributes = None, context: Any = None) -> None:
        self._log.append((self.index, amount, dict(attributes or {})))


class _TapMeter(NoOpMeter):
    def __init__(self) -> None:
        super().__init__(METER_NAME)
        self.log: list[tuple[int, float, dict[str, Any]]] = []
        self.taps: list[_Tap] = []

    def create_histogram(
        self, name: str, unit: str = "", description: str = "", *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> APIHistogram:  # fmt: skip
        tap = _Tap(self, len(self.taps), name, unit, description, explicit_bucket_boundaries_advisory)
        self.taps.append(tap)
        return tap


# --- accumulation -----------------------------------------------------------------------------------------------


class _Acc:
    """One attribute set in one reader: the fields of the SDK's ``_ExplicitBucketHistogramAggregation``
    (``counts/sum/min/max`` since the reader's last collection, ``c_*`` the cumulative totals before it)."""

    __slots__ = ("attrs", "c_counts", "c_max", "c_min", "c_sum", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, attrs: dict[str, Any], nbuckets: int, start_ns: int) -> None:
        self.attrs = attrs
        self.start_ns = start_ns
        self.counts = [0] * nbuckets
        self.sum: float = 0
        self.min: float = math.inf
        self.max: float = -math.inf
        self.c_counts = [0] * nbuckets
        self.c_sum: float = 0
        self.c_min: float = math.inf
        self.c_max: float = -math.inf


class _Instrument:
    __slots__ = ("bounds", "description", "name", "nbuckets", "unit")

    def __init__(self, tap: _Tap) -> None:
        if not tap.bounds:
            raise ValueError(f"{tap.name}: the aggregator needs explicit bucket advice (as the default metrics give)")
        self.name = tap.name.lower()  # as the SDK names the instrument
        self.unit, self.description, self.bounds = tap.unit, tap.description, tap.bounds
        self.nbuckets = len(self.bounds) + 1


class _Series:
    """One (instrument, attribute set): its bucket bounds and, once it has a value in the current admission
    generation ``gen``, its accumulator per reader (an overflow accumulator where a reader's cardinality limit
    was reached). Readers find accumulators by ``key``: two objects with one key share them."""

    __slots__ = ("accs", "attrs", "bounds", "gen", "inst", "key")

    def __init__(self, inst: int, attrs: dict[str, Any], bounds: tuple[float, ...]) -> None:
        self.inst, self.attrs, self.bounds = inst, attrs, bounds
        self.key = (inst, frozenset(attrs.items()))
        self.accs: tuple[_Acc, ...] = ()
        self.gen = -1


class _Reader:
    """What one metric reader has been given: accumulators per series key, and per instrument the points in
    the order the SDK would list them (first measurement first)."""

    def __init__(self, reader: MetricReader, temporality: AggregationTemporality, limit: int) -> None:
        self.reader = reader
        self.delta = temporality is AggregationTemporality.DELTA
        self.temporality = temporality
        self.limit = limit
        self.accs: dict[tuple[int, frozenset[tuple[str, Any]]], _Acc] = {}
        self.points: dict[int, list[_Acc]] = {}
        self.overflow: dict[int, _Acc] = {}
        self.last_collect_ns: int | None = None
        self.lock = threading.Lock()


class _Plan:
    __slots__ = ("backend", "exact", "steps", "tpot")

    def __init__(self, backend: Backend | None, steps: tuple[tuple[int, _Series], ...], exact: bool) -> None:
        self.backend = backend  # pinned: the key holds its id()
        self.steps = steps
        self.exact = exact
        self.tpot = any(slot == _TPOT for slot, _ in steps)


_Key = tuple[Any, ...]


class Aggregator:
    """Records the default GenAI metrics of completions into ``readers`` (registered on ``provider``).

    Give it every reader of the provider (``Telemetry.readers``); readers added to the provider later do not
    see the aggregated data. Views are not applied to it: a provider with views is refused.
    """

    MAX_PLANS = 65536

    def __init__(self, provider: MeterProvider, readers: Sequence[MetricReader], meter_name: str = METER_NAME) -> None:
        resource, views, disabled = _sdk_provider_config(provider)
        if views:
            raise ValueError("the aggregator cannot apply metric views; configure the provider without views")
        self._resource = resource
        self._scope = InstrumentationScope(meter_name, None, None, None)
        tap_meter = _TapMeter()
        self._spec_meter = tap_meter
        self._spec = instruments_for(tap_meter)
        self._instruments = [_Instrument(t) for t in tap_meter.taps]
        spec = self._spec
        self._token_index = cast(_Tap, spec.token_usage).index
        self._slot_of = {
            cast(_Tap, spec.time_to_first_token).index: _TTFT,
            cast(_Tap, spec.request_duration).index: _DUR,
            cast(_Tap, spec.time_per_output_token).index: _TPOT,
        }
        self._lock = threading.Lock()
        self._plans: dict[_Key, _Plan] = {}
        self._series: dict[tuple[int, frozenset[tuple[str, Any]]], _Series] = {}
        self._overflow_series: dict[int, _Series] = {}
        self._overflow_plans: set[_Key] = set()
        self._gen = 0
        self._readers: list[_Reader] = []
        for reader in () if disabled else readers:
            temporality, limit = _sdk_reader_settings(reader)
            state = _Reader(reader, temporality, limit)
            self._readers.append(state)
            _sdk_hook_collect(reader, partial(self._produce, state))

    # --- the hot path ---------------------------------------------------------------------------------------------

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
    ) -> None:
        """One completion, as the ledger would drive ``DefaultChatCompletionMetrics`` for it: times in seconds
        (``time.monotonic``), ``status`` the backend's HTTP status (0: no response), ``attrs`` the header
        attributes."""
        out = usage.output_tokens if usage is not None else 0
        # The shape: everything the spec's calls depend on but the values (all 2xx statuses are one success).
        key = (
            model, None if backend is None else id(backend), -1 if 200 <= status < 300 else status, stream,
            t_first is None, usage is None, out if out < 2 else 2, tuple(attrs.items()) if attrs else (),
        )  # fmt: skip
        with self._lock:
            plan = self._plans.get(key)
            if plan is None or plan.backend is not backend:
                self._learn(key, model, backend, status, stream, t_start, t_first, t_end, usage, attrs)
                return
            if not plan.exact:
                self._replay(model, backend, status, stream, t_start, t_first, t_end, usage, attrs)
                return
            dur = t_end - t_start
            ttft = t_first - t_start if t_first is not None else 0.0
            inp = usage.input_tokens if usage is not None else 0
            tpot = (dur - ttft) / (out - 1) if plan.tpot else 0.0
            values = (ttft, inp, out, dur, tpot)
            self._values(plan.steps, values)

    def _values(self, steps: Sequence[tuple[int, _Series]], values: Sequence[float]) -> None:
        """``values[slot]`` into each step's series, one call per completion (not per value: a fifth of the
        drain's time was these calls). The SDK's Histogram.record checks, in this order (isfinite raises
        OverflowError for huge ints, as there)."""
        gen = self._gen
        for slot, series in steps:
            v = values[slot]
            if not _isfinite(v) or v < 0:
                continue
            i = bisect_left(series.bounds, v)
            for a in series.accs if series.gen == gen else self._admit(series):
                a.counts[i] += 1
                a.sum += v
                if v < a.min:
                    a.min = v
                if v > a.max:
                    a.max = v

    def _admit(self, series: _Series) -> tuple[_Acc, ...]:
        """The series' first value (since a delta reader's last collection): one accumulator per reader, in
        the SDK's order and within its cardinality limit."""
        now = time_ns()
        accs: list[_Acc] = []
        inst = self._instruments[series.inst]
        for r in self._readers:
            acc = r.accs.get(series.key)
            if acc is None:
                points = r.points.setdefault(series.inst, [])
                start = r.last_collect_ns if r.delta and r.last_collect_ns is not None else now
                if len(points) < r.limit:
                    acc = _Acc(series.attrs, inst.nbuckets, start)
                    points.append(acc)
                    r.accs[series.key] = acc
                else:
                    # Not remembered per key (memory stays bounded, as in the SDK): the limit is checked again.
                    acc = r.overflow.get(series.inst)
                    if acc is None:
                        acc = r.overflow[series.inst] = _Acc(dict(_OVERFLOW_ATTRIBUTES), inst.nbuckets, start)
                        points.append(acc)
            accs.append(acc)
        series.accs = tuple(accs)
        series.gen = self._gen
        return series.accs

    def _full(self, inst: int) -> bool:
        """Every reader is at its cardinality limit for ``inst``: a new attribute set can only overflow."""
        for r in self._readers:
            points = r.points.get(inst)
            if points is None or len(points) < r.limit:
                return False
        return True

    # --- learning a shape from the spec ---------------------------------------------------------------------------

    def _replay(
        self, model: str, backend: Backend | None, status: int, stream: bool, t_start: float,
        t_first: float | None, t_end: float, usage: Usage | None, attrs: Mapping[str, str],
    ) -> tuple[list[tuple[int, float, _Series]], bool]:  # fmt: skip
        """Drive a real DefaultChatCompletionMetrics as the ledger does (ledger.Ledger._finish), record what it
        recorded, and return it as (slot, value, series), and whether a series was the shared overflow one."""
        now = [t_start]
        m = DefaultChatCompletionMetrics(self._spec, clock=lambda: now[0])
        log = self._spec_meter.log
        log.clear()
        m.start_request({})
        m.set_model(model)
        if backend is not None:
            m.set_backend(backend)
        success = 200 <= status < 300
        extra = dict(attrs)
        if stream and t_first is not None:
            now[0] = t_first
            m.record_token_latency(usage.output_tokens if usage is not None else 0, extra or None)
        now[0] = t_end
        if usage is not None:
            m.record_token_usage(usage.input_tokens, usage.output_tokens, usage.total_tokens, extra or None)
        m.record_request_completion(success, extra if success else {**extra, ERROR_TYPE: str(status or "incomplete")})
        got: list[tuple[int, float, _Series]] = []
        overflowed = False
        tokens_seen = 0
        token_index, slot_of = self._token_index, self._slot_of
        for inst, value, raw in log:
            if inst == token_index:
                slot = _IN if tokens_seen == 0 else _OUT
                tokens_seen += 1
            else:
                slot = slot_of[inst]
            # The SDK drops empty keys when it cleans attributes; values here are str (header values, names).
            clean = {k: v for k, v in raw.items() if k}
            skey = (inst, frozenset(clean.items()))
            series = self._series.get(skey)
            if series is None:
                if self._full(inst):
                    # An unbounded number of attribute sets must not cost memory: one series stands for them.
                    series = self._overflow_series.get(inst)
                    if series is None:
                        bounds = self._instruments[inst].bounds
                        series = self._overflow_series[inst] = _Series(inst, dict(_OVERFLOW_ATTRIBUTES), bounds)
                    overflowed = True
                else:
                    series = self._series[skey] = _Series(inst, clean, self._instruments[inst].bounds)
            got.append((slot, value, series))
            self._values(((0, series),), (value,))
        log.clear()
        return got, overflowed

    def _learn(
        self, key: _Key, model: str, backend: Backend | None, status: int, stream: bool, t_start: float,
        t_first: float | None, t_end: float, usage: Usage | None, attrs: Mapping[str, str],
    ) -> None:  # fmt: skip
        """Record this completion through the spec and keep its plan."""
        got, overflowed = self._replay(model, backend, status, stream, t_start, t_first, t_end, usage, attrs)
        out = usage.output_tokens if usage is not None else 0
        dur = t_end - t_start
        ttft = t_first - t_start if t_first is not None else 0.0
        expected: dict[int, Callable[[], float]] = {
            _TTFT: lambda: ttft,
            _IN: lambda: usage.input_tokens if usage is not None else 0,
            _OUT: lambda: out,
            _DUR: lambda: dur,
            _TPOT: lambda: (dur - ttft) / (out - 1),
        }
        slots = [slot for slot, _, _ in got]
        exact = len(set(slots)) == len(slots)
        for slot, value, _ in got:
            if not exact:
                break
            try:
                mine = expected[slot]()
            except ArithmeticError:
                exact = False
                break
            exact = type(mine) is type(value) and (mine == value or (mine != mine and value != value))
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
            self._overflow_plans.clear()
        self._plans[key] = _Plan(backend, tuple((slot, series) for slot, _, series in got), exact)
        if overflowed:
            self._overflow_plans.add(key)

    # --- collection (exporter threads) ----------------------------------------------------------------------------

    def _collect(self, r: _Reader) -> list[Metric]:
        # Under the shared lock only the swap of each accumulator's interval fields (the event loop waits for it);
        # the cumulative sums and the SDK objects are made outside it, under the reader's own lock (two scrapes of
        # one Prometheus reader can run at once).
        with r.lock:
            now = time_ns()
            taken: list[tuple[int, list[tuple[_Acc, list[int], float, float, float]]]] = []
            with self._lock:
                for inst_index, points in r.points.items():
                    fresh = [0] * self._instruments[inst_index].nbuckets
                    batch = []
                    for a in points:
                        batch.append((a, a.counts, a.sum, a.min, a.max))
                        a.counts, a.sum, a.min, a.max = fresh.copy(), 0, math.inf, -math.inf
                    taken.append((inst_index, batch))
                if r.delta:
                    # As the SDK's reset_on_collect: attribute sets start over (and count again towards the
                    # limit); instruments keep their order (the SDK keeps its per-instrument storage).
                    r.accs.clear()
                    for points in r.points.values():
                        points.clear()
                    r.overflow.clear()
                    r.last_collect_ns = now
                    self._restart_admissions()
            return [m for inst_index, batch in taken if (m := self._metric(r, inst_index, batch, now)) is not None]

    def _restart_admissions(self) -> None:
        """A delta reader starts over: every series is admitted again at its next value; plans that sent new
        attribute sets to the shared overflow series are learnt again (there may be room now); series no
        cumulative reader holds are forgotten (plans keep theirs; accumulators are found by key), so memory
        stays bounded by the attribute sets of one interval, as in the SDK."""
        self._gen += 1
        for key in self._overflow_plans:
            self._plans.pop(key, None)
        self._overflow_plans.clear()
        held = [r.accs for r in self._readers if not r.delta]
        self._series = {k: s for k, s in self._series.items() if any(k in accs for accs in held)}

    def _metric(
        self, r: _Reader, inst_index: int, batch: list[tuple[_Acc, list[int], float, float, float]], now: int
    ) -> Metric | None:
        """One instrument's points, computed as the SDK's histogram aggregation computes them."""
        inst = self._instruments[inst_index]
        data_points: list[HistogramDataPoint] = []
        for a, counts, sum_, min_, max_ in batch:
            if r.delta:
                n = sum(counts)
                if n == 0:
                    continue
                data_points.append(HistogramDataPoint(
                    attributes=a.attrs, exemplars=[], start_time_unix_nano=a.start_ns, time_unix_nano=now,
                    count=n, sum=sum_, bucket_counts=tuple(counts), explicit_bounds=inst.bounds, min=min_, max=max_,
                ))  # fmt: skip
                continue
            a.c_counts = [c + p for c, p in zip(counts, a.c_counts, strict=True)]
            a.c_min = min(min_, a.c_min)
            a.c_max = max(max_, a.c_max)
            a.c_sum = sum_ + a.c_sum
            data_points.append(HistogramDataPoint(
                attributes=a.attrs, exemplars=[], start_time_unix_nano=a.start_ns, time_unix_nano=now,
                count=sum(a.c_counts), sum=a.c_sum, bucket_counts=tuple(a.c_counts), explicit_bounds=inst.bounds,
                min=a.c_min, max=a.c_max,
            ))  # fmt: skip
        if not data_points:
            return None
        return Metric(
            name=inst.name, description=inst.description, unit=inst.unit,
            data=Histogram(data_points=data_points, aggregation_temporality=r.temporality),
        )  # fmt: skip

    def _produce(self, r: _Reader, data: MetricsData | None) -> MetricsData | None:
        mine = self._collect(r)
        if not mine:
            return data
        if data is None or not data.resource_metrics:
            scope = ScopeMetrics(scope=self._scope, metrics=mine, schema_url=self._scope.schema_url or "")
            resource = self._resource
            return MetricsData(
                [ResourceMetrics(resource=resource, scope_metrics=[scope], schema_url=resource.schema_url)]
            )
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, sm in enumerate(scopes):
            if sm.scope == self._scope:
                scopes[i] = ScopeMetrics(scope=sm.scope, metrics=_merge(sm.metrics, mine), schema_url=sm.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(scope=self._scope, metrics=mine, schema_url=self._scope.schema_url or ""))
        merged = ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url)
        return MetricsData(resource_metrics=[merged, *rest])


def _merge(theirs: Sequence[Metric], mine: list[Metric]) -> list[Metric]:
    """The SDK's metrics of our scope plus ours: a histogram of the same name gets one point per attribute set."""
    by_name = {m.name: m for m in mine}
    out: list[Metric] = []
    for m in theirs:
        extra = by_name.pop(m.name, None)
        if extra is None or not isinstance(m.data, Histogram) or not isinstance(extra.data, Histogram):
            out.append(m)
            if extra is not None:
                out.append(extra)
            continue
        points: dict[frozenset[tuple[str, Any]], HistogramDataPoint] = {
            frozenset((p.attributes or {}).items()): p for p in m.data.data_points
        }
        for p in extra.data.data_points:
            k = frozenset((p.attributes or {}).items())
            q = points.get(k)
            points[k] = p if q is None else HistogramDataPoint(
                attributes=q.attributes, exemplars=[*q.exemplars, *p.exemplars],
                start_time_unix_nano=min(q.start_time_unix_nano, p.start_time_unix_nano),
                time_unix_nano=max(q.time_unix_nano, p.time_unix_nano), count=q.count + p.count, sum=q.sum + p.sum,
                bucket_counts=tuple(a + b for a, b in zip(q.bucket_counts, p.bucket_counts, strict=True)),
                explicit_bounds=q.explicit_bounds, min=min(q.min, p.min), max=max(q.max, p.max),
            )  # fmt: skip
        data = Histogram(data_points=list(points.values()), aggregation_temporality=m.data.aggregation_temporality)
        out.append(Metric(name=m.name, description=m.description, unit=m.unit, data=data))
    out.extend(by_name.values())
    return out


if TYPE_CHECKING:

    def _is_a_completion_aggregator(a: Aggregator) -> CompletionAggregator:
        return a  # mypy: Aggregator fits the ledger's protocol
