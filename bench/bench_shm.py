"""Micro-benchmarks of the shared-memory fast path (docs/shm.md): the Lua side's route lookup, compiled by
LuaJIT (lupa, JIT on, as in Envoy), and the sidecar's drain of the completion rings.

Each benchmark runs 1000 operations per call (lupa's call overhead would dominate a single lookup) and checks
their results. ``make bench`` times them; plain ``pytest bench`` runs each once.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from ipc_router import shm
from tests.support.shm_lua import ShmLua  # lupa's LuaJIT, JIT on, with ipc_router_shm.lua loaded

N = 1000


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[shm.Segment, str]]:
    if not shm.supported():
        pytest.skip("shared-memory fast path not supported on this platform")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(base, f"ipcr-bench-{os.getpid()}-{random.getrandbits(32):08x}.shm")
    seg, _ = shm.Segment.open(path, slots=1024, rings=1, ring_bytes=1 << 20, blob_bytes=4096)
    seg.publish(1, b"bench-config")
    try:
        yield seg, path
    finally:
        seg.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)


def lua_segment(lua: ShmLua, path: str) -> Any:
    s, *err = lua.open(path)
    assert s is not None, err
    assert lua.call(lua.fn("function(s) return s:refresh() end"), s) == [True]
    return s


def test_shm_lookup_1000_hits(benchmark: BenchmarkFixture, segment: tuple[shm.Segment, str]) -> None:
    seg, path = segment
    keys = [f"model-{i}".encode() for i in range(100)]
    for i, k in enumerate(keys):
        assert seg.put_route(k, i)
    lua = ShmLua()
    s = lua_segment(lua, path)
    loop = lua.fn(
        """function(s, keys, n)
        local sum = 0
        for i = 1, n do sum = sum + (s:lookup(keys[i % 100]) or -1000000) end
        return sum
    end"""
    )
    table = lua.table(keys, base=0)
    total = benchmark(loop, s, table, N)
    assert total == sum(i % 100 for i in range(1, N + 1))  # every lookup hit its own rule
    assert lua.compiled(lua.method("lookup")) >= 1, "the lookup ran compiled"


def test_shm_drain_1000_records(benchmark: BenchmarkFixture, segment: tuple[shm.Segment, str]) -> None:
    seg, path = segment
    lua = ShmLua()
    s = lua_segment(lua, path)
    write = lua.fn(
        """function(s, n)
        local ok = 0
        for i = 1, n do if s:write(string.rep("r", 180) .. i) then ok = ok + 1 end end
        return ok
    end"""
    )

    def fill() -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert write(s, N) == N
        return (), {}

    drained = benchmark.pedantic(seg.drain, setup=fill, rounds=50)
    assert len(drained) == N and drained[-1] == b"r" * 180 + str(N).encode()
