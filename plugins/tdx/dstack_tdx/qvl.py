"""dcap-qvl's one-call verdict, split into the ``tdx`` plugin's named checks.

dcap-qvl verifies a quote in one call and stops at the first failure, with a message. Its
order (formats.md section 5) is: root-CA CRL, quote header (QE vendor), TCB info, QE
identity collateral, PCK chain and CRLs, QE report signature and attestation-key hash, QE
identity policy, quote signature, TCB level / TDX module, ``Revoked``, TD attributes,
mr_service_td. Each step belongs to one check; the failing message is matched to its step,
the checks whose steps all come before it pass, the check owning it fails with dcap-qvl's
message, and later checks are ``skipped`` as not reached.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Final

import attrs
import dcap_qvl  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from dstack_core.certs import verify_chain
from dstack_core.collateral import Collateral
from dstack_core.errors import EvidenceError
from dstack_core.verify.checks import Outcome

__all__ = ["DCAP_CHECKS", "QvlOutcome", "combine", "dcap_checks", "run_qvl"]

DCAP_CHECKS: Final = (
    "collateral",
    "certificate_chain",
    "qe_identity",
    "quote_signature",
    "tcb_status",
)
"""The checks dcap-qvl performs wholly; it also has a part in ``td_attributes`` and
``mr_service_td``."""
_QVL_PREFIX: Final = "Verification failed: "
_UNKNOWN_STAGE: Final = "unknown"
_AMBIGUOUS_CHAIN: Final = "ambiguous_chain"


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
class QvlOutcome:
    """What dcap-qvl said about one quote: its verdict, or where it stopped and why.

    :ivar status: the TCB status when verification passed.
    :ivar advisory_ids: the advisories that apply.
    :ivar ppid: the PCK certificate's PPID, when dcap-qvl reports it.
    :ivar failure: dcap-qvl's message on one line, when it failed.
    :ivar stage: the step it failed at (see ``_QVL_STAGES``).
    """

    status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    ppid: bytes | None = None
    failure: str | None = None
    stage: str | None = None


def run_qvl(
    quote: bytes, collateral: Collateral, root_ca_der: bytes | None, now: int
) -> QvlOutcome:
    """dcap-qvl's verdict on ``quote`` under Intel's root, or under ``root_ca_der``."""
    try:
        if root_ca_der is None:
            report = dcap_qvl.verify(quote, collateral.to_qvl(), now)
        else:
            report = dcap_qvl.verify_with_root_ca(quote, collateral.to_qvl(), root_ca_der, now)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        message = str(exc) or type(exc).__name__
    except BaseException as exc:  # pyo3's PanicException derives from BaseException
        if type(exc).__name__ != "PanicException":
            raise
        message = f"dcap-qvl panicked: {exc}"
    else:
        return QvlOutcome(
            status=str(report.status),
            advisory_ids=tuple(str(a) for a in report.advisory_ids),
            ppid=bytes(report.ppid) if report.ppid is not None else None,
        )
    stage = _classify(message)
    if stage == _AMBIGUOUS_CHAIN:
        stage = _disambiguate_chain(collateral, root_ca_der, now)
    return QvlOutcome(failure=_tidy(message), stage=stage)


def _tidy(message: str) -> str:
    """dcap-qvl's multi-line ``Verification failed: X\n\nCaused by:\n    Y`` on one line."""
    head, _, causes = message.removeprefix(_QVL_PREFIX).partition("Caused by:")
    head = " ".join(head.split())
    causes = " ".join(causes.split())
    return f"{head} (caused by: {causes})" if causes else head


def dcap_checks(outcome: QvlOutcome | None, skip_reason: str) -> dict[str, Outcome]:
    """Status and detail of each check that dcap-qvl performs (partly or wholly)."""
    names = list(DCAP_CHECKS) + ["td_attributes", "mr_service_td"]
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
    result: dict[str, Outcome] = {}
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


def combine(own: Outcome, dcap: Outcome) -> Outcome:
    """One check done partly by us (``own``) and partly by dcap-qvl."""
    status_own, detail_own = own
    status_dcap, detail_dcap = dcap
    if "fail" in (status_own, status_dcap):
        parts = [d for s, d in (own, dcap) if s == "fail"]
        return "fail", "; ".join(parts)
    if status_dcap == "skipped":
        return "skipped", f"{detail_own}; dcap-qvl's part: {detail_dcap}"
    return status_own, f"{detail_own}; {detail_dcap}"
