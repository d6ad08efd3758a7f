"""The rate limit service Envoy's ``envoy.filters.http.ratelimit`` asks about token budgets: gRPC over a Unix socket.

Envoy speaks ``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit``. The server is grpclib's (asyncio, on
the sidecar's uvloop); the messages are protobuf's, from the subset of Envoy's ``rls.proto`` and
``ratelimit.proto`` this service reads and writes, declared below as a ``FileDescriptorProto`` with Envoy's field
numbers (fields left out are skipped by the parser as unknown). That keeps the sidecar clear of a generated copy of
Envoy's whole API (the ``envoy-data-plane`` package: 21 MB, 0.23 s to import, ~75 µs to parse and build one
exchange where protobuf's C parser takes a few).

:func:`answer` is the decision (no I/O): a descriptor ``[ipc_router_budget=NAME, HEADER=VALUE, ...]`` is over
limit when that key has spent its budget in the current window. Nothing is charged here (Envoy sends
``hits_addend: 0``; see :mod:`ipc_router.budgets`). An over-limit answer carries the body Envoy sends the client:
an OpenAI-style JSON error with ``retry-after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, text_format, wrappers_pb2
from grpclib.const import Cardinality, Handler
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from ipc_router.budgets import BUDGET_DESCRIPTOR_KEY, RLS_DOMAIN, Budgets, Verdict

__all__ = ["METHOD", "RateLimitRequest", "RateLimitResponse", "RateLimitService", "answer", "start_server"]

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

# Field numbers as in envoy/service/ratelimit/v3/rls.proto, envoy/extensions/common/ratelimit/v3/ratelimit.proto
# and envoy/config/core/v3/base.proto (HeaderValue).
_SCHEMA = """
name: "ipc_router/rls.proto" package: "ipc_router.rls" syntax: "proto3"
dependency: "google/protobuf/wrappers.proto" dependency: "google/protobuf/duration.proto"
message_type {
  name: "RateLimitDescriptor"
  field { name: "entries" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".ipc_router.rls.RateLimitDescriptor.Entry" }
  field { name: "hits_addend" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.UInt64Value" }
  nested_type {
    name: "Entry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
}
message_type {
  name: "RateLimitRequest"
  field { name: "domain" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "descriptors" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".ipc_router.rls.RateLimitDescriptor" }
  field { name: "hits_addend" number: 3 label: LABEL_OPTIONAL type: TYPE_UINT32 }
}
message_type {
  name: "HeaderValue"
  field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "RateLimitResponse"
  field { name: "overall_code" number: 1 label: LABEL_OPTIONAL type: TYPE_ENUM
          type_name: ".ipc_router.rls.RateLimitResponse.Code" }
  field { name: "statuses" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".ipc_router.rls.RateLimitResponse.DescriptorStatus" }
  field { name: "response_headers_to_add" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".ipc_router.rls.HeaderValue" }
  field { name: "raw_body" number: 5 label: LABEL_OPTIONAL type: TYPE_BYTES }
  nested_type {
    name: "RateLimit"
    field { name: "requests_per_unit" number: 1 label: LABEL_OPTIONAL type: TYPE_UINT32 }
    field { name: "unit" number: 2 label: LABEL_OPTIONAL type: TYPE_ENUM
            type_name: ".ipc_router.rls.RateLimitResponse.RateLimit.Unit" }
    field { name: "name" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }
    enum_type {
      name: "Unit"
      value { name: "UNKNOWN" number: 0 } value { name: "SECOND" number: 1 } value { name: "MINUTE" number: 2 }
      value { name: "HOUR" number: 3 } value { name: "DAY" number: 4 }
    }
  }
  nested_type {
    name: "DescriptorStatus"
    field { name: "code" number: 1 label: LABEL_OPTIONAL type: TYPE_ENUM
            type_name: ".ipc_router.rls.RateLimitResponse.Code" }
    field { name: "current_limit" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
            type_name: ".ipc_router.rls.RateLimitResponse.RateLimit" }
    field { name: "limit_remaining" number: 3 label: LABEL_OPTIONAL type: TYPE_UINT32 }
    field { name: "duration_until_reset" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE
            type_name: ".google.protobuf.Duration" }
  }
  enum_type {
    name: "Code"
    value { name: "UNKNOWN" number: 0 } value { name: "OK" number: 1 } value { name: "OVER_LIMIT" number: 2 }
  }
}
"""


def _message_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()  # our own: nothing else in the process can clash with these names
    for module in (wrappers_pb2, duration_pb2):
        dep = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(dep)
        pool.Add(dep)
    pool.Add(text_format.Parse(_SCHEMA, descriptor_pb2.FileDescriptorProto()))
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ipc_router.rls.{n}"))
        for n in ("RateLimitRequest", "RateLimitResponse")
    }


_CLASSES = _message_classes()
RateLimitRequest: Any = _CLASSES["RateLimitRequest"]
RateLimitResponse: Any = _CLASSES["RateLimitResponse"]
_OK, _OVER = 1, 2
_UNITS = {"second": 1, "minute": 2, "hour": 3, "day": 4}
_UINT32_MAX = 2**32 - 1


def answer(budgets: Budgets, request: Any) -> Any:
    """The response to one ``RateLimitRequest``."""
    response = RateLimitResponse()
    over: list[Verdict] = []
    ours = request.domain == RLS_DOMAIN
    for descriptor in request.descriptors:
        entries = {e.key: e.value for e in descriptor.entries}
        name = entries.pop(BUDGET_DESCRIPTOR_KEY, None)
        status = response.statuses.add()
        if not ours or name is None:
            budgets.events["foreign_descriptors"] += 1
            status.code = _OK
            continue
        v = budgets.check(name, entries)
        status.code = _OVER if v.over else _OK
        if v.budget is not None:
            status.current_limit.requests_per_unit = min(v.budget.limit, _UINT32_MAX)
            status.current_limit.unit = _UNITS[v.budget.unit]
            status.current_limit.name = v.budget.name
            status.limit_remaining = min(v.remaining, _UINT32_MAX)
            status.duration_until_reset.FromMilliseconds(max(0, int(v.reset_in * 1000)))
        if v.over:
            over.append(v)
    response.overall_code = _OVER if over else _OK
    if over:
        retry = max(1, math.ceil(max(v.reset_in for v in over)))
        response.raw_body = _error_body(over, retry)
        for key, value in (("content-type", "application/json"), ("retry-after", str(retry))):
            h = response.response_headers_to_add.add()
            h.key, h.value = key, value
    return response


def _error_body(over: list[Verdict], retry: int) -> bytes:
    parts = []
    for v in over:
        assert v.budget is not None
        key = ", ".join(f"{h}={val}" for h, val in zip(v.budget.headers, v.key, strict=True))
        b = v.budget
        parts.append(f"token budget {b.name!r} for {key} is spent ({v.used} of {b.limit} this {b.unit})")
    message = "; ".join(parts) + f". Try again in {retry} s."
    return orjson.dumps(
        {"error": {"message": message[0].upper() + message[1:], "type": "tokens", "param": None,
                   "code": "rate_limit_exceeded"}}
    )  # fmt: skip


class RateLimitService:
    """The grpclib handler: one ``ShouldRateLimit`` at a time per stream, answered from ``budgets``."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    async def should_rate_limit(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if request is None:
            return
        await stream.send_message(answer(self.budgets, request))

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self.should_rate_limit, Cardinality.UNARY_UNARY, RateLimitRequest, RateLimitResponse)}


class _CheckedServer(Server):
    """grpclib's server, with each new connection's peer checked before a byte is read (``--allow-uid``)."""

    def __init__(self, handlers: list[Any], allowed: Callable[[asyncio.BaseTransport], bool]) -> None:
        super().__init__(handlers)
        self._allowed = allowed

    def _protocol_factory(self) -> H2Protocol:  # grpclib 0.4's one seam for it (pinned in pyproject.toml)
        protocol = super()._protocol_factory()
        made = protocol.connection_made
        allowed = self._allowed

        def connection_made(transport: asyncio.BaseTransport) -> None:
            if allowed(transport):
                made(transport)
            else:
                protocol.connection_lost = lambda exc: None  # type: ignore[method-assign]  # never made
                transport.close()

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol


async def start_server(
    budgets: Budgets, path: str, mode: int = 0o660, allowed: Callable[[asyncio.BaseTransport], bool] | None = None
) -> Server:
    """Serve the rate limit service on the Unix socket ``path`` (``@name``: the abstract namespace). ``allowed``
    vets each new connection's peer, as the sidecar's own socket does with ``--allow-uid``/``--allow-gid``."""
    handlers: list[Any] = [RateLimitService(budgets)]
    server = Server(handlers) if allowed is None else _CheckedServer(handlers, allowed)
    abstract = path.startswith("@")
    if not abstract:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    await server.start(path="\0" + path[1:] if abstract else path)
    if not abstract:
        try:
            os.chmod(path, mode)
        except OSError:
            server.close()
            raise
    return server
