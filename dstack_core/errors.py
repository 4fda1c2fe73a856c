"""The one error hierarchy of dstack-core.

Every error the core or a platform plugin raises on purpose is a :class:`DstackError`.
Each class carries the HTTP status the front end answers with and a stable snake_case
``code`` that clients may match on; the message is for humans and may change.

The split follows who is at fault:

* :class:`InvalidRequest` (400): the caller sent something we cannot accept.
* :class:`PlatformError` (5xx): the TEE, the kernel or the plugin failed.
* :class:`StorageError` (503): the agent's durable state could not be written (disk full,
  read-only, I/O error); the agent repairs itself once the fault is gone.
* :class:`ConfigurationError`: the agent cannot start as configured (never seen on the wire).
* :class:`EvidenceError` (400): evidence handed to a parser or the verifier is malformed.
* :class:`VerifierPluginError` (500): a verifier plugin broke its contract.
* :class:`KmsError` (502/503): the KMS that issues the app's certificates failed or refused.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DstackError",
    "InvalidRequest",
    "UnsupportedAlgorithm",
    "ReportDataTooLong",
    "NotFound",
    "PayloadTooLarge",
    "MalformedHttp",
    "MethodNotAllowed",
    "RequestTimeout",
    "UriTooLong",
    "HeaderTooLarge",
    "UnsupportedContentEncoding",
    "InvalidContentEncoding",
    "ExpectationFailed",
    "Forbidden",
    "AuditUnavailable",
    "PlatformError",
    "PlatformUnsupported",
    "PlatformBusy",
    "StorageError",
    "EventTooLarge",
    "EventLogFull",
    "ConfigurationError",
    "PluginError",
    "EvidenceError",
    "StateError",
    "KmsError",
    "KmsUnavailable",
    "VerifierPluginError",
]


class DstackError(Exception):
    """Base class of every deliberate dstack-core error.

    :cvar http_status: the status the HTTP front end answers with.
    :cvar code: a stable, snake_case identifier sent beside the message.
    """

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    logged: ClassVar[bool] = False
    """Whoever raises it has logged the incident (once, not per request)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]

    def to_json(self) -> dict[str, str]:
        """The wire body: ``{"error": message, "code": code}``."""
        return {"error": self.message, "code": self.code}


class InvalidRequest(DstackError):
    """The caller's input is malformed or not acceptable (HTTP 400)."""

    http_status = 400
    code = "invalid_request"


class UnsupportedAlgorithm(InvalidRequest):
    """An algorithm name the agent does not implement (HTTP 400)."""

    code = "unsupported_algorithm"


class ReportDataTooLong(InvalidRequest):
    """Report data longer than the 64 bytes a quote can carry (HTTP 400)."""

    code = "report_data_too_long"


class NotFound(InvalidRequest):
    """No such method or path (HTTP 404)."""

    http_status = 404
    code = "not_found"


class EventTooLarge(InvalidRequest):
    """An EmitEvent payload over the documented limit (HTTP 413)."""

    http_status = 413
    code = "event_payload_too_large"


class EventLogFull(InvalidRequest):
    """The runtime event log reached its documented size limit (HTTP 409).

    Nothing is dropped: the event is refused before anything is measured, and every event
    already recorded stays in the log and in RTMR3.
    """

    http_status = 409
    code = "event_log_full"


class PayloadTooLarge(InvalidRequest):
    """A request body over the configured limit (HTTP 400, as upstream answers)."""

    code = "payload_too_large"


class MalformedHttp(InvalidRequest):
    """The request is not well-formed HTTP/1.1 (framing, request line, headers) (HTTP 400)."""

    code = "malformed_http"


class MethodNotAllowed(InvalidRequest):
    """An HTTP verb other than GET, HEAD or POST (HTTP 405)."""

    http_status = 405
    code = "method_not_allowed"


class RequestTimeout(InvalidRequest, TimeoutError):
    """The client did not send its request head or body in time (HTTP 408).

    Also a :class:`TimeoutError`, which is what aiohttp's server expects from a request body
    that will never complete.
    """

    http_status = 408
    code = "request_timeout"


class UriTooLong(InvalidRequest):
    """A request line over the server's limit (HTTP 414)."""

    http_status = 414
    code = "uri_too_long"


class HeaderTooLarge(InvalidRequest):
    """A header field over the server's limit, or too many of them (HTTP 431)."""

    http_status = 431
    code = "header_too_large"


class UnsupportedContentEncoding(InvalidRequest):
    """A request body in a ``Content-Encoding`` the agent does not decode (HTTP 415)."""

    http_status = 415
    code = "unsupported_content_encoding"


class InvalidContentEncoding(InvalidRequest):
    """A body that does not decode as its ``Content-Encoding`` says (HTTP 400)."""

    code = "invalid_content_encoding"


class ExpectationFailed(InvalidRequest):
    """An ``Expect`` header other than ``100-continue`` (HTTP 417)."""

    http_status = 417
    code = "expectation_failed"


class Forbidden(InvalidRequest):
    """The caller policy does not let this caller make this call (HTTP 403).

    The message names the method (and the key path or certificate name asked for), never
    the policy's contents.
    """

    http_status = 403
    code = "forbidden"


class AuditUnavailable(DstackError):
    """The audit log cannot be written, so an audited call is refused (HTTP 503).

    The agent fails closed: no key leaves and no measurement moves unrecorded. It serves
    audited calls again as soon as a write succeeds.
    """

    http_status = 503
    code = "audit_unavailable"


class PlatformError(DstackError):
    """The platform (TEE, kernel interface or plugin) failed (HTTP 500)."""

    http_status = 500
    code = "platform_error"


class PlatformUnsupported(PlatformError):
    """The platform cannot do this at all, e.g. runtime registers on SEV-SNP (HTTP 501)."""

    http_status = 501
    code = "platform_unsupported"


class PlatformBusy(PlatformError):
    """The platform is temporarily busy; the caller may retry (HTTP 503)."""

    http_status = 503
    code = "platform_busy"


class StorageError(DstackError):
    """Durable state could not be read or written: ENOSPC, EACCES, EROFS, EIO (HTTP 503).

    The message never carries a path or the exception's text; the agent logs what failed
    and where, once per incident. The caller may retry once the fault is repaired.
    """

    http_status = 503
    code = "storage_error"
    logged = True


class ConfigurationError(DstackError):
    """The agent cannot start as configured; reported at startup, never on the wire."""

    http_status = 500
    code = "configuration_error"


class PluginError(ConfigurationError):
    """A platform plugin is missing, duplicated, conflicting or broken."""

    code = "plugin_error"


class VerifierPluginError(DstackError):
    """A verifier plugin failed while verifying (a bug: it raised something other than a
    :class:`DstackError`, or answered against the contract). The message names the plugin,
    never the exception; the traceback is in the log (HTTP 500)."""

    http_status = 500
    code = "verifier_plugin_error"


class EvidenceError(DstackError):
    """Evidence (a quote, an event log, an envelope, a certificate) is malformed (HTTP 400)."""

    http_status = 400
    code = "malformed_evidence"


class StateError(DstackError):
    """Durable state on disk is inconsistent and cannot be repaired safely (HTTP 500)."""

    http_status = 500
    code = "state_error"


class KmsError(DstackError):
    """The KMS answered, but not with a usable certificate (HTTP 502).

    Codes: ``kms_rejected`` (the KMS refused; its message follows), ``kms_untrusted`` (its
    TLS certificate is not issued by the KMS root in ``appkeys.json``), ``kms_tls_error``
    (the TLS handshake failed), ``kms_bad_response`` (malformed answer, or a chain that does
    not certify our key under the pinned root).
    """

    http_status = 502
    code = "kms_error"


class KmsUnavailable(KmsError):
    """The KMS cannot be reached, did not answer in time, or is overloaded; retry (HTTP 503).

    Codes: ``kms_unavailable`` (connection failed, or the KMS answered 5xx), ``kms_timeout``.
    """

    http_status = 503
    code = "kms_unavailable"
