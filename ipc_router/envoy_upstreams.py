"""What the bootstrap adds per backend and per failover rule: upstream credentials, the cluster-header routes,
failover clusters. Pure functions returning Envoy v3 dicts; :mod:`ipc_router.envoy_config` calls them.

Envoy does all of it with its own filters; nothing here is on the request path in Python or Lua:

* **Credentials** (:mod:`ipc_router.credentials`): an *upstream* HTTP filter chain on the backend's cluster
  (``HttpProtocolOptions.http_filters``): ``header_mutation`` removes the client's ``authorization``,
  ``api-key`` and ``x-api-key``; ``credential_injector`` (generic credential, ``header_value_prefix: "Bearer "``)
  sets ``authorization`` from an SDS secret; ``upstream_codec`` ends the chain. An inline key is a static secret
  (redacted in ``/config_dump``); a key file is read by file-based SDS (a small resource file written next to
  the bootstrap, :func:`sds_files`, naming the key file), which Envoy re-reads when the key file is renamed over
  (or anything is moved in its directory: Kubernetes swaps its ``..data`` link).
* **Live routing**: the sidecar (and the filter on a fast-path hit) sets ``x-ai-eg-selected-cluster`` to the
  cluster's name and one route sends it there with ``cluster_header``, so a new rule over existing backends needs
  no new route. The filter strips the header from clients.
* **Failover** (a rule whose backends have several ``priority`` values): an aggregate cluster over the backends'
  clusters in priority order, and a route for it with a retry policy (connect failure, reset, 5xx, 429) that
  moves to the next priority (``previous_priorities``). Envoy retries only before it forwards response headers,
  so a stream that began is never retried. An aggregate cluster runs *its own* upstream filters, not those of the
  cluster that served, so its chain picks the credential by the serving host's metadata (``ipc_router.backend``,
  set on every backend endpoint) with a ``composite`` filter. The route adds ``x-ai-eg-served-backend`` (the
  same metadata) to the response: the filter reads it, removes it, and reports it with the completion.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ipc_router.config import Backend, Config, RouteRule
from ipc_router.credentials import Credential

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS",
    "CLUSTER_HEADER",
    "METADATA_NAMESPACE",
    "SERVED_BACKEND_HEADER",
    "add_to_bootstrap",
    "cluster_map",
    "cluster_routes",
    "credentials_by_cluster",
    "endpoint_metadata",
    "failover_cluster",
    "failover_cluster_name",
    "file_config_source",
    "retry_policy",
    "sds_files",
    "static_secrets",
    "target_cluster",
    "upstream_options",
    "write_cds",
    "write_sds_files",
]

CLUSTER_HEADER = "x-ai-eg-selected-cluster"
SERVED_BACKEND_HEADER = "x-ai-eg-served-backend"
METADATA_NAMESPACE = "ipc_router"
#: What a client may send as its own key; never forwarded to a backend that has credentials.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
_FAILOVER_PREFIX = "failover_"
_CRED_HEADER = "x-ipc-router-credential"  # internal to a failover cluster's upstream chain; removed before sending

_TYPE = "@type"
_HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_INJECTOR = "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector"
_GENERIC = "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic"
_CODEC = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_MATCHER = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
_COMPOSITE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
_EXECUTE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
_HEADER_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
_AGGREGATE = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
_PREVIOUS_PRIORITIES = (
    "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
)


# ------------------------------------------------------------------------------------------------------ naming


def failover_cluster_name(rule_name: str) -> str:
    """``failover_<rule>``, sanitised like backend clusters (never equal to one: those start ``backend_``)."""
    from ipc_router.envoy_config import cluster_name

    return _FAILOVER_PREFIX + cluster_name(rule_name).removeprefix("backend_")


def target_cluster(rule: RouteRule, backend: Backend | None) -> str | None:
    """The cluster a decision goes to: the rule's failover cluster, else the backend's; ``None`` without one."""
    from ipc_router.envoy_config import cluster_name

    if rule.failover:
        return failover_cluster_name(rule.name)
    return cluster_name(backend.name) if backend is not None else None


def failover_order(rule: RouteRule) -> list[Backend]:
    return sorted((b for b in rule.backends if b.weight > 0), key=lambda b: b.priority)


def add_to_bootstrap(
    out: dict[str, Any], creds: Mapping[str, Credential], sds_dir: str | None, cds_path: str | None
) -> None:
    """The bootstrap's parts for credentials and file-based CDS: static secrets, ``dynamic_resources``, a node."""
    from ipc_router.envoy_config import EnvoyConfigError

    if creds and cds_path is None:
        out["static_resources"]["secrets"] = static_secrets(creds)
    if cds_path is not None:
        if sds_dir is None:
            raise EnvoyConfigError("cds_path needs sds_dir (credentials of clusters added later are SDS files)")
        out["dynamic_resources"] = {"cds_config": file_config_source(cds_path)}
    if cds_path is not None or any(c.source == "file" for c in creds.values()):
        # File-based xDS needs a node identity; any will do for local files.
        out["node"] = {"id": "ipc-router", "cluster": "ipc-router"}


def cluster_map(config: Config) -> dict[tuple[str, str | None], str | None]:
    """(rule, backend or ``None``) -> the cluster header's value, for every decision ``config`` can make."""
    out: dict[tuple[str, str | None], str | None] = {}
    for rule in config.rules:
        out[rule.name, None] = failover_cluster_name(rule.name) if rule.failover else None
        for b in rule.backends:
            out[rule.name, b.name] = target_cluster(rule, b)
    return out


def endpoint_metadata(backend_name: str) -> dict[str, Any]:
    """Set on every backend endpoint: which backend a host belongs to (read by failover clusters)."""
    return {"filter_metadata": {METADATA_NAMESPACE: {"backend": backend_name}}}


# ------------------------------------------------------------------------------------------------- credentials


def credentials_by_cluster(config: Config, names: Mapping[str, str]) -> dict[str, Credential]:
    """The credential of each backend cluster that has one (``names``: backend name -> cluster name). One backend
    name is one cluster, so its first ``auth`` wins; two different ones are an error."""
    out: dict[str, Credential] = {}
    for i, rule in enumerate(config.rules):
        for j, b in enumerate(rule.backends):
            cname = names.get(b.name)
            if cname is None or b.credential is None:
                continue
            first = out.setdefault(cname, b.credential)
            if first != b.credential:
                from ipc_router.envoy_config import EnvoyConfigError

                raise EnvoyConfigError(
                    f"rules[{i}].backends[{j}].auth: backend {b.name!r} has other credentials here than in an "
                    "earlier rule; one backend name is one cluster"
                )
    return out


def _secret_name(cluster: str) -> str:
    return f"credential_{cluster}"


def static_secrets(creds: Mapping[str, Credential]) -> list[dict[str, Any]]:
    """``static_resources.secrets`` for the inline keys."""
    return [
        {"name": _secret_name(c), "generic_secret": {"secret": {"inline_string": cred.value}}}
        for c, cred in creds.items()
        if cred.source == "inline"
    ]


def _sds_path(sds_dir: str, cluster: str) -> str:
    return os.path.join(sds_dir, f"{_secret_name(cluster)}.yaml")


def sds_files(creds: Mapping[str, Credential], sds_dir: str, all_sds: bool = False) -> dict[str, str]:
    """The SDS resource files for key files (path -> YAML): they name the key file and hold no secret. With
    ``all_sds`` also for inline keys (file-based CDS): those files hold the key, like the bootstrap would."""
    out: dict[str, str] = {}
    for c, cred in creds.items():
        if cred.source == "file":
            data: dict[str, str] = {"filename": cred.value}
        elif all_sds:
            data = {"inline_string": cred.value}
        else:
            continue
        secret = {_TYPE: _SECRET, "name": _secret_name(c), "generic_secret": {"secret": data}}
        out[_sds_path(sds_dir, c)] = yaml.safe_dump({"resources": [secret]}, sort_keys=False)
    return out


def file_config_source(path: str) -> dict[str, Any]:
    """An xDS config source reading ``path``, re-read when anything is renamed into its directory."""
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": os.path.dirname(os.path.abspath(path))}},
        "resource_api_version": "V3",
    }


def write_cds(path: str, clusters: Sequence[Mapping[str, Any]]) -> None:
    """The file-based CDS resource file, replaced atomically (Envoy reacts to the rename)."""
    resources = [{_TYPE: "type.googleapis.com/envoy.config.cluster.v3.Cluster", **c} for c in clusters]
    _replace(path, yaml.safe_dump({"resources": resources}, sort_keys=False))


def _replace(path: str, text: str, mode: int = 0o640) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_sds_files(config: Config, sds_dir: str, all_sds: bool = False) -> list[str]:
    """Write :func:`sds_files` for ``config`` into ``sds_dir`` (each by an atomic rename: Envoy may be watching;
    mode 0640: some hold a key); returns the paths."""
    from ipc_router.envoy_config import cluster_name

    names = {b.name: cluster_name(b.name) for r in config.rules for b in r.backends if b.weight > 0}
    written = []
    for path, text in sds_files(credentials_by_cluster(config, names), sds_dir, all_sds).items():
        _replace(path, text)
        written.append(path)
    return written


def _secret_ref(cluster: str, cred: Credential, sds_dir: str | None, all_sds: bool) -> dict[str, Any]:
    if cred.source == "inline" and not all_sds:
        return {"name": _secret_name(cluster)}
    if sds_dir is None:
        from ipc_router.envoy_config import EnvoyConfigError

        raise EnvoyConfigError(
            f"cluster {cluster!r}: a key read from a file needs sds_dir (envoy-config --sds-dir): the directory "
            "for the SDS files that point Envoy at it"
        )
    # Watch the key file's directory (Kubernetes swaps a `..data` link there), or the SDS file's own.
    watched = cred.value if cred.source == "file" else _sds_path(sds_dir, cluster)
    source = {
        "path_config_source": {
            "path": _sds_path(sds_dir, cluster),
            "watched_directory": {"path": os.path.dirname(os.path.abspath(watched))},
        },
        "resource_api_version": "V3",
    }
    return {"name": _secret_name(cluster), "sds_config": source}


def _injector(cluster: str, cred: Credential, sds_dir: str | None, all_sds: bool = False) -> dict[str, Any]:
    generic = {
        _TYPE: _GENERIC,
        "credential": _secret_ref(cluster, cred, sds_dir, all_sds),
        "header": cred.header,
        "header_value_prefix": cred.prefix,
    }
    return {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": {
            _TYPE: _INJECTOR,
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": generic},
        },
    }


def _mutation(remove: Sequence[str], set_headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    mutations: list[dict[str, Any]] = [{"remove": h} for h in remove]
    for k, v in (set_headers or {}).items():
        mutations.append({"append": {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}})
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {_TYPE: _HEADER_MUTATION, "mutations": {"request_mutations": mutations}},
    }


_UPSTREAM_CODEC = {"name": "envoy.filters.http.upstream_codec", "typed_config": {_TYPE: _CODEC}}


def _protocol_options(filters: list[dict[str, Any]]) -> dict[str, Any]:
    # HTTP/1.1 toward backends, as without these options.
    return {
        _HPO: {
            _TYPE: f"type.googleapis.com/{_HPO}",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [*filters, _UPSTREAM_CODEC],
        }
    }


def upstream_options(
    cluster: str, cred: Credential | None, sds_dir: str | None, all_sds: bool = False
) -> dict[str, Any] | None:
    """``typed_extension_protocol_options`` of a backend cluster with credentials; ``None`` without."""
    if cred is None:
        return None
    return _protocol_options([_mutation(CLIENT_CREDENTIAL_HEADERS), _injector(cluster, cred, sds_dir, all_sds)])


# ---------------------------------------------------------------------------------------------------- failover


def failover_cluster(
    rule: RouteRule,
    names: Mapping[str, str],
    creds: Mapping[str, Credential],
    sds_dir: str | None,
    all_sds: bool = False,
) -> dict[str, Any]:
    """The aggregate cluster of a failover rule: its backends' clusters in priority order."""
    order = failover_order(rule)
    clusters = [names[b.name] for b in order]
    cluster: dict[str, Any] = {
        "name": failover_cluster_name(rule.name),
        "connect_timeout": "5s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {_TYPE: _AGGREGATE, "clusters": clusters}},
    }
    with_creds = [(b.name, names[b.name]) for b in order if names[b.name] in creds]
    if with_creds:
        # The serving host's backend name -> that backend's credential_injector. Client credentials reach none
        # of this rule's backends once one of them has its own.
        actions = {
            backend: {
                "action": {
                    "name": f"credential/{backend}",
                    "typed_config": {
                        _TYPE: _EXECUTE,
                        "typed_config": _injector(cname, creds[cname], sds_dir, all_sds),
                    },
                }
            }
            for backend, cname in with_creds
        }
        composite = {
            "name": "envoy.filters.http.composite",
            "typed_config": {
                _TYPE: _MATCHER,
                "extension_config": {"name": "composite", "typed_config": {_TYPE: _COMPOSITE}},
                "xds_matcher": {
                    "matcher_tree": {
                        "input": {
                            "name": "backend",
                            "typed_config": {_TYPE: _HEADER_INPUT, "header_name": _CRED_HEADER},
                        },
                        "exact_match_map": {"map": actions},
                    }
                },
            },
        }
        backend_of_host = {_CRED_HEADER: f"%UPSTREAM_METADATA({METADATA_NAMESPACE}:backend)%"}
        cluster["typed_extension_protocol_options"] = _protocol_options(
            [_mutation(CLIENT_CREDENTIAL_HEADERS, backend_of_host), composite, _mutation([_CRED_HEADER])]
        )
    return cluster


def retry_policy(rule: RouteRule) -> dict[str, Any]:
    return {
        # "5xx" also covers connect failures and resets; they are named for the reader.
        "retry_on": "connect-failure,reset,5xx,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": len(failover_order(rule)) - 1,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {_TYPE: _PREVIOUS_PRIORITIES, "update_frequency": 1},
        },
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
    }


def served_header() -> dict[str, Any]:
    """``response_headers_to_add`` entry of failover routes: the backend of the host that answered."""
    return {
        "header": {"key": SERVED_BACKEND_HEADER, "value": f"%UPSTREAM_METADATA({METADATA_NAMESPACE}:backend)%"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def cluster_routes(config: Config, upstream: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One route per failover rule (its retry policy), then one for every other cluster the header names."""
    routes: list[dict[str, Any]] = []
    served = served_header()
    for rule in config.rules:
        if not rule.failover:
            continue
        name = failover_cluster_name(rule.name)
        routes.append(
            {
                "name": f"failover/{rule.name}",
                "match": {"prefix": "/", "headers": [{"name": CLUSTER_HEADER, "string_match": {"exact": name}}]},
                "route": {"cluster": name, **upstream, "retry_policy": retry_policy(rule)},
                "response_headers_to_add": [served],
            }
        )
    routes.append(
        {
            "name": "by_cluster",
            "match": {"prefix": "/", "headers": [{"name": CLUSTER_HEADER, "present_match": True}]},
            "route": {"cluster_header": CLUSTER_HEADER, **upstream},
            # Only failover routes say who served; a backend cannot pretend to be another one.
            "response_headers_to_remove": [SERVED_BACKEND_HEADER],
        }
    )
    return routes
