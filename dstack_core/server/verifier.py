"""The verifier as an HTTP service: ``POST /verify`` and ``GET /health`` (aiohttp).

The request and response follow the upstream dstack verifier (formats.md 2.4): the body
is ``{"quote", "event_log", "vm_config", "attestation", "debug"}`` (all optional; a
non-empty ``attestation`` wins), and the answer is ``{"is_valid", "details", "reason"}``
plus our ``verdict``, ``simulated``, ``warnings`` and per-check ``checks``. Two
extensions: a body may carry ``certificate_chain`` (PEM strings, an RA-TLS leaf first)
instead, and ``expected_report_data`` (hex, the CLI's ``--expect-report-data`` rule).

A failed verification is a 200 answer with ``is_valid: false``; malformed or unsupported
evidence is a 400 ``{"error", "code"}``. Bodies are strict JSON (no duplicate keys, no
NaN). A body over the limit is refused from its ``Content-Length`` before any of it is
read, and a body that arrives slower than ``body_timeout`` gets a 408; decoding and
verification run in worker threads, at most ``max_concurrent`` at a time, so ``/health``
and other requests keep answering. The service is stateless (collateral comes from a
fixed file, a cache directory shared safely between processes, or the configured PCCS),
so it scales out by running more processes behind any HTTP load balancer; see
``docs/verify.md`` for gunicorn's aiohttp worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from aiohttp import web

from .. import strictjson
from ..collateral import MAX_COLLATERAL_SIZE, Collateral, CollateralCache, CollateralSource
from ..collateral import fetch_collateral as fetch_dcap_collateral
from ..errors import (
    ConfigurationError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
)
from ..osimage import OsImagePolicy, with_expectations
from ..verify import (
    DEFAULT_ALLOWED_TCB_STATUSES,
    MAX_EVIDENCE_SIZE,
    CollateralResolver,
    Evidence,
    ExpectedReportData,
    TrustInputs,
    VerifierHost,
    VerifyOptions,
    bytes_tuple,
    default_host,
    evidence_from_json,
    parse_collateral_documents,
    parse_expected_report_data,
    string_set,
    verify_evidence,
)
from ..verify.options import verifier_options
from .codec import to_json_bytes
from .errors import error_middleware, json_response

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CONCURRENT",
    "ENV_PREFIX",
    "SETTINGS_KEY",
    "TDX_FORMAT",
    "VerifierSettings",
    "app_from_env",
    "collateral_resolver",
    "collateral_settings",
    "create_verifier_app",
    "load_certificates",
    "load_root_ca",
    "parse_verifier_options",
    "settings_from_env",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY: Final = MAX_EVIDENCE_SIZE
DEFAULT_BODY_TIMEOUT: Final = 30.0
"""Seconds a request body may take to arrive before the answer is 408."""
DEFAULT_MAX_CONCURRENT: Final = 4
"""Requests decoded and verified at once; more wait (bounds CPU and the memory of decoding:
each may hold a 24 MiB body a few times over while it is decoded)."""
READ_CHUNK: Final = 64 * 1024
SERVICE_NAME: Final = "dstack-verifier"
ENV_PREFIX: Final = "DSTACK_VERIFIER_"
TDX_FORMAT: Final = "tdx"
"""The evidence format Intel's collateral (:mod:`dstack_core.collateral`) is for."""


def load_certificates(path: Path, what: str = "trust anchor") -> tuple[bytes, ...]:
    """Read one or more certificates (PEM, or one DER) and return their DER bytes.

    :raises ConfigurationError: unreadable, or not certificates.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc}") from None
    try:
        certs = (
            x509.load_pem_x509_certificates(data)
            if b"-----BEGIN" in data
            else [x509.load_der_x509_certificate(data)]
        )
    except (ValueError, x509.InvalidVersion) as exc:
        raise ConfigurationError(f"{what} {path} is not a PEM or DER certificate: {exc}") from None
    return tuple(cert.public_bytes(Encoding.DER) for cert in certs)


def load_root_ca(path: Path) -> bytes:
    """Read a root certificate (PEM or DER) and return its DER bytes.

    :raises ConfigurationError: unreadable, or not exactly one certificate.
    """
    certs = load_certificates(path, "root CA")
    if len(certs) != 1:
        raise ConfigurationError(f"root CA {path} must hold exactly one certificate")
    return certs[0]


def parse_verifier_options(
    values: list[str], host: VerifierHost | None = None
) -> dict[str, dict[str, str]]:
    """``FORMAT:KEY=VALUE`` settings (``--verifier-option``), by format, each key checked
    against what that format's plugin accepts.

    :raises ConfigurationError: a malformed setting, a format no plugin is installed for,
        or a key its plugin does not take.
    """
    options: dict[str, dict[str, str]] = {}
    for value in values:
        fmt, colon, rest = value.partition(":")
        key, equals, setting = rest.partition("=")
        if not (colon and equals and fmt and key):
            raise ConfigurationError(
                f"verifier option {value!r} is not FORMAT:KEY=VALUE (e.g. sev-snp:kds_url=amd)"
            )
        options.setdefault(fmt, {})[key] = setting
    host = host or default_host()
    for fmt, settings in options.items():
        if fmt not in host.formats():
            raise ConfigurationError(
                f"verifier options for evidence format {fmt!r}, but no verifier plugin for "
                f"it is installed (installed: {', '.join(host.formats()) or 'none'})"
            )
        host.get(fmt).check_options(settings)
    return options


def collateral_settings(
    document: Path | None, cache: Path | None, pccs_url: str | None,
    host: VerifierHost | None = None,
) -> tuple[CollateralSource, dict[str, object]]:
    """Intel's collateral source and every other format's fixed collateral, from a
    collateral file (read by the plugin whose format it is), a cache and a PCCS.

    :raises ConfigurationError: the file cannot be read, or no plugin can use it.
    """
    parsed: dict[str, object] = {}
    if document is not None:
        try:
            with document.open("rb") as handle:
                content = handle.read(MAX_COLLATERAL_SIZE + 1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read collateral file {document}: {exc}") from None
        if len(content) > MAX_COLLATERAL_SIZE:
            raise ConfigurationError(
                f"collateral file {document} is over {MAX_COLLATERAL_SIZE} bytes"
            )
        parsed = parse_collateral_documents([(str(document), content)], host)
    fixed = parsed.pop(TDX_FORMAT, None)
    source = CollateralSource(
        fixed=fixed if isinstance(fixed, Collateral) else None,
        cache=CollateralCache(directory=cache) if cache is not None else None,
        pccs_url=pccs_url,
    )
    return source, parsed


def collateral_resolver(
    source: CollateralSource,
    documents: Mapping[str, object],
    plugin_options: Mapping[str, Mapping[str, str]],
    host: VerifierHost | None = None,
) -> CollateralResolver:
    """Where each format's collateral comes from: Intel's ``source`` for ``tdx`` evidence
    (fixed, cache, PCCS), ``documents`` for other formats, and each plugin's fetching with
    the cache directory and options."""
    fixed = dict(documents)
    if source.fixed is not None:
        fixed[TDX_FORMAT] = source.fixed
    return CollateralResolver(
        fixed=fixed,
        trust=TrustInputs(
            collateral_cache=source.cache.directory if source.cache is not None else None,
            pccs_url=source.pccs_url,
            pccs_fetcher=None if source.fetcher is fetch_dcap_collateral else source.fetcher,
            options=plugin_options,
        ),
        host=host or default_host(),
    )


@attrs.frozen(kw_only=True)
class VerifierSettings:
    """Everything the service trusts and requires; fixed for the process's lifetime.

    :ivar collateral: where Intel collateral (``tdx`` evidence) comes from; its cache
        directory is every plugin's.
    :ivar documents: other formats' collateral used for all their evidence, by format (as
        :func:`~dstack_core.verify.parse_collateral_documents` parses it).
    :ivar plugin_options: per evidence format, its verifier plugin's options.
    :ivar root_ca_der: an external root (the simulator's), or None for Intel's.
    :ivar allow_simulator: accept simulator evidence and external roots.
    :ivar allowed_tcb_statuses: TCB statuses that pass.
    :ivar rejected_advisory_ids: advisories that fail ``advisory_ids``.
    :ivar allow_stripped_event_log: see :class:`~dstack_core.verify.VerifyOptions`.
    :ivar os_image_policy: known OS images (and expected registers), or None.
    :ivar ratls_trust_anchors: DER certificates RA-TLS chains may end at.
    :ivar max_body_size: request body limit in bytes.
    :ivar body_timeout: seconds a request body may take to arrive (then 408).
    :ivar max_concurrent: requests decoded and verified at once.
    :ivar clock: the verification time source (unix seconds); a test may pin it.
    """

    collateral: CollateralSource = attrs.field(factory=CollateralSource)
    documents: Mapping[str, object] = attrs.field(factory=dict, eq=False)
    plugin_options: Mapping[str, Mapping[str, str]] = attrs.field(
        factory=dict, converter=verifier_options, eq=False
    )
    root_ca_der: bytes | None = None
    allow_simulator: bool = False
    allowed_tcb_statuses: frozenset[str] = attrs.field(
        default=DEFAULT_ALLOWED_TCB_STATUSES, converter=string_set
    )
    rejected_advisory_ids: frozenset[str] = attrs.field(factory=frozenset, converter=string_set)
    allow_stripped_event_log: bool = False
    os_image_policy: OsImagePolicy | None = None
    ratls_trust_anchors: tuple[bytes, ...] = attrs.field(default=(), converter=bytes_tuple)
    max_body_size: int = DEFAULT_MAX_BODY
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    clock: Callable[[], int] = attrs.field(default=lambda: int(time.time()), eq=False)

    def options(self, *, now: int, expected: ExpectedReportData | None) -> VerifyOptions:
        """The :class:`VerifyOptions` of one request."""
        return VerifyOptions(
            now=now,
            root_ca_der=self.root_ca_der,
            allow_simulator=self.allow_simulator,
            allowed_tcb_statuses=self.allowed_tcb_statuses,
            rejected_advisory_ids=self.rejected_advisory_ids,
            expected_report_data=expected,
            allow_stripped_event_log=self.allow_stripped_event_log,
            os_image_policy=self.os_image_policy,
            ratls_trust_anchors=self.ratls_trust_anchors,
            plugin_options=self.plugin_options,
        )

    def resolver(self) -> CollateralResolver:
        """Where each format's collateral comes from (:func:`collateral_resolver`)."""
        return collateral_resolver(self.collateral, self.documents, self.plugin_options)


SETTINGS_KEY: Final = web.AppKey("verifier_settings", VerifierSettings)
SLOTS_KEY: Final = web.AppKey("verifier_slots", asyncio.Semaphore)
RESOLVER_KEY: Final = web.AppKey("verifier_collateral", CollateralResolver)


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytearray:
    """The request body, refused unread when ``Content-Length`` is over ``limit``, cut off
    as soon as a chunked one grows past it, and abandoned after ``timeout`` seconds.

    :raises PayloadTooLarge: over the limit.
    :raises RequestTimeout: too slow.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body is {declared} bytes, over the {limit}-byte limit of /verify"
        )
    # One buffer of the declared size, filled in place: no list of chunks joined at the end.
    body = bytearray(declared or 0)
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(READ_CHUNK):
                end = size + len(chunk)
                if end > limit:
                    raise PayloadTooLarge(f"request body is over the {limit}-byte limit of /verify")
                body[size:end] = chunk
                size = end
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} seconds"
        ) from None
    del body[size:]
    return body


def _request_doc(body: bytes | bytearray) -> Mapping[str, Any]:
    """The request object, strict JSON (the CLI's rules: no duplicate keys, no NaN)."""
    try:
        doc = strictjson.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object")
    return doc


def _expected(doc: Mapping[str, Any]) -> ExpectedReportData | None:
    """``expected_report_data``: absent or null means none; anything else is parsed with
    :func:`~dstack_core.verify.parse_expected_report_data` (``""`` is an error)."""
    value = doc.get("expected_report_data")
    if value is None:
        return None
    try:
        return parse_expected_report_data(value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"expected_report_data: {exc.message}") from None


def _decode_request(
    holder: list[bytearray] | bytes,
) -> tuple[ExpectedReportData | None, Evidence]:
    """Parse and decode one request body (CPU-bound: runs in a worker thread).

    :param holder: the body, or a list holding it alone: it is taken out, so that it is
        freed as soon as it is parsed rather than kept by the caller until the end.
    """
    body = holder.pop() if isinstance(holder, list) else holder
    doc = _request_doc(body)
    del body
    return _expected(doc), evidence_from_json(doc)


def _verify_request(
    holder: list[bytearray] | bytes, settings: VerifierSettings, resolver: CollateralResolver
) -> bytes:
    """Decode, find collateral for and verify one request body; the JSON answer.

    CPU-bound and possibly blocking (a plugin fetching collateral): runs in a worker thread,
    one hop per request.
    """
    expected, evidence = _decode_request(holder)
    now = settings.clock()
    collateral, problem = resolver.collateral_for(evidence.report, now=now)
    if problem is not None:
        log.warning("no collateral for a /verify request: %s", problem)
    result = verify_evidence(
        evidence, settings.options(now=now, expected=expected), collateral,
        collateral_error=problem,
    )
    return to_json_bytes(result.to_upstream_json())


async def _verify(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    # The body is read before taking a slot: a slow client waits for its own body only.
    holder = [await _read_body(request, settings.max_body_size, settings.body_timeout)]
    async with request.app[SLOTS_KEY]:
        answer = await asyncio.to_thread(
            _verify_request, holder, settings, request.app[RESOLVER_KEY]
        )
    return web.Response(body=answer, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "service": SERVICE_NAME})


def create_verifier_app(settings: VerifierSettings) -> web.Application:
    """The aiohttp application: ``POST /verify``, ``GET /health``.

    Every installed verifier plugin is loaded here, so that a broken or conflicting one
    stops the service at start-up rather than failing requests.

    :raises PluginError: a verifier plugin is conflicting or broken.
    """
    default_host().load_all()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_size)
    app[SETTINGS_KEY] = settings
    app[RESOLVER_KEY] = settings.resolver()
    app[SLOTS_KEY] = asyncio.Semaphore(settings.max_concurrent)
    app.router.add_post("/verify", _verify)
    app.router.add_get("/health", _health)
    return app


def _env_list(environ: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in environ.get(ENV_PREFIX + name, "").split(",") if item.strip()]


def settings_from_env(environ: Mapping[str, str] | None = None) -> VerifierSettings:
    """Settings from ``DSTACK_VERIFIER_*`` variables (for gunicorn, which passes no flags).

    ``COLLATERAL`` (file), ``COLLATERAL_CACHE`` (dir), ``PCCS_URL``, ``ROOT_CA`` (file),
    ``ALLOW_SIMULATOR`` (``1``/``true``), ``ALLOW_TCB_STATUS`` and ``REJECT_ADVISORY``
    (comma-separated), ``ALLOW_STRIPPED_EVENT_LOG``, ``OS_IMAGE_POLICY`` (file),
    ``EXPECT_MRTD`` (hex), ``EXPECT_RTMR`` (comma-separated ``N=HEX``), ``TRUST_ANCHOR``
    (PEM file), ``MAX_BODY_SIZE`` (bytes), ``BODY_TIMEOUT`` (seconds), ``MAX_CONCURRENT``,
    ``VERIFIER_OPTION`` (comma-separated ``FORMAT:KEY=VALUE``).

    :raises ConfigurationError: unreadable files or invalid values.
    """
    env = os.environ if environ is None else environ

    def flag(name: str) -> bool:
        return env.get(ENV_PREFIX + name, "").strip().lower() in ("1", "true", "yes", "on")

    collateral_file = env.get(ENV_PREFIX + "COLLATERAL")
    cache_dir = env.get(ENV_PREFIX + "COLLATERAL_CACHE")
    root = env.get(ENV_PREFIX + "ROOT_CA")
    def number(name: str, default: float, kind: type[int | float]) -> Any:
        try:
            value = kind(env.get(ENV_PREFIX + name, default))
        except ValueError:
            raise ConfigurationError(f"{ENV_PREFIX}{name} must be a number") from None
        if value <= 0:
            raise ConfigurationError(f"{ENV_PREFIX}{name} must be positive")
        return value

    policy_file = env.get(ENV_PREFIX + "OS_IMAGE_POLICY")
    anchor_file = env.get(ENV_PREFIX + "TRUST_ANCHOR")
    policy = OsImagePolicy.from_file(Path(policy_file)) if policy_file else None
    source, documents = collateral_settings(
        Path(collateral_file) if collateral_file else None,
        Path(cache_dir) if cache_dir else None,
        env.get(ENV_PREFIX + "PCCS_URL") or None,
    )
    return VerifierSettings(
        collateral=source,
        documents=documents,
        plugin_options=parse_verifier_options(_env_list(env, "VERIFIER_OPTION")),
        root_ca_der=load_root_ca(Path(root)) if root else None,
        allow_simulator=flag("ALLOW_SIMULATOR"),
        allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(_env_list(env, "ALLOW_TCB_STATUS")),
        rejected_advisory_ids=_env_list(env, "REJECT_ADVISORY"),
        allow_stripped_event_log=flag("ALLOW_STRIPPED_EVENT_LOG"),
        os_image_policy=with_expectations(
            policy, env.get(ENV_PREFIX + "EXPECT_MRTD"), _env_list(env, "EXPECT_RTMR")
        ),
        ratls_trust_anchors=load_certificates(Path(anchor_file)) if anchor_file else (),
        max_body_size=number("MAX_BODY_SIZE", DEFAULT_MAX_BODY, int),
        body_timeout=number("BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT, float),
        max_concurrent=number("MAX_CONCURRENT", DEFAULT_MAX_CONCURRENT, int),
    )


async def app_from_env() -> web.Application:
    """The app configured from the environment: the entry point for gunicorn's
    ``aiohttp.GunicornWebWorker`` (``dstack_core.server.verifier:app_from_env``)."""
    return create_verifier_app(settings_from_env())
