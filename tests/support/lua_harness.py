"""Runs ipc_router/lua/ipc_router.lua under lupa with a fake Envoy stream handle (unit level).

The fake handle mimics the parts of Envoy's Lua API the filter uses, including behaviours
checked against Envoy 1.40: wrappers returned by ``handle:headers()`` stop working after the
script yields (``body()``, a synchronous ``httpCall()``, each ``bodyChunks()`` step),
``respond()`` never returns (the script is suspended for good), and a header map is a list
(a repeated header is iterated once per value) that cannot be changed while ``pairs()`` iterates
it. As in Envoy, whose LuaJIT is built with LUA52COMPAT, ``pairs()`` honours ``__pairs``. Both
phases run in a coroutine.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODULE_PATH = ROOT / "ipc_router" / "lua" / "ipc_router.lua"


def _lupa_module() -> Any:
    for name in ("lupa.luajit21", "lupa.luajit20", "lupa.lua51"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module("lupa")


LUPA = _lupa_module()

FAKE_LUA = r"""
local M = ...
local H = {}

local function copy(t)
  local out = {}
  for k, v in pairs(t or {}) do out[k] = v end
  return out
end

-- spec: headers (map) or header_list (list of {name, value}, in order, names may repeat),
--       body (string|nil), answer {status=, body=, headers=} | answer_error (string),
--       during_body (function run while body() is suspended: what other streams do meanwhile),
--       chunks (list of strings, response phase), metadata (map: namespace -> table),
--       request_headers (map: what handle:requestHeaders() sees in the response phase)
-- rec.list is the header map ({name, value} entries), rec.store name -> first value.
function H.make(spec)
  local rec = {
    list = {}, store = {}, epoch = 0, http_calls = {}, n_http = 0, logs = {}, n_logs = 0,
    cleared = 0, responded = false, metadata = copy(spec.metadata), chunk_times = {},
    body_calls = 0, headers_calls = 0, iterating = false,
  }
  if spec.header_list then
    for i, e in ipairs(spec.header_list) do rec.list[i] = { e[1], e[2] } end
  else
    for k, v in pairs(spec.headers or {}) do rec.list[#rec.list + 1] = { k, v } end
  end
  for _, e in ipairs(rec.list) do
    if rec.store[e[1]] == nil then rec.store[e[1]] = e[2] end
  end
  local handle = {}

  local function log(level, msg)
    rec.n_logs = rec.n_logs + 1
    rec.logs[rec.n_logs] = level .. ": " .. msg
  end

  local function yield_point()
    rec.epoch = rec.epoch + 1
  end

  local function remove_all(k)
    local kept = {}
    for _, e in ipairs(rec.list) do
      if e[1] ~= k then kept[#kept + 1] = e end
    end
    rec.list = kept
    rec.store[k] = nil
  end

  function handle:headers()
    rec.headers_calls = rec.headers_calls + 1
    local epoch = rec.epoch
    local function live(modify)
      if rec.epoch ~= epoch then error("object used outside of proper scope", 3) end
      if modify and rec.iterating then error("header map can not be modified while iterating", 3) end
    end
    local methods = {
      get = function(_, k) live(); return rec.store[k] end,
      replace = function(_, k, v)
        live(true); remove_all(k); rec.list[#rec.list + 1] = { k, v }; rec.store[k] = v
      end,
      add = function(_, k, v)
        live(true); rec.list[#rec.list + 1] = { k, v }
        if rec.store[k] == nil then rec.store[k] = v end
      end,
      remove = function(_, k) live(true); remove_all(k) end,
    }
    local function iterate()
      live()
      local list, i = rec.list, 0
      rec.iterating = true
      return function()
        live()
        i = i + 1
        local e = list[i]
        if e == nil then
          rec.iterating = false
          return nil
        end
        return e[1], e[2]
      end
    end
    return setmetatable({}, { __index = methods, __pairs = iterate })
  end

  -- The request's headers in the response phase (Envoy 1.40's handle:requestHeaders()); read-only here:
  -- spec.request_headers (map).
  function handle:requestHeaders()
    local epoch = rec.epoch
    local store = spec.request_headers or {}
    return {
      get = function(_, k)
        if rec.epoch ~= epoch then error("object used outside of proper scope", 2) end
        return store[k]
      end,
    }
  end

  function handle:body()
    rec.body_calls = rec.body_calls + 1
    yield_point()
    if spec.during_body then spec.during_body() end -- what other streams of this worker did meanwhile
    if spec.body == nil then return nil end
    local data = spec.body
    return {
      length = function() return #data end,
      getBytes = function(_, i, n)
        assert(i >= 0 and n >= 0 and i + n <= #data, "index/length out of range")
        return data:sub(i + 1, i + n)
      end,
    }
  end

  function handle:bodyChunks()
    local i = 0
    local chunks = spec.chunks or {}
    return function()
      yield_point()
      i = i + 1
      local data = chunks[i]
      if data == nil then return nil end
      rec.chunk_times[i] = M.now_ns and M.now_ns() and tonumber(M.now_ns()) or 0
      return {
        length = function() return #data end,
        getBytes = function(_, a, n)
          assert(a >= 0 and n >= 0 and a + n <= #data, "index/length out of range")
          return data:sub(a + 1, a + n)
        end,
      }
    end
  end

  function handle:httpCall(cluster, headers, body, options)
    assert(type(options) == "table", "options table expected")
    for k in pairs(options) do
      assert(k == "asynchronous" or k == "timeout_ms" or k == "trace_sampled"
        or k == "return_duplicate_headers" or k == "send_xff", "not valid key for httpCall() options")
    end
    rec.n_http = rec.n_http + 1
    rec.http_calls[rec.n_http] = {
      cluster = cluster, headers = copy(headers), body = body, options = copy(options),
      t = M.now_ns and M.now_ns() and tonumber(M.now_ns()) or 0,
    }
    if options.asynchronous then return end
    if spec.answer_error then error(spec.answer_error) end
    yield_point()
    local a = spec.answer or {}
    local h = copy(a.headers)
    h[":status"] = tostring(a.status or 200)
    if a.body == nil or a.body == "" then return h, nil end
    return h, a.body
  end

  function handle:clearRouteCache() rec.cleared = rec.cleared + 1 end

  function handle:respond(headers, body)
    assert(not rec.responded, "respond() twice")
    rec.responded = true
    rec.respond_headers = copy(headers)
    rec.respond_body = body
    coroutine.yield("responded")
    error("respond() resumed")
  end

  function handle:streamInfo()
    return {
      dynamicMetadata = function()
        return {
          get = function(_, ns) return rec.metadata[ns] end,
          set = function(_, ns, k, v)
            rec.metadata[ns] = rec.metadata[ns] or {}
            rec.metadata[ns][k] = v
          end,
        }
      end,
    }
  end

  function handle:logWarn(msg) log("warn", msg) end
  function handle:logErr(msg) log("err", msg) end
  function handle:logInfo(msg) log("info", msg) end
  function handle:logDebug(msg) log("debug", msg) end

  return handle, rec
end

-- Runs filter:on_request / on_response in a coroutine like Envoy does.
function H.run(filter, phase, spec)
  local handle, rec = H.make(spec)
  local co = coroutine.create(function() return filter[phase](filter, handle) end)
  local ok, err = coroutine.resume(co)
  rec.ok = ok
  rec.err = err
  rec.status = coroutine.status(co)
  return rec
end

return H
"""


def new_runtime() -> Any:
    return LUPA.LuaRuntime(encoding=None, unpack_returned_tuples=True)


# pairs() honouring __pairs, as in Envoy (its LuaJIT is built with LUAJIT_ENABLE_LUA52COMPAT).
PAIRS52 = b"""
local rawpairs, getmetatable, type = pairs, getmetatable, type
pairs = function(t)
  local mt = getmetatable(t)
  if type(mt) == "table" and mt.__pairs then return mt.__pairs(t) end
  return rawpairs(t)
end
"""


def loader_code(module_text: str) -> str:
    """The loader the bootstrap generator emits (see ipc_router/lua/ipc_router.lua's header)."""
    return 'package.preload["ipc_router"] = function(...) ' + module_text + "\nend\n"


class Lua:
    """A Lua state with the module loaded the way Envoy loads it, plus the fake handle."""

    def __init__(self, setup: bytes = b"") -> None:
        """``setup``: Lua code run before the module is loaded (e.g. a fake ``ffi`` in package.loaded)."""
        self.rt = new_runtime()
        self.rt.execute(PAIRS52)
        self.rt.execute(setup)
        text = MODULE_PATH.read_text()
        self.rt.execute(loader_code(text).encode())
        self.M = self.rt.execute(b'return require("ipc_router")')
        self.H = self.rt.execute(FAKE_LUA.encode(), self.M)

    def table(self, value: Any) -> Any:
        """Python -> Lua: dict -> table, list/tuple -> table 1..n, str -> Lua string."""
        if isinstance(value, dict):
            t = self.rt.table()
            for k, v in value.items():
                t[self.table(k)] = self.table(v)
            return t
        if isinstance(value, list | tuple):
            t = self.rt.table()
            for i, v in enumerate(value, 1):
                t[i] = self.table(v)
            return t
        if isinstance(value, str):
            return value.encode()
        return value

    def filter(self, **conf: Any) -> Any:
        return self.M.new(self.table(conf))

    def run(self, filt: Any, phase: str, **spec: Any) -> Any:
        return self.H.run(filt, phase.encode(), self.table(spec))


def py(value: Any) -> Any:
    """Lua -> Python: tables become dicts (keys as given), strings stay bytes."""
    if LUPA.lua_type(value) == "table":
        return {py(k): py(v) for k, v in value.items()}
    return value


def seq(value: Any) -> list[Any]:
    """A Lua table 1..n -> Python list."""
    d = py(value)
    return [d[i] for i in range(1, len(d) + 1)]
