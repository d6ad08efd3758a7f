"""The AI Gateway filter config (v0.2 YAML format), as typed, validated, immutable objects.

A file the AI Gateway controller wrote loads unchanged: keys are camelCase, unknown keys (fields of later
versions, typos) are ignored and listed in :attr:`Config.warnings` with the known key they most resemble. Two
optional additions of ours on a backend: ``weight`` and ``endpoint``, plus an optional ``server`` section for
sidecar settings that may live beside the config.

Every problem is a :class:`ConfigError` naming the file, the key path (``rules[2].headers[0].type``) and what
is wrong.

Also importable as ``ipc_router.filterapi`` (the AI Gateway's name): the same module object.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Literal, TypeAlias, cast
from urllib.parse import urlsplit

import yaml

from ipc_router.costs import CostError, compile_cel
from ipc_router.credentials import Credential, CredentialError, parse_auth

RouteRuleName: TypeAlias = str

DEFAULT_MODEL_NAME_HEADER_KEY = "x-ai-eg-model"
DEFAULT_SELECTED_ROUTE_HEADER_KEY = "x-ai-eg-selected-route"
SELECTED_BACKEND_HEADER_KEY = "x-ai-eg-selected-backend"
ORIGINAL_PATH_HEADER_KEY = "x-ai-eg-original-path"
#: Request headers the gateway sets or reads for itself (the cluster the filter names, the served backend, the
#: fast path's per-stream token): never a token budget's key.
GATEWAY_HEADERS = ("x-ai-eg-selected-cluster", "x-ai-eg-served-backend", "x-ipc-router-rec")
DEFAULT_METADATA_NAMESPACE = "io.envoy.ai_gateway"

APISchemaName = Literal["OpenAI", "AWSBedrock", "AzureOpenAI"]
_SCHEMAS: tuple[str, ...] = ("OpenAI", "AWSBedrock", "AzureOpenAI")
_COST_TYPES = ("InputToken", "OutputToken", "TotalToken", "CEL")
_TOP_KEYS = (
    "schema", "modelNameHeaderKey", "selectedRouteHeaderKey", "metadataNamespace", "llmRequestCosts", "rules",
    "uuid", "server", "tokenBudgets",
)  # fmt: skip
_BUDGET_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


class ConfigError(ValueError):
    """A config that cannot be used. ``str()`` reads ``file: key.path: what is wrong``."""

    def __init__(self, message: str, path: str = "", source: str | None = None) -> None:
        self.message = message
        self.path = path
        self.source = source
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True, slots=True)
class VersionedAPISchema:
    name: str = "OpenAI"
    version: str = ""


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A Gateway API HTTPHeaderMatch. ``Exact`` compares strings; ``RegularExpression`` must match the whole
    value. ``name`` is stored lower-case: header names are case-insensitive."""

    name: str
    value: str
    type: Literal["Exact", "RegularExpression"] = "Exact"
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, value: str) -> bool:
        if self.pattern is None:
            return value == self.value
        return self.pattern.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    schema: VersionedAPISchema = field(default_factory=VersionedAPISchema)
    #: Relative share of the rule's traffic; 0 means never chosen.
    weight: int = 1
    #: ``http(s)://host[:port]`` for the Envoy bootstrap generator (see :func:`parse_endpoint`); ``None`` when
    #: Envoy's clusters are hand-written.
    endpoint: str | None = None
    #: The backend's ``auth`` section, kept as given.
    auth: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    #: What Envoy injects toward this backend, read from ``auth`` (see :mod:`ipc_router.credentials`).
    credential: Credential | None = field(default=None, compare=False, repr=False)
    #: Failover order within a rule (0 first); a rule whose backends have several priorities fails over.
    priority: int = 0


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: RouteRuleName
    headers: tuple[HeaderMatch, ...] = ()
    backends: tuple[Backend, ...] = ()
    models_owned_by: str = "Envoy AI Gateway"
    models_created_at: str | None = None

    @property
    def failover(self) -> bool:
        """The backends are tried in ``priority`` order (Envoy retries the next on failure) instead of split."""
        return len({b.priority for b in self.backends if b.weight > 0}) > 1


@dataclass(frozen=True, slots=True)
class LLMRequestCost:
    metadata_key: str
    type: str
    cel: str = ""


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """One ``tokenBudgets`` entry (ours): at most ``limit`` of the cost ``cost`` per ``unit`` for each distinct
    value of ``headers``; Envoy's rate limit filter enforces it (see :mod:`ipc_router.budgets`)."""

    name: str
    #: The ``metadataKey`` of an ``llmRequestCosts`` entry.
    cost: str
    #: Request headers (lower-case) whose values pick the budget; a request without one of them is not limited.
    headers: tuple[str, ...]
    limit: int
    unit: str = "minute"

    @property
    def seconds(self) -> int:
        return _BUDGET_UNITS[self.unit]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Optional ``server:`` section of ours. Command-line flags and ``IPC_ROUTER_*`` variables take precedence."""

    router: str | None = None
    metrics: str | None = None
    metrics_request_header_attributes: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    schema: VersionedAPISchema = field(default_factory=VersionedAPISchema)
    model_name_header_key: str = DEFAULT_MODEL_NAME_HEADER_KEY
    selected_route_header_key: str = DEFAULT_SELECTED_ROUTE_HEADER_KEY
    metadata_namespace: str = DEFAULT_METADATA_NAMESPACE
    llm_request_costs: tuple[LLMRequestCost, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    uuid: str = ""
    server: ServerSettings = field(default_factory=ServerSettings)
    token_budgets: tuple[TokenBudget, ...] = ()
    #: Unknown keys met while reading (ignored, as the AI Gateway adds keys over time), each as
    #: ``"rules[0].header: unknown key; did you mean 'headers'?"``.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def rule(self, name: str) -> RouteRule | None:
        for r in self.rules:
            if r.name == name:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        """The config as the AI Gateway's YAML keys (plus our additions); ``config_from_dict`` reads it back."""
        out: dict[str, Any] = {
            "schema": _schema_dict(self.schema),
            "modelNameHeaderKey": self.model_name_header_key,
            "selectedRouteHeaderKey": self.selected_route_header_key,
            "metadataNamespace": self.metadata_namespace,
            "rules": [_rule_dict(r) for r in self.rules],
        }
        if self.uuid:
            out["uuid"] = self.uuid
        if self.llm_request_costs:
            out["llmRequestCosts"] = [
                {"metadataKey": c.metadata_key, "type": c.type, **({"cel": c.cel} if c.cel else {})}
                for c in self.llm_request_costs
            ]
        if self.token_budgets:
            out["tokenBudgets"] = [
                {"name": b.name, "cost": b.cost, "headers": list(b.headers), "limit": b.limit, "unit": b.unit}
                for b in self.token_budgets
            ]
        server = {
            k: v
            for k, v in (
                ("router", self.server.router),
                ("metrics", self.server.metrics),
                ("metricsRequestHeaderAttributes", self.server.metrics_request_header_attributes),
            )
            if v is not None
        }
        if server:
            out["server"] = server
        return out


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A backend's ``endpoint``, parsed. ``port`` defaults by scheme: 443 for https, 80 for http."""

    scheme: Literal["http", "https"]
    host: str
    port: int


def parse_endpoint(endpoint: str) -> Endpoint:
    """``http://host[:port]`` or ``https://host[:port]`` (no path beyond ``/``, no query, no user info), the one
    definition of an endpoint for config validation and the Envoy bootstrap. Raises :class:`ValueError`."""
    u = urlsplit(endpoint)
    try:
        port = u.port
    except ValueError:  # not a number, or out of range
        port = -1
    extra = u.query or u.fragment or u.username or u.password or u.path not in ("", "/")
    if u.scheme not in ("http", "https") or not u.hostname or port == 0 or port == -1 or extra:
        raise ValueError(f"expected http://host[:port] or https://host[:port], got {endpoint!r}")
    scheme: Literal["http", "https"] = "https" if u.scheme == "https" else "http"
    return Endpoint(scheme, u.hostname, port if port is not None else (443 if scheme == "https" else 80))


def not_in_bootstrap(started: Config, new: Config) -> Iterator[str]:
    """What ``new`` routes to that a bootstrap generated from ``started`` has no cluster for, described for a log
    line: backends that had no cluster, and failover rules whose backends or order changed. New rules over
    existing backends need nothing: Envoy routes on the cluster header the sidecar sets."""
    backends = {b.name for r in started.rules for b in r.backends if b.weight > 0}
    orders = {r.name: _failover_order(r) for r in started.rules if r.failover}
    for r in new.rules:
        for b in r.backends:
            if b.weight > 0 and b.name not in backends:
                yield f"backend {b.name!r} of rule {r.name!r} is new"
        if r.failover and orders.get(r.name) != _failover_order(r):
            yield f"failover rule {r.name!r} is new or changed its backends"


def budgets_not_in_bootstrap(started: Config, new: Config) -> Iterator[str]:
    """Token budgets of ``new`` that a bootstrap generated from ``started`` sends Envoy no descriptor for: new
    names or changed headers. A budget's limit, unit and cost change live."""
    known = {(b.name, b.headers) for b in started.token_budgets}
    for b in new.token_budgets:
        if (b.name, b.headers) not in known:
            yield f"token budget {b.name!r} is new or changed its headers"


def _failover_order(r: RouteRule) -> tuple[str, ...]:
    return tuple(b.name for b in sorted((b for b in r.backends if b.weight > 0), key=lambda b: b.priority))


def _schema_dict(s: VersionedAPISchema) -> dict[str, str]:
    return {"name": s.name, "version": s.version} if s.version else {"name": s.name}


def _rule_dict(r: RouteRule) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": r.name,
        "headers": [{"type": h.type, "name": h.name, "value": h.value} for h in r.headers],
        "backends": [],
        "modelsOwnedBy": r.models_owned_by,
    }
    if r.models_created_at is not None:
        d["modelsCreatedAt"] = r.models_created_at
    for b in r.backends:
        bd: dict[str, Any] = {"name": b.name, "schema": _schema_dict(b.schema), "weight": b.weight}
        if b.priority:
            bd["priority"] = b.priority
        if b.endpoint is not None:
            bd["endpoint"] = b.endpoint
        if b.auth is not None:
            bd["auth"] = dict(b.auth)
        d["backends"].append(bd)
    return d


def default_config() -> Config:
    """What the AI Gateway uses when no file is given: OpenAI schema, default header keys, no rules."""
    return Config()


def load_config(path: str | PathLike[str]) -> Config:
    """Read and validate a filter config file. Raises :class:`ConfigError` (also for unreadable files)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", source=source) from e
    return parse_config(text, source=source)


def parse_config(text: str | bytes, source: str | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML{where}: {problem}", source=source) from e
    return config_from_dict({} if raw is None else raw, source=source)


def config_from_dict(raw: Any, source: str | None = None) -> Config:
    return _Reader(source).config(raw)


class _Reader:
    """Validates raw YAML data, keeping the key path for messages."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.warnings: list[str] = []
        self.gateway_headers: set[str] = set(GATEWAY_HEADERS)

    def known(self, m: Mapping[str, Any], path: str, keys: tuple[str, ...]) -> None:
        """Note each key of ``m`` not in ``keys``, with the known key it most resembles."""
        for key in m:
            if key in keys:
                continue
            where = f"{path}.{key}" if path else str(key)
            text = str(key)
            by_case = [k for k in keys if k.lower() == text.lower()]
            close = by_case or difflib.get_close_matches(text, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.warnings.append(f"{where}: unknown key{hint}")

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, path, self.source)

    def mapping(self, raw: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(path, f"expected a mapping, got {_kind(raw)}")
        return cast(Mapping[str, Any], raw)

    def seq(self, raw: Any, path: str) -> list[Any]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.fail(path, f"expected a list, got {_kind(raw)}")
        return raw

    def string(self, m: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
        p = f"{path}.{key}" if path else key
        v = m.get(key)
        if v is None:
            if default is None:
                raise self.fail(p, "is required")
            return default
        if not isinstance(v, str):
            raise self.fail(p, f"expected a string, got {_kind(v)}")
        return v

    def config(self, raw: Any) -> Config:
        m = self.mapping(raw, "")
        self.known(m, "", _TOP_KEYS)
        model_key = self.string(m, "modelNameHeaderKey", "", DEFAULT_MODEL_NAME_HEADER_KEY).lower()
        route_key = self.string(m, "selectedRouteHeaderKey", "", DEFAULT_SELECTED_ROUTE_HEADER_KEY).lower()
        if not model_key:
            raise self.fail("modelNameHeaderKey", "must not be empty")
        if not route_key:
            raise self.fail("selectedRouteHeaderKey", "must not be empty")
        rules = tuple(self.rule(r, f"rules[{i}]") for i, r in enumerate(self.seq(m.get("rules"), "rules")))
        seen: dict[str, int] = {}
        for i, r in enumerate(rules):
            if r.name in seen:
                raise self.fail(f"rules[{i}].name", f"duplicate rule name {r.name!r} (also rules[{seen[r.name]}])")
            seen[r.name] = i
        costs = tuple(
            self.cost(c, f"llmRequestCosts[{i}]")
            for i, c in enumerate(self.seq(m.get("llmRequestCosts"), "llmRequestCosts"))
        )
        self.gateway_headers = {
            model_key, route_key, SELECTED_BACKEND_HEADER_KEY, ORIGINAL_PATH_HEADER_KEY, *GATEWAY_HEADERS,
        }  # fmt: skip
        budgets = tuple(
            self.budget(b, f"tokenBudgets[{i}]", {c.metadata_key for c in costs})
            for i, b in enumerate(self.seq(m.get("tokenBudgets"), "tokenBudgets"))
        )
        names: dict[str, int] = {}
        for i, b in enumerate(budgets):
            if b.name in names:
                also = f"tokenBudgets[{names[b.name]}]"
                raise self.fail(f"tokenBudgets[{i}].name", f"duplicate budget name {b.name!r} (also {also})")
            names[b.name] = i
        uuid = m.get("uuid")
        return Config(
            schema=self.schema(m.get("schema"), "schema"),
            model_name_header_key=model_key,
            selected_route_header_key=route_key,
            metadata_namespace=self.string(m, "metadataNamespace", "", DEFAULT_METADATA_NAMESPACE),
            llm_request_costs=costs,
            rules=rules,
            uuid=str(uuid) if uuid is not None else "",
            server=self.server(m.get("server"), "server"),
            token_budgets=budgets,
            warnings=tuple(self.warnings),
        )

    def schema(self, raw: Any, path: str) -> VersionedAPISchema:
        if raw is None:
            return VersionedAPISchema()
        m = self.mapping(raw, path)
        self.known(m, path, ("name", "version"))
        name = self.string(m, "name", path)
        if name not in _SCHEMAS:
            raise self.fail(f"{path}.name", f"unknown schema {name!r}; expected one of {', '.join(_SCHEMAS)}")
        version = m.get("version", "")
        return VersionedAPISchema(name=name, version="" if version is None else str(version))

    def rule(self, raw: Any, path: str) -> RouteRule:
        m = self.mapping(raw, path)
        self.known(m, path, ("name", "headers", "backends", "modelsOwnedBy", "modelsCreatedAt"))
        name = self.string(m, "name", path)
        if not name:
            raise self.fail(f"{path}.name", "must not be empty")
        headers = tuple(
            self.header(h, f"{path}.headers[{i}]") for i, h in enumerate(self.seq(m.get("headers"), f"{path}.headers"))
        )
        backends = tuple(
            self.backend(b, f"{path}.backends[{i}]")
            for i, b in enumerate(self.seq(m.get("backends"), f"{path}.backends"))
        )
        if backends and not any(b.weight > 0 for b in backends):
            raise self.fail(f"{path}.backends", "every backend has weight 0: the rule could never be served")
        names = [b.name for b in backends]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise self.fail(f"{path}.backends[{i}].name", f"duplicate backend name {n!r} in this rule")
        levels: dict[int, int] = {}
        for i, b in enumerate(backends):
            if b.weight <= 0:
                continue
            if b.priority in levels and len({x.priority for x in backends if x.weight > 0}) > 1:
                raise self.fail(
                    f"{path}.backends[{i}].priority",
                    f"priority {b.priority} is also backends[{levels[b.priority]}]'s: a failover rule takes one "
                    "backend per priority",
                )
            levels.setdefault(b.priority, i)
        created = m.get("modelsCreatedAt")
        return RouteRule(
            name=name,
            headers=headers,
            backends=backends,
            models_owned_by=self.string(m, "modelsOwnedBy", path, "Envoy AI Gateway"),
            models_created_at=None if created is None else _iso(created),
        )

    def header(self, raw: Any, path: str) -> HeaderMatch:
        m = self.mapping(raw, path)
        self.known(m, path, ("type", "name", "value"))
        name = self.string(m, "name", path).lower()
        if not name:
            raise self.fail(f"{path}.name", "must not be empty")
        value = self.string(m, "value", path)
        kind = self.string(m, "type", path, "Exact")
        if kind == "Exact":
            return HeaderMatch(name=name, value=value)
        if kind == "RegularExpression":
            try:
                pattern = re.compile(value)
            except re.error as e:
                raise self.fail(f"{path}.value", f"invalid regular expression {value!r}: {e}") from e
            return HeaderMatch(name=name, value=value, type="RegularExpression", pattern=pattern)
        raise self.fail(f"{path}.type", f"unknown match type {kind!r}; expected Exact or RegularExpression")

    def backend(self, raw: Any, path: str) -> Backend:
        m = self.mapping(raw, path)
        self.known(m, path, ("name", "schema", "weight", "endpoint", "auth", "priority"))
        name = self.string(m, "name", path)
        if not name:
            raise self.fail(f"{path}.name", "must not be empty")
        weight = m.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise self.fail(f"{path}.weight", f"expected an integer >= 0, got {weight!r}")
        endpoint = m.get("endpoint")
        if endpoint is not None:
            if not isinstance(endpoint, str):
                raise self.fail(f"{path}.endpoint", f"expected a string, got {_kind(endpoint)}")
            try:
                parse_endpoint(endpoint)
            except ValueError as e:
                raise self.fail(f"{path}.endpoint", str(e)) from None
        priority = m.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise self.fail(f"{path}.priority", f"expected an integer >= 0, got {priority!r}")
        auth = m.get("auth")
        credential = None
        if auth is not None:
            auth = self.mapping(auth, f"{path}.auth")
            try:
                credential = parse_auth(auth)
            except CredentialError as e:  # its message never quotes the secret
                raise self.fail(".".join(p for p in (f"{path}.auth", e.path) if p), e.message) from None
        return Backend(
            name=name,
            schema=self.schema(m.get("schema"), f"{path}.schema"),
            weight=weight,
            endpoint=endpoint,
            auth=auth,
            credential=credential,
            priority=priority,
        )

    def cost(self, raw: Any, path: str) -> LLMRequestCost:
        m = self.mapping(raw, path)
        self.known(m, path, ("metadataKey", "type", "cel"))
        key = self.string(m, "metadataKey", path)
        kind = self.string(m, "type", path)
        if kind not in _COST_TYPES:
            raise self.fail(f"{path}.type", f"unknown cost type {kind!r}; expected one of {', '.join(_COST_TYPES)}")
        cel = self.string(m, "cel", path, "")
        if kind == "CEL" and not cel:
            raise self.fail(f"{path}.cel", "is required when type is CEL")
        if kind == "CEL":
            try:
                compile_cel(cel)
            except CostError as e:
                raise self.fail(f"{path}.cel", str(e)) from None
        return LLMRequestCost(metadata_key=key, type=kind, cel=cel)

    def budget(self, raw: Any, path: str, cost_keys: set[str]) -> TokenBudget:
        m = self.mapping(raw, path)
        self.known(m, path, ("name", "cost", "headers", "limit", "unit"))
        name = self.string(m, "name", path)
        if not name or any(c in name for c in ",:\n"):
            raise self.fail(f"{path}.name", f"must be a non-empty name without ',', ':' or newlines, not {name!r}")
        cost = self.string(m, "cost", path)
        if cost not in cost_keys:
            known = ", ".join(sorted(cost_keys)) or "none: add an llmRequestCosts entry"
            raise self.fail(f"{path}.cost", f"{cost!r} is not the metadataKey of an llmRequestCosts entry ({known})")
        headers = self.seq(m.get("headers"), f"{path}.headers")
        if not headers or not all(isinstance(h, str) and h.strip() for h in headers):
            raise self.fail(f"{path}.headers", "must list one or more request header names")
        names = tuple(h.strip().lower() for h in headers)
        if len(set(names)) != len(names):
            raise self.fail(f"{path}.headers", "lists a header twice")
        for h in names:
            if h.startswith(":") or h in self.gateway_headers:
                raise self.fail(
                    f"{path}.headers",
                    f"{h!r} is set by the gateway itself (Envoy checks the value the filter set, the charge may see "
                    "the client's): key a budget by a request header of the client's (a cost can weigh by model "
                    "or backend with CEL)",
                )
        limit = m.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise self.fail(f"{path}.limit", f"must be a positive integer, not {_kind(limit)} {limit!r}")
        unit = self.string(m, "unit", path, "minute")
        if unit not in _BUDGET_UNITS:
            raise self.fail(f"{path}.unit", f"unknown unit {unit!r}; expected one of {', '.join(_BUDGET_UNITS)}")
        return TokenBudget(name=name, cost=cost, headers=names, limit=limit, unit=unit)

    def server(self, raw: Any, path: str) -> ServerSettings:
        if raw is None:
            return ServerSettings()
        m = self.mapping(raw, path)
        self.known(m, path, ("router", "metrics", "metricsRequestHeaderAttributes"))

        def opt(key: str) -> str | None:
            return self.string(m, key, path, "") or None

        return ServerSettings(
            router=opt("router"),
            metrics=opt("metrics"),
            metrics_request_header_attributes=opt("metricsRequestHeaderAttributes"),
        )


def _kind(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


def _iso(v: Any) -> str:
    # YAML turns an unquoted timestamp into a datetime; keep the text form.
    return v.isoformat() if hasattr(v, "isoformat") else str(v)
