"""The verifier contract: every hook a verifier plugin for one evidence format implements.

A verifier plugin is an object (usually a class, instantiated once by the core with no
arguments) registered in the entry-point group ``dstack_core.verifiers`` under the name of
the **evidence format** it verifies (``tdx``, ``sev-snp``, ``acme-cc``: what
``PlatformInfo.evidence_format`` and our envelope's ``evidence_format`` say). Exactly one
plugin may be installed per format: two distributions registering one name stop every
verifier command with an error naming both. A platform package ships its agent plugin
(``dstack_core.platforms``) and the verifier plugin of its format together; the agent
refuses to start a platform whose format has no verifier plugin installed.

The plugin owns the platform part of verification; the core owns the rest::

    bytes -> core: recognise the input, decode envelopes (ours, upstream V0/V1), JSON,
                   RA-TLS certificates, the event log
          -> plugin: decode_evidence(evidence)           -> PlatformReport (structure only)
          -> plugin: load_collateral / fetch_collateral  (before verification, never during)
          -> plugin: verify_platform(report, collateral) -> PlatformVerification (named checks)
          -> core: report-data binding, event-log replay into the report's registers, app
                   identity, RA-TLS, OS image policy, the verdict and the claims

Hooks are **synchronous** and ``firstresult=True``; ``verifier_info``, ``decode_evidence``
and ``verify_platform`` are required. The core calls them from worker threads, possibly
concurrently: keep no mutable state (or guard it). ``decode_evidence`` and
``verify_platform`` must be **pure**: no network, no disk, no clock (the verification time
is ``options.now``); all I/O happens in ``fetch_collateral``, before verification.

**The claims rule.** The core reports a value as a claim only when the plugin's
``authenticated_by`` checks all pass: the evidence's signature verified up to a root the
relying party accepts. So a plugin must fail (or skip) one of them whenever the signature,
the chain to an accepted root, or the binding of what it decoded to what was signed does
not hold, and must decode ``report_data`` and ``registers`` only from bytes that signature
covers.

Errors: ``decode_evidence`` raises :class:`~dstack_core.errors.EvidenceError` for malformed
evidence; collateral hooks raise it (code ``collateral_unavailable``) when collateral cannot
be had; any other :class:`~dstack_core.errors.DstackError` is passed through. Anything else
that escapes is a bug: the core logs it and fails the verification with
``verifier_plugin_error`` (no exception text in answers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .verify.options import VerifyOptions
    from .verify.types import PlatformReport, PlatformVerification, TrustInputs, VerifierInfo

PROJECT_NAME = "dstack_core"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "REQUIRED_HOOKS",
    "decode_evidence",
    "fetch_collateral",
    "hookspec",
    "load_collateral",
    "verifier_info",
    "verify_platform",
]

ENTRY_POINT_GROUP = "dstack_core.verifiers"
"""The entry-point group of verifier plugins; each entry point's name is its format."""


@hookspec(firstresult=True)
def verifier_info() -> VerifierInfo:
    """Describe the verifier: its format, its platform checks and which authenticate.

    Called once, when the plugin is loaded; the answer must not change.

    :returns: a :class:`~dstack_core.verify.VerifierInfo` whose ``evidence_format`` is the
        plugin's entry-point name; never None.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def decode_evidence(evidence: bytes, extra: Mapping[str, Any]) -> PlatformReport:
    """Decode the format's platform evidence: structure only, no cryptography.

    Pure. Parse strictly (exact lengths, known versions, no trailing bytes unless the
    format defines them) and read ``report_data`` and ``registers`` only from the part
    the evidence's signature covers.

    :param evidence: the raw platform evidence: our envelope's ``quote``, a bare quote, or
        upstream's; at most 24 MiB.
    :param extra: our envelope's platform-specific ``extra`` map (e.g. a certificate table
        the agent attached), empty for other inputs. Nothing signs it: use it as
        collateral at most, never as a claim.
    :returns: a :class:`~dstack_core.verify.PlatformReport` of this format; never None.
    :raises EvidenceError: the evidence is malformed (the message says how).

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def load_collateral(document: bytes) -> object | None:
    """Parse a collateral document the operator gave, if it is this format's.

    Optional. Called once per configuration (``verify --collateral FILE``, a trust bundle's
    ``collateral.json``, the service's ``DSTACK_VERIFIER_COLLATERAL``), before any
    verification; the value is then handed to :func:`verify_platform` for every piece of
    evidence of this format. Recognise your document by its content: return None for
    another format's (Intel's ``QuoteCollateralV3`` has no ``format`` key; other formats'
    documents name themselves in one).

    :param document: the file's bytes (at most 4 MiB).
    :returns: the parsed collateral (any object :func:`verify_platform` understands), or
        None when the document is not this format's.
    :raises EvidenceError: the document is this format's but unusable.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def fetch_collateral(report: PlatformReport, trust: TrustInputs, now: int) -> object | None:
    """Find collateral for one piece of evidence: a cache, the vendor's service.

    Optional; called before verification (never during), in a worker thread, only when the
    operator gave no collateral document of this format. May block on disk and network.

    :param report: the decoded evidence (from :func:`decode_evidence`).
    :param trust: the operator's cache directory, PCCS URL and per-format options.
    :param now: the verification time (unix seconds): cached collateral must be valid then.
    :returns: the collateral, or None when none is configured or known (the plugin's checks
        then say so).
    :raises EvidenceError: with code ``collateral_unavailable`` when fetching failed; the
        core reports the message in the checks that needed the collateral.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def verify_platform(
    report: PlatformReport,
    collateral: object | None,
    options: VerifyOptions,
    collateral_error: str | None,
) -> PlatformVerification:
    """Run the platform checks: signature, certificate chain, TCB and platform policy.

    Pure: the collateral and the time (``options.now``) are inputs. Honour
    ``options.root_ca_der`` (an external root instead of the vendor's, only with
    ``options.allow_simulator``), ``options.allow_simulator``, the TCB policy and
    ``options.options_for(format)``. Every check of :attr:`VerifierInfo.checks` is answered,
    in order; a check that could not run is ``skipped`` with the reason (and the verdict
    fails if it is mandatory).

    :param report: from :func:`decode_evidence` (its ``parsed`` is the plugin's own).
    :param collateral: from :func:`load_collateral` or :func:`fetch_collateral`, or None.
    :param options: the relying party's trust anchors and policy.
    :param collateral_error: why there is no collateral (e.g. the PCCS was unreachable), or
        None; say it in the checks that needed it.
    :returns: a :class:`~dstack_core.verify.PlatformVerification`; never None.

    .. versionadded:: 0.2
    """


REQUIRED_HOOKS = ("verifier_info", "decode_evidence", "verify_platform")
"""Hooks every verifier plugin implements; the collateral hooks are optional."""
