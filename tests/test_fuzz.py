"""Fuzzing, the short seeded version of ``make fuzz`` (tests/support/fuzz_harness.py): property tests (hypothesis)
and the mutation fuzzer against the wire protocol and request handling, in-process and on a real sidecar's socket.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc_router.protocol import JSON, MSGPACK, Connection, ProtocolError, Request, encode_response
from ipc_router.service import Service
from tests.support.fuzz_harness import (
    ASYNC_ROUTER,
    FUZZ_ID,
    MAX_BODY_BYTES,
    Failure,
    LiveServer,
    encode,
    exchange,
    exchange_socket,
    fuzz_sans_io,
    fuzz_socket,
    generate,
    http,
    new_service,
    parse_responses,
    route_message,
)

FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def svc() -> Service:
    return new_service()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(*ASYNC_ROUTER)
    try:
        yield server
    finally:
        server.close()


# --- the checker itself must catch what it is for -----------------------------------------------------------------

OK_200 = encode_response(200, b'{"a":1}', JSON)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(OK_200[:-1], id="truncated-body"),
        pytest.param(OK_200.replace(b"content-length: 7", b"content-length: 6"), id="short-content-length"),
        pytest.param(encode_response(200, b"x", JSON, keep_alive=False) + OK_200, id="answer-after-close"),
        pytest.param(encode_response(500, b"{}", JSON), id="internal-error"),
        pytest.param(encode_response(200, b"\xc1", MSGPACK), id="bad-msgpack-body"),
        pytest.param(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", id="http-1.0"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n", id="content-type"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: 1\r\nx: 2\r\ncontent-length: 0\r\n\r\n", id="repeated-header"),
        pytest.param(b"garbage", id="garbage"),
    ],
)
def test_checker_rejects_malformed_replies(bad: bytes) -> None:
    with pytest.raises(Failure):
        parse_responses(bad)


def test_checker_accepts_pipelined_replies() -> None:
    reply = OK_200 + encode_response(204) + encode_response(400, b"\x80", MSGPACK, keep_alive=False)
    assert [r.status for r in parse_responses(reply)] == [200, 204, 400]


def test_the_fuzzer_counts_an_error_the_server_only_logs() -> None:
    # The server's safety nets log and keep serving (a 204 went out): the sans-IO target must still see them.
    def broken(meter: Any) -> Any:
        raise RuntimeError("metrics plugin broken on purpose")

    svc = Service(new_service().routing, metrics_factory=broken)
    figures = fuzz_sans_io([http("POST", "/route", encode(route_message(), MSGPACK))], svc=svc)
    assert figures.crashes == 1
    assert "metrics plugin raised" in figures.failures[0]


# --- hypothesis: properties of the protocol and of request handling -----------------------------------------------


@FAST
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_any_bytes_get_well_formed_answers_or_a_close(svc: Service, data: bytes, cuts: list[int]) -> None:
    exchange(svc, data, cuts)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
REQUEST = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    st.sampled_from(["/route", "/complete", "/healthz", "/stats", "/v1/models", "/x"]),
    st.dictionaries(TOKEN.filter(lambda n: n not in ("content-length", "transfer-encoding", "connection")), VALUE,
                    max_size=8),
    st.binary(max_size=200),
)  # fmt: skip


@FAST
@given(st.lists(REQUEST, min_size=1, max_size=5), st.lists(st.integers(0, 3000), max_size=8))
def test_pipelined_requests_parse_back_whatever_the_cuts(
    requests: list[tuple[str, str, dict[str, str], bytes]], cuts: list[int]
) -> None:
    stream = b""
    expected = []
    for method, path, headers, body in requests:
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"content-length: {len(body)}\r\n"
        stream += (head + "\r\n").encode() + body
        expected.append(Request(method, path, {**headers, "content-length": str(len(body))}, body, True))
    conn = Connection()
    got: list[Request] = []
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    for a, b in itertools.pairwise(bounds):
        got += conn.feed(stream[a:b])
    assert got == expected


@FAST
@given(st.binary(max_size=300), st.integers(0, 60))
def test_limits_are_431_or_413_never_a_crash(data: bytes, limit: int) -> None:
    conn = Connection(max_header_bytes=limit, max_body_bytes=limit, max_headers=limit // 10)
    try:
        conn.feed(b"POST /route HTTP/1.1\r\n" + data)
    except ProtocolError as e:
        assert e.status in (400, 413, 431)
        assert (e.limit is not None) == (e.status != 400)


LEAF = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(
    max_size=20
)
NAMES = st.sampled_from(["path", "headers", "body", "id", "status", "t", "t_first", "t_end", "stream", "truncated"])
VALUES = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES | TOKEN, inner, max_size=5), max_leaves=20
)


def _encode(value: Any, fmt: str) -> bytes:
    if fmt == JSON:
        return orjson.dumps(value, default=lambda b: b.decode("latin-1"), option=orjson.OPT_NON_STR_KEYS)
    return msgpack.packb(value, use_bin_type=True)


@FAST
@given(
    st.sampled_from(["/route", "/complete"]),
    st.sampled_from([MSGPACK, JSON]),
    st.dictionaries(NAMES, VALUES, max_size=7),
)
def test_any_message_gets_an_answer(svc: Service, path: str, fmt: str, message: dict[str, Any]) -> None:
    try:
        body = _encode(message, fmt)
    except (TypeError, ValueError, OverflowError):
        return  # not representable in this format (e.g. NaN keys): nothing to send
    if len(body) > MAX_BODY_BYTES:
        return
    [reply] = parse_responses(exchange(svc, http("POST", path, body, fmt)))
    assert reply.status in (200, 204, 400)


@FAST
@given(st.sampled_from([MSGPACK, JSON]), VALUES)
def test_any_openai_body_in_a_route_gets_an_answer(svc: Service, fmt: str, value: Any) -> None:
    try:
        inner = orjson.dumps(value, default=lambda b: b.decode("latin-1"), option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return
    msg = route_message()
    msg["body"] = inner
    [reply] = parse_responses(exchange(svc, http("POST", "/route", _encode(msg, fmt), fmt)))
    assert reply.status == 200  # the filter's answer; a bad client body travels inside it as a 400 `respond`


# --- what the fuzzer found (regressions) --------------------------------------------------------------------------

DEEP = [
    pytest.param(b"\x91" * 1500 + b"\xc0", MSGPACK, id="msgpack-unknown-field"),
    pytest.param(b"[" * 1500 + b"]" * 1500, JSON, id="json-unknown-field"),
]


@pytest.mark.parametrize(("deep", "fmt"), DEEP)
def test_deep_nesting_is_a_400_not_a_500(svc: Service, deep: bytes, fmt: str) -> None:
    # msgspec raises RecursionError past ~1000 levels, even in fields it skips: it escaped as a 500 before #13.
    if fmt == MSGPACK:
        body = b"\x84" + msgpack.packb(route_message())[1:] + msgpack.packb("x") + deep
    else:
        body = encode(route_message(), JSON)[:-1] + b',"x":' + deep + b"}"
    before = svc.stats.limits["message_depth"]
    [reply] = parse_responses(exchange(svc, http("POST", "/route", body, fmt)))
    assert reply.status == 400
    assert b"is nested too deeply" in reply.body
    assert svc.stats.limits["message_depth"] == before + 1


def test_deep_nesting_in_the_openai_body_is_a_client_400(svc: Service) -> None:
    msg = route_message()
    msg["body"] = b'{"messages":' + b"[" * 1500 + b"]" * 1500 + b',"model":"gpt-4o-mini"}'
    [reply] = parse_responses(exchange(svc, http("POST", "/route", msgpack.packb(msg), MSGPACK)))
    answer = msgpack.unpackb(reply.body)
    assert answer["respond"]["status"] == 400
    assert orjson.loads(answer["respond"]["body"])["error"]["message"] == "request body is nested too deeply"


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(http("GET", "/healthz", extra="connection: close\r\n"), id="connection-close"),
        pytest.param(b"GET /healthz HTTP/1.0\r\n\r\n", id="http-1.0"),
    ],
)
def test_nothing_is_answered_after_a_closing_request(svc: Service, live: LiveServer, first: bytes) -> None:
    # Found by the fuzzer: bytes after a `connection: close` request in the same read made llhttp fail, and the
    # server wrote a 400 after its `connection: close` answer.
    data = first + http("GET", "/stats")
    for reply in (exchange(svc, data), exchange_socket(live.socket, data)[0]):
        [only] = parse_responses(reply)
        assert only.status == 200 and only.headers["connection"] == "close"


def test_a_half_closed_connection_still_gets_its_async_answers(live: LiveServer) -> None:
    # Found by the fuzzer (socket target, async router): on the client's half-close the transport closed at once
    # and the answers still being computed were lost.
    slow = http("POST", "/route", encode(route_message(headers={"x-sleep-ms": "50"}), MSGPACK))
    reply, closed = exchange_socket(live.socket, slow + http("GET", "/healthz") + slow)
    assert closed
    answers = parse_responses(reply)
    assert [a.status for a in answers] == [200, 200, 200]
    assert msgpack.unpackb(answers[0].body)["set"]["x-ai-eg-selected-route"] == "gpt"


# --- the seeded mutation fuzzer -----------------------------------------------------------------------------------


def test_seeded_fuzz_sans_io() -> None:
    figures = fuzz_sans_io(generate(seed=13, n=20_000), seed=13)
    assert figures.failures == [] and figures.crashes == 0 and figures.hangs == 0
    assert figures.inputs == 20_000
    # the inputs reach every outcome, and every limit a request can hit
    assert {200, 204, 400, 404, 405, 413, 415, 431} <= set(figures.statuses)
    assert {"body_bytes", "header_bytes", "headers", "message_depth", "message_length"} <= set(figures.limits)


def test_seeded_fuzz_real_server(live: LiveServer) -> None:
    figures = fuzz_socket(live, generate(seed=14, n=1_000))
    assert figures.failures == [] and figures.crashes == 0 and figures.hangs == 0
    assert figures.inputs == 1_000
    assert {200, 204, 400, 413, 431} <= set(figures.statuses)
    reply, _ = exchange_socket(live.socket, http("GET", "/stats"))
    [stats] = parse_responses(reply)
    limits = orjson.loads(stats.body)["limits"]
    assert limits["body_bytes"] > 0 and limits.get("header_bytes", 0) + limits.get("headers", 0) > 0
    assert live.proc.poll() is None


def test_completions_reach_the_metrics(svc: Service) -> None:
    # The fuzzed completions name FUZZ_ID, which exchange() keeps in flight: the usage path is exercised too.
    reply = exchange(svc, http("POST", "/complete", msgpack.packb({"id": FUZZ_ID, "status": 200}), MSGPACK))
    assert parse_responses(reply)[0].status == 204
    assert svc.stats.requests["complete", "ok"] >= 1
