"""End to end through a real Envoy: upstream credentials, failover by priority, live rules (issue #15).

Each stack runs with the shared-memory fast path on and off: the route decision comes from the segment or the
socket, but Envoy does the credentials and the failover either way, and the served backend must reach the
metrics by a ring record or by /complete.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipc_router.tools.stack import Stack, free_port
from tests.support.e2e import (
    Backends,
    chat,
    iter_sse,
    request,
    samples,
    scrape,
    start_backends,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.envoy

INLINE_KEY = "sk-inline-key-0123456789"
AZURE_TOKEN = "eyJ-azure-token-0123456789"
FILE_KEYS = ("sk-file-key-one-0123456789", "sk-file-key-two-0123456789")
FAILOVER_KEY = "sk-failover-key-0123456789"
SECRETS = (INLINE_KEY, AZURE_TOKEN, *FILE_KEYS, FAILOVER_KEY)
CLIENT = {"authorization": "Bearer client-own-key", "api-key": "client-own-key"}
CHAT = "/v1/chat/completions"


def rule(name: str, model: str, *backends: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "headers": [{"name": "x-ai-eg-model", "value": model}], "backends": list(backends)}


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = start_backends("keyed", "filed", "azure", "open", "p0", "p1", "spare", tokens=4)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-key"
    path.write_text(FILE_KEYS[0] + "\n")
    return path


def config_rules(key_file: Path, dead_port: int) -> list[dict[str, Any]]:
    p1 = {"name": "p1", "priority": 1, "auth": {"apiKey": {"key": FAILOVER_KEY}}}
    dead = {"name": "dead", "priority": 0, "endpoint": f"http://127.0.0.1:{dead_port}"}
    azure = {"name": "azure", "schema": {"name": "AzureOpenAI"}, "auth": {"azure": {"accessToken": AZURE_TOKEN}}}
    return [
        rule("keyed", "m-keyed", {"name": "keyed", "auth": {"apiKey": {"key": INLINE_KEY}}}),
        rule("filed", "m-filed", {"name": "filed", "auth": {"apiKey": {"filename": str(key_file)}}}),
        rule("azure", "m-azure", azure),
        rule("open", "m-open", {"name": "open"}),
        # Failover: p0 first, p1 (with its own key) next.
        rule("fo", "m-fo", {"name": "p0", "priority": 0}, dict(p1)),
        # Failover from a backend nobody listens on (connect failure).
        rule("fo-dead", "m-fo-dead", dead, dict(p1)),
        # Only here so that Envoy has a cluster for it: the live-rule test routes a new rule to it.
        rule("spare", "m-spare", {"name": "spare"}),
    ]


@pytest.fixture(scope="module", params=[True, False], ids=["shm", "socket"])
def stack(
    request: pytest.FixtureRequest, backends: Backends, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    cfg = tmp_path_factory.mktemp("cfg") / "config.yaml"
    write_config(cfg, config_rules(key_file, free_port()), backends)
    with Stack(str(cfg), shm=request.param, metrics_port=free_port()) as s:
        yield s


@pytest.fixture(autouse=True)
def _clear(backends: Backends) -> Iterator[None]:
    backends.clear()
    yield
    for m in backends.mocks.values():
        m.config.status = None
        m.config.abort_after = None


def seen(backends: Backends, name: str) -> dict[str, str]:
    reqs = backends[name].requests
    assert reqs, f"{name} got no request"
    return reqs[-1].headers


def admin(stack: Stack, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}{path}", timeout=5) as r:
        text: str = r.read().decode()
        return text


def sidecar_stats(stack: Stack) -> dict[str, Any]:
    from tests.test_e2e_shm import stats

    return stats(stack)


# ------------------------------------------------------------------------------------------------ credentials


def test_api_key_replaces_what_the_client_sent(stack: Stack, backends: Backends) -> None:
    for _ in range(2):  # the second one is a fast-path hit when the fast path is on
        r = request(stack.url, CHAT, chat("m-keyed"), CLIENT)
        assert r.status == 200, r.body
        h = seen(backends, "keyed")
        assert h["authorization"] == f"Bearer {INLINE_KEY}"
        assert "api-key" not in h


def test_azure_access_token_is_a_bearer_token(stack: Stack, backends: Backends) -> None:
    r = request(stack.url, CHAT, chat("m-azure"), CLIENT)
    assert r.status == 200, r.body
    h = seen(backends, "azure")
    # Azure OpenAI takes an Entra ID token as a bearer token; api-key is for static resource keys: not sent.
    assert h["authorization"] == f"Bearer {AZURE_TOKEN}"
    assert "api-key" not in h


def test_backend_without_auth_gets_the_clients_own_key(stack: Stack, backends: Backends) -> None:
    r = request(stack.url, CHAT, chat("m-open"), CLIENT)
    assert r.status == 200, r.body
    h = seen(backends, "open")
    assert (h["authorization"], h["api-key"]) == (CLIENT["authorization"], CLIENT["api-key"])


def test_key_file_is_reread_when_replaced(stack: Stack, backends: Backends, key_file: Path) -> None:
    tmp = key_file.with_suffix(".new")
    tmp.write_text(FILE_KEYS[0] + "\n")  # the other stack's run may have rotated it
    os.replace(tmp, key_file)

    def current() -> str:
        assert request(stack.url, CHAT, chat("m-filed"), CLIENT).status == 200
        return seen(backends, "filed")["authorization"]

    assert wait_until(lambda: current() == f"Bearer {FILE_KEYS[0]}", timeout=10)
    tmp.write_text(FILE_KEYS[1] + "\n")
    os.replace(tmp, key_file)  # how Kubernetes and most tools replace a file: a rename
    assert wait_until(lambda: current() == f"Bearer {FILE_KEYS[1]}", timeout=10), "the new key was not picked up"
    assert "api-key" not in seen(backends, "filed")


def test_secrets_never_show(stack: Stack, backends: Backends, key_file: Path) -> None:
    for model in ("m-keyed", "m-filed", "m-azure", "m-fo"):
        assert request(stack.url, CHAT, chat(model), CLIENT).status == 200
    places = {
        "envoy /stats": admin(stack, "/stats"),
        "envoy /config_dump": admin(stack, "/config_dump"),
        "envoy /clusters": admin(stack, "/clusters"),
        "sidecar /stats": json.dumps(sidecar_stats(stack)),
        "sidecar log": stack.sidecar_log(),
        "envoy log": stack.envoy_log(),
        "metrics": scrape(stack.metrics_url or ""),
    }
    if stack.shm:  # the segment: the config blob and the records
        segs = [p for p in Path(stack.workdir).iterdir() if p.suffix == ".shm"]
        assert segs
        places["segment"] = segs[0].read_bytes().decode("latin-1")
    for where, text in places.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret shows in {where}"
    # Envoy did use them (so the check above looked at a live system).
    assert "credential_injector.injected" in places["envoy /stats"]


def test_check_config_and_errors_do_not_quote_secrets(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"rules": [rule("r", "m", {"name": "b", "endpoint": "http://127.0.0.1:1",
                                                              "auth": {"apiKey": {"key": INLINE_KEY}}})]}))  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [rule("r", "m", {"name": "b", "auth": {
        "apiKey": {"key": INLINE_KEY, "filename": "/x"}}})]}))  # fmt: skip
    for path, code in ((good, 0), (bad, 1)):
        out = subprocess.run([sys.executable, "-m", "ipc_router.cli", "check-config", str(path)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == code, out.stderr
        assert INLINE_KEY not in out.stdout + out.stderr
    assert "rules[0].backends[0].auth.apiKey: set exactly one of 'key' or 'filename'" in out.stderr


# ---------------------------------------------------------------------------------------------------- failover


def fallbacks_metric(stack: Stack, backend: str) -> float:
    return sum(samples(scrape(stack.metrics_url or ""), "ipc_router_fallbacks_total", backend=backend))


def test_failover_serves_from_the_first_backend_when_it_answers(stack: Stack, backends: Backends) -> None:
    r = request(stack.url, CHAT, chat("m-fo"), CLIENT)
    assert r.status == 200 and r.headers["x-mock-backend"] == "p0"
    assert "x-ai-eg-served-backend" not in r.headers  # read and removed by the filter
    assert backends.counts()["p1"] == 0
    # A failover rule with credentials on one backend: client keys reach none of them.
    assert "authorization" not in seen(backends, "p0") and "api-key" not in seen(backends, "p0")


@pytest.mark.parametrize("status", [503, 500, 429])
def test_failover_on_5xx_and_429_retries_the_next_with_its_key(
    stack: Stack, backends: Backends, status: int
) -> None:
    before = fallbacks_metric(stack, "p1")
    backends["p0"].config.status = status
    r = request(stack.url, CHAT, chat("m-fo"), CLIENT)
    assert r.status == 200, r.body
    assert r.headers["x-mock-backend"] == "p1"
    assert backends.counts()["p0"] == 1 and backends.counts()["p1"] == 1
    assert seen(backends, "p1")["authorization"] == f"Bearer {FAILOVER_KEY}"  # p1's own credential
    # Counted: by Envoy (a retry on the failover cluster), and by the sidecar, which learnt who answered.
    assert wait_until(lambda: fallbacks_metric(stack, "p1") == before + 1), "the fallback was not counted"
    assert sidecar_stats(stack)["fallbacks"].get("p0->p1", 0) >= 1
    assert "cluster.failover_fo.upstream_rq_retry_success: " in admin(stack, "/stats?filter=failover_fo")


def test_failover_on_connect_failure(stack: Stack, backends: Backends) -> None:
    r = request(stack.url, CHAT, chat("m-fo-dead"), CLIENT)
    assert r.status == 200 and r.headers["x-mock-backend"] == "p1", r.body
    assert seen(backends, "p1")["authorization"] == f"Bearer {FAILOVER_KEY}"
    assert wait_until(lambda: sidecar_stats(stack)["fallbacks"].get("dead->p1", 0) >= 1)


def test_failover_records_the_served_backend_in_the_genai_metrics(stack: Stack, backends: Backends) -> None:
    # The request is recorded once, with p1's usage: served by p1, not p0's error.
    def total() -> float:
        text = scrape(stack.metrics_url or "")
        return sum(samples(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-fo"))

    before = total()
    backends["p0"].config.status = 502
    r = request(stack.url, CHAT, chat("m-fo"))
    assert r.status == 200 and r.headers["x-mock-backend"] == "p1"
    assert wait_until(lambda: total() == before + 1)
    text = scrape(stack.metrics_url or "")
    failed = samples(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="m-fo",
                     error_type="502")  # fmt: skip
    assert sum(failed) == 0  # p0's 502 never reached the client, so it is no failed request


def test_stream_is_never_retried_after_its_first_byte(stack: Stack, backends: Backends) -> None:
    backends["p0"].config.abort_after = 2  # p0 sends the headers and two chunks, then resets the connection
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=30)
    try:
        conn.request("POST", CHAT, json.dumps(chat("m-fo", stream=True)), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("x-mock-backend") == "p0"
        got = b""
        with pytest.raises(http.client.IncompleteRead):  # Envoy resets the client's stream too
            while chunk := resp.read1(65536):
                got += chunk
    finally:
        conn.close()
    events = list(iter_sse(got))
    assert 0 < len(events) < 4 and b"[DONE]" not in got  # the client got the cut stream ...
    assert backends.counts()["p1"] == 0  # ... and nothing was retried once Envoy forwarded the headers
    # A stream that fails before its headers is retried like any request.
    backends["p0"].config.abort_after = None
    backends["p0"].config.status = 503
    r = request(stack.url, CHAT, chat("m-fo", stream=True))
    assert r.status == 200 and r.headers["x-mock-backend"] == "p1"
    assert b"[DONE]" in r.body


# -------------------------------------------------------------------------------------------------- live rules


def test_a_new_rule_over_existing_backends_works_without_restarting_envoy(
    stack: Stack, backends: Backends, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(stack.config)
    original = path.read_text()
    cfg = yaml.safe_load(original)
    # A new rule for a new model over two backends Envoy has clusters for (one with credentials).
    cfg["rules"].insert(0, {
        "name": "added-live", "headers": [{"name": "x-ai-eg-model", "value": "m-added"}],
        "backends": [{"name": "spare", "endpoint": f"http://127.0.0.1:{backends['spare'].port}"},
                     {"name": "keyed", "endpoint": f"http://127.0.0.1:{backends['keyed'].port}",
                      "auth": {"apiKey": {"key": INLINE_KEY}}}],
    })  # fmt: skip
    assert request(stack.url, CHAT, chat("m-added")).status == 404
    envoy_pid = stack.envoy.pid if stack.envoy else None
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.monotonic()
        os.replace(tmp, path)
        while True:
            r = request(stack.url, CHAT, chat("m-added"), CLIENT)
            if r.status == 200:
                elapsed = time.monotonic() - t0
                break
            assert time.monotonic() - t0 < 10, (r.status, r.body)
            time.sleep(0.005)
        assert r.headers["x-mock-backend"] in ("spare", "keyed")
        seen_by = {request(stack.url, CHAT, chat("m-added"), CLIENT).headers["x-mock-backend"] for _ in range(6)}
        assert seen_by == {"spare", "keyed"}  # the weighted split of the new rule
        assert seen(backends, "keyed")["authorization"] == f"Bearer {INLINE_KEY}"
        assert stack.envoy is not None and stack.envoy.pid == envoy_pid and stack.envoy.poll() is None
        with capsys.disabled():
            how = "shm" if stack.shm else "socket"
            print(f"\n[live rule, {how}] config write -> first routed: {elapsed * 1e3:.0f} ms")
    finally:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(original)
        os.replace(tmp, path)
        wait_until(lambda: request(stack.url, CHAT, chat("m-added")).status == 404, timeout=10)


# --------------------------------------------------------------------------- new backends live (file-based CDS)


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_a_new_backend_works_without_restarting_envoy_with_file_based_cds(
    shm: bool, backends: Backends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "config.yaml", [rule("open", "m-open", {"name": "open"})], backends)
    original = cfg.read_text()
    with Stack(str(cfg), shm=shm, cds=True) as stack:
        assert request(stack.url, CHAT, chat("m-open")).status == 200
        data = yaml.safe_load(original)
        # A backend the bootstrap never had, with its own key, in a new rule.
        new = {"name": "spare", "endpoint": f"http://127.0.0.1:{backends['spare'].port}",
               "auth": {"apiKey": {"key": INLINE_KEY}}}  # fmt: skip
        data["rules"].append(rule("new", "m-new", new))
        envoy_pid = stack.envoy.pid if stack.envoy else None
        tmp = cfg.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.monotonic()
        os.replace(tmp, cfg)
        while (r := request(stack.url, CHAT, chat("m-new"), CLIENT)).status != 200:
            assert time.monotonic() - t0 < 10, (r.status, r.body, stack.sidecar_log())
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        assert r.headers["x-mock-backend"] == "spare"
        assert seen(backends, "spare")["authorization"] == f"Bearer {INLINE_KEY}"
        assert "api-key" not in seen(backends, "spare")
        assert request(stack.url, CHAT, chat("m-open")).headers["x-mock-backend"] == "open"
        assert stack.envoy is not None and stack.envoy.pid == envoy_pid and stack.envoy.poll() is None
        assert "which was not in the config the sidecar started with" not in stack.sidecar_log()
        # The key sits in an SDS file of the work directory (0640), never in Envoy's config dump.
        assert INLINE_KEY not in admin(stack, "/config_dump")
        with capsys.disabled():
            how = "shm" if shm else "socket"
            print(f"\n[new backend by CDS, {how}] config write -> first routed: {elapsed * 1e3:.0f} ms")
