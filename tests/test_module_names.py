"""The AI Gateway's module names (``ipc_router.x``, ``ipc_router.filterapi``) are the same module objects as the
descriptive ones, so a launcher that sets an attribute through either name is seen by the server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import ipc_router
import ipc_router.config
import ipc_router.extensions
import ipc_router.filterapi
import ipc_router.x
from ipc_router.config import Config, parse_config
from ipc_router.router import Routing

CONFIG = parse_config("rules:\n  - name: a\n    headers: [{name: x-ai-eg-model, value: m}]\n  - name: b\n")


class Fixed:
    def __init__(self, rule: str) -> None:
        self.rule = rule

    def calculate(self, request_headers: Mapping[str, str]) -> str:
        return self.rule


def test_old_names_are_the_same_module_objects() -> None:
    assert ipc_router.x is ipc_router.extensions
    assert ipc_router.filterapi is ipc_router.config
    assert sys.modules["ipc_router.x"] is ipc_router.extensions
    assert sys.modules["ipc_router.filterapi"] is ipc_router.config
    from ipc_router.filterapi import Config as OldConfig
    from ipc_router.x import NoMatchingRuleError as OldError

    assert OldConfig is Config
    assert OldError is ipc_router.extensions.NoMatchingRuleError


@pytest.fixture
def restore_router() -> Iterator[None]:
    saved = ipc_router.extensions.new_custom_router
    yield
    ipc_router.extensions.new_custom_router = saved


@pytest.mark.parametrize("module", ["x", "extensions"])
def test_custom_router_set_through_either_name_is_seen(module: str, restore_router: None) -> None:
    def factory(default: object, config: Config) -> Fixed:
        return Fixed("b")

    assert Routing(CONFIG).route({"x-ai-eg-model": "m"})[0].name == "a"
    if module == "x":
        ipc_router.x.new_custom_router = factory
    else:
        ipc_router.extensions.new_custom_router = factory
    assert ipc_router.x.new_custom_router is factory
    assert ipc_router.extensions.new_custom_router is factory
    assert Routing(CONFIG).route({"x-ai-eg-model": "m"})[0].name == "b"


LAUNCHER = '''
from collections.abc import Mapping

import ipc_router.extensions
import ipc_router.x
from ipc_router.filterapi import Config
from ipc_router.x import Router


class Fixed:
    def calculate(self, request_headers: Mapping[str, str]) -> str:
        return "b"


def factory(default_router: Router, config: Config) -> Router:
    return Fixed()


ipc_router.x.new_custom_router = factory
ipc_router.extensions.new_custom_router = factory
'''


def test_a_launcher_using_the_old_names_passes_mypy_strict(tmp_path: Path) -> None:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    bad = tmp_path / "bad.py"  # the same check must be able to fail
    bad.write_text("import ipc_router.x\n\nipc_router.x.new_custom_router = 1\n")
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "c")]
    ok = subprocess.run([*cmd, str(launcher)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run([*cmd, str(bad)], capture_output=True, text=True)
    assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout, wrong.stdout
