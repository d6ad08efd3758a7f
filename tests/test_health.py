"""The exec probe: ``python -m ipc_router.health`` / ``ipc-router health`` against the real sidecar and failures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from test_server import Server, subprocess_env

PROBES = (
    [sys.executable, "-m", "ipc_router.health"],
    [sys.executable, "-m", "ipc_router.cli", "health"],
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ipr", dir="/tmp"))  # short: socket paths must stay under 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def probe(cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], env=subprocess_env(), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("cmd", PROBES, ids=["module", "cli"])
def test_probe_passes_on_a_live_sidecar_and_fails_once_it_is_gone(tmp: Path, cmd: list[str]) -> None:
    server = Server(tmp, ())
    try:
        server.start()
        ok = probe(cmd, "--socket", server.socket)
        assert ok.returncode == 0, ok.stderr
        assert orjson.loads(ok.stdout) == {"status": "ok", "generation": 1}
    finally:
        server.stop()
    gone = probe(cmd, "--socket", server.socket)  # killed: the stale socket file refuses connections
    assert gone.returncode == 1
    assert server.socket in gone.stderr and "refused" in gone.stderr.lower()


def test_probe_fails_without_a_socket(tmp: Path) -> None:
    result = probe(PROBES[0], "--socket", str(tmp / "missing.sock"))
    assert result.returncode == 1
    assert "No such file" in result.stderr


def _serve_once(sock: socket.socket, answer: bytes | None) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.recv(4096)
        if answer is None:
            threading.Event().wait(3)  # never answers: the probe's timeout must fire
        else:
            conn.sendall(answer)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", "503"),
        (b"", "no answer"),
        (None, "timed out"),
    ],
    ids=["503", "closed", "silent"],
)
def test_probe_fails_on_a_bad_or_no_answer(tmp: Path, answer: bytes | None, message: str) -> None:
    path = str(tmp / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    t = threading.Thread(target=_serve_once, args=(listener, answer), daemon=True)
    t.start()
    try:
        result = probe(PROBES[0], "--socket", path, "--timeout", "0.5")
    finally:
        t.join(5)
        listener.close()
    assert result.returncode == 1
    assert message in result.stderr
