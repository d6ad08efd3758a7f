"""The extension points of ipc_router: what a custom router or custom metrics author needs, and nothing else.

Mirrors the Envoy AI Gateway's experimental ``x`` package (v0.2) in Python style, and is importable under that
name too: ``ipc_router.x`` is this very module (see ``x.py``). In short:

* a :class:`Router` turns request headers into the name of a route rule, or raises :class:`NoMatchingRuleError`;
* ``new_custom_router(default_router, config)`` wraps or replaces the default router; it is called on every
  config load;
* a :class:`ChatCompletionMetrics` object records one request's GenAI metrics; ``new_custom_chat_completion_metrics``
  makes one per request over an OpenTelemetry meter.

Set the two module attributes from a launcher of your own before starting the server, or (no code) give
``--router module:attr`` / ``--metrics module:attr`` to ``ipc-router serve``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from opentelemetry.metrics import Meter
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from ipc_router.config import Backend, Config

__all__ = [
    "Attributes",
    "ChatCompletionMetrics",
    "ErrNoMatchingRule",
    "NewCustomChatCompletionMetricsFn",
    "NewCustomRouterFn",
    "NoMatchingRuleError",
    "Router",
    "new_custom_chat_completion_metrics",
    "new_custom_router",
    "request_time",
    "reset_request_time",
    "set_request_time",
]


class NoMatchingRuleError(LookupError):
    """Raised by a router when no rule matches the request. The gateway answers 404."""

    def __init__(self, message: str = "no matching rule found") -> None:
        super().__init__(message)


#: The seed's name for the same error.
ErrNoMatchingRule = NoMatchingRuleError

Attributes: TypeAlias = Mapping[str, AttributeValue]


@runtime_checkable
class Router(Protocol):
    """Decides which route rule a request takes.

    ``request_headers`` has lower-case names (as Envoy delivers them) and already holds the model name, taken
    from the request body, under ``config.model_name_header_key``.

    Return the name of a rule of the config, or an awaitable of it (``async def calculate`` is allowed).
    Raise :class:`NoMatchingRuleError` when nothing matches. Any other exception answers the client 500.

    A router is shared by all requests and may be called from several threads at once.

    Optional attribute ``cache_key_headers``: a collection of header names (not a string), read once when the
    router is built. Setting it promises that, for this config, ``calculate``'s answer depends only on the
    values of those headers (a missing header being a value of its own) plus whatever the default router reads
    when it is delegated to; ipc_router then caches decisions keyed by those headers joined with the default
    router's (every header the config's rules name), lower-cased. Leave it unset, or ``None``, and every
    request calls ``calculate``. See :func:`ipc_router.router.cache_key`.
    """

    def calculate(self, request_headers: Mapping[str, str]) -> str | Awaitable[str]: ...


NewCustomRouterFn: TypeAlias = Callable[[Router, "Config"], Router]

#: Set to wrap or replace the default router. Called with (default_router, config) on every config load.
new_custom_router: NewCustomRouterFn | None = None


@runtime_checkable
class ChatCompletionMetrics(Protocol):
    """One request's GenAI metrics. A new object is made for every request; it is never shared.

    Call order, made by the sidecar: ``start_request`` when the route call arrives, ``set_model``,
    ``set_backend``; at completion ``record_token_latency`` (streaming responses only), ``record_token_usage``
    (when the response carried usage) and ``record_request_completion``, each exactly once.

    Timestamps: read the time with :func:`request_time`. While the sidecar drives these calls it returns the
    time the *filter in Envoy* saw the event (request arrival for ``start_request``, first response chunk for
    ``record_token_latency``, end of response for the rest), on the ``time.monotonic`` clock, so that metrics
    do not include the hop to the sidecar.
    """

    def start_request(self, headers: Mapping[str, str]) -> None:
        """The request arrived (routing is about to happen)."""

    def set_model(self, model: str) -> None:
        """The model named in the request body."""

    def set_backend(self, backend: Backend) -> None:
        """The backend the request was routed to."""

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: Attributes | None = None
    ) -> None:
        """Token counts from the response's ``usage``."""

    def record_request_completion(self, success: bool, extra_attrs: Attributes | None = None) -> None:
        """The response ended. ``success`` is a 2xx from the backend; failures carry ``error.type``."""

    def record_token_latency(self, tokens: int, extra_attrs: Attributes | None = None) -> None:
        """Streaming: the first token arrived (``request_time()`` is its time) and the response held ``tokens``
        output tokens in all."""


NewCustomChatCompletionMetricsFn: TypeAlias = Callable[[Meter], ChatCompletionMetrics]

#: Set to replace the default metrics. Called with the meter once per request: create instruments once (for
#: example cached per meter), not per call.
new_custom_chat_completion_metrics: NewCustomChatCompletionMetricsFn | None = None


_event_time: contextvars.ContextVar[float | None] = contextvars.ContextVar("ipc_router_event_time", default=None)


def set_request_time(t: float | None) -> contextvars.Token[float | None]:
    """What :func:`request_time` returns from now on in this context, until :func:`reset_request_time`. For
    whoever drives a :class:`ChatCompletionMetrics` (the sidecar's ledger, tests of a metrics plugin)."""
    return _event_time.set(t)


def reset_request_time(token: contextvars.Token[float | None]) -> None:
    """Undo the :func:`set_request_time` that returned ``token``."""
    _event_time.reset(token)


def request_time() -> float:
    """Seconds on the ``time.monotonic`` clock of the event being recorded (see :class:`ChatCompletionMetrics`).

    Outside a metrics call made by the sidecar, simply ``time.monotonic()``.
    """
    t = _event_time.get()
    return time.monotonic() if t is None else t
