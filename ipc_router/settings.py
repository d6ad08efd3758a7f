"""The sidecar's settings and where each comes from: flag > environment > the config file's ``server:`` section >
built-in default. This module is the one place that order is decided.

* :class:`Settings`: everything ``ipc-router serve`` takes; each field is one command-line option
  (``--metrics-addr``) and one environment variable (``IPC_ROUTER_METRICS_ADDR``).
* :func:`defaults`: the environment over the built-in defaults: what the command line starts from (and what
  ``--help`` shows); a flag given replaces its field.
* :func:`resolve`: the config file's ``server:`` section fills the fields (of :data:`FROM_CONFIG`) that neither a
  flag nor the environment set.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ipc_router.config import ServerSettings
from ipc_router.protocol import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS

__all__ = ["ENV_PREFIX", "FROM_CONFIG", "Settings", "defaults", "env_var", "resolve", "value_type"]

ENV_PREFIX = "IPC_ROUTER_"
#: The settings the config file's ``server:`` section may give (the fields of :class:`ServerSettings`).
FROM_CONFIG = tuple(f.name for f in dataclasses.fields(ServerSettings))
_TRUE = ("1", "true", "yes", "on")


@dataclass
class Settings:
    """Everything ``ipc-router serve`` takes; each field is one command-line option."""

    socket: str
    config: str | None = None
    router: str | None = None
    metrics: str | None = None
    metrics_addr: str | None = None
    otlp_endpoint: str | None = None
    otlp_interval: float = 10.0
    metrics_request_header_attributes: str | None = None
    socket_mode: int = 0o660
    router_timeout: float = 0.2
    request_ttl: float = 600.0
    max_body: int = DEFAULT_MAX_BODY_BYTES
    max_header: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_pipeline: int = 128
    #: As many as the generated bootstrap's circuit breaker lets Envoy open to the sidecar (envoy_config).
    max_connections: int = 10000
    allow_uid: tuple[int, ...] = ()
    allow_gid: tuple[int, ...] = ()
    cache_size: int = 4096
    reload_interval: float = 0.5
    drain_timeout: float = 10.0
    app_dir: str = "."
    shm: bool = True
    shm_dir: str = "/dev/shm"
    shm_drain_interval: float = 0.002
    #: File-based CDS: the backend clusters file Envoy reads (``envoy-config --cds-path``), rewritten on every load.
    cds_path: str | None = None
    #: Where the SDS files of the clusters' credentials go (as ``envoy-config --sds-dir``).
    sds_dir: str | None = None


def env_var(name: str) -> str:
    """The environment variable of a setting: ``metrics_addr`` -> ``IPC_ROUTER_METRICS_ADDR``."""
    return ENV_PREFIX + name.upper()


def _ids(lookup: Callable[[str], int]) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        out = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(int(item) if item.isdigit() else lookup(item))
            except KeyError:
                raise argparse.ArgumentTypeError(f"no such user or group {item!r}") from None
        return tuple(out)

    return parse


def _octal(text: str) -> int:
    return int(text, 8)


def value_type(name: str) -> Callable[[str], Any]:
    """How the text of a flag or variable becomes the value of setting ``name`` (booleans: see :func:`defaults`)."""
    if name == "socket_mode":
        return _octal
    if name == "allow_uid":
        return _ids(lambda n: pwd.getpwnam(n).pw_uid)
    if name == "allow_gid":
        return _ids(lambda n: grp.getgrnam(n).gr_gid)
    default = _FIELDS[name].default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Each setting from the environment (``IPC_ROUTER_<NAME>``; ``otlp_endpoint`` also from
    ``OTEL_EXPORTER_OTLP_ENDPOINT``), else its built-in default; ``socket`` is missing when neither gives it.
    Booleans are on for ``1``, ``true``, ``yes``, ``on``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        text = environ.get(env_var(f.name))
        if text is None and f.name == "otlp_endpoint":
            text = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if text is not None:
            out[f.name] = text.lower() in _TRUE if isinstance(f.default, bool) else value_type(f.name)(text)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def resolve(values: Mapping[str, Any], server: ServerSettings) -> Settings:
    """The settings: ``values`` (flags over :func:`defaults`), with the config file's ``server:`` section for
    the fields of :data:`FROM_CONFIG` they leave unset (``None`` or empty)."""
    merged = dict(values)
    for name in FROM_CONFIG:
        merged[name] = merged.get(name) or getattr(server, name)
    return Settings(**merged)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
