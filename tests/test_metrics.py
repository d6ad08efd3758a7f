"""GenAI metrics over the real OTel SDK (InMemoryMetricReader), and usage extraction from OpenAI responses."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric

from ipc_router import x
from ipc_router.filterapi import Backend, VersionedAPISchema
from ipc_router.metrics import (
    DURATION_BUCKETS,
    ERROR_TYPE,
    METER_NAME,
    OPERATION_NAME,
    PROVIDER_NAME,
    REQUEST_DURATION,
    REQUEST_MODEL,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKEN_BUCKETS,
    TOKEN_TYPE,
    TOKEN_USAGE,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    DefaultChatCompletionMetrics,
    Usage,
    UsageScanner,
    extract_usage,
    instruments_for,
    new_default_chat_completion_metrics,
    provider_name,
)

CASSETTES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "openai-cassettes"
needs_cassettes = pytest.mark.skipif(not CASSETTES.is_dir(), reason=f"no cassettes at {CASSETTES}")

OPENAI = Backend(name="openai.default", schema=VersionedAPISchema("OpenAI"))


# --- helpers ----------------------------------------------------------------------------------------------------


class SDK:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.meter: Meter = self.provider.get_meter(METER_NAME)

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        out: dict[str, Metric] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    assert m.name not in out
                    out[m.name] = m
        return out

    def points(self) -> dict[str, list[HistogramDataPoint]]:
        out: dict[str, list[HistogramDataPoint]] = {}
        for name, m in self.metrics().items():
            pts = [p for p in m.data.data_points if isinstance(p, HistogramDataPoint) and p.count > 0]
            if pts:
                out[name] = pts
        return out

    def one(self, name: str, **match: Any) -> HistogramDataPoint:
        pts = [p for p in self.points().get(name, []) if all(p.attributes.get(k) == v for k, v in match.items())]
        assert len(pts) == 1, (name, match, self.points().get(name))
        return pts[0]


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sdk() -> Iterator[SDK]:
    s = SDK()
    yield s
    s.provider.shutdown()


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


def new(sdk: SDK, clock: Clock) -> DefaultChatCompletionMetrics:
    return DefaultChatCompletionMetrics(instruments_for(sdk.meter), clock=clock)


BASE = {OPERATION_NAME: "chat", PROVIDER_NAME: "openai", REQUEST_MODEL: "gpt-4o"}


def begin(sdk: SDK, clock: Clock, backend: Backend = OPENAI, model: str = "gpt-4o") -> DefaultChatCompletionMetrics:
    m = new(sdk, clock)
    m.start_request({"x-ai-eg-model": model})
    m.set_model(model)
    m.set_backend(backend)
    return m


# --- recording --------------------------------------------------------------------------------------------------


def test_non_streaming_success(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 101.5
    m.record_token_usage(12, 34, 46)
    m.record_request_completion(True)

    pts = sdk.points()
    assert set(pts) == {REQUEST_DURATION, TOKEN_USAGE}  # no TTFT / TPOT
    (d,) = pts[REQUEST_DURATION]
    assert dict(d.attributes) == BASE
    assert (d.count, d.sum, d.min, d.max) == (1, 1.5, 1.5, 1.5)

    assert len(pts[TOKEN_USAGE]) == 2
    inp = sdk.one(TOKEN_USAGE, **{TOKEN_TYPE: "input"})
    out = sdk.one(TOKEN_USAGE, **{TOKEN_TYPE: "output"})
    assert dict(inp.attributes) == {**BASE, TOKEN_TYPE: "input"}
    assert dict(out.attributes) == {**BASE, TOKEN_TYPE: "output"}
    assert (inp.count, inp.sum) == (1, 12)
    assert (out.count, out.sum) == (1, 34)


def test_streaming_success_ttft_and_tpot(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.25  # first token
    m.record_token_latency(9)
    clock.t = 102.25  # end of stream
    m.record_token_usage(5, 9, 14)
    m.record_request_completion(True)

    pts = sdk.points()
    assert set(pts) == {REQUEST_DURATION, TOKEN_USAGE, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN}
    ttft = sdk.one(TIME_TO_FIRST_TOKEN)
    assert dict(ttft.attributes) == BASE
    assert (ttft.count, ttft.sum) == (1, 0.25)
    duration = sdk.one(REQUEST_DURATION)
    assert (duration.count, duration.sum) == (1, 2.25)
    tpot = sdk.one(TIME_PER_OUTPUT_TOKEN)
    assert dict(tpot.attributes) == BASE
    assert tpot.count == 1
    assert tpot.sum == (2.25 - 0.25) / (9 - 1) == 0.25
    assert sdk.one(TOKEN_USAGE, **{TOKEN_TYPE: "output"}).sum == 9


def test_streaming_tpot_non_round_numbers(sdk: SDK, clock: Clock) -> None:
    clock.t = 10.0
    m = begin(sdk, clock)
    clock.t = 10.3
    m.record_token_latency(7)
    clock.t = 11.9
    m.record_request_completion(True)
    duration = 11.9 - 10.0
    ttft = 10.3 - 10.0
    assert sdk.one(TIME_TO_FIRST_TOKEN).sum == ttft
    assert sdk.one(REQUEST_DURATION).sum == duration
    assert sdk.one(TIME_PER_OUTPUT_TOKEN).sum == (duration - ttft) / 6


def test_ttft_recorded_once_and_tokens_updated(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(1)
    clock.t = 101.0
    m.record_token_latency(5)  # a second call does not move the first-token time
    clock.t = 102.5
    m.record_request_completion(True)
    assert sdk.one(TIME_TO_FIRST_TOKEN).count == 1
    assert sdk.one(TIME_TO_FIRST_TOKEN).sum == 0.5
    assert sdk.one(TIME_PER_OUTPUT_TOKEN).sum == (2.5 - 0.5) / 4


def test_failure_defaults_error_type_other(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.75
    m.record_request_completion(False)
    pts = sdk.points()
    assert set(pts) == {REQUEST_DURATION}
    d = sdk.one(REQUEST_DURATION)
    assert dict(d.attributes) == {**BASE, ERROR_TYPE: "_OTHER"}
    assert (d.count, d.sum) == (1, 0.75)


def test_failure_error_type_from_extra_attrs(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 101.0
    m.record_request_completion(False, {ERROR_TYPE: "429", "team": "blue"})
    d = sdk.one(REQUEST_DURATION)
    assert dict(d.attributes) == {**BASE, ERROR_TYPE: "429", "team": "blue"}


def test_success_drops_error_type(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 101.0
    m.record_request_completion(True, {ERROR_TYPE: "ignored"})
    assert dict(sdk.one(REQUEST_DURATION).attributes) == BASE


def test_failed_stream_has_error_type_on_duration_only(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(3)
    clock.t = 101.5
    m.record_request_completion(False)
    assert dict(sdk.one(REQUEST_DURATION).attributes) == {**BASE, ERROR_TYPE: "_OTHER"}
    assert ERROR_TYPE not in sdk.one(TIME_TO_FIRST_TOKEN).attributes
    for p in sdk.points().get(TIME_PER_OUTPUT_TOKEN, []):
        assert ERROR_TYPE not in p.attributes


def test_single_output_token_has_no_tpot(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(1)
    clock.t = 101.0
    m.record_token_usage(3, 1, 4)
    m.record_request_completion(True)
    pts = sdk.points()
    assert TIME_PER_OUTPUT_TOKEN not in pts
    assert sdk.one(TIME_TO_FIRST_TOKEN).sum == 0.5
    assert sdk.one(REQUEST_DURATION).sum == 1.0


def test_zero_output_tokens_has_no_tpot(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(0)
    clock.t = 101.0
    m.record_request_completion(True)
    assert TIME_PER_OUTPUT_TOKEN not in sdk.points()


def test_completion_recorded_once(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(3)
    clock.t = 101.0
    m.record_request_completion(True)
    clock.t = 105.0
    m.record_request_completion(True)
    m.record_request_completion(False)
    pts = sdk.points()
    (d,) = pts[REQUEST_DURATION]
    assert (d.count, d.sum) == (1, 1.0)
    assert dict(d.attributes) == BASE
    (tpot,) = pts[TIME_PER_OUTPUT_TOKEN]
    assert tpot.count == 1


def test_extra_attrs_on_all_instruments(sdk: SDK, clock: Clock) -> None:
    extra = {"team": "blue", "tier": 2}
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(4, extra)
    clock.t = 102.0
    m.record_token_usage(1, 4, 5, extra)
    m.record_request_completion(True, extra)
    pts = sdk.points()
    assert set(pts) == {REQUEST_DURATION, TOKEN_USAGE, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN}
    for name, points in pts.items():
        for p in points:
            expected = {**BASE, **extra}
            if name == TOKEN_USAGE:
                expected[TOKEN_TYPE] = p.attributes[TOKEN_TYPE]
            assert dict(p.attributes) == expected, name
    # Extra attributes do not leak into the next request's metrics.
    m2 = begin(sdk, clock)
    clock.t = 103.0
    m2.record_request_completion(True)
    d = sdk.points()[REQUEST_DURATION]
    assert sorted(p.count for p in d) == [1, 1]
    assert any(dict(p.attributes) == BASE for p in d)


def test_per_request_objects_are_independent(sdk: SDK, clock: Clock) -> None:
    a = begin(sdk, clock, model="a")
    clock.t = 101.0
    b = begin(sdk, clock, model="b")
    clock.t = 103.0
    a.record_request_completion(True)
    b.record_request_completion(True)
    assert sdk.one(REQUEST_DURATION, **{REQUEST_MODEL: "a"}).sum == 3.0
    assert sdk.one(REQUEST_DURATION, **{REQUEST_MODEL: "b"}).sum == 2.0


def test_attributes_without_model_or_backend(sdk: SDK, clock: Clock) -> None:
    m = new(sdk, clock)
    m.start_request({})
    clock.t = 100.5
    m.record_request_completion(True)
    assert dict(sdk.one(REQUEST_DURATION).attributes) == {OPERATION_NAME: "chat"}


def test_attributes_with_model_but_no_backend(sdk: SDK, clock: Clock) -> None:
    # The no-matching-rule path: the model is known, no backend was chosen.
    m = new(sdk, clock)
    m.start_request({})
    m.set_model("claude")
    clock.t = 100.5
    m.record_request_completion(False, {ERROR_TYPE: "404"})
    assert dict(sdk.one(REQUEST_DURATION).attributes) == {
        OPERATION_NAME: "chat",
        REQUEST_MODEL: "claude",
        ERROR_TYPE: "404",
    }


@pytest.mark.parametrize(
    ("backend", "provider"),
    [
        (Backend("any-name", VersionedAPISchema("OpenAI")), "openai"),
        (Backend("bedrock-us", VersionedAPISchema("AWSBedrock")), "aws.bedrock"),
        (Backend("azure", VersionedAPISchema("AzureOpenAI", "2024-10-21")), "azure.ai.openai"),
        (Backend("my-backend", VersionedAPISchema("SomethingElse")), "my-backend"),
    ],
)
def test_provider_names(sdk: SDK, clock: Clock, backend: Backend, provider: str) -> None:
    assert provider_name(backend) == provider
    m = begin(sdk, clock, backend=backend)
    clock.t = 101.0
    m.record_token_usage(1, 2, 3)
    m.record_request_completion(True)
    assert sdk.one(REQUEST_DURATION).attributes[PROVIDER_NAME] == provider
    for p in sdk.points()[TOKEN_USAGE]:
        assert p.attributes[PROVIDER_NAME] == provider


def test_bucket_boundaries_units_and_descriptions(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.5
    m.record_token_latency(3)
    clock.t = 101.0
    m.record_token_usage(1, 3, 4)
    m.record_request_completion(True)
    metrics = sdk.metrics()
    expected = {
        TOKEN_USAGE: ("{token}", TOKEN_BUCKETS),
        REQUEST_DURATION: ("s", DURATION_BUCKETS),
        TIME_TO_FIRST_TOKEN: ("s", TTFT_BUCKETS),
        TIME_PER_OUTPUT_TOKEN: ("s", TPOT_BUCKETS),
    }
    assert set(metrics) == set(expected)
    for name, (unit, bounds) in expected.items():
        assert metrics[name].unit == unit
        assert metrics[name].description
        for p in metrics[name].data.data_points:
            assert isinstance(p, HistogramDataPoint)
            assert tuple(p.explicit_bounds) == tuple(bounds), name
            assert len(p.bucket_counts) == len(bounds) + 1


def test_bucket_constants_match_the_reference() -> None:
    pow4 = tuple(4**i for i in range(14))
    assert pow4 == TOKEN_BUCKETS
    assert tuple(round(0.01 * 2**i, 2) for i in range(14)) == DURATION_BUCKETS
    assert TTFT_BUCKETS[:16] == (
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
    )
    assert TTFT_BUCKETS[-1] == 60.0
    assert list(TTFT_BUCKETS) == sorted(set(TTFT_BUCKETS))
    assert TPOT_BUCKETS == (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def test_values_fall_in_the_right_bucket(sdk: SDK, clock: Clock) -> None:
    m = begin(sdk, clock)
    clock.t = 100.0 + 0.03  # TTFT 0.03 -> bucket (0.02, 0.04]
    m.record_token_latency(2)
    clock.t = 103.0  # duration 3.0 -> bucket (2.56, 5.12]
    m.record_token_usage(100, 2, 102)  # 100 -> (64, 256]
    m.record_request_completion(True)
    d = sdk.one(REQUEST_DURATION)
    assert d.bucket_counts[DURATION_BUCKETS.index(5.12)] == 1
    assert sum(d.bucket_counts) == 1
    t = sdk.one(TIME_TO_FIRST_TOKEN)
    assert t.bucket_counts[TTFT_BUCKETS.index(0.04)] == 1
    u = sdk.one(TOKEN_USAGE, **{TOKEN_TYPE: "input"})
    assert u.bucket_counts[TOKEN_BUCKETS.index(256)] == 1


def test_instruments_created_once_per_meter(sdk: SDK) -> None:
    a = instruments_for(sdk.meter)
    assert instruments_for(sdk.meter) is a
    other = SDK()
    try:
        assert instruments_for(other.meter) is not a
    finally:
        other.provider.shutdown()


def test_new_default_metrics_is_a_chat_completion_metrics(sdk: SDK) -> None:
    m = new_default_chat_completion_metrics(sdk.meter)
    assert isinstance(m, x.ChatCompletionMetrics)
    assert isinstance(m, DefaultChatCompletionMetrics)
    assert new_default_chat_completion_metrics(sdk.meter) is not m  # one object per request


# --- request_time ---------------------------------------------------------------------------------------------


def test_request_time_defaults_to_monotonic() -> None:
    assert x._event_time.get() is None
    before = time.monotonic()
    t = x.request_time()
    after = time.monotonic()
    assert before <= t <= after


def test_default_metrics_use_event_time(sdk: SDK) -> None:
    m = new_default_chat_completion_metrics(sdk.meter)

    def at(t: float) -> Any:
        return x._event_time.set(t)

    token = at(1000.0)
    try:
        assert x.request_time() == 1000.0
        m.start_request({})
        m.set_model("gpt-4o")
        m.set_backend(OPENAI)
        x._event_time.set(1000.125)
        m.record_token_latency(5)
        x._event_time.set(1001.125)
        m.record_request_completion(True)
    finally:
        x._event_time.reset(token)
    assert x._event_time.get() is None
    assert sdk.one(TIME_TO_FIRST_TOKEN).sum == 0.125
    assert sdk.one(REQUEST_DURATION).sum == 1.125
    assert sdk.one(TIME_PER_OUTPUT_TOKEN).sum == 1.0 / 4


# --- usage extraction -------------------------------------------------------------------------------------------


def cassette(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CASSETTES / name).read_text())
    response: dict[str, Any] = data["interactions"][0]["response"]
    return response


def usage_of(body: dict[str, Any]) -> Usage:
    u = body["usage"]
    return Usage(u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])


def sse(*events: Any, done: bool = True) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


USAGE_EVENT = {
    "id": "chatcmpl-x",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 8, "completion_tokens": 377, "total_tokens": 385},
}
CHUNK = {
    "id": "chatcmpl-x",
    "object": "chat.completion.chunk",
    "choices": [{"delta": {"content": "hi"}}],
    "usage": None,
}


def streaming_with_usage() -> tuple[bytes, Usage]:
    """The recorded stream with an OpenAI usage event (``stream_options.include_usage``) before ``[DONE]``.

    The recorded ``chat-streaming.yaml`` has no usage event at all (its request lacks ``stream_options``),
    although the cassettes' README says it has one."""
    body: str = cassette("chat-streaming.yaml")["body"]
    assert body.endswith("data: [DONE]\n\n")
    usage = {"prompt_tokens": 8, "completion_tokens": 42, "total_tokens": 50}
    event = {
        "id": "chatcmpl-C4HqHBe4xca0k0EzsCnf1t6V3YFXp",
        "object": "chat.completion.chunk",
        "created": 1755137933,
        "model": "gpt-5-nano-2025-08-07",
        "choices": [],
        "usage": usage,
    }
    body = body[: -len("data: [DONE]\n\n")] + f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n"
    return body.encode(), Usage(8, 42, 50)


@needs_cassettes
def test_extract_usage_from_recorded_non_streaming_body() -> None:
    resp = cassette("chat-basic.yaml")
    body = resp["body"]
    expected = usage_of(json.loads(body))
    assert expected == Usage(8, 377, 385)
    assert extract_usage(body.encode(), stream=False) == expected


@needs_cassettes
def test_extract_usage_from_recorded_tools_body() -> None:
    body = cassette("chat-tools.yaml")["body"]
    assert extract_usage(body.encode(), stream=False) == usage_of(json.loads(body))


@needs_cassettes
def test_recorded_stream_without_usage_event_gives_none() -> None:
    body: str = cassette("chat-streaming.yaml")["body"]
    assert '"usage"' not in body
    assert extract_usage(body.encode(), stream=True) is None


@needs_cassettes
def test_extract_usage_from_recorded_stream_with_usage() -> None:
    body, expected = streaming_with_usage()
    assert extract_usage(body, stream=True) == expected


@needs_cassettes
def test_usage_scanner_one_byte_at_a_time() -> None:
    body, expected = streaming_with_usage()
    scanner = UsageScanner()
    for i in range(len(body)):
        scanner.feed(body[i : i + 1])
    assert scanner.usage == expected
    assert scanner.close() == expected


@needs_cassettes
@pytest.mark.parametrize("size", [2, 7, 64, 333, 4096])
def test_usage_scanner_any_chunking(size: int) -> None:
    body, expected = streaming_with_usage()
    scanner = UsageScanner()
    for i in range(0, len(body), size):
        scanner.feed(body[i : i + size])
    assert scanner.close() == expected


@needs_cassettes
@pytest.mark.parametrize("tail", [4096, 1000, 500])
def test_stream_tail_starting_mid_line(tail: int) -> None:
    body, expected = streaming_with_usage()
    cut = body[-tail:]
    assert not cut.startswith(b"data: ")  # really mid-line
    assert extract_usage(cut, stream=True) == expected


@needs_cassettes
def test_error_body_gives_none() -> None:
    resp = cassette("chat-bad-request.yaml")
    assert resp["code"] == 400
    body = resp["body"].encode()
    assert b'"error"' in body
    assert extract_usage(body, stream=False) is None
    assert extract_usage(body, stream=True) is None


def test_non_streaming_usage_total_defaults_to_sum() -> None:
    assert extract_usage(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}', False) == Usage(3, 4, 7)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"usage"',
        b'{"choices": []}',
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "3", "completion_tokens": 4}}',
        b'{"usage": {"completion_tokens": 4}}',
        b'{"error": {"message": "bad", "type": "invalid_request_error"}}',
    ],
)
def test_non_streaming_without_usage_gives_none(body: bytes) -> None:
    assert extract_usage(body, stream=False) is None


def test_stream_invalid_lines_skipped() -> None:
    body = (
        b": keep-alive comment\n"
        b"event: message\n"
        b"data: {not json}\n"
        b"data: \n"
        b"data: [DONE]\n"
        b"garbage line\n"
        b'data: {"usage": "not a mapping"}\n'
        b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}\n'
    )
    assert extract_usage(body, stream=True) == Usage(1, 2, 3)


def test_stream_done_skipped_and_usage_after_it_still_found() -> None:
    body = sse(CHUNK, done=True) + sse(USAGE_EVENT, done=False)
    assert extract_usage(body, stream=True) == Usage(8, 377, 385)


def test_stream_no_usage_gives_none() -> None:
    assert extract_usage(sse(CHUNK, CHUNK), stream=True) is None
    assert extract_usage(b"", stream=True) is None
    assert extract_usage(b"data: [DONE]\n\n", stream=True) is None


def test_stream_first_non_null_usage_wins() -> None:
    second = {**USAGE_EVENT, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    body = sse(CHUNK, USAGE_EVENT, second)
    assert extract_usage(body, stream=True) == Usage(8, 377, 385)
    scanner = UsageScanner()
    scanner.feed(body)
    assert scanner.usage == Usage(8, 377, 385)
    scanner.feed(sse(second))  # later feeds are ignored once usage is known
    assert scanner.close() == Usage(8, 377, 385)


def test_stream_usage_split_across_feeds() -> None:
    body = sse(CHUNK, USAGE_EVENT)
    idx = body.index(b'"prompt_tokens"') + 5
    scanner = UsageScanner()
    scanner.feed(body[:idx])
    assert scanner.usage is None
    scanner.feed(body[idx:])
    assert scanner.usage == Usage(8, 377, 385)


def test_stream_last_line_without_newline_counts_on_close() -> None:
    body = sse(CHUNK, done=False) + b"data: " + json.dumps(USAGE_EVENT).encode()
    scanner = UsageScanner()
    scanner.feed(body)
    assert scanner.usage is None
    assert scanner.close() == Usage(8, 377, 385)
    assert extract_usage(body, stream=True) == Usage(8, 377, 385)


def test_stream_crlf_line_endings() -> None:
    body = sse(CHUNK, USAGE_EVENT).replace(b"\n", b"\r\n")
    assert extract_usage(body, stream=True) == Usage(8, 377, 385)


def test_stream_tail_starting_mid_usage_line_is_skipped() -> None:
    # The tail begins inside the only usage event: that partial line must not be mistaken for usage.
    body = sse(CHUNK, USAGE_EVENT)
    tail = body[body.rindex(b'"usage"') :]
    assert tail.startswith(b'"usage": {"prompt_tokens"')
    assert extract_usage(tail, stream=True) is None
    # ... and a later complete usage event is still found.
    assert extract_usage(tail + sse(USAGE_EVENT), stream=True) == Usage(8, 377, 385)


def test_usage_scan_skips_null_usage_spellings_and_decoys_in_content() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"say \\"usage\\": {1}"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage" :  null}\n\n'
        b'data: {"choices":[],"usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert extract_usage(stream, stream=True) == Usage(4, 6, 10)
    scanner = UsageScanner()
    for i in range(len(stream)):
        scanner.feed(stream[i : i + 1])
    assert scanner.close() == Usage(4, 6, 10)


# --- the usage read: what a strict parser (orjson) and a plain reading of the document give -------------------


def _reference_usage(body: bytes) -> Usage | None:
    """The usage read written plainly: the whole document parsed, then looked at."""
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    u = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(u, dict):
        return None
    inp, out, tot = u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens")
    if not isinstance(inp, int) or not isinstance(out, int):
        return None
    return Usage(inp, out, tot if isinstance(tot, int) else inp + out)


_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)  # fmt: skip
_JSON = st.recursive(
    _JSON_LEAVES, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=12,
)  # fmt: skip
_USAGE_VALUES = st.one_of(_JSON_LEAVES, st.integers(min_value=2**63 - 2, max_value=2**64 + 2))
_USAGE = st.fixed_dictionaries(
    {}, optional={"prompt_tokens": _USAGE_VALUES, "completion_tokens": _USAGE_VALUES, "total_tokens": _USAGE_VALUES}
)


@settings(max_examples=400, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=6), _JSON, max_size=4),
    usage=st.one_of(st.none(), _USAGE, _JSON),
    dup=st.booleans(),
    mangle=st.sampled_from([None, "truncate", "bad-utf8", "trailing", "array"]),
)
def test_usage_read_agrees_with_a_whole_document_parse(
    doc: dict[str, Any], usage: Any, dup: bool, mangle: str | None
) -> None:
    from ipc_router.metrics import _usage_of_json

    def dumps(v: Any) -> bytes:  # the stdlib writes integers of any size, as a backend might
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()

    body = dumps({**doc, "usage": usage})
    if dup:  # a repeated member: the last one counts, in both
        body = body[:-1] + b',"usage":' + dumps(usage) + b"}"
    if mangle == "truncate":
        body = body[: len(body) // 2]
    elif mangle == "bad-utf8":
        body = body[:1] + b'"\xff\xfe":1,' + body[1:]
    elif mangle == "trailing":
        body += b" x"
    elif mangle == "array":
        body = b"[" + body + b"]"
    assert _usage_of_json(body) == _reference_usage(body)
    assert extract_usage(body, stream=False) == _reference_usage(body)
    event = b'data: {"choices":[]}\n\ndata: ' + body + b"\n\ndata: [DONE]\n\n"
    assert extract_usage(event, stream=True) == _reference_usage(body)
