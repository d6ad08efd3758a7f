"""A custom router: premium tenants get their own pool, everyone else gets the default routing.

    ipc-router serve --config examples/config.yaml --socket /tmp/ipc-router.sock \
        --router examples.custom_router:new_custom_router

(run from the repository root so that ``examples`` is importable, or give ``--app-dir`` the repository root).
"""

from __future__ import annotations

from collections.abc import Mapping

from ipc_router.filterapi import Config
from ipc_router.x import NoMatchingRuleError, Router

PREMIUM_RULE = "premium"


class TenantRouter:
    def __init__(self, default: Router, has_premium: bool) -> None:
        self.default = default
        self.has_premium = has_premium
        # The only header this code reads; ipc_router adds the default router's own (the headers the config's
        # rules name) to the cache key, so delegating to it below cannot be served a stale decision.
        self.cache_key_headers = ("x-tenant",)

    def calculate(self, request_headers: Mapping[str, str]) -> str:
        if self.has_premium and request_headers.get("x-tenant") == "premium":
            return PREMIUM_RULE
        result = self.default.calculate(request_headers)
        if not isinstance(result, str):  # the default router is synchronous; a wrapped custom one may not be
            raise NoMatchingRuleError("the wrapped router is async; make this router async too")
        return result


def new_custom_router(default_router: Router, config: Config) -> Router:
    """Called on every config load with the default router for that config."""
    return TenantRouter(default_router, config.rule(PREMIUM_RULE) is not None)
