"""The external port (upstream's 8090): what the host and the world may see of the CVM.

Exactly upstream's external surface and nothing else (``guest-agent/src/http_routes.rs``,
``rpc_service.rs::ExternalRpcHandler``):

* ``/prpc/Worker.<Method>`` and ``/prpc/<Method>`` (GET or POST) for ``Info``, ``Version``
  and ``GetAttestationForAppKey``. ``Info`` blanks ``tcb_info`` and ``vm_config`` unless the
  app-compose says ``public_tcbinfo`` (upstream's default: true);
* ``GET /metrics``: Prometheus text (:mod:`dstack_core.server.metrics`); upstream's system
  figures appear only with ``public_sysinfo``;
* ``GET /``: a small HTML status page.

No key-bearing method (GetKey, GetTlsKey, Sign, DeriveKey, ...) answers here: every other
path is 404 ``not_found``. Every response carries ``X-App-Version``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from .. import __version__
from ..errors import NotFound, UnsupportedAlgorithm
from ..inputs import AppComposeFlags
from ..jsonout import EncodedJson
from ..service import AgentService
from .app import (
    SERVICE_KEY,
    Method,
    _call,
    _quote_response,
    _version,
    info_response,
    trim_prefix,
)
from .codec import Field
from .errors import error_middleware
from .metrics import CONTENT_TYPE, AgentMetrics

__all__ = ["AppComposeFlags", "WORKER_METHODS", "create_external_app"]

WORKER_PREFIX: Final = "Worker."
APP_VERSION_HEADER: Final = "X-App-Version"
ED25519_REPORT_PREFIX: Final = "dip1::ed25519-pk:"
SECP256K1_REPORT_PREFIX: Final = "dip1::secp256k1c-pk:"
APP_KEY_PATH: Final = "vms"
APP_KEY_PURPOSE: Final = "signing"
HIDDEN_INFO_FIELDS: Final = ("tcb_info", "vm_config")


FLAGS_KEY: Final = web.AppKey("app_compose_flags", AppComposeFlags)
METRICS_KEY: Final = web.AppKey("metrics", AgentMetrics)


async def _worker_info(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    doc = info_response(await svc.info())
    if not AppComposeFlags.from_text(svc.app_compose).public_tcbinfo:
        doc.update(dict.fromkeys(HIDDEN_INFO_FIELDS, ""))
    return doc


def app_key_report_data(algorithm: str, public_key: bytes) -> bytes:
    """``dip1::<kind>-pk:`` + unpadded base64url of the app key, as upstream binds it."""
    prefix = ED25519_REPORT_PREFIX if algorithm == "ed25519" else SECP256K1_REPORT_PREFIX
    encoded = base64.urlsafe_b64encode(public_key).rstrip(b"=").decode("ascii")
    return (prefix + encoded).encode("ascii")


async def _attestation_for_app_key(svc: AgentService, a: dict[str, Any]) -> dict[str, Any]:
    requested = a["algorithm"]
    # GetKey("vms", "signing", algorithm) first, as upstream: "" passes it, then is refused.
    key = svc.get_key(path=APP_KEY_PATH, purpose=APP_KEY_PURPOSE, algorithm=requested)
    if requested == "":
        raise UnsupportedAlgorithm("Unsupported algorithm: ''")
    report_data = app_key_report_data(key.algorithm, key.public_key)
    return _quote_response(await svc.get_quote(report_data))


WORKER_METHODS: Final[dict[str, Method]] = {
    "Info": Method((), _worker_info),
    "Version": Method((), _version),
    "GetAttestationForAppKey": Method((Field("algorithm", "str"),), _attestation_for_app_key),
}


async def _worker(request: web.Request) -> web.Response:
    name = trim_prefix(request.match_info["method"], WORKER_PREFIX)
    method = WORKER_METHODS.get(name)
    if method is None:
        raise NotFound(f"Service not found: {name}")
    return await _call(request, name, method)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(), content_type=None,
                        headers={"Content-Type": CONTENT_TYPE})


def _row(label: str, value: str) -> str:
    return f"<tr><th>{html.escape(label)}</th><td><code>{html.escape(value)}</code></td></tr>"


async def _status_page(request: web.Request) -> web.Response:
    svc = request.app[SERVICE_KEY]
    flags = request.app[FLAGS_KEY]
    info = await _worker_info(svc, {})
    rows = [
        ("app name", info["app_name"]),
        ("app id", info["app_id"]),
        ("instance id", info["instance_id"]),
        ("device id", info["device_id"]),
        ("compose hash", info["compose_hash"]),
        ("os image hash", info["os_image_hash"]),
        ("key provider", info["key_provider_info"]),
        ("cloud", f"{info['cloud_vendor']} {info['cloud_product']}".strip()),
        ("platform", svc.platform.name),
        ("agent", f"dstack-core {__version__}"),
    ]
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>dstack CVM</title>',
        "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}"
        "th{text-align:left;padding-right:1em}td code{word-break:break-all}"
        "textarea{width:100%;height:20em}</style></head><body>",
        "<h1>dstack CVM</h1><table>",
        *(_row(label, value) for label, value in rows),
        "</table>",
    ]
    if flags.public_tcbinfo:
        tcb_info = info["tcb_info"]  # encoded JSON (a string) as Info sends it
        tcb_text = tcb_info.decode() if isinstance(tcb_info, EncodedJson) else tcb_info
        body.append(f"<h2>TCB info</h2><textarea readonly>{html.escape(tcb_text)}</textarea>")
    if flags.public_sysinfo:
        body.append('<p><a href="/metrics">system metrics</a></p>')
    body.append("</body></html>")
    return web.Response(text="\n".join(body), content_type="text/html")


def _version_header() -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    value = f"v{__version__} (dstack-core)"

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[APP_VERSION_HEADER] = value

    return add


def _label(request: web.Request) -> str:
    if request.path == "/":
        return "status_page"
    if request.path == "/metrics":
        return "metrics"
    name = trim_prefix(request.match_info.get("method", ""), WORKER_PREFIX)
    return name if name in WORKER_METHODS else "unknown"


def create_external_app(
    service: AgentService, metrics: AgentMetrics, *, max_body: int = 64 * 1024
) -> web.Application:
    """The external listener's application (see the module docstring)."""
    app = web.Application(
        middlewares=[metrics.middleware("external", _label), error_middleware],
        client_max_size=max_body,
    )
    app[SERVICE_KEY] = service
    app[FLAGS_KEY] = AppComposeFlags.from_text(service.app_compose)
    app[METRICS_KEY] = metrics
    app.on_response_prepare.append(_version_header())
    app.router.add_get("/", _status_page)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/prpc/{method}", _worker)
    app.router.add_post("/prpc/{method}", _worker)
    return app
