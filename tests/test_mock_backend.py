"""Tests of the mock OpenAI backend over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest
import yaml

from ipc_router.tools.mock_backend import MockApp, MockBackend, MockConfig, serve

REPO = Path(__file__).resolve().parents[1]
# The recorded OpenAI responses beside the repository (../shared on the build machine). Tests pass the folder
# explicitly; the mock itself never looks for one.
CASSETTES = REPO.parent / "shared" / "testdata" / "openai-cassettes"

needs_cassettes = pytest.mark.skipif(not CASSETTES.is_dir(), reason=f"no cassettes at {CASSETTES}")


# ---------------------------------------------------------------------------------------------------------------
# a minimal HTTP/1.1 client that keeps the connection and records when each body chunk arrived


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (time.monotonic() at arrival, data)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[bytes]:
        return [c for _, c in self.chunks]


class _ResponseCollector:
    """httptools callbacks; one parser per connection, completed responses queue up in ``done``."""

    def __init__(self) -> None:
        self.resp = Response()
        self.done: collections.deque[Response] = collections.deque()
        self.now = 0.0
        self._body: list[bytes] = []
        self._chunk: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.resp = Response()
        self._body = []
        self._chunk = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.resp.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._chunk.append(body)

    def on_chunk_complete(self) -> None:
        data = b"".join(self._chunk)
        self._chunk = []
        if data:  # the terminating zero-length chunk also completes
            self.resp.chunks.append((self.now, data))

    def on_message_complete(self) -> None:
        self.resp.body = b"".join(self._body)
        self.done.append(self.resp)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._col = _ResponseCollector()

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.sock.sendall(raw_request(method, path, body, headers))

    def read_response(self) -> Response:
        while not self._col.done:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the response was complete")
            self._col.now = time.monotonic()
            self._col.parser.feed_data(data)
        return self._col.done.popleft()

    def request(
        self, method: str, path: str, body: bytes | Any = b"", headers: dict[str, str] | None = None
    ) -> Response:
        if not isinstance(body, bytes):
            body = orjson.dumps(body)
        self.send(method, path, body, headers)
        return self.read_response()


def raw_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
    if body:
        lines.append("content-type: application/json")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat(port: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    client = Client(port)
    try:
        return client.request("POST", "/v1/chat/completions", body, headers)
    finally:
        client.close()


def sse_payloads(resp: Response) -> list[Any]:
    """The data of each SSE event, parsed as JSON except ``[DONE]``."""
    out: list[Any] = []
    for event in resp.body.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: ")
        data = event[len(b"data: ") :]
        out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return out


def cassette_response(name: str) -> tuple[int, str, bytes]:
    doc = yaml.safe_load((CASSETTES / f"{name}.yaml").read_text(encoding="utf-8"))
    resp = doc["interactions"][0]["response"]
    return resp["code"], resp["headers"]["Content-Type"][0], resp["body"].encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def backend() -> Iterator[MockBackend]:
    b = MockBackend(name="b1", tokens=5, cassettes=CASSETTES).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def client(backend: MockBackend) -> Iterator[Client]:
    c = Client(backend.port)
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------------------------
# chat completions


def test_non_streaming_shape_and_usage(backend: MockBackend) -> None:
    resp = chat(backend.port, {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert resp.headers["x-mock-backend"] == "b1"
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-test"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "word0 word1 word2 word3 word4"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def test_token_overrides_by_header(backend: MockBackend) -> None:
    resp = chat(backend.port, {"model": "m"}, {"x-mock-tokens": "3", "x-mock-prompt-tokens": "7"})
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "word0 word1 word2"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_prompt_tokens_and_tokens_from_constructor() -> None:
    with MockBackend(name="b2", tokens=2, prompt_tokens=42) as b:
        body = chat(b.port, {"model": "m"}).json()
    assert body["usage"] == {"prompt_tokens": 42, "completion_tokens": 2, "total_tokens": 44}


def test_streaming_chunks_arrive_separately_with_header_delays(backend: MockBackend) -> None:
    headers = {"x-mock-tokens": "4", "x-mock-first-token-delay-ms": "100", "x-mock-token-delay-ms": "50"}
    t0 = time.monotonic()
    resp = chat(backend.port, {"model": "m", "stream": True}, headers)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers["x-mock-backend"] == "b1"

    # one HTTP chunk per SSE event: 4 tokens, the finish_reason chunk, [DONE]
    events = resp.events()
    assert len(events) == 6
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events)
    assert events[-1] == b"data: [DONE]\n\n"

    # Loose lower bounds only. Cumulative from t0 because a busy client may read two chunks in one recv().
    times = [t for t, _ in resp.chunks]
    for i in range(4):
        assert times[i] - t0 >= 0.8 * (0.1 + i * 0.05)
    assert times[3] - times[0] >= 0.8 * 3 * 0.05  # the tokens did not all arrive together

    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "word0 word1 word2 word3"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    assert all("usage" not in c for c in chunks)


def test_streaming_delays_from_constructor() -> None:
    with MockBackend(name="slow", tokens=3, first_token_delay=0.1, token_delay=0.05) as b:
        t0 = time.monotonic()
        resp = chat(b.port, {"model": "m", "stream": True})
        times = [t for t, _ in resp.chunks]
        for i in range(3):
            assert times[i] - t0 >= 0.8 * (0.1 + i * 0.05)

        t0 = time.monotonic()
        chat(b.port, {"model": "m"})  # non-streaming: first delay + (N - 1) token delays
        assert time.monotonic() - t0 >= 0.8 * (0.1 + 2 * 0.05)


def test_streaming_include_usage_final_chunk(backend: MockBackend) -> None:
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    resp = chat(backend.port, body, {"x-mock-tokens": "3"})
    payloads = sse_payloads(resp)
    assert len(resp.chunks) == len(payloads) == 3 + 1 + 1 + 1
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert all(p["usage"] is None for p in payloads[:-2])


def test_zero_tokens_stream(backend: MockBackend) -> None:
    resp = chat(backend.port, {"model": "m", "stream": True}, {"x-mock-tokens": "0"})
    payloads = sse_payloads(resp)
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]] == ["stop"]
    assert payloads[-1] == "[DONE]"


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_x_mock_status(backend: MockBackend, status: int) -> None:
    resp = chat(backend.port, {"model": "m", "stream": True}, {"x-mock-status": str(status)})
    assert resp.status == status
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-mock-backend"] == "b1"
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "code" in err


def test_x_mock_status_on_other_path_and_200_is_noop(client: Client) -> None:
    assert client.request("GET", "/v1/models", headers={"x-mock-status": "404"}).status == 404
    resp = client.request("POST", "/v1/chat/completions", {"model": "m"}, {"x-mock-status": "200"})
    assert resp.status == 200 and resp.json()["object"] == "chat.completion"


def test_malformed_json_is_400(client: Client) -> None:
    resp = client.request("POST", "/v1/chat/completions", b'{"model": ')
    assert resp.status == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert set(err) >= {"message", "type", "code"}
    # the connection survives
    assert client.request("GET", "/healthz").status == 200


def test_bad_override_header_is_400(client: Client) -> None:
    resp = client.request("POST", "/v1/chat/completions", {"model": "m"}, {"x-mock-tokens": "many"})
    assert resp.status == 400
    assert "x-mock-tokens" in resp.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# cassettes


@needs_cassettes
def test_cassette_replay_basic(backend: MockBackend) -> None:
    code, content_type, body = cassette_response("chat-basic")
    resp = chat(backend.port, {"model": "ignored"}, {"x-mock-cassette": "chat-basic"})
    assert resp.status == code == 200
    assert resp.headers["content-type"] == content_type
    assert resp.headers["x-mock-backend"] == "b1"
    assert resp.body == body


@needs_cassettes
def test_cassette_replay_streaming_split_into_events(backend: MockBackend) -> None:
    code, content_type, body = cassette_response("chat-streaming")
    resp = chat(backend.port, {"model": "m", "stream": True}, {"x-mock-cassette": "chat-streaming"})
    assert resp.status == code == 200
    assert resp.headers["content-type"] == content_type
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.body == body
    expected_events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    assert len(expected_events) > 10
    assert resp.events() == expected_events


@needs_cassettes
def test_cassette_replay_error_status(backend: MockBackend) -> None:
    code, _, body = cassette_response("chat-bad-request")
    resp = chat(backend.port, {"model": "m"}, {"x-mock-cassette": "chat-bad-request"})
    assert resp.status == code == 400
    assert resp.body == body


def test_unknown_cassette_is_404(backend: MockBackend) -> None:
    resp = chat(backend.port, {"model": "m"}, {"x-mock-cassette": "no-such-cassette"})
    assert resp.status == 404
    assert resp.json()["error"]["code"] == "cassette_not_found"
    assert chat(backend.port, {"model": "m"}, {"x-mock-cassette": "../secrets"}).status == 400


def test_without_a_cassette_dir_cassettes_are_refused_wherever_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder that looks like the test data, in the working directory and its parent: not searched.
    (tmp_path / "shared" / "testdata" / "openai-cassettes").mkdir(parents=True)
    (tmp_path / "shared" / "testdata" / "openai-cassettes" / "chat-basic.yaml").write_text("interactions: []\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("IPC_ROUTER_MOCK_CASSETTES", str(tmp_path / "shared" / "testdata" / "openai-cassettes"))
    with MockBackend(name="nodir") as b:
        resp = chat(b.port, {"model": "m"}, {"x-mock-cassette": "chat-basic"})
    assert resp.status == 500
    assert resp.json()["error"]["code"] == "cassette_dir_not_found"


# ---------------------------------------------------------------------------------------------------------------
# other endpoints and recording


def test_echo_and_healthz(client: Client) -> None:
    resp = client.request("GET", "/v1/models?limit=2")
    assert resp.status == 200
    assert resp.json() == {"backend": "b1", "path": "/v1/models?limit=2", "method": "GET"}
    assert client.request("PUT", "/anything/else", b"x").json()["method"] == "PUT"
    assert client.request("GET", "/healthz").status == 200


def test_request_recording(backend: MockBackend, client: Client) -> None:
    t_before = time.time()
    client.request("POST", "/v1/chat/completions", {"model": "rec"}, {"X-Custom-Header": "Value"})
    client.request("GET", "/other")
    client.request("GET", "/healthz")  # not recorded
    t_after = time.time()

    reqs = backend.requests
    assert [(r.method, r.path) for r in reqs] == [("POST", "/v1/chat/completions"), ("GET", "/other")]
    first = reqs[0]
    assert first.headers["x-custom-header"] == "Value"
    assert first.headers["content-type"] == "application/json"
    assert all(k == k.lower() for k in first.headers)
    assert first.body == b'{"model":"rec"}'
    assert first.json_body() == {"model": "rec"}
    assert t_before <= first.time <= reqs[1].time <= t_after

    listed = client.request("GET", "/_mock/requests").json()
    assert [r["path"] for r in listed] == ["/v1/chat/completions", "/other"]
    assert listed[0]["body"] == '{"model":"rec"}'
    assert listed[0]["headers"]["x-custom-header"] == "Value"

    assert client.request("DELETE", "/_mock/requests").status == 200
    assert backend.requests == []
    assert client.request("GET", "/_mock/requests").json() == []

    client.request("GET", "/again")
    assert len(backend.wait_for_requests(1, timeout=2)) == 1
    backend.clear()
    assert backend.requests == []


def test_keep_alive_two_requests_one_connection(backend: MockBackend, client: Client) -> None:
    r1 = client.request("POST", "/v1/chat/completions", {"model": "a"})
    r2 = client.request("POST", "/v1/chat/completions", {"model": "b", "stream": True})
    assert r1.status == r2.status == 200
    assert r1.json()["model"] == "a"
    assert sse_payloads(r2)[-1] == "[DONE]"
    assert "connection" not in r1.headers
    reqs = backend.requests
    assert len(reqs) == 2
    assert reqs[0].client == reqs[1].client  # same peer address: same TCP connection


def test_pipelined_requests(backend: MockBackend, client: Client) -> None:
    client.sock.sendall(raw_request("GET", "/one") + raw_request("GET", "/two"))
    assert client.read_response().json()["path"] == "/one"
    assert client.read_response().json()["path"] == "/two"


def test_connection_close_is_honoured(backend: MockBackend, client: Client) -> None:
    resp = client.request("GET", "/x", headers={"connection": "close"})
    assert resp.headers["connection"] == "close"
    assert client.sock.recv(1) == b""


def test_expect_100_continue(backend: MockBackend, client: Client) -> None:
    body = orjson.dumps({"model": "m"})
    head = raw_request("POST", "/v1/chat/completions", b"", {"expect": "100-continue"})
    head = head.replace(b"content-length: 0", b"content-length: %d" % len(body))
    client.sock.sendall(head)
    assert client.sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.sock.sendall(body)
    assert client.read_response().json()["model"] == "m"


def test_client_disconnect_mid_stream_and_stop_closes_connections(backend: MockBackend) -> None:
    c = Client(backend.port)
    headers = {"x-mock-tokens": "50", "x-mock-token-delay-ms": "20"}
    c.send("POST", "/v1/chat/completions", orjson.dumps({"model": "m", "stream": True}), headers)
    assert c.sock.recv(65536).startswith(b"HTTP/1.1 200")
    c.close()
    assert chat(backend.port, {"model": "m"}).status == 200

    idle = Client(backend.port)
    try:
        assert idle.request("GET", "/x").status == 200
        backend.stop()
        assert idle.sock.recv(1) == b""  # idle keep-alive connection dropped by stop()
    finally:
        idle.close()


def test_start_fails_on_port_in_use() -> None:
    with MockBackend(name="first") as b, pytest.raises(OSError):
        MockBackend(name="second", port=b.port).start()


# ---------------------------------------------------------------------------------------------------------------
# async API and CLI


def test_async_serve() -> None:
    async def main() -> None:
        app = MockApp(MockConfig(name="async", tokens=2))
        server = await serve(app.config, app)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_request("POST", "/v1/chat/completions", b'{"model":"x"}', {"connection": "close"}))
            await writer.drain()
            raw = await reader.read()
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"x-mock-backend: async" in head
            assert orjson.loads(body)["choices"][0]["message"]["content"] == "word0 word1"
            assert [r.path for r in app.requests] == ["/v1/chat/completions"]
        finally:
            await app.close()

    asyncio.run(main())


CLI_FORMS = {
    "module": [sys.executable, "-m", "ipc_router.tools.mock_backend"],
    "ipc-router mock-backend": [sys.executable, "-m", "ipc_router.cli", "mock-backend"],
}


@pytest.mark.parametrize("form", CLI_FORMS)
def test_cli_subprocess(form: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [*CLI_FORMS[form], "--listen", "127.0.0.1:0", "--name", "cli"]
    cmd += ["--tokens", "2", "--prompt-tokens", "4", "--first-token-delay", "0", "--token-delay", "0"]
    if CASSETTES.is_dir():
        cmd += ["--cassettes", str(CASSETTES)]
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
            resp = chat(int(m.group(1)), {"model": "m"})
            assert resp.headers["x-mock-backend"] == "cli"
            assert resp.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
            if CASSETTES.is_dir():
                assert chat(int(m.group(1)), {"model": "m"}, {"x-mock-cassette": "chat-bad-request"}).status == 400
        finally:
            proc.terminate()
            try:
                assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown
            finally:
                if proc.poll() is None:
                    proc.kill()


@pytest.mark.parametrize("form", CLI_FORMS)
def test_cli_help_shows_the_defaults(form: str) -> None:
    out = subprocess.run([*CLI_FORMS[form], "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    for text in ("(default: 127.0.0.1:0)", "--tokens TOKENS completion tokens per response (default: 16)",
                 "usage.prompt_tokens (default: 10)", "x-mock-cassette"):  # fmt: skip
        assert text in flat, out
