"""Bench configurations that are more than a flag: configuration 10's Lua (routing and usage reading) does
what it claims, and the native-recording probes are bootstraps Envoy accepts, with what they claim to add."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import luajit21

from bench.e2e.configs import (
    CONFIGURATIONS,
    INLINE_USAGE_LUA,
    NATIVE_PROBES,
    NativeProbeStack,
    inline_lua_code,
    write_config,
)
from bench.e2e.mix import MODELS
from ipc_router.filterapi import DEFAULT_SELECTED_ROUTE_HEADER_KEY
from tests.test_envoy_config import envoy_validate, needs_envoy

_FAKE = r"""
local code, route, status, ctype, chunks = ...
local env = setmetatable({}, {__index = _G})
local f = assert(loadstring(code .. "\nreturn TOTALS"))
setfenv(f, env)
local totals = f()
local function map(t) return {get = function(_, k) return t[k] end} end
local handle = {
  requestHeaders = function() return map({["@ROUTE@"] = route}) end,
  headers = function() return map({[":status"] = status, ["content-type"] = ctype}) end,
  bodyChunks = function()
    local i = 0
    return function()
      i = i + 1
      local c = chunks[i]
      if c == nil then return nil end
      return {length = function() return #c end, getBytes = function(_, s, n) return c:sub(s + 1, s + n) end}
    end
  end,
}
env.envoy_on_response(handle)
return totals
"""


def _run(lua: Any, route: str | None, status: str, ctype: str, chunks: list[str]) -> Any:
    fake = lua.execute("return function(...) " + _FAKE.replace("@ROUTE@", DEFAULT_SELECTED_ROUTE_HEADER_KEY)
                       + " end")  # fmt: skip
    code = inline_lua_code(MODELS) + INLINE_USAGE_LUA
    return fake(code, route, status, ctype, lua.table_from({i + 1: c for i, c in enumerate(chunks)}))


JSON = '{"id":"x","usage":{"prompt_tokens":412,"completion_tokens":9,"total_tokens":421}}'
SSE = [
    'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n',
    'data: {"choices":[],"usage":{"prompt_tokens" : 40,"completion_tokens": 7}}\n\n',
    "data: [DONE]\n\n",
]


def test_inline_usage_lua_reads_usage_of_json_and_streams() -> None:
    lua = luajit21.LuaRuntime()
    t = _run(lua, "r1", "200", "application/json", [JSON[:30], JSON[30:]])
    assert (t.r1.requests, t.r1.streams, t.r1.errors, t.r1.prompt, t.r1.completion) == (1, 0, 0, 412, 9)
    # The usage in the last two chunks of a stream (the tail the configuration keeps).
    t = _run(lua, "r2", "200", "text/event-stream; charset=utf-8", SSE)
    assert (t.r2.requests, t.r2.streams, t.r2.prompt, t.r2.completion) == (1, 1, 40, 7)
    t = _run(lua, "r3", "503", "text/plain", ["upstream connect error"])
    assert (t.r3.requests, t.r3.errors, t.r3.prompt) == (1, 1, 0)
    t = _run(lua, None, "200", "application/json", [JSON])  # not routed by it: nothing counted
    assert len(list(t.keys())) == 0


def test_inline_usage_is_a_default_configuration() -> None:
    entry = next(c for c in CONFIGURATIONS if c.key == "inline_lua_usage")
    assert entry.number == 10 and not entry.split


def _filters(doc: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["name"] for f in hcm["http_filters"]], hcm


@needs_envoy
@pytest.mark.parametrize("key", sorted(NATIVE_PROBES))
def test_native_probe_bootstrap_is_valid(key: str, tmp_path: Path) -> None:
    entry = next(c for c in CONFIGURATIONS if c.key == key)
    config = write_config(tmp_path, {m: 10000 + i for i, m in enumerate(MODELS)})
    stack = NativeProbeStack(str(config), **entry.stack_options)
    try:
        doc = stack.bootstrap_dict()
        names, hcm = _filters(doc)
        parts = NATIVE_PROBES[key][1]
        assert ("envoy.filters.http.json_to_metadata" in names) == ("j2m" in parts)
        assert ("envoy.filters.http.sse_to_metadata" in names) == ("sse" in parts)
        assert ("access_log" in hcm) == ("log" in parts)
        lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
        assert "\nfunction envoy_on_response(" not in lua["typed_config"]["default_source_code"]["inline_string"]
        path = tmp_path / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        envoy_validate(path)
    finally:
        stack.stop()  # nothing was started: this removes its work directory (the access log's)


def test_same_job_ratios_are_per_round_medians_and_absent_without_configuration_10() -> None:
    from bench.e2e.report import same_job

    summary = {"ipc_router_shm": {"added_p50_us": 60.0}, "inline_lua_usage": {"added_p50_us": 40.0}}
    runs = [
        {"config": "ipc_router_shm", "c": 16, "round": 1, "rps": 900.0},
        {"config": "inline_lua_usage", "c": 16, "round": 1, "rps": 1000.0},
        {"config": "ipc_router_shm", "c": 16, "round": 2, "rps": 1000.0},
        {"config": "inline_lua_usage", "c": 16, "round": 2, "rps": 1000.0},
        {"config": "ipc_router_shm", "c": 16, "round": 3, "rps": 2000.0},
        {"config": "inline_lua_usage", "c": 16, "round": 3, "rps": 2000.0},
        {"config": "ipc_router_shm", "c": 1, "round": 1, "rps": 1.0},  # c=1: not a throughput figure
    ]
    rps, latency = same_job(summary, runs, 16)
    assert rps["value"] == 1.0  # the median of 0.9, 1.0, 1.0
    assert latency["value"] == 1.5
    assert same_job({"ipc_router_shm": summary["ipc_router_shm"]}, runs, 16) == []


def test_same_job_adds_the_worker_time_ratios_when_the_runs_have_them() -> None:
    from bench.e2e.report import same_job

    def run(config: str, rnd: int, worker: float) -> dict[str, Any]:
        return {"config": config, "c": 16, "round": rnd, "rps": 1.0,
                "cpu_us_per_request": {"envoy": worker + 1, "envoy_worker": worker}}  # fmt: skip

    runs = [run("ipc_router_shm", 1, 50.0), run("inline_lua", 1, 45.0),
            run("ipc_router_shm", 2, 60.0), run("inline_lua", 2, 48.0),
            run("ipc_router_shm", 3, 40.0), run("inline_lua", 3, 40.0)]  # fmt: skip
    summary = {"ipc_router_shm": {"added_p50_us": None}, "inline_lua": {"added_p50_us": None}}
    (worker,) = same_job(summary, runs, 16)
    assert worker["text"].startswith("ipc_router (shm): inline Lua's Envoy worker")
    assert worker["value"] == 0.9  # the median of 0.9, 0.8, 1.0: inline's worker time over the fast path's


_WORKER = r"""
import ctypes, sys, threading, time
def spin(seconds):
    # the thread names itself as Envoy names its workers (prctl PR_SET_NAME)
    ctypes.CDLL(None).prctl(15, b"wrk:worker_0", 0, 0, 0)
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    ready.set()
    time.sleep(60)
ready = threading.Event()
threading.Thread(target=spin, args=(float(sys.argv[1]),), daemon=True).start()
ready.wait()
print("spun", flush=True)
time.sleep(0.3)  # the main thread spins too: it must not count
end = time.thread_time() + 0.3
while time.thread_time() < end:
    pass
print("done", flush=True)
time.sleep(60)
"""


def test_worker_run_seconds_counts_envoy_worker_threads_only() -> None:
    import subprocess
    import sys

    from bench.e2e.configs import worker_run_seconds

    proc = subprocess.Popen([sys.executable, "-c", _WORKER, "0.25"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"spun"
        first = worker_run_seconds(proc.pid)
        assert first is not None and 0.24 <= first < 0.5
        assert proc.stdout.readline().strip() == b"done"
        again = worker_run_seconds(proc.pid)
        assert again is not None and again - first < 0.05  # the main thread's 0.3 s is not a worker's
    finally:
        proc.kill()
        proc.wait()
    assert worker_run_seconds(proc.pid) is None  # gone
    assert worker_run_seconds(os.getpid()) is None  # no thread of pytest's is named like a worker


def test_split_table_prefers_the_worker_figure_when_every_run_has_it() -> None:
    from bench.e2e.split import cpu_field, paired_delta

    def run(config: str, rnd: int, envoy: float, worker: float | None) -> dict[str, Any]:
        cpu = {"envoy": envoy, **({"envoy_worker": worker} if worker is not None else {})}
        return {"config": config, "c": 16, "round": rnd, "rps": 1.0, "cpu_us_per_request": cpu}

    runs = [run("ipc_router_shm", 1, 60.0, 55.0), run("inline_lua", 1, 52.0, 49.0),
            run("ipc_router_shm", 2, 64.0, 56.0), run("inline_lua", 2, 50.0, 48.0)]  # fmt: skip
    result = {"params": {"concurrency": [1, 16]}, "runs": runs}
    assert cpu_field(result) == "envoy_worker"
    assert paired_delta(result, "inline_lua", "ipc_router_shm", 16) == -7.0  # median of -6, -8
    runs.append(run("ipc_router_shm", 3, 61.0, None))  # an older result: the process figure for all
    assert cpu_field(result) == "envoy"
    assert paired_delta(result, "inline_lua", "ipc_router_shm", 16) == -11.0  # median of -8, -14
