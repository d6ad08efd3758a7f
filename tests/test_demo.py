"""The demo cannot rot: run it in quick mode and check what its table says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parent.parent


def test_demo_table_shows_routes_and_statuses() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick"],
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
