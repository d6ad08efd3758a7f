"""envoy_config's options object and its parts: the bootstrap is assembled from one function per part, and the
CLI's envoy-config options are the options object's fields."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from ipc_router import cli
from ipc_router import envoy_upstreams as upstreams
from ipc_router.config import load_config
from ipc_router.envoy_config import (
    SIDECAR_CLUSTER,
    BootstrapOptions,
    EnvoyConfigError,
    bootstrap,
    check_options,
    cluster_list,
    http_connection_manager,
    listener,
    lua_config,
    route_list,
)

CONFIG = load_config(Path(__file__).resolve().parent.parent / "examples" / "config.yaml")
OPTIONS = BootstrapOptions(
    socket_path="/tmp/ipr-parts.sock", admin="127.0.0.1:9901", failure_mode="fail_open",
    passthrough="http://127.0.0.1:9", shm_path="/dev/shm/ipr-parts", access_log=True,
)  # fmt: skip


def test_keywords_and_the_options_object_give_the_same_bootstrap() -> None:
    as_kwargs = bootstrap(CONFIG, **dataclasses.asdict(OPTIONS))
    assert bootstrap(CONFIG, OPTIONS) == as_kwargs
    assert bootstrap(CONFIG, OPTIONS) != bootstrap(CONFIG, dataclasses.replace(OPTIONS, access_log=False))
    with pytest.raises(TypeError, match="not both"):
        bootstrap(CONFIG, OPTIONS, listen="127.0.0.1:1")
    with pytest.raises(TypeError):
        bootstrap(CONFIG, socket_path="/tmp/x.sock", no_such_option=1)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPTIONS.listen = "127.0.0.1:1"  # type: ignore[misc]


def test_the_bootstrap_is_its_parts() -> None:
    opts = check_options(CONFIG, OPTIONS)
    assert opts.fallback_route == CONFIG.rules[0].name  # fail_open without a fallback: the first rule
    assert OPTIONS.fallback_route is None  # the caller's object is left alone
    clusters, backend_clusters = cluster_list(CONFIG, opts)
    assert clusters[0]["name"] == SIDECAR_CLUSTER and clusters[-1]["name"] == "passthrough"
    routes = route_list(CONFIG, opts, backend_clusters)
    assert [routes[0]["name"], routes[-2]["name"], routes[-1]["name"]] == ["models", "passthrough", "no_route"]
    hcm = http_connection_manager(opts, routes, lua_config(CONFIG, opts), CONFIG)
    doc = bootstrap(CONFIG, OPTIONS)
    assert doc["static_resources"] == {
        "listeners": [listener(opts, hcm)],
        "clusters": clusters,
        "secrets": upstreams.static_secrets(upstreams.credentials_by_cluster(CONFIG, backend_clusters)),
    }
    assert doc["static_resources"]["secrets"], "the example's backend with auth gets a secret"
    assert doc["admin"] == {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}


def test_lua_config_carries_the_options() -> None:
    code = lua_config(CONFIG, check_options(CONFIG, OPTIONS))
    assert 'shm_path = "/dev/shm/ipr-parts"' in code and 'failure_mode = "fail_open"' in code
    assert 'package.preload["ipc_router_shm"]' in code
    plain = lua_config(CONFIG, check_options(CONFIG, BootstrapOptions(socket_path="/tmp/s.sock")))
    assert 'shm_path = "' not in plain and 'package.preload["ipc_router_shm"]' not in plain


def test_check_options_refuses_what_bootstrap_refuses() -> None:
    bad = BootstrapOptions(socket_path="/tmp/s.sock", route_timeout_ms=0)
    with pytest.raises(EnvoyConfigError, match="route_timeout_ms"):
        check_options(CONFIG, bad)
    with pytest.raises(EnvoyConfigError, match="route_timeout_ms"):
        bootstrap(CONFIG, bad)


def _envoy_config_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["envoy-config"]
    return parser


#: envoy-config options whose dest is not spelled like the field they set.
RENAMED = {"socket": "socket_path", "llm_path": "llm_paths", "shm": "shm_path", "shm_dir": "shm_path"}


def test_every_envoy_config_option_sets_an_options_field() -> None:
    fields = {f.name for f in dataclasses.fields(BootstrapOptions)}
    dests = {a.dest for a in _envoy_config_parser()._actions if a.dest not in ("help", "config")}
    assert dests, "no options found"
    assert {RENAMED.get(d, d) for d in dests} <= fields, {RENAMED.get(d, d) for d in dests} - fields


def test_envoy_config_defaults_are_the_options_defaults() -> None:
    args = _envoy_config_parser().parse_args(["--config", "c.yaml", "--socket", "/tmp/s.sock"])
    defaults = BootstrapOptions(socket_path="/tmp/s.sock")
    for name in ("listen", "admin", "failure_mode", "fallback_route", "passthrough", "route_timeout_ms"):
        assert getattr(args, name) == getattr(defaults, name), name
