"""Custom metrics plugins for the end-to-end tests (loaded by the sidecar subprocess by import string)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.metrics import Meter

from ipc_router.filterapi import Backend
from ipc_router.metrics import DefaultChatCompletionMetrics, instruments_for
from ipc_router.x import Attributes, request_time


class Recording(DefaultChatCompletionMetrics):
    """The default metrics, plus one JSON line per call in $IPC_ROUTER_TEST_CALLS."""

    __slots__ = ("_n",)
    _counter = 0

    def __init__(self, meter: Meter) -> None:
        super().__init__(instruments_for(meter))
        Recording._counter += 1
        self._n = Recording._counter

    def _log(self, call: str, **fields: Any) -> None:
        with open(os.environ["IPC_ROUTER_TEST_CALLS"], "a") as f:
            f.write(json.dumps({"obj": self._n, "call": call, "t": request_time(), **fields}) + "\n")

    def start_request(self, headers: Mapping[str, str]) -> None:
        self._log("start_request", team=headers.get("x-team-id"))
        super().start_request(headers)

    def set_model(self, model: str) -> None:
        self._log("set_model", model=model)
        super().set_model(model)

    def set_backend(self, backend: Backend) -> None:
        self._log("set_backend", backend=backend.name)
        super().set_backend(backend)

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: Attributes | None = None
    ) -> None:
        self._log("record_token_usage", tokens=[input_tokens, output_tokens, total_tokens])
        super().record_token_usage(input_tokens, output_tokens, total_tokens, extra_attrs)

    def record_request_completion(self, success: bool, extra_attrs: Attributes | None = None) -> None:
        self._log("record_request_completion", success=success, attrs=dict(extra_attrs or {}))
        super().record_request_completion(success, extra_attrs)

    def record_token_latency(self, tokens: int, extra_attrs: Attributes | None = None) -> None:
        self._log("record_token_latency", tokens=tokens)
        super().record_token_latency(tokens, extra_attrs)


def recording(meter: Meter) -> Recording:
    return Recording(meter)


class Broken(DefaultChatCompletionMetrics):
    def record_request_completion(self, success: bool, extra_attrs: Attributes | None = None) -> None:
        raise RuntimeError("metrics plugin bug")


def broken(meter: Meter) -> Broken:
    return Broken(instruments_for(meter))
