"""One verification, start to verdict: :func:`verify_evidence` and :func:`verify`.

The verifier plugin of the evidence's format runs its platform checks; the core runs the
format-independent ones on what the plugin decoded, decides which values are claims (only
when the plugin's authenticating checks pass), and concludes. Pure: collateral and the time
are inputs.
"""

from __future__ import annotations

from typing import Final, Literal

from ..eventlog import RUNTIME_IMR
from .bindings import envelope_binding_check, report_data_and_ratls_checks
from .checks import Checks
from .evidence import SIMULATOR_PLATFORM, Evidence
from .host import LoadedVerifier, VerifierHost, default_host
from .identity import bound_identity, identity_claims
from .load import load_evidence
from .options import VerifyOptions
from .replay import bind, event_log_check, replay, runtime_events_check
from .result import (
    OS_IMAGE_WARNING,
    SIMULATED_WARNING,
    BootEvent,
    VerificationResult,
    no_registers_warning,
)
from .types import CORE_CHECKS, PlatformVerification

__all__ = ["verify", "verify_evidence"]

_CORE_AFTER: Final = CORE_CHECKS[1:]
_BARE_QUOTE: Final = (
    "a bare quote: no envelope claims to compare (its report_data is the only claim)"
)


def _platform_checks(
    checks: Checks, verifier: LoadedVerifier, verification: PlatformVerification
) -> None:
    for result in verification.checks:
        checks[result.name] = (result.status, result.detail)
        if result.mandatory:
            checks.require(result.name)
    # The authenticating checks gate every claim: the verdict always needs them.
    for name in verifier.info.authenticated_by:
        checks.require(name)


def _simulator_guard(
    checks: Checks, verifier: LoadedVerifier, evidence: Evidence, options: VerifyOptions,
    verification: PlatformVerification,
) -> bool:
    """Whether the result is simulated; fails the first authenticating check when the
    plugin let simulated evidence authenticate without the opt-in, or when the envelope
    says ``simulator`` about evidence the vendor's own root verified."""
    tagged = evidence.platform_tag == SIMULATOR_PLATFORM
    simulated = verification.simulated or evidence.marked_simulated
    authenticating = verifier.info.authenticated_by
    if not all(checks[name][0] == "pass" for name in authenticating):
        return simulated
    problem = None
    if simulated and not options.allow_simulator:
        problem = (
            "the evidence is simulated (marked so, or verified under an external root): "
            "rejected; opt in with allow_simulator (--allow-simulator) together with the "
            "platform's trust bundle"
        )
    elif tagged and not verification.simulated and not evidence.report.marked_simulated:
        problem = (
            "the envelope says platform 'simulator', but the evidence verified under the "
            "hardware vendor's root: a simulator's evidence verifies only under its mock root"
        )
    if problem is not None:
        name = authenticating[0]
        checks[name] = ("fail", f"{problem} (the core's check; the plugin said: {checks[name][1]})")
    return simulated


def verify_evidence(
    evidence: Evidence,
    options: VerifyOptions,
    collateral: object | None = None,
    *,
    collateral_error: str | None = None,
    host: VerifierHost | None = None,
) -> VerificationResult:
    """Run every check on decoded evidence; pure (collateral and time are inputs).

    :param evidence: from :func:`load_evidence`.
    :param options: trust anchors, policy and the verification time.
    :param collateral: the platform evidence's collateral in its plugin's form
        (:class:`~dstack_core.collateral.Collateral` for TDX), or None (the checks that
        need it are then ``skipped``, so the verdict is ``fail``).
    :param collateral_error: why there is no collateral (e.g. the PCCS was unreachable),
        reported in the skipped checks' detail.
    :param host: the verifier plugins (default: the installed ones).
    :returns: the result, never None; failed checks are data in it.
    :raises EvidenceError: ``unsupported_evidence`` when no plugin verifies the format.
    :raises VerifierPluginError: the format's plugin failed or broke its contract.
    """
    verifier = (host or default_host()).get(evidence.evidence_format)
    report = evidence.report
    verification = verifier.verify(report, collateral, options, collateral_error)
    checks = Checks("evidence")
    log_size = f"{len(evidence.event_log)} events" if evidence.event_log_given else "no event log"
    inner = f", embedded {evidence.attestation_kind}" if evidence.attestation_kind else ""
    checks["evidence"] = ("pass", f"decoded {evidence.kind}{inner}: {report.description}, {log_size}")
    _platform_checks(checks, verifier, verification)
    simulated = _simulator_guard(checks, verifier, evidence, options, verification)

    registers = report.registers
    derived = None
    runtime = None
    boot_events: tuple[BootEvent, ...] = ()
    os_image_hash = b""
    os_image_passed = False
    stated = None
    if registers is not None:
        replayed = replay(evidence)
        checks["event_log"] = event_log_check(evidence, registers, replayed, options)
        checks.require("event_log")
        checks["runtime_events"] = runtime_events_check(evidence, replayed)
        if evidence.event_log_given:
            checks.require("runtime_events")
        binding = bind(evidence, registers, replayed, checks["runtime_events"][0])
        bound = bound_identity(evidence, registers, binding, options)
        checks["os_image"] = bound.os_image_check
        derived, runtime, boot_events = bound.derived, binding.runtime, binding.boot_events
        os_image_hash, os_image_passed = bound.os_image.os_image_hash, bound.os_image.status == "pass"
        stated = bound.stated
    else:
        _without_registers(checks, evidence, options)
    if options.os_image_policy is not None:
        checks.require("os_image")
    checks.claims(
        "envelope_binding",
        envelope_binding_check(evidence, derived, os_image_hash, stated, simulated=simulated),
        _BARE_QUOTE if registers is not None else "no envelope claims to compare",
    )
    report_data_and_ratls_checks(checks, evidence, options)

    # Nothing is a claim unless the evidence's signature verified under an accepted root.
    info = verifier.info
    authenticated = all(checks[name][0] == "pass" for name in info.authenticated_by)
    identity = derived if authenticated else None
    names = ("evidence", *info.checks, *_CORE_AFTER)
    results = checks.results(names)
    # A check is settled when it passed, or was skipped without being mandatory; the
    # verdict is pass when every check is (nothing failed, every mandatory check passed).
    settled = {
        r.name: r.status == "pass" or (r.status == "skipped" and not r.mandatory)
        for r in results
    }
    verdict: Literal["pass", "fail"] = "pass" if all(settled.values()) else "fail"
    quote_verified = all(settled[n] for n in info.quote_verified_by)
    os_image_verified = authenticated and os_image_passed
    warnings = [SIMULATED_WARNING] if simulated else []
    if registers is None:
        warnings.append(no_registers_warning(report.evidence_format))
    elif not os_image_verified:
        warnings.append(OS_IMAGE_WARNING)
    return VerificationResult(
        verdict=verdict,
        checks=results,
        evidence_kind=evidence.kind,
        platform=evidence.platform,
        simulated=simulated,
        verified_at=options.now,
        report_data=evidence.bound_report_data,
        tcb_status=verification.tcb_status,
        advisory_ids=verification.advisory_ids,
        quote_version=report.version,
        mrtd=registers.mrtd if registers is not None else b"",
        rtmrs=registers.rtmrs if registers is not None else (),
        mr_config_id=registers.mr_config_id if registers is not None else b"",
        **identity_claims(identity, runtime if identity is not None else None),
        os_image_hash=os_image_hash if authenticated else b"",
        os_image_verified=os_image_verified,
        device_id=verification.device_id if authenticated else b"",
        boot_events=boot_events if authenticated else (),
        evidence_format=report.evidence_format,
        platform_details=report.details,
        verifier=verifier.identity,
        quote_verified=quote_verified and authenticated,
        tee_variant=info.tee_variant or f"dstack-{report.evidence_format}",
        warnings=tuple(warnings),
    )


def _without_registers(checks: Checks, evidence: Evidence, options: VerifyOptions) -> None:
    """The event-log and OS image checks of a format without dstack's registers: nothing
    can bind the events it carries, so they are never claims."""
    fmt = evidence.evidence_format
    carried = len(evidence.event_log)
    if carried:
        checks["event_log"] = (
            "skipped",
            (
                f"{carried} events are carried, but {fmt} evidence has no runtime "
                "measurement registers to bind them: they are unverified claims"
            ),
        )
    else:
        checks["event_log"] = (
            "skipped",
            f"{fmt} evidence has no runtime measurement registers; it carries no event log",
        )
    runtime = sum(1 for e in evidence.event_log if e.imr == RUNTIME_IMR)
    checks["runtime_events"] = (
        "skipped",
        f"{fmt} evidence has no RTMR3 to replay runtime events into ({runtime} carried, none bound)",
    )
    if options.os_image_policy is not None:
        checks["os_image"] = (
            "skipped",
            (
                f"{fmt} evidence has no MRTD or RTMR0-2 to compare with the OS image policy: "
                "it cannot be tied to a known OS image"
            ),
        )
    else:
        checks["os_image"] = (
            "skipped",
            f"UNVERIFIED: {fmt} evidence has no MRTD or RTMR0-2; no OS image policy applies",
        )


def verify(
    data: bytes | str,
    options: VerifyOptions,
    collateral: object | None = None,
    *,
    host: VerifierHost | None = None,
) -> VerificationResult:
    """:func:`load_evidence` then :func:`verify_evidence`.

    :raises EvidenceError: the evidence is malformed or of an unsupported platform.
    """
    return verify_evidence(load_evidence(data, host=host), options, collateral, host=host)
