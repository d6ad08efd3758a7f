"""Token budgets: what each key has spent in its window; checked for Envoy, charged by the ledger. No I/O.

Envoy enforces a budget with its own rate limit filter: before a request goes upstream the filter asks the rate
limit service (:mod:`ipc_router.rls`, served by the sidecar) with one descriptor per budget whose headers the request
carries, each with a ``hits_addend`` of 0, the convention of ``envoyproxy/ratelimit`` for a check that charges
nothing. The charge comes when the request has completed: the ledger computes the request's ``llmRequestCosts``
from its usage and adds the budget's cost here, on both paths (a ``/complete`` call or a ring record), so the
costs never travel through Envoy and the fast path needs no Lua work for them.

Windows are fixed and aligned to the wall clock, as in ``envoyproxy/ratelimit``: a ``minute`` budget starts afresh
at every full minute. A check sees what was charged before it, so a budget can be overspent by the cost of the
requests already running when it ran out (about concurrency x cost per request): the AI Gateway, LiteLLM and
``envoyproxy/ratelimit`` with ``apply_on_stream_done`` behave the same way.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ipc_router.config import Config, TokenBudget
from ipc_router.costs import RequestCosts

__all__ = ["BUDGET_DESCRIPTOR_KEY", "RLS_DOMAIN", "Budgets", "Verdict", "rls_socket_path"]

#: The descriptor entry that names the budget (the others are the budget's headers, keyed by header name).
BUDGET_DESCRIPTOR_KEY = "ipc_router_budget"
#: The ``domain`` of the bootstrap's rate limit filter.
RLS_DOMAIN = "ipc_router"


def rls_socket_path(socket_path: str) -> str:
    """Where the sidecar serving ``socket_path`` serves the rate limit service: beside it, ``.rls`` appended."""
    return socket_path + ".rls"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One descriptor's answer. ``budget`` is ``None`` for a budget the current config does not have."""

    budget: TokenBudget | None
    over: bool
    used: int = 0
    remaining: int = 0
    reset_in: float = 0.0
    key: tuple[str, ...] = ()


class Budgets:
    """The books of every budget of the current config. :meth:`configure` swaps in a new config's budgets and
    keeps what was spent in those that stay (same name and headers)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._budgets: dict[str, TokenBudget] = {}
        self._costs = RequestCosts()
        #: The request headers a completion must carry for its charge (the union of the budgets' headers).
        self.header_names: tuple[str, ...] = ()
        #: ``(budget, header values) -> [window start, spent]``, oldest first.
        self._spent: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        #: checks, over_limit, charged (requests), cost_errors, unknown_budget, evicted.
        self.events: Counter[str] = Counter()
        #: The latest CEL cost that failed on a request's values, for ``/budgets`` ("" while none has).
        self.last_cost_error = ""

    def configure(self, config: Config) -> None:
        costs = RequestCosts([(c.metadata_key, c.type, c.cel) for c in config.llm_request_costs])
        budgets = {b.name: b for b in config.token_budgets}
        # Spending stays where the key and the window stay: same name, headers and unit (a new unit is new windows).
        kept = {
            n for n, b in budgets.items()
            if (old := self._budgets.get(n)) is not None and (old.headers, old.unit) == (b.headers, b.unit)
        }  # fmt: skip
        self._spent = {k: v for k, v in self._spent.items() if k[0] in kept}
        self._budgets, self._costs = budgets, costs
        self.header_names = tuple(dict.fromkeys(h for b in budgets.values() for h in b.headers))

    @property
    def active(self) -> bool:
        return bool(self._budgets)

    def keep(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The part of a request's headers its charge will need (kept while the request is in flight)."""
        return {h: headers[h] for h in self.header_names if h in headers}

    # --- check (Envoy asks, before the request goes upstream) -----------------------------------------------------

    def check(self, name: str, entries: Mapping[str, str], now: float | None = None) -> Verdict:
        """Is ``name``'s budget for the key in ``entries`` (header name -> value) spent? Charges nothing."""
        self.events["checks"] += 1
        budget = self._budgets.get(name)
        if budget is None:
            self.events["unknown_budget"] += 1
            return Verdict(None, False)
        key = tuple(entries.get(h, "") for h in budget.headers)
        now = self.clock() if now is None else now
        start = _window(now, budget.seconds)
        slot = self._spent.get((name, key))
        spent = slot[1] if slot is not None and slot[0] == start else 0
        over = spent >= budget.limit
        if over:
            self.events["over_limit"] += 1
        return Verdict(budget, over, spent, max(0, budget.limit - spent), start + budget.seconds - now, key)

    # --- charge (the ledger, after the request completed) ---------------------------------------------------------

    def charge(
        self, headers: Mapping[str, str], model: str, backend: str, input_tokens: int, output_tokens: int,
        total_tokens: int, now: float | None = None,
    ) -> None:  # fmt: skip
        """Add one completed request's costs to every budget whose headers it carried. Never raises."""
        if not self._budgets:
            return
        keyed: list[tuple[TokenBudget, tuple[str, ...]]] = []
        for b in self._budgets.values():
            key = tuple(headers[h] for h in b.headers if h in headers)
            if len(key) == len(b.headers):
                keyed.append((b, key))
        if not keyed:
            return
        costs, errors = self._costs.compute(model, backend, input_tokens, output_tokens, total_tokens)
        if errors:
            self.events["cost_errors"] += len(errors)
            self.last_cost_error = "; ".join(errors)
        now = self.clock() if now is None else now
        charged = False
        for b, key in keyed:
            amount = costs.get(b.cost)
            if amount is None:
                continue
            start = _window(now, b.seconds)
            slot = self._spent.get((b.name, key))
            if slot is None or slot[0] != start:
                self._spent.pop((b.name, key), None)  # a new window goes to the end: the dict stays oldest first
                slot = self._spent[b.name, key] = [start, 0]
            slot[1] += amount
            charged = True
        if charged:
            self.events["charged"] += 1
        if len(self._spent) > self.max_keys:
            self._evict(now)

    def _evict(self, now: float) -> None:
        """Trim to 90% of ``max_keys`` from the oldest end (O(1) a key, in bursts of a tenth of the cap, so a
        charge never walks the whole table): keys of past windows go uncounted, current ones count as evicted."""
        spent = self._spent
        target = self.max_keys * 9 // 10
        while len(spent) > target:
            k = next(iter(spent))
            start = spent.pop(k)[0]
            b = self._budgets.get(k[0])
            if b is not None and start == _window(now, b.seconds):
                self.events["evicted"] += 1

    # --- what /budgets shows --------------------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> list[dict[str, object]]:
        now = self.clock() if now is None else now
        out: list[dict[str, object]] = []
        for (name, key), (start, spent) in list(self._spent.items()):
            b = self._budgets.get(name)
            if b is None or start != _window(now, b.seconds):
                continue
            out.append({
                "budget": name, "key": dict(zip(b.headers, key, strict=True)), "spent": spent, "limit": b.limit,
                "unit": b.unit, "reset_in_s": round(start + b.seconds - now, 3),
            })  # fmt: skip
        return out

    def names(self) -> Sequence[str]:
        return tuple(self._budgets)


def _window(now: float, seconds: int) -> int:
    return math.floor(now / seconds) * seconds
