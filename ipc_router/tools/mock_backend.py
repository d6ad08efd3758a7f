"""A mock OpenAI-compatible LLM backend, to try the gateway without an LLM; also used by tests, the demo and
benchmarks.

Plain asyncio + ``httptools`` (HTTP/1.1 with keep-alive and pipelining, chunked responses for SSE) + ``orjson``.

Endpoints
---------
``POST /v1/chat/completions``
    Non-streaming: a ``chat.completion`` object whose content is ``"word0 word1 ... word{N-1}"``.
    ``"stream": true``: ``text/event-stream`` (chunked), one ``chat.completion.chunk`` per output token, each in
    its own HTTP chunk, then a chunk with ``finish_reason: "stop"``, then (if ``stream_options.include_usage``)
    a chunk with ``"choices": []`` and the usage, then ``data: [DONE]``.
``GET /_mock/requests`` / ``DELETE /_mock/requests``
    The recorded requests as JSON (body as text) / clear them.
``GET /healthz``
    200.
anything else
    200 ``{"backend": NAME, "path": ..., "method": ...}``.

Every response carries ``x-mock-backend: NAME``.

Per-request overrides (request headers)
---------------------------------------
``x-mock-tokens``, ``x-mock-prompt-tokens``, ``x-mock-first-token-delay-ms``, ``x-mock-token-delay-ms``,
``x-mock-status`` (400-599: an OpenAI-style error body with that status; 2xx: ignored) and
``x-mock-cassette: NAME`` (replay status, content-type and body of ``<cassettes>/NAME.yaml`` verbatim; an SSE
body is sent one event per HTTP chunk). Overrides and cassettes apply to every path except ``/_mock/*`` and
``/healthz``, which are also the only requests not recorded.

Delays: a streaming response sends its headers at once, sleeps the first-token delay before the first chunk and
the token delay before each later token chunk. A non-streaming response is sent after
``first_token_delay + (N - 1) * token_delay``.

Use it
------
* CLI: ``ipc-router mock-backend --listen 127.0.0.1:8001 --name a`` (or ``python -m ipc_router.tools.mock_backend``;
  ``--help`` lists the options and their defaults); prints ``mock-backend a listening on http://127.0.0.1:PORT``
  on stdout once ready; exits on SIGTERM/SIGINT. Cassettes are read only from ``--cassettes DIR``.
* In-process (own loop in a daemon thread)::

      with MockBackend(name="a") as backend:      # or backend.start() ... backend.stop()
          url = backend.url                         # http://127.0.0.1:<backend.port>
          ...
          backend.requests                          # list[RecordedRequest]

* In a running loop: ``server = await serve(MockConfig(name="a", port=0))``, or ``MockApp`` for access to the
  recorded requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import orjson
import yaml

log = logging.getLogger("ipc_router.tools.mock_backend")

_CHAT_PATH = "/v1/chat/completions"
_REQUESTS_PATH = "/_mock/requests"


# --------------------------------------------------------------------------------------------------------------
# configuration and records


@dataclass
class MockConfig:
    """Server settings. Read on every request, so a running server picks up changes."""

    name: str = "mock"
    host: str = "127.0.0.1"
    port: int = 0
    tokens: int = 16
    first_token_delay: float = 0.0  # seconds
    token_delay: float = 0.0  # seconds
    prompt_tokens: int = 10
    cassettes: Path | None = None  # the directory x-mock-cassette names files in; None: cassettes are refused
    #: Tests of failover: every chat request gets this error status (400-599) when set.
    status: int | None = None
    #: Tests of streams cut short: a stream's connection is closed after this many chunks, without its end.
    abort_after: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # the request target as received, query string included
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    time: float  # time.time() when the request was complete
    monotonic: float  # time.monotonic() at the same moment
    client: str  # "host:port" of the peer (one value per connection; shows keep-alive)

    def json(self) -> Any:
        """Return the JSON-able form (body decoded as UTF-8 text, invalid bytes replaced)."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body.decode("utf-8", errors="replace"),
            "time": self.time,
            "client": self.client,
        }

    def json_body(self) -> Any:
        """Return the body parsed as JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Cassette:
    status: int
    content_type: str
    body: bytes

    @property
    def is_sse(self) -> bool:
        return self.content_type.split(";", 1)[0].strip().lower() == "text/event-stream"

    def events(self) -> list[bytes]:
        """Return the body split after each blank line (SSE event boundary); joined they equal ``body``."""
        parts: list[bytes] = []
        rest = self.body
        while rest:
            cut = rest.find(b"\n\n")
            if cut < 0:
                parts.append(rest)
                break
            parts.append(rest[: cut + 2])
            rest = rest[cut + 2 :]
        return parts


def load_cassette(path: Path, interaction: int = 0) -> Cassette:
    """Read the recorded response of a go-vcr (version 2) YAML cassette."""
    with path.open("rb") as f:
        doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    response = doc["interactions"][interaction]["response"]
    content_type = "application/octet-stream"
    for name, values in (response.get("headers") or {}).items():
        if str(name).lower() == "content-type" and values:
            content_type = str(values[0])
    body = response.get("body") or ""
    return Cassette(int(response["code"]), content_type, body.encode("utf-8"))


# --------------------------------------------------------------------------------------------------------------
# HTTP plumbing


@dataclass
class _Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    version: str


class _RequestParser:
    """httptools callbacks; completed requests queue up in ``done`` (pipelining)."""

    def __init__(self, on_expect_continue: Callable[[], None]) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: collections.deque[_Request] = collections.deque()
        self._on_expect_continue = on_expect_continue
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._url = []
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = val if old is None else f"{old}, {val}"

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue":
            self._on_expect_continue()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.done.append(
            _Request(
                method=self.parser.get_method().decode("latin-1"),
                url=b"".join(self._url).decode("latin-1"),
                headers=self._headers,
                body=b"".join(self._body),
                keep_alive=self.parser.should_keep_alive(),
                version=self.parser.get_http_version(),
            )
        )


class _Responder:
    """Writes one response; knows whether the connection survives it."""

    def __init__(self, writer: asyncio.StreamWriter, req: _Request, name: str) -> None:
        self.writer = writer
        self.req = req
        self.name = name
        self.keep_alive = req.keep_alive
        self.head_only = req.method == "HEAD"
        #: Close the connection after the chunks, without the stream's end (MockConfig.abort_after).
        self.abort = False

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", f"x-mock-backend: {self.name}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        if not self.keep_alive:
            lines.append("connection: close")
        elif self.req.version == "1.0":
            lines.append("connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = self._head(status, [("content-type", content_type), ("content-length", str(len(body)))])
        self.writer.write(head if self.head_only else head + body)
        await self.writer.drain()

    async def send_json(self, status: int, obj: Any) -> None:
        await self.send(status, orjson.dumps(obj))

    async def send_error(self, status: int, message: str, err_type: str | None = None, code: str | None = None) -> None:
        d_type, d_code = _error_kind(status)
        err = {"message": message, "type": err_type or d_type, "param": None, "code": code or d_code}
        await self.send_json(status, {"error": err})

    async def stream(self, status: int, content_type: str, chunks: Iterator[tuple[float, bytes]]) -> None:
        """Send ``chunks`` ((delay before it in seconds, data) pairs) as separate HTTP chunks, each flushed."""
        chunked = self.req.version != "1.0"
        if not chunked:  # HTTP/1.0 has no chunked encoding: the body ends when the connection does
            self.keep_alive = False
        headers = [("content-type", content_type), ("cache-control", "no-cache")]
        if chunked:
            headers.append(("transfer-encoding", "chunked"))
        self.writer.write(self._head(status, headers))
        await self.writer.drain()
        if self.head_only:
            return
        for delay, data in chunks:
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                continue
            self.writer.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            await self.writer.drain()
        if self.abort:
            self.keep_alive = False
            self.writer.transport.abort()
            return
        if chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()


def _error_kind(status: int) -> tuple[str, str]:
    kinds = {
        400: ("invalid_request_error", "bad_request"),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "permission_denied"),
        404: ("invalid_request_error", "not_found"),
        408: ("timeout_error", "timeout"),
        409: ("invalid_request_error", "conflict"),
        413: ("invalid_request_error", "request_too_large"),
        422: ("invalid_request_error", "unprocessable_entity"),
        429: ("requests", "rate_limit_exceeded"),
        503: ("server_error", "service_unavailable"),
    }
    if status in kinds:
        return kinds[status]
    return ("server_error", "server_error") if status >= 500 else ("invalid_request_error", "error")


class _BadOverride(ValueError):
    pass


def _header_number(headers: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadOverride(f"invalid {name}: {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadOverride(f"{name} out of range [{lo:g}, {hi:g}]: {raw!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# the application


class MockApp:
    """The mock server bound to one event loop. ``start()`` listens; ``close()`` stops and drops connections."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.server: asyncio.Server | None = None
        self._records: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._conns: set[asyncio.Task[None]] = set()
        self._cassettes: dict[tuple[Path, str], Cassette] = {}
        self._ids = itertools.count(1)

    # -- recorded requests (safe to call from any thread) --

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._records)

    def clear(self) -> None:
        with self._cond:
            self._records.clear()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block (in a thread other than the server's) until ``count`` requests are recorded."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._records) >= count, timeout):
                raise TimeoutError(f"{len(self._records)} requests recorded, wanted {count}")
            return list(self._records)

    def _record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self._records.append(rec)
            self._cond.notify_all()

    # -- lifecycle --

    @property
    def port(self) -> int:
        if self.server is None or not self.server.sockets:
            raise RuntimeError("not listening")
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> asyncio.Server:
        self.server = await asyncio.start_server(self._connection, self.config.host, self.config.port)
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    # -- connections --

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        parser = _RequestParser(lambda: writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"))
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                broken: str | None = None
                try:
                    parser.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    broken = "upgrade"  # answer what was parsed as plain HTTP/1.1, then close
                except httptools.HttpParserError as e:
                    broken = f"malformed HTTP request: {e}"
                while parser.done:
                    req = parser.done.popleft()
                    if broken is not None:
                        req.keep_alive = False
                    if not await self._respond(req, writer, client):
                        return
                if broken is not None:
                    if broken != "upgrade":
                        req = _Request("GET", "/", {}, b"", False, "1.1")
                        await _Responder(writer, req, self.config.name).send_error(400, broken)
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # server shutting down
        except Exception:
            log.exception("mock backend %s: connection %s failed", self.config.name, client)
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _respond(self, req: _Request, writer: asyncio.StreamWriter, client: str) -> bool:
        """Answer one request. Returns whether the connection stays open."""
        out = _Responder(writer, req, self.config.name)
        path = req.url.split("?", 1)[0]
        if path == _REQUESTS_PATH:
            if req.method in ("GET", "HEAD"):
                await out.send_json(200, [r.json() for r in self.requests])
            elif req.method == "DELETE":
                self.clear()
                await out.send_json(200, {"cleared": True})
            else:
                await out.send_error(405, f"method {req.method} not allowed on {path}")
            return out.keep_alive
        if path == "/healthz":
            await out.send_json(200, {"status": "ok", "backend": self.config.name})
            return out.keep_alive

        now = time.time()
        self._record(RecordedRequest(req.method, req.url, req.headers, req.body, now, time.monotonic(), client))
        try:
            await self._dispatch(req, path, out)
        except _BadOverride as e:
            await out.send_error(400, str(e), code="invalid_mock_header")
        return out.keep_alive

    async def _dispatch(self, req: _Request, path: str, out: _Responder) -> None:
        cfg = self.config
        h = req.headers
        first_delay = _header_number(h, "x-mock-first-token-delay-ms", cfg.first_token_delay * 1e3, 0, 3.6e6) / 1e3
        token_delay = _header_number(h, "x-mock-token-delay-ms", cfg.token_delay * 1e3, 0, 3.6e6) / 1e3

        cassette_name = h.get("x-mock-cassette")
        if cassette_name is not None:
            await self._replay(cassette_name.strip(), out, first_delay, token_delay)
            return

        if cfg.status is not None and path == _CHAT_PATH:
            await out.send_error(cfg.status, f"mock backend {cfg.name}: status {cfg.status} (configured)")
            return
        if "x-mock-status" in h:
            status = int(_header_number(h, "x-mock-status", 200, 200, 599))
            if status >= 400:
                message = f"mock backend {cfg.name}: status {status} requested by x-mock-status"
                await out.send_error(status, message)
                return
            if status >= 300:
                raise _BadOverride(f"x-mock-status must be 2xx or 400-599, got {status}")

        if path != _CHAT_PATH:
            await out.send_json(200, {"backend": cfg.name, "path": req.url, "method": req.method})
            return
        if req.method != "POST":
            await out.send_error(405, f"method {req.method} not allowed on {path}", code="method_not_allowed")
            return
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as e:
            await out.send_error(400, f"We could not parse the JSON body of your request. ({e})", code="invalid_json")
            return
        if not isinstance(body, dict):
            await out.send_error(400, "The request body must be a JSON object.", code="invalid_json")
            return

        n_tokens = int(_header_number(h, "x-mock-tokens", cfg.tokens, 0, 1e7))
        n_prompt = int(_header_number(h, "x-mock-prompt-tokens", cfg.prompt_tokens, 0, 1e9))
        model = body.get("model")
        model = model if isinstance(model, str) else "mock-model"
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_tokens, "total_tokens": n_prompt + n_tokens}
        cid = f"chatcmpl-mock-{cfg.name}-{next(self._ids)}"
        created = int(time.time())

        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            chunks = _sse_chunks(cid, created, model, n_tokens, usage, include_usage, first_delay, token_delay)
            if cfg.abort_after is not None:
                chunks = itertools.islice(chunks, cfg.abort_after)
                out.abort = True
            await out.stream(200, "text/event-stream", chunks)
            return

        delay = first_delay + max(0, n_tokens - 1) * token_delay
        if delay > 0:
            await asyncio.sleep(delay)
        content = " ".join(f"word{i}" for i in range(n_tokens))
        completion = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
            "system_fingerprint": None,
        }
        await out.send_json(200, completion)

    async def _replay(self, name: str, out: _Responder, first_delay: float, token_delay: float) -> None:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise _BadOverride(f"invalid x-mock-cassette: {name!r}")
        base = self.config.cassettes
        if base is None:
            await out.send_error(500, "no cassette directory (set --cassettes)", code="cassette_dir_not_found")
            return
        key = (base, name)
        cassette = self._cassettes.get(key)
        if cassette is None:
            path = base / f"{name}.yaml"
            if not path.is_file():
                await out.send_error(404, f"no cassette {name!r} in {base}", code="cassette_not_found")
                return
            cassette = load_cassette(path)
            self._cassettes[key] = cassette
        if not cassette.is_sse:
            if first_delay > 0:
                await asyncio.sleep(first_delay)
            await out.send(cassette.status, cassette.body, cassette.content_type)
            return
        events = cassette.events()
        delays = itertools.chain([first_delay], itertools.repeat(token_delay))
        await out.stream(cassette.status, cassette.content_type, zip(delays, events, strict=False))


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _sse_chunks(
    cid: str,
    created: int,
    model: str,
    n_tokens: int,
    usage: dict[str, int],
    include_usage: bool,
    first_delay: float,
    token_delay: float,
) -> Iterator[tuple[float, bytes]]:
    def chunk(choices: list[Any], usage_value: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage_value
        return _sse(obj)

    for i in range(n_tokens):
        delta: dict[str, Any] = {"role": "assistant", "content": "word0"} if i == 0 else {"content": f" word{i}"}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        yield (first_delay if i == 0 else token_delay), chunk([choice])
    finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    yield (first_delay if n_tokens == 0 else 0.0), chunk([finish])
    if include_usage:
        yield 0.0, chunk([], usage)
    yield 0.0, b"data: [DONE]\n\n"


async def serve(config: MockConfig, app: MockApp | None = None) -> asyncio.Server:
    """Start listening in the running loop and return the server (``app`` to keep access to the records)."""
    if app is None:
        app = MockApp(config)
    else:
        app.config = config
    return await app.start()


# --------------------------------------------------------------------------------------------------------------
# background-thread wrapper


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is importable, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class MockBackend:
    """A mock backend running its own event loop in a daemon thread.

    ``start()`` returns once listening (``port`` then holds the real port); ``stop()`` closes the listener and all
    connections. Also a context manager.
    """

    def __init__(
        self,
        name: str = "mock",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: int = 16,
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        prompt_tokens: int = 10,
        cassettes: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = MockConfig(
            name=name,
            host=host,
            port=port,
            tokens=tokens,
            first_token_delay=first_token_delay,
            token_delay=token_delay,
            prompt_tokens=prompt_tokens,
            cassettes=Path(cassettes) if cassettes is not None else None,
        )
        self.app = MockApp(self.config)
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far (not ``/_mock/*`` or ``/healthz``)."""
        return self.app.requests

    def clear(self) -> None:
        self.app.clear()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self.app.wait_for_requests(count, timeout)

    def start(self, timeout: float = 10.0) -> MockBackend:
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                await self.app.start()
                self.port = self.app.port
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.app.close()

        def run() -> None:
            loop = self._loop = new_event_loop()
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"mock-backend-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"mock backend {self.name} did not start within {timeout}s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> MockBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)


DESCRIPTION = (
    "A mock OpenAI-compatible LLM backend: POST /v1/chat/completions answers with N words (streamed as SSE when "
    "the request says stream: true, with usage when it asks for it), after the configured delays. Request "
    "headers override per request: x-mock-tokens, x-mock-prompt-tokens, x-mock-first-token-delay-ms, "
    "x-mock-token-delay-ms, x-mock-status (400-599), x-mock-cassette (NAME.yaml in --cassettes). "
    "GET /_mock/requests lists what it received. Prints 'mock-backend NAME listening on URL' when ready."
)


def add_arguments(p: argparse.ArgumentParser, *, log_level: bool = True) -> None:
    """The mock's options, on ``p`` (``python -m ipc_router.tools.mock_backend`` and ``ipc-router mock-backend``)."""
    # A string default goes through type= too: --help shows it as written.
    p.add_argument("--listen", type=parse_listen, default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where to listen; port 0 picks a free one")  # fmt: skip
    p.add_argument("--name", default="mock", help="backend name, in the x-mock-backend response header")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per response")
    p.add_argument("--prompt-tokens", type=int, default=10, help="usage.prompt_tokens")
    p.add_argument("--first-token-delay", type=float, default=0.0, metavar="SECONDS",
                   help="delay before the first token")  # fmt: skip
    p.add_argument("--token-delay", type=float, default=0.0, metavar="SECONDS", help="delay before each later token")
    p.add_argument("--cassettes", type=Path, default=None, metavar="DIR",
                   help="directory of go-vcr cassettes for x-mock-cassette; without it such requests get 500")
    if log_level:
        p.add_argument("--log-level", default="WARNING", help="Python logging level")


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ipc_router.tools.mock_backend", description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    add_arguments(p)
    return p


async def _amain(config: MockConfig) -> None:
    app = MockApp(config)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"mock-backend {config.name} listening on http://{host}:{app.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await app.close()


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT with the options of :func:`add_arguments`."""
    host, port = args.listen
    config = MockConfig(
        name=args.name,
        host=host,
        port=port,
        tokens=args.tokens,
        first_token_delay=args.first_token_delay,
        token_delay=args.token_delay,
        prompt_tokens=args.prompt_tokens,
        cassettes=args.cassettes,
    )
    coro: Coroutine[Any, Any, None] = _amain(config)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(coro)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
