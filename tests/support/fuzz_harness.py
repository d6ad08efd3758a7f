"""Fuzzing the sidecar's socket side: seeds, a mutator, the checks every answer must pass, and the ``make fuzz`` driver.

Two targets:

* **sans-IO** — bytes → :class:`~ipc_router.protocol.Connection` (fed in pieces) → :meth:`Service.handle` →
  :func:`encode_response`, plus the completions' ``after`` work (usage extraction on fuzzed bodies). Fast: this is
  where the 10^5 inputs go.
* **socket** — the same bytes to a real ``ipc-router serve`` subprocess over its Unix socket, with a router that
  answers some requests asynchronously; the client half-closes, and reads until the server closes.

An input *crashes* when anything raises out of the protocol or the service, when the answer is a 500 (the server's
safety net for an ipc_router bug), or when the subprocess dies or logs a traceback. It *hangs* when one input takes
longer than ``HANG_SECONDS`` (sans-IO) or the server has not closed ``HANG_SECONDS`` after the client's half-close.
Every reply must be a sequence of well-formed HTTP/1.1 responses (httptools' response parser, ``content-length``
exact, nothing left over), one per request, and a connection-closing error only as the last one.

``python tests/support/fuzz_harness.py --inputs N [--socket-inputs M] [--atheris]`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import msgpack
import orjson

from ipc_router.filterapi import parse_config
from ipc_router.protocol import JSON, MSGPACK, Connection
from ipc_router.router import Routing
from ipc_router.server import Settings, _SidecarProtocol
from ipc_router.service import Response, Service

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[1]
HANG_SECONDS = 2.0
#: Small limits, so that mutated inputs reach them (the defaults are pinned by their own tests).
MAX_HEADER_BYTES, MAX_BODY_BYTES, MAX_HEADERS = 2048, 4096, 20
#: The socket target's router: sync, async when a route message has ``x-sleep-ms``, raising on ``x-boom``.
ASYNC_ROUTER = ("--router", "plugins_for_tests:mixed_router", "--router-timeout", "0.5")
FUZZ_ID = "fz-1"  # the id of a routed request the completions in the seeds refer to

CONFIG_YAML = """\
rules:
- name: gpt
  headers: [{name: x-ai-eg-model, value: gpt-4o-mini}]
  backends: [{name: openai, weight: 2}, {name: azure, schema: {name: AzureOpenAI}}]
- name: llama
  headers: [{type: RegularExpression, name: x-ai-eg-model, value: "llama-.*"}]
  backends: [{name: kserve}]
"""

USAGE = b'{"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
SSE = b'data: {"choices":[]}\n\ndata: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n'


# --- seeds --------------------------------------------------------------------------------------------------------


def http(method: str, path: str, body: bytes = b"", ctype: str | None = MSGPACK, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n"
    if ctype and body:
        head += f"content-type: {ctype}\r\n"
    if body or method == "POST":
        head += f"content-length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def encode(value: Any, fmt: str) -> bytes:
    if fmt == JSON:
        return orjson.dumps(value, default=lambda b: b.decode("latin-1"))
    return msgpack.packb(value, use_bin_type=True)


def route_message(model: Any = "gpt-4o-mini", headers: dict[str, str] | None = None) -> dict[str, Any]:
    body = orjson.dumps({"model": model})
    return {"path": "/v1/chat/completions", "headers": headers or {"x-team": "a"}, "body": body}


def seeds() -> list[bytes]:
    out: list[bytes] = []
    for fmt in (MSGPACK, JSON):
        for model in ("gpt-4o-mini", "llama-3", "claude", "", 7):
            out.append(http("POST", "/route", encode(route_message(model), fmt), fmt))
        for body, stream in ((USAGE, False), (SSE, True), (b"", False), (b"{", False)):
            msg = {"id": FUZZ_ID, "status": 200, "t_first": 1, "t_end": 2, "stream": stream, "body": body}
            out.append(http("POST", "/complete", encode(msg, fmt), fmt))
        out.append(http("POST", "/complete", encode({"id": FUZZ_ID, "status": 502, "truncated": True}, fmt), fmt))
        record = {"t": 1, "t_end": 2, "status": 200, "model": "gpt-4o-mini", "rule": "gpt", "backend": "openai",
                  "headers": {"x-team": "a"}, "body": USAGE}  # fmt: skip
        out.append(http("POST", "/record", encode(record, fmt), fmt))
        out.append(http("POST", "/record", encode({**record, "stream": True, "t_first": 1, "body": SSE}, fmt), fmt))
    for path in ("/healthz", "/v1/models", "/stats", "/nope", "/route"):
        out.append(http("GET", path))
    route = encode(route_message(), MSGPACK)
    out.append(  # chunked
        b"POST /route HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(route), route)
    )
    out.append(http("POST", "/route", route, extra="connection: close\r\n"))
    out.append(http("GET", "/healthz") + http("POST", "/route", route) + http("GET", "/stats"))  # pipelined
    out.append(b"GET /healthz HTTP/1.0\r\n\r\n")
    out.append(b"GET /healthz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    return out


# --- mutator ------------------------------------------------------------------------------------------------------

TOKENS = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\x00", b"\xff", b" ", b":", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
    b"content-length: 99999999999999999999\r\n", b"content-length: -1\r\n", b"content-length: 5\r\n",
    b"transfer-encoding: chunked\r\n", b"transfer-encoding: gzip, chunked\r\n", b"connection: close\r\n",
    b"connection: upgrade\r\nupgrade: h2c\r\n", b"content-type: application/json\r\n",
    b"content-type: text/plain\r\n", b"expect: 100-continue\r\n", b"ffffffffffffffff\r\n", b"0\r\n\r\n",
    b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x91" * 1500, b"[" * 1500,
    b"\xc1", b"\xd4\x00\x00", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xa4path", b"\xa7headers", b"\xa2id",
    b"x-h: " + b"v" * 3000 + b"\r\n", b"".join(b"x-%d: v\r\n" % i for i in range(30)),
    b"POST /route HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\n\r\n", b"CONNECT a:1 HTTP/1.1\r\n\r\n",
]  # fmt: skip

NAMES = ["path", "headers", "body", "t", "id", "status", "t_first", "t_end", "stream", "truncated", "model", "x",
         "rule", "gen", "backend"]  # fmt: skip


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """A random msgpack/JSON-able value, biased toward the messages' own field names and types."""
    kind = rnd.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.choice([True, False])
    if kind == 2:
        return rnd.choice([0, 1, -1, 200, 2**31, -(2**63), 2**64 - 1, rnd.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rnd.choice([0.0, -1.5, 1e308, float("inf")])
    if kind in (4, 5):
        return rnd.choice(["", FUZZ_ID, "gpt-4o-mini", "llama-x", "/v1/chat/completions", "é", "\x00", "a" * 300])
    if kind == 6:
        return rnd.choice([b"", USAGE, SSE, b'{"model":"gpt-4o-mini"}', b'{"model":', rnd.randbytes(20)])
    if kind == 7:
        return orjson.dumps({"model": rnd.choice(["gpt-4o-mini", "llama-1", 1, None, ["a"]]), "n": depth})
    if kind in (8, 9):
        return {rnd.choice(NAMES): random_value(rnd, depth + 1) for _ in range(rnd.randrange(6))}
    if kind == 10:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {"x-" + str(i): "v" for i in range(rnd.choice([1, 20, 1025]))}


def structured(rnd: random.Random) -> bytes:
    """A well-framed request whose body is a random message: reaches the service rather than the parser."""
    fmt = rnd.choice([MSGPACK, JSON, MSGPACK, "text/plain"])
    base: dict[str, Any] = (
        route_message(rnd.choice(["gpt-4o-mini", "llama-2", "none"]))
        if rnd.random() < 0.5
        else {"id": FUZZ_ID, "status": 200, "body": rnd.choice([USAGE, SSE]), "stream": rnd.random() < 0.5}
    )
    if "headers" in base and rnd.random() < 0.3:  # the socket target's router answers these asynchronously / raises
        base["headers"] = {rnd.choice(["x-sleep-ms", "x-boom"]): rnd.choice(["1", "5", "x"])}
    for _ in range(rnd.randrange(3)):
        base[rnd.choice(NAMES)] = random_value(rnd)
    if rnd.random() < 0.1:
        base = random_value(rnd)
    try:
        body = encode(base, JSON if fmt == JSON else MSGPACK)
    except (TypeError, OverflowError, ValueError):
        body = rnd.randbytes(10)
    if rnd.random() < 0.3:
        body = mutate_bytes(rnd, body, [body])
    return http(rnd.choice(["POST", "POST", "GET", "PUT"]), rnd.choice(["/route", "/complete", "/record"]), body, fmt)


def mutate_bytes(rnd: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randrange(1, 5)):
        op = rnd.randrange(8)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1:  # insert a token
            buf[pos:pos] = rnd.choice(TOKENS)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rnd.randbytes(rnd.randrange(1, 16))
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rnd.randrange(1, 32)]
        elif op == 4 and buf:  # duplicate a range
            end = min(len(buf), pos + rnd.randrange(1, 64))
            buf[pos:pos] = buf[pos:end]
        elif op == 5:  # splice another input
            other = rnd.choice(pool)
            cut = rnd.randrange(len(other) + 1)
            buf[pos:] = other[cut:] if rnd.random() < 0.5 else other
        elif op == 6 and buf:  # overwrite a byte with an interesting one
            buf[rnd.randrange(len(buf))] = rnd.choice(b"\x00\xff\r\n :0\x7f\x80\xc0\xde\xdf")
        elif op == 7:  # truncate
            del buf[pos:]
    return bytes(buf)


def generate(seed: int, n: int) -> Iterator[bytes]:
    """``n`` inputs, the same for the same seed: structured requests, mutated seeds, and pipelines of both."""
    rnd = random.Random(seed)
    pool = seeds()
    yield from pool
    for _ in range(max(0, n - len(pool))):
        r = rnd.random()
        if r < 0.35:
            data = structured(rnd)
        elif r < 0.9:
            data = mutate_bytes(rnd, rnd.choice(pool), pool)
        else:
            data = b"".join(rnd.choice(pool) for _ in range(rnd.randrange(2, 6)))
            data = mutate_bytes(rnd, data, pool) if rnd.random() < 0.5 else data
        if rnd.random() < 0.02:
            pool.append(data)  # grow the corpus a little, as a coverage-blind fuzzer can
        yield data


# --- checks -------------------------------------------------------------------------------------------------------


class Failure(AssertionError):
    """An input broke a rule: a crash, or a reply that is not well-formed HTTP."""


@dataclass
class Parsed:
    status: int
    headers: dict[str, str]
    body: bytes


class _ResponseSink:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Parsed] = []
        self.in_message = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._headers, self._body, self.in_message = {}, [], True

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in self._headers:
            raise Failure(f"repeated header {key}")
        self._headers[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.done.append(Parsed(self.parser.get_status_code(), self._headers, b"".join(self._body)))


def parse_responses(data: bytes) -> list[Parsed]:
    """Every response in ``data``; raises :class:`Failure` unless it is whole, well-formed HTTP/1.1."""
    sink = _ResponseSink()
    try:
        sink.parser.feed_data(data)
    except httptools.HttpParserCallbackError as e:
        raise Failure(str(e.__context__ or e)) from None
    except httptools.HttpParserError as e:
        raise Failure(f"malformed response ({e}): {data[:300]!r}") from None
    if sink.in_message:
        raise Failure(f"incomplete response: {data[-300:]!r}")
    if data and not data.startswith(b"HTTP/1.1 "):
        raise Failure(f"not an HTTP/1.1 response: {data[:80]!r}")
    out = sink.done
    for i, r in enumerate(out):
        if r.status >= 500 and r.status != 503:
            raise Failure(f"a {r.status}: {r.body[:200]!r}")  # an ipc_router bug caught by the safety net
        if r.status not in (200, 204, 400, 404, 405, 409, 413, 415, 431, 503):  # 409: /record, no fast path
            raise Failure(f"unexpected status {r.status}")
        if r.headers.get("connection") == "close" and i != len(out) - 1:
            raise Failure("a response after connection: close")
        if r.status == 204:
            if r.body or "content-length" in r.headers:
                raise Failure("a 204 with a body")
            continue
        if int(r.headers.get("content-length", -1)) != len(r.body):
            raise Failure(f"content-length {r.headers.get('content-length')} for {len(r.body)} bytes")
        ctype = r.headers.get("content-type")
        if ctype not in (JSON, MSGPACK):
            raise Failure(f"content-type {ctype!r}")
        try:
            orjson.loads(r.body) if ctype == JSON else msgpack.unpackb(r.body)
        except (ValueError, msgpack.UnpackException) as e:
            raise Failure(f"{ctype} body does not decode ({e!r}): {r.body[:200]!r}") from None
    return out


# --- the sans-IO target -------------------------------------------------------------------------------------------


def new_service() -> Service:
    return Service(Routing(parse_config(CONFIG_YAML)), request_ttl=600.0)


def _prime(svc: Service) -> None:
    """Make ``FUZZ_ID`` a request in flight, so that fuzzed completions reach the metrics."""
    if FUZZ_ID in svc.in_flight:
        return
    body = encode(route_message(), MSGPACK)
    resp = svc.handle(Connection().feed(http("POST", "/route", body))[0])
    assert isinstance(resp, Response) and resp.status == 200, resp
    key = msgpack.unpackb(resp.body)["id"]
    if key in svc.in_flight:  # not when the metrics plugin failed (the request is then not tracked)
        svc.in_flight[FUZZ_ID] = svc.in_flight.pop(key)


class FakeTransport:
    """What :class:`_SidecarProtocol` needs of a transport, recording what it writes."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise Failure("write after close")
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeSidecar:
    """The parts of :class:`~ipc_router.server.Sidecar` a connection uses."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = Settings(
            socket="unused", max_header=MAX_HEADER_BYTES, max_body=MAX_BODY_BYTES, max_headers=MAX_HEADERS
        )
        self.connections: set[Any] = set()
        self.tasks: set[Any] = set()


def exchange(svc: Service, data: bytes, cuts: Iterable[int] = ()) -> bytes:
    """What the server's connection code writes for ``data`` arriving in pieces cut at ``cuts``; raises on a crash
    or a malformed reply. The real ``_SidecarProtocol``, with a fake transport: no socket, no event loop."""
    _prime(svc)
    transport = FakeTransport()
    proto = _SidecarProtocol(FakeSidecar(svc))  # type: ignore[arg-type]
    proto.connection_made(transport)  # type: ignore[arg-type]
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(bounds):
        if transport.closed:
            break
        proto.data_received(data[a:b])
    proto.connection_lost(None)
    reply = b"".join(transport.out)
    parse_responses(reply)
    return reply


@dataclass
class Figures:
    target: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    slowest_ms: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, data: bytes, elapsed: float, reply: bytes | None, error: BaseException | None) -> None:
        self.inputs += 1
        self.slowest_ms = max(self.slowest_ms, elapsed * 1000)
        if elapsed > HANG_SECONDS:
            self.hangs += 1
            self.failures.append(f"hang ({elapsed:.1f}s): {data[:200]!r}")
        if error is not None:
            self.crashes += 1
            self.failures.append(f"{type(error).__name__}: {error} <- {data[:300]!r}")
        elif reply:
            for line in reply.split(b"\r\n"):
                if line.startswith(b"HTTP/1.1 "):
                    status = int(line[9:12])
                    self.statuses[status] = self.statuses.get(status, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target, "inputs": self.inputs, "crashes": self.crashes, "hangs": self.hangs,
            "seconds": round(self.seconds, 1), "slowest_input_ms": round(self.slowest_ms, 1),
            "statuses": dict(sorted(self.statuses.items())), "limits": dict(sorted(self.limits.items())),
            "failures": self.failures[:10],
        }  # fmt: skip


class _Errors(logging.Handler):
    """The ERROR records ipc_router logs: its safety nets (``internal error``, ``error after answering``) log
    there and keep serving, so a fuzz target must look."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def fuzz_sans_io(inputs: Iterable[bytes], seed: int = 0, svc: Service | None = None) -> Figures:
    figures = Figures("sans-io")
    svc = svc if svc is not None else new_service()
    rnd = random.Random(seed)
    errors = _Errors()
    logger = logging.getLogger("ipc_router")
    logger.addHandler(errors)
    started = time.perf_counter()
    try:
        for data in inputs:
            cuts = [rnd.randrange(len(data) + 1) for _ in range(rnd.choice([0, 0, 1, 3, 10]))]
            t = time.perf_counter()
            reply: bytes | None = None
            error: BaseException | None = None
            try:
                reply = exchange(svc, data, cuts)
                if errors.records:
                    record = errors.records.pop()
                    errors.records.clear()
                    raise Failure(f"logged: {record.getMessage()} {record.exc_info[1] if record.exc_info else ''}")
            except Exception as e:
                error = e
            figures.add(data, time.perf_counter() - t, reply, error)
    finally:
        logger.removeHandler(errors)
    figures.seconds = time.perf_counter() - started
    figures.limits = dict(svc.stats.limits)
    return figures


# --- the socket target --------------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPC_ROUTER_") and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(REPO)])
    return env


class LiveServer:
    """``ipc-router serve`` on a socket under /tmp, with the fuzz limits; stopped by ``close``."""

    def __init__(self, *extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="iprfz", dir="/tmp"))
        (self.dir / "config.yaml").write_text(CONFIG_YAML)
        self.socket = str(self.dir / "s.sock")
        self.log = self.dir / "server.log"
        args = [
            "--config", str(self.dir / "config.yaml"), "--max-header", str(MAX_HEADER_BYTES),
            "--max-body", str(MAX_BODY_BYTES), "--max-headers", str(MAX_HEADERS), *extra,
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ipc_router.cli", "serve", "--socket", self.socket, *args],
                env=subprocess_env(), cwd="/tmp", stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"sidecar did not start:\n{self.output()}")
            time.sleep(0.02)

    def _healthy(self) -> bool:
        try:
            return exchange_socket(self.socket, http("GET", "/healthz"))[0].startswith(b"HTTP/1.1 200 ")
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def exchange_socket(path: str, data: bytes, timeout: float = HANG_SECONDS) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read until the server closes. Returns (reply, closed within ``timeout``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first (an error answer): what it sent is still readable
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            if time.monotonic() > deadline:
                return b"".join(chunks), False


def fuzz_socket(server: LiveServer, inputs: Iterable[bytes]) -> Figures:
    """Each input on a new connection; the reply must hold as many answers as the sans-IO target gives."""
    figures = Figures("socket")
    reference = new_service()
    started = time.perf_counter()
    for data in inputs:
        t = time.perf_counter()
        error: BaseException | None = None
        reply = b""
        try:
            reply, closed = exchange_socket(server.socket, data)
            if not closed:
                figures.hangs += 1
                figures.failures.append(f"no close within {HANG_SECONDS}s: {data[:200]!r}")
            got, expected = len(parse_responses(reply)), len(parse_responses(exchange(reference, data)))
            if got != expected:
                raise Failure(f"{got} answers on the socket, {expected} in-process")
        except Exception as e:
            error = e
        if server.proc.poll() is not None:
            error = Failure(f"the sidecar exited with {server.proc.returncode}")
        figures.add(data, time.perf_counter() - t, reply, error)
        if server.proc.poll() is not None:
            break
    figures.seconds = time.perf_counter() - started
    with contextlib.suppress(Exception):  # the figures only; a dead server is already a crash
        [stats] = parse_responses(exchange_socket(server.socket, http("GET", "/stats"))[0])
        figures.limits = orjson.loads(stats.body)["limits"]
    log = server.output()
    # The server's safety nets and asyncio's last-resort handler; a custom router raising is logged on purpose.
    if any(m in log for m in ("internal error", "error after answering", "Exception in callback", "never retrieved")):
        figures.crashes += 1
        figures.failures.append("traceback in the sidecar's log:\n" + log[-2000:])
    return figures


# --- atheris ------------------------------------------------------------------------------------------------------


def run_atheris(argv: list[str]) -> None:
    """Coverage-guided (libFuzzer via atheris) over the sans-IO target; the seeds are its starting corpus."""
    import atheris

    atheris.instrument_all()  # the Python code already imported (ipc_router's included) reports coverage

    corpus = Path("/tmp/ipc-router-fuzz-corpus")  # kept between runs: libFuzzer adds what found new coverage
    corpus.mkdir(exist_ok=True)
    for i, seed in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    svc = new_service()

    def one(data: bytes) -> None:
        rnd = random.Random(zlib.crc32(data))  # the cuts follow from the input, so a crash replays
        exchange(svc, data, [rnd.randrange(len(data) + 1) for _ in range(rnd.choice([0, 1, 3]))])

    # libFuzzer reads seeds from the corpus directory and ends on -runs / -max_total_time, or at the first crash.
    atheris.Setup([sys.argv[0], *argv, str(corpus)], one)
    atheris.Fuzz()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--inputs", type=int, default=100_000, help="sans-IO inputs from the seeded generator")
    p.add_argument("--socket-inputs", type=int, default=5_000, help="inputs sent to a real sidecar")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--atheris", nargs=argparse.REMAINDER, help="run atheris with these libFuzzer flags instead")
    args = p.parse_args()
    if args.atheris is not None:
        run_atheris(args.atheris)
        return 0
    results = [fuzz_sans_io(generate(args.seed, args.inputs), args.seed).summary()]
    if args.socket_inputs:
        server = LiveServer(*ASYNC_ROUTER)
        try:
            results.append(fuzz_socket(server, generate(args.seed + 1, args.socket_inputs)).summary())
        finally:
            server.close()
    print(json.dumps(results, indent=2))
    return 1 if any(r["crashes"] or r["hangs"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

