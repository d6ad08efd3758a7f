"""GenAI metrics: the default :class:`~ipc_router.extensions.ChatCompletionMetrics` over an OTel meter, and usage
extraction from OpenAI responses and SSE streams. No I/O.

Instrument names, units and buckets follow the OpenTelemetry GenAI semantic conventions as the AI Gateway
emits them (TTFT buckets extended to 60 s as in its v1.1). Unlike its v0.2, one object serves one request,
completion is recorded once, usage once at the end, and time per output token is
``(duration - TTFT) / (output tokens - 1)``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from opentelemetry.metrics import Histogram, Meter

from ipc_router import extensions
from ipc_router.config import Backend

__all__ = [
    "DefaultChatCompletionMetrics",
    "GenAIInstruments",
    "Usage",
    "UsageScanner",
    "extract_usage",
    "instruments_for",
    "new_default_chat_completion_metrics",
    "provider_name",
]

METER_NAME = "ipc_router"

TOKEN_USAGE = "gen_ai.client.token.usage"
REQUEST_DURATION = "gen_ai.server.request.duration"
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0,
)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"

_PROVIDERS = {"OpenAI": "openai", "AWSBedrock": "aws.bedrock", "AzureOpenAI": "azure.ai.openai"}


def provider_name(backend: Backend) -> str:
    """``gen_ai.provider.name`` for a backend: by its API schema, else the backend's name."""
    return _PROVIDERS.get(backend.schema.name, backend.name)


@dataclass(frozen=True, slots=True)
class GenAIInstruments:
    token_usage: Histogram
    request_duration: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram


_instruments: dict[Meter, GenAIInstruments] = {}
_instruments_lock = threading.Lock()


def instruments_for(meter: Meter) -> GenAIInstruments:
    """The four GenAI histograms of a meter, created once per meter (lock-free after the first call)."""
    found = _instruments.get(meter)
    if found is not None:
        return found
    with _instruments_lock:
        found = _instruments.get(meter)
        if found is None:
            found = GenAIInstruments(
                token_usage=meter.create_histogram(
                    TOKEN_USAGE, unit="{token}", description="Number of tokens processed.",
                    explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
                ),
                request_duration=meter.create_histogram(
                    REQUEST_DURATION, unit="s", description="Generative AI server request duration.",
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
                ),
                time_to_first_token=meter.create_histogram(
                    TIME_TO_FIRST_TOKEN, unit="s", description="Time to generate first token for successful responses.",
                    explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
                ),
                time_per_output_token=meter.create_histogram(
                    TIME_PER_OUTPUT_TOKEN, unit="s", description="Time per output token after the first.",
                    explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
                ),
            )  # fmt: skip
            _instruments[meter] = found
        return found


class DefaultChatCompletionMetrics:
    """The default per-request GenAI metrics. ``clock`` returns seconds (default: :func:`extensions.request_time`)."""

    __slots__ = (
        "_attrs", "_clock", "_completed", "_first_token", "_inst", "_model", "_provider", "_start", "_tokens",
    )  # fmt: skip

    def __init__(self, instruments: GenAIInstruments, clock: Callable[[], float] = extensions.request_time) -> None:
        self._inst = instruments
        self._clock = clock
        self._start = 0.0
        self._model = ""
        self._provider = ""
        self._attrs: dict[str, Any] = {OPERATION_NAME: "chat"}
        self._first_token: float | None = None
        self._tokens = 0
        self._completed = False

    def start_request(self, headers: Mapping[str, str]) -> None:
        self._start = self._clock()

    def set_model(self, model: str) -> None:
        self._model = model
        self._attrs = self._base()

    def set_backend(self, backend: Backend) -> None:
        self._provider = provider_name(backend)
        self._attrs = self._base()

    def _base(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {OPERATION_NAME: "chat"}
        if self._provider:
            attrs[PROVIDER_NAME] = self._provider
        if self._model:
            attrs[REQUEST_MODEL] = self._model
        return attrs

    def _with(self, extra: extensions.Attributes | None) -> dict[str, Any]:
        return {**self._attrs, **extra} if extra else self._attrs

    def record_token_usage(
        self, input_tokens: int, output_tokens: int, total_tokens: int, extra_attrs: extensions.Attributes | None = None
    ) -> None:
        attrs = self._with(extra_attrs)
        record = self._inst.token_usage.record
        record(input_tokens, {**attrs, TOKEN_TYPE: "input"})
        record(output_tokens, {**attrs, TOKEN_TYPE: "output"})

    def record_token_latency(self, tokens: int, extra_attrs: extensions.Attributes | None = None) -> None:
        if self._first_token is None:
            self._first_token = self._clock()
            self._inst.time_to_first_token.record(self._first_token - self._start, self._with(extra_attrs))
        self._tokens = tokens

    def record_request_completion(self, success: bool, extra_attrs: extensions.Attributes | None = None) -> None:
        if self._completed:
            return
        self._completed = True
        duration = self._clock() - self._start
        attrs = {**self._attrs, **extra_attrs} if extra_attrs else dict(self._attrs)
        if success:
            attrs.pop(ERROR_TYPE, None)
        else:
            attrs.setdefault(ERROR_TYPE, "_OTHER")
        self._inst.request_duration.record(duration, attrs)
        if self._first_token is not None and self._tokens > 1:
            attrs.pop(ERROR_TYPE, None)
            ttft = self._first_token - self._start
            self._inst.time_per_output_token.record((duration - ttft) / (self._tokens - 1), attrs)


def new_default_chat_completion_metrics(meter: Meter) -> DefaultChatCompletionMetrics:
    """The default :data:`~ipc_router.extensions.NewCustomChatCompletionMetricsFn`."""
    return DefaultChatCompletionMetrics(instruments_for(meter))


# --- usage extraction -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    total_tokens: int


_I64, _U64 = -(2**63), 2**64


def _usage_in(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    inp, out, tot = u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens")
    # Integers as a strict 64-bit JSON parser gives them (orjson turns larger ones into floats).
    if not (isinstance(inp, int) and isinstance(out, int) and _I64 <= inp < _U64 and _I64 <= out < _U64):
        return None
    return Usage(inp, out, tot if isinstance(tot, int) and _I64 <= tot < _U64 else inp + out)


class _UsageDoc(msgspec.Struct):
    usage: Any = None


_USAGE_DOC = msgspec.json.Decoder(_UsageDoc)


def _usage_of_json(data: bytes) -> Usage | None:
    """The usage of a JSON document (an answer, or one event of a stream), as a strict parser reads it: ``None``
    unless it is valid JSON, an object, with integer ``prompt_tokens`` and ``completion_tokens``. msgspec skips
    (and still checks) every other member: ~1 µs less per 0.5 KiB answer in the drain loop than building the
    whole document. It does not check UTF-8 in what it skips, hence the check first."""
    try:
        return _usage_in(_USAGE_DOC.decode(data).usage) if data.isascii() or _utf8(data) else None
    except msgspec.DecodeError:  # invalid JSON, or not an object at the top
        return None


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


_NON_NULL_USAGE = re.compile(rb'"usage"\s*+:\s*+(?!null)')


class UsageScanner:
    """Incremental SSE usage scanner: feed bytes in any pieces; ``usage`` is the first event's non-null usage.

    Lines not starting with ``data: ``, invalid JSON and ``[DONE]`` are skipped; the first line of a stream
    tail may be a partial line and is skipped the same way.
    """

    __slots__ = ("_buf", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> None:
        if self.usage is not None:
            return
        buf = self._buf + data
        end = buf.rfind(b"\n")
        if end < 0:
            self._buf = buf
            return
        # Only lines with a non-null "usage" can carry it: let the regex engine skip the rest.
        found = _NON_NULL_USAGE.search(buf, 0, end)
        while found is not None and self.usage is None:
            start = buf.rfind(b"\n", 0, found.start()) + 1
            stop = buf.find(b"\n", found.end(), end + 1)
            self._line(buf[start:stop])
            found = _NON_NULL_USAGE.search(buf, stop, end)
        self._buf = b"" if self.usage is not None else buf[end + 1 :]

    def close(self) -> Usage | None:
        """End of stream: a last line without a newline still counts."""
        if self.usage is None and self._buf:
            self._line(self._buf)
            self._buf = b""
        return self.usage

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data: "):
            return
        payload = line[6:].strip()
        if not payload or payload == b"[DONE]":
            return
        self.usage = _usage_of_json(payload)


def extract_usage(body: bytes, stream: bool) -> Usage | None:
    """Usage from a whole non-streaming OpenAI response body, or from (the end of) an SSE stream."""
    if stream:
        scanner = UsageScanner()
        scanner.feed(body)
        return scanner.close()
    return _usage_of_json(body)
