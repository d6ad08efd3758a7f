"""The configurations the suite compares, as data, and how each one is started.

Every Envoy configuration starts from the bootstrap ipc_router generates for the same three-rule config (same
listener, same route table keyed on the route and backend headers, same backend clusters, ``--concurrency 1``)
and changes only what decides the route: no filter (1), inline Lua (2), a Lua ``httpCall`` to an instant C
responder (3), ipc_router's Lua filter and sidecar (4, 5), an ext_proc gRPC server (6). LiteLLM (7) is a gateway
of its own, so it takes the place of Envoy. All send to the same C mock backend (one listener per model).

To add a configuration, or one that runs ipc_router with other sidecar flags or Stack options (the fast path is
``Stack(shm=True)``, the sidecar's ``--shm``), add an entry to :data:`CONFIGURATIONS`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipc_router.config import DEFAULT_MODEL_NAME_HEADER_KEY
from ipc_router.envoy_config import SIDECAR_CLUSTER, lua_filter_source, lua_literal
from ipc_router.filterapi import DEFAULT_SELECTED_ROUTE_HEADER_KEY, SELECTED_BACKEND_HEADER_KEY
from ipc_router.tools.stack import Stack, StackError, free_port, read_tail, stop_process

from .mix import API_KEY, MODELS

BENCH = Path(__file__).resolve().parent.parent
PEERS = BENCH / "peers"
ROOT = BENCH.parent


class SetupError(RuntimeError):
    """A configuration could not be started (the message says why)."""


@dataclass(frozen=True)
class Configuration:
    key: str
    number: int  # the numbering; 0 is the backend alone (a reference, not a gateway)
    label: str
    why: str
    kind: str  # a key of STARTERS
    sidecar_args: tuple[str, ...] = ()
    #: Extra keyword arguments of ipc_router.tools.stack.Stack (for a bootstrap option the fast path may add).
    stack_options: Mapping[str, Any] = field(default_factory=dict)
    #: Set while the configuration cannot run yet: the suite lists it as pending and skips it.
    pending: str | None = None
    #: The peer venv it needs (bench/peers/<peer>/.venv); skipped with a note when that is not installed.
    peer: str | None = None
    #: False when every model reaches the first model's backend (the floor does no routing).
    routes: bool = True
    #: A diagnostic variant of the fast path (see :data:`SPLIT`): run only with ``--split`` or when ``--only``
    #: names it, never in ``--smoke``.
    split: bool = False


# ----------------------------------------------------------------------------------------------------------------
# "Where the fast path's time goes": configuration 5 with one step of the filter taken out, as text patches of
# the generated Lua code (the shipped filter has no such switches). Each patch must apply exactly once, so a
# change of the filter that invalidates one is an error at start, not a silently meaningless figure.
# bench/README.md ("Where the fast path's time goes") has the table they produced.

# Without a response phase nothing takes the kept records: keeping none (rather than a growing table the GC
# walks) keeps these variants comparable with the full filter.
_KEEP_NOTHING = ("    fast.pending[token] = head\n", "    fast.pending[token] = nil\n")
_NO_RESPONSE = (
    ("\nfunction envoy_on_response(handle) filter:on_response(handle) end\n", "\n"),
    _KEEP_NOTHING,
)
_NO_MD_SET = (
    (
        "            headers:replace(self.conf.token_header, remember(fast, rec))\n",
        "            remember(fast, rec)\n",
    ),
)
_RESPONSE_BODY = "    for chunk in handle:bodyChunks() do\n"

SPLIT: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "shm_no_response": ("no envoy_on_response at all (as inline Lua)", _NO_RESPONSE),
    "shm_no_response_no_md": ("no response phase, no token header set", _NO_RESPONSE + _NO_MD_SET),
    "shm_resp_empty": (
        "envoy_on_response returns at once",
        (
            ("function mt:on_response(handle)\n", "function mt:on_response(handle)\n    do return end\n"),
            _KEEP_NOTHING,
        ),
    ),
    "shm_resp_md_only": (
        "on_response: the token's requestHeaders():get + forget only",
        (
            (
                "    if token then\n        -- Looked at now",
                "    if token then forget(fast, token) end\n    do return end\n"
                "    if token then\n        -- Looked at now",
            ),
        ),
    ),
    "shm_resp_no_chunks": (
        "on_response without bodyChunks (empty kept body)",
        ((_RESPONSE_BODY, "    for chunk in function() return nil end do\n"),),
    ),
    "shm_resp_no_getbytes": (
        "on_response: bodyChunks iterated, chunk:length() only, no getBytes",
        (("        local len = chunk:length()\n", "        local len = 0 * chunk:length()\n"),),
    ),
    "shm_resp_no_record": (
        "on_response: body kept, no record_body and no ring write",
        (
            (
                "    if record then\n        forget(fast, token)\n        local payload, err = record_body(",
                "    if record then\n        forget(fast, token)\n        do return end\n"
                "        local payload, err = record_body(",
            ),
        ),
    ),
    "shm_two_headers": (
        "hit: only the route and backend headers set (no model, no path header)",
        (
            ("            headers:replace(cfg.model_header, model)\n", ""),
            ("            headers:replace(cfg.path_header, path)\n", ""),
        ),
    ),
    "shm_no_rec_headers": (
        "hit: no record_headers_map (empty headers map in the record)",
        (
            (
                "            local rec_headers = record_headers_map(cfg, headers)\n"
                "            local rec = record_head(",
                '            local rec_headers = "\\128"\n            local rec = record_head(',
            ),
        ),
    ),
    "shm_no_refresh": (
        "fast_refresh returns the held config without seg:refresh()",
        (
            (
                "local function fast_refresh(fast)\n",
                "local function fast_refresh(fast)\n    if fast.cfg then return fast.cfg end\n",
            ),
        ),
    ),
    "shm_pattern": (
        "the model by inline Lua's pattern instead of the JSON scanner",
        (('fast.json.top_level_string(raw, "model")', """string.match(raw, '"model"%s*:%s*"([^"]+)"')"""),),
    ),
    "shm_jit_on": (
        "no jit.off: every function compiled",
        (("        jit.off(f)\n", "        local _ = f\n"),),
    ),
}


# "Why the response phase is Lua": configuration 5 without its response phase (nothing for the filter to record,
# no token), the usage read by Envoy's own filters instead (json_to_metadata's response rules for JSON bodies,
# sse_to_metadata with the JSON content parser for event streams) and one file access log line per request with
# what a record holds. Only the cost is measured: nothing reads the log (bench/README.md has the figures).
NATIVE_PROBES: dict[str, tuple[str, tuple[str, ...]]] = {
    "native_all": ("json_to_metadata + sse_to_metadata + a file access log", ("j2m", "sse", "log")),
    "native_j2m": ("json_to_metadata + a file access log (no usage from streams)", ("j2m", "log")),
    "native_log": ("a file access log only (no usage)", ("log",)),
}


def patch_lua(code: str, patches: Sequence[tuple[str, str]]) -> str:
    """``code`` with each (old, new) applied; each old must occur exactly once."""
    for old, new in patches:
        count = code.count(old)
        if count != 1:
            raise SetupError(f"split patch applies {count} times, not once: {old!r}")
        code = code.replace(old, new)
    return code


CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration(
        "backend", 0, "mock backend alone (no gateway)",
        "The C mock without Envoy: its throughput must be far above every gateway's, or it is the bottleneck.",
        "backend", routes=False,
    ),
    Configuration(
        "direct", 1, "Envoy direct (floor)",
        "Envoy with one route straight to the backend, no filter: the cost of the proxy itself.",
        "direct", routes=False,
    ),
    Configuration(
        "inline_lua", 2, "Envoy + inline Lua routing",
        "The model read from the body with a Lua pattern, rules as a Lua table: the status quo, no process hop.",
        "inline_lua",
    ),
    Configuration(
        "inline_lua_usage", 10, "Envoy + inline Lua routing and usage reading",
        "Configuration 2 plus the least a response phase written in Lua does for metrics (the request's route, "
        "status, content type, the body's tail, the usage taken out of it, counted per worker, not exported): "
        "Lua doing the fast path's job, a lower bound.",
        "inline_lua_usage",
    ),
    Configuration(
        "httpcall", 3, "Envoy + Lua httpCall to an instant C responder",
        "A minimal Lua filter whose httpCall (the body over a Unix socket) is answered at once by C: the floor of "
        "any design that leaves Envoy's worker thread.",
        "httpcall",
    ),
    Configuration(
        "ipc_router", 4, "Envoy + ipc_router (Unix socket)",
        "ipc_router without the fast path (--no-shm): its Lua filter, /route and /complete over the socket for "
        "every request, default GenAI metrics exported to Prometheus (ipc_router.tools.stack.Stack).",
        "ipc_router", stack_options={"shm": False},
    ),
    Configuration(
        "ipc_filter_c", 8, "Envoy + ipc_router's Lua filter, instant C sidecar",
        "Diagnostic: ipc_router's real Lua filter (both httpCalls, msgpack) answered at once by C, so the "
        "filter's Envoy-side cost and the Python sidecar's separate (4 minus 8 is the sidecar's share).",
        "ipc_filter_c",
    ),
    Configuration(
        "ipc_router_shm", 5, "Envoy + ipc_router (shared-memory fast path)",
        "ipc_router as shipped (--shm): cached routes read from shared memory and completion records written "
        "into rings the sidecar drains, no httpCall for a cache hit; same metrics and exporter as 4.",
        "ipc_router", stack_options={"shm": True},
    ),
    Configuration(
        "shm_no_response", 50 + 0, "fast path: " + SPLIT["shm_no_response"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_no_response"][1]}, split=True,
    ),
    Configuration(
        "shm_no_response_no_md", 50 + 1, "fast path: " + SPLIT["shm_no_response_no_md"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_no_response_no_md"][1]}, split=True,
    ),
    Configuration(
        "shm_resp_empty", 50 + 2, "fast path: " + SPLIT["shm_resp_empty"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_resp_empty"][1]}, split=True,
    ),
    Configuration(
        "shm_resp_md_only", 50 + 3, "fast path: " + SPLIT["shm_resp_md_only"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_resp_md_only"][1]}, split=True,
    ),
    Configuration(
        "shm_resp_no_chunks", 50 + 4, "fast path: " + SPLIT["shm_resp_no_chunks"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_resp_no_chunks"][1]}, split=True,
    ),
    Configuration(
        "shm_resp_no_getbytes", 50 + 5, "fast path: " + SPLIT["shm_resp_no_getbytes"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_resp_no_getbytes"][1]}, split=True,
    ),
    Configuration(
        "shm_resp_no_record", 50 + 6, "fast path: " + SPLIT["shm_resp_no_record"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_resp_no_record"][1]}, split=True,
    ),
    Configuration(
        "shm_two_headers", 50 + 7, "fast path: " + SPLIT["shm_two_headers"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_two_headers"][1]}, split=True,
    ),
    Configuration(
        "shm_no_rec_headers", 50 + 8, "fast path: " + SPLIT["shm_no_rec_headers"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_no_rec_headers"][1]}, split=True,
    ),
    Configuration(
        "shm_no_refresh", 50 + 9, "fast path: " + SPLIT["shm_no_refresh"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_no_refresh"][1]}, split=True,
    ),
    Configuration(
        "shm_pattern", 50 + 10, "fast path: " + SPLIT["shm_pattern"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_pattern"][1]}, split=True,
    ),
    Configuration(
        "shm_jit_on", 50 + 11, "fast path: " + SPLIT["shm_jit_on"][0],
        "Diagnostic (where the fast path's time goes): configuration 5 with this step taken out.",
        "ipc_variant", stack_options={"shm": True, "patches": SPLIT["shm_jit_on"][1]}, split=True,
    ),
    *(
        Configuration(
            key, 71 + i, "fast path, no Lua response phase: " + NATIVE_PROBES[key][0],
            "Probe (why the response phase is Lua): the usage read and the record written by Envoy's own filters.",
            "native_probe", stack_options={"shm": True, "patches": _NO_RESPONSE + _NO_MD_SET,
                                         "parts": NATIVE_PROBES[key][1]}, split=True,
        )
        for i, key in enumerate(NATIVE_PROBES)
    ),
    Configuration(
        "ipc_router_shm_budget", 9, "Envoy + ipc_router (fast path) + a token budget",
        "Configuration 5 with one token budget that every request is checked against (keyed by content-type): "
        "Envoy's rate limit filter asks the sidecar's gRPC rate limit service once per request.",
        "ipc_router_budget", stack_options={"shm": True},
    ),
    Configuration(
        "ext_proc", 6, "Envoy + Python ext_proc (grpcio)",
        "The AI Gateway's architecture in Python: an ext_proc gRPC server running ipc_router's routing.",
        "ext_proc", peer="ext_proc",
    ),
    Configuration(
        "litellm", 7, "LiteLLM proxy (1 worker)",
        "The popular Python gateway, offline, with a master key, routing the same models to the same mock.",
        "litellm", peer="litellm",
    ),
)  # fmt: skip


@dataclass
class World:
    """What every configuration shares: the work directory, the mock backend's ports, ipc_router's config."""

    workdir: Path
    ports: dict[str, int]  # model -> mock listener
    config: Path  # the ipc_router config (rules named after the models)
    responder: Path  # the compiled C responder


def write_config(world_dir: Path, ports: Mapping[str, int]) -> Path:
    """ipc_router's config: one rule per model (header match on the model), one backend per model."""
    rules = [
        {
            "name": model,
            "headers": [{"type": "Exact", "name": "x-ai-eg-model", "value": model}],
            "backends": [{"name": model, "schema": {"name": "OpenAI"}, "endpoint": f"http://127.0.0.1:{port}"}],
        }
        for model, port in ports.items()
    ]
    path = world_dir / "config.yaml"
    path.write_text(yaml.safe_dump({"schema": {"name": "OpenAI"}, "rules": rules}, sort_keys=False))
    return path


@dataclass
class Running:
    """One started configuration: where to send requests, its processes (for CPU accounting), how to stop it."""

    url: str
    processes: dict[str, int]  # role -> pid
    stop: Callable[[], None]
    logs: Callable[[], str] = field(default=lambda: "")


# ----------------------------------------------------------------------------------------------------------------
# Envoy variants: the generated bootstrap with another request filter


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _replace_lua(doc: dict[str, Any], code: str | None) -> None:
    """Set the Lua filter's code, or (``None``) remove the filter."""
    hcm = _hcm(doc)
    if code is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.lua"]
        return
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.lua":
            f["typed_config"]["default_source_code"] = {"inline_string": code}
            return
    raise SetupError("the generated bootstrap has no Lua filter")


def _drop_sidecar_cluster(doc: dict[str, Any]) -> None:
    resources = doc["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != SIDECAR_CLUSTER]
    host = _hcm(doc)["route_config"]["virtual_hosts"][0]  # and the /v1/models route the sidecar answers
    host["routes"] = [r for r in host["routes"] if r.get("route", {}).get("cluster") != SIDECAR_CLUSTER]


def inline_lua_code(models: Sequence[str]) -> str:
    """Configuration 2: routing written in Lua, rules as a table (rule and backend named after the model)."""
    rules = {m: {"route": m, "backend": m} for m in models}
    return f"""
local RULES = {lua_literal(rules)}
local match = string.match
function envoy_on_request(handle)
  local body = handle:body()
  local raw = body and body:getBytes(0, body:length()) or ""
  local rule = RULES[match(raw, '"model"%s*:%s*"([^"]+)"') or ""]
  if rule == nil then
    handle:respond({{[":status"] = "404"}}, "no route")
    return
  end
  local headers = handle:headers()
  headers:replace("{DEFAULT_SELECTED_ROUTE_HEADER_KEY}", rule.route)
  headers:replace("{SELECTED_BACKEND_HEADER_KEY}", rule.backend)
  handle:clearRouteCache()
end
"""


# Configuration 10: the least a gateway whose metrics are written in Lua does per response, written the way the
# fast path's filter is (Envoy-calling functions interpreted, plain finds before patterns): the request's route in
# the response phase, status and content type, the body's tail kept across chunks, the usage taken out of it. The
# counts stay in a per-worker table; exporting them is left out, so this is a lower bound.
INLINE_USAGE_LUA = """
local find, lower, match, concat = string.find, string.lower, string.match, table.concat
local TOTALS = {}

local function tokens(tail, name)
  local at = find(tail, name, 1, true)
  return at and tonumber(match(tail, "^%s*:%s*(%d+)", at + #name)) or 0
end

function envoy_on_response(handle)
  local route = handle:requestHeaders():get("@ROUTE@")
  if route == nil then
    return
  end
  local headers = handle:headers()
  local status = headers:get(":status")
  local ctype = headers:get("content-type")
  local stream = ctype ~= nil and find(lower(ctype), "text/event-stream", 1, true) == 1
  local prev, last
  for chunk in handle:bodyChunks() do
    local len = chunk:length()
    if len > 0 then
      prev, last = last, chunk:getBytes(0, len)
    end
  end
  local tail = prev and concat({prev, last}) or last or ""
  local totals = TOTALS[route]
  if totals == nil then
    totals = {requests = 0, streams = 0, errors = 0, prompt = 0, completion = 0}
    TOTALS[route] = totals
  end
  totals.requests = totals.requests + 1
  if stream then
    totals.streams = totals.streams + 1
  end
  if status ~= "200" then
    totals.errors = totals.errors + 1
  end
  totals.prompt = totals.prompt + tokens(tail, '"prompt_tokens"')
  totals.completion = totals.completion + tokens(tail, '"completion_tokens"')
end

if jit then
  jit.off(envoy_on_request)
  jit.off(envoy_on_response)
end
""".replace("@ROUTE@", DEFAULT_SELECTED_ROUTE_HEADER_KEY)


HTTPCALL_LUA = f"""
local HEADERS = {{[":method"] = "POST", [":path"] = "/route", [":authority"] = "floor",
                  ["content-type"] = "application/json"}}
local OPTIONS = {{timeout_ms = 250}}
function envoy_on_request(handle)
  local body = handle:body()
  local raw = body and body:getBytes(0, body:length()) or ""
  local answer_headers, answer = handle:httpCall("{SIDECAR_CLUSTER}", HEADERS, raw, OPTIONS)
  if answer_headers[":status"] ~= "200" or answer == nil then
    handle:respond({{[":status"] = "503"}}, "responder failed")
    return
  end
  local headers = handle:headers()
  headers:replace("{DEFAULT_SELECTED_ROUTE_HEADER_KEY}", answer)
  headers:replace("{SELECTED_BACKEND_HEADER_KEY}", answer)
  handle:clearRouteCache()
end
"""


class DirectStack(Stack):
    """Configuration 1: no filter, no sidecar, one route to the first model's backend."""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        pass

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        _replace_lua(doc, None)
        _drop_sidecar_cluster(doc)
        host = _hcm(doc)["route_config"]["virtual_hosts"][0]
        first = next((r for r in host["routes"] if r.get("name") == MODELS[0]), None)
        if first is None:
            raise SetupError(f"the generated bootstrap has no route named {MODELS[0]!r}")
        host["routes"] = [{"name": "direct", "match": {"prefix": "/"}, "route": first["route"]}]
        return doc


@dataclass
class InlineLuaStack(Stack):
    """Configuration 2: the generated route table, routing done by inline Lua, no sidecar (and 10: the usage read
    in Lua too)."""

    usage: bool = False

    def start_sidecar(self, timeout: float = 15.0) -> None:
        pass

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        _replace_lua(doc, inline_lua_code(MODELS) + (INLINE_USAGE_LUA if self.usage else ""))
        _drop_sidecar_cluster(doc)
        return doc


@dataclass
class HttpCallStack(Stack):
    """Configuration 3: the minimal httpCall filter; the sidecar cluster's socket is served by the C responder."""

    responder: str = ""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        log = open(self._logs / "sidecar.log", "ab")  # noqa: SIM115 - the child owns it
        self.sidecar = subprocess.Popen([self.responder, "route", self.socket], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_for(lambda: os.path.exists(self.socket), self.sidecar, "the C responder", timeout, self.sidecar_log)

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        _replace_lua(doc, HTTPCALL_LUA)
        return doc


@dataclass
class InstantIpcStack(Stack):
    """Diagnostic configuration 8: the generated bootstrap (ipc_router's filter); the C responder's ``ipc`` mode
    as the sidecar."""

    responder: str = ""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        log = open(self._logs / "sidecar.log", "ab")  # noqa: SIM115 - the child owns it
        self.sidecar = subprocess.Popen([self.responder, "ipc", self.socket], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_for(lambda: os.path.exists(self.socket), self.sidecar, "the C responder", timeout, self.sidecar_log)


@dataclass
class VariantStack(Stack):
    """A split variant: ipc_router's stack with :func:`patch_lua` applied to the generated filter code."""

    patches: Sequence[tuple[str, str]] = ()
    #: Another text of the filter module (``--baseline REV``: the filter of that revision), patches applied after.
    filter_source: str | None = None

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        patches = list(self.patches)
        if self.filter_source is not None:
            patches.insert(0, (lua_filter_source(), self.filter_source))
        for f in _hcm(doc)["http_filters"]:
            if f["name"] == "envoy.filters.http.lua":
                source = f["typed_config"]["default_source_code"]
                source["inline_string"] = patch_lua(source["inline_string"], patches)
        return doc


_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_J2M = "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata"
_SSE2M = "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata"
_JSON_PARSER = "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser"
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _usage_rules() -> list[dict[str, Any]]:
    return [
        {
            "selectors": [{"key": "usage"}, {"key": k}],
            "on_present": {"metadata_namespace": "ipc_router.usage", "key": k, "type": "NUMBER"},
        }
        for k in _USAGE
    ]


@dataclass
class NativeProbeStack(VariantStack):
    """A native-recording probe: the patched filter (no response phase) plus the ``parts`` of Envoy's own
    recording: ``j2m``, ``sse`` (after the Lua filter) and ``log`` (the connection manager's access log)."""

    parts: Sequence[str] = ()

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        hcm = _hcm(doc)
        native = {
            "j2m": {
                "name": "envoy.filters.http.json_to_metadata",
                "typed_config": {"@type": _J2M, "response_rules": {"rules": _usage_rules()}},
            },
            "sse": {
                "name": "envoy.filters.http.sse_to_metadata",
                "typed_config": {
                    "@type": _SSE2M,
                    "response_rules": {
                        "content_parser": {
                            "name": "envoy.content_parsers.json",
                            "typed_config": {"@type": _JSON_PARSER, "rules": [{"rule": r} for r in _usage_rules()]},
                        }
                    },
                },
            },
        }
        filters = hcm["http_filters"]
        at = next(n for n, f in enumerate(filters) if f["name"] == "envoy.filters.http.lua") + 1
        filters[at:at] = [native[p] for p in ("j2m", "sse") if p in self.parts]
        if "log" in self.parts:
            line = {
                "start": "%START_TIME(%s.%6f)%",
                "duration_ms": "%DURATION%",
                "first_byte_ms": "%RESPONSE_DURATION%",
                "status": "%RESPONSE_CODE%",
                "route": f"%REQ({DEFAULT_SELECTED_ROUTE_HEADER_KEY})%",
                "backend": f"%REQ({SELECTED_BACKEND_HEADER_KEY})%",
                "model": f"%REQ({DEFAULT_MODEL_NAME_HEADER_KEY})%",
                "cluster": "%UPSTREAM_CLUSTER%",
                "content_type": "%RESP(content-type)%",
                **{k: f"%DYNAMIC_METADATA(ipc_router.usage:{k})%" for k in _USAGE},
            }
            path = str(self._logs / "native-access.log")
            hcm["access_log"] = [
                {"name": "envoy.access_loggers.file",
                 "typed_config": {"@type": _FILE_LOG, "path": path, "log_format": {"json_format": line}}}
            ]  # fmt: skip
        return doc


def baseline(rev: str) -> Configuration:
    """Configuration 5 with the filter (ipc_router.lua) of git revision ``rev``: a change's before and after in
    the same interleaved rounds."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:ipc_router/lua/ipc_router.lua"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SetupError(f"--baseline {rev}: {out.stderr.strip()}")
    return Configuration(
        "shm_baseline", 49, f"fast path, the filter of {rev}",
        f"Configuration 5 with ipc_router.lua as of {rev} (the same sidecar and modules).",
        "ipc_variant", stack_options={"shm": True, "filter_source": out.stdout}, split=True,
    )  # fmt: skip


_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


class ExtProcStack(Stack):
    """Configuration 6: the generated route table; an ext_proc filter (gRPC over a Unix socket) instead of Lua."""

    def start_sidecar(self, timeout: float = 15.0) -> None:
        python = PEERS / "ext_proc" / ".venv" / "bin" / "python"
        cmd = [str(python), str(PEERS / "ext_proc" / "server.py"), "--config", self.config, "--socket", self.socket]
        log = open(self._logs / "sidecar.log", "ab")  # noqa: SIM115 - the child owns it
        self.sidecar = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        _wait_for(lambda: os.path.exists(self.socket), self.sidecar, "the ext_proc server", timeout, self.sidecar_log)

    def bootstrap_dict(self) -> dict[str, Any]:
        doc = super().bootstrap_dict()
        hcm = _hcm(doc)
        ext_proc = {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": _EXT_PROC,
                "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}, "timeout": "1s"},
                "message_timeout": "1s",
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "BUFFERED",
                    "response_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
            },
        }
        hcm["http_filters"] = [ext_proc if f["name"] == "envoy.filters.http.lua" else f for f in hcm["http_filters"]]
        host = hcm["route_config"]["virtual_hosts"][0]  # the ext_proc server does not answer /v1/models
        host["routes"] = [r for r in host["routes"] if r.get("route", {}).get("cluster") != SIDECAR_CLUSTER]
        for c in doc["static_resources"]["clusters"]:
            if c["name"] == SIDECAR_CLUSTER:
                c["name"] = c["load_assignment"]["cluster_name"] = "ext_proc"
                c["typed_extension_protocol_options"] = {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": _HTTP_OPTIONS,
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                }
        return doc


def _wait_for(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float, log: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}:\n{log()}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready within {timeout}s:\n{log()}")
        time.sleep(0.02)


def _from_stack(stack: Stack) -> Running:
    try:
        stack.start()
    except StackError as e:
        raise SetupError(str(e)) from None
    procs = {"envoy": stack.envoy.pid} if stack.envoy else {}
    if stack.sidecar is not None:
        procs["sidecar"] = stack.sidecar.pid
    return Running(stack.url, procs, stack.stop, lambda: stack.envoy_log() + stack.sidecar_log())


# ----------------------------------------------------------------------------------------------------------------
# starters


def start_backend(c: Configuration, w: World) -> Running:
    return Running(f"http://127.0.0.1:{w.ports[MODELS[0]]}", {}, lambda: None)


def start_direct(c: Configuration, w: World) -> Running:
    return _from_stack(DirectStack(str(w.config), shm=False))


def start_inline_lua(c: Configuration, w: World) -> Running:
    return _from_stack(InlineLuaStack(str(w.config), shm=False))


def start_inline_lua_usage(c: Configuration, w: World) -> Running:
    return _from_stack(InlineLuaStack(str(w.config), shm=False, usage=True))


def start_httpcall(c: Configuration, w: World) -> Running:
    return _from_stack(HttpCallStack(str(w.config), responder=str(w.responder), shm=False))


def start_ipc_filter_c(c: Configuration, w: World) -> Running:
    return _from_stack(InstantIpcStack(str(w.config), responder=str(w.responder), shm=False))


def start_ipc_router(c: Configuration, w: World) -> Running:
    # As deployed: default GenAI metrics, exported to Prometheus.
    stack = Stack(str(w.config), metrics_port=free_port(), sidecar_args=c.sidecar_args, **c.stack_options)
    return _from_stack(stack)


def start_ipc_router_budget(c: Configuration, w: World) -> Running:
    config = yaml.safe_load(w.config.read_text())
    config["llmRequestCosts"] = [{"metadataKey": "tokens", "type": "TotalToken"}]
    # Every request carries content-type: one key, checked on every request, never spent.
    config["tokenBudgets"] = [
        {"name": "bench", "cost": "tokens", "headers": ["content-type"], "limit": 10**15, "unit": "day"}
    ]
    path = w.workdir / "config-budget.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack = Stack(str(path), metrics_port=free_port(), sidecar_args=c.sidecar_args, **c.stack_options)
    return _from_stack(stack)


def start_ipc_variant(c: Configuration, w: World) -> Running:
    stack = VariantStack(str(w.config), metrics_port=free_port(), sidecar_args=c.sidecar_args, **c.stack_options)
    return _from_stack(stack)


def start_native_probe(c: Configuration, w: World) -> Running:
    stack = NativeProbeStack(str(w.config), metrics_port=free_port(), sidecar_args=c.sidecar_args, **c.stack_options)
    return _from_stack(stack)


def start_ext_proc(c: Configuration, w: World) -> Running:
    return _from_stack(ExtProcStack(str(w.config), shm=False))


def start_litellm(c: Configuration, w: World) -> Running:
    d = w.workdir / "litellm"
    d.mkdir(exist_ok=True)
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"http://127.0.0.1:{port}/v1",
                    "api_key": "sk-mock",
                },
            }
            for model, port in w.ports.items()
        ],
        "general_settings": {"master_key": API_KEY},
        "litellm_settings": {"telemetry": False, "set_verbose": False, "json_logs": False},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    exe = PEERS / "litellm" / ".venv" / "bin" / "litellm"
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # offline: the packaged cost map, not a download
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCKER": "True",
    }
    env.pop("DATABASE_URL", None)
    log_path = d / "litellm.log"
    cmd = [str(exe), "--config", str(d / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--num_workers", "1"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)

    def ready() -> bool:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=1) as r,
        ):
            return bool(r.status == 200)
        return False

    try:
        _wait_for(ready, proc, "LiteLLM", 90.0, lambda: read_tail(log_path))
    except StackError as e:
        stop_process(proc)
        raise SetupError(str(e)) from None
    return Running(f"http://127.0.0.1:{port}", {"litellm": proc.pid}, lambda: stop_process(proc),
                   lambda: read_tail(log_path))  # fmt: skip


STARTERS: dict[str, Callable[[Configuration, World], Running]] = {
    "backend": start_backend,
    "direct": start_direct,
    "inline_lua": start_inline_lua,
    "inline_lua_usage": start_inline_lua_usage,
    "httpcall": start_httpcall,
    "ipc_router": start_ipc_router,
    "ipc_filter_c": start_ipc_filter_c,
    "ipc_variant": start_ipc_variant,
    "native_probe": start_native_probe,
    "ipc_router_budget": start_ipc_router_budget,
    "ext_proc": start_ext_proc,
    "litellm": start_litellm,
}


def unavailable(c: Configuration) -> str | None:
    """Why ``c`` cannot run here (pending, or its peer is not installed), or None."""
    if c.pending:
        return f"pending: {c.pending}"
    if c.peer is not None:
        failed = PEERS / c.peer / "install-failed.txt"
        if failed.exists():
            return f"peer {c.peer} failed to install: {failed.read_text().strip()[:300]}"
        if not (PEERS / c.peer / ".venv" / ".installed").exists():
            return f"peer {c.peer} is not installed (make bench-peers)"
    return None


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (LiteLLM's workers)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def worker_run_seconds(pid: int) -> float | None:
    """Time Envoy's worker threads (``wrk:worker_N``) ran on a CPU, from the scheduler's nanosecond account
    (``/proc/<pid>/task/<tid>/schedstat``); ``None`` when ``pid`` has no such thread. Steadier than the process's
    tick-counted user + system time: it leaves out the main thread, and one 4-second run of inline Lua repeats to
    ~0.1 µs/request here where the process figure moves by ~1-2 (bench/README.md, "Envoy's worker thread")."""
    total, found = 0, False
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (task / "comm").read_text().startswith("wrk:worker"):
                total += int((task / "schedstat").read_text().split()[0])
                found = True
    return total / 1e9 if found else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
