"""The service: what each endpoint answers for a parsed :class:`Request`, its stats, and the GenAI metrics it records
(over the real OTel SDK with an in-memory reader). No sockets: ``tests/test_server.py`` covers those.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import msgpack
import orjson
import pytest
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from plugins_for_tests import (  # top level, as the plugin specs name it (the stats show its module)
    PREMIUM_RULE,
    RaisingMetrics,
    async_unknown_rule_router,
    boom_router,
    raising_metrics_factory,
    sleepy_router,
    tenant_router,
    unknown_rule_router,
)

from ipc_router import x
from ipc_router.filterapi import Config, config_from_dict
from ipc_router.metrics import METER_NAME, new_default_chat_completion_metrics
from ipc_router.protocol import JSON, MSGPACK, Request
from ipc_router.router import Routing
from ipc_router.service import Response, Service, parse_header_attributes

MODEL = "x-ai-eg-model"
CHAT = "/v1/chat/completions"

CONFIG = config_from_dict(
    {
        "rules": [
            {
                "name": "gpt",
                "headers": [{"name": MODEL, "value": "gpt-4o-mini"}, {"name": MODEL, "value": "gpt-4o"}],
                "backends": [{"name": "openai", "schema": {"name": "OpenAI"}}],
                "modelsOwnedBy": "openai",
                "modelsCreatedAt": "2024-07-18T00:00:00Z",
            },
            {
                "name": PREMIUM_RULE,
                "headers": [{"name": "x-tenant", "value": "premium"}],
                "backends": [{"name": "premium-backend", "schema": {"name": "AzureOpenAI", "version": "2024-10-21"}}],
            },
            {
                "name": "llama",
                "headers": [{"type": "RegularExpression", "name": MODEL, "value": "llama-.*"}],
                "backends": [{"name": "kserve"}],
            },
            {"name": "local", "headers": [{"name": MODEL, "value": "local-model"}], "modelsOwnedBy": "me"},
            {"name": "gpt-again", "headers": [{"name": MODEL, "value": "gpt-4o"}]},
        ]
    }
)


# --- helpers ------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class SDK:
    """A real MeterProvider with an in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.meter: Meter = self.provider.get_meter(METER_NAME)

    def points(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out

    def one(self, points: dict[str, list[Any]], name: str, **attrs: Any) -> Any:
        found = [p for p in points.get(name, []) if all(p.attributes.get(k) == v for k, v in attrs.items())]
        assert len(found) == 1, f"{name} {attrs}: {[dict(p.attributes) for p in points.get(name, [])]}"
        return found[0]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    s = SDK()
    yield s
    s.provider.shutdown()


def service(
    config: Config = CONFIG, router: x.NewCustomRouterFn | None = None, generation: int = 1, **kw: Any
) -> Service:
    return Service(Routing(config, router, generation=generation), **kw)


def route_msg(model: str | None = "gpt-4o-mini", headers: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    body = orjson.dumps({"model": model, "messages": []} if model is not None else {"messages": []})
    return {"path": CHAT, "headers": dict(headers or {}), "body": body, **extra}


def post(path: str, message: Any, fmt: str = MSGPACK, raw: bytes | None = None) -> Request:
    if raw is not None:
        body = raw
    elif fmt == JSON:
        body = orjson.dumps(message, default=_text)  # JSON has no bytes: send text, as curl users do
    else:
        body = msgpack.packb(message)
    return Request("POST", path, {"content-type": fmt}, body, True)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError


def get(path: str, content_type: str | None = None) -> Request:
    return Request("GET", path, {} if content_type is None else {"content-type": content_type}, b"", True)


def handle(svc: Service, request: Request) -> Response:
    """Service.handle; an awaitable answer (async router) is run to completion with asyncio."""
    result = svc.handle(request)
    if isinstance(result, Response):
        return result
    assert inspect.isawaitable(result)

    async def wait(a: Awaitable[Response]) -> Response:
        return await a

    return asyncio.run(wait(result))


def decode(resp: Response) -> Any:
    return orjson.loads(resp.body) if resp.content_type == JSON else msgpack.unpackb(resp.body)


def route(svc: Service, fmt: str = MSGPACK, **kw: Any) -> dict[str, Any]:
    """POST /route; returns the decoded 200 answer."""
    resp = handle(svc, post("/route", route_msg(**kw), fmt))
    assert resp.status == 200
    assert resp.content_type == fmt
    assert resp.after is None
    answer: dict[str, Any] = decode(resp)
    return answer


def respond(answer: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """The immediate response inside a /route answer: (status, decoded OpenAI error body)."""
    assert set(answer) == {"respond"}, answer
    r = answer["respond"]
    assert set(r) == {"status", "headers", "body"}
    assert r["headers"] == {"content-type": "application/json"}
    return r["status"], orjson.loads(r["body"])


def complete(svc: Service, key: str, fmt: str = MSGPACK, run_after: bool = True, **fields: Any) -> Response:
    message = {"id": key, "status": 200, **fields}
    resp = handle(svc, post("/complete", message, fmt))
    assert resp.status == 204
    assert resp.body == b""
    if run_after and resp.after is not None:
        resp.after()
    return resp


def requests_stats(svc: Service) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = svc.snapshot()["requests"]
    return stats


# --- /route: success ----------------------------------------------------------------------------------------------


def test_route_sets_headers_and_gives_an_id() -> None:
    svc = service()
    answer = route(svc)
    assert set(answer) == {"set", "id"}
    assert answer["set"] == {
        MODEL: "gpt-4o-mini",
        "x-ai-eg-selected-route": "gpt",
        "x-ai-eg-selected-backend": "openai",
        "x-ai-eg-selected-cluster": "backend_openai",  # what Envoy routes on
        "x-ai-eg-original-path": CHAT,
    }
    assert re.fullmatch(r"[0-9a-f]+-[0-9a-f]+-1", answer["id"])
    assert list(svc.in_flight) == [answer["id"]]
    assert requests_stats(svc) == {"route": {"routed_by_router": 1}}


def test_route_ids_are_unique_and_the_second_decision_is_cached() -> None:
    svc = service()
    ids = [route(svc)["id"] for _ in range(5)]
    assert len(set(ids)) == 5
    assert [i.rsplit("-", 1)[1] for i in ids] == ["1", "2", "3", "4", "5"]
    assert requests_stats(svc) == {"route": {"routed_by_router": 1, "routed_from_cache": 4}}
    assert svc.snapshot()["cache"] == {"enabled": True, "hits": 4, "misses": 1, "size": 1}


def test_route_uses_the_message_headers() -> None:
    answer = route(service(), model="unknown-model", headers={"x-tenant": "premium"})
    assert answer["set"]["x-ai-eg-selected-route"] == PREMIUM_RULE
    assert answer["set"]["x-ai-eg-selected-backend"] == "premium-backend"
    assert answer["set"][MODEL] == "unknown-model"


def test_route_model_comes_from_the_body_not_the_model_header() -> None:
    answer = route(service(), model="llama-3", headers={MODEL: "gpt-4o-mini"})
    assert answer["set"][MODEL] == "llama-3"
    assert answer["set"]["x-ai-eg-selected-route"] == "llama"


def test_route_rule_without_backends_sets_no_backend_header() -> None:
    answer = route(service(), model="local-model")
    assert answer["set"] == {MODEL: "local-model", "x-ai-eg-selected-route": "local", "x-ai-eg-original-path": CHAT}


def test_route_keeps_the_original_path_with_its_query() -> None:
    svc = service()
    resp = handle(svc, post("/route", {**route_msg(), "path": "/v1/chat/completions?api-version=1"}))
    assert decode(resp)["set"]["x-ai-eg-original-path"] == "/v1/chat/completions?api-version=1"


def test_route_t_and_id_are_optional_and_json_bodies_are_strings() -> None:
    svc = service()
    answer = decode(handle(svc, post("/route", {"path": CHAT, "headers": {}, "body": b'{"model":"gpt-4o"}'})))
    assert answer["set"]["x-ai-eg-selected-route"] == "gpt"
    msg = {"path": CHAT, "headers": {}, "body": '{"model":"gpt-4o"}', "t": time.monotonic_ns(), "id": "envoy-id"}
    answer = orjson.loads(handle(svc, post("/route", msg, JSON)).body)
    assert answer["set"]["x-ai-eg-selected-route"] == "gpt"


def test_route_answers_its_own_unique_id() -> None:
    # The request's id (Envoy's x-request-id) is client-controlled and may repeat; the completion key must not.
    svc = service()
    first = route(svc, id="same-id")
    second = route(svc, id="same-id")
    assert first["id"] != second["id"] and first["id"] != "same-id"
    assert set(svc.in_flight) == {first["id"], second["id"]}


def test_route_json_mode_answers_json_and_lower_cases_header_names() -> None:
    svc = service()
    msg = {"path": CHAT, "headers": {"X-Tenant": "premium"}, "body": '{"model":"nothing"}'}
    resp = handle(svc, post("/route", msg, JSON))
    assert resp.status == 200
    assert resp.content_type == JSON
    answer = orjson.loads(resp.body)
    assert answer["set"]["x-ai-eg-selected-route"] == PREMIUM_RULE
    assert answer["id"] in svc.in_flight


def test_route_json_content_type_with_parameters() -> None:
    svc = service()
    body = orjson.dumps(route_msg(), default=_text)
    req = Request("POST", "/route", {"content-type": "application/json; charset=utf-8"}, body, True)
    resp = handle(svc, req)
    assert resp.content_type == JSON
    assert orjson.loads(resp.body)["set"]["x-ai-eg-selected-route"] == "gpt"


def test_route_without_content_type_is_msgpack() -> None:
    resp = handle(service(), Request("POST", "/route", {}, msgpack.packb(route_msg()), True))
    assert resp.content_type == MSGPACK
    assert msgpack.unpackb(resp.body)["set"]["x-ai-eg-selected-route"] == "gpt"


def test_route_records_its_duration(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    for _ in range(3):
        route(svc)
    assert "ipc_router.route.duration" not in sdk.points()  # buffered off the request path until flush()
    svc.flush()
    point = sdk.one(sdk.points(), "ipc_router.route.duration")
    assert point.count == 3
    assert 0 < point.sum < 0.5


# --- /route: immediate responses ----------------------------------------------------------------------------------


def test_no_match_responds_404_openai_error() -> None:
    svc = service()
    status, body = respond(route(svc, model="claude-3"))
    assert status == 404
    assert body == {
        "error": {
            "message": "no matching rule found for model 'claude-3'",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }
    assert svc.in_flight == {}
    assert requests_stats(svc) == {"route": {"no_match": 1}}


def test_no_match_in_json_mode() -> None:
    resp = handle(service(), post("/route", route_msg(model="claude-3"), JSON))
    assert resp.content_type == JSON
    answer = orjson.loads(resp.body)
    assert answer["respond"]["status"] == 404
    assert orjson.loads(answer["respond"]["body"])["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"model": "gpt-4o"', b"{'model': 'x'}", b'{"model": "\xff"}'],
    ids=["empty", "open-brace", "text", "truncated", "python-repr", "invalid-utf8"],
)
def test_malformed_request_body_json_responds_400_invalid_body(body: bytes | str) -> None:
    svc = service()
    msg = {"path": CHAT, "headers": {}, "body": body}
    status, err = respond(decode(handle(svc, post("/route", msg))))
    assert status == 400
    assert err["error"]["code"] == "invalid_body"
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith("request body is not valid JSON")
    assert requests_stats(svc) == {"route": {"invalid_body": 1}}


@pytest.mark.parametrize("body", [b"[]", b'"gpt-4o"', b"42", b"null", b"true"])
def test_non_object_request_body_responds_400_invalid_body(body: bytes) -> None:
    msg = {"path": CHAT, "headers": {}, "body": body}
    status, err = respond(decode(handle(service(), post("/route", msg))))
    assert status == 400
    assert err["error"] == {
        "message": "request body must be a JSON object",
        "type": "invalid_request_error",
        "code": "invalid_body",
    }


@pytest.mark.parametrize("body", [b"{}", b'{"model": null}', b'{"model": ""}', b'{"model": 4}', b'{"model": ["a"]}'])
def test_missing_model_responds_400_missing_model(body: bytes) -> None:
    svc = service()
    status, err = respond(decode(handle(svc, post("/route", {"path": CHAT, "headers": {}, "body": body}))))
    assert status == 400
    assert err["error"]["code"] == "missing_model"
    assert err["error"]["message"] == "request body has no 'model' string"
    assert requests_stats(svc) == {"route": {"missing_model": 1}}


# --- /route and /complete: bad messages ---------------------------------------------------------------------------

GOOD_ROUTE = route_msg()
GOOD_COMPLETE = {"id": "x", "status": 200}


@pytest.mark.parametrize(
    ("endpoint", "message", "names"),
    [
        ("/route", {k: v for k, v in GOOD_ROUTE.items() if k != "path"}, "missing required field `path`"),
        ("/route", {k: v for k, v in GOOD_ROUTE.items() if k != "headers"}, "missing required field `headers`"),
        ("/route", {k: v for k, v in GOOD_ROUTE.items() if k != "body"}, "missing required field `body`"),
        ("/route", {**GOOD_ROUTE, "path": None}, "Expected `str`, got `"),
        ("/route", {**GOOD_ROUTE, "path": 7}, "got `int` - at `$.path`"),
        ("/route", {**GOOD_ROUTE, "headers": ["a"]}, "got `array` - at `$.headers`"),
        ("/route", {**GOOD_ROUTE, "body": 1}, "got `int` - at `$.body`"),
        ("/route", {**GOOD_ROUTE, "body": {"model": "gpt-4o"}}, "got `object` - at `$.body`"),
        ("/route", {**GOOD_ROUTE, "t": "now"}, "got `str` - at `$.t`"),
        ("/route", {**GOOD_ROUTE, "t": True}, "got `bool` - at `$.t`"),
        ("/route", {**GOOD_ROUTE, "t": 1.5}, "got `float` - at `$.t`"),
        ("/route", {**GOOD_ROUTE, "id": 12}, "got `int` - at `$.id`"),
        ("/complete", {"status": 200}, "missing required field `id`"),
        ("/complete", {"id": "x"}, "missing required field `status`"),
        ("/complete", {"id": 1, "status": 200}, "got `int` - at `$.id`"),
        ("/complete", {"id": "x", "status": "200"}, "got `str` - at `$.status`"),
        ("/complete", {"id": "x", "status": False}, "got `bool` - at `$.status`"),
        ("/complete", {**GOOD_COMPLETE, "t_first": "1"}, "got `str` - at `$.t_first`"),
        ("/complete", {**GOOD_COMPLETE, "t_end": 1.0}, "got `float` - at `$.t_end`"),
        ("/complete", {**GOOD_COMPLETE, "stream": 1}, "got `int` - at `$.stream`"),
        ("/complete", {**GOOD_COMPLETE, "body": 5}, "got `int` - at `$.body`"),
        ("/complete", {**GOOD_COMPLETE, "truncated": "yes"}, "got `str` - at `$.truncated`"),
    ],
)
@pytest.mark.parametrize("fmt", [MSGPACK, JSON])
def test_missing_or_mistyped_field_is_400_naming_it(
    endpoint: str, message: dict[str, Any], names: str, fmt: str
) -> None:
    svc = service()
    resp = handle(svc, post(endpoint, message, fmt))
    assert resp.status == 400
    assert resp.content_type == fmt
    error = decode(resp)["error"]
    assert error.startswith("bad message: ") and names in error, error
    assert requests_stats(svc) == {endpoint[1:]: {"bad_request": 1}}
    assert svc.in_flight == {}


def test_msgpack_body_must_be_bin() -> None:
    svc = service()
    msg = {"path": CHAT, "headers": {}, "body": '{"model":"gpt-4o"}'}
    resp = handle(svc, post("/route", msg))
    assert resp.status == 400
    assert "Expected `bytes`, got `str` - at `$.body`" in decode(resp)["error"]


def test_mistyped_header_value_is_400_naming_headers() -> None:
    svc = service()
    resp = handle(svc, post("/route", route_msg(headers={"x-tenant": ["premium"]})))  # type: ignore[dict-item]
    assert resp.status == 400
    assert "headers" in decode(resp)["error"]
    assert svc.stats.plugin_errors == {}


@pytest.mark.parametrize("endpoint", ["/route", "/complete"])
@pytest.mark.parametrize("raw", [b"\xc1", b"\x82\xa1a", b"", b"trailing"])
def test_bad_msgpack_is_400(endpoint: str, raw: bytes) -> None:
    if raw == b"trailing":  # a whole, valid message followed by garbage
        raw = msgpack.packb(GOOD_ROUTE if endpoint == "/route" else GOOD_COMPLETE, use_bin_type=True) + b"\xc1"
    svc = service()
    resp = handle(svc, post(endpoint, None, MSGPACK, raw=raw))
    assert resp.status == 400
    assert resp.content_type == MSGPACK
    assert decode(resp)["error"].startswith("body is not valid msgpack")


@pytest.mark.parametrize("endpoint", ["/route", "/complete"])
def test_bad_json_message_is_400_in_json(endpoint: str) -> None:
    resp = handle(service(), post(endpoint, None, JSON, raw=b"{nope"))
    assert resp.status == 400
    assert resp.content_type == JSON
    assert orjson.loads(resp.body)["error"].startswith("body is not valid JSON")


@pytest.mark.parametrize(
    ("message", "kind"), [([1, 2], "list"), ("text", "str"), (7, "int"), (None, "NoneType"), (b"x", "bytes")]
)
def test_message_that_is_not_a_map_is_400(message: Any, kind: str) -> None:
    resp = handle(service(), post("/route", message))
    assert resp.status == 400
    assert decode(resp)["error"].startswith("bad message: Expected `object`, got `")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/cbor"])
@pytest.mark.parametrize("endpoint", ["/route", "/complete"])
def test_unsupported_content_type_is_415(endpoint: str, content_type: str) -> None:
    svc = service()
    resp = handle(svc, Request("POST", endpoint, {"content-type": content_type}, b"{}", True))
    assert resp.status == 415
    assert resp.content_type == MSGPACK
    assert decode(resp) == {
        "error": f"unsupported content-type {content_type!r}; use application/msgpack or application/json"
    }


# --- unknown paths, methods, /healthz, /stats, /v1/models ---------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, JSON])
def test_unknown_path_is_404(content_type: str | None) -> None:
    svc = service()
    resp = handle(svc, get("/nope", content_type))
    assert resp.status == 404
    assert resp.content_type == (content_type or MSGPACK)
    assert decode(resp) == {"error": "unknown path '/nope'"}
    resp = handle(svc, post("/v1/chat/completions", {}))
    assert resp.status == 404
    assert requests_stats(svc) == {"unknown": {"bad_request": 2}}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
@pytest.mark.parametrize("path", ["/route", "/complete"])
def test_wrong_method_is_405(method: str, path: str) -> None:
    svc = service()
    resp = handle(svc, Request(method, path, {"content-type": JSON}, b"", True))
    assert resp.status == 405
    assert resp.content_type == JSON
    assert orjson.loads(resp.body) == {"error": "use POST"}
    assert requests_stats(svc) == {path[1:]: {"bad_request": 1}}


def test_healthz() -> None:
    svc = service(generation=7)
    resp = handle(svc, get("/healthz"))
    assert (resp.status, resp.content_type) == (200, JSON)
    assert resp.body == b'{"status":"ok","generation":7}'
    svc.routing = Routing(CONFIG, generation=8)
    assert orjson.loads(handle(svc, get("/healthz")).body) == {"status": "ok", "generation": 8}


def test_models_list_format() -> None:
    before = int(time.time())
    resp = handle(service(), get("/v1/models"))
    after = int(time.time())
    assert (resp.status, resp.content_type) == (200, JSON)
    body = orjson.loads(resp.body)
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    data = body["data"]
    # Exact matches on the model header only, each model once, in rule order; regex and other headers are not models.
    assert [d["id"] for d in data] == ["gpt-4o-mini", "gpt-4o", "local-model"]
    for d in data:
        assert set(d) == {"id", "object", "created", "owned_by"}
        assert d["object"] == "model"
        assert isinstance(d["created"], int)
    assert data[0]["created"] == 1721260800  # modelsCreatedAt 2024-07-18T00:00:00Z
    assert data[1]["created"] == 1721260800
    assert data[0]["owned_by"] == data[1]["owned_by"] == "openai"
    assert data[2]["owned_by"] == "me"
    assert before <= data[2]["created"] <= after  # no modelsCreatedAt: now


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        ("2025-05-21T10:00:00Z", 1747821600),
        ("2025-05-21T12:00:00+02:00", 1747821600),
        ("2025-05-21T10:00:00.500000+00:00", 1747821600),
    ],
)
def test_models_created_from_models_created_at(created_at: str, expected: int) -> None:
    config = config_from_dict(
        {"rules": [{"name": "r", "headers": [{"name": MODEL, "value": "m"}], "modelsCreatedAt": created_at}]}
    )
    data = orjson.loads(handle(service(config), get("/v1/models")).body)["data"]
    assert data == [{"id": "m", "object": "model", "created": expected, "owned_by": "Envoy AI Gateway"}]


def test_models_created_at_from_an_unquoted_yaml_timestamp() -> None:
    from ipc_router.filterapi import parse_config

    config = parse_config(
        "rules:\n- name: r\n  headers: [{name: x-ai-eg-model, value: m}]\n  modelsCreatedAt: 2025-05-21T10:00:00Z\n"
    )
    assert orjson.loads(handle(service(config), get("/v1/models")).body)["data"][0]["created"] == 1747821600


def test_models_follow_the_model_header_key_of_the_config() -> None:
    config = config_from_dict(
        {
            "modelNameHeaderKey": "x-model",
            "rules": [
                {"name": "a", "headers": [{"name": "x-model", "value": "m1"}]},
                {"name": "b", "headers": [{"name": MODEL, "value": "not-a-model-here"}]},
            ],
        }
    )
    data = orjson.loads(handle(service(config), get("/v1/models")).body)["data"]
    assert [d["id"] for d in data] == ["m1"]


def test_models_empty_config() -> None:
    body = handle(service(Config()), get("/v1/models")).body
    assert orjson.loads(body) == {"object": "list", "data": []}


def models_config(i: int) -> Routing:
    rule = {"name": f"r{i}", "headers": [{"name": MODEL, "value": f"model-{i}"}]}
    return Routing(config_from_dict({"rules": [rule]}), generation=i)


def test_models_follow_a_new_routing() -> None:
    svc = Service(models_config(0))
    assert orjson.loads(handle(svc, get("/v1/models")).body)["data"][0]["id"] == "model-0"
    svc.routing = models_config(1)
    assert orjson.loads(handle(svc, get("/v1/models")).body)["data"][0]["id"] == "model-1"


def test_models_never_stale_after_two_reloads() -> None:
    generation = 0
    svc = Service(models_config(generation))
    for _ in range(50):
        ids = [d["id"] for d in orjson.loads(handle(svc, get("/v1/models")).body)["data"]]
        assert ids == [f"model-{generation}"]
        for _ in range(2):  # two reloads, no /v1/models in between
            generation += 1
            svc.routing = models_config(generation)


def test_stats_shape() -> None:
    svc = service(router=tenant_router, generation=3)
    key = route(svc)["id"]
    route(svc)
    route(svc, model="nothing")
    complete(svc, key)
    complete(svc, "unknown")
    handle(svc, get("/healthz"))
    handle(svc, get("/nope"))
    resp = handle(svc, get("/stats"))
    assert (resp.status, resp.content_type) == (200, JSON)
    stats = orjson.loads(resp.body)
    assert stats == {
        "requests": {
            "complete": {"ok": 1, "unknown_id": 1},
            "healthz": {"ok": 1},
            "route": {"no_match": 1, "routed_by_router": 1, "routed_from_cache": 1},
            "unknown": {"bad_request": 1},
            "stats": {"ok": 1},
        },
        "cache": {"enabled": True, "hits": 1, "misses": 2, "size": 1},
        "config": {"generation": 3, "rules": 5, "custom_router": True},
        "plugins": {"router": "plugins_for_tests:TenantRouter", "metrics": "default"},
        "reloads": {},
        "plugin_errors": {},
        "in_flight": 1,
        "expired": 0,
        "evicted": 0,
        "unknown_completions": 1,
        "usage_missing": 1,  # the 200 completion had no body, so no usage
        "records": {},
        "fallbacks": {},
        "fast_path": None,
        "limits": {},
        "refused_peers": 0,
        "budgets": {},
    }
    # the no-match decision is not cached: a router exception is not a rule name
    assert svc.snapshot()["cache"]["size"] == 1


def test_stats_for_a_router_without_a_cache() -> None:
    svc = service(router=boom_router)
    route(svc)
    stats = svc.snapshot()
    assert stats["cache"] == {"enabled": False, "hits": 0, "misses": 0, "size": 0}
    assert stats["config"]["custom_router"] is True
    assert service().snapshot()["config"]["custom_router"] is False


def test_stats_name_the_plugins() -> None:
    assert service().snapshot()["plugins"] == {"router": "default", "metrics": "default"}
    svc = service(router=tenant_router, metrics_factory=raising_metrics_factory)
    assert svc.snapshot()["plugins"] == {
        "router": "plugins_for_tests:TenantRouter",
        "metrics": "plugins_for_tests:raising_metrics_factory",
    }


# --- custom routers -----------------------------------------------------------------------------------------------


def test_tenant_router_and_its_cache() -> None:
    svc = service(router=tenant_router)
    router = svc.routing.router
    assert route(svc, model="x", headers={"x-tenant": "premium"})["set"]["x-ai-eg-selected-route"] == PREMIUM_RULE
    assert route(svc, model="x", headers={"x-tenant": "premium"})["set"]["x-ai-eg-selected-route"] == PREMIUM_RULE
    assert route(svc, headers={"x-tenant": "basic"})["set"]["x-ai-eg-selected-route"] == "gpt"
    assert router.calls == 2  # type: ignore[attr-defined]


def test_router_raising_responds_500_router_error_and_is_counted() -> None:
    svc = service(router=boom_router)
    status, err = respond(route(svc, headers={"x-boom": "kaput"}))
    assert status == 500
    assert err["error"] == {
        "message": "router failed: RuntimeError: boom: kaput",
        "type": "server_error",
        "code": "router_error",
    }
    assert svc.stats.plugin_errors == {"router": 1}
    assert requests_stats(svc) == {"route": {"router_error": 1}}
    assert svc.in_flight == {}
    # and the next request is fine
    assert route(svc)["set"]["x-ai-eg-selected-route"] == "gpt"


def test_router_returning_an_unknown_rule_responds_500() -> None:
    svc = service(router=unknown_rule_router)
    status, err = respond(route(svc))
    assert status == 500
    assert err["error"]["code"] == "router_error"
    assert "'no-such-rule'" in err["error"]["message"]
    assert "UnknownRuleError" in err["error"]["message"]
    assert svc.stats.plugin_errors == {"router": 1}


def test_async_router_returns_an_awaitable_answer() -> None:
    svc = service(router=sleepy_router)
    result = svc.handle(post("/route", route_msg(headers={"x-sleep-ms": "10"})))
    assert not isinstance(result, Response)
    assert inspect.isawaitable(result)
    resp = asyncio.run(_await(result))
    answer = decode(resp)
    assert answer["set"]["x-ai-eg-selected-route"] == "gpt"
    assert answer["id"] in svc.in_flight
    assert requests_stats(svc) == {"route": {"routed_by_router": 1}}


async def _await(a: Awaitable[Response]) -> Response:
    return await a


def test_async_router_bad_requests_stay_synchronous() -> None:
    svc = service(router=sleepy_router)
    assert isinstance(svc.handle(post("/route", {"path": CHAT})), Response)
    assert isinstance(svc.handle(post("/route", route_msg(model=None))), Response)


def test_async_router_no_match_raising_and_unknown_rule() -> None:
    svc = service(router=sleepy_router)
    status, err = respond(route(svc, model="nothing"))
    assert (status, err["error"]["code"]) == (404, "model_not_found")
    status, err = respond(route(svc, headers={"x-boom": "late"}))
    assert (status, err["error"]["code"]) == (500, "router_error")
    assert "async boom: late" in err["error"]["message"]
    status, err = respond(route(service(router=async_unknown_rule_router)))
    assert (status, err["error"]["code"]) == (500, "router_error")
    assert svc.stats.plugin_errors == {"router": 1}


def test_async_router_timeout_responds_504() -> None:
    svc = service(router=sleepy_router, router_timeout=0.05)
    started = time.monotonic()
    status, err = respond(route(svc, headers={"x-sleep-ms": "2000"}))
    assert time.monotonic() - started < 1.0
    assert status == 504
    assert err["error"] == {
        "message": "router took longer than 0.05s",
        "type": "server_error",
        "code": "router_timeout",
    }
    assert svc.stats.plugin_errors == {"router_timeout": 1}
    assert requests_stats(svc) == {"route": {"router_timeout": 1}}
    assert svc.in_flight == {}
    # within the timeout it routes
    assert route(svc, headers={"x-sleep-ms": "1"})["set"]["x-ai-eg-selected-route"] == "gpt"


def test_async_router_timeout_in_json_mode() -> None:
    svc = service(router=sleepy_router, router_timeout=0.02)
    resp = handle(svc, post("/route", route_msg(headers={"x-sleep-ms": "500"}), JSON))
    assert resp.content_type == JSON
    assert orjson.loads(resp.body)["respond"]["status"] == 504


# --- /complete and the GenAI metrics ------------------------------------------------------------------------------

T0 = 1_000_000_000  # ns on the monotonic clock, as the filter sends them
USAGE = b'{"id":"c1","usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
SSE = (
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":11,"total_tokens":16}}\n\n'
    b"data: [DONE]\n\n"
)


def base_attrs(model: str = "gpt-4o-mini", provider: str = "openai") -> dict[str, str]:
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model}


def test_complete_known_id_records_metrics(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    key = route(svc, t=T0)["id"]
    resp = complete(svc, key, run_after=False, t_end=T0 + 2_000_000_000, body=USAGE)
    assert resp.after is not None
    assert key not in svc.in_flight
    assert "gen_ai.server.request.duration" not in sdk.points()  # recorded only after the answer is written
    resp.after()
    points = sdk.points()
    duration = sdk.one(points, "gen_ai.server.request.duration")
    assert dict(duration.attributes) == base_attrs()
    assert duration.count == 1
    assert duration.sum == pytest.approx(2.0)
    assert sdk.one(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"}).sum == 9
    output = sdk.one(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "output"})
    assert output.sum == 3
    assert dict(output.attributes) == {**base_attrs(), "gen_ai.token.type": "output"}
    assert "gen_ai.server.time_to_first_token" not in points
    assert requests_stats(svc)["complete"] == {"ok": 1}
    assert svc.stats.usage_missing == 0


def test_complete_streaming_records_ttft_and_tpot(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    key = route(svc, model="gpt-4o", t=T0)["id"]
    complete(svc, key, stream=True, truncated=True, t_first=T0 + 500_000_000, t_end=T0 + 2_000_000_000, body=SSE)
    points = sdk.points()
    attrs = base_attrs(model="gpt-4o")
    assert sdk.one(points, "gen_ai.server.time_to_first_token").sum == pytest.approx(0.5)
    assert dict(sdk.one(points, "gen_ai.server.time_to_first_token").attributes) == attrs
    assert sdk.one(points, "gen_ai.server.request.duration").sum == pytest.approx(2.0)
    assert sdk.one(points, "gen_ai.server.time_per_output_token").sum == pytest.approx((2.0 - 0.5) / 10)
    assert sdk.one(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "output"}).sum == 11
    assert sdk.one(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"}).sum == 5


def test_complete_json_mode_with_text_body(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    key = route(svc, fmt=JSON, t=T0)["id"]
    complete(svc, key, fmt=JSON, t_end=T0 + 1_000_000_000, body=USAGE.decode())
    points = sdk.points()
    assert sdk.one(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"}).sum == 9
    assert sdk.one(points, "gen_ai.server.request.duration").sum == pytest.approx(1.0)


@pytest.mark.parametrize(("status", "error_type"), [(503, "503"), (429, "429"), (0, "incomplete")])
def test_complete_failure_records_error_type(sdk: SDK, status: int, error_type: str) -> None:
    svc = service(meter=sdk.meter)
    key = route(svc, t=T0)["id"]
    complete(svc, key, status=status, t_end=T0 + 100_000_000, body=b'{"error":{"message":"x"}}')
    duration = sdk.one(sdk.points(), "gen_ai.server.request.duration")
    assert dict(duration.attributes) == {**base_attrs(), "error.type": error_type}
    assert duration.sum == pytest.approx(0.1)
    assert svc.stats.usage_missing == 0  # only successes count as missing usage


def test_complete_success_without_usage_is_counted(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    for body in (b"", b"not json", b'{"choices":[]}'):
        complete(svc, route(svc)["id"], body=body)
    assert svc.stats.usage_missing == 3
    assert "gen_ai.client.token.usage" not in sdk.points()
    assert sdk.one(sdk.points(), "gen_ai.server.request.duration").count == 3


def test_complete_truncated_non_streaming_body_is_not_parsed(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    complete(svc, route(svc)["id"], body=USAGE, truncated=True)
    assert "gen_ai.client.token.usage" not in sdk.points()
    assert svc.stats.usage_missing == 1


def test_complete_without_t_end_uses_the_service_clock(sdk: SDK) -> None:
    clock = Clock(50.0)
    svc = service(meter=sdk.meter, clock=clock)
    key = route(svc)["id"]  # no t: the request started at clock() = 50
    clock.t = 53.25
    complete(svc, key)
    assert sdk.one(sdk.points(), "gen_ai.server.request.duration").sum == pytest.approx(3.25)


def test_complete_unknown_id_is_204_and_counted() -> None:
    svc = service()
    resp = complete(svc, "never-routed")
    assert resp.after is None
    assert svc.stats.unknown_completions == 1
    assert requests_stats(svc) == {"complete": {"unknown_id": 1}}


def test_complete_twice_second_is_unknown(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    key = route(svc)["id"]
    assert complete(svc, key, body=USAGE).after is not None
    assert complete(svc, key, body=USAGE).after is None
    assert svc.stats.unknown_completions == 1
    assert sdk.one(sdk.points(), "gen_ai.server.request.duration").count == 1


def test_sidecar_counters_are_exported_as_observables(sdk: SDK) -> None:
    svc = service(meter=sdk.meter, router=tenant_router, generation=4)
    route(svc)
    route(svc)
    complete(svc, "nope")
    points = sdk.points()
    assert sdk.one(points, "ipc_router.requests", endpoint="route", outcome="routed_by_router").value == 1
    assert sdk.one(points, "ipc_router.requests", endpoint="route", outcome="routed_from_cache").value == 1
    assert sdk.one(points, "ipc_router.requests", endpoint="complete", outcome="unknown_id").value == 1
    assert sdk.one(points, "ipc_router.route_cache", result="hit").value == 1
    assert sdk.one(points, "ipc_router.route_cache", result="miss").value == 1
    assert sdk.one(points, "ipc_router.requests_in_flight").value == 2
    assert sdk.one(points, "ipc_router.config_generation").value == 4


# --- the in-flight table --------------------------------------------------------------------------------------------


def test_in_flight_requests_expire_after_request_ttl() -> None:
    clock = Clock(100.0)
    svc = service(clock=clock, request_ttl=10.0)
    a, b = route(svc)["id"], route(svc)["id"]
    clock.t = 105.0
    c = route(svc)["id"]
    clock.t = 109.999
    assert svc.expire() == 0
    clock.t = 110.0
    assert svc.expire() == 2
    assert list(svc.in_flight) == [c]
    assert svc.stats.expired == 2
    assert svc.snapshot()["expired"] == 2
    complete(svc, a)
    assert svc.stats.unknown_completions == 1
    clock.t = 200.0
    d = route(svc)["id"]  # routing a new request expires the old ones too
    assert list(svc.in_flight) == [d]
    assert svc.stats.expired == 3
    assert b not in svc.in_flight


def test_in_flight_table_is_bounded() -> None:
    svc = service(max_in_flight=3)
    ids = [route(svc)["id"] for _ in range(5)]
    assert list(svc.in_flight) == ids[2:]
    assert svc.stats.evicted == 2
    assert svc.snapshot()["evicted"] == 2
    complete(svc, ids[0])
    assert svc.stats.unknown_completions == 1


def test_expired_and_evicted_are_exported(sdk: SDK) -> None:
    clock = Clock(0.0)
    svc = service(meter=sdk.meter, clock=clock, request_ttl=1.0, max_in_flight=1)
    route(svc)
    route(svc)  # evicts the first
    clock.t = 5.0
    svc.expire()  # expires the second
    assert sdk.one(sdk.points(), "ipc_router.requests_expired").value == 2


# --- header attributes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ()),
        ("", ()),
        ("x-team-id:team_id", (("x-team-id", "team_id"),)),
        ("x-team-id:team_id,x-user-tier:tier", (("x-team-id", "team_id"), ("x-user-tier", "tier"))),
        (" X-Team-ID : team_id , ,x-b:b, ", (("x-team-id", "team_id"), ("x-b", "b"))),
        ("x-a:attr:with:colons", (("x-a", "attr:with:colons"),)),
    ],
)
def test_parse_header_attributes(spec: str | None, expected: tuple[tuple[str, str], ...]) -> None:
    assert parse_header_attributes(spec) == expected


@pytest.mark.parametrize("spec", ["x-team-id", "x-team-id:", ":team_id", " : ", "a:b,broken"])
def test_parse_header_attributes_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"bad header attribute mapping .*expected 'header-name:attribute_name'"):
        parse_header_attributes(spec)


def test_header_attributes_appear_on_metrics(sdk: SDK) -> None:
    attrs = parse_header_attributes("x-team-id:team_id,x-user-tier:tier")
    svc = service(meter=sdk.meter, header_attributes=attrs)
    key = route(svc, headers={"x-team-id": "blue", "x-other": "o"}, t=T0)["id"]
    complete(svc, key, stream=True, t_first=T0 + 1, t_end=T0 + 2, body=SSE)
    key = route(svc, headers={"x-team-id": "red", "x-user-tier": "gold"})["id"]
    complete(svc, key, status=500)
    points = sdk.points()
    blue = {**base_attrs(), "team_id": "blue"}
    assert dict(sdk.one(points, "gen_ai.server.request.duration", team_id="blue").attributes) == blue
    assert dict(sdk.one(points, "gen_ai.server.time_to_first_token", team_id="blue").attributes) == blue
    usage = sdk.one(points, "gen_ai.client.token.usage", team_id="blue", **{"gen_ai.token.type": "input"})
    assert dict(usage.attributes) == {**blue, "gen_ai.token.type": "input"}
    red = sdk.one(points, "gen_ai.server.request.duration", team_id="red")
    assert dict(red.attributes) == {**base_attrs(), "team_id": "red", "tier": "gold", "error.type": "500"}


# --- custom metrics that fail ---------------------------------------------------------------------------------------


def test_metrics_factory_that_raises_never_fails_the_request() -> None:
    svc = service(metrics_factory=raising_metrics_factory)
    answer = route(svc)
    assert answer["set"]["x-ai-eg-selected-route"] == "gpt"
    assert svc.stats.plugin_errors == {"metrics": 1}
    complete(svc, answer["id"], body=USAGE)  # the request was not tracked: 204 all the same
    assert requests_stats(svc)["route"] == {"routed_by_router": 1}


@pytest.mark.parametrize("method", ["start_request", "set_model", "set_backend"])
def test_metrics_failing_at_route_time_never_fails_the_request(method: str) -> None:
    made: list[RaisingMetrics] = []

    def factory(meter: Meter) -> x.ChatCompletionMetrics:
        made.append(RaisingMetrics(frozenset({method})))
        return made[-1]

    svc = service(metrics_factory=factory)
    answer = route(svc)
    assert set(answer) == {"set", "id"}
    assert svc.stats.plugin_errors == {"metrics": 1}
    assert made[0].calls[-1] == method
    assert answer["id"] not in svc.in_flight


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("record_request_completion", {}),
        ("record_token_usage", {"body": USAGE}),
        ("record_token_latency", {"stream": True, "t_first": T0, "body": SSE}),
    ],
)
def test_metrics_failing_at_completion_never_fails_the_request(method: str, fields: dict[str, Any]) -> None:
    made: list[RaisingMetrics] = []

    def factory(meter: Meter) -> x.ChatCompletionMetrics:
        made.append(RaisingMetrics(frozenset({method})))
        return made[-1]

    svc = service(metrics_factory=factory)
    key = route(svc, t=T0)["id"]
    resp = complete(svc, key, run_after=False, **fields)
    assert resp.after is not None
    resp.after()  # does not raise
    assert svc.stats.plugin_errors == {"metrics": 1}
    assert made[0].calls[:3] == ["start_request", "set_model", "set_backend"]
    assert made[0].calls[-1] == method
    assert x.request_time() == pytest.approx(time.monotonic(), abs=1.0)  # the event time was reset


def test_metrics_calls_in_order_with_event_times() -> None:
    seen: list[tuple[str, float]] = []

    class Recording:
        def start_request(self, headers: Mapping[str, str]) -> None:
            assert headers[MODEL] == "gpt-4o-mini"
            seen.append(("start_request", x.request_time()))

        def set_model(self, model: str) -> None:
            seen.append(("set_model:" + model, x.request_time()))

        def set_backend(self, backend: Any) -> None:
            seen.append(("set_backend:" + backend.name, x.request_time()))

        def record_token_latency(self, tokens: int, extra_attrs: Any = None) -> None:
            seen.append((f"record_token_latency:{tokens}", x.request_time()))

        def record_token_usage(self, i: int, o: int, t: int, extra_attrs: Any = None) -> None:
            seen.append((f"record_token_usage:{i},{o},{t}", x.request_time()))

        def record_request_completion(self, success: bool, extra_attrs: Any = None) -> None:
            seen.append((f"record_request_completion:{success}", x.request_time()))

    factory: Callable[[Meter], x.ChatCompletionMetrics] = lambda meter: Recording()  # noqa: E731
    svc = service(metrics_factory=factory)
    key = route(svc, t=T0)["id"]
    complete(svc, key, stream=True, t_first=T0 + 250_000_000, t_end=T0 + 750_000_000, body=SSE)
    assert [name for name, _ in seen] == [
        "start_request",
        "set_model:gpt-4o-mini",
        "set_backend:openai",
        "record_token_latency:11",
        "record_token_usage:5,11,16",
        "record_request_completion:True",
    ]
    times = [t for _, t in seen]
    assert times[:3] == [pytest.approx(1.0)] * 3
    assert times[3] == pytest.approx(1.25)
    assert times[4:] == [pytest.approx(1.75)] * 2


def test_default_metrics_factory_is_used_without_one(sdk: SDK) -> None:
    svc = service(meter=sdk.meter)
    assert svc.ledger.metrics_factory is new_default_chat_completion_metrics


def test_a_deeply_nested_body_is_a_400_not_a_crash() -> None:
    svc = service()
    deep = b'{"model": "gpt-4o-mini", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    resp = handle(svc, post("/route", {"path": CHAT, "headers": {}, "body": deep}))
    answer = decode(resp)
    assert answer["respond"]["status"] == 400
    assert svc.stats.requests["route", "invalid_body"] == 1
