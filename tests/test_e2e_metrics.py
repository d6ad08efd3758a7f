"""GenAI metrics from real traffic through Envoy: ground truth from a mock backend with known delays and usage."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import (
    Backends,
    chat,
    model_rule,
    request,
    samples,
    scrape,
    start_backends,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.envoy

MODELS = ["m-stream", "m-plain", "m-fail", "m-one", "m-reset", "m-otlp"]
TTFT = 0.200
GAP = 0.050
N = 6

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("a")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def calls_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calls") / "calls.jsonl"


@pytest.fixture(scope="module")
def stack(backends: Backends, calls_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = write_config(
        tmp_path_factory.mktemp("cfg") / "config.yaml", [model_rule(m, m, "a") for m in MODELS], backends
    )
    s = Stack(
        str(cfg),
        metrics_port=free_port(),
        metrics="tests.support.metrics_plugins:recording",
        app_dir=str(REPO),
        sidecar_args=["--metrics-request-header-attributes", "x-team-id:team_id", "--request-ttl", "1"],
        env={"IPC_ROUTER_TEST_CALLS": str(calls_file)},
    )
    with s:
        yield s


def metrics_text(stack: Stack) -> str:
    assert stack.metrics_url
    return scrape(stack.metrics_url)


def wait_duration_count(stack: Stack, model: str, count: int) -> str:
    def ready() -> str | None:
        text = metrics_text(stack)
        got = samples(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model=model)
        return text if got and sum(got) >= count else None

    text = wait_until(ready, timeout=5.0)
    assert text, f"no duration sample for {model}"
    return str(text)


def one(text: str, name: str, **labels: str) -> float:
    got = samples(text, name, **labels)
    assert len(got) == 1, (name, labels, got)
    return got[0]


def test_streaming_ground_truth(stack: Stack) -> None:
    hdrs = {
        "x-team-id": "team-7", "x-mock-tokens": str(N), "x-mock-prompt-tokens": "13",
        "x-mock-first-token-delay-ms": str(int(TTFT * 1000)), "x-mock-token-delay-ms": str(int(GAP * 1000)),
    }  # fmt: skip
    r = request(stack.url, "/v1/chat/completions", chat("m-stream", stream=True), hdrs)
    assert r.status == 200
    text = wait_duration_count(stack, "m-stream", 1)
    model = {"gen_ai_request_model": "m-stream", "team_id": "team-7"}

    assert one(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **model) == 13
    assert one(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **model) == N
    assert one(text, "gen_ai_client_token_usage_count", gen_ai_token_type="output", **model) == 1
    assert one(text, "gen_ai_server_request_duration_seconds_count", **model) == 1
    ttft = one(text, "gen_ai_server_time_to_first_token_seconds_sum", **model)
    duration = one(text, "gen_ai_server_request_duration_seconds_sum", **model)
    tpot = one(text, "gen_ai_server_time_per_output_token_seconds_sum", **model)
    assert TTFT <= ttft <= TTFT + 0.030, ttft
    assert duration >= TTFT + (N - 1) * GAP
    assert tpot == pytest.approx((duration - ttft) / (N - 1), rel=1e-9)
    assert GAP * 0.9 <= tpot <= GAP + 0.030
    assert one(text, "gen_ai_server_request_duration_seconds_count", gen_ai_provider_name="openai", **model) == 1


def test_non_streaming_usage_and_no_token_latency(stack: Stack, backends: Backends) -> None:
    for _ in range(3):
        r = request(stack.url, "/v1/chat/completions", chat("m-plain"), {"x-mock-tokens": "4"})
        assert r.status == 200
        usage = r.json()["usage"]
    text = wait_duration_count(stack, "m-plain", 3)
    assert one(text, "gen_ai_client_token_usage_sum", gen_ai_request_model="m-plain", gen_ai_token_type="output") == 12
    assert one(text, "gen_ai_client_token_usage_sum", gen_ai_request_model="m-plain", gen_ai_token_type="input") == (
        3 * usage["prompt_tokens"]
    )
    assert one(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-plain") == 3
    assert samples(text, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="m-plain") == []


def test_failures_are_labelled(stack: Stack) -> None:
    r = request(stack.url, "/v1/chat/completions", chat("m-fail"), {"x-mock-status": "503"})
    assert r.status == 503
    text = wait_duration_count(stack, "m-fail", 1)
    assert (
        one(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-fail", error_type="503") == 1
    )
    assert samples(text, "gen_ai_client_token_usage_count", gen_ai_request_model="m-fail") == []


def test_one_output_token_has_ttft_but_no_tpot(stack: Stack) -> None:
    r = request(stack.url, "/v1/chat/completions", chat("m-one", stream=True), {"x-mock-tokens": "1"})
    assert r.status == 200
    text = wait_duration_count(stack, "m-one", 1)
    assert one(text, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="m-one") == 1
    assert samples(text, "gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model="m-one") == []


def test_custom_metrics_receive_each_call_once_in_order(stack: Stack, calls_file: Path) -> None:
    calls_file.write_text("")
    r = request(stack.url, "/v1/chat/completions", chat("m-stream", stream=True), {"x-team-id": "order"})
    assert r.status == 200
    wait_until(lambda: "record_request_completion" in calls_file.read_text())
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert len({c["obj"] for c in calls}) == 1  # one object per request
    assert [c["call"] for c in calls] == [
        "start_request", "set_model", "set_backend",
        "record_token_latency", "record_token_usage", "record_request_completion",
    ]  # fmt: skip
    assert calls[0]["team"] == "order" and calls[1]["model"] == "m-stream" and calls[2]["backend"] == "a"
    assert calls[-1]["success"] is True and calls[-1]["attrs"] == {"team_id": "order"}
    # Timestamps are the filter's: arrival <= first token <= end.
    assert calls[0]["t"] <= calls[3]["t"] <= calls[-1]["t"]


def _reset_mid_stream(stack: Stack) -> None:
    body = json.dumps(chat("m-reset", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", stack.listen_port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-mock-tokens: 50\r\nx-mock-token-delay-ms: 200\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert s.recv(100).startswith(b"HTTP/1.1 200")


def test_client_reset_on_the_fast_path_leaves_no_state_and_records_nothing(stack: Stack) -> None:
    assert stack.shm
    _reset_mid_stream(stack)
    # The filter reports a completion only when the response ends; Envoy drops a reset stream's coroutine, and the
    # sidecar never held anything for it (a fast-path request has no in-flight entry to expire).
    time.sleep(1.5)
    text = metrics_text(stack)
    assert samples(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-reset") == []
    assert samples(text, "ipc_router_requests_in_flight") == [0.0]


def test_client_reset_on_the_socket_path_expires_and_is_counted(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", [model_rule("m-reset", "m-reset", "a")], backends)
    with Stack(str(cfg), metrics_port=free_port(), shm=False, sidecar_args=["--request-ttl", "1"]) as s:

        def expired() -> float:
            return sum(samples(metrics_text(s), "ipc_router_requests_expired_total"))

        before = expired()
        _reset_mid_stream(s)
        # The client is gone mid-stream: no completion will come; the request expires after --request-ttl 1.
        assert wait_until(lambda: expired() >= before + 1, timeout=6.0)
        text = metrics_text(s)
        assert samples(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-reset") == []


class _OTLPReceiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OTLPHandler)
        self.exports: list[ExportMetricsServiceRequest] = []


class _OTLPHandler(BaseHTTPRequestHandler):
    server: _OTLPReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        msg = ExportMetricsServiceRequest()
        msg.ParseFromString(body)
        self.server.exports.append(msg)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _otlp_points(exports: list[ExportMetricsServiceRequest], name: str, model: str) -> list[Any]:
    points = []
    for e in exports:
        for rm in e.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != name:
                        continue
                    for p in m.histogram.data_points:
                        attrs = {a.key: a.value.string_value for a in p.attributes}
                        if attrs.get("gen_ai.request.model") == model:
                            points.append((attrs, p))
    return points


def test_otlp_export(backends: Backends, tmp_path: Path) -> None:
    receiver = _OTLPReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = write_config(tmp_path / "config.yaml", [model_rule("m-otlp", "m-otlp", "a")], backends)
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
        with Stack(str(cfg), sidecar_args=["--otlp-endpoint", endpoint, "--otlp-interval", "0.3"]) as s:
            r = request(s.url, "/v1/chat/completions", chat("m-otlp", stream=True), {"x-mock-tokens": "3"})
            assert r.status == 200

            def exported() -> list[Any]:
                return _otlp_points(receiver.exports, "gen_ai.client.token.usage", "m-otlp")

            assert wait_until(exported, timeout=5.0)
            time.sleep(0.1)
        # After the sidecar stopped (SIGTERM flushes a last export), the cumulative points hold the exact totals.
        usage = {a["gen_ai.token.type"]: p.sum for a, p in exported()}
        assert usage == {"input": 10, "output": 3}
        durations = _otlp_points(receiver.exports, "gen_ai.server.request.duration", "m-otlp")
        assert durations and durations[-1][1].count == 1
        assert list(durations[-1][1].explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_custom_metrics_that_raise_never_fail_the_request(backends: Backends, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", [model_rule("m-broken", "m-broken", "a")], backends)
    broken = "tests.support.metrics_plugins:broken"
    with Stack(str(cfg), metrics=broken, metrics_port=free_port(), app_dir=str(REPO)) as s:
        for _ in range(2):
            r = request(s.url, "/v1/chat/completions", chat("m-broken"))
            assert r.status == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert s.metrics_url

        def errors() -> float:
            assert s.metrics_url
            return sum(samples(scrape(s.metrics_url), "ipc_router_plugin_errors_total", plugin="metrics"))

        assert wait_until(lambda: errors() == 2)
        assert s.sidecar is not None and s.sidecar.poll() is None


def test_clean_stop_records_what_the_rings_still_hold(backends: Backends, tmp_path: Path) -> None:
    """SIGTERM: the last drain of the rings happens before the final OTLP export, so no completion that reached a
    ring is lost at a clean stop. The drain loop runs once a minute here: only the final drain can find them."""
    receiver = _OTLPReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
        cfg = write_config(tmp_path / "config.yaml", [model_rule("m-stop", "m-stop", "a")], backends)
        args = ["--otlp-endpoint", endpoint, "--otlp-interval", "60", "--shm-drain-interval", "60"]
        with Stack(str(cfg), sidecar_args=args) as s:
            assert s.sidecar is not None and s.shm
            tokens = {"x-mock-tokens": "2"}
            for _ in range(11):  # the miss, then hits
                assert request(s.url, "/v1/chat/completions", chat("m-stop"), tokens).status == 200
            s.sidecar.send_signal(signal.SIGTERM)
            assert s.sidecar.wait(timeout=15) == 0
        points = _otlp_points(receiver.exports, "gen_ai.server.request.duration", "m-stop")
        assert points and max(p.count for _, p in points) == 11
        usage = _otlp_points(receiver.exports, "gen_ai.client.token.usage", "m-stop")
        outputs = [p for attrs, p in usage if attrs.get("gen_ai.token.type") == "output"]
        assert max(p.sum for p in outputs) == 11 * 2
    finally:
        receiver.shutdown()
