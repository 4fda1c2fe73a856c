"""JSON responses and error answers shared by the agent, its external port and the
verifier service: :func:`exception_response` (which the agent's endpoints call) and
:func:`error_middleware` around it (the other apps).

Every error leaves as ``{"error": message, "code": code}`` with the error's HTTP status:
our own :class:`~dstack_core.errors.DstackError` as it says, aiohttp's routing errors as
404/405 (keeping ``Allow``; the agent's own routes answer these themselves), an
over-large body as 400 ``payload_too_large``, a body that breaks HTTP framing as 400
``malformed_http``, a client that hung up as 400, and anything unexpected as a bare 500
whose details stay in the log.

:func:`http_layer_error` gives the same shape to what the HTTP layer answers before any
handler runs (unparseable requests, an unknown ``Expect``), for the connection handler
in :mod:`dstack_core.server.connections`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from ..errors import (
    DstackError,
    ExpectationFailed,
    HeaderTooLarge,
    MalformedHttp,
    MethodNotAllowed,
    PayloadTooLarge,
    UriTooLong,
)
from ..jsonout import EncodedJson, encode_json_parts

__all__ = [
    "ALLOWED_METHODS",
    "MAX_HEADERS",
    "MAX_HEADER_FIELD",
    "MAX_REQUEST_LINE",
    "error_middleware",
    "error_response",
    "exception_response",
    "http_exception_response",
    "http_layer_error",
    "json_response",
]

log = logging.getLogger(__name__)

ALLOWED_METHODS: Final = "GET, HEAD, POST"
# Parser limits. The request line may be longer than a header field so that GET queries
# (Verify's hex arguments) have room; the two limits differ so that a LineTooLong says
# which one it hit (the parser reports only the limit).
MAX_REQUEST_LINE: Final = 16384
MAX_HEADER_FIELD: Final = 8190
MAX_HEADERS: Final = 128

_HTTP_CODES: Final = {
    404: "not_found",
    405: MethodNotAllowed.code,
    417: ExpectationFailed.code,  # an Expect other than 100-continue
}
# An HTTP method is a token (RFC 9110 section 9.1) followed by one space.
_METHOD_TOKEN: Final = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ")
# Methods the parser knows: a request line starting with one of them that the parser
# refuses is malformed (say, a bad version), not an unknown method.
_KNOWN_METHODS: Final = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH".split()
)
_BAD_FRAMING: Final = "malformed body framing (Content-Length or chunked encoding)"


def json_response(obj: Any, status: int = 200) -> web.Response:
    """Compact ASCII JSON with Content-Type and Content-Length.

    A large body made of kept pieces (a long event log) is written piece by piece
    (:class:`_JsonPieces`); anything else as one buffer.
    """
    encoded = encode_json_parts(obj)
    size = encoded.size if len(encoded.parts) > 1 else 0
    body = _JsonPieces(encoded, size) if size >= STREAMED_BODY_MIN else encoded.data
    return web.Response(body=body, status=status, content_type="application/json")


STREAMED_BODY_MIN: Final = 256 * 1024
"""Bodies of kept pieces from this size on are written piece by piece: joining them would
copy the whole body once more (and, fresh from the allocator, fault its pages in) before
the transport copies what the socket does not take at once. Smaller ones are joined: one
write is cheaper than several."""


class _JsonPieces(Payload):
    """A JSON body in pieces that are never changed (:class:`~dstack_core.jsonout.EncodedJson`),
    sent one after another with the total as Content-Length."""

    _autoclose = True  # memory only

    _value: EncodedJson

    def __init__(self, encoded: EncodedJson, size: int) -> None:
        super().__init__(encoded, content_type="application/json")
        self._size = size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.data.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for part in self._value.parts:
            await writer.write(part)


def error_response(exc: DstackError) -> web.Response:
    """``exc`` as its status and ``{"error", "code"}`` body."""
    response = json_response(exc.to_json(), exc.http_status)
    if isinstance(exc, MethodNotAllowed):
        response.headers["Allow"] = ALLOWED_METHODS
    return response


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    code = _HTTP_CODES.get(exc.status, "http_error")
    response = json_response({"error": exc.reason, "code": code}, exc.status)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def http_layer_error(exc: BaseException | None, request_start: bytes = b"") -> DstackError:
    """The error aiohttp's HTTP layer reports (``handle_error``), as one of ours.

    :param exc: an :class:`HttpProcessingError` for a request the parser refused; anything
        else is a bug of ours (a bare 500).
    :param request_start: the first bytes of the request, to tell an unknown verb (405) from
        bytes that are not HTTP at all (400).

    Messages are fixed per kind: nothing the client sent is echoed.
    """
    if isinstance(exc, BadStatusLine):  # aiohttp >= 3.11 raises its subclass BadHttpMethod
        method = _METHOD_TOKEN.match(request_start)
        if method and method[1] not in _KNOWN_METHODS:
            return MethodNotAllowed(f"method not allowed; use one of {ALLOWED_METHODS}")
        if not method:  # binary junk, a TLS handshake on the plain socket, ...
            return MalformedHttp("malformed request line: not an HTTP request")
        return MalformedHttp("malformed request line")
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE,):
            return UriTooLong(f"request line longer than {MAX_REQUEST_LINE} bytes")
        return HeaderTooLarge(f"header field longer than {MAX_HEADER_FIELD} bytes")
    if isinstance(exc, InvalidURLError):
        return MalformedHttp("malformed request target")
    if isinstance(exc, InvalidHeader):
        return MalformedHttp("malformed header")
    if isinstance(exc, PayloadEncodingError):
        return MalformedHttp(_BAD_FRAMING)
    if isinstance(exc, HttpProcessingError):
        if "Too many headers" in exc.message:
            return HeaderTooLarge(f"more than {MAX_HEADERS} header fields")
        return MalformedHttp("malformed HTTP request")
    return DstackError("internal error")


def http_exception_response(exc: web.HTTPException) -> web.StreamResponse:
    """An aiohttp :class:`web.HTTPException` that escaped every middleware (the ``Expect``
    handler runs before them), as JSON."""
    return exc if exc.status < 400 else _from_http_exception(exc)


def exception_response(request: web.BaseRequest, exc: Exception) -> web.StreamResponse:
    """The JSON answer for ``exc``, raised while handling ``request`` (see the module's
    docstring for which answer each kind gets).

    :raises web.HTTPException: ``exc`` itself when it is an aiohttp redirect or other
        non-error status, which is not ours to rewrite.
    """
    if isinstance(exc, DstackError):
        if exc.http_status >= 500 and not exc.logged:
            log.warning("%s %s failed: %s", request.method, request.path, exc)
        response = error_response(exc)
        if isinstance(exc, TimeoutError):
            # The body never arrived: the connection cannot carry another request.
            response.force_close()
        return response
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            PayloadTooLarge(f"failed to read data: payload too large ({exc.text})")
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http_exception(exc)
    if isinstance(exc, web.RequestPayloadError):
        # The parser gave up on the body (bad chunk, short Content-Length): the client's
        # framing is broken, so this is its last answer on this connection.
        response = error_response(MalformedHttp(_BAD_FRAMING))
        response.force_close()
        return response
    if isinstance(exc, ConnectionResetError):
        # The client hung up mid-request (e.g. while we read its body): not our bug.
        log.debug("%s %s: client disconnected", request.method, request.path)
        return json_response({"error": "client disconnected", "code": "client_disconnected"}, 400)
    log.error("unexpected error handling %s %s", request.method, request.path, exc_info=exc)
    return json_response({"error": "internal error", "code": "internal_error"}, 500)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """:func:`exception_response` for every handler of an app (the verifier service's, the
    external port's; the agent's API endpoints call it themselves)."""
    try:
        return await handler(request)
    except Exception as exc:
        return exception_response(request, exc)
