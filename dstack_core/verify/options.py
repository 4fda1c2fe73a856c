"""What a relying party trusts and requires: :class:`VerifyOptions` and the report data it
expects (:class:`ExpectedReportData`), for every evidence format alike."""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from ..certs import report_data_for
from ..errors import EvidenceError, InvalidRequest
from ..osimage import OsImagePolicy
from ..types import REPORT_DATA_LENGTH

__all__ = [
    "APP_DATA_TAG",
    "DEFAULT_ALLOWED_TCB_STATUSES",
    "ExpectedReportData",
    "VerifyOptions",
    "bytes_tuple",
    "parse_expected_report_data",
    "string_set",
    "verifier_options",
]

DEFAULT_ALLOWED_TCB_STATUSES: Final = frozenset({"UpToDate"})
"""TCB statuses accepted unless the caller allows more (upstream KMS's default)."""

APP_DATA_TAG: Final = "app-data"


def _report_data_value(_inst: object, _attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != REPORT_DATA_LENGTH:
        raise ValueError(f"expected report data must be {REPORT_DATA_LENGTH} bytes")


@attrs.frozen(kw_only=True)
class ExpectedReportData:
    """The report data a caller expects the evidence to carry, and how it was derived.

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


def verifier_options(
    value: Mapping[str, Mapping[str, str]],
) -> Mapping[str, Mapping[str, str]]:
    """Per evidence format, that format's verifier options, copied into plain dicts."""
    return {str(fmt): dict(options) for fmt, options in value.items()}


def _now_value(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError("now must be a non-negative integer of unix seconds")


@attrs.frozen(kw_only=True)
class VerifyOptions:
    """What the relying party trusts and requires.

    Built once per configuration and shared by every verification (the service makes one
    per request only to set ``now`` and ``expected_report_data``). A verifier plugin reads
    the fields that apply to its format and says in its checks' details which it used.

    :ivar now: the verification time, unix seconds (pin it to re-verify old evidence).
    :ivar root_ca_der: a DER root certificate to verify the evidence's certificate chain
        (and collateral) against, instead of the hardware vendor's pinned root (Intel's for
        TDX, AMD's ARKs for SEV-SNP). Any explicit root is an external trust anchor: it is
        accepted only with ``allow_simulator``. None: the vendor's roots.
    :ivar allow_simulator: accept simulator evidence (and external roots). The result says
        ``simulated: true``.
    :ivar allowed_tcb_statuses: TCB statuses that pass ``tcb_status``.
    :ivar rejected_advisory_ids: Intel advisory ids (``INTEL-SA-...``) that fail
        ``advisory_ids`` when the platform is affected.
    :ivar expected_report_data: what the evidence's report data must be, or None (not
        checked).
    :ivar allow_stripped_event_log: let ``event_log`` pass on RTMR3 alone when the log
        carries no boot events (upstream's lite-stripped RA-TLS certificates, bare
        GetQuote logs). Never for our own envelopes, which always carry the full log.
    :ivar os_image_policy: the known OS images; with it, ``os_image`` is mandatory and
        compares the signed MRTD and RTMR0-2. None: the OS image is reported unverified.
    :ivar ratls_trust_anchors: DER certificates an RA-TLS chain may end at (a KMS or app
        CA). With anchors, ``ratls_chain`` is mandatory; without, a chain is never trusted.
    :ivar plugin_options: per evidence format, that format's verifier plugin options
        (``--verifier-option FORMAT:KEY=VALUE``; the keys each plugin accepts are in its
        :class:`~dstack_core.verify.VerifierInfo`). Empty: every plugin's defaults.

    .. versionchanged:: 0.2 ``plugin_options``; ``root_ca_der`` applies to every format.
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
    plugin_options: Mapping[str, Mapping[str, str]] = attrs.field(
        factory=dict, converter=verifier_options, hash=False
    )

    def options_for(self, evidence_format: str) -> Mapping[str, str]:
        """The verifier plugin options given for ``evidence_format`` (empty: defaults)."""
        return self.plugin_options.get(evidence_format, {})
