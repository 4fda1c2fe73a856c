"""Decoded evidence (:class:`Evidence`): one envelope, quote or certificate's content, with
its platform evidence decoded by the verifier plugin of its format, nothing verified yet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import attrs
from cryptography import x509

from ..certs import RaTlsCertificate
from ..envelope import AppInfo, Envelope
from ..errors import EvidenceError
from ..eventlog import RuntimeEvent, TdxEvent
from ..mockpki import SIMULATOR_USER_DATA
from ..quote import TdxQuote
from ..snp import SnpReport
from ..upstream import UpstreamAttestation
from .host import VerifierHost, default_host
from .types import PlatformReport

__all__ = [
    "SIMULATOR_MARKER",
    "SIMULATOR_PLATFORM",
    "TDX_FORMAT",
    "Evidence",
    "EvidenceKind",
    "embedded",
    "from_envelope",
    "from_quote",
    "from_upstream",
    "unsupported",
]

EvidenceKind = Literal["dstack-core", "upstream-v0", "upstream-v1", "quote", "ratls-certificate"]

SIMULATOR_MARKER: Final = SIMULATOR_USER_DATA[:16]
"""``DSTACK-SIMULATOR``: the start of a simulator quote's header user_data."""
SIMULATOR_PLATFORM: Final = "simulator"
TDX_FORMAT: Final = "tdx"
"""The format of bare quotes, GetQuote bodies and upstream's TDX attestations."""


@attrs.frozen(kw_only=True)
class Evidence:
    """Decoded, structurally valid evidence, not yet verified.

    :ivar kind: the outer format (a certificate's embedded format is ``attestation_kind``).
    :ivar report: the platform evidence, decoded by its format's verifier plugin.
    :ivar platform_tag: the free-text ``platform`` our envelope carries (None for other
        formats); the verifier compares it with :attr:`platform` and never reports it.
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
    report: PlatformReport
    platform_tag: str | None = None
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

    @property
    def evidence_format(self) -> str:
        """The platform evidence's format (``tdx``, ``sev-snp``, a vendor's)."""
        return self.report.evidence_format

    @property
    def platform(self) -> str:
        """What the evidence is, from its format and content, never from free text:
        ``simulator`` for a TDX quote marked ``DSTACK-SIMULATOR``, else the format."""
        return self.report.platform

    @property
    def bound_report_data(self) -> bytes:
        """The 64 bytes of report data the hardware evidence binds."""
        return self.report.report_data

    @property
    def marked_simulated(self) -> bool:
        """Whether the evidence says it is simulated (its platform tag or a marker in the
        evidence, such as a quote's ``DSTACK-SIMULATOR``). Never trusted to say *not*."""
        return self.report.marked_simulated or SIMULATOR_PLATFORM in (
            self.report.platform,
            self.platform_tag,
        )

    @property
    def quote(self) -> TdxQuote | None:
        """The parsed TDX quote of TDX evidence, else None."""
        parsed = self.report.parsed
        return parsed if isinstance(parsed, TdxQuote) else None

    @property
    def snp_report(self) -> SnpReport | None:
        """The parsed report of SEV-SNP evidence, else None."""
        parsed = self.report.parsed
        return parsed if isinstance(parsed, SnpReport) else None


def _decode(
    host: VerifierHost | None, evidence_format: str, raw: bytes, extra: Mapping[str, Any]
) -> PlatformReport:
    return (host or default_host()).get(evidence_format).decode(raw, extra)


def unsupported(platform: str) -> EvidenceError:
    """Upstream evidence of a platform this verifier cannot read."""
    return EvidenceError(
        f"{platform} evidence is not supported yet: this verifier checks Intel TDX, and "
        "dstack-core's own envelopes of the evidence formats its plugins verify",
        code="unsupported_evidence",
    )


def from_envelope(envelope: Envelope, host: VerifierHost | None = None) -> Evidence:
    """Our envelope, its evidence decoded by the plugin of its ``evidence_format``.

    :raises EvidenceError: malformed, or (``unsupported_evidence``) no plugin for the format.
    """
    return Evidence(
        kind="dstack-core",
        report=_decode(host, envelope.evidence_format, envelope.quote, envelope.extra),
        platform_tag=envelope.platform,
        event_log=envelope.event_log,
        report_data=envelope.report_data,
        vm_config=envelope.vm_config,
        app_info=envelope.app_info,
    )


def from_upstream(attestation: UpstreamAttestation, host: VerifierHost | None = None) -> Evidence:
    """Upstream's V0/V1 attestation (TDX only).

    :raises EvidenceError: malformed, or (``unsupported_evidence``) another platform's.
    """
    if attestation.platform != TDX_FORMAT:
        raise unsupported(attestation.platform)
    return Evidence(
        kind="upstream-v0" if attestation.wire_version == 0 else "upstream-v1",
        report=_decode(host, TDX_FORMAT, attestation.quote, {}),
        event_log=attestation.event_log,
        runtime_events=attestation.runtime_events,
        preimages=attestation.preimages,
        report_data=attestation.report_data,
        vm_config=attestation.config,
        report_data_payload=attestation.report_data_payload,
    )


def from_quote(
    quote: bytes,
    event_log: tuple[TdxEvent, ...] | None,
    report_data: bytes | None,
    vm_config: str,
    *,
    unreplayable: tuple[str, ...] = (),
    preimages: tuple[bytes | None, ...] = (),
    host: VerifierHost | None = None,
) -> Evidence:
    """A bare TDX quote (GetQuote's, a legacy certificate's), with its event log if given.

    :raises EvidenceError: malformed, or no ``tdx`` verifier plugin is installed.
    """
    return Evidence(
        kind="quote",
        report=_decode(host, TDX_FORMAT, quote, {}),
        event_log=event_log or (),
        event_log_given=event_log is not None,
        unreplayable=unreplayable,
        preimages=preimages,
        report_data=report_data,
        vm_config=vm_config,
    )


def embedded(
    inner: Evidence,
    leaf: RaTlsCertificate,
    chain: Sequence[x509.Certificate],
    attestation_kind: str,
) -> Evidence:
    """``inner`` as carried by an RA-TLS certificate chain (``chain[0]`` is ``leaf``)."""
    return attrs.evolve(
        inner,
        kind="ratls-certificate",
        certificate=leaf,
        certificate_chain=tuple(chain),
        attestation_kind=attestation_kind,
    )
