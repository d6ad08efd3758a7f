"""Micro-benchmarks of the sidecar's per-request server time, without sockets.

* ``Service.handle`` on a prepared msgpack ``/route`` :class:`Request` whose decision is cached (the steady state
  behind Envoy): decode, model extraction, cached decision, default GenAI metrics object, in-flight table, encode.
  Goal: <= 15 µs per request.
* The same plus ``encode_response`` (what the server writes), and the ``/complete`` that follows (answer + metrics).
* The protocol alone: ``Connection.feed`` of one whole request and ``encode_response`` of its answer.
* The codec alone: msgpack decode of one ``/route`` message, encode of one answer.

``make bench`` runs them with timing; plain ``pytest bench`` runs each once as a smoke test. Every benchmark checks
its result.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from pytest_benchmark.fixture import BenchmarkFixture

from ipc_router.filterapi import Config, config_from_dict
from ipc_router.metrics import METER_NAME
from ipc_router.protocol import MSGPACK, Connection, Request, RouteMessage, decode_message, encode_body, encode_response
from ipc_router.router import Routing
from ipc_router.service import Response, Service

MODEL = "x-ai-eg-model"
N_RULES = 20


def twenty_rules() -> Config:
    return config_from_dict(
        {
            "rules": [
                {
                    "name": f"rule-{i}",
                    "headers": [{"name": MODEL, "value": f"model-{i}"}],
                    "backends": [{"name": f"backend-{i}-a", "weight": 3}, {"name": f"backend-{i}-b", "weight": 1}],
                }
                for i in range(N_RULES)
            ]
        }
    )


# What the Lua filter sends: the request's headers as Envoy has them, and an OpenAI chat body.
ROUTE_MESSAGE = {
    "id": "2f7c8a0e-5b7e-4c39-9a59-3c4f0b1f8a11",
    "t": 123_456_789_000,
    "path": "/v1/chat/completions",
    "headers": {
        ":authority": "gateway.example.com",
        ":method": "POST",
        ":path": "/v1/chat/completions",
        ":scheme": "https",
        "content-type": "application/json",
        "authorization": "Bearer sk-test",
        "user-agent": "openai-python/1.54.0",
        "x-request-id": "2f7c8a0e-5b7e-4c39-9a59-3c4f0b1f8a11",
        "x-forwarded-proto": "https",
    },
    "body": b'{"model":"model-19","messages":[{"role":"user","content":"Say hello in one short sentence."}],'
    b'"max_tokens":64,"stream":false}',
}
ROUTE_BODY: bytes = msgpack.packb(ROUTE_MESSAGE, use_bin_type=True)
ROUTE_HTTP = (
    b"POST /route HTTP/1.1\r\nhost: ipc_router\r\ncontent-type: application/msgpack\r\n"
    b"content-length: %d\r\n\r\n" % len(ROUTE_BODY)
) + ROUTE_BODY
USAGE = b'{"id":"c","object":"chat.completion","usage":{"prompt_tokens":17,"completion_tokens":9,"total_tokens":26}}'


@pytest.fixture
def service() -> Iterator[Service]:
    # As the server builds it: a real MeterProvider (no exporter here), default metrics, a route cache.
    provider = MeterProvider()
    svc = Service(Routing(twenty_rules(), generation=1), meter=provider.get_meter(METER_NAME))
    warm = svc.handle(Request("POST", "/route", {"content-type": MSGPACK}, ROUTE_BODY, True))
    assert isinstance(warm, Response)
    yield svc
    provider.shutdown()


def route_request() -> Request:
    (req,) = Connection().feed(ROUTE_HTTP)
    return req


def check_route_answer(resp: Response) -> None:
    assert resp.status == 200
    answer = msgpack.unpackb(resp.body)
    assert answer["set"]["x-ai-eg-selected-route"] == "rule-19"


def test_handle_route_cached(benchmark: BenchmarkFixture, service: Service) -> None:
    req = route_request()
    resp = benchmark(service.handle, req)
    assert isinstance(resp, Response)
    check_route_answer(resp)
    assert service.stats.requests["route", "routed_from_cache"] >= 1


def test_handle_route_cached_and_encode(benchmark: BenchmarkFixture, service: Service) -> None:
    req = route_request()
    handle = service.handle

    def one() -> bytes:
        resp = handle(req)
        assert isinstance(resp, Response)
        return encode_response(resp.status, resp.body, resp.content_type, req.keep_alive)

    out = benchmark(one)
    assert out.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\n")


def test_route_then_complete(benchmark: BenchmarkFixture, service: Service) -> None:
    # The two calls of one chat request, with the metrics recorded after the /complete answer.
    req = route_request()
    handle = service.handle

    def one() -> int:
        routed = handle(req)
        assert isinstance(routed, Response)
        key = msgpack.unpackb(routed.body)["id"]
        body = msgpack.packb({"id": key, "status": 200, "t_end": 123_956_789_000, "body": USAGE})
        done = handle(Request("POST", "/complete", {"content-type": MSGPACK}, body, True))
        assert isinstance(done, Response) and done.after is not None
        done.after()
        return done.status

    assert benchmark(one) == 204
    assert service.stats.usage_missing == 0


def test_protocol_feed_and_encode_one_request(benchmark: BenchmarkFixture) -> None:
    conn = Connection()
    answer_body = b"\x82\xa3set\x84" + b"\xa1k\xa1v" * 4 + b"\xa2id\xa5abc-1"

    def one() -> bytes:
        (req,) = conn.feed(ROUTE_HTTP)
        return encode_response(200, answer_body, MSGPACK, req.keep_alive)

    out = benchmark(one)
    assert out.endswith(answer_body)


def test_full_request_path(benchmark: BenchmarkFixture, service: Service) -> None:
    # Bytes in, bytes out: what one pipelined /route costs the server's Python code (no syscalls).
    conn = Connection()
    handle = service.handle

    def one() -> bytes:
        (req,) = conn.feed(ROUTE_HTTP)
        resp = handle(req)
        assert isinstance(resp, Response)
        return encode_response(resp.status, resp.body, resp.content_type, req.keep_alive)

    assert benchmark(one).startswith(b"HTTP/1.1 200 OK")


def test_codec_decode_route_message(benchmark: BenchmarkFixture) -> None:
    msg = benchmark(decode_message, ROUTE_BODY, MSGPACK, RouteMessage)
    assert msg.headers[":path"] == "/v1/chat/completions"
    assert msg.body == ROUTE_MESSAGE["body"]


def test_codec_encode_route_answer(benchmark: BenchmarkFixture) -> None:
    answer = {
        "set": {
            "x-ai-eg-model": "model-19",
            "x-ai-eg-selected-route": "rule-19",
            "x-ai-eg-original-path": "/v1/chat/completions",
            "x-ai-eg-selected-backend": "backend-19-a",
        },
        "id": "1f2e-6a3b-42",
    }
    out = benchmark(encode_body, answer, MSGPACK)
    assert msgpack.unpackb(out) == answer
