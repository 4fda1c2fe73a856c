"""The verifier: check any dstack attestation and say, check by check, what was verified.

A plugin host (docs/verify.md, docs/plugins/writing.md): each evidence format is verified
by the plugin registered for it in the entry-point group ``dstack_core.verifiers``
(:mod:`dstack_core.verifier_hookspecs`): ``tdx`` by dstack-tdx (dcap-qvl), ``sev-snp`` by
dstack-sev-snp-stub, a vendor's format by the vendor's package. Two steps, both pure (no
network, no clock: collateral and the verification time are inputs):

1. :func:`load_evidence` recognises the evidence by its content and decodes it into an
   :class:`Evidence`: our CBOR envelope, upstream V0 (SCALE) and V1 (MessagePack)
   envelopes, a bare TDX quote, the JSON body of a GetQuote / Attest response (or of an
   upstream ``/verify`` request), or an RA-TLS certificate chain in PEM or DER, hex text of
   any binary form too; the platform evidence inside is decoded by its format's plugin.
   Malformed evidence raises :class:`~dstack_core.errors.EvidenceError`; unsupported
   platforms (Nitro, GCP, upstream's SEV-SNP envelopes, formats without an installed
   plugin) raise it with ``code="unsupported_evidence"``.
2. :func:`verify_evidence` runs the plugin's platform checks (signature, certificate chain,
   TCB, platform policy) and the core's: ``evidence`` first, then ``event_log``,
   ``runtime_events``, ``envelope_binding``, ``report_data``, ``ratls_binding``,
   ``ratls_chain``, ``os_image``. A failed check is data in the result, never an exception.

The verdict is ``pass`` only if no check failed and every *mandatory* check passed. A
claim comes only from data the evidence's signature covers, directly or through a replay
that reproduces the signed registers, and only when the plugin's authenticating checks
pass; what nothing binds is reported empty, whatever the verdict.

Module map: :mod:`.types` and :mod:`.options` (the values), :mod:`.host` (plugins),
:mod:`.load` and :mod:`.evidence` (inputs), :mod:`.replay`, :mod:`.identity` and
:mod:`.bindings` (the core's checks), :mod:`.engine` (the verdict), :mod:`.result` (the
documents), :mod:`.sources` (collateral before verification).
"""

from __future__ import annotations

from typing import Final

from .checks import Checks
from .engine import verify, verify_evidence
from .evidence import SIMULATOR_MARKER, Evidence, EvidenceKind
from .host import LoadedVerifier, VerifierHost, default_host
from .load import MAX_EVIDENCE_SIZE, evidence_from_json, load_evidence, sniff_evidence
from .options import (
    DEFAULT_ALLOWED_TCB_STATUSES,
    ExpectedReportData,
    VerifyOptions,
    bytes_tuple,
    parse_expected_report_data,
    string_set,
)
from .result import (
    OS_IMAGE_WARNING,
    SIMULATED_WARNING,
    BootEvent,
    VerificationResult,
    VerifierIdentity,
)
from .sources import CollateralResolver, parse_collateral_documents
from .types import (
    CORE_CHECKS,
    CheckResult,
    CheckStatus,
    PlatformReport,
    PlatformVerification,
    Registers,
    TrustInputs,
    VerifierInfo,
)

__all__ = [
    "CHECK_NAMES",
    "CORE_CHECKS",
    "DEFAULT_ALLOWED_TCB_STATUSES",
    "MAX_EVIDENCE_SIZE",
    "OS_IMAGE_WARNING",
    "SIMULATED_WARNING",
    "SIMULATOR_MARKER",
    "SNP_CHECK_NAMES",
    "BootEvent",
    "CheckResult",
    "CheckStatus",
    "Checks",
    "CollateralResolver",
    "Evidence",
    "EvidenceKind",
    "ExpectedReportData",
    "LoadedVerifier",
    "PlatformReport",
    "PlatformVerification",
    "Registers",
    "TrustInputs",
    "VerificationResult",
    "VerifierHost",
    "VerifierIdentity",
    "VerifierInfo",
    "VerifyOptions",
    "bytes_tuple",
    "default_host",
    "evidence_from_json",
    "load_evidence",
    "parse_collateral_documents",
    "parse_expected_report_data",
    "sniff_evidence",
    "string_set",
    "verify",
    "verify_evidence",
]

TDX_PLATFORM_CHECKS: Final = (
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
)
SNP_PLATFORM_CHECKS: Final = ("vcek_chain", "snp_signature", "snp_tcb", "snp_policy")

CHECK_NAMES: Final = ("evidence", *TDX_PLATFORM_CHECKS, *CORE_CHECKS[1:])
"""Every check of TDX evidence (the ``tdx`` plugin's, dstack-tdx), in result order."""

SNP_CHECK_NAMES: Final = ("evidence", *SNP_PLATFORM_CHECKS, *CORE_CHECKS[1:])
"""Every check of SEV-SNP evidence (the ``sev-snp`` plugin's, dstack-sev-snp-stub), in
result order. Names are stable API; tests hold the plugins to both lists."""
