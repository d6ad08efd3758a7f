"""Backend credentials and failover in the config and the generated bootstrap (the pure parts; end to end:
tests/test_e2e_upstreams.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ipc_router.config import ConfigError, config_from_dict
from ipc_router.credentials import Credential, CredentialError, parse_auth
from ipc_router.envoy_config import EnvoyConfigError, bootstrap, render
from ipc_router.envoy_upstreams import sds_files, write_sds_files
from ipc_router.router import Routing
from tests.test_envoy_config import STUB_LUA, envoy_validate, needs_envoy

KEY = "sk-unit-test-key-0123456789"


def cfg(*backends: dict[str, Any], **rule: Any) -> Any:
    r = {"name": "r", "headers": [{"name": "x-ai-eg-model", "value": "m"}], "backends": list(backends), **rule}
    return config_from_dict({"rules": [r]})


def be(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "endpoint": "http://127.0.0.1:9", **extra}


# ------------------------------------------------------------------------------------------------ credentials


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"apiKey": {"key": KEY}}, Credential("inline", KEY, "apiKey")),
        ({"apiKey": {"filename": "/run/secrets/k"}}, Credential("file", "/run/secrets/k", "apiKey")),
        ({"azure": {"accessToken": KEY}}, Credential("inline", KEY, "azure")),
        ({"azure": {"filename": "/t"}, "futureField": 1}, Credential("file", "/t", "azure")),
        ({"somethingElse": {}}, None),
    ],
)
def test_parse_auth(auth: dict[str, Any], expected: Credential | None) -> None:
    assert parse_auth(auth) == expected


@pytest.mark.parametrize(
    ("auth", "path", "message"),
    [
        ({"apiKey": {"key": KEY, "filename": "/x"}}, "apiKey", "set exactly one of 'key' or 'filename'"),
        ({"apiKey": {}}, "apiKey", "set exactly one"),
        ({"apiKey": {"key": 12}}, "apiKey.key", "expected a non-empty string"),
        ({"apiKey": {"key": "a\nb"}}, "apiKey.key", "single line"),
        ({"apiKey": "sk"}, "apiKey", "expected a mapping"),
        ({"apiKey": {"key": KEY}, "azure": {"accessToken": KEY}}, "", "set one of apiKey, azure, aws"),
        ({"aws": {"credentialFileLiteral": KEY, "region": "us-east-1"}}, "aws", "not supported yet"),
    ],
)
def test_bad_auth_is_named_without_the_secret(auth: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(CredentialError) as e:
        parse_auth(auth)
    assert (e.value.path, message in e.value.message) == (path, True)
    with pytest.raises(ConfigError) as ce:
        cfg(be("b", auth=auth))
    assert str(ce.value).startswith("rules[0].backends[0].auth")
    assert KEY not in str(ce.value)


def test_a_credential_never_shows_its_key() -> None:
    c = parse_auth({"apiKey": {"key": KEY}})
    config = cfg(be("b", auth={"apiKey": {"key": KEY}}))
    for text in (repr(c), str(c), repr(config.rules[0].backends[0]), repr(config.rules[0]), repr(config)):
        assert KEY not in text


# ---------------------------------------------------------------------------------------------------- failover


def test_priority_makes_a_failover_rule_and_routing_picks_the_first() -> None:
    c = cfg(be("second", priority=1), be("first", priority=0), be("off", priority=0, weight=0))
    rule = c.rules[0]
    assert rule.failover
    assert [b.priority for b in rule.backends] == [1, 0, 0]
    routing = Routing(c)
    picks = {routing.route({"x-ai-eg-model": "m"}).backend.name for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {"first"}
    assert not cfg(be("a"), be("b")).rules[0].failover  # one priority: a weighted split as before


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ([be("a", priority=0), be("b", priority=0), be("c", priority=1)], "a failover rule takes one backend"),
        ([be("a", priority=-1)], "expected an integer >= 0"),
        ([be("a", priority=True)], "expected an integer >= 0"),
    ],
)
def test_bad_priorities(backends: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(*backends)


# ----------------------------------------------------------------------------------------------------- bootstrap


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def test_inline_key_is_a_secret_and_an_upstream_filter_chain() -> None:
    doc = bootstrap(cfg(be("b", auth={"apiKey": {"key": KEY}}), be("open")), socket_path="/tmp/s", lua_source=STUB_LUA)
    assert doc["static_resources"]["secrets"] == [
        {"name": "credential_backend_b", "generic_secret": {"secret": {"inline_string": KEY}}}
    ]
    opts = clusters(doc)["backend_b"]["typed_extension_protocol_options"]
    chain = opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert [f["name"] for f in chain] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.credential_injector",
        "envoy.filters.http.upstream_codec",
    ]
    removed = [m["remove"] for m in chain[0]["typed_config"]["mutations"]["request_mutations"]]
    assert removed == ["authorization", "api-key", "x-api-key"]
    generic = chain[1]["typed_config"]["credential"]["typed_config"]
    assert (generic["header"], generic["header_value_prefix"]) == ("authorization", "Bearer ")
    assert "typed_extension_protocol_options" not in clusters(doc)["backend_open"]  # no auth: untouched
    assert KEY not in render({k: v for k, v in doc.items() if k != "static_resources"})
    assert "node" not in doc  # only file-based SDS needs one


def test_key_file_needs_sds_dir_and_gets_an_sds_file(tmp_path: Path) -> None:
    c = cfg(be("b", auth={"apiKey": {"filename": "/run/secrets/key"}}))
    with pytest.raises(EnvoyConfigError, match="sds_dir"):
        bootstrap(c, socket_path="/tmp/s", lua_source=STUB_LUA)
    doc = bootstrap(c, socket_path="/tmp/s", lua_source=STUB_LUA, sds_dir=str(tmp_path))
    assert doc["node"] == {"id": "ipc-router", "cluster": "ipc-router"}
    (written,) = write_sds_files(c, str(tmp_path))
    resource = yaml.safe_load(Path(written).read_text())["resources"][0]
    assert resource["generic_secret"] == {"secret": {"filename": "/run/secrets/key"}}
    source = doc["static_resources"]["clusters"][1]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]["http_filters"][1]["typed_config"]["credential"]["typed_config"]["credential"]["sds_config"]
    assert source["path_config_source"] == {"path": written, "watched_directory": {"path": "/run/secrets"}}
    assert sds_files({}, str(tmp_path)) == {}


def test_failover_rule_gets_an_aggregate_cluster_and_a_retrying_route() -> None:
    c = cfg(be("p1", priority=1, auth={"apiKey": {"key": KEY}}), be("p0", priority=0))
    doc = bootstrap(c, socket_path="/tmp/s", lua_source=STUB_LUA)
    agg = clusters(doc)["failover_r"]
    assert agg["cluster_type"]["typed_config"]["clusters"] == ["backend_p0", "backend_p1"]  # priority order
    routes = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    fo = next(r for r in routes if r["name"] == "failover/r")
    assert fo["route"]["cluster"] == "failover_r"
    policy = fo["route"]["retry_policy"]
    assert (policy["num_retries"], policy["retriable_status_codes"]) == (1, [429])
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert fo["response_headers_to_add"][0]["header"]["key"] == "x-ai-eg-served-backend"
    assert [r["name"] for r in routes].index("failover/r") < [r["name"] for r in routes].index("by_cluster")


@needs_envoy
@pytest.mark.parametrize("cds", [False, True], ids=["static", "cds"])
def test_everything_validates_in_envoy(tmp_path: Path, cds: bool) -> None:
    from ipc_router.envoy_config import upstream_clusters
    from ipc_router.envoy_upstreams import write_cds

    key = tmp_path / "key"
    key.write_text(KEY)
    c = cfg(
        be("inline", priority=0, auth={"apiKey": {"key": KEY}}),
        be("filed", priority=1, auth={"apiKey": {"filename": str(key)}}),
        be("azure", priority=2, auth={"azure": {"accessToken": KEY}}),
        be("plain", priority=3),
    )
    cds_path = str(tmp_path / "cds.yaml") if cds else None
    write_sds_files(c, str(tmp_path), all_sds=cds)
    if cds_path is not None:
        write_cds(cds_path, upstream_clusters(c, sds_dir=str(tmp_path), all_sds=True)[0])
    path = tmp_path / "envoy.yaml"
    path.write_text(render(bootstrap(c, socket_path="/tmp/s", lua_source=STUB_LUA, sds_dir=str(tmp_path),
                                     cds_path=cds_path)))  # fmt: skip
    envoy_validate(path)
