"""The verifier: check any dstack attestation and say, check by check, what was verified.

Two steps, both pure (no network, no clock: collateral and the verification time are
inputs):

1. :func:`load_evidence` recognises the evidence by its content and decodes it into an
   :class:`Evidence`: our CBOR envelope, upstream V0 (SCALE) and V1 (MessagePack)
   envelopes, a bare TDX quote, the JSON body of a GetQuote / Attest response (or of an
   upstream ``/verify`` request), or an RA-TLS certificate chain in PEM or DER. Hex text
   of any binary form is accepted too. Malformed evidence raises
   :class:`~dstack_core.errors.EvidenceError`; unsupported platforms (Nitro, GCP, and
   upstream's SEV-SNP envelopes) raise it with ``code="unsupported_evidence"``.
2. :func:`verify_evidence` runs every check and returns a :class:`VerificationResult`. A
   failed check is data in the result, never an exception.

Checks (stable names, in result order; see ``docs/verify.md``):

``evidence``, ``simulator_policy``, ``collateral``, ``certificate_chain``, ``qe_identity``,
``quote_signature``, ``tcb_status``, ``advisory_ids``, ``td_attributes``,
``mr_signer_seam``, ``mr_service_td``, ``event_log``, ``runtime_events``,
``envelope_binding``, ``report_data``, ``ratls_binding``, ``ratls_chain``, ``os_image``.

``collateral`` through ``tcb_status`` (and part of ``td_attributes`` and
``mr_service_td``) come from dcap-qvl, which stops at the first failure: its message is
mapped onto the check it belongs to (formats.md section 5 gives dcap-qvl's order), checks
before it pass, checks after it are ``skipped`` as not reached.

The verdict is ``pass`` only if no check failed and every *mandatory* check passed. Which
checks are mandatory depends on the evidence: the quote checks and the event log always;
``envelope_binding`` for envelopes; ``ratls_binding`` for certificates; ``report_data``
when an expectation was given; ``os_image`` with an OS image policy; ``ratls_chain`` with
trust anchors. ``reason`` names the first failed check.

A claim comes only from data the quote's signature covers, directly or through a replay
that reproduces the signed registers (docs/verify.md has the table): RTMR3 may hold only
dstack runtime events, replayed from their content; the identity is read from them only
when that replay gives the quote's RTMR3 and the quote is authenticated; ``os_image_hash``
only through an OS image policy (:mod:`dstack_core.osimage`) or a bound ``os-image-hash``
event; ``platform`` from the quote, never from the envelope's tag. What nothing binds is
reported empty, whatever the verdict.

SEV-SNP evidence (our envelope with evidence format ``sev-snp``, also inside an RA-TLS
certificate) has its own checks, :data:`SNP_CHECK_NAMES`: the report is parsed
(:mod:`dstack_core.snp`), its report data and guest policy are checked, and
``snp_signature`` and ``vcek_chain`` are always ``skipped`` (there is no VCEK certificate
chain to check the signature with) yet mandatory. The verdict for SNP evidence is therefore
always ``fail``, with the reason "signature not verified (no VCEK chain)" when nothing else
failed; there is no option to accept an unverified report.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import attrs
import dcap_qvl  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from . import strictjson
from .appinfo import SYSTEM_READY, boot_event_payload, derive_app_info
from .certs import (
    RaTlsCertificate,
    load_certificate_chain,
    ratls_report_data,
    report_data_for,
    verify_chain,
)
from .collateral import Collateral
from .envelope import ENVELOPE_MAGIC, AppInfo, Envelope
from .errors import EvidenceError, InvalidRequest
from .eventlog import (
    EV_NO_ACTION,
    RTMR_COUNT,
    RUNTIME_EVENT_TYPE,
    RUNTIME_IMR,
    ZERO_REGISTER,
    RuntimeEvent,
    TdxEvent,
    events_from_json,
    extend,
    runtime_event_preimage,
)
from .mockpki import SIMULATOR_USER_DATA
from .osimage import OsImagePolicy, check_os_image, stated_os_image_hash
from .quote import TdReport, TdxQuote, is_tdx_quote
from .snp import POLICY_RESERVED_ONE, SIGNATURE_ALGO_ECDSA_P384_SHA384, SnpReport
from .types import REPORT_DATA_LENGTH, is_hardware_tag
from .upstream import UpstreamAttestation, decode_attestation, is_upstream_attestation

__all__ = [
    "CHECK_NAMES",
    "DEFAULT_ALLOWED_TCB_STATUSES",
    "MAX_EVIDENCE_SIZE",
    "SIMULATOR_MARKER",
    "SNP_CHECK_NAMES",
    "BootEvent",
    "CheckResult",
    "CheckStatus",
    "Evidence",
    "EvidenceKind",
    "ExpectedReportData",
    "VerificationResult",
    "VerifyOptions",
    "bytes_tuple",
    "evidence_from_json",
    "load_evidence",
    "parse_expected_report_data",
    "sniff_evidence",
    "string_set",
    "verify",
    "verify_evidence",
]

CheckStatus = Literal["pass", "fail", "skipped"]
EvidenceKind = Literal["dstack-core", "upstream-v0", "upstream-v1", "quote", "ratls-certificate"]

CHECK_NAMES: Final = (
    "evidence",
    "simulator_policy",
    "collateral",
    "certificate_chain",
    "qe_identity",
    "quote_signature",
    "tcb_status",
    "advisory_ids",
    "td_attributes",
    "mr_signer_seam",
    "mr_service_td",
    "event_log",
    "runtime_events",
    "envelope_binding",
    "report_data",
    "ratls_binding",
    "ratls_chain",
    "os_image",
)
"""Every check of TDX evidence, in the order results list them. Names are stable API."""

SNP_CHECK_NAMES: Final = (
    "evidence",
    "snp_policy",
    "event_log",
    "envelope_binding",
    "report_data",
    "ratls_binding",
    "ratls_chain",
    "snp_signature",
    "vcek_chain",
)
"""Every check of SEV-SNP evidence, in the order results list them (the two that can never
pass last, so that ``reason`` names a real failure first). Names are stable API."""

DEFAULT_ALLOWED_TCB_STATUSES: Final = frozenset({"UpToDate"})
"""TCB statuses accepted unless the caller allows more (upstream KMS's default)."""

MAX_EVIDENCE_SIZE: Final = 24 * 1024 * 1024
"""Evidence inputs over 24 MiB (a 10 MiB envelope as hex inside JSON fits) are refused."""

SIMULATOR_MARKER: Final = SIMULATOR_USER_DATA[:16]
"""``DSTACK-SIMULATOR``: the start of a simulator quote's header user_data."""

SIMULATOR_PLATFORM: Final = "simulator"
TDX_FORMAT: Final = "tdx"
SNP_FORMAT: Final = "sev-snp"
TEE_VARIANT_TDX: Final = "dstack-tdx"
TEE_VARIANT_SNP: Final = "dstack-amd-sev-snp"
APP_DATA_TAG: Final = "app-data"
OS_IMAGE_HASH_EVENT: Final = "os-image-hash"
"""The RTMR3 event dstack-util emits (KMS mode) with the OS image hash the KMS accepted."""

_DCAP_CHECKS: Final = (
    "collateral",
    "certificate_chain",
    "qe_identity",
    "quote_signature",
    "tcb_status",
)
_QUOTE_AUTHENTICATION: Final = (
    "simulator_policy",
    "collateral",
    "certificate_chain",
    "qe_identity",
    "quote_signature",
)
"""The checks that together say the quote's signature verified under an accepted root:
only then is anything reported as a claim."""
_HEX_PREFIXES: Final = (b"0x", b"0X")
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_ASCII_WHITESPACE: Final = b" \t\n\r\x0b\x0c"
_PEM_START: Final = b"-----BEGIN"
_PEM_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
_DER_SEQUENCE: Final = 0x30
_JSON_OBJECT: Final = b"{"
_QVL_PREFIX: Final = "Verification failed: "
_UNKNOWN_STAGE: Final = "unknown"
_AMBIGUOUS_CHAIN: Final = "ambiguous_chain"


# --- values ----------------------------------------------------------------------------


def _check_status(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in ("pass", "fail", "skipped"):
        raise ValueError(f"check status must be pass, fail or skipped, not {value!r}")


def _check_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in CHECK_NAMES and value not in SNP_CHECK_NAMES:
        raise ValueError(f"unknown check name {value!r}")


@attrs.frozen(kw_only=True)
class CheckResult:
    """The outcome of one check.

    :ivar name: one of :data:`CHECK_NAMES` or :data:`SNP_CHECK_NAMES`.
    :ivar status: ``pass``, ``fail`` or ``skipped`` (not checked; ``detail`` says why).
    :ivar detail: what was compared or what the underlying library said, for humans.
    :ivar mandatory: whether the verdict needs this check to pass for this evidence.
    """

    name: str = attrs.field(validator=_check_name)
    status: CheckStatus = attrs.field(validator=_check_status)
    detail: str
    mandatory: bool = False

    def to_json(self) -> dict[str, Any]:
        """``{"status", "detail", "mandatory"}``."""
        return {"status": self.status, "detail": self.detail, "mandatory": self.mandatory}


def _report_data_value(_inst: object, _attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != REPORT_DATA_LENGTH:
        raise ValueError(f"expected report data must be {REPORT_DATA_LENGTH} bytes")


@attrs.frozen(kw_only=True)
class ExpectedReportData:
    """The report data a caller expects the quote to carry, and how it was derived.

    :ivar value: exactly 64 bytes.
    :ivar description: how it was computed (``raw`` or e.g. ``sha512("app-data:" || data)``).
    """

    value: bytes = attrs.field(validator=_report_data_value)
    description: str = "raw"

    @classmethod
    def raw(cls, data: bytes) -> ExpectedReportData:
        """Raw report data; shorter input is zero-padded to 64 bytes, as the agent pads it.

        :raises EvidenceError: more than 64 bytes.
        """
        if len(data) > REPORT_DATA_LENGTH:
            raise EvidenceError(f"expected report data is over {REPORT_DATA_LENGTH} bytes")
        return cls(value=bytes(data).ljust(REPORT_DATA_LENGTH, b"\0"), description="raw")

    @classmethod
    def for_content(
        cls, content: bytes, *, tag: str = APP_DATA_TAG, hash_algorithm: str = "sha512"
    ) -> ExpectedReportData:
        """Report data of a content type: ``H(tag || ":" || content)``, zero-padded.

        :raises UnsupportedAlgorithm: an unknown hash name (see
            :data:`dstack_core.certs.REPORT_DATA_HASHES`).
        """
        value = report_data_for(bytes(content), hash_algorithm, tag)
        algorithm = hash_algorithm or "sha512"
        return cls(value=value, description=f'{algorithm}("{tag}:" || data)')


def parse_expected_report_data(text: object) -> ExpectedReportData:
    """The raw report data expectation of ``--expect-report-data`` and of the service's
    ``expected_report_data``: one rule for both.

    Hex, with an optional ``0x`` prefix; shorter than 64 bytes is zero-padded on the right
    (as the agent pads the report data it quotes).

    :raises InvalidRequest: not a string, empty (``""`` or ``"0x"``: an empty expectation
        is an error, never 64 zero bytes), odd-length or non-hex digits, or over 64 bytes.
    """
    if not isinstance(text, str):
        raise InvalidRequest("expected report data must be a hex string")
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    if not digits:
        raise InvalidRequest(
            "expected report data is empty: give the hex of the report data (64 bytes; "
            "shorter is zero-padded)"
        )
    if len(digits) % 2:
        raise InvalidRequest("expected report data has an odd number of hex digits")
    try:
        raw = binascii.a2b_hex(digits)
    except (binascii.Error, ValueError):
        raise InvalidRequest("expected report data is not hex") from None
    if len(raw) > REPORT_DATA_LENGTH:
        raise InvalidRequest(f"expected report data is over {REPORT_DATA_LENGTH} bytes")
    return ExpectedReportData.raw(raw)


def string_set(values: Iterable[str]) -> frozenset[str]:
    """A frozen set of strings (the converter of the policy fields)."""
    return frozenset(values)


def bytes_tuple(values: Iterable[bytes]) -> tuple[bytes, ...]:
    """A tuple of byte strings (the converter of the trust anchor fields)."""
    return tuple(values)


def _now_value(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError("now must be a non-negative integer of unix seconds")


@attrs.frozen(kw_only=True)
class VerifyOptions:
    """What the relying party trusts and requires.

    :ivar now: the verification time, unix seconds (pin it to re-verify old evidence).
    :ivar root_ca_der: a DER root certificate to verify the quote's PCK chain and the
        collateral against, instead of Intel's (dcap-qvl's built-in root). Any explicit root
        is an external trust anchor: it is accepted only with ``allow_simulator``.
    :ivar allow_simulator: accept simulator evidence (and external roots). The result says
        ``simulated: true``.
    :ivar allowed_tcb_statuses: TCB statuses that pass ``tcb_status``.
    :ivar rejected_advisory_ids: Intel advisory ids (``INTEL-SA-...``) that fail
        ``advisory_ids`` when the platform is affected.
    :ivar expected_report_data: what the quote's report data must be, or None.
    :ivar allow_stripped_event_log: let ``event_log`` pass on RTMR3 alone when the log
        carries no boot events (upstream's lite-stripped RA-TLS certificates, bare
        GetQuote logs). Never for our own envelopes, which always carry the full log.
    :ivar os_image_policy: the known OS images; with it, ``os_image`` is mandatory and
        compares the signed MRTD and RTMR0-2. None: the OS image is reported unverified.
    :ivar ratls_trust_anchors: DER certificates an RA-TLS chain may end at (a KMS or app
        CA). With anchors, ``ratls_chain`` is mandatory; without, a chain is never trusted.
    """

    now: int = attrs.field(validator=_now_value)
    root_ca_der: bytes | None = None
    allow_simulator: bool = False
    allowed_tcb_statuses: frozenset[str] = attrs.field(
        default=DEFAULT_ALLOWED_TCB_STATUSES, converter=string_set
    )
    rejected_advisory_ids: frozenset[str] = attrs.field(factory=frozenset, converter=string_set)
    expected_report_data: ExpectedReportData | None = None
    allow_stripped_event_log: bool = False
    os_image_policy: OsImagePolicy | None = None
    ratls_trust_anchors: tuple[bytes, ...] = attrs.field(default=(), converter=bytes_tuple)


@attrs.frozen(kw_only=True)
class Evidence:
    """Decoded, structurally valid evidence, not yet verified.

    :ivar kind: the outer format (a certificate's embedded format is ``attestation_kind``).
    :ivar platform: what the evidence is, from its format and quote, never from free text:
        ``simulator`` for a TDX quote marked ``DSTACK-SIMULATOR``, else ``tdx``; ``sev-snp``
        for SNP reports.
    :ivar platform_tag: the free-text ``platform`` our envelope carries (None for other
        formats); the verifier compares it with :attr:`platform` and never reports it.
    :ivar quote: the parsed TDX quote (None for SEV-SNP evidence).
    :ivar snp_report: the parsed SEV-SNP report (None for TDX evidence); exactly one of
        ``quote`` and ``snp_report`` is set.
    :ivar event_log: the event log as given (boot events, then RTMR3 events).
    :ivar event_log_given: False for a bare quote without a log.
    :ivar unreplayable: JSON events whose digest is not 48 bytes (kept with a zero digest),
        described; ``event_log`` fails on them.
    :ivar runtime_events: upstream only: the separate runtime event list upstream replays.
    :ivar preimages: per ``event_log`` entry, a ``preimage`` the evidence carried, or None.
    :ivar report_data: the report data the envelope claims, or None (bare quote).
    :ivar vm_config: the vm_config (or sys-config) JSON string.
    :ivar app_info: our envelope's identity claims, or None.
    :ivar report_data_payload: upstream ``dstack-pod``: the text hashed into report data.
    :ivar certificate: the RA-TLS leaf, when the evidence came in a certificate.
    :ivar certificate_chain: the whole chain given, leaf first.
    :ivar attestation_kind: for certificates, the format of the embedded attestation.
    """

    kind: EvidenceKind
    platform: str
    platform_tag: str | None = None
    quote: TdxQuote | None = None
    snp_report: SnpReport | None = None
    event_log: tuple[TdxEvent, ...] = ()
    event_log_given: bool = True
    unreplayable: tuple[str, ...] = ()
    runtime_events: tuple[RuntimeEvent, ...] | None = None
    preimages: tuple[bytes | None, ...] = ()
    report_data: bytes | None = None
    vm_config: str = ""
    app_info: AppInfo | None = None
    report_data_payload: str | None = None
    certificate: RaTlsCertificate | None = None
    certificate_chain: tuple[x509.Certificate, ...] = ()
    attestation_kind: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.quote is None) == (self.snp_report is None):
            raise ValueError("Evidence carries exactly one of a TDX quote and an SNP report")

    @property
    def evidence_format(self) -> Literal["tdx", "sev-snp"]:
        """``tdx`` or ``sev-snp``: which of ``quote`` and ``snp_report`` is set."""
        return "tdx" if self.quote is not None else "sev-snp"

    @property
    def bound_report_data(self) -> bytes:
        """The 64 bytes of report data the hardware evidence binds."""
        if self.quote is not None:
            return self.quote.report_data
        assert self.snp_report is not None
        return self.snp_report.report_data

    @property
    def marked_simulated(self) -> bool:
        """Whether the evidence says it comes from the simulator (platform tag or quote
        header ``DSTACK-SIMULATOR``). Never trusted to say *not* simulated."""
        if SIMULATOR_PLATFORM in (self.platform, self.platform_tag):
            return True
        return self.quote is not None and self.quote.header.user_data.startswith(
            SIMULATOR_MARKER
        )


def _tdx(evidence: Evidence) -> TdxQuote:
    """The TDX quote of evidence the TDX checks run on."""
    if evidence.quote is None:
        raise TypeError("the TDX checks need TDX evidence")
    return evidence.quote


@attrs.frozen(kw_only=True)
class BootEvent:
    """A boot (RTMR0-2) event whose register replayed to the quote's signed value.

    What the replay binds is the digest, in its register and position. The event data is
    reported only when it is itself what was measured (``sha384(payload) == digest``, e.g.
    EFI actions and separators); event types, names and other payloads (a kernel's device
    path, ``ACPI DATA``) are covered by no measurement and are not reported.

    :ivar imr: the register, 0-2.
    :ivar digest: the 48 bytes extended.
    :ivar payload: the measured event data, or None.
    """

    imr: int
    digest: bytes
    payload: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"imr", "digest", "payload"}``, bytes in hex, payload null when not bound."""
        return {
            "imr": self.imr,
            "digest": self.digest.hex(),
            "payload": None if self.payload is None else self.payload.hex(),
        }


def _runtime_event_json(event: RuntimeEvent) -> dict[str, Any]:
    return {"event": event.event, "payload": event.payload.hex(), "version": event.version}


SIMULATED_WARNING: Final = (
    "SIMULATED EVIDENCE: verified against a simulator/external trust anchor, not backed by "
    "TEE hardware"
)
OS_IMAGE_WARNING: Final = (
    "OS IMAGE UNVERIFIED: nothing ties this app to a known OS image: MRTD and RTMR0-2 were "
    "compared with no OS image policy (--os-image-policy, --expect-mrtd/--expect-rtmr)"
)


@attrs.frozen(kw_only=True)
class VerificationResult:
    """The verdict and every check, plus the claims the evidence binds.

    Every claim comes only from data the quote's signature covers, directly (``mrtd``,
    ``rtmrs``, ``report_data``, ...) or through a replay that reproduces the signed
    registers (app identity, key provider, runtime and boot events); docs/verify.md has a
    table of what binds each field. Claims that nothing binds are empty (``b""``, ``()``,
    None), never the evidence's word. Quote fields are what a parsed quote says; they are
    authenticated only when its signature verified (the dcap-qvl checks pass), and the
    identity claims are reported only then (:attr:`identity_bound`). Trust any of it only
    with a ``pass`` verdict. Byte values are raw bytes; :meth:`to_json` renders them in hex.
    """

    verdict: Literal["pass", "fail"]
    checks: tuple[CheckResult, ...]
    evidence_kind: str
    platform: str
    simulated: bool
    verified_at: int
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    quote_version: int = 0
    report_data: bytes = b""
    mrtd: bytes = b""
    rtmrs: tuple[bytes, ...] = ()
    mr_config_id: bytes = b""
    identity_bound: bool = False
    app_id: bytes = b""
    compose_hash: bytes = b""
    instance_id: bytes = b""
    key_provider: Mapping[str, str] | None = None
    key_provider_info: bytes = b""
    os_image_hash: bytes = b""
    os_image_verified: bool = False
    mr_aggregated: bytes = b""
    mr_system: bytes = b""
    device_id: bytes = b""
    init_script_hashes: tuple[bytes, ...] = ()
    runtime_events: tuple[RuntimeEvent, ...] = ()
    boot_events: tuple[BootEvent, ...] = ()
    evidence_format: Literal["tdx", "sev-snp"] = "tdx"
    snp_report: SnpReport | None = None

    @property
    def passed(self) -> bool:
        """Whether the verdict is ``pass``."""
        return self.verdict == "pass"

    def check(self, name: str) -> CheckResult:
        """The result of the check called ``name``.

        :raises KeyError: no such check.
        """
        for result in self.checks:
            if result.name == name:
                return result
        raise KeyError(name)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the failed checks, in order."""
        return tuple(c.name for c in self.checks if c.status == "fail")

    @property
    def reason(self) -> str | None:
        """Why the verdict is ``fail``: the first failed check, else the first mandatory
        check that did not pass (e.g. skipped for want of collateral)."""
        if self.passed:
            return None
        for result in self.checks:
            if result.status == "fail":
                return f"{result.name}: {result.detail}"
        for result in self.checks:
            if result.mandatory and result.status != "pass":
                return f"{result.name}: {result.detail}"
        return "no check passed"  # pragma: no cover - a fail verdict always has a cause

    @property
    def warnings(self) -> tuple[str, ...]:
        """Plain statements about what the verdict does not cover: simulated evidence, and
        (TDX) an OS image that nothing ties to a known one."""
        found = []
        if self.simulated:
            found.append(SIMULATED_WARNING)
        if self.snp_report is None and not self.os_image_verified:
            found.append(OS_IMAGE_WARNING)
        return tuple(found)

    def claims(self) -> dict[str, Any]:
        """Every reported claim, as :meth:`to_json` renders it (no checks, verdict or time)."""
        doc: dict[str, Any] = {
            "evidence_kind": self.evidence_kind,
            "platform": self.platform,
            "simulated": self.simulated,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "quote_version": self.quote_version,
            "report_data": self.report_data.hex(),
            "mrtd": self.mrtd.hex(),
            "rtmrs": [r.hex() for r in self.rtmrs],
            "mr_config_id": self.mr_config_id.hex(),
            "identity_bound": self.identity_bound,
            "app_id": self.app_id.hex(),
            "compose_hash": self.compose_hash.hex(),
            "instance_id": self.instance_id.hex(),
            "key_provider": None if self.key_provider is None else dict(self.key_provider),
            "key_provider_info": self.key_provider_info.decode("utf-8", "replace"),
            "os_image_hash": self.os_image_hash.hex(),
            "os_image_verified": self.os_image_verified,
            "mr_aggregated": self.mr_aggregated.hex(),
            "mr_system": self.mr_system.hex(),
            "device_id": self.device_id.hex(),
            "init_script_hashes": [h.hex() for h in self.init_script_hashes],
            "runtime_events": [_runtime_event_json(e) for e in self.runtime_events],
            "boot_events": [e.to_json() for e in self.boot_events],
        }
        if self.snp_report is not None:
            doc["evidence_format"] = self.evidence_format
            doc["sev_snp"] = self.snp_report.to_json()
        return doc

    def to_json(self) -> dict[str, Any]:
        """The CLI's JSON document: verdict, warnings, checks by name, then the claims."""
        doc: dict[str, Any] = {
            "verdict": self.verdict,
            "reason": self.reason,
            "simulated": self.simulated,
        }
        if self.simulated:
            doc["warning"] = SIMULATED_WARNING
        doc["warnings"] = list(self.warnings)
        doc["checks"] = {c.name: c.to_json() for c in self.checks}
        doc["verified_at"] = self.verified_at
        doc.update(self.claims())
        return doc

    def to_upstream_json(self) -> dict[str, Any]:
        """The upstream verifier's ``/verify`` response shape (formats.md 2.4), plus our
        ``verdict``, ``simulated``, ``warnings`` and per-check ``checks``.

        As upstream, ``is_valid`` needs the OS image verified: a ``pass`` verdict with an
        unverified OS image is ``is_valid: false`` with the ``os_image`` check as the reason.
        ``app_info``, ``boot_info`` and ``key_provider`` are null unless the identity is
        bound (upstream leaves them null when verification stops early).
        """

        listed = {c.name: c.status for c in self.checks}

        def passed(*names: str) -> bool:
            return all(listed.get(n) == "pass" for n in names)

        snp = self.snp_report is not None
        tee_variant = TEE_VARIANT_SNP if snp else TEE_VARIANT_TDX
        os_image_verified = passed("os_image")
        app_info: dict[str, Any] | None = None
        boot_info: dict[str, Any] | None = None
        if self.identity_bound:
            app_info = {
                "app_id": self.app_id.hex(),
                "compose_hash": self.compose_hash.hex(),
                "instance_id": self.instance_id.hex(),
                "device_id": self.device_id.hex(),
                "mr_system": self.mr_system.hex(),
                "mr_aggregated": self.mr_aggregated.hex(),
                "os_image_hash": self.os_image_hash.hex(),
                "key_provider_info": self.key_provider_info.hex(),
                "init_script_hashes": [h.hex() for h in self.init_script_hashes],
            }
            boot_info = {
                "teeVariant": tee_variant,
                "mrAggregated": self.mr_aggregated.hex(),
                "osImageHash": self.os_image_hash.hex(),
                "mrSystem": self.mr_system.hex(),
                "appId": self.app_id.hex(),
                "composeHash": self.compose_hash.hex(),
                "instanceId": self.instance_id.hex(),
                "deviceId": self.device_id.hex(),
                "keyProviderInfo": self.key_provider_info.hex(),
                "tcbStatus": self.tcb_status or "",
                "advisoryIds": list(self.advisory_ids),
            }
        quote_verified = (
            passed("snp_signature", "vcek_chain")
            if snp
            else passed(*_QUOTE_AUTHENTICATION, "td_attributes", "mr_signer_seam")
            and listed.get("mr_service_td") != "fail"
        )
        details = {
            "quote_verified": quote_verified,
            "event_log_verified": passed("event_log", "runtime_events"),
            "os_image_hash_verified": os_image_verified,
            "acpi_tables_verified": False,
            "tee_variant": tee_variant,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "key_provider": dict(self.key_provider) if self.key_provider is not None else None,
            "app_info": app_info,
            "boot_info": boot_info,
            "rtmrs": [r.hex() for r in self.rtmrs],
            "mrtd": self.mrtd.hex(),
        }
        reason = self.reason
        if reason is None and not os_image_verified:
            found = listed.get("os_image")
            reason = f"os_image: {self.check('os_image').detail}" if found else OS_IMAGE_WARNING
        return {
            "is_valid": self.passed and os_image_verified,
            "details": details,
            "reason": reason,
            "verdict": self.verdict,
            "simulated": self.simulated,
            "warnings": list(self.warnings),
            "checks": {c.name: c.to_json() for c in self.checks},
        }


# --- loading ---------------------------------------------------------------------------

InputKind = Literal[
    "dstack-core",
    "upstream-v0",
    "upstream-v1",
    "quote",
    "certificate-pem",
    "certificate-der",
    "json",
    "hex",
]


def sniff_evidence(data: bytes) -> InputKind:
    """Recognise an evidence input by its first bytes.

    Binary forms first (our CBOR tag ``d9 d9 f7``, V0's ``00``, a MessagePack map, a TDX
    quote header), then text (PEM, a JSON object, hex, PEM blocks inside other ASCII text),
    then DER (``30``: hex text can start with the ASCII ``0`` = ``0x30``, so DER is tried
    last).

    :raises EvidenceError: empty or unrecognisable input.
    """
    if not data:
        raise EvidenceError("empty evidence")
    if data.startswith(ENVELOPE_MAGIC):
        return "dstack-core"
    if is_upstream_attestation(data):
        return "upstream-v0" if data[0] == 0 else "upstream-v1"
    if is_tdx_quote(data):
        return "quote"
    text = data.strip()
    if text.startswith(_PEM_START):
        return "certificate-pem"
    if text.startswith(_JSON_OBJECT):
        return "json"
    if _is_hex_text(text):
        return "hex"
    if data.isascii() and _PEM_CERTIFICATE in data:
        return "certificate-pem"  # PEM blocks inside other text (openssl s_client output)
    if data[0] == _DER_SEQUENCE:
        return "certificate-der"
    raise EvidenceError(
        "unrecognised evidence: expected a CBOR, V0 or V1 envelope, a TDX quote, a PEM or DER "
        "certificate, a GetQuote/Attest JSON body, or hex of one of these"
    )


def load_evidence(data: bytes | str) -> Evidence:
    """Decode evidence of any supported kind, recognised from its content.

    :param data: at most :data:`MAX_EVIDENCE_SIZE` bytes (text is UTF-8 encoded first).
    :raises EvidenceError: malformed input of any kind (the message says what is wrong), or
        ``code="unsupported_evidence"`` for a recognised but unsupported platform.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise EvidenceError("evidence text is not valid Unicode") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"evidence must be bytes or str, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_EVIDENCE_SIZE:
        raise EvidenceError(f"evidence is {len(data)} bytes, over the {MAX_EVIDENCE_SIZE} limit")
    return _load(data, allow_text=True)


def _load(data: bytes, *, allow_text: bool) -> Evidence:
    kind = sniff_evidence(data)
    if kind in ("dstack-core", "upstream-v0", "upstream-v1"):
        return _load_attestation(data)
    if kind == "quote":
        return _from_quote(data, None, None, "")
    if kind == "certificate-der":
        return _from_certificates(_der_certificate(data))
    if not allow_text:
        raise EvidenceError(f"{kind} evidence is not allowed here; expected binary evidence")
    if kind == "certificate-pem":
        return _from_certificates(load_certificate_chain(data))
    if kind == "json":
        return evidence_from_json(_json_object(data))
    return _load(_decode_hex(data, "evidence"), allow_text=False)


def _der_certificate(data: bytes) -> list[x509.Certificate]:
    # Not certs.load_certificate_chain: an RA-TLS leaf embeds a quote whose PCK chain is
    # PEM text, so "contains -----BEGIN" does not mean "is PEM".
    try:
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion) as exc:
        raise EvidenceError(f"not a DER certificate: {exc}") from None


def _is_hex_text(text: bytes) -> bool:
    """Whether ``text`` (stripped) is an even number of hex digits, whitespace allowed
    anywhere, after an optional ``0x``. Deleting the hex digits and whitespace leaves only
    the other bytes, so hex text costs no copy."""
    if not text:
        return False
    rest = text.translate(None, _HEX_DIGITS + _ASCII_WHITESPACE)
    if rest and not (rest in (b"x", b"X") and text[:2] in _HEX_PREFIXES):
        return False
    whitespace = sum(text.count(bytes([c])) for c in _ASCII_WHITESPACE)
    digits = len(text) - whitespace - len(rest) * 2
    return digits > 0 and digits % 2 == 0


def _decode_hex(text: bytes | str, what: str) -> bytes:
    """Hex text (whitespace allowed anywhere, optional ``0x``) to bytes, in linear time and
    memory: no regex (a repeated group over megabytes backtracks into gigabytes), and no
    copy of the input unless it holds whitespace or a prefix.

    :raises EvidenceError: not ASCII, empty, odd-length or other than hex digits.
    """
    digits: bytes | str = text
    try:
        if isinstance(text, str):
            if any(c in text for c in _ASCII_WHITESPACE.decode()):
                digits = text.encode("ascii").translate(None, _ASCII_WHITESPACE)
        elif any(bytes([c]) in text for c in _ASCII_WHITESPACE):
            digits = text.translate(None, _ASCII_WHITESPACE)
        if digits[:2] in ("0x", "0X", *_HEX_PREFIXES):
            digits = digits[2:]
        if not digits:
            raise ValueError("empty")
        return binascii.a2b_hex(digits)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise EvidenceError(f"{what} is not an even-length hex string") from None


def _load_attestation(data: bytes) -> Evidence:
    """An envelope of one of the three formats (ours, V0, V1)."""
    if data.startswith(ENVELOPE_MAGIC):
        return _from_envelope(Envelope.from_cbor(data))
    if is_upstream_attestation(data):
        return _from_upstream(decode_attestation(data))
    raise EvidenceError("not an attestation envelope (CBOR, V0 SCALE or V1 MessagePack)")


def _unsupported(platform: str) -> EvidenceError:
    return EvidenceError(
        f"{platform} evidence is not supported yet: this verifier checks Intel TDX, and "
        "dstack-core's own SEV-SNP envelopes",
        code="unsupported_evidence",
    )


def _parse_quote(data: bytes) -> TdxQuote:
    if not is_tdx_quote(data):
        raise EvidenceError("the evidence's quote is not an Intel TDX quote (version 4/5)")
    return TdxQuote.from_bytes(data)


def _platform_of(quote: TdxQuote) -> str:
    """What a TDX quote is: ``simulator`` if its header says so, else ``tdx``."""
    marked = quote.header.user_data.startswith(SIMULATOR_MARKER)
    return SIMULATOR_PLATFORM if marked else TDX_FORMAT


def _from_envelope(envelope: Envelope) -> Evidence:
    if envelope.evidence_format == SNP_FORMAT:
        return Evidence(
            kind="dstack-core",
            platform=SNP_FORMAT,
            platform_tag=envelope.platform,
            snp_report=SnpReport.from_bytes(envelope.quote),
            event_log=envelope.event_log,
            report_data=envelope.report_data,
            vm_config=envelope.vm_config,
            app_info=envelope.app_info,
        )
    if envelope.evidence_format != TDX_FORMAT:
        raise _unsupported(envelope.evidence_format)
    quote = _parse_quote(envelope.quote)
    return Evidence(
        kind="dstack-core",
        platform=_platform_of(quote),
        platform_tag=envelope.platform,
        quote=quote,
        event_log=envelope.event_log,
        report_data=envelope.report_data,
        vm_config=envelope.vm_config,
        app_info=envelope.app_info,
    )


def _from_upstream(attestation: UpstreamAttestation) -> Evidence:
    if attestation.platform != TDX_FORMAT:
        raise _unsupported(attestation.platform)
    quote = _parse_quote(attestation.quote)
    return Evidence(
        kind="upstream-v0" if attestation.wire_version == 0 else "upstream-v1",
        platform=_platform_of(quote),
        quote=quote,
        event_log=attestation.event_log,
        runtime_events=attestation.runtime_events,
        preimages=attestation.preimages,
        report_data=attestation.report_data,
        vm_config=attestation.config,
        report_data_payload=attestation.report_data_payload,
    )


def _from_quote(
    quote: bytes,
    events: Sequence[Any] | None,
    report_data: bytes | None,
    vm_config: str,
) -> Evidence:
    parsed = _parse_quote(quote)
    preimages: tuple[bytes | None, ...] = ()
    event_log: tuple[TdxEvent, ...] = ()
    unreplayable: tuple[str, ...] = ()
    if events is not None:
        event_log, unreplayable = _json_events(events)
        preimages = tuple(_json_preimage(e, i) for i, e in enumerate(events))
    return Evidence(
        kind="quote",
        platform=_platform_of(parsed),
        quote=parsed,
        event_log=event_log,
        event_log_given=events is not None,
        unreplayable=unreplayable,
        preimages=preimages,
        report_data=report_data,
        vm_config=vm_config,
    )


def _json_events(events: Sequence[Any]) -> tuple[tuple[TdxEvent, ...], tuple[str, ...]]:
    """:func:`~dstack_core.eventlog.events_from_json`, except that an event whose digest
    is not the 48 bytes a replay needs (GetQuote sends runtime events with ``"digest": ""``,
    so one retyped by hand arrives so) is kept with a zero digest and described, so that the
    verdict names it (``event_log``) instead of the whole evidence being refused."""
    kept: list[Any] = []
    problems: list[str] = []
    for index, item in enumerate(events):
        if isinstance(item, Mapping) and _unreplayable_digest(item):
            where = f"imr {item['imr']}, type {item['event_type']:#010x}"
            size = len(item["digest"]) // 2
            problems.append(
                f"event {index} ({where}) has a {size}-byte digest: it cannot be replayed"
            )
            item = {**item, "digest": ZERO_REGISTER.hex()}
        kept.append(item)
    return events_from_json(kept), tuple(problems)


def _unreplayable_digest(item: Mapping[str, Any]) -> bool:
    """A well-typed JSON event whose hex digest is not 48 bytes, unless it is a runtime
    event's empty digest (recomputed from its content)."""
    imr, event_type, digest = item.get("imr"), item.get("event_type"), item.get("digest")
    if type(imr) is not int or type(event_type) is not int or not isinstance(digest, str):
        return False
    text = digest[2:] if digest[:2] in ("0x", "0X") else digest
    if text and not _is_hex_text(text.encode("ascii", "replace")):
        return False  # not hex at all: malformed, as events_from_json says
    if len(text) == 2 * len(ZERO_REGISTER):
        return False
    return not (text == "" and imr == RUNTIME_IMR and event_type == RUNTIME_EVENT_TYPE)


def _json_preimage(event: Any, index: int) -> bytes | None:
    value = event.get("preimage") if isinstance(event, Mapping) else None
    if value is None:
        return None
    return _decode_hex(_expect_str(value, f"event {index} preimage"), f"event {index} preimage")


def _from_certificates(chain: Sequence[x509.Certificate]) -> Evidence:
    if not chain:
        raise EvidenceError("empty certificate chain")
    leaf = RaTlsCertificate.from_certificate(chain[0])
    if leaf.attestation is not None:
        inner = _load_attestation(leaf.attestation)
        attestation_kind: str = inner.kind
    elif leaf.legacy_quote is not None:
        if leaf.legacy_event_log is None:
            raise EvidenceError("legacy RA-TLS certificate has a quote but no event log")
        try:
            events = strictjson.loads(leaf.legacy_event_log)
        except ValueError as exc:
            raise EvidenceError(f"legacy event log extension is not JSON: {exc}") from None
        if not isinstance(events, list):
            raise EvidenceError("legacy event log extension is not a JSON array")
        inner = _from_quote(leaf.legacy_quote, events, None, "")
        attestation_kind = "legacy-quote"
    else:
        raise EvidenceError("the certificate carries no RA-TLS attestation extension")
    return attrs.evolve(
        inner,
        kind="ratls-certificate",
        certificate=leaf,
        certificate_chain=tuple(chain),
        attestation_kind=attestation_kind,
    )


def _json_object(data: bytes) -> Mapping[str, Any]:
    try:
        doc = strictjson.loads(data)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise EvidenceError(f"evidence is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EvidenceError("JSON evidence must be an object")
    return doc


def _expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise EvidenceError(f"{what} must be a string, not {type(value).__name__}")
    return value


def evidence_from_json(doc: Mapping[str, Any]) -> Evidence:
    """Evidence from a decoded JSON object: a GetQuote, Attest or GetTlsKey response, or an
    upstream ``/verify`` request body.

    As upstream does, a non-empty ``attestation`` (hex of any envelope format) wins and the
    other fields are ignored; otherwise ``quote`` (hex) with an optional ``event_log`` (the
    JSON text GetQuote returns, or an array), ``report_data`` and ``vm_config``; otherwise
    ``certificate_chain`` (PEM strings, leaf first). Unknown keys are ignored.

    :raises EvidenceError: none of these, or any of them malformed.
    """
    attestation = doc.get("attestation")
    if attestation:
        raw = _decode_hex(_expect_str(attestation, "attestation"), "attestation")
        return _load_attestation(raw)
    quote = doc.get("quote")
    if quote:
        quote_bytes = _decode_hex(_expect_str(quote, "quote"), "quote")
        events: Sequence[Any] | None = None
        log = doc.get("event_log")
        if isinstance(log, str) and log.strip():
            try:
                decoded = strictjson.loads(log)
            except ValueError as exc:
                raise EvidenceError(f"event_log is not valid JSON: {exc}") from None
            if not isinstance(decoded, list):
                raise EvidenceError("event_log must be a JSON array")
            events = decoded
        elif isinstance(log, list):
            events = log
        elif log not in (None, ""):
            raise EvidenceError("event_log must be a JSON string or an array")
        report_data = doc.get("report_data")
        claimed = (
            _decode_hex(_expect_str(report_data, "report_data"), "report_data")
            if report_data
            else None
        )
        if claimed is not None and len(claimed) != REPORT_DATA_LENGTH:
            raise EvidenceError(f"report_data must be {REPORT_DATA_LENGTH} bytes")
        vm_config = _expect_str(doc.get("vm_config") or "", "vm_config")
        return _from_quote(quote_bytes, events, claimed, vm_config)
    chain = doc.get("certificate_chain")
    if chain:
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise EvidenceError("certificate_chain must be an array of PEM strings")
        return _from_certificates(load_certificate_chain("".join(chain)))
    raise EvidenceError(
        "JSON evidence needs a non-empty 'attestation', 'quote' (+ 'event_log') or "
        "'certificate_chain'"
    )


# --- dcap-qvl --------------------------------------------------------------------------

# dcap-qvl's internal steps in its order of execution, each with the check it belongs to.
_QVL_STAGES: Final = (
    ("root_ca_crl", "collateral", "root CA CRL"),
    ("quote_header", "qe_identity", "QE vendor and quote header"),
    ("tcb_info", "collateral", "TCB info signature and validity"),
    ("qe_identity_collateral", "collateral", "QE identity signature and validity"),
    ("pck_chain", "certificate_chain", "PCK certificate chain and CRLs"),
    ("qe_report", "qe_identity", "QE report signature and attestation-key hash"),
    ("qe_identity_policy", "qe_identity", "QE identity policy"),
    ("quote_signature", "quote_signature", "attestation-key signature"),
    ("tcb_level", "tcb_status", "platform TCB level and TDX module identity"),
    ("td_attributes", "td_attributes", "TD attribute checks"),
    ("mr_service_td", "mr_service_td", "mr_service_td check"),
)
_STAGE_INDEX: Final = {stage: i for i, (stage, _, _) in enumerate(_QVL_STAGES)}

# Message fragments (lower case) -> stage; the first match wins, tried on the message's
# first line, then on the whole message with its causes.
_QVL_PATTERNS: Final = (
    ("isv enclave report signature", "quote_signature"),
    ("debug mode", "td_attributes"),
    ("sept_ve_disable", "td_attributes"),
    ("reserved bits in td attributes", "td_attributes"),
    ("td profiling", "td_attributes"),
    ("td migration", "td_attributes"),
    ("servtd_ext", "td_attributes"),
    ("mr service td", "mr_service_td"),
    ("tdx module", "tcb_level"),
    ("tcb level", "tcb_level"),
    ("fmspc", "tcb_level"),
    ("pcesvn", "tcb_level"),
    ("cpusvn", "tcb_level"),
    ("component count", "tcb_level"),
    ("platform tcb", "tcb_level"),
    ("revoked", "tcb_level"),
    ("non-tdx tcb info", "tcb_level"),
    ("non-sgx tcb info", "tcb_level"),
    ("missing tdxmodule", "tcb_level"),
    ("qe mrsigner", "qe_identity_policy"),
    ("qe isvprodid", "qe_identity_policy"),
    ("qe miscselect", "qe_identity_policy"),
    ("qe attributes", "qe_identity_policy"),
    ("no tcb levels found in qe identity", "qe_identity_policy"),
    ("qe_report", "qe_report"),
    ("qe report", "qe_report"),
    ("qe auth data", "qe_report"),
    ("qe vendor", "quote_header"),
    ("quote version", "quote_header"),
    ("body type", "quote_header"),
    ("body size", "quote_header"),
    ("failed to decode quote", "quote_header"),
    ("attestation key type", "quote_header"),
    ("expecting 4 or 5", "quote_header"),
    ("root ca", "root_ca_crl"),
    ("crlexpired", "root_ca_crl"),
    ("revocation list expired", "root_ca_crl"),
    ("collateral expired", "root_ca_crl"),
    ("pck crl", "root_ca_crl"),
    ("qe identity", "qe_identity_collateral"),
    ("qe_identity", "qe_identity_collateral"),
    ("qeidentity", "qe_identity_collateral"),
    ("tcb info", "tcb_info"),
    ("tcbinfo", "tcb_info"),
    ("tcb_info", "tcb_info"),
    ("pck cert", "pck_chain"),
    ("chain is too short in quote", "pck_chain"),
    ("certification data type", "pck_chain"),
    ("failed to verify certificate chain", _AMBIGUOUS_CHAIN),
    ("certificate expired", _AMBIGUOUS_CHAIN),
    ("not valid yet", _AMBIGUOUS_CHAIN),
)


def _classify(message: str) -> str:
    first = message.split("\n", 1)[0].removeprefix(_QVL_PREFIX).lower()
    for text in (first, message.lower()):
        for fragment, stage in _QVL_PATTERNS:
            if fragment in text:
                return stage
    return _UNKNOWN_STAGE


def _chain_valid(pem: str, root_der: bytes | None, now: int) -> bool:
    """Whether a collateral issuer chain links up to the trusted root and is valid at now."""
    try:
        chain = x509.load_pem_x509_certificates(pem.encode())
        verify_chain(chain)
        chain[-1].verify_directly_issued_by(chain[-1])
    except (ValueError, TypeError, InvalidSignature, EvidenceError, x509.InvalidVersion):
        return False
    moment = datetime.fromtimestamp(now, UTC)
    if any(not (c.not_valid_before_utc <= moment <= c.not_valid_after_utc) for c in chain):
        return False
    if root_der is not None:
        return chain[-1].public_bytes(serialization.Encoding.DER) == root_der
    return True


def _disambiguate_chain(collateral: Collateral, root_der: bytes | None, now: int) -> str:
    """dcap-qvl says "Failed to verify certificate chain" for the TCB-info, QE-identity and
    PCK chains alike; whichever collateral chain does not verify is the culprit."""
    try:
        doc = json.loads(collateral.json)
        tcb_ok = _chain_valid(doc["tcb_info_issuer_chain"], root_der, now)
        qe_ok = _chain_valid(doc["qe_identity_issuer_chain"], root_der, now)
    except (ValueError, KeyError, TypeError):
        return "tcb_info"
    if not tcb_ok:
        return "tcb_info"
    if not qe_ok:
        return "qe_identity_collateral"
    return "pck_chain"


@attrs.frozen(kw_only=True)
class _QvlOutcome:
    status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    ppid: bytes | None = None
    failure: str | None = None
    stage: str | None = None


def _run_qvl(quote: TdxQuote, collateral: Collateral, options: VerifyOptions) -> _QvlOutcome:
    try:
        if options.root_ca_der is None:
            report = dcap_qvl.verify(quote.raw, collateral.to_qvl(), options.now)
        else:
            report = dcap_qvl.verify_with_root_ca(
                quote.raw, collateral.to_qvl(), options.root_ca_der, options.now
            )
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        message = str(exc) or type(exc).__name__
    except BaseException as exc:  # pyo3's PanicException derives from BaseException
        if type(exc).__name__ != "PanicException":
            raise
        message = f"dcap-qvl panicked: {exc}"
    else:
        return _QvlOutcome(
            status=str(report.status),
            advisory_ids=tuple(str(a) for a in report.advisory_ids),
            ppid=bytes(report.ppid) if report.ppid is not None else None,
        )
    stage = _classify(message)
    if stage == _AMBIGUOUS_CHAIN:
        stage = _disambiguate_chain(collateral, options.root_ca_der, options.now)
    return _QvlOutcome(failure=_tidy(message), stage=stage)


def _tidy(message: str) -> str:
    """dcap-qvl's multi-line ``Verification failed: X\n\nCaused by:\n    Y`` on one line."""
    head, _, causes = message.removeprefix(_QVL_PREFIX).partition("Caused by:")
    head = " ".join(head.split())
    causes = " ".join(causes.split())
    return f"{head} (caused by: {causes})" if causes else head


def _dcap_checks(
    outcome: _QvlOutcome | None, skip_reason: str
) -> dict[str, tuple[CheckStatus, str]]:
    """Status and detail of each check that dcap-qvl performs (partly or wholly)."""
    names = list(_DCAP_CHECKS) + ["td_attributes", "mr_service_td"]
    if outcome is None:
        return {name: ("skipped", skip_reason) for name in names}
    if outcome.failure is None:
        return {name: ("pass", "verified by dcap-qvl") for name in names}
    said = f"dcap-qvl says: {outcome.failure}"
    if outcome.stage == "root_ca_crl" and "Signature" in (outcome.failure or ""):
        said += (
            " -- the collateral's root CA CRL is not signed by the trusted root: the quote and "
            "collateral belong to another PKI than the root CA verified against"
        )
    if outcome.stage == _UNKNOWN_STAGE:
        unattributed = f"{said} (a step this verifier cannot attribute; treated as failed)"
        return {name: ("fail", unattributed) for name in names}
    failed_at = _STAGE_INDEX[outcome.stage or _UNKNOWN_STAGE]
    _, failed_check, failed_step = _QVL_STAGES[failed_at]
    result: dict[str, tuple[CheckStatus, str]] = {}
    for name in names:
        indices = [i for i, (_, check, _) in enumerate(_QVL_STAGES) if check == name]
        if failed_at in indices:
            result[name] = ("fail", f"{failed_step} failed: {said}")
        elif all(i < failed_at for i in indices):
            result[name] = ("pass", "verified by dcap-qvl")
        else:
            done = [_QVL_STAGES[i][2] for i in indices if i < failed_at]
            prefix = f"{', '.join(done)} verified; " if done else ""
            result[name] = (
                "skipped",
                f"{prefix}not reached: dcap-qvl stopped at {failed_check} ({failed_step})",
            )
    return result


# --- checks ----------------------------------------------------------------------------


def _combine(
    own: tuple[CheckStatus, str], dcap: tuple[CheckStatus, str]
) -> tuple[CheckStatus, str]:
    status_own, detail_own = own
    status_dcap, detail_dcap = dcap
    if "fail" in (status_own, status_dcap):
        parts = [d for s, d in (own, dcap) if s == "fail"]
        return "fail", "; ".join(parts)
    if status_dcap == "skipped":
        return "skipped", f"{detail_own}; dcap-qvl's part: {detail_dcap}"
    return status_own, f"{detail_own}; {detail_dcap}"


def _short(value: bytes) -> str:
    return value.hex() if len(value) <= 8 else f"{value[:8].hex()}…"


class _Checks:
    """The outcome of each check of one verification, and which the verdict needs."""

    def __init__(self, *mandatory: str) -> None:
        self._outcomes: dict[str, tuple[CheckStatus, str]] = {}
        self._mandatory = set(mandatory)

    def __getitem__(self, name: str) -> tuple[CheckStatus, str]:
        return self._outcomes[name]

    def __setitem__(self, name: str, outcome: tuple[CheckStatus, str]) -> None:
        self._outcomes[name] = outcome

    def require(self, name: str) -> None:
        """Make the verdict need ``name`` to pass."""
        self._mandatory.add(name)

    def claims(self, name: str, outcome: tuple[CheckStatus, str] | None, absent: str) -> None:
        """A check of claims the evidence may not make: ``skipped`` with ``absent`` when
        there are none (``outcome`` None), else ``outcome``, and then mandatory."""
        if outcome is None:
            self[name] = ("skipped", absent)
        else:
            self[name] = outcome
            self.require(name)

    def conclude(
        self,
        evidence: Evidence,
        options: VerifyOptions,
        names: Sequence[str],
        *,
        simulated: bool,
        **extracted: Any,
    ) -> VerificationResult:
        """The result listing ``names`` in order (``pass`` only if none failed and every
        mandatory one passed), with the values ``extracted`` from the evidence."""
        results = tuple(
            CheckResult(
                name=name,
                status=self[name][0],
                detail=self[name][1],
                mandatory=name in self._mandatory,
            )
            for name in names
        )
        verdict: Literal["pass", "fail"] = (
            "pass"
            if all(r.status != "fail" for r in results)
            and all(r.status == "pass" for r in results if r.mandatory)
            else "fail"
        )
        return VerificationResult(
            verdict=verdict,
            checks=results,
            evidence_kind=evidence.kind,
            platform=evidence.platform,
            simulated=simulated,
            verified_at=options.now,
            report_data=evidence.bound_report_data,
            **extracted,
        )


def _decoded(evidence: Evidence, what: str) -> tuple[CheckStatus, str]:
    """The ``evidence`` check: which outer (and embedded) format was decoded into what."""
    inner = f", embedded {evidence.attestation_kind}" if evidence.attestation_kind else ""
    return "pass", f"decoded {evidence.kind}{inner}: {what}"


def _claimed_report_data(
    claimed: bytes, bound: bytes, whose: str
) -> tuple[list[str], list[str]]:
    """``(problems, done)`` of an envelope binding check, started with whether the
    envelope's report_data is the one the hardware evidence binds (``whose``)."""
    if hmac.compare_digest(claimed, bound):
        return [], [f"envelope report_data equals {whose}"]
    return [f"envelope report_data {_short(claimed)} differs from {whose} {_short(bound)}"], []


def _outcome(problems: Sequence[str], done: Sequence[str]) -> tuple[CheckStatus, str]:
    if problems:
        return "fail", "; ".join(problems)
    return "pass", "; ".join(done)


def _report_data_and_ratls_checks(
    checks: _Checks, evidence: Evidence, options: VerifyOptions, whose: str
) -> None:
    """``report_data`` (against the caller's expectation) and the RA-TLS checks, the same
    for every TEE; ``whose`` names the hardware evidence (``quote``, ``report``)."""
    expected = options.expected_report_data
    actual = evidence.bound_report_data
    if expected is None:
        checks["report_data"] = (
            "skipped",
            (
                f"no expectation given (--expect-report-data); the {whose}'s report_data is "
                "reported"
            ),
        )
    else:
        checks.require("report_data")
        if hmac.compare_digest(expected.value, actual):
            checks["report_data"] = ("pass", f"equals the expected {expected.description} value")
        else:
            checks["report_data"] = (
                "fail",
                (
                    f"{whose} report_data {_short(actual)} is not the expected "
                    f"{expected.description} value {_short(expected.value)}"
                ),
            )
    checks["ratls_binding"], checks["ratls_chain"] = _ratls_checks(evidence, options)
    if evidence.certificate is not None:
        checks.require("ratls_binding")
        if options.ratls_trust_anchors:
            checks.require("ratls_chain")


@attrs.frozen(kw_only=True)
class _Replay:
    """The registers an event log replays to under dstack's rules, and what breaks them.

    :ivar rtmrs: RTMR0-3 replayed from 48 zero bytes.
    :ivar boot: the log's RTMR0-2 events, as given.
    :ivar runtime: what RTMR3 replays: upstream's ``runtime_events``, else the log's RTMR3
        entries.
    :ivar boot_present: whether an RTMR1 or RTMR2 event extends (EV_NO_ACTION does not);
        without one, the log is lite-stripped unless the quote's RTMR1 and RTMR2 are zero
        (:func:`_boot_replayable`).
    :ivar foreign: RTMR3 entries that are not dstack runtime events, described.
    """

    rtmrs: tuple[bytes, bytes, bytes, bytes]
    boot: tuple[TdxEvent, ...]
    runtime: tuple[TdxEvent, ...]
    boot_present: bool
    foreign: tuple[str, ...]


def _runtime_tdx_events(evidence: Evidence) -> tuple[TdxEvent, ...]:
    if evidence.runtime_events is not None:
        return tuple(e.to_tdx_event() for e in evidence.runtime_events)
    return tuple(e for e in evidence.event_log if e.imr == RUNTIME_IMR)


def _event_type(event: TdxEvent) -> str:
    named = " (EV_NO_ACTION)" if event.event_type == EV_NO_ACTION else ""
    return f"{event.event_type:#010x}{named}"


def _replay(evidence: Evidence) -> _Replay:
    boot = tuple(e for e in evidence.event_log if e.imr != RUNTIME_IMR)
    runtime = _runtime_tdx_events(evidence)
    foreign = tuple(
        f"event {index} ({event.event!r}) in RTMR3 has type {_event_type(event)}"
        for index, event in enumerate(evidence.event_log)
        if event.imr == RUNTIME_IMR and event.event_type != RUNTIME_EVENT_TYPE
    )
    registers = [ZERO_REGISTER] * RTMR_COUNT
    for event in boot:
        if event.event_type != EV_NO_ACTION:
            registers[event.imr] = extend(registers[event.imr], event.digest)
    for event in runtime:
        if event.is_runtime:
            # A runtime event binds its name, payload and version: replay the digest
            # recomputed from them, never the recorded one.
            registers[RUNTIME_IMR] = extend(registers[RUNTIME_IMR], event.computed_digest)
        elif event.event_type != EV_NO_ACTION:
            # Not allowed in RTMR3 (``foreign``); replayed as TCG would, for the report.
            registers[RUNTIME_IMR] = extend(registers[RUNTIME_IMR], event.digest)
    return _Replay(
        rtmrs=(registers[0], registers[1], registers[2], registers[3]),
        boot=boot,
        runtime=runtime,
        boot_present=any(e.imr in (1, 2) and e.event_type != EV_NO_ACTION for e in boot),
        foreign=foreign,
    )


def _boot_replayable(evidence: Evidence, replay: _Replay) -> bool:
    """Whether the log can account for RTMR0-2: it has extending RTMR1/RTMR2 events, or
    the quote's RTMR1 and RTMR2 are zero (nothing was measured there to strip)."""
    quoted = _tdx(evidence).report.rtmrs
    return replay.boot_present or not any(quoted[1] + quoted[2])


def _own_envelope(evidence: Evidence) -> bool:
    """Our envelope, bare or in a certificate: it always carries the full event log."""
    return "dstack-core" in (evidence.kind, evidence.attestation_kind)


def _event_log_check(
    evidence: Evidence, replay: _Replay, options: VerifyOptions
) -> tuple[CheckStatus, str]:
    if not evidence.event_log_given:
        return "skipped", "no event log given: the quoted RTMR0-3 cannot be tied to any events"
    quoted = _tdx(evidence).report.rtmrs
    replayable = _boot_replayable(evidence, replay)
    counts = [sum(1 for e in replay.boot if e.imr == i) for i in range(3)] + [len(replay.runtime)]
    mismatched = []
    parts = []
    for index in range(RTMR_COUNT):
        if index < RUNTIME_IMR and not replayable:
            parts.append(f"RTMR{index} not replayable ({counts[index]} events)")
            continue
        if hmac.compare_digest(replay.rtmrs[index], quoted[index]):
            parts.append(f"RTMR{index} ok ({counts[index]} events)")
        else:
            mismatched.append(index)
            parts.append(
                f"RTMR{index} MISMATCH ({counts[index]} events replay to "
                f"{_short(replay.rtmrs[index])}, quote has {_short(quoted[index])})"
            )
    summary = "; ".join(parts)
    if evidence.unreplayable:
        return "fail", f"{'; '.join(evidence.unreplayable)}; {summary}"
    if replay.foreign:
        return "fail", (
            f"{'; '.join(replay.foreign)}: only dstack runtime events (type "
            f"{RUNTIME_EVENT_TYPE:#010x}), replayed from their name and payload, may be in "
            f"RTMR3; {summary}"
        )
    if mismatched:
        return "fail", f"replay differs from the quote: {summary}"
    if not replayable:
        why = (
            "the log carries no RTMR1/RTMR2 boot events (lite-stripped, as in upstream RA-TLS "
            "certificates), so RTMR0-2 cannot be replayed"
        )
        if _own_envelope(evidence):
            return "skipped", (
                f"{summary}; {why}; a dstack-core envelope always carries the full log, so "
                "this one is incomplete"
            )
        if options.allow_stripped_event_log:
            return "pass", f"{summary}; {why} (accepted: allow_stripped_event_log)"
        return "skipped", f"{summary}; {why}; give the full attestation (Attest) to check them"
    return "pass", summary


def _runtime_events_check(evidence: Evidence, replay: _Replay) -> tuple[CheckStatus, str]:
    if not evidence.event_log_given:
        return "skipped", "no event log given"
    problems: list[str] = []
    versions = {1: 0, 2: 0}
    for event in replay.runtime:
        if event.is_runtime:
            versions[event.version] += 1
    for index, event in enumerate(evidence.event_log):
        if (
            event.is_runtime
            and event.digest
            and not hmac.compare_digest(event.digest, event.computed_digest)
        ):
            problems.append(
                f"runtime event {index} ({event.event!r}): recorded digest does not match "
                f"its name, payload and version {event.version}"
            )
    checked_preimages = 0
    carried = zip(evidence.event_log, evidence.preimages, strict=False)
    for index, (event, preimage) in enumerate(carried):
        if preimage is None:
            continue
        if not event.is_runtime:
            problems.append(f"event {index} carries a preimage but is not a runtime event")
            continue
        checked_preimages += 1
        canonical = runtime_event_preimage(event.event, event.event_payload, event.version)
        if preimage != canonical:
            problems.append(f"event {index} ({event.event!r}): preimage is not the canonical one")
        elif event.digest and not hmac.compare_digest(
            hashlib.sha384(preimage).digest(), event.digest
        ):
            problems.append(f"event {index} ({event.event!r}): preimage does not hash to digest")
    if evidence.runtime_events is not None:
        logged = [e for e in evidence.event_log if e.imr == RUNTIME_IMR]
        if logged:
            entries = [(e.event_type, e.event, e.event_payload, e.version) for e in logged]
            listed = [
                (RUNTIME_EVENT_TYPE, e.event, e.payload, e.version)
                for e in evidence.runtime_events
            ]
            if entries != listed:
                problems.append("the event log's RTMR3 entries disagree with runtime_events")
    if problems:
        return "fail", "; ".join(problems)
    detail = (
        f"{len(replay.runtime)} runtime events ({versions[1]} v1, {versions[2]} v2 digests): "
        f"recorded digests match their content"
    )
    if checked_preimages:
        detail += f"; {checked_preimages} v2 preimages canonical and hashing to their digests"
    return "pass", detail


@attrs.frozen(kw_only=True)
class _Binding:
    """What of the event log the replay binds to the quote's signed registers.

    :ivar runtime: RTMR3's runtime events (digests recomputed) when RTMR3 is bound: every
        RTMR3 entry is a runtime event whose digest matches its content, and they replay
        to the quote's RTMR3. None otherwise.
    :ivar boot_events: the extending events of each of RTMR0-2 that replayed to the quote.
    """

    runtime: tuple[TdxEvent, ...] | None
    boot_events: tuple[BootEvent, ...]


def _bind(evidence: Evidence, replay: _Replay, runtime_check: CheckStatus) -> _Binding:
    if not evidence.event_log_given or evidence.unreplayable:
        return _Binding(runtime=None, boot_events=())
    quoted = _tdx(evidence).report.rtmrs
    rtmr3_bound = (
        not replay.foreign
        and runtime_check == "pass"
        and hmac.compare_digest(replay.rtmrs[RUNTIME_IMR], quoted[RUNTIME_IMR])
    )
    runtime = (
        tuple(attrs.evolve(e, digest=e.computed_digest) for e in replay.runtime)
        if rtmr3_bound
        else None
    )
    boot = []
    if _boot_replayable(evidence, replay):
        for event in replay.boot:
            if event.event_type == EV_NO_ACTION:
                continue
            if not hmac.compare_digest(replay.rtmrs[event.imr], quoted[event.imr]):
                continue
            measured = hmac.compare_digest(hashlib.sha384(event.event_payload).digest(), event.digest)
            boot.append(
                BootEvent(
                    imr=event.imr,
                    digest=event.digest,
                    payload=event.event_payload if measured else None,
                )
            )
    return _Binding(runtime=runtime, boot_events=tuple(boot))


_APP_INFO_COMPARED: Final = (
    "app_id",
    "compose_hash",
    "instance_id",
    "mr_aggregated",
    "mr_system",
    "key_provider_info",
)


def _platform_tag_problem(evidence: Evidence, simulated: bool) -> str | None:
    """Why the envelope's free-text platform tag disagrees with what the evidence is.

    The tag must be the platform the evidence is (``tdx``, ``simulator``, ``sev-snp``). A
    simulated platform's own name is accepted on simulated evidence (a marked quote, or one
    verified under an external root) unless it names hardware; it is never reported.
    """
    tag = evidence.platform_tag
    if tag is None or tag == evidence.platform:
        return None
    if simulated and not is_hardware_tag(tag):
        return None
    if evidence.quote is None:
        return f"the envelope says platform {tag!r}, but the evidence is an SEV-SNP report"
    marked = "is" if evidence.platform == SIMULATOR_PLATFORM else "is not"
    return (
        f"the envelope says platform {tag!r}, but the quote {marked} marked DSTACK-SIMULATOR: "
        f"its platform is {evidence.platform!r} (a tag is free text; the verifier reports "
        "what the quote is)"
    )


def _envelope_binding_check(
    evidence: Evidence,
    derived: AppInfo | None,
    os_image_hash: bytes,
    stated: bytes | None,
    *,
    simulated: bool,
) -> tuple[CheckStatus, str] | None:
    """None when not applicable (a bare quote without claims).

    :param derived: the identity recomputed from the bound runtime events, or None when
        RTMR3 is not bound.
    :param os_image_hash: the bound OS image hash, or ``b""``.
    :param stated: the vm_config's (unbound) OS image hash, or None.
    :param simulated: whether the evidence is simulated (see :func:`_platform_tag_problem`).
    """
    if evidence.report_data is None:
        return None
    problems, done = _claimed_report_data(
        evidence.report_data, evidence.bound_report_data, "the quote's"
    )
    if evidence.report_data_payload is not None:
        expected = report_data_for(evidence.report_data_payload.encode(), "sha512", APP_DATA_TAG)
        if hmac.compare_digest(expected, evidence.report_data):
            done.append('dstack-pod report_data = sha512("app-data:" || payload)')
        else:
            problems.append('dstack-pod report_data is not sha512("app-data:" || payload)')
    claimed = evidence.app_info
    if claimed is not None and claimed != AppInfo():
        if derived is None:
            problems.append(
                "app_info claims cannot be confirmed: RTMR3 does not replay to the quote"
            )
        else:
            wrong = [
                name
                for name in _APP_INFO_COMPARED
                if getattr(claimed, name) != getattr(derived, name)
            ]
            if wrong:
                problems.append(
                    f"app_info claims differ from the values recomputed from quote and log: "
                    f"{', '.join(wrong)}"
                )
            else:
                done.append(
                    f"app_info claims {', '.join(_APP_INFO_COMPARED)} equal the values "
                    "recomputed from quote and log"
                )
        # An empty os_image_hash claims nothing; a non-empty one must be the bound hash, or
        # without one at least the vm_config's (which is then said to be unbound).
        if not claimed.os_image_hash:
            pass
        elif os_image_hash:
            if claimed.os_image_hash != os_image_hash:
                problems.append("app_info os_image_hash differs from the bound os_image_hash")
            else:
                done.append("app_info os_image_hash equals the bound one")
        elif claimed.os_image_hash != stated:
            problems.append("app_info os_image_hash differs from the vm_config's")
        else:
            done.append(
                "app_info os_image_hash equals the vm_config's, which no signature covers "
                "(not a claim: see os_image)"
            )
    tag = _platform_tag_problem(evidence, simulated)
    if tag is not None:
        problems.append(tag)
    return _outcome(problems, done)


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def _ratls_chain_check(
    chain: Sequence[x509.Certificate], options: VerifyOptions
) -> tuple[CheckStatus, str]:
    """The RA-TLS certificate chain: links, validity, self-signature and trust anchors.

    Never ``pass`` without an anchor the caller trusts; no certificate name is ever quoted
    (names are not attested: the attestation binds the leaf's key only).
    """
    moment = datetime.fromtimestamp(options.now, UTC)
    expired = [
        i
        for i, cert in enumerate(chain)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc
    ]
    if expired:
        return "fail", f"certificate(s) {expired} not valid at {options.now}"
    try:
        verify_chain(chain)
    except EvidenceError as exc:
        return "fail", exc.message
    top = chain[-1]
    last = len(chain) - 1
    linked = (
        f"{len(chain)} certificates, each signed by the next"
        if len(chain) > 1
        else "a lone certificate"
    )
    self_issued = top.issuer == top.subject
    if self_issued:
        try:
            top.verify_directly_issued_by(top)
        except (ValueError, TypeError, InvalidSignature) as exc:
            return "fail", (
                f"certificate {last} is self-issued but its self-signature does not verify "
                f"({str(exc) or type(exc).__name__})"
            )
    if options.ratls_trust_anchors:
        top_der = top.public_bytes(serialization.Encoding.DER)
        for der in options.ratls_trust_anchors:
            anchor = x509.load_der_x509_certificate(der)
            if der == top_der:
                return "pass", f"{linked}, ending at trust anchor {_fingerprint(anchor)}"
            try:
                top.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return "pass", f"{linked}, the last issued by trust anchor {_fingerprint(anchor)}"
        return "fail", (
            f"{linked}, but it does not end at a trust anchor: certificate {last} (sha256 "
            f"{_fingerprint(top)}) is neither one of the {len(options.ratls_trust_anchors)} "
            "anchors given nor issued by one"
        )
    untrusted = (
        "UNTRUSTED: no trust anchor given (--trust-anchor), so the chain's names and issuer "
        "claims are not verified; the attestation binds the leaf's key only"
    )
    if self_issued:
        return "skipped", (
            f"{untrusted}; {linked}, up to a self-signed certificate (sha256 "
            f"{_fingerprint(top)}) that is nobody's anchor"
        )
    return "skipped", (
        f"{untrusted}; {linked}, and the issuer of certificate {last} is not given, so its "
        "signature is unchecked"
    )


def _ratls_checks(
    evidence: Evidence, options: VerifyOptions
) -> tuple[tuple[CheckStatus, str], tuple[CheckStatus, str]]:
    leaf = evidence.certificate
    if leaf is None:
        skipped: tuple[CheckStatus, str] = ("skipped", "the evidence is not an RA-TLS certificate")
        return skipped, skipped
    expected = ratls_report_data(leaf.spki_der)
    quoted = evidence.bound_report_data
    if hmac.compare_digest(expected, quoted):
        binding: tuple[CheckStatus, str] = (
            "pass",
            'quote report_data = sha512("ratls-cert:" || certificate SubjectPublicKeyInfo)',
        )
    else:
        binding = (
            "fail",
            (
                f'quote report_data {_short(quoted)} is not sha512("ratls-cert:" || SPKI) = '
                f"{_short(expected)}: the attestation does not belong to this certificate's key"
            ),
        )
    return binding, _ratls_chain_check(evidence.certificate_chain, options)


def _key_provider(info: bytes) -> Mapping[str, str] | None:
    if not info:
        return None
    try:
        doc = strictjson.loads(info)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("name"), str):
        provider_id = doc.get("id", "")
        return {"name": doc["name"], "id": provider_id if isinstance(provider_id, str) else ""}
    return None


def _init_script_hashes(runtime: Iterable[TdxEvent]) -> tuple[bytes, ...]:
    hashes = []
    for event in runtime:
        if event.event == SYSTEM_READY:
            break
        if event.event == "init-script-hash":
            hashes.append(event.event_payload)
    return tuple(hashes)


def _simulator_policy(evidence: Evidence, options: VerifyOptions) -> tuple[CheckStatus, str]:
    marked = evidence.marked_simulated
    external = options.root_ca_der is not None
    if not marked and not external:
        return "pass", "not simulator evidence; verified against Intel's root of trust"
    reasons = []
    if marked:
        reasons.append(
            f"the evidence is marked simulated (platform {evidence.platform!r}, quote user_data "
            f"{_tdx(evidence).header.user_data[:16].decode('ascii', 'replace')!r})"
        )
    if external:
        reasons.append("an external root CA replaces Intel's")
    if not options.allow_simulator:
        return "fail", (
            f"{' and '.join(reasons)}: rejected; opt in with allow_simulator "
            "(--allow-simulator) together with the simulator's trust bundle"
        )
    if not external:
        return "fail", (
            "simulator evidence was allowed, but no simulator root CA was given "
            "(--root-ca / trust bundle): Intel's root cannot verify it"
        )
    return "pass", f"SIMULATED: {' and '.join(reasons)}; accepted by explicit opt-in"


def verify_evidence(
    evidence: Evidence,
    options: VerifyOptions,
    collateral: Collateral | None = None,
    *,
    collateral_error: str | None = None,
) -> VerificationResult:
    """Run every check on decoded evidence; pure (collateral and time are inputs).

    :param evidence: from :func:`load_evidence`.
    :param options: trust anchors, policy and the verification time.
    :param collateral: the quote's collateral, or None (the dcap-qvl checks are then
        ``skipped``, so the verdict is ``fail``).
    :param collateral_error: why there is no collateral (e.g. the PCCS was unreachable),
        reported in the skipped checks' detail.
    :returns: the result, never None; failed checks are data in it. SEV-SNP evidence gets
        the checks of :data:`SNP_CHECK_NAMES` (``collateral`` is not used).
    """
    if evidence.snp_report is not None:
        return _verify_snp(evidence, evidence.snp_report, options)
    quote = _tdx(evidence)
    report = quote.report
    checks = _Checks(
        "evidence", "simulator_policy", *_DCAP_CHECKS, "td_attributes", "mr_signer_seam", "event_log"
    )
    log_size = f"{len(evidence.event_log)} events" if evidence.event_log_given else "no event log"
    checks["evidence"] = _decoded(
        evidence,
        f"TDX quote v{quote.version} (TD {'1.5' if report.is_td15 else '1.0'} body), {log_size}",
    )
    checks["simulator_policy"] = _simulator_policy(evidence, options)

    outcome = None if collateral is None else _run_qvl(quote, collateral, options)
    dcap = _dcap_checks(
        outcome,
        f"no collateral: {collateral_error}"
        if collateral_error
        else "no collateral: give a collateral file (--collateral) or a PCCS (--pccs-url)",
    )
    for name in ("collateral", "certificate_chain", "qe_identity", "quote_signature"):
        checks[name] = dcap[name]
    if collateral is not None and checks["collateral"][0] == "pass":
        checks["collateral"] = (
            "pass",
            (
                f"verified by dcap-qvl at {options.now}, within the collateral's window "
                f"[{collateral.issued_at}, {collateral.expires_at})"
            ),
        )
    tcb_status = outcome.status if outcome is not None else None
    advisories = outcome.advisory_ids if outcome is not None else ()
    if tcb_status is not None:
        allowed = ", ".join(sorted(options.allowed_tcb_statuses)) or "none"
        if tcb_status in options.allowed_tcb_statuses:
            checks["tcb_status"] = ("pass", f"{tcb_status} (allowed: {allowed})")
        else:
            checks["tcb_status"] = (
                "fail",
                f"{tcb_status} is not an allowed TCB status (allowed: {allowed})",
            )
        rejected = sorted(set(advisories) & options.rejected_advisory_ids)
        listed = ", ".join(advisories) or "none"
        if rejected:
            checks["advisory_ids"] = ("fail", f"rejected advisories apply: {', '.join(rejected)}")
        else:
            checks["advisory_ids"] = ("pass", f"advisories: {listed}; none rejected by policy")
    else:
        checks["tcb_status"] = dcap["tcb_status"]
        checks["advisory_ids"] = ("skipped", "dcap-qvl produced no TCB verdict")

    debug: tuple[CheckStatus, str] = (
        ("fail", "the DEBUG bit is set: the host can read and change the TD's memory")
        if report.is_debug
        else ("pass", "DEBUG bit clear")
    )
    checks["td_attributes"] = _combine(debug, dcap["td_attributes"])
    if any(report.mr_signer_seam):
        checks["mr_signer_seam"] = (
            "fail",
            f"mr_signer_seam is {_short(report.mr_signer_seam)}: the TDX module is not Intel's",
        )
    else:
        checks["mr_signer_seam"] = ("pass", "zero (the TDX module is signed by Intel)")
    if report.mr_service_td is not None:
        checks.require("mr_service_td")
    checks["mr_service_td"] = _mr_service_td_check(report, dcap["mr_service_td"])

    simulated = evidence.marked_simulated or options.root_ca_der is not None
    replay = _replay(evidence)
    checks["event_log"] = _event_log_check(evidence, replay, options)
    checks["runtime_events"] = _runtime_events_check(evidence, replay)
    if evidence.event_log_given:
        checks.require("runtime_events")
    binding = _bind(evidence, replay, checks["runtime_events"][0])
    derived = None if binding.runtime is None else derive_app_info(report, binding.runtime, "")

    measured = None if binding.runtime is None else boot_event_payload(
        binding.runtime, OS_IMAGE_HASH_EVENT
    )
    try:
        stated, unreadable = stated_os_image_hash(evidence.vm_config), None
    except EvidenceError as exc:
        stated, unreadable = None, exc.message
    os_image = check_os_image(
        options.os_image_policy,
        mrtd=report.mr_td,
        rtmrs=report.rtmrs,
        measured=measured,
        stated=stated,
        stated_problem=unreadable,
    )
    checks["os_image"] = (os_image.status, os_image.detail)
    if options.os_image_policy is not None:
        checks.require("os_image")
    checks.claims(
        "envelope_binding",
        _envelope_binding_check(
            evidence, derived, os_image.os_image_hash, stated, simulated=simulated
        ),
        "a bare quote: no envelope claims to compare (its report_data is the only claim)",
    )
    _report_data_and_ratls_checks(checks, evidence, options, "quote")

    # Nothing is a claim unless the quote's signature verified under an accepted root.
    authenticated = all(checks[name][0] == "pass" for name in _QUOTE_AUTHENTICATION)
    identity = derived if authenticated else None
    runtime = binding.runtime if identity is not None else None
    ppid = outcome.ppid if outcome is not None and authenticated else None
    return checks.conclude(
        evidence,
        options,
        CHECK_NAMES,
        simulated=simulated,
        tcb_status=tcb_status,
        advisory_ids=advisories,
        quote_version=quote.version,
        mrtd=report.mr_td,
        rtmrs=report.rtmrs,
        mr_config_id=report.mr_config_id,
        **_identity_claims(identity, runtime),
        os_image_hash=os_image.os_image_hash if authenticated else b"",
        os_image_verified=authenticated and os_image.status == "pass",
        device_id=hashlib.sha256(ppid).digest() if ppid is not None else b"",
        boot_events=binding.boot_events if authenticated else (),
    )


def _mr_service_td_check(
    report: TdReport, dcap: tuple[CheckStatus, str]
) -> tuple[CheckStatus, str]:
    """Zero mr_service_td (TD 1.5), combined with dcap-qvl's stage. A TD 1.0 body has no
    mr_service_td, but a failure dcap-qvl attributes to that stage still fails."""
    if report.mr_service_td is None:
        return dcap if dcap[0] == "fail" else ("skipped", "a TD 1.0 report has no mr_service_td")
    own: tuple[CheckStatus, str] = (
        ("fail", f"mr_service_td is {_short(report.mr_service_td)}, must be zero")
        if any(report.mr_service_td)
        else ("pass", "zero (no service TD bound)")
    )
    return _combine(own, dcap)


def _identity_claims(
    identity: AppInfo | None, runtime: Sequence[TdxEvent] | None
) -> dict[str, Any]:
    """The app identity fields of a result: from bound runtime events only, else empty."""
    if identity is None or runtime is None:
        return {}
    return {
        "identity_bound": True,
        "app_id": identity.app_id,
        "compose_hash": identity.compose_hash,
        "instance_id": identity.instance_id,
        "key_provider": _key_provider(identity.key_provider_info),
        "key_provider_info": identity.key_provider_info,
        "mr_aggregated": identity.mr_aggregated,
        "mr_system": identity.mr_system,
        "init_script_hashes": _init_script_hashes(runtime),
        "runtime_events": tuple(e.to_runtime_event() for e in runtime),
    }


def verify(
    data: bytes | str, options: VerifyOptions, collateral: Collateral | None = None
) -> VerificationResult:
    """:func:`load_evidence` then :func:`verify_evidence`.

    :raises EvidenceError: the evidence is malformed or of an unsupported platform.
    """
    return verify_evidence(load_evidence(data), options, collateral)


# --- SEV-SNP ---------------------------------------------------------------------------

SNP_SIGNATURE_SKIPPED: Final = (
    "signature not verified (no VCEK chain): the report's ECDSA P-384 signature can only be "
    "checked with the chip's VCEK certificate, and none was given or fetched; the report is "
    "unauthenticated"
)
SNP_CHAIN_SKIPPED: Final = (
    "no VCEK certificate chain (VCEK -> ASK -> AMD ARK): the envelope carries no certificate "
    "table and the verifier does not fetch from AMD's KDS"
)


def _snp_policy_check(report: SnpReport) -> tuple[CheckStatus, str]:
    problems = []
    if report.is_debug:
        problems.append(
            f"guest policy {report.policy:#x} allows DEBUG: the host can read and change the "
            "guest's memory"
        )
    if not report.policy & POLICY_RESERVED_ONE:
        problems.append(f"guest policy {report.policy:#x} has the must-be-one bit 17 clear")
    if problems:
        return "fail", "; ".join(problems)
    return "pass", f"guest policy {report.policy:#x}: DEBUG not allowed; VMPL {report.vmpl}"


def _snp_signature_check(report: SnpReport) -> tuple[CheckStatus, str]:
    if report.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        return "fail", (
            f"signature algorithm {report.signature_algo} is not ECDSA P-384 with SHA-384 "
            f"({SIGNATURE_ALGO_ECDSA_P384_SHA384}); it could never be verified"
        )
    if not any(report.signature):
        return "fail", "the report carries no signature (the signature field is all zero)"
    return "skipped", SNP_SIGNATURE_SKIPPED


def _snp_binding_check(evidence: Evidence) -> tuple[CheckStatus, str] | None:
    if evidence.report_data is None:
        return None
    problems, done = _claimed_report_data(
        evidence.report_data, evidence.bound_report_data, "the report's"
    )
    if evidence.app_info is not None and evidence.app_info != AppInfo():
        problems.append(
            "the envelope makes app_info claims, which an SEV-SNP report cannot back (there "
            "are no runtime registers to recompute them from)"
        )
    tag = _platform_tag_problem(evidence, evidence.marked_simulated)
    if tag is not None:
        problems.append(tag)
    return _outcome(problems, done)


def _verify_snp(
    evidence: Evidence, report: SnpReport, options: VerifyOptions
) -> VerificationResult:
    """The SEV-SNP checks: structure, policy and bindings; the signature is never passed."""
    checks = _Checks("evidence", "snp_policy", "snp_signature", "vcek_chain")
    checks["evidence"] = _decoded(
        evidence,
        f"SEV-SNP report v{report.version} ({len(report.raw)} bytes), VMPL {report.vmpl}, "
        f"measurement {_short(report.measurement)}, {len(evidence.event_log)} events",
    )
    checks["snp_policy"] = _snp_policy_check(report)
    if evidence.event_log:
        checks["event_log"] = (
            "skipped",
            (
                f"{len(evidence.event_log)} events are carried, but SEV-SNP has no runtime "
                "measurement registers to bind them: they are unverified claims"
            ),
        )
    else:
        checks["event_log"] = (
            "skipped",
            "SEV-SNP has no runtime measurement registers; the evidence carries no event log",
        )
    checks.claims("envelope_binding", _snp_binding_check(evidence), "no envelope claims to compare")
    _report_data_and_ratls_checks(checks, evidence, options, "report")
    checks["snp_signature"] = _snp_signature_check(report)
    checks["vcek_chain"] = ("skipped", SNP_CHAIN_SKIPPED)
    return checks.conclude(
        evidence,
        options,
        SNP_CHECK_NAMES,
        simulated=evidence.marked_simulated,
        quote_version=report.version,
        evidence_format="sev-snp",
        snp_report=report,
    )
