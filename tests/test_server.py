"""The real sidecar: ``python -m ipc_router.cli serve`` as a subprocess, spoken to over its Unix socket with raw
HTTP/1.1 (msgpack and JSON), plus hot reload, signals, socket handling, plugin errors and the Prometheus endpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from test_protocol import EXAMPLES

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MSGPACK = "application/msgpack"
JSON = "application/json"
CHAT = "/v1/chat/completions"

CONFIG_YAML = """\
rules:
- name: gpt
  headers: [{name: x-ai-eg-model, value: gpt-4o-mini}, {name: x-ai-eg-model, value: gpt-4o}]
  backends: [{name: openai}]
- name: llama
  headers: [{type: RegularExpression, name: x-ai-eg-model, value: "llama-.*"}]
  backends: [{name: kserve}]
- name: local
  headers: [{name: x-ai-eg-model, value: local-model}]
"""


# --- raw HTTP/1.1 client ------------------------------------------------------------------------------------------


@dataclass
class HTTPResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def decode(self) -> Any:
        if self.headers.get("content-type") == JSON:
            return orjson.loads(self.body)
        return msgpack.unpackb(self.body)


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str | None = MSGPACK,
    headers: dict[str, str] | None = None,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n"
    if content_type is not None and body:
        head += f"content-type: {content_type}\r\n"
    if body or method == "POST":
        head += f"content-length: {len(body)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    return (head + "\r\n").encode() + body


def route_body(model: str = "gpt-4o-mini", headers: dict[str, str] | None = None, fmt: str = MSGPACK) -> bytes:
    msg: dict[str, Any] = {"path": CHAT, "headers": headers or {}, "body": orjson.dumps({"model": model})}
    if fmt == JSON:
        msg["body"] = msg["body"].decode()
        return orjson.dumps(msg)
    return msgpack.packb(msg)


def route_request(
    model: str = "gpt-4o-mini", headers: dict[str, str] | None = None, fmt: str = MSGPACK, **http_headers: str
) -> bytes:
    extra = {k.replace("_", "-"): v for k, v in http_headers.items()}
    return http_request("POST", "/route", route_body(model, headers, fmt), fmt, extra)


class Client:
    """One Unix-socket connection; reads responses by ``content-length``."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unread: {self.buf!r}")
        self.buf += data

    def read_response(self) -> HTTPResponse:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, code, _reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        status = int(code)
        length = 0 if status == 204 else int(headers["content-length"])
        while len(rest) < length:
            self._fill()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        raw_len = len(head) + 4 + length
        raw, self.buf = self.buf[:raw_len], self.buf[raw_len:]
        return HTTPResponse(status, headers, rest[:length], raw)

    def request(self, data: bytes) -> HTTPResponse:
        self.send(data)
        return self.read_response()

    def route(self, model: str = "gpt-4o-mini", headers: dict[str, str] | None = None, fmt: str = MSGPACK) -> Any:
        resp = self.request(route_request(model, headers, fmt))
        assert resp.status == 200, resp
        assert resp.headers["content-type"] == fmt
        return resp.decode()

    def get_json(self, path: str) -> Any:
        resp = self.request(http_request("GET", path))
        assert resp.status == 200, resp
        return orjson.loads(resp.body)

    def at_eof(self, timeout: float = 2.0) -> bool:
        """True when the server closed the connection (after everything already read)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


# --- the server subprocess ----------------------------------------------------------------------------------------


def subprocess_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPC_ROUTER_") and not k.startswith("OTEL_")}
    paths = [str(TESTS / "support"), str(REPO)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def cli(*args: str, extra_path: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipc_router.cli", *args],
        env=subprocess_env(extra_path),
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server:
    def __init__(self, directory: Path, args: tuple[str, ...], socket_name: str = "s.sock") -> None:
        self.dir = directory
        self.socket = str(directory / socket_name)
        self.args = args
        self.log = directory / f"server-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Server:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                # The segment beside the socket, removed with the directory: stop() kills with SIGKILL, which
                # leaves it behind (by design, for the next sidecar to adopt), and /dev/shm is RAM.
                [
                    sys.executable, "-m", "ipc_router.cli", "serve", "--socket", self.socket,
                    "--shm-dir", str(self.dir), *self.args,
                ],
                env=subprocess_env(),
                cwd="/tmp",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, EOFError):
                c = Client(self.socket, timeout=1.0)
                try:
                    if c.request(http_request("GET", "/healthz")).status == 200:
                        return self
                finally:
                    c.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer within {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> Client:
        return Client(self.socket)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short, under /tmp: Unix socket paths must stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="ipr", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(tmp: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start_server(*args: str, socket_name: str = "s.sock") -> Server:
        server = Server(tmp, args, socket_name)
        servers.append(server)
        return server.start()

    yield start_server
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server for the tests that do not need their own: mixed router (sync; async with x-sleep-ms; x-boom
    raises), 0.3 s router timeout, small body and header limits."""
    d = Path(tempfile.mkdtemp(prefix="ipr", dir="/tmp"))
    (d / "config.yaml").write_text(CONFIG_YAML)
    args = (
        "--config", str(d / "config.yaml"), "--router", "plugins_for_tests:mixed_router",
        "--router-timeout", "0.3", "--max-body", "4096", "--max-header", "2048",
    )  # fmt: skip
    s = Server(d, args)
    try:
        yield s.start()
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    c = server.client()
    yield c
    c.close()


def poll(check: Callable[[], Any], timeout: float = 2.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        time.sleep(interval)


# --- requests over the socket -------------------------------------------------------------------------------------


def test_route_and_complete_msgpack(client: Client) -> None:
    answer = client.route()
    assert answer["set"] == {
        "x-ai-eg-model": "gpt-4o-mini",
        "x-ai-eg-selected-route": "gpt",
        "x-ai-eg-selected-backend": "openai",
        "x-ai-eg-selected-cluster": "backend_openai",
        "x-ai-eg-original-path": CHAT,
    }
    body = msgpack.packb(
        {"id": answer["id"], "status": 200, "body": b'{"usage":{"prompt_tokens":1,"completion_tokens":2}}'}
    )
    resp = client.request(http_request("POST", "/complete", body))
    assert resp.raw == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_route_json(client: Client) -> None:
    resp = client.request(route_request("llama-3.1", fmt=JSON))
    assert resp.status == 200
    assert resp.headers["content-type"] == JSON
    answer = orjson.loads(resp.body)
    assert answer["set"]["x-ai-eg-selected-route"] == "llama"
    assert answer["set"]["x-ai-eg-selected-backend"] == "kserve"
    resp = client.request(http_request("POST", "/complete", orjson.dumps({"id": answer["id"], "status": 200}), JSON))
    assert resp.raw == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_no_match_is_an_immediate_404(client: Client) -> None:
    answer = client.route("claude-3")
    assert answer["respond"]["status"] == 404
    assert orjson.loads(answer["respond"]["body"])["error"]["code"] == "model_not_found"


def test_get_endpoints(client: Client) -> None:
    assert client.get_json("/healthz") == {"status": "ok", "generation": 1}
    models = client.get_json("/v1/models")
    assert [m["id"] for m in models["data"]] == ["gpt-4o-mini", "gpt-4o", "local-model"]
    stats = client.get_json("/stats")
    assert stats["config"] == {"generation": 1, "rules": 3, "custom_router": True}
    assert stats["reloads"] == {"ok": 1}
    resp = client.request(http_request("GET", "/nope"))
    assert resp.status == 404
    resp = client.request(http_request("GET", "/route", content_type=None, headers={"content-type": JSON}))
    assert resp.status == 405
    assert orjson.loads(resp.body) == {"error": "use POST"}


def test_doc_examples_on_the_real_server(client: Client, server: Server) -> None:
    # The examples of docs/protocol.md whose bytes do not depend on the process (the /route answer has its id).
    resp = client.request(EXAMPLES["complete", "request"])  # an id this server never gave: 204 all the same
    assert resp.raw == EXAMPLES["complete", "response"]
    resp = client.request(EXAMPLES["missing-field", "request"])
    assert resp.raw == EXAMPLES["missing-field", "response"]
    fresh = server.client()
    try:
        resp = fresh.request(EXAMPLES["bad-framing", "request"])
        assert resp.raw == EXAMPLES["bad-framing", "response"]
        assert fresh.at_eof()
    finally:
        fresh.close()


def test_keep_alive_many_requests_on_one_connection(client: Client) -> None:
    for i in range(300):
        if i % 3 == 0:
            assert client.get_json("/healthz")["status"] == "ok"
        elif i % 3 == 1:
            key = client.route("gpt-4o" if i % 2 else "local-model")["id"]
        else:
            resp = client.request(http_request("POST", "/complete", msgpack.packb({"id": key, "status": 200})))
            assert resp.status == 204
    assert not client.at_eof(timeout=0.05)


MODELS = ["gpt-4o-mini", "llama-1", "gpt-4o", "local-model", "claude", "llama-2", "gpt-4o", "nothing", "llama-3", "x"]
EXPECTED_RULES = ["gpt", "llama", "gpt", "local", None, "llama", "gpt", None, "llama", None]


def rule_of(answer: Any) -> str | None:
    if "respond" in answer:
        assert answer["respond"]["status"] == 404
        return None
    rule: str = answer["set"]["x-ai-eg-selected-route"]
    return rule


def test_pipelining_ten_requests_in_one_write(client: Client) -> None:
    client.send(b"".join(route_request(m) for m in MODELS))
    answers = [client.read_response() for _ in MODELS]
    assert [r.status for r in answers] == [200] * 10
    assert [rule_of(r.decode()) for r in answers] == EXPECTED_RULES
    assert [r.decode()["set"]["x-ai-eg-model"] for r in answers if "set" in r.decode()] == [
        m for m, rule in zip(MODELS, EXPECTED_RULES, strict=True) if rule
    ]


def test_pipelining_keeps_order_around_async_answers(client: Client) -> None:
    # Request 0 and 5 are slow (async router); the others are answered at once but must wait for their turn.
    reqs = []
    for i, m in enumerate(MODELS):
        headers = {"x-sleep-ms": "150"} if i in (0, 5) else {}
        reqs.append(route_request(m, headers))
    reqs.insert(3, http_request("GET", "/healthz"))
    started = time.monotonic()
    client.send(b"".join(reqs))
    answers = [client.read_response() for _ in reqs]
    assert time.monotonic() - started >= 0.14  # the slow answers were awaited (uvloop timers may fire ~1 ms early)
    healthz = answers.pop(3)
    assert orjson.loads(healthz.body)["status"] == "ok"
    assert [rule_of(r.decode()) for r in answers] == EXPECTED_RULES


def test_pipelining_split_at_odd_places(client: Client) -> None:
    stream = b"".join(route_request(m, fmt=JSON if i % 2 else MSGPACK) for i, m in enumerate(MODELS))
    for size in (1, 7, 100):
        for i in range(0, len(stream), size):
            client.send(stream[i : i + size])
        answers = [client.read_response() for _ in MODELS]
        assert [rule_of(r.decode()) for r in answers] == EXPECTED_RULES
        assert [r.headers["content-type"] for r in answers] == [JSON if i % 2 else MSGPACK for i in range(10)]


def test_malformed_frame_gets_400_and_closes_the_connection(server: Server, client: Client) -> None:
    client.send(http_request("GET", "/healthz") + b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n")
    assert client.read_response().status == 200
    resp = client.read_response()
    assert resp.status == 400
    assert resp.headers["connection"] == "close"
    assert orjson.loads(resp.body) == {"error": "malformed HTTP request: Invalid header token"}
    assert client.at_eof()
    # the server keeps serving new connections
    other = server.client()
    try:
        assert other.route()["set"]["x-ai-eg-selected-route"] == "gpt"
    finally:
        other.close()


def test_body_over_limit_is_413_and_header_over_limit_is_431(server: Server) -> None:
    for data, status in [
        (b"POST /route HTTP/1.1\r\ncontent-length: 5000\r\n\r\n", 413),
        (http_request("POST", "/route", b"\x80" * 4097), 413),
        (b"POST /route HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1001\r\n" + b"a" * 4097 + b"\r\n", 413),
        (http_request("GET", "/healthz", headers={"x-big": "v" * 3000}), 431),
    ]:
        c = server.client()
        try:
            resp = c.request(data)
            assert resp.status == status
            assert resp.headers["connection"] == "close"
            assert c.at_eof()
        finally:
            c.close()
    c = server.client()
    try:
        assert c.request(http_request("POST", "/route", route_body() + b"")).status == 200
        assert c.request(http_request("GET", "/healthz", headers={"x-big": "v" * 1500})).status == 200
    finally:
        c.close()


def test_connection_close_request_is_answered_then_closed(client: Client) -> None:
    resp = client.request(route_request(connection="close"))
    assert resp.status == 200
    assert resp.headers["connection"] == "close"
    assert client.at_eof()


def test_connection_close_on_an_async_answer(client: Client) -> None:
    resp = client.request(route_request(headers={"x-sleep-ms": "20"}, connection="close"))
    assert resp.status == 200
    assert client.at_eof()
    assert resp.headers.get("connection") == "close"


def test_one_400_per_framing_error_even_while_an_async_answer_is_pending(client: Client) -> None:
    client.send(route_request(headers={"x-sleep-ms": "200"}) + b"BREW /coffee HTTP/1.1\r\n\r\n")
    time.sleep(0.05)
    client.send(b"more bytes from a confused client\r\n\r\n")
    assert client.read_response().status == 200
    assert client.read_response().status == 400
    assert client.at_eof()
    assert client.buf == b""


def test_router_raising_is_500_and_the_server_keeps_serving(server: Server, client: Client) -> None:
    before = client.get_json("/stats")["plugin_errors"].get("router", 0)
    answer = client.route(headers={"x-boom": "now"})
    assert answer["respond"]["status"] == 500
    error = orjson.loads(answer["respond"]["body"])["error"]
    assert error == {
        "message": "router failed: RuntimeError: boom: now",
        "type": "server_error",
        "code": "router_error",
    }
    assert client.route()["set"]["x-ai-eg-selected-route"] == "gpt"
    assert client.get_json("/stats")["plugin_errors"]["router"] == before + 1
    assert "custom router raised" in server.output()


def test_async_router_slower_than_router_timeout_is_504(client: Client) -> None:
    started = time.monotonic()
    answer = client.route(headers={"x-sleep-ms": "3000"})
    elapsed = time.monotonic() - started
    assert answer["respond"]["status"] == 504
    assert orjson.loads(answer["respond"]["body"])["error"]["code"] == "router_timeout"
    assert 0.25 < elapsed < 2.0
    assert client.route(headers={"x-sleep-ms": "10"})["set"]["x-ai-eg-selected-route"] == "gpt"


# --- plugin and startup errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--router", "nosuchmodule:x"), "plugin 'nosuchmodule:x': module 'nosuchmodule' not found"),
        (("--router", "nosuchpkg.sub:x"), "module 'nosuchpkg.sub' not found"),
        (
            ("--router", "plugins_for_tests:missing"),
            "plugin 'plugins_for_tests:missing': module 'plugins_for_tests' has no attribute 'missing'",
        ),
        (("--router", "plugins_for_tests:BoomRouter.nope"), "has no attribute 'BoomRouter.nope'"),
        (("--router", "plugins_for_tests:NOT_CALLABLE"), "plugin 'plugins_for_tests:NOT_CALLABLE' is not callable"),
        (
            ("--router", "ipr_broken_plugin:factory"),
            "importing module 'ipr_broken_plugin' raised RuntimeError: broken on purpose",
        ),
        (
            ("--router", "ipr_broken_import:factory"),
            "importing module 'ipr_broken_import' failed: No module named 'a_dependency_that_is_missing'",
        ),
        (("--router", "no-such-entry-point"), "not 'module:attribute' and not an entry point name"),
        (("--router", "plugins_for_tests:"), "expected 'module:attribute'"),
        (("--metrics", "nosuchmodule:x"), "module 'nosuchmodule' not found"),
        (("--metrics", "plugins_for_tests:NOT_CALLABLE"), "is not callable"),
        (("--metrics-request-header-attributes", "x-team"), "bad header attribute mapping 'x-team'"),
        (
            ("--router", "plugins_for_tests:factory_that_raises"),
            "custom router factory factory_that_raises raised RuntimeError: cannot build a router for this config",
        ),
    ],
)
def test_plugin_loading_errors_exit_1(tmp: Path, args: tuple[str, ...], message: str) -> None:
    (tmp / "ipr_broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    (tmp / "ipr_broken_import.py").write_text("import a_dependency_that_is_missing\n")
    sock = tmp / "s.sock"
    result = cli("serve", "--socket", str(sock), *args, extra_path=tmp)
    assert result.returncode == 1, result.stderr
    assert f"ipc-router: {message}" in result.stderr or message in result.stderr
    assert "Traceback" not in result.stderr
    assert not sock.exists()


def test_bad_config_at_start_exits_1_with_the_key_path(tmp: Path) -> None:
    config = tmp / "config.yaml"
    config.write_text("rules:\n- name: a\n  headers: [{name: x, value: y, type: Fuzzy}]\n")
    result = cli("serve", "--socket", str(tmp / "s.sock"), "--config", str(config))
    assert result.returncode == 1
    assert f"ipc-router: {config}: rules[0].headers[0].type: unknown match type 'Fuzzy'" in result.stderr


def test_socket_path_too_long_exits_1(tmp: Path) -> None:
    result = cli("serve", "--socket", str(tmp / ("x" * 120)))
    assert result.returncode == 1
    assert "Unix socket paths must be under 108" in result.stderr


def test_router_from_the_config_server_section(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML + "server:\n  router: plugins_for_tests:boom_router\n")
    c = start("--config", str(config)).client()
    assert c.route(headers={"x-boom": "1"})["respond"]["status"] == 500
    assert c.get_json("/stats")["config"]["custom_router"] is True
    c.close()


# --- hot reload ---------------------------------------------------------------------------------------------------


def rule_config(model: str, rule: str) -> str:
    return f"rules:\n- name: {rule}\n  headers: [{{name: x-ai-eg-model, value: {model}}}]\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_hot_reload(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(rule_config("m", "one"))
    server = start("--config", str(config))  # default --reload-interval 0.5
    c = server.client()
    assert rule_of(c.route("m")) == "one"

    # an edit (atomic rename): the new decision within ~2 s
    write_atomically(config, rule_config("m", "two") + rule_config("m2", "other").replace("rules:\n", ""))
    started = time.monotonic()
    poll(lambda: rule_of(c.route("m")) == "two", timeout=2.5)
    assert time.monotonic() - started < 2.5
    assert rule_of(c.route("m2")) == "other"
    assert c.get_json("/healthz")["generation"] == 2
    assert [m["id"] for m in c.get_json("/v1/models")["data"]] == ["m", "m2"]

    # a broken file: the old config stays, the failed reload is counted
    config.write_text("rules:\n- name: broken\n  headers: [{name: x-ai-eg-model}]\n")
    poll(lambda: c.get_json("/stats")["reloads"].get("error") == 1, timeout=2.5)
    assert rule_of(c.route("m")) == "two"
    stats = c.get_json("/stats")
    assert stats["config"]["generation"] == 2
    assert stats["reloads"] == {"ok": 2, "error": 1}
    assert "config reload failed, keeping generation 2" in server.output()
    assert "rules[0].headers[0].value: is required" in server.output()

    # an in-place edit that fixes it
    config.write_text(rule_config("m", "three"))
    poll(lambda: rule_of(c.route("m")) == "three", timeout=2.5)
    assert c.get_json("/healthz")["generation"] == 3

    # a deleted file: the default config, no rules, every model is a 404
    config.unlink()
    poll(lambda: c.get_json("/stats")["config"]["rules"] == 0, timeout=2.5)
    assert rule_of(c.route("m")) is None
    assert c.get_json("/v1/models") == {"object": "list", "data": []}
    assert c.get_json("/healthz")["generation"] == 4

    # and created again
    config.write_text(rule_config("m", "four"))
    poll(lambda: rule_of(c.route("m")) == "four", timeout=2.5)
    assert c.get_json("/stats")["reloads"] == {"ok": 5, "error": 1}
    c.close()


def test_reload_with_a_custom_router_keeps_it(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(rule_config("m", "one") + "- name: premium\n  headers: [{name: x-nothing, value: x}]\n")
    server = start("--config", str(config), "--router", "plugins_for_tests:tenant_router", "--reload-interval", "0.1")
    c = server.client()
    assert rule_of(c.route("zzz", {"x-tenant": "premium"})) == "premium"
    config.write_text(rule_config("m", "two") + "- name: premium\n  headers: [{name: x-nothing, value: y}]\n")
    poll(lambda: rule_of(c.route("m")) == "two")
    assert rule_of(c.route("zzz", {"x-tenant": "premium"})) == "premium"
    # a config without the rule the router names: routing answers 500, the server goes on
    config.write_text(rule_config("m", "three"))
    poll(lambda: rule_of(c.route("m")) == "three")
    answer = c.route("zzz", {"x-tenant": "premium"})
    assert answer["respond"]["status"] == 500
    c.close()


# --- signals, socket file -----------------------------------------------------------------------------------------


def test_sigterm_lets_the_request_in_flight_finish(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    server = start("--config", str(config), "--router", "plugins_for_tests:sleepy_router", "--router-timeout", "5")
    assert server.proc is not None
    c = server.client()
    started = time.monotonic()
    c.send(route_request(headers={"x-sleep-ms": "700"}))
    time.sleep(0.2)
    os.kill(server.proc.pid, signal.SIGTERM)
    resp = c.read_response()
    assert time.monotonic() - started >= 0.69
    assert resp.status == 200
    assert resp.decode()["set"]["x-ai-eg-selected-route"] == "gpt"
    assert server.proc.wait(timeout=10) == 0
    assert not os.path.exists(server.socket)
    assert c.at_eof()
    assert "signal received: draining" in server.output()
    c.close()


def test_sigterm_when_idle_exits_0_and_removes_the_socket(start: Callable[..., Server]) -> None:
    server = start()
    assert server.proc is not None
    idle = server.client()  # an idle keep-alive connection does not hold the shutdown
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=5) == 0
    assert not os.path.exists(server.socket)
    assert idle.at_eof()
    idle.close()


def test_socket_mode_default_0660(start: Callable[..., Server]) -> None:
    server = start()
    st = os.stat(server.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_socket_mode_option(start: Callable[..., Server]) -> None:
    server = start("--socket-mode", "600")
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600


def test_stale_socket_file_is_replaced(tmp: Path, start: Callable[..., Server]) -> None:
    path = tmp / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    server = start()
    c = server.client()
    assert c.get_json("/healthz")["status"] == "ok"
    c.close()


def test_live_socket_refuses_to_start(tmp: Path, start: Callable[..., Server]) -> None:
    first = start()
    result = cli("serve", "--socket", first.socket)
    assert result.returncode == 1
    assert f"ipc-router: another process is already serving on {first.socket}" in result.stderr
    c = first.client()
    assert c.get_json("/healthz")["status"] == "ok"
    c.close()


def test_a_file_that_is_not_a_socket_is_not_replaced(tmp: Path) -> None:
    path = tmp / "s.sock"
    path.write_text("precious")
    result = cli("serve", "--socket", str(path))
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert path.read_text() == "precious"


# --- Prometheus -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_addr_serves_prometheus(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    port = free_port()
    server = start("--config", str(config), "--metrics-addr", f"127.0.0.1:{port}")
    c = server.client()
    key = c.route()["id"]
    usage = b'{"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
    assert (
        c.request(http_request("POST", "/complete", msgpack.packb({"id": key, "status": 200, "body": usage}))).status
        == 204
    )
    c.close()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            text: str = r.read().decode()
            return text

    text = poll(lambda: (t := scrape()) and "gen_ai_client_token_usage" in t and t, timeout=3)
    assert "ipc_router_requests_total" in text
    assert 'ipc_router_requests_total{endpoint="route"' in text
    assert "gen_ai_server_request_duration_seconds_count" in text
    assert 'gen_ai_token_type="input"' in text


def test_successful_series_carry_no_empty_error_type(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    port = free_port()
    c = start("--config", str(config), "--metrics-addr", f"127.0.0.1:{port}").client()
    for status in (500, 200):
        key = c.route()["id"]
        assert c.request(http_request("POST", "/complete", msgpack.packb({"id": key, "status": status}))).status == 204
    c.close()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def duration_counts() -> list[str]:
        lines = scrape().splitlines()
        return [line for line in lines if line.startswith("gen_ai_server_request_duration_seconds_count")]

    counts = poll(lambda: (found := duration_counts()) and len(found) == 2 and found, timeout=3)
    assert len(counts) == 2, counts
    failed = [line for line in counts if 'error_type="500"' in line]
    ok = [line for line in counts if "error_type" not in line]
    assert len(failed) == 1 and len(ok) == 1, counts
    assert '=""' not in scrape()  # nor any other empty label (otel_scope_version="" and the like)


# --- what the sidecar says it runs ----------------------------------------------------------------------------------


def test_start_up_log_says_what_runs(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML + "- name: premium\n  header: [{name: x-tenant, value: premium}]\n")
    port = free_port()
    server = start(
        "--config", str(config), "--router", "plugins_for_tests:tenant_router",
        "--metrics", "plugins_for_tests:raising_metrics_factory", "--metrics-addr", f"127.0.0.1:{port}",
        "--otlp-endpoint", "http://127.0.0.1:9", "--otlp-interval", "600", "--socket-mode", "600",
    )  # fmt: skip
    out = server.output()
    assert f"ipc-router listening on {server.socket} (mode 0600)" in out
    assert f"config {config}: generation 1, 4 rules" in out
    assert "router: plugins_for_tests:tenant_router (route cache keyed by x-ai-eg-model, x-tenant)" in out
    assert (
        f"metrics: plugins_for_tests:raising_metrics_factory; Prometheus: http://127.0.0.1:{port}/metrics; "
        "OTLP: http://127.0.0.1:9 every 600 s"
    ) in out
    assert f"config {config}: rules[3].header: unknown key; did you mean 'headers'? (ignored)" in out
    c = server.client()
    assert c.get_json("/stats")["plugins"] == {
        "router": "plugins_for_tests:TenantRouter", "metrics": "plugins_for_tests:raising_metrics_factory",
    }  # fmt: skip
    c.close()


def test_start_up_log_without_config_or_exporters(start: Callable[..., Server]) -> None:
    out = start().output()
    assert "no config file (default config): generation 1, 0 rules" in out
    assert "router: default (route cache keyed by nothing)" in out
    assert "metrics: default; Prometheus: off; OTLP: off" in out


def test_router_from_the_app_dir(tmp: Path, start: Callable[..., Server]) -> None:
    app = tmp / "app"
    app.mkdir()
    (app / "my_own_router.py").write_text(
        "def factory(default, config):\n"
        "    class Always:\n"
        "        def calculate(self, headers):\n"
        "            return 'local'\n"
        "    return Always()\n"
    )
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    c = start("--config", str(config), "--router", "my_own_router:factory", "--app-dir", str(app)).client()
    assert rule_of(c.route("gpt-4o")) == "local"
    c.close()
    result = cli("serve", "--socket", str(tmp / "t.sock"), "--router", "my_own_router:factory")  # cwd /tmp
    assert result.returncode == 1
    assert "module 'my_own_router' not found; looked for my_own_router.py or my_own_router/__init__.py in /tmp " \
        "(--app-dir)" in " ".join(result.stderr.split())  # fmt: skip


def test_reload_adding_what_envoy_lacks_says_to_regenerate_the_bootstrap(
    tmp: Path, start: Callable[..., Server]
) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    server = start("--config", str(config), "--reload-interval", "0.1")
    c = server.client()
    config.write_text(
        CONFIG_YAML.replace("backends: [{name: openai}]", "backends: [{name: openai}, {name: azure}, {name: kserve}]")
        + "- name: brand-new\n  headers: [{name: x-ai-eg-model, value: n}]\n"
    )
    poll(lambda: c.get_json("/healthz")["generation"] == 2)
    poll(lambda: "backend 'azure'" in server.output())
    out = " ".join(server.output().split())
    assert (
        "config generation 2: backend 'azure' of rule 'gpt' is new, which was not in the config the sidecar started "
        "with: the running Envoy has no cluster for it and answers 503 until its bootstrap is regenerated "
        "(ipc-router envoy-config) and Envoy restarted"
    ) in out, out
    # A new rule, and an existing backend in another rule, are routed live by the cluster header: no warning.
    assert "kserve" not in out and "rule 'brand-new'" not in out, out
    assert rule_of(c.route("n")) == "brand-new"  # the sidecar itself routes it
    c.close()
