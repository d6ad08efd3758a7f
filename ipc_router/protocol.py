"""The sidecar's wire protocol, sans I/O: HTTP/1.1 bytes in, :class:`Request` objects out; answers to bytes.

HTTP/1.1 parsing is ``httptools`` (llhttp). Requests may arrive split at any byte and pipelined; a
:class:`Connection` is fed whatever the socket gave and returns the complete requests. Bodies are msgpack or
JSON, chosen by the request's ``content-type``; answers use the same format. See ``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import httptools
import msgspec
import orjson

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "JSON",
    "MAX_MESSAGE_HEADERS",
    "MSGPACK",
    "BadMessage",
    "CompleteMessage",
    "Connection",
    "ProtocolError",
    "RecordMessage",
    "Request",
    "RouteMessage",
    "decode_body",
    "decode_message",
    "encode_body",
    "encode_response",
]

MSGPACK = "application/msgpack"
JSON = "application/json"

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Header fields per request (Envoy's own default ``max_request_headers_count``); more is a 431.
DEFAULT_MAX_HEADERS = 100
#: Entries in a /route or /record message's ``headers`` map (the client request's headers, forwarded by the filter):
#: a length limit on the msgpack/JSON map, so a small body cannot make the sidecar build a huge dict. Nesting depth is
#: bounded by msgspec itself (the interpreter's recursion limit, about 1000 levels): both are a 400.
MAX_MESSAGE_HEADERS = 1024


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool

    @property
    def content_type(self) -> str:
        """The body format: ``MSGPACK``, ``JSON``, or whatever else the client said (lower-case, no params)."""
        ct = self.headers.get("content-type")
        if ct is None:
            return MSGPACK
        return ct.split(";", 1)[0].strip().lower()


class ProtocolError(Exception):
    """The byte stream cannot be parsed further: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: The limit that was exceeded (``header_bytes``, ``headers``, ``body_bytes``), None for malformed input.
        self.limit = limit
        #: Requests completed by the same ``feed`` call before framing was lost; answer them first.
        self.completed: list[Request] = []


class BadMessage(ValueError):
    """A well-framed request whose body is not a usable message (400, the connection stays open)."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        #: The limit that was exceeded (``message_length``, ``message_depth``), None for other bad bodies.
        self.limit = limit


class Connection:
    """HTTP/1.1 request parser state for one connection."""

    __slots__ = (
        "_body",
        "_body_size",
        "_done",
        "_error",
        "_header_bytes",
        "_headers",
        "_last_name",
        "_n_headers",
        "_parser",
        "_url",
        "max_body_bytes",
        "max_header_bytes",
        "max_headers",
    )

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_headers = max_headers
        self._parser = httptools.HttpRequestParser(self)
        self._done: list[Request] = []
        self._error: ProtocolError | None = None
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._last_name = ""
        self._header_bytes = 0
        self._n_headers = 0
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, data: bytes) -> list[Request]:
        """Parse more bytes; return the requests they completed, in order.

        Raises :class:`ProtocolError` once framing is lost; requests completed before the error in the same
        call are available as ``error.completed``.
        """
        if self._error is not None:
            raise ProtocolError(self._error.status, self._error.message)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error = ProtocolError(400, "protocol upgrade is not supported")
        except httptools.HttpParserCallbackError:
            if self._error is None:  # pragma: no cover - our callbacks only raise after setting _error
                self._error = ProtocolError(400, "malformed HTTP request")
        except httptools.HttpParserError as e:
            self._error = ProtocolError(400, f"malformed HTTP request: {e}")
        done, self._done = self._done, []
        if self._error is not None:
            self._error.completed = done
            raise self._error
        return done

    def _fail(self, status: int, message: str, limit: str) -> None:
        self._error = ProtocolError(status, message, limit)
        raise self._error

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.max_header_bytes:
            self._fail(431, f"request line and headers exceed {self.max_header_bytes} bytes", "header_bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.max_header_bytes:
            self._fail(431, f"request line and headers exceed {self.max_header_bytes} bytes", "header_bytes")
        self._n_headers += 1
        if self._n_headers > self.max_headers:
            self._fail(431, f"more than {self.max_headers} header fields", "headers")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = self._headers.get(key)
        self._headers[key] = text if prev is None else f"{prev},{text}"

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            self._fail(413, f"body of {length} bytes exceeds the limit of {self.max_body_bytes}", "body_bytes")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body_bytes:
            self._fail(413, f"body exceeds the limit of {self.max_body_bytes} bytes", "body_bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self._parser
        if p.should_upgrade():
            return  # llhttp completes the upgrade request before raising HttpParserUpgrade: it gets the 400
        url = self._url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._done.append(Request(p.get_method().decode("ascii"), path, self._headers, body, p.should_keep_alive()))


_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def encode_response(status: int, body: bytes = b"", content_type: str = MSGPACK, keep_alive: bool = True) -> bytes:
    """One complete HTTP/1.1 response, ready for a single ``write``."""
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
    if status != 204:
        head += f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    if not keep_alive:
        head += "connection: close\r\n"
    return (head + "\r\n").encode("ascii") + (body if status != 204 else b"")


# --- messages ---------------------------------------------------------------------------------------------------
# The typed bodies of /route and /complete (docs/protocol.md). msgspec decodes and validates in one pass and names
# the offending key in its errors (``Expected `str`, got `int` - at `$.path```). Over msgpack, bodies are bin;
# over JSON (people debugging with curl) they are plain strings.


_Headers = Annotated[dict[str, str], msgspec.Meta(max_length=MAX_MESSAGE_HEADERS)]


class RouteMessage(msgspec.Struct):
    path: str
    headers: _Headers
    body: bytes
    t: int | None = None
    id: str | None = None
    #: The filter will report the completion as a self-contained record (shared-memory fast path).
    ring: bool = False


class RouteMessageJSON(RouteMessage):
    body: str  # type: ignore[assignment]


class CompleteMessage(msgspec.Struct):
    id: str
    status: int
    t_first: int | None = None
    t_end: int | None = None
    stream: bool = False
    body: bytes = b""
    truncated: bool = False
    #: The backend that answered, when Envoy failed over to another than the decision's (a failover rule).
    served: str | None = None


class CompleteMessageJSON(CompleteMessage):
    body: str = ""  # type: ignore[assignment]


class RecordMessage(msgspec.Struct):
    """A self-contained completion: what the Lua filter writes into a shared-memory ring (or POSTs to
    ``/record``). Times are the filter's ``CLOCK_MONOTONIC`` in nanoseconds."""

    t: int
    t_end: int
    status: int
    model: str
    rule: str
    gen: int = 0
    backend: str | None = None
    t_first: int | None = None
    stream: bool = False
    truncated: bool = False
    headers: _Headers = msgspec.field(default_factory=dict)
    body: bytes = b""
    #: As :attr:`CompleteMessage.served`.
    served: str | None = None
    #: The filter forgot this request after ``pending_timeout_s`` without its response phase ever running.
    incomplete: bool = False


class RecordMessageJSON(RecordMessage):
    body: str = ""  # type: ignore[assignment]


_DECODERS: dict[tuple[type[Any], str], Any] = {
    (RouteMessage, MSGPACK): msgspec.msgpack.Decoder(RouteMessage),
    (RouteMessage, JSON): msgspec.json.Decoder(RouteMessageJSON),
    (CompleteMessage, MSGPACK): msgspec.msgpack.Decoder(CompleteMessage),
    (CompleteMessage, JSON): msgspec.json.Decoder(CompleteMessageJSON),
    (RecordMessage, MSGPACK): msgspec.msgpack.Decoder(RecordMessage),
    (RecordMessage, JSON): msgspec.json.Decoder(RecordMessageJSON),
}
_MSGPACK_ENCODER = msgspec.msgpack.Encoder()

M = TypeVar("M", RouteMessage, CompleteMessage, RecordMessage)


def decode_message(body: bytes, content_type: str, kind: type[M]) -> M:
    """A typed message from a request body. Raises :class:`BadMessage` saying what is wrong and where."""
    decoder = _DECODERS.get((kind, content_type))
    if decoder is None:
        raise BadMessage(f"unsupported content-type {content_type!r}; use {MSGPACK} or {JSON}")
    try:
        message: M = decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        # msgspec names the broken constraint in its message; the only length constraint is MAX_MESSAGE_HEADERS.
        raise BadMessage(f"bad message: {text}", "message_length" if "of length <=" in text else None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise BadMessage(f"body is not valid {'JSON' if content_type == JSON else 'msgpack'}: {e}") from None
    except RecursionError:
        raise BadMessage("body is nested too deeply", "message_depth") from None
    return message


def decode_body(body: bytes, content_type: str) -> Any:
    """Any msgpack or JSON value from a body (untyped). Raises :class:`BadMessage`."""
    try:
        if content_type == MSGPACK:
            return msgspec.msgpack.decode(body)
        if content_type == JSON:
            return msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise BadMessage(f"body is not valid {'JSON' if content_type == JSON else 'msgpack'}: {e}") from None
    except RecursionError:
        raise BadMessage("body is nested too deeply", "message_depth") from None
    raise BadMessage(f"unsupported content-type {content_type!r}; use {MSGPACK} or {JSON}")


def encode_body(message: Any, content_type: str) -> bytes:
    """A message as msgpack (bytes as bin) or JSON (bytes as UTF-8 text)."""
    if content_type == JSON:
        return orjson.dumps(message, default=_json_default)
    return _MSGPACK_ENCODER.encode(message)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    raise TypeError
