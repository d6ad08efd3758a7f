"""The filter's fast path at unit level: the real Lua filter with the real ``ipc_router_shm`` and
``ipc_router_json`` modules (LuaJIT through lupa, JIT on), a real segment file written by the real sidecar code
(:class:`ipc_router.fastpath.FastPath` over :class:`ipc_router.shm.Segment`), and the fake Envoy handle of
tests/support/lua_harness.py. End to end through a real Envoy: tests/test_e2e_shm.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ipc_router import shm
from ipc_router.fastpath import DrainPace, FastPath
from ipc_router.filterapi import config_from_dict
from ipc_router.metrics import METER_NAME
from ipc_router.protocol import MSGPACK, Request, RouteMessage, decode_message
from ipc_router.router import Routing
from ipc_router.service import Response, Service
from tests.support.lua_harness import LUPA, Lua, py

pytestmark = pytest.mark.skipif(
    not LUPA.__name__.startswith("lupa.luajit") or not shm.supported(), reason="needs LuaJIT on x86-64 Linux"
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
HEADERS = {":path": CHAT, ":method": "POST", ":authority": "gw", "content-type": "application/json"}

CONFIG = config_from_dict(
    {
        "rules": [
            {"name": "free", "headers": [{"name": "x-user-tier", "value": "free"}], "backends": [{"name": "c"}]},
            {
                "name": "llama",
                "headers": [{"name": "x-ai-eg-model", "value": "llama3.3"}],
                "backends": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}],
            },
            {
                "name": "gpt",
                "headers": [{"name": "x-ai-eg-model", "value": "gpt-4o-mini"}],
                "backends": [{"name": "b"}],
            },
        ]
    }
)


def preload(name: str) -> bytes:
    text = (ROOT / "ipc_router" / "lua" / f"{name}.lua").read_text()
    return f'package.preload["{name}"] = function(...)\n{text}\nend\n'.encode()


class Rig:
    """The sidecar's service and fast path over a real segment, and a Lua state running the filter on it."""

    def __init__(self, tmp: Path) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.service = Service(Routing(CONFIG, generation=1), meter=self.provider.get_meter(METER_NAME))
        self.path = str(tmp / "seg.shm")
        seg, _ = shm.Segment.open(self.path, slots=64, rings=4, ring_bytes=1 << 16)
        self.fast = FastPath(seg, self.service.ledger)
        self.fast.publish(self.service.routing)
        self.service.fast_path = self.fast
        self.lua = Lua(setup=preload("ipc_router_shm") + preload("ipc_router_json"))
        self.filter = self.lua.filter(shm_path=self.path)

    def sidecar_answer(self, call: dict[bytes, Any], learn: bool) -> dict[str, Any]:
        """What the real service answers to the filter's /route call (``learn``: and fills the shared cache)."""
        req = Request("POST", "/route", {"content-type": MSGPACK}, call[b"body"], True)
        self.service.fast_path = self.fast if learn else None
        try:
            resp = self.service.handle(req)
        finally:
            self.service.fast_path = self.fast
        if not learn:
            self.service.ledger.in_flight.clear()  # that pass ran as a sidecar without a fast path would
        assert isinstance(resp, Response)
        return {"status": resp.status, "body": resp.body, "headers": {"content-type": resp.content_type}}

    def request(self, body: bytes, headers: dict[str, str] | None = None) -> Any:
        """One request phase. A miss is answered by the real service: the fake handle takes its answer up front,
        so a probe run finds out what the filter sends, the real run gets the service's answer, and the service
        then handles the same call once more to fill the cache, as it does while answering."""
        spec: dict[str, Any] = {"headers": {**HEADERS, **(headers or {})}, "body": body}
        probe = self.lua.run(self.filter, "on_request", **spec, answer_error="no answer in the probe")
        if probe.n_http == 0:
            return probe  # a hit
        call = py(probe.http_calls[1])
        rec = self.lua.run(self.filter, "on_request", **spec, answer=self.sidecar_answer(call, learn=False))
        self.sidecar_answer(call, learn=True)
        return rec

    def response(self, rec: Any, chunks: list[str], headers: dict[str, str] | None = None) -> Any:
        token = py(rec.store)[b"x-ipc-router-rec"]  # the request's token header, read back in the response
        return self.lua.run(
            self.filter, "on_response", headers={":status": "200", **(headers or {})}, chunks=chunks,
            request_headers={"x-ipc-router-rec": token.decode()},
        )  # fmt: skip

    def close(self) -> None:
        self.fast.stop()
        self.provider.shutdown()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def body(model: str) -> bytes:
    return b'{"messages":[{"role":"user","content":"{\\"model\\": \\"x\\"}"}],"model":"' + model.encode() + b'"}'


def sent_route(rec: Any) -> RouteMessage:
    return decode_message(py(rec.http_calls[1])[b"body"], MSGPACK, RouteMessage)


def test_a_miss_asks_the_sidecar_flagged_ring_and_the_next_request_is_a_hit(rig: Rig) -> None:
    first = rig.request(body("gpt-4o-mini"))
    assert first.ok, first.err
    assert first.n_http == 1 and sent_route(first).ring is True
    assert py(first.store)[b"x-ai-eg-selected-route"] == b"gpt"
    assert rig.service.ledger.in_flight == {}  # the sidecar keeps nothing for a ring-reported request
    second = rig.request(body("gpt-4o-mini"))
    assert second.ok, second.err
    assert second.n_http == 0 and second.cleared == 1
    store = py(second.store)
    assert store[b"x-ai-eg-selected-route"] == b"gpt"
    assert store[b"x-ai-eg-selected-backend"] == b"b"
    assert store[b"x-ai-eg-model"] == b"gpt-4o-mini"
    assert store[b"x-ai-eg-original-path"] == CHAT.encode()


def test_another_header_value_is_another_key(rig: Rig) -> None:
    assert rig.request(body("gpt-4o-mini")).n_http == 1
    assert rig.request(body("gpt-4o-mini")).n_http == 0
    free = rig.request(body("gpt-4o-mini"), {"x-user-tier": "free"})
    assert free.n_http == 1 and py(free.store)[b"x-ai-eg-selected-route"] == b"free"
    again = rig.request(body("gpt-4o-mini"), {"x-user-tier": "free"})
    assert again.n_http == 0 and py(again.store)[b"x-ai-eg-selected-backend"] == b"c"


def test_the_lua_pick_keeps_the_weights(rig: Rig) -> None:
    rig.request(body("llama3.3"))  # the miss
    picks = Counter(py(rig.request(body("llama3.3")).store)[b"x-ai-eg-selected-backend"] for _ in range(400))
    assert picks == {b"a": 300, b"b": 100}


def test_a_reload_makes_old_entries_misses(rig: Rig) -> None:
    rig.request(body("gpt-4o-mini"))
    assert rig.request(body("gpt-4o-mini")).n_http == 0
    rig.service.routing = Routing(CONFIG, generation=2)
    rig.fast.publish(rig.service.routing)
    assert rig.request(body("gpt-4o-mini")).n_http == 1


def test_a_reload_seen_by_another_request_while_body_yields_never_mixes_generations(rig: Rig) -> None:
    """Found by the reload stress test (tests/test_e2e_shm_stress.py): the filter took the config before body()
    yields, and a request of the same worker that refreshed to a new generation meanwhile made lookup() find a
    rule index of that generation, which was then read with the old rules (here: "llama" instead of "gpt")."""
    rig.request(body("gpt-4o-mini"))  # gpt learnt in generation 1 (rule index 2; 1 is llama)
    reordered = config_from_dict(
        {
            "rules": [
                {"name": "free", "headers": [{"name": "x-user-tier", "value": "free"}], "backends": [{"name": "c"}]},
                {"name": "gpt", "headers": [{"name": "x-ai-eg-model", "value": "gpt-4o-mini"}],
                 "backends": [{"name": "a"}]},
            ]
        }
    )  # fmt: skip

    def publish_and_learn() -> None:
        routing = Routing(reordered, generation=2)
        rig.service.routing = routing
        rig.fast.publish(routing)
        assert routing.cache is not None
        key = shm.route_key(routing.cache.key_headers, {"x-ai-eg-model": "gpt-4o-mini"})
        assert key is not None and rig.fast.segment.put_route(key, 1)  # gpt is rule 1 in generation 2

    # Meanwhile another request of this Lua state (a hit in generation 2) refreshes it to generation 2.
    other = rig.lua.table({"headers": HEADERS, "body": body("gpt-4o-mini"), "answer_error": "a hit was expected"})
    meanwhile = rig.lua.rt.eval(
        "function(H, f, pub, spec) return function() pub(); assert(H.run(f, 'on_request', spec).n_http == 0) end end"
    )(rig.lua.H, rig.filter, publish_and_learn, other)
    rec = rig.lua.run(rig.filter, "on_request", headers=HEADERS, body=body("gpt-4o-mini"), during_body=meanwhile,
                      answer_error="a hit was expected")  # fmt: skip
    assert rec.ok, rec.err
    assert rec.n_http == 0, py(rec.logs)
    store = py(rec.store)
    assert (store[b"x-ai-eg-selected-route"], store[b"x-ai-eg-selected-backend"]) == (b"gpt", b"a")


def test_the_completion_record_reaches_the_metrics(rig: Rig) -> None:
    rig.request(body("gpt-4o-mini"))
    hit = rig.request(body("gpt-4o-mini"))
    usage = b'{"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
    out = rig.response(hit, [usage.decode()], {"content-type": "application/json"})
    assert out.ok, out.err
    assert out.n_http == 0  # into the ring, not over the socket
    assert rig.fast.drain() == 1
    data = rig.reader.get_metrics_data()
    assert data is not None
    sums = {
        dict(p.attributes)["gen_ai.token.type"]: p.sum
        for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        if m.name == "gen_ai.client.token.usage" for p in m.data.data_points
    }  # fmt: skip
    assert sums == {"input": 11, "output": 7}


def test_the_token_is_a_request_header_the_filter_sets_and_a_clients_is_never_kept(rig: Rig) -> None:
    """The record half is found again by the request header the filter sets (read back in the response phase with
    requestHeaders()); a client's own value of that header is dropped on every path, and a response whose request
    carries no token of the filter's writes nothing and takes nothing."""
    miss = rig.request(body("gpt-4o-mini"), {"x-ipc-router-rec": "client"})
    hit = rig.request(body("gpt-4o-mini"), {"x-ipc-router-rec": "client"})
    tokens = [py(r.store)[b"x-ipc-router-rec"] for r in (miss, hit)]
    assert tokens[0] != tokens[1] and b"client" not in tokens  # the filter's own, one per stream
    for r in (miss, hit):  # one value: the client's is gone, not kept beside the filter's
        assert [e[1] for e in py(r.list).values()].count(b"x-ipc-router-rec") == 1
    other = rig.lua.run(rig.filter, "on_request", headers={**HEADERS, ":path": "/v1/models", "x-ipc-router-rec": "2"})
    assert b"x-ipc-router-rec" not in py(other.store)
    for spoofed in ({}, {"x-ipc-router-rec": "999"}):  # none, or one the filter never issued
        out = rig.lua.run(rig.filter, "on_response", headers={":status": "200"}, chunks=["{}"],
                          request_headers=spoofed)  # fmt: skip
        assert out.ok and out.n_http == 0, out.err
    assert rig.fast.drain() == 0
    assert rig.response(hit, ["{}"]).ok and rig.response(miss, ["{}"]).ok
    assert rig.fast.drain() == 2
    again = rig.response(hit, ["{}"])  # a second response phase for one token finds nothing (forgotten)
    assert again.ok and again.n_http == 0 and rig.fast.drain() == 0


def test_bad_bodies_take_the_socket_path(rig: Rig) -> None:
    rig.request(body("gpt-4o-mini"))
    for raw in (b'{"model": "gpt-4o-mini",', b'{"model": "gpt-4o-mini"} x', b"[1]", b'{"model": 5}'):
        rec = rig.lua.run(rig.filter, "on_request", headers=HEADERS, body=raw, answer_error="asked")
        assert rec.n_http == 1, raw  # asked the sidecar, which answers 400 as before


def test_a_record_for_a_full_ring_goes_over_the_socket(rig: Rig) -> None:
    rig.request(body("gpt-4o-mini"))
    hit = rig.request(body("gpt-4o-mini"))
    big = "x" * 70000  # more than the whole 64 KiB ring
    out = rig.response(hit, [big])
    assert out.ok, out.err
    assert out.n_http == 1
    call = py(out.http_calls[1])
    assert call[b"headers"][b":path"] == b"/record"
    rec = msgpack.unpackb(call[b"body"], raw=False)
    assert rec["rule"] == "gpt" and rec["model"] == "gpt-4o-mini" and rec["status"] == 200


def test_a_response_that_never_comes_is_reported_incomplete_and_counted_expired(tmp_path: Path) -> None:
    """A stream reset before its response phase (client or backend): Envoy never runs the filter's response
    coroutine. The filter forgets the request after pending_timeout_s and writes an incomplete record; the sidecar
    counts it as expired (as the socket path's expiry does) and records no GenAI metrics for it."""
    import time

    rig = Rig(tmp_path)
    try:
        rig.filter = rig.lua.filter(shm_path=rig.path, pending_timeout_s=0.05)
        rig.request(body("gpt-4o-mini"))  # the miss, never answered
        hit = rig.request(body("gpt-4o-mini"))  # a hit, answered below
        time.sleep(0.06)
        rig.request(body("gpt-4o-mini"))  # first swap: both move to the old table
        assert rig.response(hit, ['{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}']).ok
        time.sleep(0.06)
        rig.request(body("gpt-4o-mini"))  # second swap: what is still there was never answered
        assert rig.fast.drain() == 2  # the answered hit's record and one incomplete record
        assert rig.service.stats.expired == 1
        assert rig.service.stats.records["ring"] == 2
        data = rig.reader.get_metrics_data()
        assert data is not None
        counts = [
            p.count
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == "gen_ai.server.request.duration" for p in m.data.data_points
        ]  # fmt: skip
        assert counts == [1]  # only the answered request
    finally:
        rig.close()


def test_the_drain_backs_off_on_empty_rings_and_returns_with_the_first_record() -> None:
    pace = DrainPace(0.002)
    assert [pace.after(0) for _ in range(6)] == [0.002, 0.004, 0.008, 0.016, 0.016, 0.016]
    assert pace.after(3) == 0.002  # records: the configured interval again, at once
    assert pace.after(0) == 0.002  # and the back-off starts over
    assert pace.after(64) == 0.0 and pace.after(1000) == 0.0  # busy rings: drained again without sleeping
    assert [pace.after(0) for _ in range(2)] == [0.002, 0.004]
    assert DrainPace(0.002, busy=8).after(8) == 0.0
