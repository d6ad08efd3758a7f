"""Custom metrics: the default GenAI metrics plus an estimated cost per request.

    ipc-router serve ... --metrics examples.custom_metrics:new_custom_chat_completion_metrics

The factory is called once per request with the meter; instruments are created once per meter.
"""

from __future__ import annotations

import functools

from opentelemetry.metrics import Histogram, Meter

from ipc_router.metrics import DefaultChatCompletionMetrics, instruments_for
from ipc_router.x import Attributes

# USD per million tokens (input, output); a real deployment would load a price list.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "llama3.3": (0.10, 0.10),
}
DEFAULT_PRICE = (1.0, 1.0)


@functools.cache
def _cost_histogram(meter: Meter) -> Histogram:
    return meter.create_histogram(
        "llm.request.cost", unit="USD", description="Estimated cost of one request.",
        explicit_bucket_boundaries_advisory=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0),
    )  # fmt: skip


class CostMetrics(DefaultChatCompletionMetrics):
    __slots__ = ("_cost", "_model_name")

    def __init__(self, meter: Meter) -> None:
        super().__init__(instruments_for(meter))
        self._cost = _cost_histogram(meter)
        self._model_name = ""

    def set_model(self, model: str) -> None:
        super().set_model(model)
        self._model_name = model

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: Attributes | None = None
    ) -> None:
        super().record_token_usage(input_tokens, output_tokens, total_tokens, extra_attrs)
        price_in, price_out = PRICES.get(self._model_name, DEFAULT_PRICE)
        cost = (input_tokens * price_in + output_tokens * price_out) / 1e6
        self._cost.record(cost, {"gen_ai.request.model": self._model_name, **(extra_attrs or {})})


def new_custom_chat_completion_metrics(meter: Meter) -> CostMetrics:
    return CostMetrics(meter)
