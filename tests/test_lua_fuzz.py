"""The filter's answer decoder under LuaJIT (JIT on) against random and mutated input: it never raises, and every
result is one of the actions the filter knows (set / respond / the failure policy). A bad answer from the sidecar
must only ever turn into the failure policy, never into an Envoy Lua error."""

from __future__ import annotations

import random

import msgpack
import pytest

from tests.support.lua_harness import LUPA, Lua

pytestmark = pytest.mark.skipif(not LUPA.__name__.startswith("lupa.luajit"), reason="needs LuaJIT")

N = 20_000

FUZZ = b"""
local M, inputs, mode = ...
local conf = { failure_mode = mode, fallback_route = "fb" }
local counts = { set = 0, respond = 0, fallback = 0, errors = 0 }
for i = 1, #inputs do
  local ok, action = pcall(M.decide, 200, inputs[i], conf)
  if not ok or type(action) ~= "table" then
    counts.errors = counts.errors + 1
  else
    local kind = action.action
    if kind == "set" then
      for k, v in pairs(action.headers) do
        if type(k) ~= "string" or type(v) ~= "string" then counts.errors = counts.errors + 1 end
      end
    elseif kind == "respond" then
      if type(action.status) ~= "number" or action.status < 200 or action.status > 599
        or type(action.body) ~= "string" then counts.errors = counts.errors + 1 end
    elseif kind ~= "fallback" then
      counts.errors = counts.errors + 1
    end
    counts[kind] = (counts[kind] or 0) + 1
  end
end
return counts, jit and jit.status()
"""

SEEDS = [
    {"set": {"x-ai-eg-selected-route": "r", "x-ai-eg-model": "m"}, "id": "abc"},
    {"respond": {"status": 404, "headers": {"content-type": "application/json"}, "body": b'{"error":{}}'}},
    {"set": {"a": "b"}},
    {"respond": {"status": 503}},
]


def inputs(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    seeds = [msgpack.packb(s, use_bin_type=True) for s in SEEDS]
    out: list[bytes] = []
    while len(out) < N:
        kind = rnd.random()
        if kind < 0.3:
            out.append(rnd.randbytes(rnd.randint(0, 64)))
        else:
            b = bytearray(rnd.choice(seeds))
            for _ in range(rnd.randint(1, 4)):
                op = rnd.random()
                i = rnd.randrange(len(b)) if b else 0
                if op < 0.4 and b:
                    b[i] = rnd.randrange(256)
                elif op < 0.6:
                    b[i:i] = rnd.randbytes(rnd.randint(1, 8))
                elif op < 0.8 and b:
                    del b[i : i + rnd.randint(1, 8)]
                else:
                    b = b[: rnd.randint(0, len(b))]
            out.append(bytes(b))
    return out


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
def test_answer_decoder_never_raises_on_random_and_mutated_input(mode: str) -> None:
    lua = Lua()
    data = inputs(1234 if mode == "fail_closed" else 4321)
    table = lua.rt.table_from(data)
    counts, status = lua.rt.execute(FUZZ, lua.M, table, mode.encode())
    assert status is True  # compiled: the JIT is on
    counts = dict(counts.items())
    assert counts[b"errors"] == 0
    assert sum(v for k, v in counts.items() if k != b"errors") == N
    # The mutations reach every outcome, so the decoder's checks were exercised, not just its first guard.
    assert counts[b"set"] > 0 and counts[b"respond"] > 0
    failure = b"respond" if mode == "fail_closed" else b"fallback"
    assert counts.get(failure, 0) > N // 4
