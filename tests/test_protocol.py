"""The sans-IO wire protocol: HTTP/1.1 framing (one table of byte vectors, fed whole, byte by byte and pipelined),
limits, malformed input, response encoding, body codecs, and the byte-exact examples of ``docs/protocol.md``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from ipc_router.filterapi import parse_config
from ipc_router.protocol import (
    JSON,
    MSGPACK,
    BadMessage,
    Connection,
    ProtocolError,
    Request,
    decode_body,
    encode_body,
    encode_response,
)
from ipc_router.router import Routing
from ipc_router.service import Response, Service

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def req(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"", keep_alive: bool = True
) -> Request:
    return Request(method, path, headers or {}, body, keep_alive)


ROUTE_BODY = msgpack.packb(
    {"path": "/v1/chat/completions", "headers": {"x-a": "1"}, "body": b'{"model":"m"}'}, use_bin_type=True
)
BINARY_BODY = bytes(range(256)) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"


@dataclass(frozen=True)
class Vector:
    id: str
    data: bytes
    expected: list[Request]


# One table: request bytes → the requests they parse to.
VECTORS = [
    Vector(
        "get",
        b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n",
        [req("GET", "/healthz", {"host": "sidecar"})],
    ),
    Vector("get-no-headers", b"GET /stats HTTP/1.1\r\n\r\n", [req("GET", "/stats")]),
    Vector(
        "query-string-stripped",
        b"GET /v1/models?limit=10&after=x HTTP/1.1\r\n\r\n",
        [req("GET", "/v1/models")],
    ),
    Vector("empty-query-string-stripped", b"GET /healthz? HTTP/1.1\r\n\r\n", [req("GET", "/healthz")]),
    Vector(
        "post-msgpack",
        b"POST /route HTTP/1.1\r\ncontent-type: application/msgpack\r\ncontent-length: %d\r\n\r\n%s"
        % (len(ROUTE_BODY), ROUTE_BODY),
        [
            req(
                "POST",
                "/route",
                {"content-type": "application/msgpack", "content-length": str(len(ROUTE_BODY))},
                ROUTE_BODY,
            )
        ],
    ),
    Vector(
        "post-binary-body-with-crlf",
        b"POST /complete HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(BINARY_BODY), BINARY_BODY),
        [req("POST", "/complete", {"content-length": str(len(BINARY_BODY))}, BINARY_BODY)],
    ),
    Vector(
        "post-empty-body",
        b"POST /route HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        [req("POST", "/route", {"content-length": "0"})],
    ),
    Vector(
        "header-names-lower-cased-values-kept",
        b"GET /healthz HTTP/1.1\r\nX-Team-ID: Blue\r\nCONTENT-TYPE: Application/JSON\r\n\r\n",
        [req("GET", "/healthz", {"x-team-id": "Blue", "content-type": "Application/JSON"})],
    ),
    Vector(
        "leading-whitespace-of-value-dropped",
        b"GET /healthz HTTP/1.1\r\nx-a:    spaced\r\nx-b:v\r\n\r\n",
        [req("GET", "/healthz", {"x-a": "spaced", "x-b": "v"})],
    ),
    Vector(
        "repeated-headers-joined",
        b"GET /healthz HTTP/1.1\r\nx-a: 1\r\nx-b: b\r\nX-A: 2\r\nx-a: 3\r\n\r\n",
        [req("GET", "/healthz", {"x-a": "1,2,3", "x-b": "b"})],
    ),
    Vector(
        "chunked",
        b"POST /route HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        [req("POST", "/route", {"transfer-encoding": "chunked"}, b"hello world")],
    ),
    Vector(
        "chunked-hex-sizes-and-extension",
        b"POST /route HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"a;name=value\r\n0123456789\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n",
        [req("POST", "/route", {"transfer-encoding": "chunked"}, b"0123456789" + b"z" * 26)],
    ),
    Vector(
        "chunked-empty",
        b"POST /complete HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        [req("POST", "/complete", {"transfer-encoding": "chunked"})],
    ),
    Vector(
        "connection-keep-alive-explicit",
        b"GET /healthz HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
        [req("GET", "/healthz", {"connection": "keep-alive"})],
    ),
    Vector(
        "connection-close",
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        [req("GET", "/healthz", {"connection": "close"}, keep_alive=False)],
    ),
    Vector("http-1.0", b"GET /healthz HTTP/1.0\r\n\r\n", [req("GET", "/healthz", keep_alive=False)]),
    Vector(
        "http-1.0-keep-alive",
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [req("GET", "/healthz", {"connection": "keep-alive"})],
    ),
    Vector(
        "pipelined-pair",
        b"POST /route HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /healthz?x HTTP/1.1\r\nx-n: 2\r\n\r\n",
        [req("POST", "/route", {"content-length": "3"}, b"abc"), req("GET", "/healthz", {"x-n": "2"})],
    ),
    Vector(
        "pipelined-chunked-then-content-length",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
        b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nzw"
        b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n",
        [
            req("POST", "/a", {"transfer-encoding": "chunked"}, b"xy"),
            req("POST", "/b", {"content-length": "2"}, b"zw"),
            req("GET", "/c", {"connection": "close"}, keep_alive=False),
        ],
    ),
]

NEXT = b"POST /complete HTTP/1.1\r\nContent-Length: 4\r\nx-next: 1\r\n\r\nnext"
NEXT_REQUEST = req("POST", "/complete", {"content-length": "4", "x-next": "1"}, b"next")


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.id)
def test_vector_fed_whole(v: Vector) -> None:
    assert Connection().feed(v.data) == v.expected


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.id)
def test_vector_fed_byte_by_byte(v: Vector) -> None:
    conn = Connection()
    got: list[Request] = []
    for i in range(len(v.data)):
        got += conn.feed(v.data[i : i + 1])
    assert got == v.expected


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.id)
def test_vector_split_at_every_offset(v: Vector) -> None:
    for cut in range(len(v.data) + 1):
        conn = Connection()
        got = conn.feed(v.data[:cut]) + conn.feed(v.data[cut:])
        assert got == v.expected, cut


@pytest.mark.parametrize("v", [v for v in VECTORS if v.expected[-1].keep_alive], ids=lambda v: v.id)
def test_vector_with_the_start_of_a_pipelined_request(v: Vector) -> None:
    # The vector plus part of the next request: the vector's requests come out, the next one waits for its rest.
    for cut in (1, 10, len(NEXT) - 1):
        conn = Connection()
        assert conn.feed(v.data + NEXT[:cut]) == v.expected
        assert conn.feed(NEXT[cut:]) == [NEXT_REQUEST]


@pytest.mark.parametrize("v", [v for v in VECTORS if v.expected[-1].keep_alive], ids=lambda v: v.id)
def test_vector_twice_on_one_connection(v: Vector) -> None:
    conn = Connection()
    assert conn.feed(v.data * 2) == v.expected * 2
    assert conn.feed(v.data) == v.expected


def test_request_objects_do_not_share_headers() -> None:
    a, b = Connection().feed(b"GET /a HTTP/1.1\r\nx: 1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert a.headers == {"x": "1"}
    assert b.headers == {}


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, MSGPACK),
        ("application/msgpack", MSGPACK),
        ("application/json", JSON),
        ("Application/JSON; charset=utf-8", JSON),
        ("  application/json  ", JSON),
        ("text/plain", "text/plain"),
    ],
)
def test_request_content_type(content_type: str | None, expected: str) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    assert req("POST", "/route", headers).content_type == expected


# --- malformed input, limits ------------------------------------------------------------------------------------

GOOD = b"GET /healthz HTTP/1.1\r\n\r\n"
GOOD_REQUEST = req("GET", "/healthz")

MALFORMED = [
    pytest.param(b"BREW /coffee HTTP/1.1\r\n\r\n", "Invalid method", id="bad-method"),
    pytest.param(b"GET /healthz HTTP/7.0\r\n\r\n", "Invalid HTTP version", id="bad-version"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n", "Invalid header token", id="header-without-colon"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nx: a\x00b\r\n\r\n", "Invalid header value char", id="nul-in-value"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n folded: x\r\n\r\n", "", id="leading-space"),
    pytest.param(b"GET /healthz HTTP/1.1\nHost: x\n\n", "", id="bare-lf"),
    pytest.param(b"POST /route HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", "Duplicate", id="dup-cl"),
    pytest.param(b"POST /route HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "Content-Length", id="negative-cl"),
    pytest.param(
        b"POST /route HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding",
        id="cl-and-te",
    ),
    pytest.param(
        b"POST /route HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size", id="bad-chunk-size"
    ),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "", id="tls-client-hello"),
]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_malformed_input_is_400_with_earlier_requests_completed(bad: bytes, message: str) -> None:
    conn = Connection()
    with pytest.raises(ProtocolError) as info:
        conn.feed(GOOD + GOOD + bad)
    e = info.value
    assert e.status == 400
    assert e.message.startswith("malformed HTTP request")
    assert message in e.message
    assert e.completed == [GOOD_REQUEST, GOOD_REQUEST]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_malformed_input_byte_by_byte(bad: bytes, message: str) -> None:
    # Requests completed by earlier feeds were returned then; ``completed`` only holds those of the failing call.
    conn = Connection()
    got: list[Request] = []
    data = GOOD + bad
    with pytest.raises(ProtocolError) as info:
        for i in range(len(data)):
            got += conn.feed(data[i : i + 1])
    assert info.value.status == 400
    assert got + info.value.completed == [GOOD_REQUEST]


def test_data_after_connection_close_is_400() -> None:
    with pytest.raises(ProtocolError) as info:
        Connection().feed(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n" + GOOD)
    assert info.value.status == 400
    assert "Connection: close" in info.value.message
    assert info.value.completed == [req("GET", "/a", {"connection": "close"}, keep_alive=False)]


def test_error_is_sticky() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError):
        conn.feed(b"BREW / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError) as again:
        conn.feed(GOOD)
    assert again.value.status == 400


def test_error_raised_again_completes_nothing_again() -> None:
    # Regression (fixed in d7e6400): the stored error was re-raised with the previous call's ``completed``.
    conn = Connection()
    with pytest.raises(ProtocolError) as first:
        conn.feed(GOOD + b"BREW / HTTP/1.1\r\n\r\n")
    assert first.value.completed == [GOOD_REQUEST]
    with pytest.raises(ProtocolError) as again:
        conn.feed(GOOD)
    assert again.value.completed == []


def head_bytes(url: bytes, name: bytes, value: bytes) -> int:
    return len(url) + len(name) + len(value)


def test_header_limit_boundary() -> None:
    url, name, value = b"/healthz", b"x-big", b"v" * 100
    limit = head_bytes(url, name, value)
    data = b"GET %s HTTP/1.1\r\n%s: %s\r\n\r\n" % (url, name, value)
    assert Connection(max_header_bytes=limit).feed(data) == [req("GET", "/healthz", {"x-big": "v" * 100})]
    with pytest.raises(ProtocolError) as info:
        Connection(max_header_bytes=limit - 1).feed(data)
    assert info.value.status == 431
    assert str(limit - 1) in info.value.message


def test_header_limit_counts_all_headers_and_is_431_with_earlier_requests() -> None:
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 50) for i in range(40))
    conn = Connection(max_header_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        conn.feed(GOOD + b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
    assert info.value.status == 431
    assert info.value.completed == [GOOD_REQUEST]


def test_header_limit_on_a_long_url_fed_byte_by_byte() -> None:
    conn = Connection(max_header_bytes=64)
    data = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n"
    with pytest.raises(ProtocolError) as info:
        for i in range(len(data)):
            conn.feed(data[i : i + 1])
    assert info.value.status == 431


def test_default_header_limit_is_64_kib() -> None:
    ok = b"GET /healthz HTTP/1.1\r\nx: " + b"v" * (64 * 1024 - 20) + b"\r\n\r\n"
    assert len(Connection().feed(ok)) == 1
    too_big = b"GET /healthz HTTP/1.1\r\nx: " + b"v" * (64 * 1024) + b"\r\n\r\n"
    with pytest.raises(ProtocolError) as info:
        Connection().feed(too_big)
    assert info.value.status == 431


def test_content_length_over_limit_is_413_before_the_body_arrives() -> None:
    conn = Connection(max_body_bytes=100)
    with pytest.raises(ProtocolError) as info:
        conn.feed(GOOD + b"POST /route HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
    assert info.value.status == 413
    assert "101" in info.value.message
    assert info.value.completed == [GOOD_REQUEST]


def test_content_length_at_limit_is_accepted() -> None:
    data = b"POST /route HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"b" * 100
    assert Connection(max_body_bytes=100).feed(data)[0].body == b"b" * 100


def test_chunked_body_over_limit_is_413() -> None:
    conn = Connection(max_body_bytes=100)
    head = b"POST /route HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert conn.feed(head + b"32\r\n" + b"a" * 50 + b"\r\n") == []
    assert conn.feed(b"32\r\n" + b"a" * 50 + b"\r\n") == []  # 100 bytes: still fine
    with pytest.raises(ProtocolError) as info:
        conn.feed(b"1\r\na\r\n0\r\n\r\n")
    assert info.value.status == 413


def test_chunked_body_at_limit_is_accepted() -> None:
    data = b"POST /route HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"a" * 100 + b"\r\n0\r\n\r\n"
    assert Connection(max_body_bytes=100).feed(data)[0].body == b"a" * 100


UPGRADES = [
    pytest.param(b"GET /healthz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", id="websocket"),
    pytest.param(b"GET /route HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n", id="h2c"),
    pytest.param(b"CONNECT sidecar:443 HTTP/1.1\r\nHost: sidecar:443\r\n\r\n", id="connect"),
]


@pytest.mark.parametrize("data", UPGRADES)
def test_upgrade_is_400(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        Connection().feed(GOOD + data)
    assert info.value.status == 400
    assert info.value.message == "protocol upgrade is not supported"
    assert info.value.completed[0] == GOOD_REQUEST


@pytest.mark.parametrize("data", UPGRADES)
def test_upgrade_request_itself_is_not_completed(data: bytes) -> None:
    # Regression (fixed in d7e6400): llhttp completes the upgrade request before raising HttpParserUpgrade.
    with pytest.raises(ProtocolError) as info:
        Connection().feed(GOOD + data)
    assert info.value.completed == [GOOD_REQUEST]


# --- encode_response ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            (200, b"\x81\xa1a\x01"),
            b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: 4\r\n\r\n\x81\xa1a\x01",
        ),
        (
            (200, b'{"status":"ok"}', JSON),
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}',
        ),
        ((200,), b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: 0\r\n\r\n"),
        ((204,), b"HTTP/1.1 204 No Content\r\n\r\n"),
        ((204, b"ignored", JSON), b"HTTP/1.1 204 No Content\r\n\r\n"),
        ((204, b"", MSGPACK, False), b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"),
        (
            (200, b"{}", JSON, False),
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        ),
        (
            (400, b'{"error":"x"}', JSON, False),
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 13\r\n"
            b'connection: close\r\n\r\n{"error":"x"}',
        ),
        ((404, b""), b"HTTP/1.1 404 Not Found\r\ncontent-type: application/msgpack\r\ncontent-length: 0\r\n\r\n"),
        (
            (405, b"", JSON),
            b"HTTP/1.1 405 Method Not Allowed\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            (413, b"", JSON, False),
            b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\ncontent-length: 0\r\n"
            b"connection: close\r\n\r\n",
        ),
        (
            (431, b"", JSON, False),
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: 0\r\n"
            b"connection: close\r\n\r\n",
        ),
        (
            (415, b""),
            b"HTTP/1.1 415 Unsupported Media Type\r\ncontent-type: application/msgpack\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            (500, b""),
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/msgpack\r\ncontent-length: 0\r\n\r\n",
        ),
    ],
)
def test_encode_response_exact_bytes(args: tuple[Any, ...], expected: bytes) -> None:
    assert encode_response(*args) == expected


def test_encode_response_content_length_counts_bytes() -> None:
    body = "é".encode() * 1000
    out = encode_response(200, body)
    assert b"content-length: 2000\r\n" in out
    assert out.endswith(b"\r\n\r\n" + body)


# --- body codecs --------------------------------------------------------------------------------------------------

MESSAGES = [
    {},
    {"id": "abc", "status": 200, "stream": True, "truncated": False, "t": 2**62},
    {"path": "/v1/chat/completions", "headers": {"a": "1", "b": "ü"}, "body": "text", "n": None},
    {"nested": {"list": [1, -2, 3.5, "x", [True, None]], "big": 2**63 - 1, "neg": -(2**63)}},
]


@pytest.mark.parametrize("fmt", [MSGPACK, JSON])
@pytest.mark.parametrize("message", MESSAGES)
def test_body_round_trip(fmt: str, message: dict[str, Any]) -> None:
    assert decode_body(encode_body(message, fmt), fmt) == message


def test_msgpack_keeps_bytes_as_bin() -> None:
    message = {"body": b"\x00\xff raw", "headers": {"k": "v"}}
    encoded = encode_body(message, MSGPACK)
    assert b"\xc4\x06\x00\xff raw" in encoded  # bin 8
    assert decode_body(encoded, MSGPACK) == message
    assert encoded == msgpack.packb(message, use_bin_type=True)


def test_json_encodes_bytes_as_text() -> None:
    encoded = encode_body({"body": b'{"error":"x"}', "bad": b"\xff"}, JSON)
    assert orjson.loads(encoded) == {"body": '{"error":"x"}', "bad": "\ufffd"}


def test_json_cannot_encode_arbitrary_objects() -> None:
    with pytest.raises(TypeError):
        encode_body({"x": object()}, JSON)


def test_decode_body_accepts_msgpack_str_as_text() -> None:
    assert decode_body(msgpack.packb({"body": "s"}, use_bin_type=False), MSGPACK) == {"body": "s"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x82\xa1a", id="truncated-map"),
        pytest.param(b"\x81\xa1a\x01\x02", id="extra-data"),
        pytest.param(b"\xd9\x05ab", id="truncated-str"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8-str"),
    ],
)
def test_bad_msgpack_is_bad_message(body: bytes) -> None:
    with pytest.raises(BadMessage, match="not valid msgpack"):
        decode_body(body, MSGPACK)


@pytest.mark.parametrize("body", [b"", b"{", b"{'a': 1}", b'{"a":1} x', b"\xff", b"NaN"])
def test_bad_json_is_bad_message(body: bytes) -> None:
    with pytest.raises(BadMessage, match="not valid JSON"):
        decode_body(body, JSON)


def test_unsupported_content_type_is_bad_message() -> None:
    with pytest.raises(BadMessage, match="unsupported content-type 'text/plain'"):
        decode_body(b"x", "text/plain")


def test_bad_message_is_a_value_error() -> None:
    assert issubclass(BadMessage, ValueError)


# --- the byte-exact examples of docs/protocol.md --------------------------------------------------------------------

_BLOCK = re.compile(
    r"<!-- byte-exact: (?P<name>[\w-]+) (?P<part>[\w-]+) -->\s*```(?P<lang>\w+)\n(?P<text>.*?)```", re.S
)


def doc_examples() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for m in _BLOCK.finditer(DOC.read_text()):
        key = (m["name"], m["part"])
        assert key not in out, f"duplicate byte-exact block {key}"
        text = m["text"]
        out[key] = text if m["lang"] == "yaml" else ast.literal_eval("(\n" + text + "\n)")
    return out


EXAMPLES = doc_examples()
PINNED_ID_PREFIX = "1f2e-67f0a1b2-"


def test_doc_has_the_byte_exact_examples() -> None:
    assert set(EXAMPLES) == {
        ("config", "yaml"),
        ("route", "request"),
        ("route", "response"),
        ("complete", "request"),
        ("complete", "response"),
        ("missing-field", "request"),
        ("missing-field", "response"),
        ("bad-framing", "request"),
        ("bad-framing", "response"),
    }
    for key, value in EXAMPLES.items():
        if key[0] != "config":
            assert isinstance(value, bytes), key


def doc_service() -> Service:
    service = Service(Routing(parse_config(EXAMPLES["config", "yaml"])))
    service.ledger._id_prefix = PINNED_ID_PREFIX  # the one nondeterministic part of an answer: pid and start time
    return service


def exchange(service: Service, conn: Connection, data: bytes) -> tuple[bytes, Response]:
    """What the server does with the bytes: parse, handle, encode (sync answers only)."""
    (request,) = conn.feed(data)
    resp = service.handle(request)
    assert isinstance(resp, Response)
    return encode_response(resp.status, resp.body, resp.content_type, request.keep_alive), resp


def test_doc_example_bodies_decode_as_commented() -> None:
    route = EXAMPLES["route", "request"].split(b"\r\n\r\n", 1)[1]
    assert msgpack.unpackb(route) == {
        "path": "/v1/chat/completions",
        "headers": {"content-type": "application/json"},
        "body": b'{"model":"gpt-4o-mini"}',
    }
    answer = msgpack.unpackb(EXAMPLES["route", "response"].split(b"\r\n\r\n", 1)[1])
    assert answer == {
        "set": {
            "x-ai-eg-model": "gpt-4o-mini",
            "x-ai-eg-selected-route": "gpt",
            "x-ai-eg-original-path": "/v1/chat/completions",
            "x-ai-eg-selected-backend": "openai",
            "x-ai-eg-selected-cluster": "backend_openai",
        },
        "id": PINNED_ID_PREFIX + "1",
    }
    complete = msgpack.unpackb(EXAMPLES["complete", "request"].split(b"\r\n\r\n", 1)[1])
    assert complete["id"] == answer["id"]
    assert complete["status"] == 200


def test_doc_examples_exchange_byte_exact() -> None:
    service, conn = doc_service(), Connection()
    out, _ = exchange(service, conn, EXAMPLES["route", "request"])
    assert out == EXAMPLES["route", "response"]
    assert len(service.in_flight) == 1

    out, resp = exchange(service, conn, EXAMPLES["complete", "request"])
    assert out == EXAMPLES["complete", "response"]
    assert resp.after is not None
    resp.after()
    assert service.in_flight == {}
    assert service.stats.unknown_completions == 0
    assert service.stats.usage_missing == 0

    out, _ = exchange(service, conn, EXAMPLES["missing-field", "request"])
    assert out == EXAMPLES["missing-field", "response"]
    assert service.snapshot()["requests"] == {
        "route": {"routed_by_router": 1, "bad_request": 1},
        "complete": {"ok": 1},
    }


def test_doc_examples_fed_byte_by_byte_as_one_stream() -> None:
    stream = EXAMPLES["route", "request"] + EXAMPLES["complete", "request"] + EXAMPLES["missing-field", "request"]
    conn = Connection()
    requests: list[Request] = []
    for i in range(len(stream)):
        requests += conn.feed(stream[i : i + 1])
    assert [(r.method, r.path) for r in requests] == [("POST", "/route"), ("POST", "/complete"), ("POST", "/route")]


def test_doc_example_bad_framing() -> None:
    # The server answers a ProtocolError with its message as JSON and closes: see test_server for the real socket.
    with pytest.raises(ProtocolError) as info:
        Connection().feed(EXAMPLES["bad-framing", "request"])
    e = info.value
    assert e.status == 400
    answer = encode_response(e.status, orjson.dumps({"error": e.message}), JSON, keep_alive=False)
    assert answer == EXAMPLES["bad-framing", "response"]
