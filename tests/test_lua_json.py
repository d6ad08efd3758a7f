"""ipc_router/lua/ipc_router_json.lua (the fast path's top-level "model" scanner), compiled.

Runs under lupa's LuaJIT with the JIT on, in two runtimes: one with LuaJIT's default trace
thresholds and one that compiles every loop and side exit at once (hotloop=1, hotexit=1), so that
the rare branches run as machine code too. Every body is scanned many times in a Lua loop and must
give the same answer each time (the first calls run interpreted, the later ones compiled).

The oracle is the sidecar's own decoder (ipc_router.service._CHAT_DECODER, msgspec): the scanner
may return a value only when msgspec decodes the body to that same non-empty str. The last test loads
the module into a real Envoy's Lua filter (--concurrency 1) and checks it gives the same answers there.
"""

from __future__ import annotations

import http.client
import json
import random
import string
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc_router.service import _CHAT_DECODER
from ipc_router.tools.stack import envoy_binary, free_port, read_tail, stop_process
from tests.support.lua_harness import LUPA, ROOT

MODULE = ROOT / "ipc_router" / "lua" / "ipc_router_json.lua"

if not LUPA.__name__.startswith("lupa.luajit"):
    pytest.skip(f"lupa has no LuaJIT runtime here ({LUPA.__name__})", allow_module_level=True)

Scan = Callable[..., tuple[bytes | None, bytes | None]]

# Loads the module from its source text, counts the traces LuaJIT compiles inside it, and returns
# scan(body, key, reps): the answer of `reps` calls, which must all agree.
RUNNER = rb"""
local src, opts = ...
for opt in opts:gmatch("%S+") do jit.opt.start(opt) end
local mod = assert(loadstring(src, "=ipc_router_json.lua"))()
local f = mod.top_level_string
local traces = 0
jit.attach(function(what, tr, func)
    if what == "stop" and require("jit.util").funcinfo(func).source == "=ipc_router_json.lua" then
        traces = traces + 1
    end
end, "trace")
local function scan(body, key, reps)
    local v, r = f(body, key)
    for _ = 2, reps do
        local v2, r2 = f(body, key)
        if v2 ~= v or r2 ~= r then
            error("unstable answer: " .. tostring(v) .. "/" .. tostring(r) .. " then "
                .. tostring(v2) .. "/" .. tostring(r2))
        end
    end
    return v, r
end
return scan, function() return traces end, jit.status(), mod.MAX_DEPTH
"""

RUNTIME_OPTS = {"default": "", "eager": "hotloop=1 hotexit=1 maxtrace=20000 maxside=500"}


class Scanner:
    def __init__(self, opts: str) -> None:
        self.rt = LUPA.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        self._scan, self.traces, jit_on, self.max_depth = self.rt.execute(RUNNER, MODULE.read_bytes(), opts.encode())
        assert jit_on is True, "the JIT must be on: the filter runs this module compiled"

    def __call__(self, body: bytes, key: bytes = b"model", reps: int = 30) -> tuple[bytes | None, str | None]:
        v, r = self._scan(body, key, reps)
        return v, (r.decode() if r is not None else None)


@pytest.fixture(scope="module", params=sorted(RUNTIME_OPTS))
def scan(request: pytest.FixtureRequest) -> Iterator[Scanner]:
    s = Scanner(RUNTIME_OPTS[request.param])
    yield s
    assert s.traces() > 0, "no trace was compiled in ipc_router_json.lua"


@pytest.fixture(scope="module")
def eager() -> Scanner:
    return Scanner(RUNTIME_OPTS["eager"])


def oracle(body: bytes, key: str = "model") -> bytes | None:
    """What the sidecar takes as the model: a non-empty str from a body msgspec accepts, else None."""
    if key == "model":
        try:
            model = _CHAT_DECODER.decode(body).model
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
    else:
        try:
            doc = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None
        model = doc.get(key) if isinstance(doc, dict) else None
    return model.encode() if isinstance(model, str) and model else None


def check(scan: Scanner, body: bytes, key: str = "model") -> tuple[bytes | None, str | None]:
    """The scanner's answer is the oracle's, or nil with a reason (never a different value)."""
    value, reason = scan(body, key.encode())
    expected = oracle(body, key)
    if value is not None:
        assert reason is None
        assert value == expected, f"wrong value {value!r} (sidecar: {expected!r}) for {body[:200]!r}"
    else:
        assert reason in REASONS, reason
    return value, reason


REASONS = {"invalid", "not_object", "absent", "not_string", "empty", "duplicate", "too_deep"}

# --------------------------------------------------------------------------------------- hand vectors

DEEP_OK = b'{"x":' + b"[" * 126 + b"]" * 126 + b',"model":"a"}'  # depth 127
DEEP_128 = b'{"x":' + b"[" * 127 + b"]" * 127 + b',"model":"a"}'  # depth 128: the limit
DEEP_129 = b'{"x":' + b"[" * 128 + b"]" * 128 + b',"model":"a"}'

# (body, expected value (bytes) or reason (str))
VECTORS: list[tuple[bytes, bytes | str]] = [
    (b'{"model":"gpt-4o"}', b"gpt-4o"),
    (b' \t\r\n{ "model" \n:\t"m" \r} \n', b"m"),
    (b'{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini"}', b"gpt-4o-mini"),
    # decoys: nested "model" keys and values, quotes and escapes in strings
    (b'{"messages":[{"model":"fake","content":"\\"model\\":\\"fake2\\""}],"model":"real"}', b"real"),
    (b'{"a":{"model":"fake"},"b":[{"model":"x"}],"model":"real","c":{"d":{"model":"y"}}}', b"real"),
    (b'{"content":"{\\"model\\":\\"fake\\"}","model":"real"}', b"real"),
    (b'{"x":"\\\\","model":"real"}', b"real"),
    (b'{"x":"\\\\\\"model\\\\\\":","model":"real"}', b"real"),
    (b'{"model_name":"x","models":"y","Model":"z","model":"real"}', b"real"),
    (b'{"messages":[{"model":"fake"}]}', "absent"),
    (b'{"a":{"model":"fake"}}', "absent"),
    (b"{}", "absent"),
    (b"{ }", "absent"),
    # escapes are decoded in the value and in top-level keys
    (b'{"model":"a\\/b"}', b"a/b"),
    (b'{"model":"\\"q\\"\\\\\\/\\b\\f\\n\\r\\t"}', b'"q"\\/\b\f\n\r\t'),
    (b'{"model":"caf\\u00e9"}', "café".encode()),
    (b'{"model":"\\u65E5\\u672c"}', "日本".encode()),
    (b'{"model":"\\uD83D\\uDE00!"}', "😀!".encode()),
    (b'{"model":"\\udbff\\udfff"}', "\U0010ffff".encode()),
    (b'{"model":"a\\u0000b"}', b"a\x00b"),
    (b'{"mod\\u0065l":"a"}', b"a"),
    (b'{"\\u006d\\u006f\\u0064\\u0065\\u006c":"a"}', b"a"),
    (b'{"model\\u0000":"a"}', "absent"),
    # raw UTF-8 in the value is returned as is; invalid UTF-8 there is invalid (msgspec rejects it)
    ('{"model":"日本語-é-😀"}'.encode(), "日本語-é-😀".encode()),
    (b'{"model":"\x7f"}', b"\x7f"),
    (b'{"model":"\xef\xbf\xbf"}', b"\xef\xbf\xbf"),
    (b'{"model":"\xf4\x8f\xbf\xbf"}', b"\xf4\x8f\xbf\xbf"),
    (b'{"model":"\xed\x9f\xbf"}', b"\xed\x9f\xbf"),
    (b'{"model":"\xff"}', "invalid"),
    (b'{"model":"\x80"}', "invalid"),
    (b'{"model":"a\xc2"}', "invalid"),
    (b'{"model":"\xc0\x80"}', "invalid"),
    (b'{"model":"\xe0\x80\x80"}', "invalid"),
    (b'{"model":"\xed\xa0\x80"}', "invalid"),
    (b'{"model":"\xf0\x80\x80\x80"}', "invalid"),
    (b'{"model":"\xf4\x90\x80\x80"}', "invalid"),
    (b'{"model":"\xf5\x80\x80\x80"}', "invalid"),
    (b'{"model":"\xe2\x82"}', "invalid"),
    (b'{"model":"\xc3\\u00e9"}', "invalid"),
    # ... but not in other strings or keys (msgspec skips them unchecked)
    (b'{"x":"\xff\xed\xa0\x80\xc0","\xff":"\x80","model":"a"}', b"a"),
    # surrogate escapes are checked in every string, as msgspec does
    (b'{"x":"\\ud800","model":"a"}', "invalid"),
    (b'{"x":"\\udc00","model":"a"}', "invalid"),
    (b'{"x":"\\ud800\\u0041","model":"a"}', "invalid"),
    (b'{"x":"\\ud800\\n","model":"a"}', "invalid"),
    (b'{"x":"\\ud800x","model":"a"}', "invalid"),
    (b'{"x":"\\ud83d\\ude00","model":"a"}', b"a"),
    (b'{"x":"\\udc00\\udc00","model":"a"}', "invalid"),
    (b'{"x":"\\udc00\\ud800","model":"a"}', "invalid"),
    (b'{"x":"\\ud800\\ud800","model":"a"}', "invalid"),
    (b'{"model":"\\ude00\\ud83d"}', "invalid"),
    (b'{"model":"\\ud800"}', "invalid"),
    # bad escapes and raw control bytes, anywhere
    (b'{"x":"\\x41","model":"a"}', "invalid"),
    (b'{"x":"\\U0041","model":"a"}', "invalid"),
    (b'{"x":"\\u12","model":"a"}', "invalid"),
    (b'{"x":"\\u12G4","model":"a"}', "invalid"),
    (b'{"x":"\\\'","model":"a"}', "invalid"),
    (b'{"x":"\x01","model":"a"}', "invalid"),
    (b'{"x":"\t","model":"a"}', "invalid"),
    (b'{"x":"\n","model":"a"}', "invalid"),
    (b'{"x":"a\x00b","model":"a"}', "invalid"),
    (b'{"model":"a\x1fb"}', "invalid"),
    (b'{"x\x01":1,"model":"a"}', "invalid"),
    # numbers
    (b'{"x":-0,"y":0.5,"z":-1.5E-3,"w":1e5,"v":0e5,"u":1E+2,"model":"a"}', b"a"),
    (b'{"x":1E400,"y":123456789012345678901234567890,"model":"a"}', b"a"),
    (b'{"x":[0,-0,1,-1,10.25,3e-7,4E+10],"model":"a"}', b"a"),
    (b'{"x":01,"model":"a"}', "invalid"),
    (b'{"x":-01,"model":"a"}', "invalid"),
    (b'{"x":00,"model":"a"}', "invalid"),
    (b'{"x":1.,"model":"a"}', "invalid"),
    (b'{"x":.5,"model":"a"}', "invalid"),
    (b'{"x":-,"model":"a"}', "invalid"),
    (b'{"x":+1,"model":"a"}', "invalid"),
    (b'{"x":1e,"model":"a"}', "invalid"),
    (b'{"x":1e+,"model":"a"}', "invalid"),
    (b'{"x":1.5.5,"model":"a"}', "invalid"),
    (b'{"x":1e5e5,"model":"a"}', "invalid"),
    (b'{"x":[1.,2],"model":"a"}', "invalid"),
    (b'{"x":[1e,2],"model":"a"}', "invalid"),
    (b'{"x":[1e+,2],"model":"a"}', "invalid"),
    (b'{"x":[-,2],"model":"a"}', "invalid"),
    (b'{"x":0x10,"model":"a"}', "invalid"),
    (b'{"x":NaN,"model":"a"}', "invalid"),
    (b'{"x":Infinity,"model":"a"}', "invalid"),
    (b'{"x":-Infinity,"model":"a"}', "invalid"),
    (b'{"x":1 2,"model":"a"}', "invalid"),
    # literals
    (b'{"x":true,"y":false,"z":null,"model":"a"}', b"a"),
    (b'{"x":tru,"model":"a"}', "invalid"),
    (b'{"x":truex,"model":"a"}', "invalid"),
    (b'{"x":nul,"model":"a"}', "invalid"),
    (b'{"x":nullnull,"model":"a"}', "invalid"),
    (b'{"x":False,"model":"a"}', "invalid"),
    (b'{"x":1true,"model":"a"}', "invalid"),
    (b'{"x":\'a\',"model":"a"}', "invalid"),
    # structure
    (b'{"x":[1,],"model":"a"}', "invalid"),
    (b'{"x":{},"model":"a",}', "invalid"),
    (b'{"x":[1,,2],"model":"a"}', "invalid"),
    (b'{"x":[,],"model":"a"}', "invalid"),
    (b'{"x":[1 2],"model":"a"}', "invalid"),
    (b'{"x":{"a"},"model":"a"}', "invalid"),
    (b'{"x":{"a":},"model":"a"}', "invalid"),
    (b'{"x":{1:2},"model":"a"}', "invalid"),
    (b'{"x":[}],"model":"a"}', "invalid"),
    (b'{"x":{]},"model":"a"}', "invalid"),
    (b'{"x":[1}],"model":"a"}', "invalid"),
    (b'{"x":{"a":1]},"model":"a"}', "invalid"),
    (b'{"x":[1},"model":"a"]', "invalid"),
    (b'{"x":{"a":1],"model":"a"}', "invalid"),
    (b'{"x":[{"a":1]},"model":"a"}', "invalid"),
    (b'{"x" "y","model":"a"}', "invalid"),
    (b'{"x":1"model":"a"}', "invalid"),
    (b'{,"model":"a"}', "invalid"),
    (b'{"model":"a"', "invalid"),
    (b'{"model":"a', "invalid"),
    (b'{"model":', "invalid"),
    (b'{"model"', "invalid"),
    (b"{", "invalid"),
    (b'{"model":"a"}}', "invalid"),
    (b'{"model":"a"}]', "invalid"),
    (b'{"model":"a"} x', "invalid"),
    (b'{"model":"a"}{}', "invalid"),
    (b'{"model":"a"}\x00', "invalid"),
    (b'{"model":"a"}\x0c', "invalid"),
    (b'{"model"\x0c:"a"}', "invalid"),
    (b'{\x0c"model":"a"}', "invalid"),
    (b'{"model":"a"\xc2\xa0}', "invalid"),
    (b"", "invalid"),
    (b" \n\t", "invalid"),
    (b"\xef\xbb\xbf" + b'{"model":"a"}', "not_object"),
    # the top level must be an object
    (b'["model","a"]', "not_object"),
    (b'"model"', "not_object"),
    (b"1", "not_object"),
    (b"null", "not_object"),
    # the value must be a non-empty string
    (b'{"model":null}', "not_string"),
    (b'{"model":1}', "not_string"),
    (b'{"model":true}', "not_string"),
    (b'{"model":["a"]}', "not_string"),
    (b'{"model":{"name":"a"}}', "not_string"),
    (b'{"model":""}', "empty"),
    # a key given twice: msgspec keeps the last; the fast path leaves such bodies to the sidecar
    (b'{"model":"a","model":"b"}', "duplicate"),
    (b'{"model":"a","x":1,"model":"a"}', "duplicate"),
    (b'{"mod\\u0065l":"a","model":"b"}', "duplicate"),
    (b'{"model":"a","model":2}', "duplicate"),
    # nesting
    (DEEP_OK, b"a"),
    (DEEP_128, b"a"),
    (DEEP_129, "too_deep"),
    (b'{"x":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b',"model":"a"}', "too_deep"),
    (b'{"x":' + b"[" * 2000 + b"]" * 2000 + b',"model":"a"}', "too_deep"),
]


@pytest.mark.parametrize(("body", "expected"), VECTORS, ids=[repr(b[:40]) for b, _ in VECTORS])
def test_vector(scan: Scanner, body: bytes, expected: bytes | str) -> None:
    value, reason = scan(body)
    if isinstance(expected, bytes):
        assert (value, reason) == (expected, None)
        assert oracle(body) == expected, "the vector disagrees with the sidecar's decoder"
    else:
        assert (value, reason) == (None, expected)
        sidecar = oracle(body)
        if expected in ("invalid", "not_object", "absent", "not_string", "empty"):
            assert sidecar is None, f"the sidecar takes {sidecar!r} from this body"


def test_max_depth_is_below_msgspec_recursion_limit(scan: Scanner) -> None:
    # "too_deep" must only ever send to the slow path bodies the scanner could not handle, and a
    # body the scanner accepts must never be one msgspec refuses for depth.
    d = scan.max_depth - 1
    body = b'{"x":' + b"[" * d + b"]" * d + b',"model":"a"}'
    assert scan(body) == (b"a", None)
    assert oracle(body) == b"a"


def test_other_keys(scan: Scanner) -> None:
    body = b'{"messages":[{"user":"u1"}],"user":"alice","stream":true,"n":2,"e":""}'
    assert scan(body, b"user") == (b"alice", None)
    assert scan(body, b"stream") == (None, "not_string")
    assert scan(body, b"n") == (None, "not_string")
    assert scan(body, b"e") == (None, "empty")
    assert scan(body, b"model") == (None, "absent")
    assert scan(body, b"") == (None, "absent")
    assert scan(b'{"":"x"}', b"") == (b"x", None)


def test_non_string_arguments_are_invalid(scan: Scanner) -> None:
    f = scan.rt.execute(b"local s = ...; return function(b, k) return select(2, s(b, k, 1)) end", scan._scan)
    assert f(None, b"model") == b"invalid"
    assert f(42, b"model") == b"invalid"
    assert f(b'{"model":"a"}', None) == b"invalid"


# --------------------------------------------------- SWAR edges: specials at every offset and length


@pytest.mark.parametrize(
    "special", [b'\\"', b"\\\\", b"\\u00e9", b"\\ud83d\\ude00", b"\x01", b"\x7f", b"\xc3\xa9", b'"']
)
def test_string_specials_at_every_offset(eager: Scanner, special: bytes) -> None:
    # The string scan reads 8 bytes at a time while 8 remain; put the special byte(s) at every
    # position of strings of every length near the 8-byte steps and near the end of the body.
    for prefix in (b'{"x":"', b'{"x" :  "'):
        for length in range(0, 26):
            for at in range(0, length + 1):
                s = b"a" * at + special + b"b" * (length - at)
                for body in (prefix + s + b'","model":"m"}', b'{"model":"' + s + b'"}', b'{"model":"m","x":"' + s):
                    value, _ = check(eager, body)
                    assert value == oracle(body), body


# ------------------------------------------------------------------------------- generated documents

KEYS = st.one_of(
    st.sampled_from(["model", "messages", "content", "role", "m", "Model", "model ", "mode", "modell", ""]),
    st.text(max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(['"model":"x"', '{"model":"x"}', "\\", '\\"', "\u2028", "\x00", "\x1f", "\ud800", "\ufeff"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(KEYS, children, max_size=5),
    ),
    max_leaves=30,
)
MODELS = st.one_of(st.text(min_size=0, max_size=20), SCALARS, VALUES)


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict[str, Any], random.Random]:
    doc = draw(st.dictionaries(KEYS.filter(lambda k: k != "model"), VALUES, max_size=6))
    if draw(st.booleans()):
        items = list(doc.items())
        items.insert(draw(st.integers(0, len(items))), ("model", draw(MODELS)))
        doc = dict(items)
    return doc, random.Random(draw(st.integers(0, 2**32)))


WS = [" ", "\t", "\n", "\r"]


def dump(value: Any, rnd: random.Random) -> str:
    """JSON text with random (valid) whitespace and random escaping, unlike json.dumps."""

    def ws() -> str:
        return "".join(rnd.choice(WS) for _ in range(rnd.choice((0, 0, 0, 1, 2))))

    def s(text: str) -> str:
        out = []
        for ch in text:
            o = ord(ch)
            if ch in '"\\' or o < 0x20 or 0xD800 <= o <= 0xDFFF or rnd.random() < 0.1:
                short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "/": "\\/", "\b": "\\b"}
                if ch in short and rnd.random() < 0.7:
                    out.append(short[ch])
                elif o > 0xFFFF:
                    o -= 0x10000
                    out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04X}")
                else:
                    out.append(f"\\u{o:04x}" if rnd.random() < 0.5 else f"\\u{o:04X}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    def v(x: Any) -> str:
        if isinstance(x, dict):
            inner = ",".join(ws() + s(k) + ws() + ":" + ws() + v(y) + ws() for k, y in x.items())
            return "{" + (inner or ws()) + "}"
        if isinstance(x, list):
            inner = ",".join(ws() + v(y) + ws() for y in x)
            return "[" + (inner or ws()) + "]"
        if isinstance(x, str):
            return s(x)
        return json.dumps(x)

    return ws() + v(value) + ws()


def encodings(doc: dict[str, Any], rnd: random.Random) -> Iterator[bytes]:
    yield json.dumps(doc).encode()
    yield json.dumps(doc, ensure_ascii=False, indent=rnd.choice((None, 1, "\t"))).encode("utf-8", "surrogatepass")
    yield dump(doc, rnd).encode("utf-8", "surrogatepass")


def python_model(doc: dict[str, Any]) -> bytes | None:
    m = doc.get("model")
    if not isinstance(m, str) or not m:
        return None
    try:
        return m.encode()
    except UnicodeEncodeError:  # a lone surrogate: msgspec refuses the body
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents(scan: Scanner, case: tuple[dict[str, Any], random.Random]) -> None:
    doc, rnd = case
    for body in encodings(doc, rnd):
        value, reason = check(scan, body)
        expected = oracle(body)
        assert value == expected, (reason, body)
        if b"\\ud" not in body.lower() and b"\xed" not in body:  # no surrogates anywhere
            assert value == python_model(doc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.data())
def test_mutated_bodies_never_give_a_wrong_value(
    scan: Scanner, case: tuple[dict[str, Any], random.Random], data: st.DataObject
) -> None:
    doc, rnd = case
    body = bytearray(dump(doc, rnd).encode("utf-8", "surrogatepass"))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["truncate", "delete", "insert", "replace", "duplicate"]))
        at = data.draw(st.integers(0, len(body)))
        byte = data.draw(
            st.one_of(st.sampled_from(list(b'"\\{}[],: \t\n0-1eE.u\x00\x01\xff\xc3')), st.integers(0, 255))
        )
        if op == "truncate":
            del body[at:]
        elif op == "delete":
            del body[at : at + data.draw(st.integers(1, 3))]
        elif op == "insert":
            body[at:at] = bytes([byte])
        elif op == "replace" and at < len(body):
            body[at] = byte
        elif op == "duplicate":
            body[at:at] = body[at : at + data.draw(st.integers(1, 12))]
    check(scan, bytes(body))


def test_every_truncation_of_a_body(eager: Scanner) -> None:
    body = dump(
        {
            "messages": [{"role": "user", "content": 'say "model" \\ é 😀\n', "model": "x"}],
            "model": "réal",
            "n": -1.5e3,
        },
        random.Random(7),
    ).encode()
    assert eager(body) == ("réal".encode(), None)
    for cut in range(len(body)):
        value, _ = eager(body[:cut], reps=3)
        assert value is None, body[:cut]


# ---------------------------------------------------------------------------------------- big bodies


def chat_body(size: int, rnd: random.Random, model: str = "gpt-4o-mini") -> bytes:
    """An openai-SDK-like body of exactly `size` bytes: messages (with decoys) first, model after."""
    words = [
        "the",
        "model",
        '"model":"fake"',
        "ünïcödé",
        "日本",
        "😀",
        "\\",
        '"',
        "\n",
        "{",
        "}",
        "[",
        "tab\t",
        "x" * 40,
    ]
    msgs: list[dict[str, Any]] = []
    base = {"messages": msgs, "model": model, "stream": True, "tools": [{"function": {"model": "decoy"}}]}
    while (room := size - 100 - len(json.dumps(base, ensure_ascii=False).encode())) > 80:
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 200)))
        msg = {"role": rnd.choice(["user", "assistant", "system"]), "content": text, "model": "decoy"}
        while len(json.dumps(msg, ensure_ascii=False).encode()) > room:
            msg["content"] = msg["content"][: len(msg["content"]) // 2]
        msgs.append(msg)
    body = json.dumps(base, ensure_ascii=False).encode()
    pad = size - len(body)
    assert pad >= 0
    return body[:-1] + b',"pad":"' + b"p" * max(0, pad - 9) + b'"}' if pad >= 9 else body + b" " * pad


@pytest.mark.parametrize("kib", [1, 2, 4, 7, 16, 33, 64])
def test_big_bodies(scan: Scanner, kib: int) -> None:
    rnd = random.Random(kib)
    body = chat_body(kib * 1024, rnd, model=f"model-{kib}-é")
    assert len(body) == kib * 1024
    assert scan(body, reps=20) == (f"model-{kib}-é".encode(), None)
    assert oracle(body) == f"model-{kib}-é".encode()
    # damage it somewhere: never a wrong value
    for _ in range(30):
        b = bytearray(body)
        at = rnd.randrange(len(b))
        b[at] = rnd.choice(b'"\\{}[],:\x00\x01\xff')
        check(scan, bytes(b))
    for cut in range(1, len(body), 997):
        assert scan(body[:cut], reps=2)[0] is None


def test_long_single_strings(scan: Scanner) -> None:
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 4095, 65536):
        filler = (string.ascii_letters * (n // 52 + 1))[:n]
        body = b'{"messages":[{"content":"' + filler.encode() + b'"}],"model":"m"}'
        assert scan(body, reps=5) == (b"m", None)
        assert scan(b'{"model":"' + filler.encode() + b'"}', reps=5) == (
            (filler.encode() or None),
            None if n else "empty",
        )


# ------------------------------------------------------------------------------- inside a real Envoy

ENVOY_LUA = """
package.preload["ipc_router_json"] = function(...)
%s
end
local top_level_string = require("ipc_router_json").top_level_string
local function hex(s)
    return (s:gsub(".", function(c) return string.format("%%02x", c:byte()) end))
end
function envoy_on_request(handle)
    local b = handle:body()
    local bytes = b and b:getBytes(0, b:length()) or ""
    local model, why = top_level_string(bytes, "model")
    handle:headers():replace("x-scan", model and ("v:" .. hex(model)) or ("r:" .. why))
end
jit.off(envoy_on_request)  -- as the filter's Envoy-calling functions: the scanner stays compiled
"""


@pytest.fixture(scope="module")
def envoy_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port, admin = free_port(), free_port()
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        "response_headers_to_add": [{"header": {"key": "x-scan", "value": "%REQ(x-scan)%"}}],
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "t",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": ENVOY_LUA % MODULE.read_text()},
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    listener = {
        "name": "t",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    conf = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener]},
    }
    work = tmp_path_factory.mktemp("envoy_json")
    (work / "envoy.yaml").write_text(yaml.safe_dump(conf))
    log = work / "envoy.log"
    cmd = [envoy_binary(), "-c", str(work / "envoy.yaml"), "--concurrency", "1", "--disable-hot-restart"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"envoy did not start:\n{read_tail(log)}")
            time.sleep(0.05)
        yield port
    finally:
        stop_process(proc)


@pytest.mark.envoy
def test_inside_envoy(envoy_port: int, eager: Scanner) -> None:
    rnd = random.Random(3)
    bodies = [v for v, _ in VECTORS if len(v) < 4000]
    bodies += [chat_body(kib * 1024, rnd, model=f"m-{kib}-é") for kib in (1, 16, 64)]
    conn = http.client.HTTPConnection("127.0.0.1", envoy_port, timeout=10)
    try:
        for body in bodies:
            value, reason = eager(body, reps=1)
            want = f"v:{value.hex()}" if value is not None else f"r:{reason}"
            for _ in range(3 if len(body) < 4000 else 30):  # later rounds run the scanner's traces
                conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                assert resp.getheader("x-scan") == want, body[:100]
    finally:
        conn.close()
