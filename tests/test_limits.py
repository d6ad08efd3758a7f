"""Limits, access and shutdown (issue #13): each limit's default and status, counted in /stats and OpenTelemetry;
the socket's mode and the SO_PEERCRED allowlist, tried by a child that setuid()s to nobody; SIGTERM, crashes and
a second sidecar on the same path. Real sidecars over real sockets, except for the sans-IO boundaries.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import test_server
from test_server import CONFIG_YAML, Client, Server, cli, free_port, http_request, poll, route_request

from ipc_router import envoy_config
from ipc_router.cli import build_parser
from ipc_router.filterapi import parse_config
from ipc_router.protocol import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADERS,
    MAX_MESSAGE_HEADERS,
    MSGPACK,
    Connection,
    ProtocolError,
    Request,
)
from ipc_router.router import Routing
from ipc_router.server import Settings, _SidecarProtocol
from ipc_router.service import Response, Service

MIB = 1024 * 1024
tmp = test_server.tmp  # fixtures
start = test_server.start


class UncheckedServer(Server):
    """A sidecar that may refuse this (root) process: ready when it logs that it listens."""

    def start(self, timeout: float = 15.0) -> UncheckedServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ipc_router.cli", "serve", "--socket", self.socket,
                 "--shm-dir", str(self.dir), *self.args],  # the segment dies with the directory (see Server)
                env=test_server.subprocess_env(), cwd="/tmp", stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        poll(lambda: "ipc-router listening on" in self.output() or self.proc.poll() is not None, timeout=timeout)
        assert self.proc.poll() is None, self.output()
        return self


@pytest.fixture
def start_unchecked(tmp: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start_server(*args: str) -> Server:
        server = UncheckedServer(tmp, args)
        servers.append(server)
        return server.start()

    yield start_server
    for s in servers:
        s.stop()


# --- defaults, pinned ---------------------------------------------------------------------------------------------


def test_default_body_limit_is_8_mib() -> None:
    # Issue #13: a mutant multiplying the default by 1024 survived the suite.
    assert DEFAULT_MAX_BODY_BYTES == 8 * MIB
    assert Settings(socket="s").max_body == 8 * MIB
    assert build_parser().parse_args(["serve", "--socket", "s"]).max_body == 8 * MIB
    head = b"POST /route HTTP/1.1\r\ncontent-length: %d\r\n\r\n"
    assert Connection().feed(head % (8 * MIB)) == []  # waits for the body
    with pytest.raises(ProtocolError) as info:
        Connection().feed(head % (8 * MIB + 1))
    assert (info.value.status, info.value.limit) == (413, "body_bytes")
    assert info.value.message == f"body of {8 * MIB + 1} bytes exceeds the limit of {8 * MIB}"


def test_default_body_limit_on_the_real_server(start: Callable[..., Server]) -> None:
    server = start()  # every limit at its default
    c = server.client()
    # a /route message of exactly 8 MiB (padding inside the client's body) is answered...
    msg = {"path": "/v1/chat/completions", "headers": {}, "body": b""}
    overhead = len(msgpack.packb({**msg, "body": b'{"model":"m","pad":""}' + b"x" * 70000})) - 70000
    msg["body"] = b'{"model":"m","pad":"' + b"x" * (8 * MIB - overhead) + b'"}'
    body = msgpack.packb(msg)
    assert len(body) == 8 * MIB
    resp = c.request(http_request("POST", "/route", body))
    assert resp.status == 200 and resp.decode()["respond"]["status"] == 404  # no rules: answered, not refused
    # ...one byte more is refused before it is read
    resp = c.request(b"POST /route HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (8 * MIB + 1))
    assert resp.status == 413 and resp.headers["connection"] == "close"
    assert c.at_eof()
    c.close()


def test_default_connection_limit_admits_all_that_envoy_opens() -> None:
    # Envoy's circuit breaker for the sidecar cluster caps its connections; the sidecar must not refuse below it.
    assert Settings(socket="s").max_connections == envoy_config._CIRCUIT_BREAKER_LIMIT == 10000
    sidecar = envoy_config.bootstrap(parse_config("rules: []\n"), socket_path="/tmp/x.sock")
    clusters = {c["name"]: c for c in sidecar["static_resources"]["clusters"]}
    [threshold] = clusters[envoy_config.SIDECAR_CLUSTER]["circuit_breakers"]["thresholds"]
    assert threshold["max_connections"] <= Settings(socket="s").max_connections


def test_default_header_count_is_100() -> None:
    assert DEFAULT_MAX_HEADERS == 100
    head = b"GET /healthz HTTP/1.1\r\n"
    assert len(Connection().feed(head + b"".join(b"x-%d: v\r\n" % i for i in range(100)) + b"\r\n")) == 1
    with pytest.raises(ProtocolError) as info:
        Connection().feed(head + b"".join(b"x-%d: v\r\n" % i for i in range(101)) + b"\r\n")
    assert (info.value.status, info.value.limit, info.value.message) == (431, "headers", "more than 100 header fields")


def test_header_count_counts_repeated_names() -> None:
    conn = Connection(max_headers=3)
    assert conn.feed(b"GET / HTTP/1.1\r\nx: 1\r\nx: 2\r\nx: 3\r\n\r\n")[0].headers == {"x": "1,2,3"}
    with pytest.raises(ProtocolError) as info:
        conn.feed(b"GET / HTTP/1.1\r\nx: 1\r\nx: 2\r\nx: 3\r\nx: 4\r\n\r\n")
    assert info.value.status == 431


def service() -> Service:
    return Service(Routing(parse_config("rules:\n- name: r\n  headers: [{name: x-ai-eg-model, value: m}]\n")))


def route(svc: Service, headers: dict[str, str]) -> Response:
    body = msgpack.packb({"path": "/v1/chat/completions", "headers": headers, "body": b'{"model":"m"}'})
    resp = svc.handle(Request("POST", "/route", {"content-type": MSGPACK}, body, True))
    assert isinstance(resp, Response)
    return resp


def test_route_message_headers_map_length_limit() -> None:
    assert MAX_MESSAGE_HEADERS == 1024
    svc = service()
    assert route(svc, {f"x-{i}": "v" for i in range(1024)}).status == 200
    resp = route(svc, {f"x-{i}": "v" for i in range(1025)})
    assert resp.status == 400
    assert msgpack.unpackb(resp.body) == {"error": "bad message: Expected `object` of length <= 1024 - at `$.headers`"}
    assert svc.snapshot()["limits"] == {"message_length": 1}


def test_record_message_headers_map_length_limit() -> None:
    svc = service()
    record = {"t": 1, "t_end": 2, "status": 200, "model": "m", "rule": "r"}
    for n, status in ((1024, 204), (1025, 400)):  # 204: valid, recorded (even by a sidecar without a fast path)
        body = msgpack.packb({**record, "headers": {f"x-{i}": "v" for i in range(n)}})
        resp = svc.handle(Request("POST", "/record", {"content-type": MSGPACK}, body, True))
        assert isinstance(resp, Response) and resp.status == status
    assert svc.snapshot()["limits"] == {"message_length": 1}


# --- limits on the real server ------------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp: Path, start: Callable[..., Server]) -> Server:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    return start(
        "--config", str(config), "--router", "plugins_for_tests:sleepy_router", "--router-timeout", "5",
        "--max-headers", "5", "--max-pipeline", "3", "--max-connections", "3",
    )  # fmt: skip


def stats(server: Server) -> Any:
    c = server.client()
    try:
        return c.get_json("/stats")
    finally:
        c.close()


def test_header_count_limit_is_431_and_counted(limited: Server) -> None:
    c = limited.client()
    assert c.request(http_request("GET", "/healthz", headers={f"x-{i}": "v" for i in range(5)})).status == 200
    resp = c.request(http_request("GET", "/healthz", headers={f"x-{i}": "v" for i in range(6)}))
    assert resp.status == 431 and orjson.loads(resp.body) == {"error": "more than 5 header fields"}
    assert c.at_eof()
    c.close()
    assert stats(limited)["limits"] == {"headers": 1}


def test_pipelined_requests_beyond_the_limit_get_503_and_a_close(limited: Server) -> None:
    c = limited.client()
    c.send(b"".join(route_request(headers={"x-sleep-ms": "300"}) for _ in range(6)))
    answers = [c.read_response() for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 200, 503]
    assert all(a.decode()["set"]["x-ai-eg-selected-route"] == "gpt" for a in answers[:3])
    assert answers[3].headers["connection"] == "close"
    assert orjson.loads(answers[3].body) == {"error": "more than 3 pipelined requests waiting"}
    assert c.at_eof() and c.buf == b""
    c.close()
    assert stats(limited)["limits"] == {"pipeline": 1}


def test_connections_beyond_the_limit_get_503_and_a_close(limited: Server) -> None:
    clients = [limited.client() for _ in range(3)]
    for c in clients:
        assert c.get_json("/healthz")["status"] == "ok"
    extra = limited.client()
    resp = extra.read_response()  # answered at accept, before any request
    assert resp.status == 503 and resp.headers["connection"] == "close"
    assert orjson.loads(resp.body) == {"error": "more than 3 connections"}
    assert extra.at_eof()
    extra.close()
    clients.pop().close()

    def slot_free() -> bool:  # the server sees the close asynchronously
        c = limited.client()
        try:
            return c.request(http_request("GET", "/healthz")).status == 200
        except (EOFError, OSError):
            return False
        finally:
            c.close()

    poll(slot_free)
    for c in clients:
        c.close()
    poll(lambda: slot_free() and stats(limited)["limits"] == {"connections": 1})


def test_a_client_that_does_not_read_is_paused_not_buffered_without_end(start: Callable[..., Server]) -> None:
    server = start()
    c = server.client()
    n = 30_000  # ~2 MB of answers: more than the socket buffers hold, so the server must pause reading
    request = http_request("GET", "/healthz")
    sender = threading.Thread(target=c.send, args=(request * n,))
    sender.start()
    time.sleep(0.3)  # let both sides' buffers fill
    statuses = [c.read_response().status for _ in range(n)]
    sender.join(timeout=10)
    assert statuses == [200] * n
    assert c.get_json("/healthz")["status"] == "ok"  # and the connection still works
    c.close()


def test_flow_control_pauses_reading_while_the_write_buffer_is_full() -> None:
    from tests.support.fuzz_harness import FakeSidecar, FakeTransport

    calls: list[str] = []

    class Recording(FakeTransport):
        def pause_reading(self) -> None:
            calls.append("pause")

        def resume_reading(self) -> None:
            calls.append("resume")

    proto = _SidecarProtocol(FakeSidecar(service()))  # type: ignore[arg-type]
    transport = Recording()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.pause_writing()  # what the event loop calls above the write buffer's high-water mark
    proto.resume_writing()
    assert calls == ["pause", "resume"]
    proto.data_received(b"GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n")
    proto.pause_writing()
    proto.resume_writing()  # a closing connection is not read again
    assert calls == ["pause", "resume", "pause"] and transport.closed


# --- access: socket mode and SO_PEERCRED --------------------------------------------------------------------------

NOBODY = pwd.getpwnam("nobody")


def as_nobody(fn: Callable[[], str], timeout: float = 10.0) -> str:
    """Run ``fn`` in a forked child that has dropped to nobody:nogroup; return what it returned (or raised)."""
    assert os.geteuid() == 0, "the access tests run as root (they setuid() a child)"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            try:
                result = fn()
            except Exception as e:
                result = f"{type(e).__name__}: {e}"
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the nobody child did not finish")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def healthz_from(path: str) -> Callable[[], str]:
    def ask() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            try:
                s.sendall(http_request("GET", "/healthz"))
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return "closed"  # closed with our request unread: the kernel resets
            return data.split(b"\r\n", 1)[0].decode() if data else "closed"

    return ask


def test_default_socket_mode_keeps_other_users_out(tmp: Path, start: Callable[..., Server]) -> None:
    os.chmod(tmp, 0o755)  # the directory is open: only the socket's own mode (0660, root:root) stands in the way
    server = start()
    assert os.stat(server.socket).st_mode & 0o777 == 0o660
    assert as_nobody(healthz_from(server.socket)).startswith("PermissionError")
    assert as_nobody(healthz_from(start("--socket-mode", "666", socket_name="open.sock").socket)) == "HTTP/1.1 200 OK"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
        return text


def test_allow_uid_refuses_other_peers_logs_and_counts_them(tmp: Path, start: Callable[..., Server]) -> None:
    os.chmod(tmp, 0o755)
    port = free_port()
    server = start("--socket-mode", "666", "--allow-uid", "0", "--metrics-addr", f"127.0.0.1:{port}")
    assert as_nobody(healthz_from(server.socket)) == "closed"  # not a byte to a refused peer
    assert stats(server)["refused_peers"] == 1  # and root, on the list, is served
    assert f"uid {NOBODY.pw_uid} gid {NOBODY.pw_gid}: not in --allow-uid/--allow-gid" in server.output()
    poll(lambda: re.search(r"^ipc_router_peers_refused_total(\{[^}]*\})? 1\.0$", scrape(port), re.M), timeout=5)


def test_allow_gid_admits_the_group_and_refuses_root(tmp: Path, start_unchecked: Callable[..., Server]) -> None:
    os.chmod(tmp, 0o755)
    server = start_unchecked("--socket-mode", "666", "--allow-gid", "nogroup")
    assert as_nobody(healthz_from(server.socket)) == "HTTP/1.1 200 OK"
    assert healthz_from(server.socket)() == "closed"  # root's gid 0 is not on the list: root is not special


def test_allow_lists_are_repeatable_and_comma_separated(tmp: Path, start: Callable[..., Server]) -> None:
    os.chmod(tmp, 0o755)
    server = start("--socket-mode", "666", "--allow-uid", "12345,nobody", "--allow-uid", "0")
    assert as_nobody(healthz_from(server.socket)) == "HTTP/1.1 200 OK"
    assert healthz_from(server.socket)() == "HTTP/1.1 200 OK"
    assert stats(server)["refused_peers"] == 0


def test_allow_uid_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPC_ROUTER_ALLOW_UID", "1000,nobody")
    monkeypatch.setenv("IPC_ROUTER_ALLOW_GID", "0")
    args = build_parser().parse_args(["serve", "--socket", "s"])
    assert (args.allow_uid, args.allow_gid) == ((1000, NOBODY.pw_uid), (0,))
    args = build_parser().parse_args(["serve", "--socket", "s", "--allow-uid", "7"])
    assert args.allow_uid == (7,)  # a flag replaces the variable


def test_unknown_user_is_a_usage_error(tmp: Path) -> None:
    result = cli("serve", "--socket", str(tmp / "s.sock"), "--allow-uid", "no-such-user-here")
    assert result.returncode == 2
    assert "no such user or group 'no-such-user-here'" in result.stderr


def test_limit_rejections_are_exported(tmp: Path, start: Callable[..., Server]) -> None:
    port = free_port()
    server = start("--max-headers", "1", "--metrics-addr", f"127.0.0.1:{port}")
    c = server.client()
    assert c.request(http_request("GET", "/healthz", headers={"a": "1", "b": "2"})).status == 431
    c.close()
    line = r'^ipc_router_limit_rejections_total\{limit="headers"[^}]*\} 1\.0$'
    poll(lambda: re.search(line, scrape(port), re.M), timeout=5)


# --- shutdown and restart -----------------------------------------------------------------------------------------


def test_sigterm_drains_queued_pipelined_answers_and_refuses_new_connections(
    tmp: Path, start: Callable[..., Server]
) -> None:
    config = tmp / "config.yaml"
    config.write_text(CONFIG_YAML)
    server = start("--config", str(config), "--router", "plugins_for_tests:sleepy_router", "--router-timeout", "5")
    assert server.proc is not None
    c = server.client()
    c.send(route_request(headers={"x-sleep-ms": "600"}) + http_request("GET", "/healthz") + route_request("llama-1"))
    time.sleep(0.15)
    os.kill(server.proc.pid, signal.SIGTERM)
    time.sleep(0.15)
    with pytest.raises(ConnectionRefusedError):  # draining: the listener is closed, Envoy's next try goes elsewhere
        Client(server.socket)
    answers = [c.read_response() for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[0].decode()["set"]["x-ai-eg-selected-route"] == "gpt"
    assert orjson.loads(answers[1].body)["status"] == "ok"
    assert answers[2].decode()["set"]["x-ai-eg-selected-route"] == "llama"
    assert server.proc.wait(timeout=10) == 0
    assert not os.path.exists(server.socket)
    c.close()


def test_a_crashed_sidecars_socket_is_replaced_at_restart(start: Callable[..., Server]) -> None:
    first = start()
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=5)
    assert os.path.exists(first.socket)  # kill -9 leaves the file behind
    with pytest.raises(ConnectionRefusedError):
        Client(first.socket)
    second = start()  # same path
    c = second.client()
    assert c.get_json("/healthz")["status"] == "ok"
    c.close()


def test_a_second_sidecar_on_a_live_path_refuses_and_leaves_it_alone(start: Callable[..., Server]) -> None:
    first = start()
    c = first.client()
    result = cli("serve", "--socket", first.socket)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"ipc-router: another process is already serving on {first.socket}")
    assert "Traceback" not in result.stderr
    assert c.get_json("/healthz")["status"] == "ok"  # the first one's socket and connections are untouched
    with contextlib.closing(first.client()) as fresh:
        assert fresh.get_json("/healthz")["status"] == "ok"
    c.close()


BUDGET_YAML = """
llmRequestCosts: [{metadataKey: t, type: TotalToken}]
tokenBudgets: [{name: u, cost: t, headers: [x-user-id], limit: 10}]
rules: []
"""


def h2_preface_from(path: str) -> Callable[[], str]:
    """Connect to a gRPC socket and send the HTTP/2 preface: what comes back first (a SETTINGS frame, or nothing)."""

    def ask() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            try:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return "closed"
            return f"frame type {data[3]}" if len(data) >= 9 else "closed"

    return ask


def test_allow_uid_guards_the_rate_limit_service_too(tmp: Path, start: Callable[..., Server]) -> None:
    os.chmod(tmp, 0o755)
    config = tmp / "budgets.yaml"
    config.write_text(BUDGET_YAML)
    server = start("--config", str(config), "--socket-mode", "666", "--allow-uid", "0")
    rls_path = server.socket + ".rls"
    poll(lambda: os.path.exists(rls_path), timeout=5)
    assert os.stat(rls_path).st_mode & 0o777 == 0o666
    assert as_nobody(h2_preface_from(rls_path)) == "closed"  # not a byte to a refused peer
    assert h2_preface_from(rls_path)() == "frame type 4"  # root is on the list: the server's SETTINGS
    assert stats(server)["refused_peers"] == 1
    assert f"uid {NOBODY.pw_uid} gid {NOBODY.pw_gid}: not in --allow-uid/--allow-gid" in server.output()


def test_a_reload_that_adds_budgets_starts_the_rate_limit_service(tmp: Path, start: Callable[..., Server]) -> None:
    config = tmp / "budgets.yaml"
    config.write_text("rules: []\n")
    server = start("--config", str(config), "--reload-interval", "0.1")
    rls_path = server.socket + ".rls"
    time.sleep(0.3)
    assert not os.path.exists(rls_path)
    tmp_file = tmp / "budgets.yaml.tmp"
    tmp_file.write_text(BUDGET_YAML)
    tmp_file.replace(config)
    poll(lambda: os.path.exists(rls_path), timeout=5)
    assert h2_preface_from(rls_path)() == "frame type 4"
    assert "token budget 'u' is new or changed its headers" in server.output()  # and the bootstrap needs it
