"""Unit tests for ipc_router/lua/ipc_router.lua (msgpack decoder and filter logic), run under lupa.

The filter has no general msgpack encoder: what it writes is decoded here in Python (msgpack) and compared with
what msgpack-python writes for the same value (``canonical``).

The Envoy handle is faked here (tests/support/lua_harness.py); end-to-end tests with a real Envoy live
elsewhere.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
import time
from typing import Any

import msgpack
import pytest

from tests.support.lua_harness import LUPA, MODULE_PATH, ROOT, Lua, py, seq


@pytest.fixture(scope="module")
def lua() -> Lua:
    return Lua()


def test_runtime_is_luajit_with_ffi(lua: Lua) -> None:
    if not LUPA.__name__.startswith("lupa.luajit"):
        pytest.skip(f"lupa has no LuaJIT runtime here ({LUPA.__name__})")
    assert lua.rt.execute(b"return jit ~= nil and pcall(require, 'ffi')") is True


# --------------------------------------------------------------------------------------------- codec

INT_BOUNDARIES = [
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32 - 1,
    2**32,
    2**53 - 1,
    2**53,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    -(2**31),
    -(2**31) - 1,
    -(2**53),
]
FLOATS = [
    0.5,
    -2.25,
    0.1,
    1e300,
    -1e-300,
    5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    123456.789,
    float("inf"),
    float("-inf"),
]
SIZES = [0, 1, 31, 32, 255, 256, 65535, 65536]


def norm(v: Any) -> Any:
    """What a Python value looks like after msgpack -> Lua -> lua_harness.py()."""
    if isinstance(v, dict):
        return {norm(k): norm(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return {i: norm(x) for i, x in enumerate(v, 1) if x is not None}
    if isinstance(v, str):
        return v.encode()
    return v


def lua_decode(lua: Lua, data: bytes) -> Any:
    return lua.M.msgpack_decode(data)


@pytest.mark.parametrize("value", INT_BOUNDARIES + FLOATS + [None, True, False], ids=repr)
def test_scalar_decoding(lua: Lua, value: Any) -> None:
    got = lua_decode(lua, msgpack.packb(value))
    assert got == value
    if value is None or isinstance(value, bool):
        assert got is value


@pytest.mark.parametrize("n", SIZES)
def test_str_and_bin_lengths(lua: Lua, n: int) -> None:
    text = ("abcdefgh" * (n // 8 + 1))[:n]
    blob = bytes(random.Random(n).randrange(256) for _ in range(n))
    # str and bin both become Lua strings.
    assert lua_decode(lua, msgpack.packb(text)) == text.encode()
    assert lua_decode(lua, msgpack.packb(blob, use_bin_type=True)) == blob
    # Old-spec raw (str8 absent) too.
    assert lua_decode(lua, msgpack.packb(blob, use_bin_type=False)) == blob


NESTED = [
    {},
    [],
    {"a": 1},
    [1, "two", b"three", 4.5, True, False],
    {"headers": {"content-type": "application/json", "x-a": "b"}, "body": b"\x00\xff", "n": -5},
    {"deep": [[[[{"x": [1, 2, {"y": b"z"}]}]]]]},
    {f"k{i}": i for i in range(15)},  # fixmap max
    {f"k{i}": i for i in range(16)},  # map16
    {f"k{i}": i for i in range(300)},
    list(range(15)),  # fixarray max
    list(range(16)),  # array16
    list(range(300)),
    list(range(70000)),  # array32
    {f"k{i}": b"v" for i in range(70000)},  # map32
]


@pytest.mark.parametrize("value", NESTED, ids=lambda v: f"{type(v).__name__}{len(v)}")
def test_nested_decoding(lua: Lua, value: Any) -> None:
    assert py(lua_decode(lua, msgpack.packb(value, use_bin_type=True))) == norm(value)


def test_large_ints_from_python(lua: Lua) -> None:
    # Beyond 2^53 a Lua number is the nearest double.
    assert lua_decode(lua, msgpack.packb(2**64 - 1)) == float(2**64)
    assert lua_decode(lua, msgpack.packb(2**63)) == 2**63
    assert lua_decode(lua, msgpack.packb(-(2**63))) == -(2**63)


def test_special_floats(lua: Lua) -> None:
    assert math.isnan(lua_decode(lua, msgpack.packb(float("nan"))))
    # lupa turns an integral double into a Python int, so look at the sign inside Lua.
    is_neg_zero = lua.rt.execute(
        b"local v = require('ipc_router').msgpack_decode(...); return v == 0 and 1 / v < 0", msgpack.packb(-0.0)
    )
    assert is_neg_zero is True


@pytest.mark.parametrize("value", [0.5, -2.25, 0.1, 3.4e38, 1e-45, 1.2e-38, float("inf"), -0.0])
def test_float32_decoding(lua: Lua, value: float) -> None:
    expected = struct.unpack(">f", struct.pack(">f", value))[0]
    got = lua_decode(lua, msgpack.packb(value, use_single_float=True))
    assert got == expected


def test_random_floats_decoding(lua: Lua) -> None:
    rnd = random.Random(7)
    values = [struct.unpack(">d", rnd.randbytes(8))[0] for _ in range(300)]
    values = [v for v in values if not math.isnan(v)]
    assert seq(lua_decode(lua, msgpack.packb(values))) == values


TRUNCATION_SAMPLES = [
    {"a": [1, 2**40, -(2**40), 1.5, b"bin", "str" * 20, None, True], "m": {"x": {"y": "z"}}},
    [b"x" * 300, "y" * 70000],
    list(range(20)),
    {f"k{i}": i for i in range(20)},
    -(2**31) - 1,
    2**32,
    1.5,
]


@pytest.mark.parametrize("value", TRUNCATION_SAMPLES, ids=lambda v: type(v).__name__)
def test_truncated_input_is_an_error(lua: Lua, value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True, use_single_float=False)
    cuts = range(len(data)) if len(data) < 2000 else [*range(400), *range(len(data) - 400, len(data))]
    for cut in cuts:
        got, err = lua_decode(lua, data[:cut])
        assert got is None and isinstance(err, bytes), (cut, got)
    assert py(lua_decode(lua, data)) == norm(value)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(msgpack.ExtType(1, b"x")),  # fixext1
        msgpack.packb(msgpack.ExtType(1, b"xx")),  # fixext2
        msgpack.packb(msgpack.ExtType(1, b"x" * 4)),
        msgpack.packb(msgpack.ExtType(1, b"x" * 8)),
        msgpack.packb(msgpack.ExtType(1, b"x" * 16)),
        msgpack.packb(msgpack.ExtType(1, b"x" * 3)),  # ext8
        msgpack.packb(msgpack.ExtType(1, b"x" * 300)),  # ext16
        msgpack.packb({"a": [msgpack.ExtType(5, b"")]}),
        b"\xc1",
        b"",
        msgpack.packb(1) + b"\x00",  # trailing bytes
        msgpack.packb({"a": 1}) + msgpack.packb({"b": 2}),
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4G elements
        b"\x81\xc0\x01",  # nil map key
        b"\x91" * 100 + b"\x00",  # nesting too deep
    ],
)
def test_invalid_input_is_an_error(lua: Lua, data: bytes) -> None:
    got, err = lua_decode(lua, data)
    assert got is None and isinstance(err, bytes) and err


def test_decode_rejects_non_string(lua: Lua) -> None:
    got, err = lua.M.msgpack_decode(None)
    assert got is None and err


# ------------------------------------------------------------------------------------------- config


def test_new_defaults(lua: Lua) -> None:
    f = lua.filter()
    conf = py(f.conf)
    assert conf == {
        b"cluster": b"ipc_router_sidecar",
        b"authority": b"ipc-router",
        b"timeout_ms": 250,
        b"complete_timeout_ms": 2000,
        b"failure_mode": b"fail_closed",
        b"route_header": b"x-ai-eg-selected-route",
        b"backend_header": b"x-ai-eg-selected-backend",
        b"cluster_header": b"x-ai-eg-selected-cluster",
        b"served_header": b"x-ai-eg-served-backend",
        b"max_response_body": 1048576,
        b"stream_tail_bytes": 16384,
        b"pending_timeout_s": 600,
        b"token_header": b"x-ipc-router-rec",
    }
    assert py(f.paths) == {b"/v1/chat/completions": True}


@pytest.mark.parametrize(
    "conf",
    [
        {"failure_mode": "fail_open"},
        {"failure_mode": "sometimes"},
        {"timeout_ms": 0},
        {"timeout_ms": 1.5},
        {"cluster": ""},
        {"llm_paths": "/v1/chat/completions"},
        {"max_response_body": -1},
        {"no_such_key": 1},
        {"pending_timeout_s": 0},
        {"pending_timeout_s": "600"},
        {"budget_headers": "x-user-id"},
        {"budget_headers": [""]},
    ],
)
def test_new_rejects_bad_conf(lua: Lua, conf: dict[str, Any]) -> None:
    with pytest.raises(LUPA.LuaError):
        lua.filter(**conf)


def test_new_conf_from_lua_literal(lua: Lua) -> None:
    f = lua.rt.execute(b"""
        return require("ipc_router").new({ failure_mode = "fail_open", fallback_route = "fb",
            llm_paths = { "/v1/chat/completions", "/v1/completions" }, route_header = "X-Route" })
    """)
    assert py(f.paths) == {b"/v1/chat/completions": True, b"/v1/completions": True}
    assert f.conf.route_header == b"x-route"


# ------------------------------------------------------------------------------------ request phase

CHAT = "/v1/chat/completions"
BASE_HEADERS = {
    ":path": CHAT,
    ":method": "POST",
    ":authority": "gw",
    "content-type": "application/json",
    "x-request-id": "req-1",
}


def route_answer(**answer: Any) -> dict[str, Any]:
    return {
        "status": 200,
        "body": msgpack.packb(answer, use_bin_type=True),
        "headers": {"content-type": "application/msgpack"},
    }


SET_ANSWER = route_answer(set={"x-ai-eg-selected-route": "r1", "x-ai-eg-model": "gpt"}, id="rid-9")


def test_fake_handle_kills_wrappers_across_yields(lua: Lua) -> None:
    """The fake enforces Envoy's rule; the filter passing the other tests relies on re-fetching."""
    rec = lua.rt.execute(
        b"""
        local H = ...
        local h = H.make({ headers = { a = "1" }, body = "x" })
        local hd = h:headers()
        h:body()
        return pcall(hd.get, hd, "a")
    """,
        lua.H,
    )
    assert rec[0] is False and b"outside of proper scope" in rec[1]


def test_non_llm_path_passes_through_with_route_headers_stripped(lua: Lua) -> None:
    headers = {
        ":path": "/v1/models",
        ":method": "GET",
        "x-ai-eg-selected-route": "evil",
        "x-ai-eg-selected-backend": "evil-backend",
        "x-other": "kept",
    }
    rec = py(lua.run(lua.filter(), "on_request", headers=headers, body="ignored"))
    assert rec[b"ok"] and rec[b"status"] == b"dead"
    assert rec[b"store"] == {b":path": b"/v1/models", b":method": b"GET", b"x-other": b"kept"}
    assert rec[b"n_http"] == 0 and rec[b"body_calls"] == 0 and rec[b"cleared"] == 0
    assert not rec[b"responded"] and rec[b"metadata"] == {}


@pytest.mark.parametrize("path", ["/v1/chat/completionsX", "/v1/chat", "/V1/chat/completions", "/v1/chat/completions/"])
def test_other_paths_are_not_routed(lua: Lua, path: str) -> None:
    rec = py(lua.run(lua.filter(), "on_request", headers={**BASE_HEADERS, ":path": path}, body="{}"))
    assert rec[b"n_http"] == 0 and rec[b"body_calls"] == 0


def test_llm_path_sends_one_route_call(lua: Lua) -> None:
    headers = {**BASE_HEADERS, "x-ai-eg-selected-route": "evil", "x-ai-eg-selected-backend": "b"}
    before = time.monotonic_ns()
    rec = lua.run(lua.filter(), "on_request", headers=headers, body='{"model":"gpt"}', answer=SET_ANSWER)
    after = time.monotonic_ns()
    assert rec.ok and rec.n_http == 1
    call = py(rec.http_calls[1])
    assert call[b"cluster"] == b"ipc_router_sidecar"
    assert call[b"headers"] == {
        b":method": b"POST",
        b":path": b"/route",
        b":authority": b"ipc-router",
        b"content-type": b"application/msgpack",
    }
    assert call[b"options"] == {b"timeout_ms": 250}
    sent = msgpack.unpackb(call[b"body"], raw=False)
    assert sent["id"] == "req-1"
    assert sent["path"] == CHAT
    assert sent["body"] == b'{"model":"gpt"}' and isinstance(sent["body"], bytes)
    assert sent["headers"] == BASE_HEADERS  # the client's route/backend headers are gone
    if LUPA.__name__.startswith("lupa.luajit"):
        assert isinstance(sent["t"], int) and before <= sent["t"] <= after  # same CLOCK_MONOTONIC
    assert set(sent) <= {"id", "t", "path", "headers", "body"}
    raw = msgpack.unpackb(call[b"body"], raw=True)
    assert isinstance(raw[b"path"], bytes)  # str type on the wire (raw=True keeps str as bytes)


def test_custom_conf_is_used(lua: Lua) -> None:
    f = lua.filter(
        cluster="side", authority="side-host", timeout_ms=99, llm_paths=["/x"], route_header="x-r", backend_header="x-b"
    )
    rec = lua.run(
        f,
        "on_request",
        headers={":path": "/x", "x-r": "evil", "x-b": "evil", "x-ai-eg-selected-route": "kept"},
        body="",
        answer=route_answer(set={"x-r": "r2"}, id="i"),
    )
    call = py(rec.http_calls[1])
    assert call[b"cluster"] == b"side" and call[b"headers"][b":authority"] == b"side-host"
    assert call[b"options"] == {b"timeout_ms": 99}
    sent = msgpack.unpackb(call[b"body"], raw=False)
    assert sent["headers"] == {":path": "/x", "x-ai-eg-selected-route": "kept"}
    assert py(rec.store)[b"x-r"] == b"r2"


def test_query_string_is_ignored_for_matching_but_sent(lua: Lua) -> None:
    path = CHAT + "?api-version=1"
    rec = lua.run(lua.filter(), "on_request", headers={**BASE_HEADERS, ":path": path}, body="{}", answer=SET_ANSWER)
    assert rec.n_http == 1
    assert msgpack.unpackb(rec.http_calls[1].body)["path"] == path


def test_missing_body_and_request_id(lua: Lua) -> None:
    headers = {k: v for k, v in BASE_HEADERS.items() if k != "x-request-id"}
    rec = lua.run(lua.filter(), "on_request", headers=headers, answer=SET_ANSWER)
    sent = msgpack.unpackb(rec.http_calls[1].body)
    assert sent["body"] == b"" and "id" not in sent


def test_repeated_headers_are_joined(lua: Lua) -> None:
    got = lua.rt.execute(b"""
        local M = require("ipc_router")
        local list = { {"accept", "a"}, {"x-a", "1"}, {"accept", "b"}, {"cookie", "c=1"},
                       {"cookie", "d=2"}, {"accept", "c"} }
        local i = 0
        local function iter() i = i + 1; if list[i] then return list[i][1], list[i][2] end end
        return M.header_map(iter)
    """)
    assert py(got) == {b"accept": b"a,b,c", b"x-a": b"1", b"cookie": b"c=1; d=2"}


def canonical(data: bytes) -> bool:
    """``data`` is what msgpack-python packs for the same value, keys in the same order (smallest forms)."""
    value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return bool(msgpack.packb(value, use_bin_type=True) == data)


def test_route_body_with_repeated_headers(lua: Lua) -> None:
    """Envoy iterates a repeated header once per value: the body joins them like header_map(), without the
    client's route/backend headers (however often sent)."""
    header_list = [
        [":path", CHAT],
        ["accept", "a"],
        ["x-ai-eg-selected-route", "evil"],
        ["cookie", "c=1"],
        ["x-request-id", "r1"],
        ["accept", "b"],
        ["x-ai-eg-selected-backend", "evil"],
        ["cookie", "d=2"],
        ["x-ai-eg-selected-route", "evil2"],
        ["x-request-id", "r2"],
        ["x-long", "v" * 300],
        ["x-" + "k" * 40, ""],
    ]
    rec = lua.run(lua.filter(), "on_request", header_list=header_list, body="b" * 300, answer=SET_ANSWER)
    assert rec.ok and rec.n_http == 1 and rec.n_logs == 0
    body = rec.http_calls[1].body
    assert canonical(body)
    sent = msgpack.unpackb(body, raw=False)
    assert sent["headers"] == {
        ":path": CHAT,
        "accept": "a,b",
        "cookie": "c=1; d=2",
        "x-request-id": "r1,r2",
        "x-long": "v" * 300,
        "x-" + "k" * 40: "",
    }
    assert sent["id"] == "r1,r2" and sent["path"] == CHAT and sent["body"] == b"b" * 300
    store = py(rec.store)
    assert b"x-ai-eg-selected-backend" not in store and store[b"x-ai-eg-selected-route"] == b"r1"


def test_route_body_with_many_headers(lua: Lua) -> None:
    header_list = [[":path", CHAT]] + [[f"x-h{i}", f"v{i}"] for i in range(100)] + [["x-h7", "again"]]
    for _ in range(2):  # the second request reuses the filter's scratch space
        rec = lua.run(lua.filter(), "on_request", header_list=header_list, body="{}", answer=SET_ANSWER)
        body = rec.http_calls[1].body
        assert canonical(body)
        sent = msgpack.unpackb(body, raw=False)
        assert len(sent["headers"]) == 101 and sent["headers"]["x-h7"] == "v7,again" and "id" not in sent
    rec = lua.run(lua.filter(), "on_request", header_list=[[":path", CHAT], ["a", "1"]], body="{}", answer=SET_ANSWER)
    assert msgpack.unpackb(rec.http_calls[1].body, raw=False)["headers"] == {":path": CHAT, "a": "1"}


@pytest.mark.parametrize("n", SIZES)
def test_route_body_str_and_bin_heads_for_every_length(lua: Lua, n: int) -> None:
    """The filter writes its own heads (no general encoder): str8/16/32 and bin8/16/32 as msgpack-python does."""
    value = ("abcdefgh" * (n // 8 + 1))[:n]
    blob = bytes(random.Random(n).randrange(256) for _ in range(n))
    rec = lua.run(lua.filter(), "on_request", headers={**BASE_HEADERS, "x-v": value}, body=blob, answer=SET_ANSWER)
    body = rec.http_calls[1].body
    assert canonical(body)
    sent = msgpack.unpackb(body, raw=False)
    assert sent["headers"]["x-v"] == value and sent["body"] == blob
    assert msgpack.packb(value) in body and msgpack.packb(blob, use_bin_type=True) in body


@pytest.mark.parametrize("count", [14, 15, 70000])  # with :path: fixmap max, map16, map32
def test_route_body_map_heads(count: int) -> None:
    lua = Lua()  # its own Lua state: 70000 headers grow the filter's scratch buffer for the state's lifetime
    header_list = [[":path", CHAT]] + [[f"x-h{i}", "v"] for i in range(count)]
    rec = lua.run(lua.filter(), "on_request", header_list=header_list, body="{}", answer=SET_ANSWER)
    body = rec.http_calls[1].body
    assert canonical(body)
    headers = msgpack.unpackb(body, raw=False)["headers"]
    assert len(headers) == count + 1
    assert msgpack.packb(headers)[:5] in body  # the map's head as msgpack-python writes it


@pytest.mark.parametrize("status", ["100", "200", "404", "599"])
def test_complete_body_status_is_the_smallest_int(lua: Lua, status: str) -> None:
    rec = lua.run(lua.filter(), "on_response", headers={":status": status}, chunks=["x"], metadata=ROUTED)
    body = rec.http_calls[1].body
    assert canonical(body) and msgpack.unpackb(body)["status"] == int(status)


# A fake FFI whose clock_gettime reads CLOCK: the /route and /complete times for any uptime.
FAKE_FFI = b"""
CLOCK = { sec = 0, nsec = 0 }
package.loaded.ffi = {
    typeof = function() return function(v) return v end end,
    cdef = function() end,
    new = function() return {} end,
    istype = function() return false end,
    C = { clock_gettime = function(_, ts) ts.tv_sec, ts.tv_nsec = CLOCK.sec, CLOCK.nsec; return 0 end },
}
"""


@pytest.mark.parametrize(
    "sec,nsec",
    [(0, 0), (0, 127), (4, 294_967_295), (4, 294_967_296), (86_400, 1), (9_007_199, 254_740_993),
     (2**32 - 1, 999_999_999), (18_446_744_073, 709_551_615)],
)  # fmt: skip
def test_times_are_exact_for_any_uptime(sec: int, nsec: int) -> None:
    """The times ("t", "t_first", "t_end") are the exact nanoseconds, in the smallest msgpack int, past 2^53 too."""
    lua = Lua(setup=FAKE_FFI)
    clock = lua.rt.globals().CLOCK
    clock.sec, clock.nsec = sec, nsec
    ns = sec * 10**9 + nsec
    rec = lua.run(lua.filter(), "on_request", headers=BASE_HEADERS, body="{}", answer=SET_ANSWER)
    body = rec.http_calls[1].body
    assert canonical(body) and msgpack.unpackb(body)["t"] == ns
    rec = lua.run(lua.filter(), "on_response", headers={":status": "200"}, chunks=["x"], metadata=ROUTED)
    body = rec.http_calls[1].body
    sent = msgpack.unpackb(body)
    assert canonical(body) and sent["t_first"] == ns and sent["t_end"] == ns


def test_set_answer_replaces_headers_and_stores_id(lua: Lua) -> None:
    rec = lua.run(
        lua.filter(), "on_request", headers={**BASE_HEADERS, "x-ai-eg-model": "old"}, body="{}", answer=SET_ANSWER
    )
    assert rec.ok and rec.status == b"dead" and not rec.responded
    store = py(rec.store)
    assert store[b"x-ai-eg-selected-route"] == b"r1" and store[b"x-ai-eg-model"] == b"gpt"
    assert rec.cleared >= 1
    assert py(rec.metadata) == {b"ipc_router": {b"id": b"rid-9"}}
    assert rec.n_logs == 0


def test_set_answer_without_id_stores_nothing(lua: Lua) -> None:
    rec = lua.run(
        lua.filter(),
        "on_request",
        headers=BASE_HEADERS,
        body="{}",
        answer=route_answer(set={"x-ai-eg-selected-route": "r1"}),
    )
    assert py(rec.store)[b"x-ai-eg-selected-route"] == b"r1" and rec.cleared >= 1
    assert py(rec.metadata) == {}


def test_respond_answer(lua: Lua) -> None:
    body = b'{"error":{"message":"no matching rule found","code":"model_not_found"}}'
    answer = route_answer(
        respond={"status": 404, "headers": {"content-type": "application/json", ":status": "200"}, "body": body}
    )
    rec = lua.run(lua.filter(), "on_request", headers=BASE_HEADERS, body="{}", answer=answer)
    assert rec.ok and rec.status == b"suspended" and rec.responded  # respond() never returns
    assert py(rec.respond_headers) == {b":status": b"404", b"content-type": b"application/json"}
    assert rec.respond_body == body
    assert py(rec.metadata) == {} and rec.cleared == 0


def test_respond_answer_without_headers_or_body(lua: Lua) -> None:
    rec = lua.run(
        lua.filter(), "on_request", headers=BASE_HEADERS, body="{}", answer=route_answer(respond={"status": 400})
    )
    assert py(rec.respond_headers) == {b":status": b"400"} and rec.respond_body == b""


FAILURES = {
    "unreachable": (
        {
            "answer": {
                "status": 503,
                "body": "upstream connect error or disconnect/reset "
                "before headers. reset reason: remote connection failure",
                "headers": {"content-type": "text/plain"},
            }
        },
        "unreachable",
    ),
    "timeout": ({"answer": {"status": 504, "body": "upstream request timeout"}}, "timeout"),
    "status500": ({"answer": {**SET_ANSWER, "status": 500}}, "status 500"),
    "status404": ({"answer": {"status": 404, "body": msgpack.packb({"error": "x"})}}, "status 404"),
    "garbage": ({"answer": {"status": 200, "body": b"\xc1garbage"}}, "bad answer"),
    "empty": ({"answer": {"status": 200}}, "bad answer"),
    "json": ({"answer": {"status": 200, "body": b'{"set":{}}'}}, "bad answer"),
    "not_a_map": ({"answer": {"status": 200, "body": msgpack.packb([1, 2])}}, "bad answer"),
    "neither": ({"answer": route_answer(id="x")}, "bad answer"),
    "both": ({"answer": route_answer(set={}, respond={"status": 400})}, "bad answer"),
    "set_not_strings": ({"answer": route_answer(set={"x-a": 1})}, "bad answer"),
    "respond_bad_status": ({"answer": route_answer(respond={"status": 99})}, "bad answer"),
    "respond_status_str": ({"answer": route_answer(respond={"status": "404"})}, "bad answer"),
    "call_raises": ({"answer_error": "http call cluster invalid. Must be configured"}, "internal error"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failure_fail_closed(lua: Lua, case: str) -> None:
    spec, reason = FAILURES[case]
    rec = lua.run(lua.filter(), "on_request", headers=BASE_HEADERS, body="{}", **spec)
    assert rec.ok and rec.responded and rec.status == b"suspended"
    assert py(rec.respond_headers) == {b":status": b"503", b"content-type": b"application/json"}
    assert json.loads(rec.respond_body) == {
        "error": {
            "message": f"routing sidecar unavailable: {reason}",
            "type": "server_error",
            "code": "sidecar_unavailable",
        }
    }
    assert py(rec.metadata) == {}
    assert any(reason.encode() in line for line in seq(rec.logs))


@pytest.mark.parametrize("case", FAILURES)
def test_failure_fail_open(lua: Lua, case: str) -> None:
    spec, reason = FAILURES[case]
    f = lua.filter(failure_mode="fail_open", fallback_route="fallback-rule")
    rec = lua.run(f, "on_request", headers={**BASE_HEADERS, "x-ai-eg-selected-route": "evil"}, body="{}", **spec)
    assert rec.ok and rec.status == b"dead" and not rec.responded
    assert py(rec.store)[b"x-ai-eg-selected-route"] == b"fallback-rule"
    assert rec.cleared >= 1
    assert py(rec.metadata) == {}  # no /complete later
    assert any(b"fail_open" in line and reason.encode() in line for line in seq(rec.logs))


def test_decide_is_pure(lua: Lua) -> None:
    conf = lua.filter().conf
    action = py(lua.M.decide(b"200", SET_ANSWER["body"], conf))
    assert action == {
        b"action": b"set",
        b"id": b"rid-9",
        b"headers": {b"x-ai-eg-selected-route": b"r1", b"x-ai-eg-model": b"gpt"},
    }
    action = py(lua.M.decide(None, None, conf))
    assert action[b"action"] == b"respond" and action[b"reason"] == b"no answer"


def test_failure_message_is_json_escaped(lua: Lua) -> None:
    action = lua.M.failure_action(lua.filter().conf, b'quote " back \\ nl \n')
    assert json.loads(action.body)["error"]["message"].endswith('quote " back \\ nl \n')


# ----------------------------------------------------------------------------------- response phase

ROUTED = {"ipc_router": {"id": "rid-9"}}


def complete_call(rec: Any) -> dict[str, Any]:
    assert rec.ok and rec.status == b"dead", rec.err
    assert rec.n_http == 1
    call = py(rec.http_calls[1])
    assert call[b"cluster"] == b"ipc_router_sidecar"
    assert call[b"headers"] == {
        b":method": b"POST",
        b":path": b"/complete",
        b":authority": b"ipc-router",
        b"content-type": b"application/msgpack",
    }
    assert call[b"options"] == {b"asynchronous": True, b"timeout_ms": 2000}
    sent: dict[str, Any] = msgpack.unpackb(call[b"body"], raw=False)
    assert isinstance(sent["body"], bytes)
    return sent


def test_no_id_sends_nothing(lua: Lua) -> None:
    for metadata in ({}, {"other": {"id": "x"}}, {"ipc_router": {"x": "y"}}):
        rec = lua.run(lua.filter(), "on_response", headers={":status": "200"}, chunks=["a", "b"], metadata=metadata)
        assert rec.ok and rec.n_http == 0 and rec.epoch == 0  # body not even iterated


def test_non_streaming_body_kept(lua: Lua) -> None:
    chunks = ['{"choices":', "", '[],"usage":{"prompt_tokens":3}}']
    rec = lua.run(
        lua.filter(),
        "on_response",
        headers={":status": "200", "content-type": "application/json"},
        chunks=chunks,
        metadata=ROUTED,
    )
    sent = complete_call(rec)
    assert sent["id"] == "rid-9" and sent["status"] == 200
    assert sent["body"] == "".join(chunks).encode()
    assert sent["stream"] is False and sent["truncated"] is False
    assert canonical(rec.http_calls[1].body)
    if LUPA.__name__.startswith("lupa.luajit"):
        assert isinstance(sent["t_first"], int) and sent["t_first"] <= sent["t_end"]
        assert abs(sent["t_end"] - time.monotonic_ns()) < 5 * 10**9


def test_t_first_is_the_first_non_empty_chunk(lua: Lua) -> None:
    if not LUPA.__name__.startswith("lupa.luajit"):
        pytest.skip("needs the LuaJIT FFI clock")
    rec = lua.run(lua.filter(), "on_response", headers={":status": "200"}, chunks=["", "", "x", "y"], metadata=ROUTED)
    sent = complete_call(rec)
    times = seq(rec.chunk_times)  # taken by the fake when it hands out each chunk
    assert times[2] <= sent["t_first"] <= times[3] <= sent["t_end"]


def test_no_body(lua: Lua) -> None:
    rec = lua.run(lua.filter(), "on_response", headers={":status": "204"}, chunks=[], metadata=ROUTED)
    sent = complete_call(rec)
    assert sent["status"] == 204 and sent["body"] == b"" and "t_first" not in sent
    assert sent["truncated"] is False


@pytest.mark.parametrize(
    "total,limit,truncated", [(10, 10, False), (11, 10, True), (25, 10, True), (5, 0, True), (0, 0, False)]
)
def test_non_streaming_truncation(lua: Lua, total: int, limit: int, truncated: bool) -> None:
    data = bytes(range(65, 65 + 26)) * 2
    data = data[:total]
    chunks = [data[i : i + 3] for i in range(0, total, 3)]
    f = lua.filter(max_response_body=limit)
    rec = lua.run(f, "on_response", headers={":status": "200"}, chunks=chunks, metadata=ROUTED)
    sent = complete_call(rec)
    assert sent["body"] == (data[-limit:] if limit else b"")
    assert sent["truncated"] is truncated


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("before", [["a"], ["ab", "c"], ["", "xyz"]])
def test_chunk_of_exactly_the_limit_after_smaller_ones_is_truncated(lua: Lua, stream: bool, before: list[str]) -> None:
    # Issue #13's surviving mutant: the `len >= limit` branch must still flag the earlier bytes it drops.
    limit = 8
    chunks = [*before, "L" * limit]
    conf = {"stream_tail_bytes": limit} if stream else {"max_response_body": limit}
    headers = {":status": "200", "content-type": "text/event-stream" if stream else "application/json"}
    sent = complete_call(lua.run(lua.filter(**conf), "on_response", headers=headers, chunks=chunks, metadata=ROUTED))
    assert sent["body"] == b"L" * limit
    assert sent["truncated"] is (len("".join(before)) > 0)


@pytest.mark.parametrize("seed", range(40))
def test_tail_matches_python_for_random_chunks(lua: Lua, seed: int) -> None:
    rnd = random.Random(seed)
    limit = rnd.choice([1, 7, 16, 100])
    chunks = [rnd.randbytes(rnd.choice([0, 1, 3, 16, 50, 200])) for _ in range(rnd.randrange(1, 30))]
    data = b"".join(chunks)
    f = lua.filter(stream_tail_bytes=limit)
    rec = lua.run(
        f,
        "on_response",
        headers={":status": "200", "content-type": "text/event-stream"},
        chunks=[c.decode("latin-1") for c in chunks],
        metadata=ROUTED,
    )
    # lua.table() encodes str as UTF-8; rebuild what the fake actually held
    held = b"".join(c.decode("latin-1").encode() for c in chunks)
    sent = complete_call(rec)
    assert sent["body"] == held[-limit:]
    assert sent["truncated"] is (len(held) > limit)
    assert sent["stream"] is True
    del data


@pytest.mark.parametrize("seed", range(20))
def test_tail_matches_python_for_long_streams(lua: Lua, seed: int) -> None:
    rnd = random.Random(1000 + seed)
    stream = rnd.random() < 0.5
    limit = rnd.choice([1, 50, 500, 4000])
    chunks = [
        rnd.choice(["", "x" * rnd.choice([1, 10, 120, 600, 5000])]) + str(i) for i in range(rnd.randrange(1, 400))
    ]
    conf = {"stream_tail_bytes": limit} if stream else {"max_response_body": limit}
    headers = {":status": "200", "content-type": "text/event-stream" if stream else "application/json"}
    rec = lua.run(lua.filter(**conf), "on_response", headers=headers, chunks=chunks, metadata=ROUTED)
    data = "".join(chunks).encode()
    body = rec.http_calls[1].body
    sent = complete_call(rec)
    assert canonical(body)
    assert sent["body"] == data[-limit:] and sent["truncated"] is (len(data) > limit) and sent["stream"] is stream


def test_stream_tail_is_bounded(lua: Lua) -> None:
    events = [f'data: {{"i":{i}}}\n\n' for i in range(2000)]
    events.append('data: {"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\ndata: [DONE]\n\n')
    rec = lua.run(
        lua.filter(stream_tail_bytes=96),
        "on_response",
        headers={":status": "200", "content-type": "Text/Event-Stream; charset=utf-8"},
        chunks=events,
        metadata=ROUTED,
    )
    sent = complete_call(rec)
    assert sent["stream"] is True and sent["truncated"] is True
    assert sent["body"] == "".join(events).encode()[-96:]
    assert b"usage" in sent["body"]


def test_stream_tail_memory_stays_bounded(lua: Lua) -> None:
    """20 MB of fresh chunks through on_response: the Lua heap must not grow with the stream."""
    rec = lua.rt.execute(
        b"""
        local H, filter = ...
        local handle, rec = H.make({ headers = { [":status"] = "200",
            ["content-type"] = "text/event-stream" }, metadata = { ipc_router = { id = "x" } } })
        local sent = 0
        handle.bodyChunks = function()
            local i = 0
            return function()
                i = i + 1
                if i > 20000 then return nil end
                local data = string.rep("x", 994) .. string.format("%06d", i)  -- a new string
                sent = sent + #data
                local now = collectgarbage("count")
                if now > rec.peak then rec.peak = now end
                return { length = function() return #data end,
                         getBytes = function(_, a, n) return data:sub(a + 1, a + n) end }
            end
        end
        collectgarbage("collect")
        rec.before = collectgarbage("count")
        rec.peak = rec.before
        filter:on_response(handle)
        rec.sent = sent
        return rec
    """,
        lua.H,
        lua.filter(stream_tail_bytes=4096),
    )
    assert rec.sent == 20_000_000 and rec.n_http == 1
    body = msgpack.unpackb(rec.http_calls[1].body)["body"]
    assert len(body) == 4096 and body.endswith(b"x" * 994 + b"020000")
    # Garbage is collected incrementally, so allow slack; keeping the stream would be ~20000 KB.
    assert rec.peak - rec.before < 8000


def test_complete_errors_are_logged_not_raised(lua: Lua) -> None:
    rec = lua.rt.execute(
        b"""
        local H, filter = ...
        local handle, rec = H.make({ headers = { [":status"] = "200" }, chunks = { "a" },
                                     metadata = { ipc_router = { id = "x" } } })
        handle.httpCall = function() error("http call cluster invalid. Must be configured") end
        filter:on_response(handle)
        return rec
    """,
        lua.H,
        lua.filter(),
    )
    assert any(b"/complete not sent" in line for line in seq(rec.logs))


def test_custom_complete_conf(lua: Lua) -> None:
    f = lua.filter(cluster="side", authority="h", complete_timeout_ms=0)
    rec = lua.run(f, "on_response", headers={":status": "502"}, chunks=["x"], metadata=ROUTED)
    call = py(rec.http_calls[1])
    assert call[b"cluster"] == b"side" and call[b"headers"][b":authority"] == b"h"
    assert call[b"options"] == {b"asynchronous": True, b"timeout_ms": 0}
    assert msgpack.unpackb(call[b"body"])["status"] == 502


# -------------------------------------------------------------------------------------------- lint

LUACHECK = shutil.which("luacheck")


@pytest.mark.skipif(LUACHECK is None, reason="luacheck not installed (apt-get install lua-check)")
@pytest.mark.parametrize(
    "args",
    [["ipc_router/lua/"], ["--config", "ipc_router/lua/.luacheckrc", "ipc_router/lua/"]],
    ids=["default", "luacheckrc"],
)
def test_luacheck_clean(args: list[str]) -> None:
    assert LUACHECK is not None
    proc = subprocess.run([LUACHECK, "--no-color", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_module_defines_no_globals() -> None:
    from tests.support.lua_harness import loader_code, new_runtime

    rt = new_runtime()
    names = rt.eval(b"function() local n = {} for k in pairs(_G) do n[#n + 1] = k end return n end")
    before = set(seq(names()))
    rt.execute(loader_code(MODULE_PATH.read_text()).encode())
    rt.execute(b'local f = require("ipc_router").new({}); assert(f.on_request and f.on_response)')
    assert set(seq(names())) == before
    assert MODULE_PATH.read_text().rstrip().endswith("return _M")


def test_new_budget_headers_lower_cased(lua: Lua) -> None:
    f = lua.rt.execute(b'return require("ipc_router").new({ budget_headers = { "X-User-Id", "x-team" } })')
    assert list(f.budget_headers.values()) == [b"x-user-id", b"x-team"]
    assert f.conf.budget_headers is not None
    assert list(lua.filter().budget_headers.values()) == []
