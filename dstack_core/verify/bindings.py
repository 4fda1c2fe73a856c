"""What binds the evidence to its wrapping and to the caller: ``envelope_binding``,
``report_data``, ``ratls_binding`` and ``ratls_chain``. The same for every format."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..certs import ratls_report_data, report_data_for, verify_chain
from ..envelope import AppInfo
from ..errors import EvidenceError
from ..types import is_hardware_tag
from .checks import Checks, Outcome, outcome, short
from .evidence import Evidence
from .options import APP_DATA_TAG, VerifyOptions

__all__ = ["envelope_binding_check", "ratls_chain_check", "report_data_and_ratls_checks"]

APP_INFO_COMPARED: Final = (
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
    return (
        f"the envelope says platform {tag!r}, but {evidence.report.identity}: its platform is "
        f"{evidence.platform!r} (a tag is free text; the verifier reports what the evidence is)"
    )


def _claimed_report_data(claimed: bytes, bound: bytes, whose: str) -> tuple[list[str], list[str]]:
    """``(problems, done)`` of an envelope binding check, started with whether the
    envelope's report_data is the one the hardware evidence binds (``whose``)."""
    if hmac.compare_digest(claimed, bound):
        return [], [f"envelope report_data equals {whose}"]
    return [f"envelope report_data {short(claimed)} differs from {whose} {short(bound)}"], []


def envelope_binding_check(
    evidence: Evidence,
    derived: AppInfo | None,
    os_image_hash: bytes,
    stated: bytes | None,
    *,
    simulated: bool,
) -> Outcome | None:
    """``envelope_binding``; None when not applicable (a bare quote without claims).

    :param derived: the identity recomputed from the bound runtime events, or None when
        RTMR3 is not bound (or the format has no registers).
    :param os_image_hash: the bound OS image hash, or ``b""``.
    :param stated: the vm_config's (unbound) OS image hash, or None.
    :param simulated: whether the evidence is simulated (see :func:`_platform_tag_problem`).
    """
    if evidence.report_data is None:
        return None
    whose = f"the {evidence.report.noun}'s"
    problems, done = _claimed_report_data(evidence.report_data, evidence.bound_report_data, whose)
    if evidence.report_data_payload is not None:
        expected = report_data_for(evidence.report_data_payload.encode(), "sha512", APP_DATA_TAG)
        if hmac.compare_digest(expected, evidence.report_data):
            done.append('dstack-pod report_data = sha512("app-data:" || payload)')
        else:
            problems.append('dstack-pod report_data is not sha512("app-data:" || payload)')
    claimed = evidence.app_info
    if claimed is not None and claimed != AppInfo():
        if evidence.report.registers is None:
            problems.append(
                f"the envelope makes app_info claims, which {evidence.evidence_format} "
                "evidence cannot back (there are no runtime registers to recompute them from)"
            )
        elif derived is None:
            problems.append(
                "app_info claims cannot be confirmed: RTMR3 does not replay to the quote"
            )
        else:
            _compare_app_info(claimed, derived, os_image_hash, stated, problems, done)
    tag = _platform_tag_problem(evidence, simulated)
    if tag is not None:
        problems.append(tag)
    return outcome(problems, done)


def _compare_app_info(
    claimed: AppInfo,
    derived: AppInfo,
    os_image_hash: bytes,
    stated: bytes | None,
    problems: list[str],
    done: list[str],
) -> None:
    wrong = [
        name for name in APP_INFO_COMPARED if getattr(claimed, name) != getattr(derived, name)
    ]
    if wrong:
        problems.append(
            f"app_info claims differ from the values recomputed from quote and log: "
            f"{', '.join(wrong)}"
        )
    else:
        done.append(
            f"app_info claims {', '.join(APP_INFO_COMPARED)} equal the values "
            "recomputed from quote and log"
        )
    # An empty os_image_hash claims nothing; a non-empty one must be the bound hash, or
    # without one at least the vm_config's (which is then said to be unbound).
    if not claimed.os_image_hash:
        return
    if os_image_hash:
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


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def ratls_chain_check(chain: Sequence[x509.Certificate], options: VerifyOptions) -> Outcome:
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


def _ratls_checks(evidence: Evidence, options: VerifyOptions) -> tuple[Outcome, Outcome]:
    leaf = evidence.certificate
    if leaf is None:
        skipped: Outcome = ("skipped", "the evidence is not an RA-TLS certificate")
        return skipped, skipped
    expected = ratls_report_data(leaf.spki_der)
    quoted = evidence.bound_report_data
    noun = evidence.report.noun
    if hmac.compare_digest(expected, quoted):
        binding: Outcome = (
            "pass",
            f'{noun} report_data = sha512("ratls-cert:" || certificate SubjectPublicKeyInfo)',
        )
    else:
        binding = (
            "fail",
            (
                f'{noun} report_data {short(quoted)} is not sha512("ratls-cert:" || SPKI) = '
                f"{short(expected)}: the attestation does not belong to this certificate's key"
            ),
        )
    return binding, ratls_chain_check(evidence.certificate_chain, options)


def report_data_and_ratls_checks(
    checks: Checks, evidence: Evidence, options: VerifyOptions
) -> None:
    """``report_data`` (against the caller's expectation) and the RA-TLS checks."""
    expected = options.expected_report_data
    actual = evidence.bound_report_data
    whose = evidence.report.noun
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
                    f"{whose} report_data {short(actual)} is not the expected "
                    f"{expected.description} value {short(expected.value)}"
                ),
            )
    checks["ratls_binding"], checks["ratls_chain"] = _ratls_checks(evidence, options)
    if evidence.certificate is not None:
        checks.require("ratls_binding")
        if options.ratls_trust_anchors:
            checks.require("ratls_chain")
