"""Routers and metrics factories used by the tests, loaded by ``module:attr`` (in process and by ``ipc-router``).

``tests/conftest.py`` puts ``tests/support/`` on ``sys.path`` and the server subprocesses get
``PYTHONPATH=<repo>/tests/support``, so the plugin spec is ``plugins_for_tests:<name>``, as a user names theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

from opentelemetry.metrics import Meter

from ipc_router import x
from ipc_router.filterapi import Backend, Config

#: A module-level object that is not callable: ``--router plugins_for_tests:NOT_CALLABLE`` must be refused.
NOT_CALLABLE = 42

PREMIUM_RULE = "premium"


class BoomRouter:
    """Delegates to the default router, but raises ``RuntimeError`` when the request has ``x-boom``.

    No ``cache_key_headers``: every request reaches ``calculate``.
    """

    def __init__(self, default: x.Router) -> None:
        self.default = default

    def calculate(self, request_headers: Mapping[str, str]) -> str | Awaitable[str]:
        if "x-boom" in request_headers:
            raise RuntimeError(f"boom: {request_headers['x-boom']}")
        return self.default.calculate(request_headers)


def boom_router(default: x.Router, config: Config) -> x.Router:
    return BoomRouter(default)


class SleepyRouter:
    """An ``async def calculate``: sleeps ``x-sleep-ms`` milliseconds, then asks the default router.

    ``x-boom`` raises after the sleep.
    """

    def __init__(self, default: x.Router) -> None:
        self.default = default

    async def calculate(self, request_headers: Mapping[str, str]) -> str:
        ms = int(request_headers.get("x-sleep-ms", "0"))
        if ms:
            await asyncio.sleep(ms / 1000)
        if "x-boom" in request_headers:
            raise RuntimeError(f"async boom: {request_headers['x-boom']}")
        result = self.default.calculate(request_headers)
        assert isinstance(result, str)
        return result


def sleepy_router(default: x.Router, config: Config) -> x.Router:
    return SleepyRouter(default)


class MixedRouter:
    """Sync by default, async when the request has ``x-sleep-ms``; ``x-boom`` raises (synchronously)."""

    def __init__(self, default: x.Router) -> None:
        self.default = default
        self.sleepy = SleepyRouter(default)

    def calculate(self, request_headers: Mapping[str, str]) -> str | Awaitable[str]:
        if "x-boom" in request_headers:
            raise RuntimeError(f"boom: {request_headers['x-boom']}")
        if "x-sleep-ms" in request_headers:
            return self.sleepy.calculate(request_headers)
        return self.default.calculate(request_headers)


def mixed_router(default: x.Router, config: Config) -> x.Router:
    return MixedRouter(default)


class TenantRouter:
    """``x-tenant: premium`` → the rule named ``premium``; anything else → the default router. Cacheable."""

    def __init__(self, default: x.Router, config: Config) -> None:
        self.default = default
        base = tuple(getattr(default, "cache_key_headers", ()) or ())
        self.cache_key_headers = (*base, "x-tenant")
        self.calls = 0

    def calculate(self, request_headers: Mapping[str, str]) -> str | Awaitable[str]:
        self.calls += 1
        if request_headers.get("x-tenant") == "premium":
            return PREMIUM_RULE
        return self.default.calculate(request_headers)


def tenant_router(default: x.Router, config: Config) -> x.Router:
    return TenantRouter(default, config)


class UnknownRuleRouter:
    def calculate(self, request_headers: Mapping[str, str]) -> str:
        return "no-such-rule"


def unknown_rule_router(default: x.Router, config: Config) -> x.Router:
    return UnknownRuleRouter()


class AsyncUnknownRuleRouter:
    async def calculate(self, request_headers: Mapping[str, str]) -> str:
        return "no-such-rule"


def async_unknown_rule_router(default: x.Router, config: Config) -> x.Router:
    return AsyncUnknownRuleRouter()


# --- metrics ----------------------------------------------------------------------------------------------------


def raising_metrics_factory(meter: Meter) -> x.ChatCompletionMetrics:
    raise RuntimeError("metrics factory failed")


class RaisingMetrics:
    """Every method raises (``fail_on`` limits it to the named methods)."""

    def __init__(self, fail_on: frozenset[str] | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_on is None or name in self.fail_on:
            raise RuntimeError(f"{name} failed")

    def start_request(self, headers: Mapping[str, str]) -> None:
        self._call("start_request")

    def set_model(self, model: str) -> None:
        self._call("set_model")

    def set_backend(self, backend: Backend) -> None:
        self._call("set_backend")

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: Any = None
    ) -> None:
        self._call("record_token_usage")

    def record_request_completion(self, success: bool, extra_attrs: Any = None) -> None:
        self._call("record_request_completion")

    def record_token_latency(self, tokens: int, extra_attrs: Any = None) -> None:
        self._call("record_token_latency")


def raising_metrics(meter: Meter) -> x.ChatCompletionMetrics:
    return RaisingMetrics()


def factory_that_raises(default_router: x.Router, config: Config) -> x.Router:
    raise RuntimeError("cannot build a router for this config")
