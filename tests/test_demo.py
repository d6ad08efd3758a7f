"""The demo cannot rot: run it in quick mode and check what its table says."""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parent.parent


def test_demo_table_shows_routes_and_statuses() -> None:
    # Free ports: the suite must pass where something already listens on the demo's fixed ones.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--free-ports"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[1].isdigit():
            rows[cells[0]] = cells
    assert rows["gpt-4o-mini"][1:4] == ["200", "gpt", "openai-mock"]
    assert rows["mistral-large (regex rule)"][1:4] == ["200", "mistral", "vllm-a"]
    assert rows["gpt-4o-mini, x-tenant: premium"][1:4] == ["200", "premium", "premium-pool"]
    assert rows["llama3.3, streaming"][1:3] == ["200", "llama"]
    assert rows["unknown model"][1] == "404" and rows["malformed JSON body"][1] == "400"
    assert "llama3.3, gpt-4o-mini" in rows["GET /v1/models"][6]
    # The token budget: 30 a day for x-user-id alice, 18 an answer: the third request is refused by Envoy.
    budget = [rows[f"gpt-4o-mini, x-user-id: alice #{i}"] for i in range(1, 4)]
    assert [r[1] for r in budget] == ["200", "200", "429"]
    assert budget[2][3] == "-" and budget[2][6].startswith("Token budget 'per-user'")
    llama = [rows[f"llama3.3 #{i}"] for i in range(1, 5)]
    assert sorted(r[3] for r in llama) == ["vllm-a", "vllm-a", "vllm-a", "vllm-b"]  # weights 3:1
    assert all(r[4] == "10/8" for r in llama)
    # The metrics summary saw every routed request.
    assert re.search(r"llama3\.3\s+5\s+50\s+40", out), out
    # Nothing left behind: the sidecar's socket directory is gone.
    sock = re.search(r"sidecar on (\S+)", out)
    assert sock and not os.path.exists(sock.group(1).rstrip(","))
    workdir = os.path.dirname(sock.group(1))
    left = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True)
    assert left.stdout == "", f"processes left running: {left.stdout}"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--listen-port", "--admin-port", "--metrics-port"])
def test_demo_names_a_taken_port_and_the_flag_to_choose_another(taken_port: int, flag: str) -> None:
    others = [f for f in ("--listen-port", "--admin-port", "--metrics-port") if f != flag]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", flag, str(taken_port),
         *(arg for f in others for arg in (f, "0"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""  # nothing was started
    err = proc.stderr
    assert f"demo: port {taken_port} (" in err and "is already in use on 127.0.0.1" in err, err
    assert f"Choose another with {flag} N (0: any free port), e.g. make demo ARGS='{flag} 0', or use --free-ports" \
        in err  # fmt: skip


def test_demo_names_a_taken_mock_provider_port_and_free_ports_moves_them(tmp_path: Path) -> None:
    demo = _demo_module()
    port, names = sorted(demo.mock_ports(demo.CONFIG).items())[0]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"port {port} is taken on this machine already")
        s.listen()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
             "--listen-port", "0", "--admin-port", "0", "--metrics-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"demo: port {port} (mock provider {'+'.join(names)}, from config.yaml) is already in use" in proc.stderr
    assert "Run with --free-ports (make demo ARGS=--free-ports)" in proc.stderr
    # --free-ports runs a copy of the config whose providers are on other ports, the same backends on each
    moved = demo.mock_ports(demo.config_on_free_ports(tmp_path))
    assert set(moved).isdisjoint(demo.mock_ports(demo.CONFIG))
    assert sorted(moved.values()) == sorted(demo.mock_ports(demo.CONFIG).values())


def _demo_module() -> ModuleType:
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("examples.demo")
    finally:
        sys.path.remove(str(ROOT))
