"""The ``tdx`` verifier plugin: Intel TDX DCAP quotes, verified with dcap-qvl.

Registered in ``dstack_core.verifiers`` as ``tdx`` (pyproject.toml), next to the agent
plugin of this package. It verifies every ``tdx``-format quote: real TDX guests' under
Intel's root, and the simulator's and the fake TDX kernel's under their mock PKI's root
(``VerifyOptions.root_ca_der``, only with ``allow_simulator``).

Platform checks, in result order: ``simulator_policy``, ``collateral``,
``certificate_chain``, ``qe_identity``, ``quote_signature``, ``tcb_status``,
``advisory_ids``, ``td_attributes``, ``mr_signer_seam``, ``mr_service_td``
(docs/verify.md). Collateral is Intel's (:mod:`dstack_core.collateral`): a
``QuoteCollateralV3`` document the operator gave, or the cache and the PCCS, fetched before
verification.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from dstack_core import hookimpl
from dstack_core.collateral import Collateral, CollateralCache, CollateralSource
from dstack_core.errors import EvidenceError
from dstack_core.mockpki import SIMULATOR_USER_DATA
from dstack_core.quote import TdReport, TdxQuote, is_tdx_quote
from dstack_core.verify import (
    PlatformReport,
    PlatformVerification,
    Registers,
    TrustInputs,
    VerifierInfo,
    VerifyOptions,
)
from dstack_core.verify.checks import Checks, Outcome, short

from .qvl import DCAP_CHECKS, QvlOutcome, combine, dcap_checks, run_qvl

__all__ = ["CHECKS", "TdxVerifier", "mr_service_td_check"]

EVIDENCE_FORMAT: Final = "tdx"
SIMULATOR_PLATFORM: Final = "simulator"
SIMULATOR_MARKER: Final = SIMULATOR_USER_DATA[:16]
"""``DSTACK-SIMULATOR``: the start of a simulator quote's (signed) header user_data."""

CHECKS: Final = (
    "simulator_policy",
    *DCAP_CHECKS[:4],
    "tcb_status",
    "advisory_ids",
    "td_attributes",
    "mr_signer_seam",
    "mr_service_td",
)
AUTHENTICATED_BY: Final = (
    "simulator_policy",
    "collateral",
    "certificate_chain",
    "qe_identity",
    "quote_signature",
)
"""Together: the quote's signature verified under an accepted root."""
INFO: Final = VerifierInfo(
    evidence_format=EVIDENCE_FORMAT,
    checks=CHECKS,
    authenticated_by=AUTHENTICATED_BY,
    quote_verified_by=(*AUTHENTICATED_BY, "td_attributes", "mr_signer_seam", "mr_service_td"),
    tee_variant="dstack-tdx",
    description="Intel TDX DCAP quotes (v4/v5), verified with dcap-qvl",
)
NO_COLLATERAL: Final = (
    "no collateral: give a collateral file (--collateral) or a PCCS (--pccs-url)"
)


def decode(evidence: bytes) -> PlatformReport:
    """A TDX quote's structure, registers and report data: nothing verified.

    :raises EvidenceError: not a TDX quote (version 4/5), or malformed.
    """
    if not is_tdx_quote(evidence):
        raise EvidenceError("the evidence's quote is not an Intel TDX quote (version 4/5)")
    quote = TdxQuote.from_bytes(evidence)
    report = quote.report
    marked = quote.header.user_data.startswith(SIMULATOR_MARKER)
    return PlatformReport(
        evidence_format=EVIDENCE_FORMAT,
        raw=quote.raw,
        report_data=report.report_data,
        platform=SIMULATOR_PLATFORM if marked else EVIDENCE_FORMAT,
        marked_simulated=marked,
        description=f"TDX quote v{quote.version} (TD {'1.5' if report.is_td15 else '1.0'} body)",
        identity=f"the quote {'is' if marked else 'is not'} marked DSTACK-SIMULATOR",
        noun="quote",
        version=quote.version,
        registers=Registers(
            mrtd=report.mr_td,
            rtmrs=report.rtmrs,
            mr_config_id=report.mr_config_id,
            mr_owner=report.mr_owner,
            mr_owner_config=report.mr_owner_config,
        ),
        parsed=quote,
    )


def simulator_policy(quote: TdxQuote, options: VerifyOptions) -> Outcome:
    """``simulator_policy``: simulator evidence, or an external root CA, only with the
    opt-in (and a simulator root)."""
    marked = quote.header.user_data.startswith(SIMULATOR_MARKER)
    external = options.root_ca_der is not None
    if not marked and not external:
        return "pass", "not simulator evidence; verified against Intel's root of trust"
    reasons = []
    if marked:
        reasons.append(
            f"the evidence is marked simulated (platform {SIMULATOR_PLATFORM!r}, quote "
            f"user_data {quote.header.user_data[:16].decode('ascii', 'replace')!r})"
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


def mr_service_td_check(report: TdReport, dcap: Outcome) -> Outcome:
    """Zero mr_service_td (TD 1.5), combined with dcap-qvl's stage. A TD 1.0 body has no
    mr_service_td, but a failure dcap-qvl attributes to that stage still fails."""
    if report.mr_service_td is None:
        return dcap if dcap[0] == "fail" else ("skipped", "a TD 1.0 report has no mr_service_td")
    own: Outcome = (
        ("fail", f"mr_service_td is {short(report.mr_service_td)}, must be zero")
        if any(report.mr_service_td)
        else ("pass", "zero (no service TD bound)")
    )
    return combine(own, dcap)


def _tcb_checks(checks: Checks, outcome: QvlOutcome | None, dcap: Mapping[str, Outcome],
                options: VerifyOptions) -> None:
    if outcome is None or outcome.status is None:
        checks["tcb_status"] = dcap["tcb_status"]
        checks["advisory_ids"] = ("skipped", "dcap-qvl produced no TCB verdict")
        return
    status = outcome.status
    allowed = ", ".join(sorted(options.allowed_tcb_statuses)) or "none"
    if status in options.allowed_tcb_statuses:
        checks["tcb_status"] = ("pass", f"{status} (allowed: {allowed})")
    else:
        checks["tcb_status"] = ("fail", f"{status} is not an allowed TCB status (allowed: {allowed})")
    rejected = sorted(set(outcome.advisory_ids) & options.rejected_advisory_ids)
    listed = ", ".join(outcome.advisory_ids) or "none"
    if rejected:
        checks["advisory_ids"] = ("fail", f"rejected advisories apply: {', '.join(rejected)}")
    else:
        checks["advisory_ids"] = ("pass", f"advisories: {listed}; none rejected by policy")


def verify(
    report: PlatformReport,
    collateral: Collateral | None,
    options: VerifyOptions,
    collateral_error: str | None = None,
) -> PlatformVerification:
    """The TDX platform checks of one decoded quote; pure."""
    quote = report.parsed
    if not isinstance(quote, TdxQuote):
        quote = decode(report.raw).parsed
    td = quote.report
    checks = Checks(*AUTHENTICATED_BY, "tcb_status", "td_attributes", "mr_signer_seam")
    checks["simulator_policy"] = simulator_policy(quote, options)
    outcome = (
        None if collateral is None
        else run_qvl(quote.raw, collateral, options.root_ca_der, options.now)
    )
    dcap = dcap_checks(
        outcome, f"no collateral: {collateral_error}" if collateral_error else NO_COLLATERAL
    )
    for name in DCAP_CHECKS[:4]:
        checks[name] = dcap[name]
    if collateral is not None and checks["collateral"][0] == "pass":
        checks["collateral"] = (
            "pass",
            (
                f"verified by dcap-qvl at {options.now}, within the collateral's window "
                f"[{collateral.issued_at}, {collateral.expires_at})"
            ),
        )
    _tcb_checks(checks, outcome, dcap, options)
    debug: Outcome = (
        ("fail", "the DEBUG bit is set: the host can read and change the TD's memory")
        if td.is_debug
        else ("pass", "DEBUG bit clear")
    )
    checks["td_attributes"] = combine(debug, dcap["td_attributes"])
    if any(td.mr_signer_seam):
        checks["mr_signer_seam"] = (
            "fail",
            f"mr_signer_seam is {short(td.mr_signer_seam)}: the TDX module is not Intel's",
        )
    else:
        checks["mr_signer_seam"] = ("pass", "zero (the TDX module is signed by Intel)")
    if td.mr_service_td is not None:
        checks.require("mr_service_td")
    checks["mr_service_td"] = mr_service_td_check(td, dcap["mr_service_td"])
    ppid = outcome.ppid if outcome is not None else None
    return PlatformVerification(
        checks=checks.results(CHECKS),
        simulated=report.marked_simulated or options.root_ca_der is not None,
        tcb_status=outcome.status if outcome is not None else None,
        advisory_ids=outcome.advisory_ids if outcome is not None else (),
        device_id=hashlib.sha256(ppid).digest() if ppid is not None else b"",
    )


def _is_intel_collateral(document: bytes) -> bool:
    """Intel's ``QuoteCollateralV3`` is a JSON object that names no format; other formats'
    JSON documents do (``{"format": "dstack-core/sev-snp-collateral", ...}``). A JSON-like
    document that does not parse is taken as Intel's, so that its parser says why."""
    if not document.lstrip().startswith(b"{"):
        return False
    try:
        doc = json.loads(document)
    except ValueError:
        return True
    return not (isinstance(doc, dict) and "format" in doc)


class TdxVerifier:
    """The ``tdx`` verifier plugin (entry point ``tdx`` in ``dstack_core.verifiers``)."""

    @hookimpl
    def verifier_info(self) -> VerifierInfo:
        return INFO

    @hookimpl
    def decode_evidence(self, evidence: bytes) -> PlatformReport:
        return decode(evidence)

    @hookimpl
    def load_collateral(self, document: bytes) -> Collateral | None:
        if not _is_intel_collateral(document):
            return None
        return Collateral.from_json(document)

    @hookimpl
    def fetch_collateral(
        self, report: PlatformReport, trust: TrustInputs, now: int
    ) -> Collateral | None:
        source = CollateralSource(
            cache=(
                CollateralCache(directory=trust.collateral_cache)
                if trust.collateral_cache is not None
                else None
            ),
            pccs_url=trust.pccs_url,
        )
        if trust.pccs_fetcher is not None:
            source = attrs.evolve(source, fetcher=trust.pccs_fetcher)
        if not source.configured:
            return None
        # A worker thread of the caller's: the PCCS client is asyncio.
        return asyncio.run(source.collateral_for(report.raw, now=now))

    @hookimpl
    def verify_platform(
        self,
        report: PlatformReport,
        collateral: Any,
        options: VerifyOptions,
        collateral_error: str | None,
    ) -> PlatformVerification:
        if collateral is not None and not isinstance(collateral, Collateral):
            collateral, collateral_error = None, "the collateral given is not Intel's (DCAP)"
        return verify(report, collateral, options, collateral_error)

