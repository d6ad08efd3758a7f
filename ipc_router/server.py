"""The sidecar process: a Unix-socket server on uvloop, config hot reload, plugins, signals.

Thin adapters only: bytes go to :class:`~ipc_router.protocol.Connection`, requests to
:class:`~ipc_router.service.Service`, answers back to the socket in one ``write`` each, in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import stat
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson

from ipc_router import extensions, shm
from ipc_router.aggregate import Aggregator
from ipc_router.budgets import rls_socket_path
from ipc_router.config import (
    Config,
    ConfigError,
    budgets_not_in_bootstrap,
    default_config,
    load_config,
    not_in_bootstrap,
)
from ipc_router.fastpath import DrainPace, FastPath, open_fast_path, retire_segment, segment_path
from ipc_router.plugins import METRICS_GROUP, ROUTERS_GROUP, PluginError, load_plugin
from ipc_router.protocol import (
    JSON,
    Connection,
    ProtocolError,
    Request,
    encode_response,
)
from ipc_router.router import Routing
from ipc_router.service import Response, Service, parse_header_attributes
from ipc_router.settings import Settings, resolve
from ipc_router.telemetry import Telemetry, start_telemetry

__all__ = ["Settings", "Sidecar", "load_routing", "read_config", "routing_for", "run"]

log = logging.getLogger("ipc_router")


def read_config(path: str | None) -> Config:
    """The config file (a missing file, or none: the default config, with no rules). Raises ConfigError."""
    if path is None or not os.path.exists(path):
        if path is not None:
            log.warning("config file %s does not exist: using the default config (no rules)", path)
        return default_config()
    return load_config(path)


def load_routing(
    path: str | None, new_custom_router: extensions.NewCustomRouterFn | None, generation: int, cache_size: int = 4096
) -> Routing:
    """Read the config (missing file: default config) and build its routing. Raises ConfigError, or PluginError
    when a custom router factory raises."""
    return routing_for(read_config(path), path, new_custom_router, generation, cache_size)


def routing_for(
    config: Config,
    path: str | None,
    new_custom_router: extensions.NewCustomRouterFn | None,
    generation: int,
    cache_size: int = 4096,
) -> Routing:
    """The routing of a config read from ``path`` (see :func:`load_routing`)."""
    for warning in config.warnings:
        log.warning("config %s: %s (ignored)", path, warning)
    try:
        return Routing(config, new_custom_router, cache_size=cache_size, generation=generation)
    except Exception as e:
        if new_custom_router is None:
            raise
        name = getattr(new_custom_router, "__qualname__", repr(new_custom_router))
        raise PluginError(f"custom router factory {name} raised {type(e).__name__}: {e}") from e


class _SidecarProtocol(asyncio.Protocol):
    """One connection. Answers go out in request order; the answers to one read are written together."""

    __slots__ = ("_after", "_closing", "_conn", "_out", "_pending", "_server", "_transport")

    def __init__(self, server: Sidecar) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        settings = server.settings
        self._conn = Connection(settings.max_header, settings.max_body, settings.max_headers)
        # Answers waiting behind an async one, in request order: bytes, or (task, keep_alive).
        self._pending: deque[bytes | tuple[asyncio.Task[Response], bool]] = deque()
        self._out: list[bytes] = []
        self._after: list[Callable[[], None]] = []
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        server = self._server
        settings, stats = server.settings, server.service.stats
        if (settings.allow_uid or settings.allow_gid) and not _peer_allowed(transport, settings):
            stats.refused_peers += 1
            self._closing = True
            self._transport.close()  # not a byte to a peer we do not serve
            return
        if len(server.connections) >= settings.max_connections:
            stats.limits["connections"] += 1
            self._closing = True
            busy = f"more than {settings.max_connections} connections"
            self._transport.write(encode_response(503, orjson.dumps({"error": busy}), JSON, keep_alive=False))
            self._transport.close()
            return
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for item in self._pending:
            if isinstance(item, tuple):
                item[0].cancel()
        self._pending.clear()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # framing was lost or the client said close: nothing more is read
        error: ProtocolError | None = None
        try:
            requests = self._conn.feed(data)
        except ProtocolError as e:
            requests, error = e.completed, e
        settings = self._server.settings
        for req in requests:
            if len(self._pending) >= settings.max_pipeline:
                # Too many answers queued behind a slow one: refuse the rest rather than hold them all.
                self._server.service.stats.limits["pipeline"] += 1
                busy = f"more than {settings.max_pipeline} pipelined requests waiting"
                self._emit(encode_response(503, orjson.dumps({"error": busy}), JSON, keep_alive=False))
                self._closing = True
                break
            self._answer(req)
            if not req.keep_alive:
                self._closing = True  # bytes after it (llhttp's "data after close" error) get no answer
                break
        if error is not None and not self._closing:
            if error.limit is not None:
                self._server.service.stats.limits[error.limit] += 1
            self._emit(encode_response(error.status, orjson.dumps({"error": error.message}), JSON, keep_alive=False))
            self._closing = True
        self._write_out()

    def _answer(self, req: Request) -> None:
        try:
            result = self._server.service.handle(req)
        except Exception:  # the service guards plugins itself; this is a bug in ipc_router, but we keep serving
            log.exception("internal error handling %s %s", req.method, req.path)
            self._emit(encode_response(500, b'{"error":"internal error"}', JSON, req.keep_alive))
            return
        if isinstance(result, Response):
            self._emit(encode_response(result.status, result.body, result.content_type, req.keep_alive))
            if result.after is not None:
                self._after.append(result.after)
            return
        task = asyncio.ensure_future(_await(result))
        self._server.tasks.add(task)
        task.add_done_callback(self._task_done)
        self._pending.append((task, req.keep_alive))

    def _emit(self, data: bytes) -> None:
        (self._pending if self._pending else self._out).append(data)

    def _write_out(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._out:
            out, self._out = self._out, []
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._after:
            after, self._after = self._after, []
            for fn in after:
                try:
                    fn()
                except Exception:
                    log.exception("error after answering")
        if self._closing and not self._pending:
            transport.close()

    def _task_done(self, task: asyncio.Task[Response]) -> None:
        self._server.tasks.discard(task)
        pending = self._pending
        while pending:
            head = pending[0]
            if isinstance(head, bytes):
                pending.popleft()
                self._out.append(head)
                continue
            task, keep_alive = head
            if not task.done():
                break
            pending.popleft()
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                log.error("internal error in async route", exc_info=exc)
                self._out.append(encode_response(500, b'{"error":"internal error"}', JSON, keep_alive))
                continue
            result = task.result()
            self._out.append(encode_response(result.status, result.body, result.content_type, keep_alive))
            if result.after is not None:
                self._after.append(result.after)
        self._write_out()

    def eof_received(self) -> bool:
        # A client that half-closes still gets the answers queued behind an async one; then the connection closes.
        self._closing = True
        return bool(self._pending)

    # Flow control: a client that sends but does not read stops being read once its answers fill the buffer.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def idle(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _await(pending: Awaitable[Response]) -> Response:
    return await pending


class Sidecar:
    """One running sidecar: socket, service, reloader, telemetry."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None, config: Config | None = None) -> None:
        """``config``: the file ``settings.config`` names, already read and its ``server:`` section applied to
        ``settings`` (:func:`ipc_router.settings.resolve`), as the CLI does; when ``None``, both are done here."""
        if config is None:
            config = read_config(settings.config)
            settings = resolve(dataclasses.asdict(settings), config.server)
        self.settings = settings
        self.telemetry = telemetry
        self.router_spec = router_spec = settings.router
        self.metrics_spec = metrics_spec = settings.metrics
        self.new_custom_router: extensions.NewCustomRouterFn | None = (
            load_plugin(router_spec, ROUTERS_GROUP, settings.app_dir) if router_spec else extensions.new_custom_router
        )
        metrics_factory: extensions.NewCustomChatCompletionMetricsFn | None = (
            load_plugin(metrics_spec, METRICS_GROUP, settings.app_dir) if metrics_spec else None
        )
        header_attrs = parse_header_attributes(settings.metrics_request_header_attributes)
        self.generation = 1
        routing = routing_for(config, settings.config, self.new_custom_router, self.generation, settings.cache_size)
        self.started_with = routing.config  # what the bootstrap of the running Envoy was presumably made from
        if settings.cds_path is not None and not self._write_clusters(routing.config):
            raise ValueError(f"cannot write the clusters file {settings.cds_path} (see the log)")
        self.service = Service(
            routing,
            meter=telemetry.meter if telemetry is not None else None,
            metrics_factory=metrics_factory,
            header_attributes=header_attrs,
            router_timeout=settings.router_timeout,
            request_ttl=settings.request_ttl,
            aggregator=_aggregator(telemetry) if metrics_factory is None else None,
        )
        self.service.ledger.budgets.configure(routing.config)
        self.service.stats.reloads["ok"] += 1
        self.connections: set[_SidecarProtocol] = set()
        self.tasks: set[asyncio.Task[Response]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._config_stamp = _stamp(settings.config)
        self._watcher: asyncio.Future[None] | None = None
        self.fast_path: FastPath | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._rls: Any = None  # grpclib's Server, imported only when a config has token budgets
        self._rls_task: asyncio.Future[None] | None = None

    # --- config reload --------------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Build a new routing from the config file and swap it in; keep the old one if that fails."""
        path = self.settings.config
        try:
            routing = load_routing(path, self.new_custom_router, self.generation + 1, self.settings.cache_size)
        except ConfigError as e:
            self.service.stats.reloads["error"] += 1
            log.error("config reload failed, keeping generation %d: %s", self.generation, e)
            return False
        except PluginError as e:
            self.service.stats.reloads["error"] += 1
            self.service.stats.plugin_errors["router_factory"] += 1
            log.error("config reload failed, keeping generation %d: %s", self.generation, e, exc_info=e.__cause__)
            return False
        # Envoy gets the clusters first, so that the first request of a new backend finds its cluster.
        cds = self.settings.cds_path is not None and self._write_clusters(routing.config)
        self.generation += 1
        self.service.routing = routing
        self.service.ledger.budgets.configure(routing.config)  # before publishing: the records' headers follow
        if routing.config.token_budgets and self._rls_task is None and self._server is not None:
            self._rls_task = asyncio.ensure_future(self._start_rls())
        if self.fast_path is not None:
            self.fast_path.publish(routing)
        self.service.stats.reloads["ok"] += 1
        log.info("config generation %d loaded from %s (%d rules)", self.generation, path, len(routing.config.rules))
        for missing in not_in_bootstrap(self.started_with, routing.config):
            if cds and "failover" not in missing:
                continue  # the new backend's cluster is in the CDS file
            log.warning(
                "config generation %d: %s, which was not in the config the sidecar started with: the running "
                "Envoy has no cluster for it and answers 503 until its bootstrap is regenerated "
                "(ipc-router envoy-config) and Envoy restarted",
                self.generation, missing,
            )  # fmt: skip
        for missing in budgets_not_in_bootstrap(self.started_with, routing.config):
            log.warning(
                "config generation %d: %s: the running Envoy does not ask about it until its bootstrap is "
                "regenerated (ipc-router envoy-config) and Envoy restarted; limits, units and costs change live",
                self.generation, missing,
            )  # fmt: skip
        return True

    def _write_clusters(self, config: Config) -> bool:
        """File-based CDS: the SDS files, then the clusters of ``config``. False (logged) when they cannot be
        made; Envoy then keeps the clusters it has."""
        from ipc_router.envoy_config import EnvoyConfigError, upstream_clusters
        from ipc_router.envoy_upstreams import write_cds, write_sds_files

        s = self.settings
        assert s.cds_path is not None
        if s.sds_dir is None:
            log.error("--cds-path needs --sds-dir (the credentials of the clusters are SDS files there)")
            return False
        try:
            clusters, _ = upstream_clusters(config, sds_dir=s.sds_dir, all_sds=True)
            write_sds_files(config, s.sds_dir, all_sds=True)
            write_cds(s.cds_path, clusters)
        except (EnvoyConfigError, OSError) as e:
            self.service.stats.reloads["clusters_error"] += 1
            log.error("clusters file %s not written, Envoy keeps its clusters: %s", s.cds_path, e)
            return False
        log.info("clusters file %s written (%d clusters)", s.cds_path, len(clusters))
        return True

    async def _watch(self) -> None:
        # Polling stat() catches edits, atomic renames, deletion and re-creation alike, with no extra thread.
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            self.service.expire()
            self.service.flush()
            stamp = _stamp(self.settings.config)
            if stamp != self._config_stamp:
                self._config_stamp = stamp
                self.reload()

    # --- the shared-memory fast path -----------------------------------------------------------------------------

    def _open_fast_path(self) -> None:
        s = self.settings
        path = segment_path(s.socket, s.shm_dir)
        if not s.shm:
            if shm.supported():
                try:
                    n = retire_segment(path, self.service.ledger, self.service.routing)
                except (OSError, ValueError, shm.SegmentError) as e:
                    log.warning("cannot retire the shared-memory segment %s: %s", path, e)
                else:
                    if n is not None:
                        log.info("fast path off (--no-shm): retired %s and recorded its %d records", path, n)
            return
        if not shm.supported():
            log.warning("shared-memory fast path off: proven correct on x86-64 Linux only (docs/shm.md)")
            return
        try:
            self.fast_path = open_fast_path(path, self.service.ledger, self.service.routing, mode=s.socket_mode)
        except (OSError, ValueError, shm.SegmentError) as e:
            log.warning("shared-memory fast path off: %s: %s", path, e)
            return
        self.service.fast_path = self.fast_path
        self._drainer = asyncio.ensure_future(self._drain())
        log.info("shared-memory fast path on: %s", path)

    async def _drain(self) -> None:
        fast = self.fast_path
        assert fast is not None
        pace = DrainPace(self.settings.shm_drain_interval)
        while True:
            try:
                n = fast.drain()
            except Exception:  # a bug here must not stop the draining for good
                log.exception("draining the completion rings failed")
                n = 0
            await asyncio.sleep(pace.after(n))  # 0 for busy rings: other tasks still run in between

    # --- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.settings.socket
        _clear_stale_socket(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _SidecarProtocol(self), path, backlog=1024)
        os.chmod(path, self.settings.socket_mode)
        self._open_fast_path()
        if self.service.routing.config.token_budgets:
            self._rls_task = asyncio.ensure_future(self._start_rls())
            await self._rls_task
        self._watcher = asyncio.ensure_future(self._watch())
        for line in self.summary():
            log.info("%s", line)

    async def _start_rls(self) -> None:
        from ipc_router.rls import start_server

        path = rls_socket_path(self.settings.socket)
        settings, stats = self.settings, self.service.stats

        def allowed(transport: asyncio.BaseTransport) -> bool:
            if _peer_allowed(transport, settings):
                return True
            stats.refused_peers += 1
            return False

        checked = allowed if settings.allow_uid or settings.allow_gid else None
        try:
            self._rls = await start_server(self.service.ledger.budgets, path, settings.socket_mode, checked)
        except (OSError, ValueError) as e:
            log.error("token budgets not enforced: cannot serve the rate limit service on %s: %s", path, e)
            self._rls_task = None  # the next reload tries again
            return
        names = ", ".join(self.service.ledger.budgets.names())
        log.info("token budgets (%s): rate limit service on %s", names, path)

    def summary(self) -> list[str]:
        """What runs, for the start-up log."""
        s, routing = self.settings, self.service.routing
        cache = routing.cache
        keyed = "no route cache"
        if cache is not None:
            keyed = f"route cache keyed by {', '.join(cache.key_headers) or 'nothing'}"
        where = f"config {os.path.abspath(s.config)}" if s.config else "no config file (default config)"
        telemetry = self.telemetry
        prometheus = telemetry.prometheus_url if telemetry is not None and telemetry.prometheus_url else "off"
        otlp = f"{s.otlp_endpoint} every {s.otlp_interval:g} s" if s.otlp_endpoint else "off"
        return [
            f"ipc-router listening on {s.socket} (mode {s.socket_mode:04o})",
            f"{where}: generation {self.generation}, {len(routing.config.rules)} rules",
            f"router: {self.router_spec or ('x.new_custom_router' if routing.custom else 'default')} ({keyed})",
            f"metrics: {self.metrics_spec or 'default'}; Prometheus: {prometheus}; OTLP: {otlp}",
        ]

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_timeout``), close, unlink the socket."""
        if self._server is None:
            return
        self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.settings.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        while any(not c.idle() for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            c.close()
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self.fast_path is not None:
            n = self.fast_path.stop()
            log.info("shared-memory segment removed (%d final records)", n)
            self.fast_path = self.service.fast_path = None
        self.service.flush()
        if self._rls_task is not None:
            try:
                await self._rls_task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # reported; the stop goes on (the socket files still go)
                log.error("the rate limit service failed to start: %r", e)
        if self._rls is not None:
            self._rls.close()
            # grpclib leaves Envoy's HTTP/2 connection open on close; asyncio >= 3.12 waits for it in wait_closed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rls.wait_closed(), self.settings.drain_timeout)
            self._rls = None
            if not self.settings.socket.startswith("@"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rls_socket_path(self.settings.socket))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.settings.socket)
        self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
            log.info("signal received: draining")
        finally:
            await self.stop()


def _aggregator(telemetry: Telemetry | None) -> Aggregator | None:
    """The default metrics, aggregated in the sidecar instead of recorded into the SDK one value at a time."""
    if telemetry is None or extensions.new_custom_chat_completion_metrics is not None:
        return None
    try:
        return Aggregator(telemetry.provider, telemetry.readers)
    except ValueError as e:
        log.warning("default metrics recorded per request (no aggregation): %s", e)
        return None


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_allowed(transport: asyncio.BaseTransport, settings: Settings) -> bool:
    """SO_PEERCRED of a new connection against ``allow_uid``/``allow_gid`` (either list may admit it)."""
    sock = transport.get_extra_info("socket")
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, AttributeError) as e:
        log.warning("refused a connection: cannot read its peer credentials (%s)", e)
        return False
    if uid in settings.allow_uid or gid in settings.allow_gid:
        return True
    log.warning("refused a connection from pid %d uid %d gid %d: not in --allow-uid/--allow-gid", pid, uid, gid)
    return False


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _clear_stale_socket(path: str) -> None:
    if len(os.fsencode(path)) >= 108:
        raise ValueError(f"socket path is {len(os.fsencode(path))} bytes; Unix socket paths must be under 108")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale file from a process that died
        return
    finally:
        probe.close()
    raise OSError(f"another process is already serving on {path}")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed: using the asyncio event loop")
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(settings: Settings, config: Config | None = None) -> None:
    """Run the sidecar until SIGTERM/SIGINT. ``config``: as for :class:`Sidecar`."""
    telemetry = start_telemetry(settings.metrics_addr, settings.otlp_endpoint, settings.otlp_interval)
    try:
        sidecar = Sidecar(settings, telemetry, config)
        loop = _new_loop()
        try:
            loop.run_until_complete(sidecar.serve_forever())
        finally:
            loop.close()
    finally:
        telemetry.shutdown()
