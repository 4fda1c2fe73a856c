"""The verifier as an HTTP service: ``POST /verify`` and ``GET /health`` (aiohttp).

The request and response follow the upstream dstack verifier (formats.md 2.4): the body
is ``{"quote", "event_log", "vm_config", "attestation", "debug"}`` (all optional; a
non-empty ``attestation`` wins), and the answer is ``{"is_valid", "details", "reason"}``
plus our ``verdict``, ``simulated`` and per-check ``checks``. Two extensions: a body may
carry ``certificate_chain`` (PEM strings, an RA-TLS leaf first) instead, and
``expected_report_data`` (hex) to require a report data value.

A failed verification is a 200 answer with ``is_valid: false``; malformed or unsupported
evidence is a 400 ``{"error", "code"}``. The service is stateless (collateral comes from a
fixed file, a cache directory shared safely between processes, or the configured PCCS),
so it scales out by running more processes behind any HTTP load balancer; see
``docs/verify.md`` for gunicorn's aiohttp worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from aiohttp import web

from ..collateral import CollateralCache, CollateralSource, load_collateral_file
from ..errors import ConfigurationError, EvidenceError
from ..verify import (
    DEFAULT_ALLOWED_TCB_STATUSES,
    MAX_EVIDENCE_SIZE,
    ExpectedReportData,
    VerificationResult,
    VerifyOptions,
    evidence_from_json,
    string_set,
    verify_evidence,
)
from .errors import error_middleware, json_response

__all__ = [
    "DEFAULT_MAX_BODY",
    "ENV_PREFIX",
    "SETTINGS_KEY",
    "VerifierSettings",
    "app_from_env",
    "create_verifier_app",
    "load_root_ca",
    "settings_from_env",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY: Final = MAX_EVIDENCE_SIZE
SERVICE_NAME: Final = "dstack-verifier"
ENV_PREFIX: Final = "DSTACK_VERIFIER_"


def load_root_ca(path: Path) -> bytes:
    """Read a root certificate (PEM or DER) and return its DER bytes.

    :raises ConfigurationError: unreadable, or not exactly one certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read root CA {path}: {exc}") from None
    try:
        certs = (
            x509.load_pem_x509_certificates(data)
            if b"-----BEGIN" in data
            else [x509.load_der_x509_certificate(data)]
        )
    except ValueError as exc:
        raise ConfigurationError(f"root CA {path} is not a PEM or DER certificate: {exc}") from None
    if len(certs) != 1:
        raise ConfigurationError(f"root CA {path} must hold exactly one certificate")
    return certs[0].public_bytes(Encoding.DER)


@attrs.frozen(kw_only=True)
class VerifierSettings:
    """Everything the service trusts and requires; fixed for the process's lifetime.

    :ivar collateral: where collateral comes from.
    :ivar root_ca_der: an external root (the simulator's), or None for Intel's.
    :ivar allow_simulator: accept simulator evidence and external roots.
    :ivar allowed_tcb_statuses: TCB statuses that pass.
    :ivar rejected_advisory_ids: advisories that fail ``advisory_ids``.
    :ivar allow_stripped_event_log: see :class:`~dstack_core.verify.VerifyOptions`.
    :ivar max_body_size: request body limit in bytes.
    :ivar clock: the verification time source (unix seconds); a test may pin it.
    """

    collateral: CollateralSource = attrs.field(factory=CollateralSource)
    root_ca_der: bytes | None = None
    allow_simulator: bool = False
    allowed_tcb_statuses: frozenset[str] = attrs.field(
        default=DEFAULT_ALLOWED_TCB_STATUSES, converter=string_set
    )
    rejected_advisory_ids: frozenset[str] = attrs.field(factory=frozenset, converter=string_set)
    allow_stripped_event_log: bool = False
    max_body_size: int = DEFAULT_MAX_BODY
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
        )


SETTINGS_KEY: Final = web.AppKey("verifier_settings", VerifierSettings)


def _request_doc(body: bytes) -> Mapping[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise EvidenceError(
            f"request body is not valid JSON: {exc}", code="invalid_request"
        ) from None
    if not isinstance(doc, dict):
        raise EvidenceError("request body must be a JSON object", code="invalid_request")
    return doc


def _expected(doc: Mapping[str, Any]) -> ExpectedReportData | None:
    value = doc.get("expected_report_data")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise EvidenceError("expected_report_data must be a hex string", code="invalid_request")
    try:
        return ExpectedReportData.raw(bytes.fromhex(value.removeprefix("0x")))
    except ValueError:
        raise EvidenceError("expected_report_data is not hex", code="invalid_request") from None


async def _verify(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    doc = _request_doc(await request.read())
    expected = _expected(doc)
    evidence = await asyncio.to_thread(evidence_from_json, doc)
    now = settings.clock()
    collateral = None
    problem = None
    try:
        if evidence.quote is not None:  # SEV-SNP evidence has no DCAP collateral
            collateral = await settings.collateral.collateral_for(evidence.quote.raw, now=now)
    except EvidenceError as exc:
        problem = exc.message
        log.warning("no collateral for a /verify request: %s", problem)
    result: VerificationResult = await asyncio.to_thread(
        verify_evidence,
        evidence,
        settings.options(now=now, expected=expected),
        collateral,
        collateral_error=problem,
    )
    return json_response(result.to_upstream_json())


async def _health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "service": SERVICE_NAME})


def create_verifier_app(settings: VerifierSettings) -> web.Application:
    """The aiohttp application: ``POST /verify``, ``GET /health``."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_size)
    app[SETTINGS_KEY] = settings
    app.router.add_post("/verify", _verify)
    app.router.add_get("/health", _health)
    return app


def _env_list(environ: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in environ.get(ENV_PREFIX + name, "").split(",") if item.strip()]


def settings_from_env(environ: Mapping[str, str] | None = None) -> VerifierSettings:
    """Settings from ``DSTACK_VERIFIER_*`` variables (for gunicorn, which passes no flags).

    ``COLLATERAL`` (file), ``COLLATERAL_CACHE`` (dir), ``PCCS_URL``, ``ROOT_CA`` (file),
    ``ALLOW_SIMULATOR`` (``1``/``true``), ``ALLOW_TCB_STATUS`` and ``REJECT_ADVISORY``
    (comma-separated), ``ALLOW_STRIPPED_EVENT_LOG``, ``MAX_BODY_SIZE`` (bytes).

    :raises ConfigurationError: unreadable files or invalid values.
    """
    env = os.environ if environ is None else environ

    def flag(name: str) -> bool:
        return env.get(ENV_PREFIX + name, "").strip().lower() in ("1", "true", "yes", "on")

    collateral_file = env.get(ENV_PREFIX + "COLLATERAL")
    cache_dir = env.get(ENV_PREFIX + "COLLATERAL_CACHE")
    root = env.get(ENV_PREFIX + "ROOT_CA")
    try:
        max_body = int(env.get(ENV_PREFIX + "MAX_BODY_SIZE", DEFAULT_MAX_BODY))
    except ValueError:
        raise ConfigurationError(f"{ENV_PREFIX}MAX_BODY_SIZE must be an integer") from None
    try:
        fixed = load_collateral_file(Path(collateral_file)) if collateral_file else None
    except EvidenceError as exc:
        raise ConfigurationError(f"invalid collateral file: {exc.message}") from None
    return VerifierSettings(
        collateral=CollateralSource(
            fixed=fixed,
            cache=CollateralCache(directory=Path(cache_dir)) if cache_dir else None,
            pccs_url=env.get(ENV_PREFIX + "PCCS_URL") or None,
        ),
        root_ca_der=load_root_ca(Path(root)) if root else None,
        allow_simulator=flag("ALLOW_SIMULATOR"),
        allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(_env_list(env, "ALLOW_TCB_STATUS")),
        rejected_advisory_ids=_env_list(env, "REJECT_ADVISORY"),
        allow_stripped_event_log=flag("ALLOW_STRIPPED_EVENT_LOG"),
        max_body_size=max_body,
    )


async def app_from_env() -> web.Application:
    """The app configured from the environment: the entry point for gunicorn's
    ``aiohttp.GunicornWebWorker`` (``dstack_core.server.verifier:app_from_env``)."""
    return create_verifier_app(settings_from_env())
