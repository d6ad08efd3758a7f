"""`make demo`: the whole gateway on this machine, on embedded defaults, in under a minute.

Starts three mock OpenAI-compatible providers, the ipc_router sidecar (examples/config.yaml, the example custom
router and custom metrics, Prometheus on :9464) and a real Envoy from the generated bootstrap; sends a scripted
set of requests through Envoy; prints what happened to each and a summary of the GenAI metrics; stops everything.

    make demo                      # run, show, stop
    make demo ARGS=--keep-running  # leave it up and print how to try it
    make demo ARGS='--listen-port 8080 --metrics-port 0'   # other ports (0: any free one)
    make demo ARGS=--free-ports    # free ports for everything, the mock providers' included
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ipc_router.config import load_config, parse_endpoint  # noqa: E402
from ipc_router.tools.mock_backend import MockBackend  # noqa: E402
from ipc_router.tools.stack import Stack, free_port  # noqa: E402

CONFIG = ROOT / "examples" / "config.yaml"
ROUTER = "examples.custom_router:new_custom_router"
METRICS = "examples.custom_metrics:new_custom_chat_completion_metrics"
LISTEN_PORT = 10000
ADMIN_PORT = 9901
METRICS_PORT = 9464


@dataclass
class Step:
    title: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    #: Seconds to wait after it: the sidecar charges a token budget just after the response ended.
    settle: float = 0.0


def _chat(model: str, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


ALICE = {"x-user-id": "alice"}
STEPS = [
    *[Step(f"llama3.3 #{i}", "/v1/chat/completions", _chat("llama3.3")) for i in range(1, 5)],
    Step("gpt-4o-mini", "/v1/chat/completions", _chat("gpt-4o-mini")),
    Step("mistral-large (regex rule)", "/v1/chat/completions", _chat("mistral-large")),
    Step("gpt-4o-mini, x-tenant: premium", "/v1/chat/completions", _chat("gpt-4o-mini"), {"x-tenant": "premium"}),
    Step("llama3.3, streaming", "/v1/chat/completions", _chat("llama3.3", stream=True)),
    # The config's token budget: 30 tokens a day per x-user-id; each answer costs 18, so the third is refused.
    *[
        Step(f"gpt-4o-mini, x-user-id: alice #{i}", "/v1/chat/completions", _chat("gpt-4o-mini"), ALICE, settle=0.1)
        for i in range(1, 4)
    ],
    Step("unknown model", "/v1/chat/completions", _chat("no-such-model")),
    Step("malformed JSON body", "/v1/chat/completions", b'{"model": "llama3.3", '),
    Step("GET /v1/models", "/v1/models"),
]


@dataclass
class Row:
    request: str
    status: int
    rule: str
    backend: str
    tokens: str
    latency_ms: float
    note: str


def _send(port: int, step: Step, demo_id: str) -> tuple[int, dict[str, str], bytes, float, float | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json", "x-demo-id": demo_id, **(step.headers or {})}
    start = time.monotonic()
    first: float | None = None
    try:
        conn.request("POST" if step.body is not None else "GET", step.path, body=step.body, headers=headers)
        resp = conn.getresponse()
        chunks = []
        while chunk := resp.read1(65536):
            if first is None:
                first = time.monotonic() - start
            chunks.append(chunk)
        return resp.status, dict(resp.getheaders()), b"".join(chunks), time.monotonic() - start, first
    finally:
        conn.close()


def _usage(body: bytes) -> dict[str, Any] | None:
    try:
        return dict(json.loads(body)["usage"])
    except (ValueError, KeyError, TypeError):
        pass
    for line in body.split(b"\n"):  # SSE: the usage event comes last
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                return dict(event["usage"])
    return None


def run_steps(stack: Stack, mocks: list[MockBackend]) -> list[Row]:
    rows = []
    for step in STEPS:
        demo_id = uuid.uuid4().hex
        status, _, body, elapsed, first = _send(stack.listen_port, step, demo_id)
        time.sleep(step.settle)
        seen = [r for m in mocks for r in m.requests if r.headers.get("x-demo-id") == demo_id]
        upstream = seen[0].headers if seen else {}
        usage = _usage(body) if status == 200 else None
        tokens = f"{usage['prompt_tokens']}/{usage['completion_tokens']}" if usage else "-"
        note = ""
        if status != 200:
            try:
                note = json.loads(body)["error"]["message"][:48]
            except (ValueError, KeyError, TypeError):
                note = body[:48].decode(errors="replace")
        elif step.path == "/v1/models":
            note = "models: " + ", ".join(m["id"] for m in json.loads(body)["data"])
        elif first is not None and step.body and b'"stream": true' in step.body:
            note = f"first chunk after {first * 1000:.0f} ms"
        rows.append(
            Row(
                step.title,
                status,
                upstream.get("x-ai-eg-selected-route", "-"),
                upstream.get("x-ai-eg-selected-backend", "-"),
                tokens,
                elapsed * 1000,
                note,
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    head = ("request", "status", "rule", "backend", "tokens in/out", "latency", "note")
    cells = [(r.request, str(r.status), r.rule, r.backend, r.tokens, f"{r.latency_ms:.1f} ms", r.note) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


def _series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for raw in text.splitlines():
        if not raw.startswith(name + "{"):
            continue
        labels_text, _, value = raw[len(name) + 1 :].rpartition("} ")
        labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
        out.append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


def print_metrics(metrics_url: str) -> None:
    # The sidecar records completions after answering; give the last ones a moment.
    time.sleep(0.3)
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    per_model: dict[str, dict[str, float]] = {}

    def add(metric: str, key: str, *, token_type: str | None = None) -> None:
        for labels, value in _series(text, metric):
            if token_type is not None and labels.get("gen_ai_token_type") != token_type:
                continue
            model = labels.get("gen_ai_request_model", "?")
            per_model.setdefault(model, {})[key] = per_model.get(model, {}).get(key, 0.0) + value

    add("gen_ai_server_request_duration_seconds_count", "requests")
    add("gen_ai_server_request_duration_seconds_sum", "duration")
    add("gen_ai_client_token_usage_sum", "input", token_type="input")
    add("gen_ai_client_token_usage_sum", "output", token_type="output")
    add("gen_ai_server_time_to_first_token_seconds_count", "ttft_n")
    add("gen_ai_server_time_to_first_token_seconds_sum", "ttft")
    add("llm_request_cost_USD_sum", "cost")
    print("\nGenAI metrics scraped from", metrics_url)
    print(f"  {'model':<16}{'requests':>9}{'in tok':>8}{'out tok':>8}{'mean dur':>10}{'mean TTFT':>11}{'cost USD':>11}")
    for model, m in sorted(per_model.items()):
        n = m.get("requests", 0)
        dur = f"{m['duration'] / n * 1000:.0f} ms" if n else "-"
        ttft = f"{m['ttft'] / m['ttft_n'] * 1000:.0f} ms" if m.get("ttft_n") else "-"
        print(
            f"  {model:<16}{n:>9.0f}{m.get('input', 0):>8.0f}{m.get('output', 0):>8.0f}{dur:>10}{ttft:>11}"
            f"{m.get('cost', 0):>11.6f}"
        )
    outcomes = {
        f"{labels.get('endpoint')}/{labels.get('outcome')}": int(v)
        for labels, v in _series(text, "ipc_router_requests_total")
    }
    print("  sidecar requests:", ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))
    records = {labels.get("source"): int(v) for labels, v in _series(text, "ipc_router_completion_records_total")}
    if records:
        completed = sum(int(m.get("requests", 0)) for m in per_model.values())
        routed = sum(v for k, v in outcomes.items() if k.startswith("route/routed"))
        print(
            f"  shared-memory fast path: {completed - routed} of {completed} completed requests routed by the filter"
            f" from the segment (no sidecar call); completion records: "
            + ", ".join(f"{k}={v}" for k, v in sorted(records.items()))
        )


class PortTaken(Exception):
    """A port the demo needs is in use; the message says which and how to choose another."""


def check_free(port: int, what: str, how: str) -> None:
    """Raise :class:`PortTaken` when something listens on 127.0.0.1:``port``; ``how`` says how to choose another."""
    with socket.socket() as s:
        # As the servers will bind: SO_REUSEADDR ignores TIME_WAIT leftovers, not a live listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise PortTaken(f"port {port} ({what}) is already in use on 127.0.0.1 ({e.strerror}). {how}") from None


def mock_ports(config_path: Path) -> dict[int, list[str]]:
    """The backend names served on each local port of the config (two backends may share one)."""
    names: dict[int, list[str]] = {}
    for rule in load_config(config_path).rules:
        for b in rule.backends:
            assert b.endpoint is not None
            port = parse_endpoint(b.endpoint).port
            if b.name not in names.setdefault(port, []):
                names[port].append(b.name)
    return names


def config_on_free_ports(workdir: Path) -> Path:
    """examples/config.yaml with every backend endpoint moved to a free port, written to ``workdir``."""
    raw = yaml.safe_load(CONFIG.read_text())
    moved: dict[int, int] = {}
    for rule in raw["rules"]:
        for b in rule.get("backends", []):
            old = parse_endpoint(b["endpoint"]).port
            new = moved.setdefault(old, free_port())
            b["endpoint"] = b["endpoint"].replace(f":{old}", f":{new}")
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_mocks(quick: bool, config_path: Path = CONFIG) -> list[MockBackend]:
    """One mock provider per distinct endpoint of the config."""
    delay = 0.0 if quick else 0.05
    mocks = []
    try:
        for port, backend_names in sorted(mock_ports(config_path).items()):
            m = MockBackend(
                name="+".join(backend_names), port=port, tokens=8, first_token_delay=delay * 2, token_delay=delay
            )
            m.start()
            mocks.append(m)
    except BaseException:
        for m in mocks:
            m.stop()
        raise
    return mocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--keep-running", action="store_true", help="leave everything up until Ctrl-C")
    parser.add_argument("--quick", action="store_true", help="no artificial model delays (used by the tests)")
    parser.add_argument("--listen-port", type=int, default=LISTEN_PORT, help="Envoy's listener; 0: a free port")
    parser.add_argument("--admin-port", type=int, default=ADMIN_PORT, help="Envoy's admin interface; 0: a free port")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT, help="the sidecar's Prometheus /metrics; "
                        "0: a free port")  # fmt: skip
    parser.add_argument("--free-ports", action="store_true", help="free ports for all of them and for the mock "
                        "providers (whose ports come from examples/config.yaml: the demo then runs a copy of "
                        "it)")  # fmt: skip
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ipr-demo") as tmp:
        config = CONFIG
        if args.free_ports:
            args.listen_port = args.admin_port = args.metrics_port = 0
            config = config_on_free_ports(Path(tmp))
        ports = {
            "listen": args.listen_port or free_port(),
            "admin": args.admin_port or free_port(),
            "metrics": args.metrics_port or free_port(),
        }
        try:
            for key, flag, what in (
                ("listen", "--listen-port", "Envoy's listener"),
                ("admin", "--admin-port", "Envoy's admin interface"),
                ("metrics", "--metrics-port", "the sidecar's Prometheus endpoint"),
            ):
                how = f"Choose another with {flag} N (0: any free port), e.g. make demo ARGS='{flag} 0'"
                how += ", or use --free-ports"
                check_free(ports[key], what, how)
            for port, names in sorted(mock_ports(config).items()):
                how = "Run with --free-ports (make demo ARGS=--free-ports) to give the mock providers free ports"
                check_free(port, f"mock provider {'+'.join(names)}, from {config.name}", how)
        except PortTaken as e:
            print(f"demo: {e}", file=sys.stderr)
            return 1
        return run(args, config, ports)


def run(args: argparse.Namespace, config: Path, ports: dict[str, int]) -> int:
    print("Starting mock providers, the ipc_router sidecar and Envoy ...", flush=True)
    mocks = start_mocks(args.quick, config)
    stack = Stack(
        str(config),
        listen_port=ports["listen"],
        admin_port=ports["admin"],
        metrics_port=ports["metrics"],
        router=ROUTER,
        metrics=METRICS,
        app_dir=str(ROOT),  # the plugins are examples.*, found from the repository root whatever the working directory
    )
    try:
        stack.start()
        print(f"Envoy on {stack.url}, sidecar on {stack.socket}, metrics on {stack.metrics_url}\n")
        print_table(run_steps(stack, mocks))
        assert stack.metrics_url
        print_metrics(stack.metrics_url)
        if args.keep_running:
            print(
                f"\nRunning. Try:\n"
                f"  curl -s {stack.url}/v1/chat/completions -H 'content-type: application/json' \\\n"
                f'       -d \'{{"model": "llama3.3", "messages": [{{"role": "user", "content": "hi"}}]}}\'\n'
                f"  curl -s {stack.url}/v1/models\n"
                f"  curl -s {stack.metrics_url} | grep ^gen_ai\n"
                f"  curl -s --unix-socket {stack.socket} http://sidecar/stats\n"
                f"  curl -s --unix-socket {stack.socket} http://sidecar/budgets\n"
                f"  Envoy admin: http://127.0.0.1:{stack.admin_port}/\n"
                f"Stop with Ctrl-C."
            )
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        stack.stop()
        for m in mocks:
            m.stop()
        print("\nStopped everything the demo started.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
