"""The aiohttp application: routes, method tables, and endpoints that answer errors as JSON.

Handlers are thin: decode the arguments with the method's schema, call the
:class:`~dstack_core.service.AgentService`, serialise the result. Paths:

* ``/<Method>`` and ``/prpc/<Method>``: the DstackGuest service (GET query or POST JSON);
* ``/prpc/Tappd.<Method>`` (and ``/prpc/<Method>`` for Tappd-only names): legacy Tappd.

:func:`create_tappd_app` serves only the Tappd service, at ``/prpc/Tappd.<Method>`` and
``/prpc/<Method>``, for its own socket (upstream's ``tappd.sock``).

Every response is JSON with a Content-Length; errors are ``{"error", "code"}``. With a
:class:`~dstack_core.server.guard.Guard` (caller policy, audit log) every call passes
through it once its method is resolved, whichever path or socket reached it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
from aiohttp import hdrs, web

from .. import jsonout
from ..errors import DstackError, MethodNotAllowed, NotFound
from ..jsonout import EncodedJson, encode_json
from ..service import AgentService, InfoResult, QuoteResult, TlsKeyRequest, TlsKeyResult
from .codec import Field, Schema, decode_args, decode_content, parse_json_body, parse_query
from .errors import ALLOWED_METHODS, error_response, exception_response, json_response

if TYPE_CHECKING:
    # The guard (caller policy, audit log) loads only when serve makes one.
    from .guard import Guard
    from .metrics import AgentMetrics, Recorder

__all__ = [
    "API_METHODS",
    "DEFAULT_MAX_BODY",
    "DSTACK_METHODS",
    "GUARD_KEY",
    "SERVICE_KEY",
    "TAPPD_METHODS",
    "create_app",
    "create_tappd_app",
    "trim_prefix",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY: Final = 10 * 1024 * 1024
SERVICE_KEY: Final = web.AppKey("service", AgentService)
GUARD_KEY: Final[web.AppKey[Guard]] = web.AppKey("guard")
TAPPD_PREFIX: Final = "Tappd."

Handler = Callable[[AgentService, dict[str, Any]], Awaitable[dict[str, Any] | EncodedJson]]


@attrs.frozen
class Method:
    schema: Schema
    handler: Handler


REPORT_DATA: Final = (Field("report_data", "bytes"),)
KEY_ARGS: Final = (Field("path", "str"), Field("purpose", "str"), Field("algorithm", "str"))
TLS_ARGS: Final = (
    Field("subject", "str"),
    Field("alt_names", "str_list"),
    Field("usage_ra_tls", "bool"),
    Field("usage_server_auth", "bool"),
    Field("usage_client_auth", "bool"),
)


def _tls_response(result: TlsKeyResult) -> dict[str, Any]:
    return {
        "key": jsonout.text(result.key),
        "certificate_chain": jsonout.text_list(result.certificate_chain),
    }


def _quote_response(result: QuoteResult) -> dict[str, Any]:
    response: dict[str, Any] = {
        "quote": EncodedJson.hex(result.quote),
        "event_log": result.event_log,
        "report_data": result.report_data.hex(),
        "vm_config": result.vm_config,
    }
    if result.attestation:  # upstream omits the field when empty
        response["attestation"] = result.attestation.hex()
    return response


async def _get_tls_key(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return _tls_response(await svc.get_tls_key(TlsKeyRequest(**a)))


async def _get_key(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    key = svc.get_key(**a)
    return {"key": key.secret.hex(), "signature_chain": [s.hex() for s in key.signature_chain]}


async def _get_quote(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return _quote_response(await svc.get_quote(a["report_data"]))


async def _attest(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return {"attestation": await svc.attest_json(a["report_data"])}


_last_info: tuple[InfoResult | None, EncodedJson] = (None, EncodedJson((b"",)))


async def _info(svc: AgentService, a: dict[str, Any]) -> EncodedJson:
    global _last_info
    info = await svc.info()
    # The service hands out the same result until Info changes: encode it once.
    if _last_info[0] is not info:
        _last_info = (info, EncodedJson((encode_json(info_response(info)),)))
    return _last_info[1]


def info_response(info: InfoResult) -> dict[str, Any]:
    """Info's answer as a JSON object (``tcb_info`` encoded, its event log in kept pieces)."""
    return {
        k: v.hex() if isinstance(v, bytes) else v
        for k, v in attrs.asdict(info, recurse=False).items()
    }


async def _emit_event(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    await svc.emit_event(**a)
    return {}


async def _sign(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    sig = svc.sign(**a)
    return {
        "signature": sig.signature.hex(),
        "signature_chain": [s.hex() for s in sig.signature_chain],
        "public_key": sig.public_key.hex(),
    }


async def _verify(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return {"valid": svc.verify(**a)}


async def _version(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    version, rev = svc.version()
    return {"version": version, "rev": rev}


async def _gpu_info(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return {"attestation": svc.gpu_info()}


async def _derive_key(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    path, random_seed = a.pop("path"), a.pop("random_seed")
    request = TlsKeyRequest(**a)
    return _tls_response(await svc.derive_tls_key(path=path, random_seed=random_seed, request=request))


async def _derive_k256_key(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    key = svc.get_key(**a)
    return {
        "k256_key": key.secret.hex(),
        "k256_signature_chain": [s.hex() for s in key.signature_chain],
    }


async def _tdx_quote(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    result, algorithm, prefix = await svc.tdx_quote(**a)
    return {
        "quote": EncodedJson.hex(result.quote),
        "event_log": result.event_log,
        "hash_algorithm": algorithm,
        "prefix": prefix,
    }


async def _raw_quote(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    return await _tdx_quote(
        svc, {"report_data": a["report_data"], "hash_algorithm": "raw", "prefix": ""}
    )


DSTACK_METHODS: Final[dict[str, Method]] = {
    "GetTlsKey": Method(
        TLS_ARGS
        + (
            Field("not_before", "u64"),
            Field("not_after", "u64"),
            Field("with_app_info", "bool"),
        ),
        _get_tls_key,
    ),
    "GetKey": Method(KEY_ARGS, _get_key),
    "GetQuote": Method(REPORT_DATA, _get_quote),
    "Attest": Method(REPORT_DATA, _attest),
    "Info": Method((), _info),
    "EmitEvent": Method((Field("event", "str"), Field("payload", "bytes")), _emit_event),
    "Sign": Method((Field("algorithm", "str"), Field("data", "bytes")), _sign),
    "Verify": Method(
        (
            Field("algorithm", "str"),
            Field("data", "bytes"),
            Field("signature", "bytes"),
            Field("public_key", "bytes"),
        ),
        _verify,
    ),
    "Version": Method((), _version),
    "GpuInfo": Method((), _gpu_info),
}

TAPPD_METHODS: Final[dict[str, Method]] = {
    "DeriveKey": Method((Field("path", "str"),) + TLS_ARGS + (Field("random_seed", "bool"),), _derive_key),
    "DeriveK256Key": Method(KEY_ARGS, _derive_k256_key),
    "TdxQuote": Method(
        REPORT_DATA + (Field("hash_algorithm", "str"), Field("prefix", "str")), _tdx_quote
    ),
    "RawQuote": Method(REPORT_DATA, _raw_quote),
    "Info": DSTACK_METHODS["Info"],
    "Version": DSTACK_METHODS["Version"],
}


API_METHODS: Final = frozenset(DSTACK_METHODS) | frozenset(TAPPD_METHODS)
"""Every method name the API serves (what a caller policy may name)."""


async def _read_body(request: web.Request) -> bytes:
    """The decoded body, empty when there is none.

    Read for every method and verb, also where it is ignored, so that the size limit and
    the ``Content-Encoding`` rules hold on every path.
    """
    if not request.body_exists:
        return b""
    body = await request.read()
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None:
        body = decode_content(body, encoding, request.client_max_size)
    return body


async def _call(request: web.Request, name: str, method: Method) -> web.Response:
    body = await _read_body(request)
    if request.method == "POST":
        doc = parse_json_body(body) if method.schema else {}
    else:
        doc = parse_query(request.query, method.schema)
    args = decode_args(method.schema, doc)
    service = request.app[SERVICE_KEY]
    guard = request.app.get(GUARD_KEY)
    if guard is None:
        return json_response(await method.handler(service, args))
    invoke = functools.partial(method.handler, service, args)
    return json_response(await guard.run(request, name, args, invoke))


def trim_prefix(name: str, prefix: str) -> str:
    """Rust's ``trim_start_matches``: remove every leading repetition of ``prefix``."""
    while name.startswith(prefix):
        name = name[len(prefix):]
    return name


def _resolve_path(path: str, name: str, tappd_only: bool) -> tuple[str, Method | None]:
    """The method ``path`` (whose last segment is ``name``) names, after upstream's prefix
    trimming."""
    if path.startswith("/prpc/") and name.startswith(TAPPD_PREFIX):
        name = trim_prefix(name, TAPPD_PREFIX)
        return name, TAPPD_METHODS.get(name)
    if tappd_only:
        return name, TAPPD_METHODS.get(name)
    if path.startswith("/prpc/"):
        return name, DSTACK_METHODS.get(name) or TAPPD_METHODS.get(name)
    return name, DSTACK_METHODS.get(name)


def _exact_paths(tappd_only: bool) -> dict[str, tuple[str, Method]]:
    """Every path that names a method without repeated prefixes: exact-match routes, which
    aiohttp resolves with one dict lookup instead of trying patterns in turn."""
    names = {*DSTACK_METHODS, *TAPPD_METHODS}
    candidates = [f"/prpc/{n}" for n in names] + [f"/prpc/{TAPPD_PREFIX}{n}" for n in names]
    if not tappd_only:
        candidates += [f"/{n}" for n in names]
    paths = {}
    for path in candidates:
        name, method = _resolve_path(path, path.rpartition("/")[2], tappd_only)
        if method is not None:
            paths[path] = (name, method)
    return paths


EXACT_PATHS: Final = {tappd_only: _exact_paths(tappd_only) for tappd_only in (False, True)}


_UNKNOWN: Final = "unknown"
"""The metrics label of a request that names no method (metrics.UNKNOWN_METHOD)."""


async def _answer(
    request: web.Request, *, name: str, method: Method | None, record: Recorder | None
) -> web.StreamResponse:
    """Call ``method`` (None: the path names none, 404) for ``request``; any error as its
    JSON answer (:func:`~dstack_core.server.errors.exception_response`); counted and timed
    by ``record``.

    The endpoints do this themselves instead of an aiohttp middleware: a request through
    middlewares costs several percent more on the cheapest methods (docs/performance.md).
    """
    started = time.monotonic()
    status = 500
    try:
        try:
            if method is None:
                raise NotFound(f"Service not found: {name}")
            response: web.StreamResponse = await _call(request, name, method)
        except Exception as exc:
            response = exception_response(request, exc)
        status = response.status
        return response
    finally:
        if record is not None:
            label = name if method is not None else _UNKNOWN
            record(label, status, time.monotonic() - started)


def _add_routes(app: web.Application, *, tappd_only: bool, record: Recorder | None) -> None:
    # Exact paths first (aiohttp resolves them with one dict lookup), then the patterns
    # (unknown names get 404, repeated Tappd. prefixes are stripped), then a catch-all for
    # what neither matches: 404, or 405 for a path served under other verbs. add_get also
    # answers HEAD, as upstream's Rocket routes do.
    for path, (name, method) in EXACT_PATHS[tappd_only].items():
        endpoint = functools.partial(_answer, name=name, method=method, record=record)
        app.router.add_get(path, endpoint)
        app.router.add_post(path, endpoint)

    async def by_pattern(request: web.Request) -> web.StreamResponse:
        name, method = _resolve_path(request.path, request.match_info["method"], tappd_only)
        return await _answer(request, name=name, method=method, record=record)

    patterns = ("/prpc/{method}",) if tappd_only else ("/prpc/{method}", "/{method}")
    for pattern in patterns:
        app.router.add_get(pattern, by_pattern)
        app.router.add_post(pattern, by_pattern)
    unmatched = app.router.add_resource("/{path:.*}")

    async def fallback(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        label = _UNKNOWN
        error: DstackError = NotFound("Not Found")
        for resource in app.router.resources():
            if resource is not unmatched and (await resource.resolve(request))[1]:
                # Served under other verbs: counted under the method the path names.
                name, method = _resolve_path(request.path, request.path.rpartition("/")[2],
                                             tappd_only)
                label = name if method is not None else _UNKNOWN
                error = MethodNotAllowed(f"method not allowed; use one of {ALLOWED_METHODS}")
                break
        response = error_response(error)
        if record is not None:
            record(label, response.status, time.monotonic() - started)
        return response

    unmatched.add_route(hdrs.METH_ANY, fallback)


def _application(service: AgentService, *, max_body: int, guard: Guard | None) -> web.Application:
    app = web.Application(
        client_max_size=max_body,
        # Bodies are decoded by _read_body, which knows the limit and our error codes.
        handler_args={"auto_decompress": False},
    )
    app[SERVICE_KEY] = service
    if guard is not None:
        app[GUARD_KEY] = guard
    return app


def create_app(
    service: AgentService,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    guard: Guard | None = None,
    metrics: AgentMetrics | None = None,
) -> web.Application:
    """The aiohttp application serving ``service``; bodies over ``max_body`` bytes (as sent,
    and once decoded) get 400.

    :param guard: caller policy and audit log for every call; it opens its audit log
        when the app starts (before any socket is bound) and closes it at cleanup.
    :param metrics: counts and times every request (listener ``dstack``).
    """
    app = _application(service, max_body=max_body, guard=guard)
    if guard is not None:
        app.cleanup_ctx.append(guard.lifetime)
    _add_routes(app, tappd_only=False, record=None if metrics is None else metrics.recorder("dstack"))
    return app


def create_tappd_app(
    service: AgentService,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    guard: Guard | None = None,
    metrics: AgentMetrics | None = None,
) -> web.Application:
    """The legacy Tappd service alone (``/prpc/Tappd.<Method>``, ``/prpc/<Method>``), as
    upstream serves it on ``tappd.sock``; every other path is 404.

    :param guard: the same guard as :func:`create_app`'s (whose app owns its audit log's
        lifetime): Tappd's calls are decided and recorded like every other.
    """
    app = _application(service, max_body=max_body, guard=guard)
    _add_routes(app, tappd_only=True, record=None if metrics is None else metrics.recorder("tappd"))
    return app
