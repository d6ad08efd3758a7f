"""Shared pieces of the end-to-end tests: mock backends, configs with their ports, a tiny HTTP client."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipc_router.tools.mock_backend import MockBackend


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    #: (seconds since the request was sent, bytes) per read, for streaming checks.
    chunks: list[tuple[float, bytes]]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    method: str | None = None,
    timeout: float = 30.0,
) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    start = time.monotonic()
    try:
        conn.request(method or ("POST" if data is not None else "GET"), path, body=data, headers=hdrs)
        resp = conn.getresponse()
        chunks: list[tuple[float, bytes]] = []
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            chunks.append((time.monotonic() - start, chunk))
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"".join(c for _, c in chunks), chunks)
    finally:
        conn.close()


def chat(model: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Backends:
    mocks: dict[str, MockBackend]

    def __getitem__(self, name: str) -> MockBackend:
        return self.mocks[name]

    def clear(self) -> None:
        for m in self.mocks.values():
            m.clear()

    def counts(self) -> dict[str, int]:
        return {n: len(m.requests) for n, m in self.mocks.items()}

    def stop(self) -> None:
        for m in self.mocks.values():
            m.stop()


def start_backends(*names: str, **kwargs: Any) -> Backends:
    mocks: dict[str, MockBackend] = {}
    try:
        for n in names:
            m = MockBackend(name=n, **kwargs)
            m.start()
            mocks[n] = m
    except BaseException:
        Backends(mocks).stop()
        raise
    return Backends(mocks)


def write_config(path: Path, rules: list[dict[str, Any]], backends: Backends, **top: Any) -> Path:
    """A filter config whose backends' endpoints point at the running mocks (by backend name). Written as editors
    and the kubelet do, by renaming a complete file over the old one: a reload never reads half a file."""
    for rule in rules:
        for b in rule.get("backends", []):
            if "endpoint" not in b:
                b["endpoint"] = f"http://127.0.0.1:{backends[b['name']].port}"
            b.setdefault("schema", {"name": "OpenAI"})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"schema": {"name": "OpenAI"}, **top, "rules": rules}, sort_keys=False))
    tmp.replace(path)
    return path


def model_rule(name: str, model: str, *backends: str | tuple[str, int], regex: bool = False) -> dict[str, Any]:
    header: dict[str, str] = {"name": "x-ai-eg-model", "value": model}
    if regex:
        header["type"] = "RegularExpression"
    return {
        "name": name,
        "headers": [header],
        "backends": [
            {"name": b, "weight": 1} if isinstance(b, str) else {"name": b[0], "weight": b[1]} for b in backends
        ],
    }


def scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text: str = r.read().decode()
        return text


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of a Prometheus metric whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            out.append(float(value))
    return out


def wait_until(check: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def iter_sse(body: bytes) -> Iterator[dict[str, Any]]:
    for line in body.split(b"\n"):
        if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
            yield json.loads(line[6:])


def sidecar_stats(socket_path: str, path: str = "/stats") -> dict[str, Any]:
    """The sidecar's ``GET /stats`` (or another JSON ``path``) over its Unix socket."""
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(socket_path)

    conn = UnixConnection("sidecar")
    try:
        conn.request("GET", path)
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()
