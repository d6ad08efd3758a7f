"""The fast path's per-stream token through a real Envoy: every completion record belongs to its own request.

The filter keeps a request's record half in its Lua state under a token it puts into a request header
(``x-ipc-router-rec``) and reads back in the response phase (``handle:requestHeaders()``). These tests send
requests whose usage differs per request (the mock's ``x-mock-tokens``) and carry a per-request id that the sidecar
turns into a metric attribute (``--metrics-request-header-attributes x-test-id:test_id``): each id must end up with
exactly its own tokens, model and count, over HTTP/1.1 keep-alive (many requests on one connection), pipelined
HTTP/1.1, concurrent HTTP/2 streams on one connection, client resets mid-response (HTTP/1.1 and HTTP/2) and a
client that sends the token header itself; with Envoy's ``--concurrency`` 1 and 2.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import httptools
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import Backends, iter_sse, model_rule, start_backends, write_config
from tests.support.shm_e2e import PATH, stats, wait_for

pytestmark = pytest.mark.envoy

MODELS = {"gpt-4o-mini": "b", "llama3.3": "a"}  # model -> the backend its rule sends to
TOKEN_HEADER = "x-ipc-router-rec"


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a", "b", tokens=3)
    yield b
    b.stop()


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"concurrency{n}")
def stack(
    request: pytest.FixtureRequest, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    rules = [model_rule("gpt", "gpt-4o-mini", "b"), model_rule("llama", "llama3.3", "a")]
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "config.yaml", rules, backends)
    with Stack(
        str(cfg), metrics_port=free_port(), envoy_concurrency=request.param, route_timeout_ms=3000,
        # Forgotten (and reported incomplete) 2-4 s after a reset: short enough to wait for, long enough for the
        # slowest answer here on a busy machine.
        pending_timeout_s=2.0,
        sidecar_args=["--metrics-request-header-attributes", "x-test-id:test_id"],
    ) as s:  # fmt: skip
        warm(s)
        yield s


_ids = iter(range(1, 1 << 30))


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def warm(s: Stack) -> None:
    """One request per model, so that the tests' requests are cache hits (the fast path proper)."""
    for model in MODELS:
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", s.listen_port, timeout=10)
            body = json.dumps({"model": model, "messages": []})
            conn.request("POST", PATH, body, {"content-type": "application/json"})
            assert conn.getresponse().read()
            conn.close()


def chat_request(model: str, test_id: str, tokens: int, *, stream: bool = False, **headers: str) -> bytes:
    """One HTTP/1.1 request's bytes."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "model": model}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    data = json.dumps(body).encode()
    head = {
        "host": "gw", "content-type": "application/json", "content-length": str(len(data)),
        "x-test-id": test_id, "x-mock-tokens": str(tokens), **headers,
    }  # fmt: skip
    return (f"POST {PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + data


def completion_tokens(body: bytes, stream: bool) -> int:
    if stream:
        usage = [c["usage"] for c in iter_sse(body) if c.get("usage")]
        assert len(usage) == 1, body[-300:]
        return int(usage[0]["completion_tokens"])
    return int(json.loads(body)["usage"]["completion_tokens"])


class Responses:
    """HTTP/1.1 responses parsed off one connection in order (pipelined or not), with httptools."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[tuple[int, bytes]] = []
        self._body = bytearray()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._body = bytearray()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), bytes(self._body)))

    def read(self, n: int, timeout: float = 20.0) -> list[tuple[int, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.done) < n:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, f"connection closed after {len(self.done)} of {n} responses"
            self.parser.feed_data(data)
        return self.done[:n]


def per_test_id(s: Stack) -> dict[str, dict[str, Any]]:
    """From the sidecar's Prometheus endpoint: test_id -> {count, output tokens, input tokens, model, backend}."""
    import urllib.request

    with urllib.request.urlopen(s.metrics_url or "", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tid = sample.labels.get("test_id")
            if tid is None:
                continue
            entry = out.setdefault(tid, {"count": 0.0, "output": 0.0, "input": 0.0, "models": set(), "errors": set()})
            if sample.name == "gen_ai_server_request_duration_seconds_count":
                entry["count"] += sample.value
                entry["models"].add(sample.labels.get("gen_ai_request_model"))
                if "error_type" in sample.labels:
                    entry["errors"].add(sample.labels["error_type"])
            elif sample.name == "gen_ai_client_token_usage_sum":
                entry[sample.labels.get("gen_ai_token_type", "?")] += sample.value
    return out


def assert_recorded_exactly(s: Stack, expected: dict[str, tuple[str, int]]) -> None:
    """Each test id was recorded once, with its own model and completion tokens (and the mock's 10 prompt
    tokens): no record lost, doubled or given another request's answer."""

    def check() -> dict[str, dict[str, Any]] | None:
        got = per_test_id(s)
        return got if all(got.get(t, {}).get("count") == 1 for t in expected) else None

    got = wait_for(check, timeout=10, interval=0.1) or per_test_id(s)
    for tid, (model, tokens) in expected.items():
        entry = got.get(tid)
        assert entry is not None, f"{tid}: no record"
        assert (entry["count"], entry["models"], entry["output"], entry["input"]) == (1, {model}, tokens, 10), (
            tid, entry,
        )  # fmt: skip
        assert not entry["errors"], (tid, entry)


def test_many_sequential_requests_on_one_keep_alive_connection(stack: Stack, backends: Backends) -> None:
    backends.clear()
    expected: dict[str, tuple[str, int]] = {}
    sock = socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10)
    try:
        responses = Responses(sock)
        for i in range(40):
            model = list(MODELS)[i % 2]
            tid, tokens, stream = new_id("ka"), 1 + i, i % 3 == 0
            expected[tid] = (model, tokens)
            sock.sendall(chat_request(model, tid, tokens, stream=stream))
            status, body = responses.read(i + 1)[i]
            assert status == 200 and completion_tokens(body, stream) == tokens
    finally:
        sock.close()
    assert_recorded_exactly(stack, expected)
    assert sum(backends.counts().values()) == 40


def test_pipelined_requests_are_each_recorded_as_their_own(stack: Stack, backends: Backends) -> None:
    """Twelve requests in one write before any answer: Envoy's HTTP/1 codec takes them one at a time (the first
    answer is slowest, so overlapping streams would finish out of order); each answer and record is its own."""
    backends.clear()
    expected: dict[str, tuple[str, int]] = {}
    wire = b""
    for i in range(12):
        model, tid, tokens = list(MODELS)[i % 2], new_id("pipe"), 100 + i
        expected[tid] = (model, tokens)
        delay = {"x-mock-first-token-delay-ms": "80"} if i == 0 else {}
        wire += chat_request(model, tid, tokens, **delay)
    sock = socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10)
    try:
        sock.sendall(wire)
        answers = Responses(sock).read(12)
    finally:
        sock.close()
    assert [completion_tokens(body, False) for _, body in answers] == [100 + i for i in range(12)]
    assert_recorded_exactly(stack, expected)


class H2Client:
    """Concurrent HTTP/2 streams on one prior-knowledge cleartext connection (hyper-h2 over a socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.status: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()

    def send(self, model: str, test_id: str, tokens: int, *, stream: bool, **headers: str) -> int:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "model": model}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        data = json.dumps(body).encode()
        sid: int = self.conn.get_next_available_stream_id()
        head = [
            (":method", "POST"), (":path", PATH), (":scheme", "http"), (":authority", "gw"),
            ("content-type", "application/json"), ("x-test-id", test_id), ("x-mock-tokens", str(tokens)),
            *headers.items(),
        ]  # fmt: skip
        self.conn.send_headers(sid, head)
        self.conn.send_data(sid, data, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[sid] = bytearray()
        return sid

    def cancel(self, sid: int) -> None:
        self.conn.reset_stream(sid, error_code=8)  # CANCEL
        self.sock.sendall(self.conn.data_to_send())
        self.reset.add(sid)

    def pump(self, until: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, "connection closed"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    if ev.stream_id in self.bodies:
                        self.bodies[ev.stream_id] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    self.reset.add(ev.stream_id)
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


def test_concurrent_http2_streams_on_one_connection_are_each_their_own(stack: Stack) -> None:
    """Sixteen streams in flight at once on one HTTP/2 connection, answers of different lengths and delays (they
    end out of order), one stream cancelled by the client mid-answer: every other stream's answer and record is
    its own, and the cancelled one is never recorded as complete."""
    client = H2Client(stack.listen_port)
    expected: dict[str, tuple[str, int]] = {}
    sids: dict[int, tuple[str, int, bool]] = {}
    try:
        slow_tid = new_id("h2-cancel")
        slow = client.send(
            "gpt-4o-mini", slow_tid, 200, stream=True,
            **{"x-mock-first-token-delay-ms": "1", "x-mock-token-delay-ms": "20"},
        )  # fmt: skip
        for i in range(16):
            model, tid, tokens, stream = list(MODELS)[i % 2], new_id("h2"), 1000 + i, i % 2 == 1
            delay = str((16 - i) * 5)  # the first sent ends last
            sids[client.send(model, tid, tokens, stream=stream, **{"x-mock-first-token-delay-ms": delay})] = (
                tid, tokens, stream,
            )  # fmt: skip
            expected[tid] = (model, tokens)
        client.pump(lambda: len(client.bodies[slow]) > 0)  # the slow stream has begun its answer
        client.cancel(slow)
        client.pump(lambda: all(sid in client.ended for sid in sids))
    finally:
        client.close()
    for sid, (_, tokens, stream) in sids.items():
        assert client.status[sid] == 200 and completion_tokens(bytes(client.bodies[sid]), stream) == tokens
    assert_recorded_exactly(stack, expected)
    assert_never_recorded_complete(stack, slow_tid)


def assert_never_recorded_complete(s: Stack, test_id: str) -> None:
    """A request cut by a reset: no GenAI metrics with usage (the sidecar counts it as expired once the filter
    reports it incomplete; that expiry carries no attributes to look for here)."""
    entry = per_test_id(s).get(test_id)
    assert entry is None or (entry["output"] == 0 and entry["input"] == 0), entry


def rst_close(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client resets, Envoy never sends the rest of the answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_reset_mid_answer_leaves_no_misattributed_record(stack: Stack) -> None:
    """A streaming answer cut by the client's RST after its first chunk: its record half stays in the filter until
    pending_timeout_s, then is reported incomplete (counted expired); a new connection from the very same client
    port, and other connections meanwhile, get their own records only."""
    before = int(stats(stack)["expired"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.connect(("127.0.0.1", stack.listen_port))
    cut = new_id("cut")
    sock.sendall(
        chat_request("llama3.3", cut, 300, stream=True, **{"x-mock-token-delay-ms": "20"}),
    )
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    rst_close(sock)

    expected: dict[str, tuple[str, int]] = {}
    again = socket.socket()  # the same 4-tuple as the reset connection (a RST leaves no TIME_WAIT)
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.bind(("127.0.0.1", port))
    again.connect(("127.0.0.1", stack.listen_port))
    try:
        responses = Responses(again)
        for i in range(6):
            model, tid, tokens = list(MODELS)[i % 2], new_id("after-cut"), 7 + i
            expected[tid] = (model, tokens)
            again.sendall(chat_request(model, tid, tokens, stream=i % 2 == 0))
            assert completion_tokens(responses.read(i + 1)[i][1], i % 2 == 0) == tokens
    finally:
        again.close()
    assert_recorded_exactly(stack, expected)

    def expired() -> bool:
        # The filter looks at its table when requests arrive: keep some coming (each its own connection, so that
        # every worker sees some).
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
        conn.request("POST", PATH, json.dumps({"model": "gpt-4o-mini", "messages": []}))
        conn.getresponse().read()
        conn.close()
        return int(stats(stack)["expired"]) > before

    assert wait_for(expired, timeout=15, interval=0.2), stats(stack)
    assert_never_recorded_complete(stack, cut)


def test_a_token_header_from_the_client_never_names_another_requests_record(stack: Stack) -> None:
    """While a slow answer is in flight, other requests arrive carrying ``x-ipc-router-rec`` with every small
    token value, on paths the filter does not route and on the fast path itself: the filter drops the client's
    header, so the slow request keeps its own record and the others theirs."""
    slow_tid = new_id("slow")
    results: dict[str, Any] = {}

    def slow() -> None:
        sock = socket.create_connection(("127.0.0.1", stack.listen_port), timeout=20)
        try:
            sock.sendall(chat_request("llama3.3", slow_tid, 40, stream=True, **{"x-mock-token-delay-ms": "25"}))
            results["slow"] = Responses(sock).read(1)[0]
        finally:
            sock.close()

    th = threading.Thread(target=slow)
    th.start()
    expected: dict[str, tuple[str, int]] = {}
    try:
        time.sleep(0.2)  # the slow answer is streaming
        for token in range(1, 41):
            conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
            conn.request("GET", "/v1/models", headers={TOKEN_HEADER: str(token)})
            conn.getresponse().read()
            tid = new_id("spoof")
            conn.request(
                "POST", PATH, json.dumps({"model": "gpt-4o-mini", "messages": []}),
                {"content-type": "application/json", TOKEN_HEADER: str(token), "x-test-id": tid,
                 "x-mock-tokens": "5"},
            )  # fmt: skip
            resp = conn.getresponse()
            assert resp.status == 200 and completion_tokens(resp.read(), False) == 5
            conn.close()
            expected[tid] = ("gpt-4o-mini", 5)
    finally:
        th.join(30)
    status, body = results["slow"]
    assert status == 200 and completion_tokens(body, True) == 40
    expected[slow_tid] = ("llama3.3", 40)
    assert_recorded_exactly(stack, expected)
