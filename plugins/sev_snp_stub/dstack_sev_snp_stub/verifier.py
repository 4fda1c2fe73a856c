"""The ``sev-snp`` verifier plugin: AMD SEV-SNP reports, verified by :mod:`.verify`.

Registered in ``dstack_core.verifiers`` as ``sev-snp`` (pyproject.toml), next to the
``sev-snp-stub`` agent plugin. Its platform checks are :data:`.verify.CHECK_NAMES`:
``vcek_chain``, ``snp_signature``, ``snp_tcb`` and ``snp_policy``, every one mandatory; the
first two authenticate the report. SNP has no runtime measurement registers, so the report
hands the core no :class:`~dstack_core.verify.Registers`: the core binds no event log and
derives no app identity from SNP evidence.

Collateral (the VCEK and ASK, optionally the CRL) comes from a document the operator gave
(a trust bundle's ``collateral.json``, any form :meth:`.kds.SnpCollateral.from_bytes`
reads but the certificate table), else the cache directory and AMD's KDS when the option
``kds_url`` is set: all before verification (:mod:`.kds`).

Options (``--verifier-option sev-snp:KEY=VALUE``): see :data:`OPTIONS`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from typing import Any, Final

from cryptography import x509

from dstack_core import hookimpl
from dstack_core.errors import ConfigurationError
from dstack_core.snp import SnpReport
from dstack_core.verify import (
    CheckResult,
    PlatformReport,
    PlatformVerification,
    TrustInputs,
    VerifierInfo,
    VerifyOptions,
)
from dstack_core.verify.checks import short

from .kds import COLLATERAL_FORMAT, KDS_URL, SnpCollateral, SnpCollateralCache, SnpCollateralSource
from .validate import SnpPolicy
from .verify import CHECK_NAMES, SnpVerifyOptions, verify_report

__all__ = ["OPTIONS", "SnpVerifier", "decode", "policy_options"]

EVIDENCE_FORMAT: Final = "sev-snp"
OPTIONS: Final = {
    "kds_url": "fetch VCEKs and ASKs from this KDS on a cache miss ('amd': AMD's, "
    f"{KDS_URL}); default: never fetch",
    "require_crl": "true: fail vcek_chain without the product's CRL (fetched with the VCEK)",
    "allow_debug": "true: accept a guest policy that allows DEBUG (default false)",
    "allow_migration_agent": "true: accept a migration agent (default false)",
    "allow_smt": "false: require a guest policy that forbids SMT (default true)",
    "vmpl": "the VMPL (0-3) the report must have been requested at (default: any)",
    "minimum_guest_svn": "the lowest acceptable GUEST_SVN (default: any)",
}
"""The ``--verifier-option sev-snp:KEY=VALUE`` keys."""
INFO: Final = VerifierInfo(
    evidence_format=EVIDENCE_FORMAT,
    checks=CHECK_NAMES,
    authenticated_by=("vcek_chain", "snp_signature"),
    quote_verified_by=CHECK_NAMES,
    tee_variant="dstack-amd-sev-snp",
    options=OPTIONS,
    description="AMD SEV-SNP attestation reports: VCEK -> ASK -> ARK, signature, TCB, policy",
)


def _flag(options: Mapping[str, str], key: str, default: bool) -> bool:
    value = options.get(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"verifier option sev-snp:{key} must be true or false, not {value!r}")


def _number(options: Mapping[str, str], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigurationError(f"verifier option sev-snp:{key} must be an integer") from None


def policy_options(options: Mapping[str, str]) -> tuple[SnpPolicy, bool]:
    """The guest policy and ``require_crl`` the options select.

    :raises ConfigurationError: a value that is not what its key takes.
    """
    try:
        policy = SnpPolicy(
            allow_debug=_flag(options, "allow_debug", False),
            allow_migration_agent=_flag(options, "allow_migration_agent", False),
            allow_smt=_flag(options, "allow_smt", True),
            vmpl=_number(options, "vmpl"),
            minimum_guest_svn=_number(options, "minimum_guest_svn"),
        )
    except ValueError as exc:
        raise ConfigurationError(f"verifier options of sev-snp: {exc}") from None
    return policy, _flag(options, "require_crl", False)


@functools.lru_cache(maxsize=16)
def _roots(root_ca_der: bytes) -> tuple[x509.Certificate, ...]:
    try:
        return (x509.load_der_x509_certificate(root_ca_der),)
    except ValueError as exc:
        raise ConfigurationError(f"the root CA is not a DER certificate: {exc}") from None


def decode(evidence: bytes) -> PlatformReport:
    """An SNP report's structure and report data: nothing verified.

    :raises EvidenceError: not a 1184-byte report of a known version.
    """
    report = SnpReport.from_bytes(evidence)
    return PlatformReport(
        evidence_format=EVIDENCE_FORMAT,
        raw=report.raw,
        report_data=report.report_data,
        platform=EVIDENCE_FORMAT,
        description=(
            f"SEV-SNP report v{report.version} ({len(report.raw)} bytes), VMPL {report.vmpl}, "
            f"measurement {short(report.measurement)}"
        ),
        identity="the evidence is an SEV-SNP report",
        noun="report",
        version=report.version,
        details=report.to_json(),
        parsed=report,
    )


def verify(
    report: PlatformReport,
    collateral: SnpCollateral | None,
    options: VerifyOptions,
    collateral_error: str | None = None,
) -> PlatformVerification:
    """The SNP platform checks of one decoded report; pure."""
    parsed = report.parsed if isinstance(report.parsed, SnpReport) else SnpReport.from_bytes(report.raw)
    policy, require_crl = policy_options(options.options_for(EVIDENCE_FORMAT))
    result = verify_report(
        parsed,
        collateral,
        SnpVerifyOptions(
            now=options.now,
            roots=None if options.root_ca_der is None else _roots(options.root_ca_der),
            allow_simulator=options.allow_simulator,
            require_crl=require_crl,
            policy=policy,
        ),
    )
    checks = []
    for check in result.checks:
        detail = check.detail
        if check.name == "vcek_chain" and collateral is None and collateral_error:
            detail = f"{detail} ({collateral_error})"
        checks.append(CheckResult(name=check.name, status=check.status, detail=detail,
                                  mandatory=True))
    authenticated = all(c.passed for c in result.checks[:2])
    return PlatformVerification(
        checks=tuple(checks),
        simulated=result.simulated,
        tcb_status=result.tcb_status if authenticated else None,
    )


def _is_snp_collateral(document: bytes) -> bool:
    start = document.lstrip()[:16]
    if start.startswith(b"{"):
        try:
            doc = json.loads(document)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("format") == COLLATERAL_FORMAT
    return start.startswith(b"-----BEGIN") or start[:1] == b"\x30"


class SnpVerifier:
    """The ``sev-snp`` verifier plugin (entry point ``sev-snp`` in ``dstack_core.verifiers``)."""

    @hookimpl
    def verifier_info(self) -> VerifierInfo:
        return INFO

    @hookimpl
    def decode_evidence(self, evidence: bytes) -> PlatformReport:
        return decode(evidence)

    @hookimpl
    def load_collateral(self, document: bytes) -> SnpCollateral | None:
        if not _is_snp_collateral(document):
            return None
        return SnpCollateral.from_bytes(document)

    @hookimpl
    def fetch_collateral(
        self, report: PlatformReport, trust: TrustInputs, now: int
    ) -> SnpCollateral | None:
        options = trust.options_for(EVIDENCE_FORMAT)
        kds = options.get("kds_url")
        _, with_crl = policy_options(options)
        source = SnpCollateralSource(
            cache=(
                SnpCollateralCache(directory=trust.collateral_cache)
                if trust.collateral_cache is not None
                else None
            ),
            kds_url=KDS_URL if kds == "amd" else kds,
            with_crl=with_crl,
        )
        if source.cache is None and source.kds_url is None:
            return None
        parsed = report.parsed if isinstance(report.parsed, SnpReport) else SnpReport.from_bytes(report.raw)
        # A worker thread of the caller's: the KDS client is asyncio.
        return asyncio.run(source.collateral_for(parsed, now=now))

    @hookimpl
    def verify_platform(
        self,
        report: PlatformReport,
        collateral: Any,
        options: VerifyOptions,
        collateral_error: str | None,
    ) -> PlatformVerification:
        if collateral is not None and not isinstance(collateral, SnpCollateral):
            collateral, collateral_error = None, "the collateral given is not SEV-SNP collateral"
        return verify(report, collateral, options, collateral_error)

