"""Token budgets without Envoy: the config, the costs (CEL), the books, the ledger's charges on both paths, the
bootstrap's parts, and the rate limit service over a real gRPC connection on a Unix socket."""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import orjson
import pytest
from grpclib.client import Channel

from ipc_router import rls
from ipc_router.budgets import BUDGET_DESCRIPTOR_KEY, Budgets, rls_socket_path
from ipc_router.config import Backend, Config, ConfigError, budgets_not_in_bootstrap, parse_config
from ipc_router.costs import CostError, RequestCosts, compile_cel
from ipc_router.envoy_config import RLS_CLUSTER, bootstrap
from ipc_router.ledger import Completion, Ledger

BASE = """
llmRequestCosts:
  - {metadataKey: tokens, type: TotalToken}
  - {metadataKey: in, type: InputToken}
  - {metadataKey: weighted, type: CEL, cel: "model == 'big' ? total_tokens * 10 : total_tokens"}
rules:
  - name: r
    headers: [{name: x-ai-eg-model, value: m}]
    backends: [{name: b, endpoint: "http://127.0.0.1:9"}]
"""


def config(budgets: str) -> Config:
    return parse_config(BASE + "tokenBudgets:\n" + budgets)


ONE = config("  - {name: per-user, cost: tokens, headers: [X-User-Id], limit: 100, unit: minute}\n")


# --- config ---------------------------------------------------------------------------------------------------------


def test_a_budget_loads_with_lower_cased_headers_and_round_trips() -> None:
    (b,) = ONE.token_budgets
    assert (b.name, b.cost, b.headers, b.limit, b.unit, b.seconds) == ("per-user", "tokens", ("x-user-id",), 100,
                                                                       "minute", 60)  # fmt: skip
    assert parse_config(orjson.dumps(ONE.to_dict())).token_budgets == ONE.token_budgets


@pytest.mark.parametrize(
    ("budget", "path", "message"),
    [
        ("{name: a, cost: nope, headers: [x], limit: 1}", "tokenBudgets[0].cost", "not the metadataKey"),
        ("{name: a, cost: tokens, headers: [], limit: 1}", "tokenBudgets[0].headers", "one or more"),
        ("{name: a, cost: tokens, headers: [x, X], limit: 1}", "tokenBudgets[0].headers", "twice"),
        ("{name: a, cost: tokens, headers: [x], limit: 0}", "tokenBudgets[0].limit", "positive integer"),
        ("{name: a, cost: tokens, headers: [x], limit: 1.5}", "tokenBudgets[0].limit", "positive integer"),
        ("{name: a, cost: tokens, headers: [x], limit: 1, unit: week}", "tokenBudgets[0].unit", "unknown unit"),
        ("{name: 'a:b', cost: tokens, headers: [x], limit: 1}", "tokenBudgets[0].name", "without"),
        ("{name: a, cost: tokens, headers: [x], limit: 1, per: day}", "", ""),  # unknown key: a warning only
    ],
)
def test_bad_budgets_are_config_errors_naming_the_key(budget: str, path: str, message: str) -> None:
    if not path:
        assert "per" in " ".join(config(f"  - {budget}\n").warnings)
        return
    with pytest.raises(ConfigError) as e:
        config(f"  - {budget}\n")
    assert e.value.path == path and message in e.value.message


def test_duplicate_budget_names_are_refused() -> None:
    b = "  - {name: a, cost: tokens, headers: [x], limit: 1}\n"
    with pytest.raises(ConfigError, match=r"tokenBudgets\[1\].name: duplicate"):
        config(b + b)


@pytest.mark.parametrize(
    ("cel", "message"),
    [
        ("total_tokens +", "invalid CEL expression"),
        ("tokens * 2", "unknown variable 'tokens'"),
        ("input_tokens * 3u", "write 3, not 3u"),
        ("double(total_tokens) * 1.5", "must give an integer"),
        ("total_tokens - 100", "must not be negative"),
        ("model", "must give an integer"),
    ],
)
def test_a_bad_cel_cost_is_a_config_error(cel: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f'llmRequestCosts: [{{metadataKey: k, type: CEL, cel: "{cel}"}}]')
    assert e.value.path == "llmRequestCosts[0].cel" and message in e.value.message, e.value.message


def test_what_needs_a_new_bootstrap() -> None:
    moved = config("  - {name: per-user, cost: in, headers: [x-user-id], limit: 5, unit: day}\n")
    assert list(budgets_not_in_bootstrap(ONE, moved)) == []  # limit, unit and cost are live
    renamed = config("  - {name: per-key, cost: tokens, headers: [x-user-id], limit: 100}\n")
    rekeyed = config("  - {name: per-user, cost: tokens, headers: [x-team], limit: 100}\n")
    assert list(budgets_not_in_bootstrap(ONE, renamed)) == ["token budget 'per-key' is new or changed its headers"]
    assert list(budgets_not_in_bootstrap(ONE, rekeyed)) == ["token budget 'per-user' is new or changed its headers"]


# --- costs ----------------------------------------------------------------------------------------------------------


def test_costs_by_type_and_cel() -> None:
    costs = RequestCosts([(c.metadata_key, c.type, c.cel) for c in ONE.llm_request_costs])
    assert costs.compute("big", "b", 3, 4, 7) == ({"tokens": 7, "in": 3, "weighted": 70}, [])
    assert costs.compute("small", "b", 3, 4, 7) == ({"tokens": 7, "in": 3, "weighted": 7}, [])


def test_a_cel_cost_that_fails_on_one_request_is_left_out_and_named() -> None:
    costs = RequestCosts([("ratio", "CEL", "total_tokens / input_tokens"), ("t", "TotalToken", "")])
    assert costs.compute("m", "b", 2, 4, 6) == ({"ratio": 3, "t": 6}, [])
    values, errors = costs.compute("m", "b", 0, 4, 4)
    assert values == {"t": 4} and len(errors) == 1 and errors[0].startswith("ratio:")


def test_compile_cel_accepts_the_documented_variables() -> None:
    program = compile_cel("backend == 'b' && model.startsWith('gpt') ? input_tokens + output_tokens * 4 : 0")
    assert program.execute({"model": "gpt-x", "backend": "b", "input_tokens": 1, "output_tokens": 2,
                            "total_tokens": 3}) == 9  # fmt: skip
    with pytest.raises(CostError):
        compile_cel("cached_tokens")


# --- the books ------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 999_980.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def books(cfg: Config = ONE, **kw: Any) -> tuple[Budgets, Clock]:
    clock = Clock()
    b = Budgets(clock=clock, **kw)
    b.configure(cfg)
    return b, clock


def test_check_charges_nothing_and_charge_adds_the_cost() -> None:
    b, _ = books()
    key = {"x-user-id": "alice"}
    for _ in range(3):
        v = b.check("per-user", key)
        assert not v.over and v.used == 0 and v.remaining == 100
    b.charge(key, "m", "b", 40, 20, 60)
    assert b.check("per-user", key).used == 60
    b.charge(key, "m", "b", 20, 20, 40)
    v = b.check("per-user", key)
    assert v.over and v.used == 100 and v.remaining == 0
    assert not b.check("per-user", {"x-user-id": "bob"}).over
    assert b.events["charged"] == 2 and b.events["over_limit"] == 1


def test_a_request_without_the_budgets_headers_is_not_charged() -> None:
    b, _ = books()
    b.charge({"x-team": "red"}, "m", "b", 1, 1, 2)
    assert b.snapshot() == [] and b.events["charged"] == 0


def test_windows_align_to_the_clock_and_start_afresh() -> None:
    b, clock = books()  # t = 999_980: 20 s into a minute
    key = {"x-user-id": "a"}
    b.charge(key, "m", "b", 0, 100, 100)
    v = b.check("per-user", key)
    assert v.over and v.reset_in == pytest.approx(40.0)
    clock.t += 39.9
    assert b.check("per-user", key).over
    clock.t += 0.1
    assert not b.check("per-user", key).over and b.snapshot() == []


def test_an_unknown_budget_is_not_limited() -> None:
    b, _ = books()
    v = b.check("gone", {"x-user-id": "a"})
    assert v.budget is None and not v.over and b.events["unknown_budget"] == 1


def test_reconfigure_keeps_what_stays_and_drops_what_changed_its_key() -> None:
    b, _ = books()
    b.charge({"x-user-id": "a"}, "m", "b", 0, 80, 80)
    b.configure(config("  - {name: per-user, cost: tokens, headers: [x-user-id], limit: 50}\n"))
    assert b.check("per-user", {"x-user-id": "a"}).over  # spent 80 of a lowered 50
    b.configure(config("  - {name: per-user, cost: tokens, headers: [x-team], limit: 50}\n"))
    assert b.check("per-user", {"x-team": "a"}).used == 0


def test_keys_are_bounded() -> None:
    b, clock = books(max_keys=3)
    for i in range(5):
        b.charge({"x-user-id": str(i)}, "m", "b", 0, 1, 1)
    assert len(b.snapshot()) == 3 and b.events["evicted"] == 2
    assert [r["key"] for r in b.snapshot()] == [{"x-user-id": "2"}, {"x-user-id": "3"}, {"x-user-id": "4"}]
    clock.t += 60  # a new window: the old ones go first, nothing current is evicted
    b.charge({"x-user-id": "new"}, "m", "b", 0, 1, 1)
    assert b.events["evicted"] == 2 and len(b.snapshot()) == 1


# --- the ledger charges on both paths -------------------------------------------------------------------------------


def ledger() -> Ledger:
    led = Ledger()
    led.budgets.configure(ONE)
    return led


BODY = orjson.dumps({"usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}})


def test_the_socket_path_charges_at_complete() -> None:
    led = ledger()
    key = led.start({"x-user-id": "alice", "x-other": "1"}, "m", Backend("b"), 1.0)
    assert led.in_flight[key].budget_headers == {"x-user-id": "alice"}
    record = led.complete(key, 200, None, 2.0, False, BODY, False)
    assert record is not None
    assert led.budgets.check("per-user", {"x-user-id": "alice"}).used == 0  # charged when recorded
    record()
    assert led.budgets.check("per-user", {"x-user-id": "alice"}).used == 42


def test_a_record_charges_and_records_carry_the_budget_headers() -> None:
    led = ledger()
    assert led.record_header_names() == ("x-user-id",)
    led.record(Completion({"x-user-id": "alice"}, "m", Backend("b"), 200, False, 1.0, None, 2.0, BODY, False))
    assert led.budgets.check("per-user", {"x-user-id": "alice"}).used == 42
    # An incomplete request or a response without usage costs nothing.
    led.record(Completion({"x-user-id": "alice"}, "m", None, 0, False, 1.0, None, 2.0, b"", False, incomplete=True))
    led.record(Completion({"x-user-id": "alice"}, "m", None, 500, False, 1.0, None, 2.0, b"{}", False))
    assert led.budgets.check("per-user", {"x-user-id": "alice"}).used == 42


# --- the bootstrap --------------------------------------------------------------------------------------------------


def test_the_bootstrap_checks_budgets_on_backend_routes_only() -> None:
    doc = bootstrap(ONE, socket_path="/tmp/x.sock")
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.lua", "envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    rl = hcm["http_filters"][1]["typed_config"]
    assert rl["domain"] == "ipc_router" and rl["failure_mode_deny"] is False
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    limited = {n for n, r in routes.items() if "rate_limits" in r.get("route", {})}
    assert limited == set(routes) - {"models", "no_route"}
    (limit,) = routes["r"]["route"]["rate_limits"]
    assert limit["hits_addend"] == {"number": 0}
    assert limit["actions"] == [
        {"generic_key": {"descriptor_key": BUDGET_DESCRIPTOR_KEY, "descriptor_value": "per-user"}},
        {"request_headers": {"header_name": "x-user-id", "descriptor_key": "x-user-id"}},
    ]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    pipe = clusters[RLS_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert pipe == {"pipe": {"path": rls_socket_path("/tmp/x.sock")}}
    closed = bootstrap(ONE, socket_path="/tmp/x.sock", budget_fail_closed=True)
    hcm = closed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][1]["typed_config"]["failure_mode_deny"] is True


def test_no_budgets_no_rate_limit_filter() -> None:
    doc = bootstrap(parse_config(BASE), socket_path="/tmp/x.sock")
    assert "ratelimit" not in str(doc) and RLS_CLUSTER not in str(doc)


# --- the rate limit service over gRPC -------------------------------------------------------------------------------


def rl_request(*descriptors: dict[str, str], domain: str = "ipc_router") -> Any:
    req = rls.RateLimitRequest(domain=domain)
    for entries in descriptors:
        d = req.descriptors.add()
        for k, v in entries.items():
            e = d.entries.add()
            e.key, e.value = k, v
        d.hits_addend.value = 0
    return req


def test_the_service_answers_over_a_unix_socket() -> None:
    b, _ = books()
    b.charge({"x-user-id": "spent"}, "m", "b", 0, 150, 150)
    path = os.path.join(tempfile.mkdtemp(prefix="iprl", dir="/tmp"), "s.sock.rls")

    async def run() -> tuple[Any, Any, Any]:
        server = await rls.start_server(b, path, 0o600)
        try:
            assert os.stat(path).st_mode & 0o777 == 0o600
            async with Channel(path=path) as channel:
                async def call(req: Any) -> Any:
                    async with channel.request(rls.METHOD, rls.Cardinality.UNARY_UNARY, rls.RateLimitRequest,
                                               rls.RateLimitResponse) as stream:  # fmt: skip
                        await stream.send_message(req, end=True)
                        return await stream.recv_message()

                ok = await call(rl_request({BUDGET_DESCRIPTOR_KEY: "per-user", "x-user-id": "fresh"}))
                over = await call(rl_request({BUDGET_DESCRIPTOR_KEY: "per-user", "x-user-id": "spent"},
                                             {BUDGET_DESCRIPTOR_KEY: "per-user", "x-user-id": "fresh"}))  # fmt: skip
                foreign = await call(rl_request({"remote_address": "1.2.3.4"}, domain="other"))
                return ok, over, foreign
        finally:
            server.close()
            await server.wait_closed()

    ok, over, foreign = asyncio.run(run())
    assert ok.overall_code == 1 and ok.statuses[0].limit_remaining == 100 and not ok.raw_body
    assert ok.statuses[0].current_limit.requests_per_unit == 100
    assert over.overall_code == 2 and [s.code for s in over.statuses] == [2, 1]
    body = orjson.loads(over.raw_body)["error"]
    assert body["code"] == "rate_limit_exceeded"
    assert "x-user-id=spent" in body["message"] and "150 of 100" in body["message"]
    headers = {h.key: h.value for h in over.response_headers_to_add}
    assert headers["content-type"] == "application/json" and 1 <= int(headers["retry-after"]) <= 60
    assert foreign.overall_code == 1 and b.events["foreign_descriptors"] == 1
    assert b.events["charged"] == 1  # checks never charge


def test_an_overfull_table_is_trimmed_in_bursts_from_the_oldest_end() -> None:
    b, _ = books(max_keys=1000)
    for i in range(1001):
        b.charge({"x-user-id": str(i)}, "m", "b", 0, 1, 1)
    # One burst down to 90% of the cap, the oldest first: the next 100 new keys cost no trimming at all.
    assert len(b.snapshot()) == 900 and b.events["evicted"] == 101
    assert b.check("per-user", {"x-user-id": "100"}).used == 0 and b.check("per-user", {"x-user-id": "101"}).used == 1
    for i in range(1001, 1101):
        b.charge({"x-user-id": str(i)}, "m", "b", 0, 1, 1)
    assert len(b.snapshot()) == 1000 and b.events["evicted"] == 101


def test_a_new_unit_starts_new_windows() -> None:
    b, _ = books()
    b.charge({"x-user-id": "a"}, "m", "b", 0, 80, 80)
    b.configure(config("  - {name: per-user, cost: tokens, headers: [x-user-id], limit: 100, unit: day}\n"))
    assert b.check("per-user", {"x-user-id": "a"}).used == 0 and b.snapshot() == []


@pytest.mark.parametrize(
    "header", ["x-ai-eg-model", "x-ai-eg-selected-route", "x-ai-eg-selected-backend", "x-ai-eg-selected-cluster",
               "x-ai-eg-original-path", "x-ipc-router-rec", ":authority"],
)  # fmt: skip
def test_a_header_the_gateway_sets_is_no_budget_key(header: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(f"  - {{name: a, cost: tokens, headers: [x-user-id, '{header}'], limit: 1}}\n")
    assert e.value.path == "tokenBudgets[0].headers" and "set by the gateway" in e.value.message


def test_the_gateway_headers_are_the_ones_the_parts_use() -> None:
    from ipc_router import envoy_upstreams
    from ipc_router.config import GATEWAY_HEADERS
    from tests.support.lua_harness import Lua

    assert {envoy_upstreams.CLUSTER_HEADER, envoy_upstreams.SERVED_BACKEND_HEADER} <= set(GATEWAY_HEADERS)
    assert Lua().filter().conf.token_header.decode() in GATEWAY_HEADERS


def test_a_failing_cel_cost_is_counted_and_shown_by_budgets() -> None:
    from ipc_router.protocol import Request
    from ipc_router.router import Routing
    from ipc_router.service import Response, Service

    cfg = parse_config(
        "llmRequestCosts: [{metadataKey: ratio, type: CEL, cel: 'total_tokens / input_tokens'}]\n"
        "tokenBudgets: [{name: r, cost: ratio, headers: [x-user-id], limit: 100}]\n"
    )
    svc = Service(Routing(cfg))
    svc.ledger.budgets.configure(cfg)
    svc.ledger.budgets.charge({"x-user-id": "a"}, "m", "b", 0, 5, 5)  # 5 / 0
    resp = svc.handle(Request("GET", "/budgets", {}, b"", True))
    assert isinstance(resp, Response) and resp.status == 200
    body = orjson.loads(resp.body)
    assert body["events"]["cost_errors"] == 1 and body["last_cost_error"].startswith("ratio:")
    assert body["budgets"] == []  # nothing charged: the only cost failed
