"""The split variants of the fast path (bench/e2e/configs.py SPLIT) still match the filter they patch.

The variants are text patches of the generated Lua code; when the filter changes under them they must fail here
(in `make test`), not silently measure something else in the next `make bench`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lupa import luajit21

from bench.e2e.configs import (
    CONFIGURATIONS,
    NATIVE_PROBES,
    SPLIT,
    SetupError,
    VariantStack,
    patch_lua,
    write_config,
)
from bench.e2e.mix import MODELS


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {m: 10000 + i for i, m in enumerate(MODELS)})


def _lua_code(stack: VariantStack) -> str:
    for f in stack.bootstrap_dict()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]:
        if f["name"] == "envoy.filters.http.lua":
            code: str = f["typed_config"]["default_source_code"]["inline_string"]
            return code
    raise AssertionError("no Lua filter")


@pytest.mark.parametrize("key", sorted(SPLIT))
def test_variant_applies_and_compiles(key: str, config: Path) -> None:
    entry = next(c for c in CONFIGURATIONS if c.key == key)
    assert entry.split and entry.stack_options["shm"] is True
    stack = VariantStack(str(config), shm=True, patches=SPLIT[key][1])
    plain = _lua_code(VariantStack(str(config), shm=True))
    code = _lua_code(stack)
    assert code != plain
    lua = luajit21.LuaRuntime()
    lua.execute("function compiles(s) local f, err = loadstring(s); return f ~= nil, err end")
    ok, err = lua.globals().compiles(code)
    assert ok, err


def test_patch_that_does_not_apply_is_an_error() -> None:
    with pytest.raises(SetupError, match="applies 0 times"):
        patch_lua("local a = 1\n", (("local b = 2\n", ""),))
    with pytest.raises(SetupError, match="applies 2 times"):
        patch_lua("x\nx\n", (("x\n", "y\n"),))


def test_split_variants_are_not_in_the_default_run() -> None:
    assert {c.key for c in CONFIGURATIONS if c.split} == set(SPLIT) | set(NATIVE_PROBES)
