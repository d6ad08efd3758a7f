"""LuaJIT runtimes (lupa, JIT on) with ipc_router/lua/ipc_router_shm.lua loaded, for tests/test_shm.py
and the helper processes in tests/support/shm_proc.py."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LUA_DIR = ROOT / "ipc_router" / "lua"


def luajit() -> Any:
    """lupa's LuaJIT module (the shm code is LuaJIT FFI only)."""
    return importlib.import_module("lupa.luajit21")


# Records which functions have code in a finished trace (jit.attach "record" events collected per
# trace, kept on "stop", dropped on "abort"), so a test can prove that the loop it ran and the shm
# functions it called were compiled, not interpreted. (A loop's trace may start elsewhere: the hot
# exit of an inner loop starts a side trace that runs on into the outer loop.)
_SETUP = b"""
local dir = ...
package.path = dir .. "/?.lua;" .. package.path
local traces = { compiled = {}, pending = {}, n_stop = 0, n_abort = 0 }
jit.attach(function(tr, func)
    local p = traces.pending[tr]
    if not p then
        p = {}
        traces.pending[tr] = p
    end
    p[func] = true
end, "record")
jit.attach(function(what, tr)
    local p = traces.pending[tr]
    traces.pending[tr] = nil
    if what == "stop" then
        traces.n_stop = traces.n_stop + 1
        for f in pairs(p or {}) do
            traces.compiled[f] = (traces.compiled[f] or 0) + 1
        end
    elseif what == "abort" then
        traces.n_abort = traces.n_abort + 1
    end
end, "trace")
_G.shm_traces = traces
return require("ipc_router_shm")
"""


class ShmLua:
    """One Lua state (its own fds, so its own OFD locks) with the shm module."""

    def __init__(self) -> None:
        self.rt = luajit().LuaRuntime(encoding=None)
        status = self.rt.execute(b"return jit.status()")
        if status is not True and not (isinstance(status, tuple) and status[0] is True):
            raise RuntimeError(f"LuaJIT's JIT is off: {status!r}")
        self.m = self.rt.execute(_SETUP, str(LUA_DIR).encode())
        self._call = self.rt.eval(
            b"function(f, ...) local function pack(...) return { n = select('#', ...), ... } end"
            b" return pack(f(...)) end"
        )

    def fn(self, src: str) -> Any:
        """Compiles a Lua function expression."""
        return self.rt.eval(src.encode())

    def call(self, f: Any, *args: Any) -> list[Any]:
        """Calls a Lua function, returning all its results as a list (nil included, as None)."""
        t = self._call(f, *args)
        return [t[i] for i in range(1, int(t.n) + 1)]

    def open(self, path: str) -> list[Any]:
        return self.call(self.m.open, path.encode())

    def compiled(self, f: Any) -> int:
        """How many finished traces hold code of function f."""
        return int(self.rt.eval(b"function(f) return shm_traces.compiled[f] or 0 end")(f))

    def method(self, name: str) -> Any:
        """A method of the segment objects (Seg.lookup, ...), for compiled()."""
        return self.rt.eval(b"function(m, n) return m._Seg[n] end")(self.m, name.encode())

    def table(self, items: list[Any], base: int = 1) -> Any:
        t = self.rt.table()
        for i, v in enumerate(items):
            t[i + base] = v
        return t
