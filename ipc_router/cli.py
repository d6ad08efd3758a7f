"""``ipc-router``: serve, check-config, route, envoy-config, mock-backend, health.

Every ``serve`` option maps to one field of :class:`~ipc_router.settings.Settings` and can also be set by the
environment variable ``IPC_ROUTER_<OPTION>`` (``--metrics-addr`` → ``IPC_ROUTER_METRICS_ADDR``); a flag wins
over the variable, which wins over the config file's ``server:`` section (:mod:`ipc_router.settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ipc_router import extensions
from ipc_router.config import Config, ConfigError, load_config
from ipc_router.plugins import METRICS_GROUP, ROUTERS_GROUP, PluginError, load_plugin
from ipc_router.router import Decision, Routing
from ipc_router.server import load_routing, read_config, run
from ipc_router.settings import Settings, defaults, resolve, value_type

__all__ = ["main"]

_HELP = {
    "socket": "Unix socket path to listen on (under 108 bytes)",
    "config": "AI Gateway filter config YAML; watched and reloaded on change; missing file = no rules",
    "router": "custom router factory, 'module:attr' or an entry-point name (ipc_router.routers)",
    "metrics": "custom metrics factory, 'module:attr' or an entry-point name (ipc_router.metrics)",
    "metrics_addr": "serve Prometheus /metrics on HOST:PORT",
    "otlp_endpoint": "push metrics by OTLP/HTTP to this base URL (default: $OTEL_EXPORTER_OTLP_ENDPOINT)",
    "otlp_interval": "seconds between OTLP pushes",
    "metrics_request_header_attributes": "request headers to add to GenAI metrics, 'x-team-id:team_id,...'",
    "socket_mode": "permissions of the socket file, octal",
    "router_timeout": "seconds an async custom router may take before the request gets a 504; keep it below the "
    "Lua filter's timeout_ms (250 ms by default), or the filter gives up first and answers 503",
    "request_ttl": "seconds a routed request waits for its completion before it is expired",
    "max_body": "largest request body in bytes (413 beyond)",
    "max_header": "largest request head in bytes (431 beyond)",
    "max_headers": "most header fields in a request (431 beyond)",
    "max_pipeline": "most answers queued on one connection behind a slow one (503 and close beyond)",
    "max_connections": "most open connections (503 and close beyond)",
    "allow_uid": "admit only peers with these uids (SO_PEERCRED), names or numbers, repeatable or comma list",
    "allow_gid": "admit only peers with these primary gids (SO_PEERCRED), names or numbers, repeatable or comma list",
    "cache_size": "route cache entries",
    "reload_interval": "seconds between config file checks",
    "drain_timeout": "seconds to let in-flight requests finish on SIGTERM",
    "app_dir": "directory searched first for --router/--metrics modules, as uvicorn's --app-dir",
    "shm": "shared-memory fast path: cached routes and completion records without a socket round trip",
    "shm_dir": "directory of the shared-memory segment (a tmpfs; in a pod, the emptyDir shared with Envoy)",
    "shm_drain_interval": "seconds between drains of the completion rings (empty rings back off to 8x)",
    "cds_path": "write Envoy's backend clusters to this file on every config load (file-based CDS; the bootstrap "
    "from envoy-config --cds-path reads it): new backends without an Envoy restart",
    "sds_dir": "with --cds-path: directory of the clusters' credential SDS files (as envoy-config --sds-dir)",
}
_APP_DIR_HELP = _HELP["app_dir"] + " (default: the working directory)"


class _Extend(argparse.Action):
    """Repeatable list option: the first use replaces the default (from the environment), later ones add."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        seen = "_given_" + self.dest
        current = getattr(namespace, self.dest) if getattr(namespace, seen, False) else ()
        setattr(namespace, self.dest, (*current, *values))
        setattr(namespace, seen, True)


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    # Each option starts from the environment over the built-in default (ipc_router.settings decides the order).
    start = defaults(os.environ)
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default: Any = start.get(f.name)
        kind = value_type(f.name)
        action: Any = _Extend if f.name in ("allow_uid", "allow_gid") else "store"
        if isinstance(f.default, bool):
            help_ = _HELP.get(f.name, "") + f" (default: {'on' if default else 'off'})"
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        required = f.name == "socket" and default is None
        shown = f"{default:04o}" if f.name == "socket_mode" and isinstance(default, int) else default
        has_default = default is not None and f.name != "socket" and default != ()
        help_ = _HELP.get(f.name, "") + (f" (default: {shown})" if has_default else "")
        metavar = "OCTAL" if f.name == "socket_mode" else None
        p.add_argument(
            flag, dest=f.name, type=kind, default=default, required=required, help=help_, metavar=metavar, action=action
        )


def serve_settings(args: argparse.Namespace) -> tuple[Settings, Config]:
    """``serve``'s settings (flags over the environment over the config's ``server:`` section over the
    defaults) and the config file, read once."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    config = read_config(values["config"])
    return resolve(values, config.server), config


def _serve(args: argparse.Namespace) -> int:
    try:
        settings, config = serve_settings(args)
        run(settings, config)
    except (ConfigError, PluginError, ValueError, OSError) as e:
        print(f"ipc-router: {e}", file=sys.stderr)
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """Errors (exit 1) and warnings: unknown keys (errors with ``--strict``), what ``envoy-config`` will need,
    and whether the ``server:`` section's plugins import."""
    try:
        config = load_config(args.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    errors: list[str] = []
    warnings: list[str] = []
    (errors if args.strict else warnings).extend(f"{args.path}: {w}" for w in config.warnings)
    for i, rule in enumerate(config.rules):
        for j, b in enumerate(rule.backends):
            if b.weight > 0 and b.endpoint is None:
                warnings.append(
                    f"{args.path}: rules[{i}].backends[{j}]: backend {b.name!r} of rule {rule.name!r} has no "
                    "endpoint: ipc-router envoy-config needs one to generate its cluster"
                )
    router: extensions.NewCustomRouterFn | None = None
    for spec, group, key in ((config.server.router, ROUTERS_GROUP, "router"),
                             (config.server.metrics, METRICS_GROUP, "metrics")):  # fmt: skip
        if spec is None:
            continue
        try:
            loaded = load_plugin(spec, group, args.app_dir)
        except PluginError as e:
            errors.append(f"{args.path}: server.{key}: {e}")
            continue
        if key == "router":
            router = loaded
    try:
        Routing(config, router)
    except Exception as e:  # the config's router factory, called as the sidecar will
        errors.append(f"{args.path}: server.router: the factory raised {type(e).__name__}: {e}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if errors:
        return 1
    backends = sum(len(r.backends) for r in config.rules)
    budgets = f", {len(config.token_budgets)} token budgets" if config.token_budgets else ""
    print(f"{args.path}: ok ({len(config.rules)} rules, {backends} backends{budgets}, {len(warnings)} warnings)")
    return 0


def _route(args: argparse.Namespace) -> int:
    try:
        factory = load_plugin(args.router, ROUTERS_GROUP, args.app_dir) if args.router else extensions.new_custom_router
        routing = load_routing(args.config, factory, 1)
    except (ConfigError, PluginError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"error: bad header {h!r}; expected 'name: value'", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    if args.model is not None:
        headers[routing.config.model_name_header_key] = args.model
    try:
        result = routing.route(headers)
        decision = result if isinstance(result, Decision) else _run_async(result)
    except extensions.NoMatchingRuleError as e:
        print(f"no match: {e}")
        return 1
    print(f"rule: {decision.rule.name}")
    print(f"backend: {decision.backend.name if decision.backend else '-'}")
    return 0


def _run_async(awaitable: Any) -> Decision:
    async def wait() -> Decision:
        result: Decision = await awaitable
        return result

    return asyncio.run(wait()) if inspect.isawaitable(awaitable) else awaitable


def _envoy_config(args: argparse.Namespace) -> int:
    from ipc_router.envoy_config import DEFAULT_LLM_PATHS, BootstrapOptions, bootstrap, render, upstream_clusters
    from ipc_router.envoy_upstreams import write_cds, write_sds_files
    from ipc_router.fastpath import segment_path

    try:
        config = load_config(args.config)
        if args.sds_dir is not None:
            write_sds_files(config, args.sds_dir, all_sds=args.cds_path is not None)
        options = BootstrapOptions(
            socket_path=args.socket,
            listen=args.listen,
            admin=args.admin,
            failure_mode=args.failure_mode,
            fallback_route=args.fallback_route,
            passthrough=args.passthrough,
            llm_paths=args.llm_path or DEFAULT_LLM_PATHS,
            route_timeout_ms=args.route_timeout_ms,
            shm_path=segment_path(args.socket, args.shm_dir) if args.shm else None,
            sds_dir=args.sds_dir,
            cds_path=args.cds_path,
            budget_timeout_ms=args.budget_timeout_ms,
            budget_fail_closed=args.budget_fail_closed,
        )
        doc = bootstrap(config, options)
        if args.cds_path is not None:
            write_cds(args.cds_path, upstream_clusters(config, sds_dir=args.sds_dir, all_sds=True)[0])
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render(doc))
    return 0


def _mock_backend(args: argparse.Namespace) -> int:
    from ipc_router.tools import mock_backend

    return mock_backend.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipc-router", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default=os.environ.get("IPC_ROUTER_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    _add_serve_options(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check-config", help="validate a filter config; exit 1 with the error",
        description="Validate a filter config: errors exit 1; unknown keys, backends without an endpoint (which "
        "envoy-config needs) are warnings; the server: section's plugins must import.",
    )  # fmt: skip
    check.add_argument("path")
    check.add_argument("--strict", action="store_true", help="unknown keys are errors")
    check.add_argument("--app-dir", default=".", help=_APP_DIR_HELP)
    check.set_defaults(func=_check_config)

    route = sub.add_parser("route", help="print the rule and backend a request would get")
    route.add_argument("--config", required=True)
    route.add_argument("-H", "--header", action="append", default=[], help="'name: value', repeatable")
    route.add_argument("--model", help="the body's model (sets the model header)")
    route.add_argument("--router", help="custom router factory, 'module:attr'")
    route.add_argument("--app-dir", default=".", help=_APP_DIR_HELP)
    route.set_defaults(func=_route)

    envoy = sub.add_parser(
        "envoy-config", help="print an Envoy bootstrap for a config", formatter_class=_DefaultsFormatter
    )
    envoy.add_argument("--config", required=True, help="the filter config whose rules and backends get routes")
    envoy.add_argument("--socket", required=True, help="the sidecar's Unix socket path")
    envoy.add_argument("--listen", default="127.0.0.1:10000", help="HOST:PORT for client traffic")
    envoy.add_argument("--admin", help="HOST:PORT for Envoy's admin interface (default: none, no admin interface)")
    envoy.add_argument("--failure-mode", choices=["fail_closed", "fail_open"], default="fail_closed",
                       help="when the sidecar cannot answer: 503, or the fallback rule")  # fmt: skip
    envoy.add_argument("--fallback-route", help="rule used by fail_open when the sidecar is unavailable")
    envoy.add_argument("--passthrough", help="http://host:port for requests no rule takes (default: JSON 404)")
    envoy.add_argument(
        "--llm-path", action="append", help="a path the filter routes through the sidecar, repeatable "
        "(default: /v1/chat/completions); other paths pass through untouched",
    )  # fmt: skip
    envoy.add_argument("--route-timeout-ms", type=int, default=250, help="how long the filter waits for /route")
    envoy.add_argument(
        "--shm", action=argparse.BooleanOptionalAction, default=True,
        help="the shared-memory fast path (as the sidecar's --shm; default: on)",
    )  # fmt: skip
    envoy.add_argument("--shm-dir", default="/dev/shm", help="as the sidecar's --shm-dir (default: /dev/shm)")
    envoy.add_argument(
        "--sds-dir", help="directory to write the SDS files for keys read from files (apiKey: {filename: ...}) into; "
        "needed only then, and must be readable by Envoy at that path",
    )  # fmt: skip
    envoy.add_argument(
        "--cds-path", help="backend clusters from this file (file-based CDS), written now and by the sidecar "
        "(serve --cds-path, same --sds-dir) on every config load: new backends without an Envoy restart",
    )  # fmt: skip
    envoy.add_argument(
        "--budget-timeout-ms", type=int, default=500,
        help="with tokenBudgets: how long Envoy's rate limit filter waits for the sidecar's answer",
    )  # fmt: skip
    envoy.add_argument(
        "--budget-fail-closed", action="store_true",
        help="with tokenBudgets: refuse requests (500) when the sidecar cannot answer in time, instead of "
        "letting them through unchecked",
    )  # fmt: skip
    envoy.set_defaults(func=_envoy_config)

    from ipc_router.tools.mock_backend import DESCRIPTION, add_arguments

    mock = sub.add_parser(
        "mock-backend", help="run a mock OpenAI-compatible LLM backend (try the gateway without an LLM)",
        description=DESCRIPTION, formatter_class=_DefaultsFormatter,
    )  # fmt: skip
    add_arguments(mock, log_level=False)  # the top-level --log-level covers it
    mock.set_defaults(func=_mock_backend)

    from ipc_router import health  # standard library only; probes call it as `python -m ipc_router.health`

    probe = sub.add_parser(
        "health", help="GET /healthz on the sidecar's socket; exit 1 unless it answers 200",
        formatter_class=_DefaultsFormatter,
    )  # fmt: skip
    health.add_arguments(probe)
    probe.set_defaults(func=health.run)
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that have one, and nothing for those whose help already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
