"""Routing decisions: the default router, the decision cache, the backend pick. No I/O.

:class:`Routing` is built once per config load and is immutable afterwards (except for its cache and its
backend pickers, both safe to share): the server swaps a whole ``Routing`` atomically on reload, so in-flight
requests finish with the config they started with.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import math
import random
import re
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from functools import reduce
from typing import Any, NamedTuple

from ipc_router import extensions
from ipc_router.config import Backend, Config, RouteRule

__all__ = ["Decision", "DefaultRouter", "RouteCache", "Routing", "UnknownRuleError", "WeightedPicker", "cache_key"]


class DefaultRouter:
    """The AI Gateway's routing: rules in order, the first whose header entries match (any one entry: they are
    OR-ed) wins. ``Exact`` compares strings, ``RegularExpression`` must match the whole value."""

    def __init__(self, config: Config) -> None:
        # Indexed once per config, so that a request costs one dict lookup per header the rules name plus the
        # regexes of earlier rules, not one test per rule: per header name, the first rule of each exact value
        # and the (rule index, pattern) list of regex entries in rule order.
        self._rules = tuple(r.name for r in config.rules)
        self._exact: dict[str, dict[str, int]] = {}
        self._regex: dict[str, list[tuple[int, re.Pattern[str]]]] = {}
        for i, rule in enumerate(config.rules):
            for h in rule.headers:
                self._exact.setdefault(h.name, {})
                self._regex.setdefault(h.name, [])
                if h.pattern is None:
                    self._exact[h.name].setdefault(h.value, i)
                else:
                    self._regex[h.name].append((i, h.pattern))
        self._index = tuple((name, self._exact[name], tuple(self._regex[name])) for name in self._exact)
        self.cache_key_headers: tuple[str, ...] = tuple(self._exact)

    def calculate(self, request_headers: Mapping[str, str]) -> str:
        get = request_headers.get
        best = len(self._rules)
        for name, exact, regexes in self._index:
            value = get(name)
            if value is None:
                continue
            best = min(best, exact.get(value, best))
            for i, pattern in regexes:
                if i >= best:
                    break
                if pattern.fullmatch(value):
                    best = i
                    break
        if best == len(self._rules):
            raise extensions.NoMatchingRuleError()
        return self._rules[best]


class UnknownRuleError(LookupError):
    """A (custom) router named a rule that the config does not have."""


class RouteCache:
    """Bounded map from header values to rule names; safe to share between threads.

    Reads take no lock (a dict lookup is atomic under the GIL); an insert takes the lock and re-checks.
    Eviction is CLOCK (second chance): a hit marks its entry, eviction skips marked entries once.
    """

    def __init__(self, key_headers: Sequence[str], maxsize: int = 4096) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.key_headers = tuple(key_headers)
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        # key -> [rule name, referenced bit]
        self._data: dict[Hashable, list[Any]] = {}
        self._lock = threading.Lock()

    def key(self, headers: Mapping[str, str]) -> Hashable:
        """The values of the key headers (just the value when there is one key header)."""
        if len(self.key_headers) == 1:
            return headers.get(self.key_headers[0])
        return tuple(map(headers.get, self.key_headers))

    def get(self, key: Hashable) -> str | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1  # counters are statistics: a lost increment under contention is acceptable
            return None
        entry[1] = True
        self.hits += 1
        rule: str = entry[0]
        return rule

    def put(self, key: Hashable, rule: str) -> None:
        with self._lock:
            if key in self._data:
                return
            data = self._data
            while len(data) >= self.maxsize:
                oldest = next(iter(data))
                entry = data.pop(oldest)
                if entry[1]:
                    entry[1] = False
                    data[oldest] = entry
            data[key] = [rule, False]

    def __len__(self) -> int:
        return len(self._data)


class WeightedPicker:
    """Picks a backend of a rule by weight; weight 0 is never picked.

    Small integer weights use a precomputed smooth weighted round-robin sequence (nginx's): exact shares over
    every cycle, evenly interleaved, and ``next`` on ``itertools.cycle`` is atomic under the GIL. Weights that
    would make the cycle too long fall back to a weighted random choice.
    """

    MAX_CYCLE = 4096

    def __init__(self, backends: Sequence[Backend]) -> None:
        live = [b for b in backends if b.weight > 0]
        if not live:
            raise ValueError("no backend with a weight > 0")
        self.backends = tuple(live)
        g = reduce(math.gcd, (b.weight for b in live))
        weights = [b.weight // g for b in live]
        total = sum(weights)
        self._next: Callable[[], Backend]
        if len(live) == 1:
            only = live[0]
            self._next = lambda: only
        elif total <= self.MAX_CYCLE:
            self._next = itertools.cycle(tuple(_smooth_wrr(live, weights))).__next__
        else:
            cumulative = list(itertools.accumulate(weights))
            rnd = random.random

            def pick() -> Backend:
                return live[bisect.bisect_right(cumulative, rnd() * total)]

            self._next = pick

    def pick(self) -> Backend:
        return self._next()


def _failover_key(b: Backend) -> tuple[bool, int]:
    return (b.weight <= 0, b.priority)


def _smooth_wrr(backends: Sequence[Backend], weights: Sequence[int]) -> Iterator[Backend]:
    current = [0] * len(weights)
    total = sum(weights)
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        yield backends[best]


def cache_key(router: extensions.Router, default_router: DefaultRouter) -> tuple[str, ...] | None:
    """The route cache's key headers for ``router``, or ``None`` (no cache) when it declares none.

    A custom router's declared ``cache_key_headers`` are joined by the default router's: a router that delegates
    to the default router (the usual wrapper) returns whatever the default router decides, and that depends on
    every header the config's rules name. A key lacking one of them would serve one request's decision to
    another that differs only in that header. More headers in a key only make it more precise, so the union is
    safe whether or not the router delegates. Names are lower-cased (request headers arrive lower-case) and
    de-duplicated, declared ones first.
    """
    declared: object = getattr(router, "cache_key_headers", None)
    if declared is None:
        return None
    if router is default_router:
        return tuple(default_router.cache_key_headers)
    # A string is a collection of one-letter "names": a key that could never be right.
    if isinstance(declared, str | bytes) or not isinstance(declared, Iterable):
        raise TypeError(
            f"cache_key_headers of {type(router).__name__} must be a collection of header names or None, "
            f"got {declared!r}"
        )
    names: list[str] = []
    for name in declared:
        if not isinstance(name, str) or not name:
            raise TypeError(f"cache_key_headers of {type(router).__name__} holds {name!r}, not a header name")
        names.append(name.lower())
    return tuple(dict.fromkeys((*names, *default_router.cache_key_headers)))


class Decision(NamedTuple):
    """A routing decision. (A named tuple: built per request, and cheaper to build than a frozen dataclass.)"""

    rule: RouteRule
    #: ``None`` when the rule has no backends (Envoy's route for the rule then decides).
    backend: Backend | None
    cached: bool = False


class Routing:
    """Everything routing needs for one config generation: router (default or custom), cache, pickers."""

    def __init__(
        self,
        config: Config,
        new_custom_router: extensions.NewCustomRouterFn | None = None,
        *,
        cache_size: int = 4096,
        generation: int = 0,
    ) -> None:
        self.config = config
        self.generation = generation
        self.default_router = DefaultRouter(config)
        factory = new_custom_router if new_custom_router is not None else extensions.new_custom_router
        self.router: extensions.Router = (
            factory(self.default_router, config) if factory is not None else self.default_router
        )
        self.custom = self.router is not self.default_router
        key_headers = cache_key(self.router, self.default_router)
        self.cache = RouteCache(key_headers, cache_size) if key_headers is not None else None
        self._rules = {r.name: r for r in config.rules}
        # A failover rule's decision is its first backend; Envoy moves on to the next ones when it fails.
        self._pickers = {
            r.name: WeightedPicker([min(r.backends, key=_failover_key)] if r.failover else r.backends)
            for r in config.rules
            if r.backends
        }

    def route(self, headers: Mapping[str, str]) -> Decision | Awaitable[Decision]:
        """Decide a request's rule and backend. Raises :class:`~ipc_router.extensions.NoMatchingRuleError`,
        :class:`UnknownRuleError`, or whatever a custom router raises. Returns an awaitable when the router is
        async (the cache is still used and filled)."""
        cache = self.cache
        if cache is not None:
            key = cache.key(headers)
            name = cache.get(key)
            if name is not None:
                return self._decide(name, cached=True)
        result = self.router.calculate(headers)
        if inspect.isawaitable(result):
            return self._finish_async(result, cache, key if cache is not None else None)
        if cache is not None:
            cache.put(key, result)
        return self._decide(result)

    async def _finish_async(self, pending: Awaitable[str], cache: RouteCache | None, key: Hashable) -> Decision:
        name = await pending
        if cache is not None:
            cache.put(key, name)
        return self._decide(name)

    def _decide(self, name: str, cached: bool = False) -> Decision:
        rule = self._rules.get(name)
        if rule is None:
            raise UnknownRuleError(f"router returned {name!r}, which is not a rule of the config")
        picker = self._pickers.get(name)
        return Decision(rule, picker.pick() if picker is not None else None, cached)
