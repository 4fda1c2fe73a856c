"""JSON responses and the error middleware shared by the agent and the verifier service.

Every error leaves as ``{"error": message, "code": code}`` with the error's HTTP status:
our own :class:`~dstack_core.errors.DstackError` as it says, aiohttp's routing errors as
404/405 (keeping ``Allow``), an over-large body as 400 ``payload_too_large``, a client that
hung up as 400, and anything unexpected as a bare 500 whose details stay in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from ..errors import DstackError, PayloadTooLarge
from .codec import to_json_bytes

__all__ = ["json_response", "error_middleware"]

log = logging.getLogger(__name__)

_HTTP_CODES: Final = {404: "not_found", 405: "method_not_allowed"}


def json_response(obj: Any, status: int = 200) -> web.Response:
    """Compact ASCII JSON with Content-Type and Content-Length."""
    return web.Response(body=to_json_bytes(obj), status=status, content_type="application/json")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except DstackError as exc:
        if exc.http_status >= 500 and not exc.logged:
            log.warning("%s %s failed: %s", request.method, request.path, exc)
        return json_response(exc.to_json(), exc.http_status)
    except web.HTTPRequestEntityTooLarge as exc:
        err = PayloadTooLarge(f"failed to read data: payload too large ({exc.text})")
        return json_response(err.to_json(), err.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = json_response({"error": exc.reason, "code": code}, exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionResetError:
        # The client hung up mid-request (e.g. while we read its body): not our bug.
        log.debug("%s %s: client disconnected", request.method, request.path)
        return json_response({"error": "client disconnected", "code": "client_disconnected"}, 400)
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return json_response({"error": "internal error", "code": "internal_error"}, 500)
