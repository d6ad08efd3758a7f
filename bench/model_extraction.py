"""How to get ``model`` out of a request body inside Envoy: Envoy's json_to_metadata filter or our Lua scanner.

Two measurements (issue #12: "measure both on 1-64 KiB bodies and choose"):

``micro``
    ``ipc_router_json.top_level_string(body, "model")`` per call under lupa's LuaJIT (JIT on), on openai-SDK-like
    bodies of exactly 1, 4, 16 and 64 KiB (messages first, ``model`` after them, decoy ``model`` keys inside).
``envoy``
    One Envoy per variant (``--concurrency 1``, ``--disable-hot-restart``), all answering from the same fixed
    ``direct_response`` route (the mock: no upstream process competing for the 2 cores), loaded by wrk at c=16 in
    interleaved rounds (variant order rotates per round). Variants:

    * ``body``: a Lua filter that buffers the body and copies it into Lua (``handle:body():getBytes()``), sets a
      constant header: the floor both real variants stand on;
    * ``scanner``: the same, plus ``top_level_string`` on the bytes, the model set as a header;
    * ``json_to_metadata``: Envoy's ``envoy.filters.http.json_to_metadata`` puts ``model`` into dynamic metadata,
      then a Lua filter reads it (``streamInfo():dynamicMetadata():get()``) and sets it as a header.

    Per variant and size: requests/s and Envoy's CPU per request (utime+stime of the Envoy process over the run,
    from /proc), as medians over rounds, and the ratios scanner / json_to_metadata. Each Envoy's answer is checked
    first: the response echoes the request's model header (``%REQ(x-model)%``), which must be the body's model.

Run: ``.venv/bin/python bench/model_extraction.py [micro|envoy|all] [--seconds S] [--rounds N] [--sizes 1,4,16,64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "ipc_router" / "lua" / "ipc_router_json.lua"
MODEL = "gpt-4o-mini-2024-07-18"
sys.path.insert(0, str(ROOT))

from ipc_router.tools.stack import envoy_binary, free_port, stop_process  # noqa: E402


def chat_body(size: int, seed: int = 1) -> bytes:
    """An openai-SDK-like chat body of exactly ``size`` bytes: messages first, ``model`` after."""
    rnd = random.Random(seed)
    words = ["the", "quick", "model", "brown", "fox", "jumps", "é", "日本", '"quoted"', "line\n", "over", "dogs"]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful.", "model": "decoy"}]
    doc = {"messages": msgs, "model": MODEL, "stream": False, "temperature": 0.2}
    while (room := size - 80 - len(json.dumps(doc, ensure_ascii=False).encode())) > 60:
        msg = {"role": rnd.choice(["user", "assistant"]), "content": ""}
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 300)))
        while len(json.dumps({**msg, "content": text}, ensure_ascii=False).encode()) > room:
            text = text[: len(text) // 2]
        msg["content"] = text
        msgs.append(msg)
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    pad = size - len(body)
    return body[:-1] + b',"user":"' + b"u" * (pad - 10) + b'"}' if pad >= 10 else body + b" " * pad


# ------------------------------------------------------------------------------------------------------ micro

MICRO = rb"""
local src = ...
local json = assert(loadstring(src, "=ipc_router_json.lua"))()
return function(body, iters)
    local f, clock = json.top_level_string, os.clock
    local v, r
    for _ = 1, 300 do v, r = f(body, "model") end
    local t0 = clock()
    for _ = 1, iters do v, r = f(body, "model") end
    return (clock() - t0) / iters, v, r
end, (jit.status())
"""


def micro(sizes: list[int]) -> dict[str, float]:
    import lupa.luajit21 as lupa

    rt = lupa.LuaRuntime(encoding=None, unpack_returned_tuples=True)
    run, jit_on = rt.execute(MICRO, MODULE.read_bytes())
    assert jit_on is True
    out = {}
    for kib in sizes:
        body = chat_body(kib * 1024)
        assert len(body) == kib * 1024
        per_call, value, reason = min((run(body, max(300, 100_000 // kib)) for _ in range(5)), key=lambda r: r[0])
        assert value == MODEL.encode(), (value, reason)
        out[f"{kib}KiB"] = per_call * 1e6
        print(f"micro  {kib:3d} KiB: {per_call * 1e6:7.2f} us/call  ({kib * 1024 / per_call / 1e9:.2f} GB/s)")
    return out


# ------------------------------------------------------------------------------------------------------ envoy

LUA_BODY = """
function envoy_on_request(handle)
    local b = handle:body()
    local bytes = b:getBytes(0, b:length())
    handle:headers():replace("x-model", #bytes > 0 and "seen" or "none")
end
jit.off(envoy_on_request)
"""

LUA_SCANNER = """
package.preload["ipc_router_json"] = function(...)
%s
end
local top_level_string = require("ipc_router_json").top_level_string
function envoy_on_request(handle)
    local b = handle:body()
    local model, why = top_level_string(b:getBytes(0, b:length()), "model")
    handle:headers():replace("x-model", model or ("none:" .. why))
end
jit.off(envoy_on_request)
"""

LUA_METADATA = """
function envoy_on_request(handle)
    local md = handle:streamInfo():dynamicMetadata():get("ipc_router")
    local model = md and md["model"]
    handle:headers():replace("x-model", model or "none")
end
jit.off(envoy_on_request)
"""

JSON_TO_METADATA = {
    "name": "envoy.filters.http.json_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "request_rules": {
            "rules": [
                {
                    "selectors": [{"key": "model"}],
                    "on_present": {"metadata_namespace": "ipc_router", "key": "model", "type": "STRING"},
                }
            ]
        },
    },
}


def lua_filter(code: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


def variants() -> dict[str, list[dict[str, Any]]]:
    scanner = LUA_SCANNER % MODULE.read_text()
    return {
        "body": [lua_filter(LUA_BODY)],
        "scanner": [lua_filter(scanner)],
        "json_to_metadata": [JSON_TO_METADATA, lua_filter(LUA_METADATA)],
    }


def bootstrap(port: int, admin: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": '{"object":"chat.completion"}'}},
        "response_headers_to_add": [{"header": {"key": "x-model-seen", "value": "%REQ(x-model)%"}}],
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ]
        },
    }


class Envoy:
    def __init__(self, name: str, filters: list[dict[str, Any]], workdir: Path) -> None:
        self.name, self.port, admin = name, free_port(), free_port()
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(bootstrap(self.port, admin, filters)))
        self.log = workdir / f"{name}.log"
        cmd = [envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"envoy {name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self, body: bytes, expected: str) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=body,
            method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            seen = r.headers.get("x-model-seen")
        if seen != expected:
            raise RuntimeError(f"{self.name}: model header {seen!r}, expected {expected!r}")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(%r, "rb"))
wrk.body = f:read("*a")
f:close()
"""


def wrk(port: int, script: Path, seconds: int, connections: int) -> tuple[float, int]:
    """(requests/s, requests completed) of one wrk run."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, seconds)}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = count = None
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rate = float(words[1])
        elif len(words) > 2 and words[1:3] == ["requests", "in"]:
            count = int(words[0])
    if rate is None or count is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return rate, count


def envoy_bench(sizes: list[int], seconds: int, rounds: int, connections: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found")
    workdir = Path(tempfile.mkdtemp(prefix="mx", dir="/tmp"))
    envoys: list[Envoy] = []
    try:
        for name, filters in variants().items():
            envoys.append(Envoy(name, filters, workdir))
        scripts = {}
        for kib in sizes:
            body = chat_body(kib * 1024)
            (workdir / f"{kib}.json").write_bytes(body)
            scripts[kib] = workdir / f"{kib}.lua"
            scripts[kib].write_text(WRK_SCRIPT % str(workdir / f"{kib}.json"))
            for e in envoys:
                e.check(body, "seen" if e.name == "body" else MODEL)
        rps: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for e in envoys:  # warm-up: traces compiled, buffers grown
            for kib in sizes:
                wrk(e.port, scripts[kib], 1, connections)
        for r in range(rounds):
            for kib in sizes:
                order = envoys[r % len(envoys) :] + envoys[: r % len(envoys)]
                for e in order:
                    c0 = e.cpu_seconds()
                    rate, count = wrk(e.port, scripts[kib], seconds, connections)
                    used = e.cpu_seconds() - c0
                    rps.setdefault((e.name, kib), []).append(rate)
                    cpu.setdefault((e.name, kib), []).append(used / count * 1e6)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for e in envoys:
            stop_process(e.proc)
        shutil.rmtree(workdir, ignore_errors=True)
    table: dict[str, Any] = {}
    print(f"\nenvoy, c={connections}, {rounds} rounds x {seconds}s, medians (requests/s | Envoy CPU us/request)")
    names = [e.name for e in envoys]
    print(f"{'size':>6} " + " ".join(f"{n:>26}" for n in names) + "   scanner/j2m rps   scanner/j2m cpu")
    for kib in sizes:
        row = {n: (statistics.median(rps[n, kib]), statistics.median(cpu[n, kib])) for n in names}
        ratio_rps = row["scanner"][0] / row["json_to_metadata"][0]
        ratio_cpu = row["scanner"][1] / row["json_to_metadata"][1]
        cells = " ".join(f"{r:>12.0f} | {c:>7.1f} us  " for r, c in row.values())
        print(f"{kib:>4}KiB {cells}   {ratio_rps:>14.2f}   {ratio_cpu:>14.2f}")
        per_round = [s / j for s, j in zip(rps["scanner", kib], rps["json_to_metadata", kib], strict=True)]
        table[f"{kib}KiB"] = {
            **{n: {"rps": r, "cpu_us": c} for n, (r, c) in row.items()},
            "scanner_over_j2m_rps": ratio_rps,
            "scanner_over_j2m_rps_rounds": per_round,
            "scanner_over_j2m_cpu": ratio_cpu,
        }
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", default="all", choices=["micro", "envoy", "all"])
    p.add_argument("--sizes", default="1,4,16,64", help="body sizes in KiB (default 1,4,16,64)")
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict[str, Any] = {}
    if args.what in ("micro", "all"):
        result["micro_us_per_call"] = micro(sizes)
    if args.what in ("envoy", "all"):
        result["envoy"] = envoy_bench(sizes, args.seconds, args.rounds, args.connections)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
