"""The filter config: loading the AI Gateway's v0.2 YAML, defaults, validation messages, round trips."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from ipc_router.filterapi import (
    DEFAULT_METADATA_NAMESPACE,
    DEFAULT_MODEL_NAME_HEADER_KEY,
    DEFAULT_SELECTED_ROUTE_HEADER_KEY,
    Backend,
    Config,
    ConfigError,
    Endpoint,
    HeaderMatch,
    LLMRequestCost,
    RouteRule,
    ServerSettings,
    VersionedAPISchema,
    config_from_dict,
    default_config,
    load_config,
    parse_config,
    parse_endpoint,
)

# Copied verbatim from ../shared/reference/ai-gateway-behaviour.md ("Filter config (v0.2 format, YAML)").
REFERENCE_YAML = textwrap.dedent(
    """\
    schema: {name: OpenAI}                       # input schema
    modelNameHeaderKey: x-ai-eg-model            # header the filter fills with the body's "model"
    selectedRouteHeaderKey: x-ai-eg-selected-route
    metadataNamespace: io.envoy.ai_gateway       # dynamic metadata namespace (costs)
    llmRequestCosts:                             # optional; later wave for us
    - {metadataKey: llm_total_token, type: TotalToken}   # InputToken | OutputToken | TotalToken | CEL (+ cel: "...")
    rules:
    - name: myroute-rule-0
      headers:                                   # Gateway API HTTPHeaderMatch: {type: Exact|RegularExpression, name, value}
      - {name: x-ai-eg-model, value: llama3.3}
      modelsOwnedBy: meta                        # for /v1/models
      modelsCreatedAt: "2025-05-21T10:00:00Z"
      backends:
      - {name: kserve.default, schema: {name: OpenAI}, auth: {apiKey: {key: sk-...}}}
      - {name: azure.default, schema: {name: AzureOpenAI, version: 2024-10-21}}
    - name: myroute-rule-1
      headers: [{name: x-ai-eg-model, value: gpt-4o}]
      backends: [{name: openai.default, schema: {name: OpenAI}}]
    """  # noqa: E501 (kept verbatim)
)

# Everything the loader understands, with mixed-case header names and every optional field set.
FULL_YAML = textwrap.dedent(
    """\
    schema: {name: AWSBedrock, version: v1}
    modelNameHeaderKey: X-My-Model
    selectedRouteHeaderKey: X-My-Route
    metadataNamespace: my.Namespace
    uuid: 4a5b6c7d-0000-1111-2222-333344445555
    llmRequestCosts:
    - {metadataKey: in, type: InputToken}
    - {metadataKey: out, type: OutputToken}
    - {metadataKey: total, type: TotalToken}
    - {metadataKey: custom, type: CEL, cel: "input_tokens * 2 + output_tokens"}
    rules:
    - name: exact
      headers:
      - {name: X-AI-EG-Model, value: gpt-4o}
      - {type: Exact, name: x-ai-eg-model, value: gpt-4o-mini}
      modelsOwnedBy: openai
      modelsCreatedAt: "2024-05-13T00:00:00Z"
      backends:
      - name: a
        schema: {name: OpenAI}
        weight: 3
        endpoint: http://127.0.0.1:8001
        auth: {apiKey: {key: sk-secret}}
      - {name: b, schema: {name: AzureOpenAI, version: "2024-10-21"}, weight: 0, endpoint: "https://example.com:443/"}
      - {name: c, weight: 1}
    - name: regex
      headers:
      - {type: RegularExpression, name: x-ai-eg-model, value: "llama-.*"}
    - name: bare
    server:
      router: my_pkg.routers:make
      metrics: my_pkg.metrics:make
      metricsRequestHeaderAttributes: "x-team-id:team_id"
    """
)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- the reference example --------------------------------------------------------------------------------------


def test_reference_example_loads_with_typed_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, REFERENCE_YAML))

    assert cfg.schema == VersionedAPISchema("OpenAI", "")
    assert cfg.model_name_header_key == "x-ai-eg-model"
    assert cfg.selected_route_header_key == "x-ai-eg-selected-route"
    assert cfg.metadata_namespace == "io.envoy.ai_gateway"
    assert cfg.llm_request_costs == (LLMRequestCost(metadata_key="llm_total_token", type="TotalToken", cel=""),)
    assert cfg.uuid == ""
    assert cfg.server == ServerSettings()

    assert [r.name for r in cfg.rules] == ["myroute-rule-0", "myroute-rule-1"]
    r0, r1 = cfg.rules
    assert r0.headers == (HeaderMatch(name="x-ai-eg-model", value="llama3.3", type="Exact"),)
    assert r0.headers[0].pattern is None
    assert r0.models_owned_by == "meta"
    assert r0.models_created_at == "2025-05-21T10:00:00Z"
    assert [b.name for b in r0.backends] == ["kserve.default", "azure.default"]
    kserve, azure = r0.backends
    assert kserve.schema == VersionedAPISchema("OpenAI", "")
    assert kserve.weight == 1
    assert kserve.endpoint is None
    assert kserve.auth == {"apiKey": {"key": "sk-..."}}
    # The unquoted YAML date is kept as its text, not as a date object.
    assert azure.schema == VersionedAPISchema("AzureOpenAI", "2024-10-21")
    assert isinstance(azure.schema.version, str)
    assert azure.auth is None

    assert r1.headers == (HeaderMatch(name="x-ai-eg-model", value="gpt-4o"),)
    assert r1.models_owned_by == "Envoy AI Gateway"
    assert r1.models_created_at is None
    assert r1.backends == (Backend(name="openai.default", schema=VersionedAPISchema("OpenAI")),)

    assert cfg.rule("myroute-rule-1") is r1
    assert cfg.rule("nope") is None


def test_full_example_camel_case_and_lower_cased_header_names() -> None:
    cfg = parse_config(FULL_YAML, source="full.yaml")

    assert cfg.schema == VersionedAPISchema("AWSBedrock", "v1")
    assert cfg.model_name_header_key == "x-my-model"
    assert cfg.selected_route_header_key == "x-my-route"
    assert cfg.metadata_namespace == "my.Namespace"  # not a header name: case kept
    assert cfg.uuid == "4a5b6c7d-0000-1111-2222-333344445555"
    assert [c.type for c in cfg.llm_request_costs] == ["InputToken", "OutputToken", "TotalToken", "CEL"]
    assert cfg.llm_request_costs[3] == LLMRequestCost("custom", "CEL", "input_tokens * 2 + output_tokens")

    exact, regex, bare = cfg.rules
    assert [h.name for h in exact.headers] == ["x-ai-eg-model", "x-ai-eg-model"]
    assert [h.value for h in exact.headers] == ["gpt-4o", "gpt-4o-mini"]
    assert exact.models_owned_by == "openai"
    assert exact.models_created_at == "2024-05-13T00:00:00Z"
    a, b, c = exact.backends
    assert (a.weight, a.endpoint, a.auth) == (3, "http://127.0.0.1:8001", {"apiKey": {"key": "sk-secret"}})
    assert (b.weight, b.endpoint, b.schema) == (
        0,
        "https://example.com:443/",
        VersionedAPISchema("AzureOpenAI", "2024-10-21"),
    )
    assert (c.weight, c.endpoint, c.schema) == (1, None, VersionedAPISchema("OpenAI", ""))

    (h,) = regex.headers
    assert h.type == "RegularExpression"
    assert h.pattern is not None and h.pattern.pattern == "llama-.*"
    assert regex.backends == ()
    assert bare == RouteRule(name="bare")

    assert cfg.server == ServerSettings(
        router="my_pkg.routers:make",
        metrics="my_pkg.metrics:make",
        metrics_request_header_attributes="x-team-id:team_id",
    )


def test_header_match_semantics() -> None:
    exact = HeaderMatch(name="x", value="a.b")
    assert exact.matches("a.b")
    assert not exact.matches("axb")
    assert not exact.matches("A.B")
    cfg = parse_config("rules: [{name: r, headers: [{type: RegularExpression, name: x, value: 'a.b'}]}]")
    rx = cfg.rules[0].headers[0]
    assert rx.matches("axb")
    assert not rx.matches("xaxb")  # must match the whole value
    assert not rx.matches("axbx")


def test_unquoted_timestamp_and_numeric_values_become_text() -> None:
    cfg = parse_config(
        "uuid: 12345\nrules:\n- name: r\n  modelsCreatedAt: 2025-05-21T10:00:00Z\n"
        "  backends: [{name: b, schema: {name: OpenAI, version: 2}}]\n"
    )
    assert cfg.uuid == "12345"
    assert cfg.rules[0].models_created_at == "2025-05-21T10:00:00+00:00"
    assert cfg.rules[0].backends[0].schema.version == "2"


# --- tolerance of unknown keys ----------------------------------------------------------------------------------

UNKNOWN_KEYS_YAML = textwrap.dedent(
    """\
    uuid: abc
    futureTopLevel: {deep: [1, 2, 3]}
    schema: {name: OpenAI, futureSchemaField: x}
    llmRequestCosts:
    - {metadataKey: k, type: TotalToken, futureCostField: 1}
    rules:
    - name: r
      futureRuleField: [a, b]
      matches: {something: else}
      headers:
      - {name: x-ai-eg-model, value: m, futureHeaderField: true}
      backends:
      - name: b
        futureBackendField: 7
        schema: {name: OpenAI, version: v1, futureSchemaField: y}
        auth: {apiKey: {key: k}, futureAuthField: z}
    server:
      router: m:f
      futureServerField: 1
    """
)


def test_unknown_keys_are_tolerated_at_every_level() -> None:
    cfg = parse_config(UNKNOWN_KEYS_YAML)
    expected = Config(
        llm_request_costs=(LLMRequestCost("k", "TotalToken"),),
        rules=(
            RouteRule(
                name="r",
                headers=(HeaderMatch("x-ai-eg-model", "m"),),
                backends=(Backend("b", VersionedAPISchema("OpenAI", "v1")),),
            ),
        ),
        uuid="abc",
        server=ServerSettings(router="m:f"),
    )
    assert cfg == expected
    # auth is kept as given, unknown keys included.
    assert cfg.rules[0].backends[0].auth == {"apiKey": {"key": "k"}, "futureAuthField": "z"}
    # ... and every unknown key outside auth is named.
    assert sorted(w.split(":")[0] for w in cfg.warnings) == sorted([
        "futureTopLevel",
        "schema.futureSchemaField",
        "llmRequestCosts[0].futureCostField",
        "rules[0].futureRuleField",
        "rules[0].matches",
        "rules[0].headers[0].futureHeaderField",
        "rules[0].backends[0].futureBackendField",
        "rules[0].backends[0].schema.futureSchemaField",
        "server.futureServerField",
    ])


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("rules: [{name: r, header: [{name: a, value: b}]}]", "rules[0].header: unknown key; did you mean 'headers'?"),
        ("rules: [{name: r, headers: [{nmae: a, value: b, name: c}]}]", "rules[0].headers[0].nmae: unknown key; "
         "did you mean 'name'?"),
        ("modelnameheaderkey: x-model", "modelnameheaderkey: unknown key; did you mean 'modelNameHeaderKey'?"),
        ("rules: [{name: r, backends: [{name: b, wieght: 2}]}]", "rules[0].backends[0].wieght: unknown key; "
         "did you mean 'weight'?"),
        ("server: {routr: m:f}", "server.routr: unknown key; did you mean 'router'?"),
        ("zzz: 1", "zzz: unknown key"),
    ],
)  # fmt: skip
def test_unknown_key_warning_names_the_closest_known_key(text: str, warning: str) -> None:
    cfg = parse_config(text)
    assert cfg.warnings == (warning,)


def test_known_keys_give_no_warnings() -> None:
    assert parse_config(FULL_YAML).warnings == ()
    assert parse_config(REFERENCE_YAML).warnings == ()


# --- defaults ---------------------------------------------------------------------------------------------------


def test_default_config_values() -> None:
    cfg = default_config()
    assert cfg.schema == VersionedAPISchema(name="OpenAI", version="")
    assert cfg.model_name_header_key == DEFAULT_MODEL_NAME_HEADER_KEY == "x-ai-eg-model"
    assert cfg.selected_route_header_key == DEFAULT_SELECTED_ROUTE_HEADER_KEY == "x-ai-eg-selected-route"
    assert cfg.metadata_namespace == DEFAULT_METADATA_NAMESPACE == "io.envoy.ai_gateway"
    assert cfg.rules == ()
    assert cfg.llm_request_costs == ()
    assert cfg.uuid == ""
    assert cfg.server == ServerSettings(None, None, None)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_the_default_config(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == default_config()


def test_empty_mapping_is_the_default_config() -> None:
    assert parse_config("{}") == default_config()
    assert config_from_dict({}) == default_config()
    assert parse_config("rules: []\nllmRequestCosts: null\nserver: null\nschema: null\n") == default_config()


def test_defaults_within_a_rule_and_backend() -> None:
    cfg = parse_config("rules: [{name: r, headers: [{name: H, value: v}], backends: [{name: b}]}]")
    (rule,) = cfg.rules
    assert rule.headers == (HeaderMatch("h", "v", "Exact"),)
    assert rule.models_owned_by == "Envoy AI Gateway"
    assert rule.models_created_at is None
    assert rule.backends == (Backend("b", VersionedAPISchema("OpenAI", ""), weight=1, endpoint=None),)


def test_config_is_immutable() -> None:
    cfg = parse_config(REFERENCE_YAML)
    with pytest.raises(AttributeError):
        cfg.rules = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.rules[0].backends[0].weight = 5  # type: ignore[misc]


# --- errors -----------------------------------------------------------------------------------------------------

RULE = "rules:\n- name: r\n"

# (id, YAML text, key path, fragment of the message)
BAD_CONFIGS = [
    ("top-level-list", "- a\n- b\n", "", "expected a mapping, got list"),
    ("top-level-scalar", "hello\n", "", "expected a mapping, got str"),
    ("rules-not-a-list", "rules: {name: r}\n", "rules", "expected a list, got dict"),
    ("rules-scalar", "rules: r\n", "rules", "expected a list, got str"),
    ("rule-not-a-mapping", "rules: [r]\n", "rules[0]", "expected a mapping, got str"),
    ("rule-without-name", "rules:\n- headers: []\n", "rules[0].name", "is required"),
    ("rule-name-empty", "rules:\n- name: ''\n", "rules[0].name", "must not be empty"),
    ("rule-name-not-a-string", "rules:\n- name: 12\n", "rules[0].name", "expected a string, got int"),
    ("second-rule-without-name", "rules:\n- name: a\n- {modelsOwnedBy: x}\n", "rules[1].name", "is required"),
    (
        "duplicate-rule-names",
        "rules:\n- name: a\n- name: b\n- name: a\n",
        "rules[2].name",
        "duplicate rule name 'a' (also rules[0])",
    ),
    ("headers-not-a-list", RULE + "  headers: {name: x, value: y}\n", "rules[0].headers", "expected a list"),
    ("header-not-a-mapping", RULE + "  headers: [x]\n", "rules[0].headers[0]", "expected a mapping, got str"),
    ("header-without-name", RULE + "  headers: [{value: v}]\n", "rules[0].headers[0].name", "is required"),
    (
        "header-name-empty",
        RULE + "  headers: [{name: '', value: v}]\n",
        "rules[0].headers[0].name",
        "must not be empty",
    ),
    ("header-without-value", RULE + "  headers: [{name: x}]\n", "rules[0].headers[0].value", "is required"),
    ("header-value-null", RULE + "  headers: [{name: x, value: null}]\n", "rules[0].headers[0].value", "is required"),
    (
        "unknown-header-type",
        RULE + "  headers:\n  - {name: x, value: v}\n  - {type: Prefix, name: x, value: v}\n",
        "rules[0].headers[1].type",
        "unknown match type 'Prefix'; expected Exact or RegularExpression",
    ),
    (
        "header-type-wrong-case",
        RULE + "  headers: [{type: exact, name: x, value: v}]\n",
        "rules[0].headers[0].type",
        "unknown match type 'exact'",
    ),
    (
        "invalid-regex",
        RULE + "  headers: [{type: RegularExpression, name: x, value: 'gpt-(4'}]\n",
        "rules[0].headers[0].value",
        "invalid regular expression 'gpt-(4'",
    ),
    ("backends-not-a-list", RULE + "  backends: b\n", "rules[0].backends", "expected a list, got str"),
    ("backend-not-a-mapping", RULE + "  backends: [b]\n", "rules[0].backends[0]", "expected a mapping, got str"),
    ("backend-without-name", RULE + "  backends: [{weight: 1}]\n", "rules[0].backends[0].name", "is required"),
    ("backend-name-empty", RULE + "  backends: [{name: ''}]\n", "rules[0].backends[0].name", "must not be empty"),
    (
        "weight-negative",
        RULE + "  backends: [{name: a, weight: -1}]\n",
        "rules[0].backends[0].weight",
        "expected an integer >= 0, got -1",
    ),
    (
        "weight-float",
        RULE + "  backends: [{name: a, weight: 1.5}]\n",
        "rules[0].backends[0].weight",
        "expected an integer >= 0, got 1.5",
    ),
    (
        "weight-string",
        RULE + "  backends: [{name: a}, {name: b, weight: '3'}]\n",
        "rules[0].backends[1].weight",
        "expected an integer >= 0, got '3'",
    ),
    (
        "weight-bool",
        RULE + "  backends: [{name: a, weight: true}]\n",
        "rules[0].backends[0].weight",
        "expected an integer >= 0, got True",
    ),
    (
        "weight-null",
        RULE + "  backends: [{name: a, weight: null}]\n",
        "rules[0].backends[0].weight",
        "expected an integer >= 0, got None",
    ),
    (
        "all-weights-zero",
        RULE + "  backends: [{name: a, weight: 0}, {name: b, weight: 0}]\n",
        "rules[0].backends",
        "every backend has weight 0",
    ),
    (
        "duplicate-backend-names",
        RULE + "  backends: [{name: a}, {name: b}, {name: a}]\n",
        "rules[0].backends[2].name",
        "duplicate backend name 'a' in this rule",
    ),
    (
        "endpoint-port-zero",
        RULE + "  backends: [{name: a, endpoint: 'http://example.com:0'}]\n",
        "rules[0].backends[0].endpoint",
        "expected http://host[:port] or https://host[:port], got 'http://example.com:0'",
    ),
    (
        "endpoint-with-user",
        RULE + "  backends: [{name: a, endpoint: 'https://me@example.com'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'https://me@example.com'",
    ),
    (
        "endpoint-wrong-scheme",
        RULE + "  backends: [{name: a, endpoint: 'ftp://example.com:21'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'ftp://example.com:21'",
    ),
    (
        "endpoint-with-path",
        RULE + "  backends: [{name: a, endpoint: 'http://example.com:8080/v1'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'http://example.com:8080/v1'",
    ),
    (
        "endpoint-bad-port",
        RULE + "  backends: [{name: a, endpoint: 'http://example.com:99999'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'http://example.com:99999'",
    ),
    (
        "endpoint-no-host",
        RULE + "  backends: [{name: a, endpoint: 'http://:8080'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'http://:8080'",
    ),
    (
        "endpoint-bare-host-port",
        RULE + "  backends: [{name: a, endpoint: 'example.com:8080'}]\n",
        "rules[0].backends[0].endpoint",
        "got 'example.com:8080'",
    ),
    (
        "endpoint-not-a-string",
        RULE + "  backends: [{name: a, endpoint: 8080}]\n",
        "rules[0].backends[0].endpoint",
        "expected a string, got int",
    ),
    (
        "auth-not-a-mapping",
        RULE + "  backends: [{name: a, auth: sk-1}]\n",
        "rules[0].backends[0].auth",
        "expected a mapping",
    ),
    (
        "unknown-schema",
        "schema: {name: Anthropic}\n",
        "schema.name",
        "unknown schema 'Anthropic'; expected one of OpenAI, AWSBedrock, AzureOpenAI",
    ),
    ("schema-without-name", "schema: {version: v1}\n", "schema.name", "is required"),
    ("schema-not-a-mapping", "schema: OpenAI\n", "schema", "expected a mapping, got str"),
    (
        "unknown-backend-schema",
        RULE + "  backends: [{name: a, schema: {name: openai}}]\n",
        "rules[0].backends[0].schema.name",
        "unknown schema 'openai'",
    ),
    ("costs-not-a-list", "llmRequestCosts: {metadataKey: k}\n", "llmRequestCosts", "expected a list, got dict"),
    (
        "cost-type-unknown",
        "llmRequestCosts:\n- {metadataKey: k, type: TotalToken}\n- {metadataKey: k2, type: Tokens}\n",
        "llmRequestCosts[1].type",
        "unknown cost type 'Tokens'; expected one of InputToken, OutputToken, TotalToken, CEL",
    ),
    ("cost-without-type", "llmRequestCosts: [{metadataKey: k}]\n", "llmRequestCosts[0].type", "is required"),
    ("cost-without-key", "llmRequestCosts: [{type: InputToken}]\n", "llmRequestCosts[0].metadataKey", "is required"),
    (
        "cel-without-cel",
        "llmRequestCosts: [{metadataKey: k, type: CEL}]\n",
        "llmRequestCosts[0].cel",
        "is required when type is CEL",
    ),
    ("cel-empty", "llmRequestCosts: [{metadataKey: k, type: CEL, cel: ''}]\n", "llmRequestCosts[0].cel", "is required"),
    ("model-key-empty", "modelNameHeaderKey: ''\n", "modelNameHeaderKey", "must not be empty"),
    ("model-key-not-a-string", "modelNameHeaderKey: 5\n", "modelNameHeaderKey", "expected a string, got int"),
    ("route-key-empty", "selectedRouteHeaderKey: ''\n", "selectedRouteHeaderKey", "must not be empty"),
    ("namespace-not-a-string", "metadataNamespace: [a]\n", "metadataNamespace", "expected a string, got list"),
    ("server-not-a-mapping", "server: [a]\n", "server", "expected a mapping, got list"),
    ("server-router-not-a-string", "server: {router: 1}\n", "server.router", "expected a string, got int"),
]


@pytest.mark.parametrize(("text", "path", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_key_path_and_problem(tmp_path: Path, text: str, path: str, message: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.source == str(f)
    assert err.path == path
    assert message in err.message
    prefix = f"{f}: {path}: " if path else f"{f}: "
    assert str(err).startswith(prefix), str(err)
    assert str(err) == prefix + err.message


def test_error_without_source_has_no_file_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"rules": [{"name": "a"}, {"name": "a"}]})
    assert str(info.value) == "rules[1].name: duplicate rule name 'a' (also rules[0])"
    assert info.value.source is None


def test_config_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^expected a mapping, got list$"):
        config_from_dict([])


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("a: b\n  c: d\n", 2, 4),
        ("rules:\n- {name: a\n", 3, 1),
        ("schema: {name: OpenAI}\nrules: [\n", 3, 1),
    ],
)
def test_invalid_yaml_gives_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    s = str(info.value)
    assert s.startswith(f"{f}: invalid YAML at line {line}, column {column}: "), s
    assert info.value.path == ""
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_invalid_yaml_from_parse_config_names_source() -> None:
    with pytest.raises(ConfigError, match=r"^inline\.yaml: invalid YAML at line 2, column 4: mapping values"):
        parse_config(b"a: b\n  c: d\n", source="inline.yaml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "does-not-exist.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value).startswith(f"{f}: cannot read: ")
    assert "No such file" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read: "):
        load_config(tmp_path)


def test_bytes_and_str_inputs_are_equivalent() -> None:
    assert parse_config(REFERENCE_YAML.encode()) == parse_config(REFERENCE_YAML)


# Endpoint values that are not ``http(s)://host:port`` but currently pass validation.
@pytest.mark.parametrize(
    "endpoint",
    ["http://example.com:8080?x=1", "http://example.com:8080#frag", "http://user:pw@example.com:8080", "http://h:0"],
)
def test_endpoint_with_extra_parts_is_rejected(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\]\.backends\[0\]\.endpoint"):
        config_from_dict({"rules": [{"name": "r", "backends": [{"name": "a", "endpoint": endpoint}]}]})


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:1", "https://example.com:443", "http://example.com:8080/", "http://[::1]:65535"]
)
def test_good_endpoints_are_accepted(endpoint: str) -> None:
    cfg = config_from_dict({"rules": [{"name": "r", "backends": [{"name": "a", "endpoint": endpoint}]}]})
    assert cfg.rules[0].backends[0].endpoint == endpoint


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("https://api.openai.com", Endpoint("https", "api.openai.com", 443)),
        ("https://api.openai.com/", Endpoint("https", "api.openai.com", 443)),
        ("http://vllm.internal", Endpoint("http", "vllm.internal", 80)),
        ("http://10.0.0.1:8000", Endpoint("http", "10.0.0.1", 8000)),
        ("https://[2001:db8::1]:8443", Endpoint("https", "2001:db8::1", 8443)),
        ("HTTPS://Example.COM", Endpoint("https", "example.com", 443)),
    ],
)
def test_parse_endpoint_defaults_the_port_by_scheme(endpoint: str, parsed: Endpoint) -> None:
    assert parse_endpoint(endpoint) == parsed
    cfg = config_from_dict({"rules": [{"name": "r", "backends": [{"name": "a", "endpoint": endpoint}]}]})
    assert cfg.rules[0].backends[0].endpoint == endpoint  # kept as written; the config accepts what parses


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [REFERENCE_YAML, FULL_YAML, UNKNOWN_KEYS_YAML, ""], ids=["reference", "full", "unknown", "empty"]
)
def test_round_trip_through_to_dict(text: str) -> None:
    cfg = parse_config(text)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    # Fields excluded from equality survive too.
    for r1, r2 in zip(cfg.rules, again.rules, strict=True):
        for b1, b2 in zip(r1.backends, r2.backends, strict=True):
            assert b1.auth == b2.auth
        for h1, h2 in zip(r1.headers, r2.headers, strict=True):
            assert (h1.pattern is None) == (h2.pattern is None)
            if h1.pattern is not None and h2.pattern is not None:
                assert h1.pattern.pattern == h2.pattern.pattern


@pytest.mark.parametrize(
    "text", [REFERENCE_YAML, FULL_YAML, UNKNOWN_KEYS_YAML, ""], ids=["reference", "full", "unknown", "empty"]
)
def test_round_trip_through_yaml(tmp_path: Path, text: str) -> None:
    cfg = parse_config(text)
    f = write(tmp_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "dumped.yaml")
    again = load_config(f)
    assert again == cfg
    assert [b.auth for r in again.rules for b in r.backends] == [b.auth for r in cfg.rules for b in r.backends]


def test_round_trip_keeps_yaml_ambiguous_strings() -> None:
    cfg = config_from_dict(
        {
            "uuid": "123",
            "rules": [
                {
                    "name": "true",
                    "headers": [{"name": "x", "value": "1.0"}, {"name": "y", "value": "null"}],
                    "modelsCreatedAt": "2025-05-21T10:00:00Z",
                    "backends": [{"name": "b", "schema": {"name": "AzureOpenAI", "version": "2024-10-21"}}],
                }
            ],
        }
    )
    assert parse_config(yaml.safe_dump(cfg.to_dict())) == cfg


def test_to_dict_uses_camel_case_keys() -> None:
    d = parse_config(FULL_YAML).to_dict()
    assert d["modelNameHeaderKey"] == "x-my-model"
    assert d["selectedRouteHeaderKey"] == "x-my-route"
    assert d["metadataNamespace"] == "my.Namespace"
    assert d["schema"] == {"name": "AWSBedrock", "version": "v1"}
    assert d["uuid"] == "4a5b6c7d-0000-1111-2222-333344445555"
    assert d["llmRequestCosts"][3] == {
        "metadataKey": "custom",
        "type": "CEL",
        "cel": "input_tokens * 2 + output_tokens",
    }
    assert d["llmRequestCosts"][0] == {"metadataKey": "in", "type": "InputToken"}
    rule = d["rules"][0]
    assert rule["modelsOwnedBy"] == "openai"
    assert rule["modelsCreatedAt"] == "2024-05-13T00:00:00Z"
    assert rule["backends"][0] == {
        "name": "a",
        "schema": {"name": "OpenAI"},
        "weight": 3,
        "endpoint": "http://127.0.0.1:8001",
        "auth": {"apiKey": {"key": "sk-secret"}},
    }
    assert d["server"] == {
        "router": "my_pkg.routers:make",
        "metrics": "my_pkg.metrics:make",
        "metricsRequestHeaderAttributes": "x-team-id:team_id",
    }
    assert "uuid" not in default_config().to_dict()
    assert "server" not in default_config().to_dict()
    assert "llmRequestCosts" not in default_config().to_dict()


# --- server section ---------------------------------------------------------------------------------------------


def test_server_section_parsed() -> None:
    cfg = parse_config("server:\n  router: a.b:c\n  metricsRequestHeaderAttributes: 'x-team-id:team_id,x-user:user'\n")
    assert cfg.server == ServerSettings(
        router="a.b:c", metrics=None, metrics_request_header_attributes="x-team-id:team_id,x-user:user"
    )
    assert cfg.rules == ()


def test_server_section_empty_strings_mean_unset() -> None:
    assert parse_config("server: {router: '', metrics: null}\n").server == ServerSettings()
    assert parse_config("server: {}\n").server == ServerSettings()


def test_not_in_bootstrap_lists_what_a_reload_adds_that_envoy_has_no_route_for() -> None:
    from ipc_router.filterapi import not_in_bootstrap

    def cfg(*rules: tuple[str, list[tuple[str, int]]]) -> Config:
        return config_from_dict(
            {"rules": [{"name": r, "backends": [{"name": b, "weight": w} for b, w in bs]} for r, bs in rules]}
        )

    started = cfg(("a", [("x", 1), ("off", 0)]), ("b", [("y", 1)]))
    assert list(not_in_bootstrap(started, started)) == []
    assert list(not_in_bootstrap(started, cfg(("b", [("y", 5)])))) == []  # weights and removals need nothing
    assert list(not_in_bootstrap(started, cfg(("a", [("x", 1), ("off", 0), ("z", 0)])))) == []  # weight 0: no route
    # A new rule, and an existing backend in another rule: Envoy routes on the cluster header, nothing is missing.
    assert list(not_in_bootstrap(started, cfg(("a", [("x", 1), ("y", 1)]), ("c", [("x", 1)]), ("d", [])))) == []
    assert list(not_in_bootstrap(started, cfg(("a", [("x", 1), ("off", 1), ("y", 1), ("new", 1)]), ("c", [])))) == [
        "backend 'off' of rule 'a' is new",  # it had weight 0 at start: no cluster was generated for it
        "backend 'new' of rule 'a' is new",
    ]
