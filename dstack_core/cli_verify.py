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
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .errors import ConfigurationError, DstackError, EvidenceError

if TYPE_CHECKING:
    from .collateral import CollateralSource
    from .verify import ExpectedReportData

# The verifier's modules (dcap-qvl, msgpack) load only when a verifier command runs, so
# ``dstack-agent serve`` does not pay for them.

__all__ = ["EXIT_ERROR", "EXIT_FAIL", "EXIT_PASS", "register"]

EXIT_PASS: Final = 0
EXIT_FAIL: Final = 1
EXIT_ERROR: Final = 2
BUNDLE_ROOT: Final = "root_ca.pem"
BUNDLE_COLLATERAL: Final = "collateral.json"


def _add_trust_flags(parser: argparse.ArgumentParser) -> None:
    trust = parser.add_argument_group("trust and collateral")
    trust.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="quote collateral, dcap-qvl QuoteCollateralV3 JSON (e.g. the simulator's "
        "collateral.json); used for every quote",
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
        help=f"a simulator trust bundle directory ({BUNDLE_ROOT} + {BUNDLE_COLLATERAL}, as "
        "written by 'dstack-agent simulator trust-bundle'): sets --root-ca and --collateral",
    )
    trust.add_argument(
        "--allow-simulator",
        action="store_true",
        help="accept simulator evidence (with the simulator's root CA); the result says "
        "simulated: true",
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
        "(upstream's lite-stripped RA-TLS certificates)",
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
        help="the raw report data the quote must carry (zero-padded to 64 bytes)",
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
    verifier.set_defaults(func=_cmd_verifier)


def _trust(args: argparse.Namespace) -> tuple[CollateralSource, bytes | None]:
    from .collateral import CollateralCache, CollateralSource, load_collateral_file
    from .server.verifier import load_root_ca

    root_path: Path | None = args.root_ca
    collateral_path: Path | None = args.collateral
    if args.trust_bundle is not None:
        root_path = root_path or args.trust_bundle / BUNDLE_ROOT
        collateral_path = collateral_path or args.trust_bundle / BUNDLE_COLLATERAL
    try:
        fixed = load_collateral_file(collateral_path) if collateral_path else None
    except EvidenceError as exc:
        raise ConfigurationError(f"invalid collateral {collateral_path}: {exc.message}") from None
    source = CollateralSource(
        fixed=fixed,
        cache=CollateralCache(directory=args.collateral_cache) if args.collateral_cache else None,
        pccs_url=args.pccs_url,
    )
    return source, load_root_ca(root_path) if root_path else None


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
    from .verify import ExpectedReportData

    if args.expect_report_data is not None and args.expect_content is not None:
        raise ConfigurationError("give --expect-report-data or --expect-content, not both")
    if args.expect_report_data is not None:
        raw = _hex_arg(args.expect_report_data, "--expect-report-data")
        try:
            return ExpectedReportData.raw(raw)
        except EvidenceError as exc:
            raise ConfigurationError(exc.message) from None
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
    from .verify import DEFAULT_ALLOWED_TCB_STATUSES, VerifyOptions, load_evidence, verify_evidence

    try:
        source, root = _trust(args)
        expected = _expected(args)
        now = int(time.time()) if args.now is None else args.now
        options = VerifyOptions(
            now=now,
            root_ca_der=root,
            allow_simulator=args.allow_simulator,
            allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(args.allow_tcb_status),
            rejected_advisory_ids=args.reject_advisory,
            expected_report_data=expected,
            allow_stripped_event_log=args.allow_stripped_event_log,
        )
        evidence = load_evidence(_read_evidence(args.evidence))
        collateral = None
        problem = None
        try:
            if evidence.quote is not None:  # SEV-SNP evidence has no DCAP collateral
                collateral = asyncio.run(source.collateral_for(evidence.quote.raw, now=now))
        except EvidenceError as exc:
            problem = exc.message
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

    from .server.verifier import DEFAULT_MAX_BODY, VerifierSettings, create_verifier_app
    from .verify import DEFAULT_ALLOWED_TCB_STATUSES

    host, port = _parse_listen(args.listen)
    source, root = _trust(args)
    settings = VerifierSettings(
        collateral=source,
        root_ca_der=root,
        allow_simulator=args.allow_simulator,
        allowed_tcb_statuses=DEFAULT_ALLOWED_TCB_STATUSES.union(args.allow_tcb_status),
        rejected_advisory_ids=args.reject_advisory,
        allow_stripped_event_log=args.allow_stripped_event_log,
        max_body_size=args.max_body_size or DEFAULT_MAX_BODY,
    )
    if root is not None and not args.allow_simulator:
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
