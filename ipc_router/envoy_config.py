"""Generate an Envoy v3 bootstrap for a filter config: listener, Lua filter, routes, clusters.

What the generated bootstrap does for one chat request:

1. The Lua filter (``ipc_router/lua/ipc_router.lua``, embedded in the bootstrap by a loader, see :func:`lua_loader`)
   asks the sidecar over a Unix socket (cluster ``ipc_router_sidecar``) which rule and backend serve the request,
   sets ``<selectedRouteHeaderKey>`` and ``x-ai-eg-selected-backend`` and clears the route cache.
2. Envoy's router re-matches on those headers, in this order:

   a. ``/v1/models`` (exact path) goes to the sidecar, which answers it itself;
   b. one route per (rule, backend with weight > 0): both headers match -> that backend's cluster;
   c. one route per rule: only the rule header matches (the sidecar picked no backend, or the Lua filter fell back
      to a rule in ``fail_open`` mode) -> a weighted split over the rule's backends;
   d. anything else -> a JSON 404 (``no_route``).

   Rules without backends get no route (the sidecar may still pick them, e.g. to answer with an immediate response;
   a request that ends up there gets the 404). Backends with weight 0 get neither a route nor a cluster, and so need
   no ``endpoint``.

3. One cluster per distinct backend name (see :func:`cluster_name`), built from the backend's ``endpoint``
   (``http://host[:port]`` or ``https://host[:port]``, ports 80 and 443 by default; https gets TLS with SNI
   and, by default, certificate verification against the system CA bundle).

Everything here is pure: :func:`bootstrap` returns a dict, :func:`render` turns it into YAML.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

import yaml

from ipc_router import envoy_upstreams as upstreams
from ipc_router.budgets import BUDGET_DESCRIPTOR_KEY, RLS_DOMAIN, rls_socket_path
from ipc_router.config import SELECTED_BACKEND_HEADER_KEY, Config, parse_endpoint
from ipc_router.credentials import Credential

__all__ = [
    "FAILURE_MODES",
    "NO_ROUTE_BODY",
    "SIDECAR_AUTHORITY",
    "SIDECAR_CLUSTER",
    "BootstrapOptions",
    "EnvoyConfigError",
    "bootstrap",
    "check_options",
    "cluster_list",
    "cluster_name",
    "http_connection_manager",
    "listener",
    "lua_config",
    "lua_filter_source",
    "lua_literal",
    "lua_loader",
    "render",
    "route_list",
]

SIDECAR_CLUSTER = "ipc_router_sidecar"
#: ``:authority`` of the Lua filter's calls to the sidecar (the sidecar ignores it; Envoy requires one).
SIDECAR_AUTHORITY = "ipc-router"
FAILURE_MODES = ("fail_closed", "fail_open")
DEFAULT_LLM_PATHS = ("/v1/chat/completions",)
PASSTHROUGH_CLUSTER = "passthrough"
NO_ROUTE_BODY = '{"error":{"message":"no route for this request","type":"invalid_request_error","code":"no_route"}}'

#: ``sockaddr_un.sun_path`` is 108 bytes on Linux, including the terminating NUL.
_SUN_PATH_MAX = 108
#: Circuit-breaker limits for the sidecar and the backends. Envoy's default (1024) is low for long LLM streams.
_CIRCUIT_BREAKER_LIMIT = 10000
#: System CA bundles, looked for in this order when verifying https backends and no ``tls_ca_file`` is given.
_SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, Alpine, BSDs
)

_TYPE = "@type"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
RLS_CLUSTER = "ipc_router_rls"


class EnvoyConfigError(ValueError):
    """The filter config or the options cannot produce a bootstrap; the message says what and where."""


# --------------------------------------------------------------------------------------------------- Lua text


def lua_filter_source(module: str = "ipc_router") -> str:
    """The text of a Lua module in ``ipc_router/lua/`` (package data: the same file in a checkout, a wheel and
    the image): the filter ``ipc_router``, or the fast path's ``ipc_router_shm`` and ``ipc_router_json``."""
    try:
        return resources.files("ipc_router").joinpath("lua", f"{module}.lua").read_text(encoding="utf-8")
    except OSError as e:
        raise EnvoyConfigError(f"cannot read the Lua filter {module}.lua from the package: {e}") from e


#: The modules the filter requires when the shared-memory fast path is on.
FAST_PATH_MODULES = ("ipc_router_shm", "ipc_router_json")


# fmt: off
_LUA_KEYWORDS = frozenset({
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in", "local",
    "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
})
# fmt: on
_LUA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LUA_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_MAX_DEPTH = 64


def lua_literal(value: Any) -> str:
    """``value`` as a Lua 5.1 (LuaJIT) expression that evaluates to an equal value.

    ``None`` -> ``nil``; booleans; integers; finite floats; strings (double-quoted; ``\\``, ``"``, newline, CR
    and tab get backslash escapes, every other control or non-ASCII byte of the UTF-8 encoding a ``\\ddd``
    decimal escape, so the result is plain printable ASCII on one line); lists and tuples -> array tables;
    mappings with string keys -> tables (``key = v`` for identifiers, ``["key"] = v`` otherwise; ``None``
    values are left out, as Lua tables cannot hold ``nil``). Anything else raises :class:`TypeError`.
    """
    return _lua(value, 0)


def _lua(value: Any, depth: int) -> str:
    if depth > _MAX_DEPTH:
        raise ValueError(f"value nested deeper than {_MAX_DEPTH} levels (a cycle?)")
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} as a Lua literal")
        return repr(value)
    if isinstance(value, str):
        return _lua_string(value)
    if isinstance(value, list | tuple):
        items = []
        for i, item in enumerate(value):
            if item is None:
                raise ValueError(f"None at index {i} of a list: Lua arrays cannot hold nil")
            items.append(_lua(item, depth + 1))
        return "{" + ", ".join(items) + "}"
    if isinstance(value, Mapping):
        fields = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"table keys must be strings, got {type(k).__name__}")
            if v is None:
                continue
            key = k if _LUA_NAME.match(k) and k not in _LUA_KEYWORDS else f"[{_lua_string(k)}]"
            fields.append(f"{key} = {_lua(v, depth + 1)}")
        return "{" + ", ".join(fields) + "}"
    raise TypeError(f"cannot write a {type(value).__name__} as a Lua literal")


def _lua_string(s: str) -> str:
    out = ['"']
    for b in s.encode("utf-8"):
        esc = _LUA_ESCAPES.get(b)
        if esc is not None:
            out.append(esc)
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            # Three digits always, so a following digit cannot extend the escape.
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


def lua_loader(lua_source: str, conf: Mapping[str, Any], modules: Mapping[str, str] | None = None) -> str:
    """The Lua filter's inline code: the module texts registered under ``package.preload`` (the filter as
    ``ipc_router``, plus ``modules`` by name), then one filter object per Lua state built with ``conf``, and the
    two entry points Envoy calls."""
    preload = []
    for name, source in {"ipc_router": lua_source, **(modules or {})}.items():
        if not source.strip():
            what = "the Lua filter source" if name == "ipc_router" else f"the Lua module {name}"
            raise EnvoyConfigError(f"{what} is empty")
        body = source if source.endswith("\n") else source + "\n"
        preload.append(f'package.preload["{name}"] = function(...)\n{body}end\n')
    return (
        "".join(preload) + f'local filter = require("ipc_router").new({lua_literal(conf)})\n'
        "function envoy_on_request(handle) filter:on_request(handle) end\n"
        "function envoy_on_response(handle) filter:on_response(handle) end\n"
    )


# ---------------------------------------------------------------------------------------------------- naming

_CLUSTER_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_CLUSTER_NAME_MAX = 60


def cluster_name(backend_name: str) -> str:
    """The Envoy cluster name for a backend: ``backend_<name>``.

    Characters outside ``[A-Za-z0-9_.-]`` become ``_``; when that (or shortening a very long name) changed the
    name, 8 hex digits of the name's SHA-256 are appended, so ``a/b`` and ``a:b`` get different clusters.
    """
    safe = _CLUSTER_UNSAFE.sub("_", backend_name)
    if safe == backend_name and len(safe) <= _CLUSTER_NAME_MAX and backend_name:
        return f"backend_{safe}"
    digest = hashlib.sha256(backend_name.encode("utf-8")).hexdigest()[:8]
    return f"backend_{safe[:_CLUSTER_NAME_MAX]}_{digest}"


# ------------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    """Everything about a bootstrap that is not in the filter config. ``ipc-router envoy-config``'s options map
    to these fields one to one (``--shm``/``--shm-dir`` together to :attr:`shm_path`).

    :param socket_path: the sidecar's Unix socket (``@name`` for the abstract namespace); under 108 bytes.
    :param listen: ``HOST:PORT`` of the listener (``[::1]:10000`` for IPv6).
    :param admin: ``HOST:PORT`` of Envoy's admin interface; none when ``None``.
    :param failure_mode: what the Lua filter does when the sidecar cannot answer: ``fail_closed`` (503) or
        ``fail_open`` (route to ``fallback_route``, by default the first rule).
    :param fallback_route: the rule ``fail_open`` sends requests to.
    :param lua_source: the Lua module text; :func:`lua_filter_source` when ``None``.
    :param route_timeout_ms: how long the Lua filter waits for the sidecar's ``/route`` answer.
    :param llm_paths: request paths the Lua filter sends to the sidecar.
    :param stream_idle_timeout_s: a request to a backend is reset after this long without any bytes either way.
    :param upstream_timeout_s: total time limit for a backend's whole response; 0 (the default) means none, as
        responses may stream for minutes.
    :param max_request_bytes: per-connection buffer limit of the listener; the Lua filter buffers the whole request
        body, so a larger body gets a 413.
    :param tls_verify: verify https backends' certificates (chain and host name); ``False`` only encrypts.
    :param tls_ca_file: CA bundle for that; by default the first existing system bundle.
    :param access_log: log each request to stdout.
    :param passthrough: ``http(s)://host:port`` that receives every request no rule took (non-LLM paths);
        without it such requests get a JSON 404.
    :param shm_path: the sidecar's shared-memory segment (``ipc_router.fastpath.segment_path``); the filter then
        serves cached routes itself and writes completion records into rings. ``None``: every request asks the
        sidecar over the socket.
    :param sds_dir: where the SDS files for keys read from files go (:func:`ipc_router.envoy_upstreams.sds_files`
        writes them); needed only when a backend's ``auth`` names a file, or with ``cds_path``.
    :param pending_timeout_s: on the fast path, how long after its request a response may end and still be
        recorded; a request forgotten then (its stream was reset) is reported incomplete and counted expired.
    :param cds_path: backend clusters from this file (file-based CDS) instead of the bootstrap; the sidecar
        (``serve --cds-path``) writes it from each config it loads, so new backends need no Envoy restart. All
        credentials are then SDS files in ``sds_dir``.
    :param budget_timeout_ms: with ``tokenBudgets``: how long Envoy's rate limit filter waits for the sidecar's
        answer before it lets the request through (or refuses it, with ``budget_fail_closed``).
    :param budget_fail_closed: with ``tokenBudgets``: when the sidecar's rate limit service cannot answer, refuse
        the request (500) instead of letting it through unchecked (Envoy counts both in ``ratelimit.*``).
    """

    socket_path: str
    listen: str = "127.0.0.1:10000"
    admin: str | None = None
    failure_mode: str = "fail_closed"
    fallback_route: str | None = None
    lua_source: str | None = None
    route_timeout_ms: int = 250
    llm_paths: Sequence[str] = DEFAULT_LLM_PATHS
    stream_idle_timeout_s: float = 300.0
    upstream_timeout_s: float = 0.0
    max_request_bytes: int = 8 * 1024 * 1024
    tls_verify: bool = True
    tls_ca_file: str | None = None
    access_log: bool = False
    passthrough: str | None = None
    shm_path: str | None = None
    sds_dir: str | None = None
    cds_path: str | None = None
    pending_timeout_s: float = 600.0
    budget_timeout_ms: int = 500
    budget_fail_closed: bool = False


def bootstrap(config: Config, options: BootstrapOptions | None = None, /, **kwargs: Any) -> dict[str, Any]:
    """A complete Envoy v3 bootstrap (as a dict) serving ``config`` through the sidecar.

    Give the options as a :class:`BootstrapOptions`, or as its fields by keyword (``socket_path=...``).
    """
    if options is None:
        options = BootstrapOptions(**kwargs)
    elif kwargs:
        raise TypeError("bootstrap() takes a BootstrapOptions or keyword options, not both")
    opts = check_options(config, options)
    lua_code = lua_config(config, opts)
    clusters, backend_clusters = cluster_list(config, opts)
    hcm = http_connection_manager(opts, route_list(config, opts, backend_clusters), lua_code, config)
    out: dict[str, Any] = {"static_resources": {"listeners": [listener(opts, hcm)], "clusters": clusters}}
    if opts.admin is not None:
        out["admin"] = {"address": _socket_address(opts.admin, "admin")}
    creds = upstreams.credentials_by_cluster(config, backend_clusters)
    upstreams.add_to_bootstrap(out, creds, opts.sds_dir, opts.cds_path)
    return out


def check_options(config: Config, options: BootstrapOptions) -> BootstrapOptions:
    """The options checked against each other and the config, with ``fallback_route`` filled in for
    ``fail_open`` and ``llm_paths`` as a tuple. Raises :class:`EnvoyConfigError`."""
    failure_mode, fallback_route = options.failure_mode, options.fallback_route
    if failure_mode not in FAILURE_MODES:
        raise EnvoyConfigError(f"failure_mode must be one of {', '.join(FAILURE_MODES)}, got {failure_mode!r}")
    if failure_mode == "fail_open":
        if not config.rules:
            raise EnvoyConfigError("failure_mode fail_open needs a fallback route, but the config has no rules")
        if fallback_route is None:
            fallback_route = config.rules[0].name
        elif config.rule(fallback_route) is None:
            names = ", ".join(repr(r.name) for r in config.rules)
            raise EnvoyConfigError(f"fallback_route {fallback_route!r} is not a rule of the config (rules: {names})")
    elif fallback_route is not None and config.rule(fallback_route) is None:
        raise EnvoyConfigError(f"fallback_route {fallback_route!r} is not a rule of the config")
    timeout = options.route_timeout_ms
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise EnvoyConfigError(f"route_timeout_ms must be a positive integer, got {timeout!r}")
    if isinstance(options.llm_paths, str):
        raise EnvoyConfigError("llm_paths must be a sequence of paths, not a string")
    paths = tuple(options.llm_paths)
    for p in paths:
        if not isinstance(p, str) or not p.startswith("/"):
            raise EnvoyConfigError(f"llm_paths entries must be paths starting with '/', got {p!r}")
    if options.max_request_bytes <= 0:
        raise EnvoyConfigError(f"max_request_bytes must be positive, got {options.max_request_bytes!r}")
    if config.selected_route_header_key == SELECTED_BACKEND_HEADER_KEY:
        raise EnvoyConfigError(f"selectedRouteHeaderKey must differ from {SELECTED_BACKEND_HEADER_KEY}")
    return replace(options, fallback_route=fallback_route, llm_paths=paths)


def lua_config(config: Config, options: BootstrapOptions) -> str:
    """The Lua filter's inline code: the filter's settings and the modules it needs (see :func:`lua_loader`)."""
    conf: dict[str, Any] = {
        "cluster": SIDECAR_CLUSTER,
        "authority": SIDECAR_AUTHORITY,
        "timeout_ms": options.route_timeout_ms,
        "failure_mode": options.failure_mode,
        "fallback_route": options.fallback_route,
        "route_header": config.selected_route_header_key,
        "backend_header": SELECTED_BACKEND_HEADER_KEY,
        "cluster_header": upstreams.CLUSTER_HEADER,
        "llm_paths": list(options.llm_paths),
    }
    if config.token_budgets:
        conf["budget_headers"] = list(dict.fromkeys(h for b in config.token_budgets for h in b.headers))
    modules: dict[str, str] = {}
    if options.shm_path is not None:
        conf["shm_path"] = options.shm_path
        conf["pending_timeout_s"] = options.pending_timeout_s
        modules = {name: lua_filter_source(name) for name in FAST_PATH_MODULES}
    source = lua_filter_source() if options.lua_source is None else options.lua_source
    return lua_loader(source, conf, modules)


def cluster_list(config: Config, options: BootstrapOptions) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """All clusters (the sidecar's, one per backend with its credential filters, one per failover rule, the
    passthrough; with ``cds_path`` the backend and failover clusters are left to the CDS file), and the cluster
    name of each backend."""
    clusters, _ = upstream_clusters(
        config,
        tls_verify=options.tls_verify,
        tls_ca_file=options.tls_ca_file,
        sds_dir=options.sds_dir,
        all_sds=options.cds_path is not None,
    )
    backend_clusters = {b.name: cluster_name(b.name) for r in config.rules for b in r.backends if b.weight > 0}
    if options.cds_path is not None:
        clusters = []
    if options.passthrough is not None:
        scheme, host, port = _parse_endpoint(options.passthrough, "passthrough")
        ca = (options.tls_ca_file or _system_ca_file()) if scheme == "https" and options.tls_verify else None
        clusters.append(_backend_cluster(PASSTHROUGH_CLUSTER, scheme, host, port, ca))
    sidecar = [_sidecar_cluster(options.socket_path)]
    if config.token_budgets:
        sidecar.append(_rls_cluster(rls_socket_path(options.socket_path)))
    return [*sidecar, *clusters], backend_clusters


def upstream_clusters(
    config: Config,
    *,
    tls_verify: bool = True,
    tls_ca_file: str | None = None,
    sds_dir: str | None = None,
    all_sds: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Credential]]:
    """The backend clusters (with their endpoint metadata and credential filters) and the failover clusters of
    ``config``, and the credentials by cluster name. ``all_sds``: inline keys by SDS files too (file-based CDS,
    where clusters come and go after the bootstrap's static secrets were fixed)."""
    clusters, backend_clusters = _backend_clusters(config, tls_verify=tls_verify, tls_ca_file=tls_ca_file)
    creds = upstreams.credentials_by_cluster(config, backend_clusters)
    by_cluster = {c: b for b, c in backend_clusters.items()}
    for c in clusters:
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = upstreams.endpoint_metadata(
            by_cluster[c["name"]]
        )
        options = upstreams.upstream_options(c["name"], creds.get(c["name"]), sds_dir, all_sds)
        if options is not None:
            c["typed_extension_protocol_options"] = options
    clusters += [
        upstreams.failover_cluster(r, backend_clusters, creds, sds_dir, all_sds) for r in config.rules if r.failover
    ]
    return clusters, creds


def route_list(config: Config, options: BootstrapOptions, backend_clusters: Mapping[str, str]) -> list[dict[str, Any]]:
    """The routes, in match order: ``/v1/models``, failover rules, the cluster header, rule, passthrough,
    ``no_route``."""
    route_header = config.selected_route_header_key
    upstream = {
        "timeout": _duration(options.upstream_timeout_s, "upstream_timeout_s"),
        "idle_timeout": _duration(options.stream_idle_timeout_s, "stream_idle_timeout_s"),
    }
    routes: list[dict[str, Any]] = [
        {
            "name": "models",
            "match": {"path": "/v1/models"},
            "route": {"cluster": SIDECAR_CLUSTER, "timeout": "5s"},
        }
    ]
    # The sidecar and the filter name the cluster: a new rule over existing backends needs no route.
    routes += upstreams.cluster_routes(config, upstream)
    for rule in config.rules:
        live = [b for b in rule.backends if b.weight > 0]
        if not live:
            continue
        target: dict[str, Any]
        if rule.failover:
            name = upstreams.failover_cluster_name(rule.name)
            target = {"cluster": name, "retry_policy": upstreams.retry_policy(rule)}
        elif len(live) == 1:
            target = {"cluster": backend_clusters[live[0].name]}
        else:
            target = {
                "weighted_clusters": {
                    "clusters": [{"name": backend_clusters[b.name], "weight": b.weight} for b in live],
                }
            }
        routes.append(
            {
                "name": rule.name,
                "match": {"prefix": "/", "headers": [_exact(route_header, rule.name)]},
                "route": {**target, **upstream},
                **({"response_headers_to_add": [upstreams.served_header()]} if rule.failover else {}),
            }
        )
    if config.token_budgets:
        # Every route to a backend, and only those: the sidecar's own answers and passthrough traffic cost nothing.
        limits = budget_rate_limits(config)
        for r in routes[1:]:
            r["route"]["rate_limits"] = limits
    if options.passthrough is not None:
        routes.append(
            {"name": "passthrough", "match": {"prefix": "/"}, "route": {"cluster": PASSTHROUGH_CLUSTER, **upstream}}
        )
    routes.append(
        {
            "name": "no_route",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": NO_ROUTE_BODY}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )
    return routes


def budget_rate_limits(config: Config) -> list[dict[str, Any]]:
    """A route's ``rate_limits``: one descriptor per token budget, ``[ipc_router_budget=NAME, HEADER=VALUE...]``,
    that only checks (``hits_addend`` 0): the sidecar charges each request's cost when it has completed. Envoy
    sends no descriptor for a budget whose headers the request lacks."""
    return [
        {
            "actions": [
                {"generic_key": {"descriptor_key": BUDGET_DESCRIPTOR_KEY, "descriptor_value": b.name}},
                *({"request_headers": {"header_name": h, "descriptor_key": h}} for h in b.headers),
            ],
            "hits_addend": {"number": 0},
        }
        for b in config.token_budgets
    ]


def ratelimit_filter(options: BootstrapOptions) -> dict[str, Any]:
    """Envoy's rate limit filter, asking the sidecar's rate limit service (:mod:`ipc_router.rls`)."""
    timeout = _duration(options.budget_timeout_ms / 1000, "budget_timeout_ms")
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            _TYPE: _RATELIMIT,
            "domain": RLS_DOMAIN,
            "timeout": timeout,
            "failure_mode_deny": options.budget_fail_closed,
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": RLS_CLUSTER}, "timeout": timeout},
            },
        },
    }


def http_connection_manager(
    options: BootstrapOptions, routes: Sequence[Mapping[str, Any]], lua_code: str, config: Config | None = None
) -> dict[str, Any]:
    """The HTTP connection manager: the routes, then the Lua filter (and with token budgets, Envoy's rate limit
    filter: it sees the route the Lua filter chose) before Envoy's router."""
    hcm: dict[str, Any] = {
        _TYPE: _HCM,
        "stat_prefix": "ingress_http",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(options.stream_idle_timeout_s, "stream_idle_timeout_s"),
        "route_config": {
            "name": "ipc_router",
            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": list(routes)}],
            # Clusters from a file-based CDS are not known when the static routes are checked.
            **({"validate_clusters": False} if options.cds_path is not None else {}),
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {_TYPE: _LUA, "default_source_code": {"inline_string": lua_code}},
            },
            *([ratelimit_filter(options)] if config is not None and config.token_budgets else []),
            {"name": "envoy.filters.http.router", "typed_config": {_TYPE: _ROUTER}},
        ],
    }
    if options.access_log:
        hcm["access_log"] = [{"name": "envoy.access_loggers.stdout", "typed_config": {_TYPE: _STDOUT_LOG}}]
    return hcm


def listener(options: BootstrapOptions, hcm: Mapping[str, Any]) -> dict[str, Any]:
    """The one listener for client traffic."""
    return {
        "name": "ingress",
        "address": _socket_address(options.listen, "listen"),
        "per_connection_buffer_limit_bytes": options.max_request_bytes,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the Lua code) as ``|`` blocks, so the YAML stays readable."""


# Words some YAML parsers (Envoy's among them) read as booleans although PyYAML writes them unquoted.
_AMBIGUOUS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else ('"' if data.lower() in _AMBIGUOUS else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def render(bootstrap_dict: Mapping[str, Any]) -> str:
    """The bootstrap as YAML (``yaml.safe_dump`` rules, keys in the order they were built)."""
    text = yaml.dump(_plain(bootstrap_dict), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return str(text)


def _plain(v: Any) -> Any:
    # safe_dump accepts only plain dicts and lists.
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _exact(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "string_match": {"exact": value}}


def _duration(seconds: float, what: str) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise EnvoyConfigError(f"{what} must be a number of seconds >= 0, got {seconds!r}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.9f}".rstrip("0") + "s"


def _socket_address(hostport: str, what: str) -> dict[str, Any]:
    host, sep, port_text = hostport.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise EnvoyConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:10000 or [::1]:10000), got {hostport!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise EnvoyConfigError(f"{what} host must be an IP address, got {host!r} in {hostport!r}") from None
    return {"socket_address": {"address": host, "port_value": int(port_text)}}


def _sidecar_cluster(socket_path: str) -> dict[str, Any]:
    if not socket_path:
        raise EnvoyConfigError("socket_path must not be empty")
    size = len(os.fsencode(socket_path))
    if size >= _SUN_PATH_MAX:
        raise EnvoyConfigError(
            f"socket_path is {size} bytes, but a Unix socket path must be shorter than {_SUN_PATH_MAX}: {socket_path!r}"
        )
    limit = _CIRCUIT_BREAKER_LIMIT
    return {
        "name": SIDECAR_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": SIDECAR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": limit, "max_pending_requests": limit, "max_requests": limit, "max_retries": 3}
            ]
        },
    }


def _rls_cluster(path: str) -> dict[str, Any]:
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise EnvoyConfigError(f"the rate limit service's socket path {path!r} (the socket path + '.rls') is too long")
    return {
        "name": RLS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": RLS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _backend_clusters(
    config: Config, *, tls_verify: bool, tls_ca_file: str | None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The backend clusters, and the cluster name of each backend name."""
    clusters: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # backend name -> cluster name
    owners: dict[str, str] = {}  # cluster name -> backend name
    endpoints: dict[str, tuple[str, str]] = {}  # backend name -> (endpoint, where)
    ca_file: str | None = None
    for i, rule in enumerate(config.rules):
        for j, b in enumerate(rule.backends):
            if b.weight <= 0:
                continue
            where = f"rules[{i}].backends[{j}]"
            if not b.endpoint:
                raise EnvoyConfigError(
                    f"{where}.endpoint is required to generate clusters "
                    f"(rule {rule.name!r}, backend {b.name!r}); give it as http://host:port or https://host:port"
                )
            if b.name in endpoints:
                first, first_where = endpoints[b.name]
                if first != b.endpoint:
                    raise EnvoyConfigError(
                        f"{where}.endpoint: backend {b.name!r} has endpoint {b.endpoint!r} here but {first!r} "
                        f"at {first_where}; one backend name is one cluster"
                    )
                continue
            endpoints[b.name] = (b.endpoint, where)
            cname = cluster_name(b.name)
            if cname in owners or cname == SIDECAR_CLUSTER:
                raise EnvoyConfigError(
                    f"{where}.name: backends {owners.get(cname, SIDECAR_CLUSTER)!r} and {b.name!r} map to the same "
                    f"Envoy cluster name {cname!r}; rename one"
                )
            owners[cname] = b.name
            names[b.name] = cname
            scheme, host, port = _parse_endpoint(b.endpoint, where)
            if scheme == "https" and tls_verify and ca_file is None:
                ca_file = tls_ca_file or _system_ca_file()
            clusters.append(_backend_cluster(cname, scheme, host, port, ca_file if tls_verify else None))
    return clusters, names


def _parse_endpoint(endpoint: str, where: str) -> tuple[str, str, int]:
    try:
        e = parse_endpoint(endpoint)
    except ValueError as err:
        raise EnvoyConfigError(f"{where}.endpoint: {err}") from None
    return e.scheme, e.host, e.port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _system_ca_file() -> str:
    for path in _SYSTEM_CA_FILES:
        if os.path.isfile(path):
            return path
    raise EnvoyConfigError(
        "an https backend needs a CA bundle to verify its certificate, and none of "
        f"{', '.join(_SYSTEM_CA_FILES)} exists; pass tls_ca_file, or tls_verify=False to skip verification"
    )


def _backend_cluster(name: str, scheme: str, host: str, port: int, ca_file: str | None) -> dict[str, Any]:
    ip = _is_ip(host)
    limit = _CIRCUIT_BREAKER_LIMIT
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if ip else "STRICT_DNS",
        "connect_timeout": "5s",
    }
    if not ip:
        # AUTO would try IPv6 first; "localhost" backends usually listen on 127.0.0.1.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
        ],
    }
    cluster["circuit_breakers"] = {
        "thresholds": [{"max_connections": limit, "max_pending_requests": limit, "max_requests": limit}]
    }
    if scheme == "https":
        tls: dict[str, Any] = {_TYPE: _TLS}
        if not ip:
            tls["sni"] = host  # SNI carries host names only (RFC 6066)
        if ca_file is not None:
            tls["common_tls_context"] = {
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS" if ip else "DNS", "matcher": {"exact": host}}
                    ],
                }
            }
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster
