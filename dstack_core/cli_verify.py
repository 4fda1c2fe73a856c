"""``dstack-agent verify`` and ``dstack-agent verifier``: the verifier's command line.

``verify EVIDENCE`` checks one piece of evidence (a file, or ``-`` for stdin; its kind is
recognised from its content) and prints the result as JSON on stdout. Exit status: 0 when
the verdict is ``pass``, 1 when it is ``fail``, 2 when the evidence is malformed or the
configuration is wrong (then stdout carries ``{"verdict": "fail", "error", "code"}``).

``verifier --listen HOST:PORT`` serves ``POST /verify`` (see
:mod:`dstack_core.server.verifier`) with the same trust and policy flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from .errors import ConfigurationError, DstackError, EvidenceError, InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .collateral import CollateralSource
    from .osimage import OsImagePolicy
    from .verify import CollateralResolver, ExpectedReportData

# The verifier's modules (dcap-qvl, msgpack) load only when a verifier command runs, so
# ``dstack-agent serve`` does not pay for them.

__all__ = ["EXIT_ERROR", "EXIT_FAIL", "EXIT_PASS", "register"]

EXIT_PASS: Final = 0
EXIT_FAIL: Final = 1
EXIT_ERROR: Final = 2
BUNDLE_ROOT: Final = "root_ca.pem"
BUNDLE_COLLATERAL: Final = "collateral.json"
BUNDLE_OS_IMAGE_POLICY: Final = "os_image_policy.json"


def _add_trust_flags(parser: argparse.ArgumentParser) -> None:
    trust = parser.add_argument_group("trust and collateral")
    trust.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="collateral for every piece of evidence of its format: dcap-qvl "
        "QuoteCollateralV3 JSON for TDX, the VCEK and ASK for SEV-SNP (a trust bundle's "
        "collateral.json); the verifier plugin whose format it is reads it",
    )
    trust.add_argument(
        "--pccs-url",
        metavar="URL",
        help="fetch collateral from this PCCS when it is not in the cache (network)",
    )
    trust.add_argument(
        "--collateral-cache",
        type=Path,
        metavar="DIR",
        help="cache fetched collateral here, per FMSPC, until it expires",
    )
    trust.add_argument(
        "--root-ca",
        type=Path,
        metavar="FILE",
        help="root CA (PEM or DER) instead of Intel's; an external trust anchor, accepted "
        "only with --allow-simulator",
    )
    trust.add_argument(
        "--trust-bundle",
        type=Path,
        metavar="DIR",
        help=f"a trust bundle directory ({BUNDLE_ROOT}, {BUNDLE_COLLATERAL} and "
        f"{BUNDLE_OS_IMAGE_POLICY} when present, as written by 'dstack-agent trust-bundle'): "
        "sets --root-ca, --collateral and --os-image-policy",
    )
    trust.add_argument(
        "--verifier-option",
        action="append",
        default=[],
        metavar="FORMAT:KEY=VALUE",
        help="a setting of the verifier plugin of an evidence format, e.g. "
        "sev-snp:kds_url=amd (repeatable; 'dstack-agent verifiers' lists each plugin's keys)",
    )
    trust.add_argument(
        "--allow-simulator",
        action="store_true",
        help="accept simulator evidence (with the simulator's root CA); the result says "
        "simulated: true",
    )
    trust.add_argument(
        "--trust-anchor",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a CA certificate (PEM, may hold several) an RA-TLS certificate chain may end "
        "at, e.g. your KMS root or app CA (repeatable); with it ratls_chain is mandatory, "
        "without it a chain is reported untrusted",
    )
    image = parser.add_argument_group(
        "OS image", "what ties the app to a known OS: the signed MRTD and RTMR0-2"
    )
    image.add_argument(
        "--os-image-policy",
        type=Path,
        metavar="FILE",
        help="known OS images: JSON mapping os_image_hash to MRTD and RTMR0-2 (docs/verify.md); "
        "makes os_image mandatory",
    )
    image.add_argument(
        "--expect-mrtd",
        metavar="HEX",
        help="the MRTD the quote must carry (one image; makes os_image mandatory)",
    )
    image.add_argument(
        "--expect-rtmr",
        action="append",
        default=[],
        metavar="N=HEX",
        help="RTMR N (0, 1 or 2) the quote must carry (repeatable; makes os_image mandatory)",
    )
    policy = parser.add_argument_group("policy")
    policy.add_argument(
        "--allow-tcb-status",
        action="append",
        default=[],
        metavar="STATUS",
        help="also accept this TCB status (repeatable; UpToDate is always accepted), e.g. "
        "SWHardeningNeeded",
    )
    policy.add_argument(
        "--reject-advisory",
        action="append",
        default=[],
        metavar="ID",
        help="fail when this Intel advisory applies (repeatable), e.g. INTEL-SA-00837",
    )
    policy.add_argument(
        "--allow-stripped-event-log",
        action="store_true",
        help="let event_log pass on RTMR3 alone when the log has no boot events "
        "(upstream's lite-stripped RA-TLS certificates, stripped GetQuote logs; never our "
        "envelopes, which carry the full log)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``verify`` and ``verifier`` subcommands to ``dstack-agent``'s parser."""
    verify = commands.add_parser(
        "verify",
        help="verify an attestation, quote or RA-TLS certificate",
        description="Verify one piece of evidence and print, check by check, what was "
        "verified. EVIDENCE is a file or '-' (stdin): our CBOR envelope, an upstream V0 "
        "(SCALE) or V1 (MessagePack) envelope, a TDX quote, binary or hex; a PEM or DER "
        "RA-TLS certificate chain; or the JSON body of a GetQuote, Attest or GetTlsKey "
        "response. Exit status 0 only when the verdict is pass (1: fail, 2: bad input).",
    )
    verify.add_argument("evidence", metavar="EVIDENCE", help="evidence file, or - for stdin")
    _add_trust_flags(verify)
    expect = verify.add_argument_group("expected report data")
    expect.add_argument(
        "--expect-report-data",
        metavar="HEX",
        help="the raw report data the quote must carry: hex, optional 0x, 1-64 bytes "
        "(zero-padded to 64); empty or odd-length hex is an error",
    )
    expect.add_argument(
        "--expect-content",
        metavar="HEX",
        help="content whose hash the report data must be: H(TAG || ':' || content)",
    )
    expect.add_argument(
        "--content-tag", default="app-data", metavar="TAG", help="tag for --expect-content"
    )
    expect.add_argument(
        "--content-hash",
        default="sha512",
        metavar="ALG",
        help="hash for --expect-content (sha256, sha384, sha512, sha3-*, keccak*)",
    )
    verify.add_argument(
        "--now",
        type=int,
        metavar="UNIX_SECONDS",
        help="verification time (default: now); pin it to re-verify old evidence as of a date",
    )
    verify.add_argument("--compact", action="store_true", help="print JSON on one line")
    verify.set_defaults(func=_cmd_verify)

    verifier = commands.add_parser(
        "verifier",
        help="serve POST /verify over HTTP",
        description="Serve the verifier over HTTP: POST /verify with the upstream dstack "
        "verifier's request and response (plus a per-check map), GET /health. Stateless: "
        "run more processes behind a load balancer to scale (see docs/verify.md).",
    )
    verifier.add_argument("--listen", required=True, metavar="HOST:PORT", help="TCP address")
    _add_trust_flags(verifier)
    verifier.add_argument(
        "--max-body-size", type=int, help="request body limit in bytes (default 24 MiB)"
    )
    verifier.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        help="answer 408 when a request body takes longer than this to arrive (default 30)",
    )
    verifier.set_defaults(func=_cmd_verifier)


@attrs.frozen(kw_only=True)
class _Trust:
    """What the trust and policy flags say, shared by ``verify`` and ``verifier``."""

    collateral: CollateralSource
    documents: Mapping[str, object]
    root_ca_der: bytes | None
    os_image_policy: OsImagePolicy | None
    ratls_trust_anchors: tuple[bytes, ...]
    plugin_options: Mapping[str, Mapping[str, str]]


def _trust(args: argparse.Namespace) -> _Trust:
    from .osimage import OsImagePolicy, with_expectations
    from .server.verifier import (
        collateral_settings,
        load_certificates,
        load_root_ca,
        parse_verifier_options,
    )
    from .verify import default_host

    # Every installed verifier plugin loads, or the command stops naming the broken one.
    default_host().load_all()
    root_path: Path | None = args.root_ca
    collateral_path: Path | None = args.collateral
    policy_path: Path | None = args.os_image_policy
    if args.trust_bundle is not None:
        root_path = root_path or args.trust_bundle / BUNDLE_ROOT
        collateral_path = collateral_path or args.trust_bundle / BUNDLE_COLLATERAL
        bundled = args.trust_bundle / BUNDLE_OS_IMAGE_POLICY
        if policy_path is None and bundled.exists():
            policy_path = bundled
    source, documents = collateral_settings(collateral_path, args.collateral_cache, args.pccs_url)
    policy = OsImagePolicy.from_file(policy_path) if policy_path else None
    return _Trust(
        collateral=source,
        documents=documents,
        root_ca_der=load_root_ca(root_path) if root_path else None,
        os_image_policy=with_expectations(policy, args.expect_mrtd, args.expect_rtmr),
        ratls_trust_anchors=tuple(
            der for path in args.trust_anchor for der in load_certificates(path)
        ),
        plugin_options=parse_verifier_options(args.verifier_option),
    )


def _resolver(trust: _Trust) -> CollateralResolver:
    from .server.verifier import collateral_resolver

    return collateral_resolver(trust.collateral, trust.documents, trust.plugin_options)


def _read_evidence(name: str) -> bytes:
    from .verify import MAX_EVIDENCE_SIZE

    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_EVIDENCE_SIZE + 1)
        else:
            with open(name, "rb") as handle:
                data = handle.read(MAX_EVIDENCE_SIZE + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read evidence {name}: {exc}") from None
    if len(data) > MAX_EVIDENCE_SIZE:
        raise EvidenceError(f"evidence is over the {MAX_EVIDENCE_SIZE}-byte limit")
    return data


def _hex_arg(value: str, flag: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ConfigurationError(f"{flag} must be hex") from None


def _expected(args: argparse.Namespace) -> ExpectedReportData | None:
    from .verify import ExpectedReportData, parse_expected_report_data

    if args.expect_report_data is not None and args.expect_content is not None:
        raise ConfigurationError("give --expect-report-data or --expect-content, not both")
    if args.expect_report_data is not None:
        try:
            return parse_expected_report_data(args.expect_report_data)
        except InvalidRequest as exc:
            raise ConfigurationError(f"--expect-report-data: {exc.message}") from None
    if args.expect_content is not None:
        return ExpectedReportData.for_content(
            _hex_arg(args.expect_content, "--expect-content"),
            tag=args.content_tag,
            hash_algorithm=args.content_hash,
        )
    return None


def _print(doc: dict[str, Any], compact: bool) -> None:
    text = json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import (
        DEFAULT_ALLOWED_TCB_STATUSES,
        SIMULATED_WARNING,
        VerifyOptions,
        load_evidence,
        verify_evidence,
    )

    try:
        trust = _trust(args)
        expected = _expected(args)
        now = int(time.time()) if args.now is None else args.now
        options = VerifyOptions(
            now=now,
            root_ca_der=trust.root_ca_der,
            allow_simulator=args.allow_simulator,
            allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(args.allow_tcb_status),
            rejected_advisory_ids=args.reject_advisory,
            expected_report_data=expected,
            allow_stripped_event_log=args.allow_stripped_event_log,
            os_image_policy=trust.os_image_policy,
            ratls_trust_anchors=trust.ratls_trust_anchors,
            plugin_options=trust.plugin_options,
        )
        evidence = load_evidence(_read_evidence(args.evidence))
        collateral, problem = _resolver(trust).collateral_for(evidence.report, now=now)
        result = verify_evidence(evidence, options, collateral, collateral_error=problem)
    except (DstackError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        code = getattr(exc, "code", "invalid_request")
        _print({"verdict": "fail", "error": message, "code": code}, args.compact)
        print(f"dstack-agent verify: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    _print(result.to_json(), args.compact)
    if result.simulated:
        print(
            "dstack-agent verify: WARNING: simulated evidence (not TEE hardware)", file=sys.stderr
        )
    for warning in result.warnings:
        if warning != SIMULATED_WARNING:
            print(f"dstack-agent verify: WARNING: {warning}", file=sys.stderr)
    if not result.passed:
        print(f"dstack-agent verify: verdict fail: {result.reason}", file=sys.stderr)
    return EXIT_PASS if result.passed else EXIT_FAIL


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _cmd_verifier(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .server.verifier import (
        DEFAULT_BODY_TIMEOUT,
        DEFAULT_MAX_BODY,
        VerifierSettings,
        create_verifier_app,
    )
    from .verify import DEFAULT_ALLOWED_TCB_STATUSES

    host, port = _parse_listen(args.listen)
    trust = _trust(args)
    settings = VerifierSettings(
        collateral=trust.collateral,
        documents=trust.documents,
        plugin_options=trust.plugin_options,
        root_ca_der=trust.root_ca_der,
        allow_simulator=args.allow_simulator,
        allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(args.allow_tcb_status),
        rejected_advisory_ids=args.reject_advisory,
        allow_stripped_event_log=args.allow_stripped_event_log,
        os_image_policy=trust.os_image_policy,
        ratls_trust_anchors=trust.ratls_trust_anchors,
        max_body_size=args.max_body_size or DEFAULT_MAX_BODY,
        body_timeout=args.body_timeout or DEFAULT_BODY_TIMEOUT,
    )
    if trust.root_ca_der is not None and not args.allow_simulator:
        print(
            "dstack-agent verifier: warning: --root-ca without --allow-simulator: every "
            "verification will fail simulator_policy",
            file=sys.stderr,
        )
    web.run_app(
        create_verifier_app(settings),
        host=host,
        port=port,
        print=lambda text: print(text, file=sys.stderr, flush=True),
    )
    return EXIT_PASS
