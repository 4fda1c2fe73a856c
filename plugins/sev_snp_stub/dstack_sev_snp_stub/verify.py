"""Verify an SEV-SNP attestation report: VCEK -> ASK -> ARK, the signature, the TCB, the policy.

:func:`verify_report` is pure: the report, the collateral (:mod:`.kds`, fetched before) and
the verification time are inputs; nothing is read from the network, the disk or the clock.
It returns an :class:`SnpVerification` with four named checks (:data:`CHECK_NAMES`), each
``pass``, ``fail`` or ``skipped`` with a detail that names the field, the value found and
the value wanted; a failed check is data, never an exception.

``vcek_chain``
    The collateral's VCEK was issued by its ASK, which was issued by the ARK of the VCEK's
    product: one of AMD's ARKs pinned in :mod:`.amd` (Milan, Genoa, Turin), or a root the
    caller gives explicitly (:attr:`SnpVerifyOptions.roots`), which is accepted only with
    ``allow_simulator`` and makes the result ``simulated``. Certificate signatures are
    RSASSA-PSS (SHA-384, MGF1-SHA-384, 48-byte salt) under an RSA issuer, as AMD signs, or
    ECDSA P-384 with SHA-384 under an EC issuer (test PKIs). Every certificate must be valid
    at the verification time, the ARK and ASK must be CAs, the VCEK's ``hwID`` must be the
    report's ``CHIP_ID`` (unless the host masked it), a version 3+ report's CPUID must name
    the VCEK's product, and if the collateral carries the product's CRL, it must be signed
    by the root, current, and not list the ASK or the VCEK.
``snp_signature``
    ECDSA P-384/SHA-384 over bytes ``0x000..0x29F`` under the VCEK's key; the report must
    say it was signed by the VCEK (VLEK-signed reports are not supported) with the chip
    key not masked.
``snp_tcb``
    The report's ``REPORTED_TCB``, read with the product's layout, equals the TCB the VCEK
    was issued for (its ``...1.3.x`` extensions): a VCEK is derived for exactly one TCB,
    so a report at a lower TCB cannot have been signed with a higher TCB's VCEK. Then the
    policy's minimum TCB, if any. The detail reports ``UpToDate`` when the current,
    committed and launch TCBs equal the reported one, else ``OutOfDate``.
``snp_policy``
    :func:`.validate.policy_findings` with :attr:`SnpVerifyOptions.policy`.

A result is ``passed`` only when all four pass. Claims (:meth:`SnpVerification.claims`)
are given out only then: a parser's output is not a claim until the signature and the chain
cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from dstack_core.errors import EvidenceError
from dstack_core.snp import (
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    SIGNER_INFO_MASK_CHIP_KEY,
    SIGNER_INFO_RESERVED_MASK,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SnpReport,
)

from .amd import (
    PRODUCTS,
    TURIN,
    Product,
    TcbVersion,
    VcekExtensions,
    amd_ark,
    fingerprint,
    product_for_cpuid,
    product_for_name,
)
from .kds import SnpCollateral
from .validate import Mismatch, SnpPolicy, policy_findings, tcb_minimum_findings

__all__ = [
    "AMD_PSS",
    "CHECK_NAMES",
    "CheckStatus",
    "SnpCheck",
    "SnpVerification",
    "SnpVerifyOptions",
    "verify_issued_by",
    "verify_report",
]

CheckStatus = Literal["pass", "fail", "skipped"]
CHECK_NAMES: Final = ("vcek_chain", "snp_signature", "snp_tcb", "snp_policy")
"""The checks of an SNP report, in result order. Names are stable API."""

AMD_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
"""The RSASSA-PSS parameters of AMD's certificates; no others are accepted."""
MIN_RSA_BITS: Final = 2048
_SIGNING_KEYS: Final = {0: "VCEK", 1: "VLEK", 7: "none"}


def _check_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in CHECK_NAMES:
        raise ValueError(f"unknown SNP check {value!r}")


@attrs.frozen(kw_only=True)
class SnpCheck:
    """The outcome of one check.

    :ivar name: one of :data:`CHECK_NAMES`.
    :ivar status: ``pass``, ``fail`` or ``skipped`` (not checked: ``detail`` says why; the
        verdict then fails).
    :ivar detail: for people: what was compared, found and wanted.
    :ivar mismatches: for programs: each field that failed, with found and wanted values.
    """

    name: str = attrs.field(validator=_check_name)
    status: CheckStatus
    detail: str
    mismatches: tuple[Mismatch, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict[str, Any]:
        """``{"status", "detail", "mismatches": [{"field", "found", "wanted"}]}``."""
        return {
            "status": self.status,
            "detail": self.detail,
            "mismatches": [m.to_json() for m in self.mismatches],
        }


def _failed(name: str, problems: Sequence[Mismatch], context: str = "") -> SnpCheck:
    detail = "; ".join(map(str, problems))
    return SnpCheck(
        name=name, status="fail", detail=f"{detail} ({context})" if context else detail,
        mismatches=tuple(problems),
    )


def _now_value(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError("now must be a non-negative integer of unix seconds")


def _roots(value: Sequence[x509.Certificate] | None) -> tuple[x509.Certificate, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class SnpVerifyOptions:
    """What the relying party trusts and requires.

    :ivar now: the verification time, unix seconds (certificate and CRL validity).
    :ivar roots: root certificates to use instead of AMD's pinned ARKs; None (the default):
        AMD's. Any root that is not AMD's pinned ARK is an external trust anchor, accepted
        only with ``allow_simulator``.
    :ivar allow_simulator: accept a chain to an external root (a test PKI such as
        :mod:`dstack_core.mockpki_amd`); the result then says ``simulated``.
    :ivar require_crl: fail ``vcek_chain`` when the collateral carries no CRL (default:
        revocation is checked when a CRL is given, and the detail says when it was not).
    :ivar policy: the guest policy requirements (:class:`.validate.SnpPolicy`).
    """

    now: int = attrs.field(validator=_now_value)
    roots: tuple[x509.Certificate, ...] | None = attrs.field(default=None, converter=_roots)
    allow_simulator: bool = False
    require_crl: bool = False
    policy: SnpPolicy = attrs.field(factory=SnpPolicy)


@attrs.frozen(kw_only=True)
class SnpVerification:
    """What :func:`verify_report` found.

    :ivar report: the report, parsed (not a claim unless :attr:`passed`).
    :ivar checks: one :class:`SnpCheck` per :data:`CHECK_NAMES` entry, in that order.
    :ivar product: the VCEK's product, when the VCEK could be read.
    :ivar reported_tcb: ``REPORTED_TCB`` in the product's layout, when known.
    :ivar tcb_status: ``UpToDate`` when current, committed and launch TCB equal the
        reported one, ``OutOfDate`` otherwise; None without a product.
    :ivar root_sha256: the fingerprint of the root the chain ended at, or None.
    :ivar simulated: the chain ended at an external root (not AMD's).
    :ivar vcek: the VCEK certificate used, or None.
    """

    report: SnpReport = attrs.field(repr=False)
    checks: tuple[SnpCheck, ...]
    product: Product | None = None
    reported_tcb: TcbVersion | None = None
    tcb_status: str | None = None
    root_sha256: str | None = None
    simulated: bool = False
    vcek: x509.Certificate | None = attrs.field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    def check(self, name: str) -> SnpCheck:
        """The check called ``name``."""
        return next(c for c in self.checks if c.name == name)

    @property
    def reason(self) -> str:
        """Why the verification failed (the first check that did not pass), or ``""``."""
        for check in self.checks:
            if not check.passed:
                return f"{check.name}: {check.detail}"
        return ""

    def claims(self) -> dict[str, Any] | None:
        """The report's fields as verified claims, or None unless :attr:`passed`."""
        if not self.passed:
            return None
        report = self.report
        return {
            "product": str(self.product),
            "measurement": report.measurement,
            "report_data": report.report_data,
            "host_data": report.host_data,
            "chip_id": report.chip_id,
            "family_id": report.family_id,
            "image_id": report.image_id,
            "id_key_digest": report.id_key_digest,
            "author_key_digest": report.author_key_digest,
            "policy": report.policy,
            "vmpl": report.vmpl,
            "guest_svn": report.guest_svn,
            "reported_tcb": report.reported_tcb,
            "tcb_status": self.tcb_status,
        }

    def to_json(self) -> dict[str, Any]:
        """The verdict, each check, and what was identified (hex for bytes)."""
        return {
            "verdict": "pass" if self.passed else "fail",
            "reason": self.reason,
            "simulated": self.simulated,
            "product": None if self.product is None else str(self.product),
            "reported_tcb": None if self.reported_tcb is None else self.reported_tcb.parts,
            "tcb_status": self.tcb_status,
            "root_sha256": self.root_sha256,
            "checks": {c.name: c.to_json() for c in self.checks},
        }


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _verify_signature(
    issuer: x509.Certificate, signature: bytes, signed: bytes,
    algorithm: x509.ObjectIdentifier, hash_algorithm: object,
) -> None:
    """:raises EvidenceError: the issuer's key does not verify ``signature`` with the one
    algorithm allowed for its key type."""
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if algorithm != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
                hash_algorithm, hashes.SHA384
            ):
                raise EvidenceError(
                    f"signature algorithm {algorithm.dotted_string} is not RSASSA-PSS with SHA-384"
                )
            if key.key_size < MIN_RSA_BITS:
                raise EvidenceError(f"the issuer's RSA key has {key.key_size} bits")
            key.verify(signature, signed, AMD_PSS, hashes.SHA384())
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1):
            if algorithm != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
                raise EvidenceError(
                    f"signature algorithm {algorithm.dotted_string} is not ECDSA with SHA-384"
                )
            key.verify(signature, signed, ec.ECDSA(hashes.SHA384()))
        else:
            raise EvidenceError("the issuer's key is neither RSA nor ECDSA P-384")
    except InvalidSignature:
        raise EvidenceError(f"the signature does not verify under {_cn(issuer)}'s key") from None


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Check that ``issuer`` signed ``cert`` (names and signature; nothing about time).

    :raises EvidenceError: the issuer's name differs, or the signature does not verify.
    """
    if cert.issuer != issuer.subject:
        raise EvidenceError(
            f"{_cn(cert)} names issuer {cert.issuer.rfc4514_string()}, not "
            f"{issuer.subject.rfc4514_string()}"
        )
    _verify_signature(
        issuer, cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_oid,
        cert.signature_hash_algorithm,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@attrs.frozen
class _Chain:
    """What the chain check learnt, for the checks after it."""

    vcek: x509.Certificate | None = None
    extensions: VcekExtensions | None = None
    product: Product | None = None
    root_sha256: str | None = None
    simulated: bool = False


def _chain_to(
    root: x509.Certificate, ask: x509.Certificate, vcek: x509.Certificate
) -> str | None:
    """None when ``root`` -> ``ask`` -> ``vcek`` is signed through, else why not."""
    try:
        verify_issued_by(root, root)
        verify_issued_by(ask, root)
        verify_issued_by(vcek, ask)
    except EvidenceError as exc:
        return exc.message
    return None


def _validity(role: str, cert: x509.Certificate, moment: datetime) -> Mismatch | None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= moment <= end:
        return None
    return Mismatch(f"{role} validity", f"{_when(start)}..{_when(end)}",
                    f"a window containing {_when(moment)}")


def _revocation(
    collateral: SnpCollateral, root: x509.Certificate, ask: x509.Certificate,
    vcek: x509.Certificate, moment: datetime, required: bool,
) -> tuple[list[Mismatch], str]:
    crl = collateral.crl
    if crl is None:
        if required:
            missing = Mismatch("CRL", "none in the collateral", "the product's CRL (require_crl)")
            return [missing], ""
        return [], "revocation not checked (no CRL in the collateral)"
    problems = []
    try:
        if crl.issuer != root.subject:
            raise EvidenceError(f"the CRL is issued by {crl.issuer.rfc4514_string()}")
        _verify_signature(root, crl.signature, crl.tbs_certlist_bytes,
                          crl.signature_algorithm_oid, crl.signature_hash_algorithm)
    except EvidenceError as exc:
        return [Mismatch("CRL signature", exc.message, f"signed by {_cn(root)}")], ""
    next_update = crl.next_update_utc
    if not crl.last_update_utc <= moment or (next_update is not None and moment >= next_update):
        until = "-" if next_update is None else _when(next_update)
        problems.append(Mismatch("CRL validity", f"{_when(crl.last_update_utc)}..{until}",
                                 f"a window containing {_when(moment)}"))
    for role, cert in (("ASK", ask), ("VCEK", vcek)):
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            problems.append(Mismatch(f"{role} serial {cert.serial_number:#x}", "revoked",
                                     "not on the CRL"))
    return problems, f"not revoked (CRL of {_when(crl.last_update_utc)})"


def _check_chain(
    report: SnpReport, collateral: SnpCollateral | None, options: SnpVerifyOptions
) -> tuple[SnpCheck, _Chain]:
    name = "vcek_chain"
    vcek = collateral.vcek_for(report) if collateral is not None else None
    if collateral is None or vcek is None:
        where = ("no collateral" if collateral is None
                 else "no VCEK for this CHIP_ID in the collateral")
        return _failed(name, [Mismatch("VCEK", where, "the chip's VCEK certificate and its ASK "
                                       "(a collateral file, or fetched from AMD's KDS)")]), _Chain()
    try:
        extensions = VcekExtensions.from_certificate(vcek)
    except EvidenceError as exc:
        return _failed(name, [Mismatch("VCEK extensions", exc.message, "AMD's KDS layout")]), \
            _Chain(vcek=vcek)
    product = product_for_name(extensions.product_name)
    if product is None:
        return _failed(name, [Mismatch("VCEK productName", repr(extensions.product_name),
                                       f"one of {', '.join(PRODUCTS)}")]), _Chain(vcek=vcek)
    learnt = _Chain(vcek=vcek, extensions=extensions, product=product)
    problems: list[Mismatch] = []
    fms = report.cpuid_fms
    if fms is not None:
        cpu = product_for_cpuid(fms[0], fms[1])
        if cpu is not product:
            problems.append(Mismatch("CPUID family/model", f"{fms[0]:#x}/{fms[1]:#x} ({cpu})",
                                     f"a {product} CPU (the VCEK's product)"))
    if any(report.chip_id):
        expected_hwid = product.hwid(report.chip_id)
        if extensions.hwid != expected_hwid or (
            product is TURIN and any(report.chip_id[TURIN.hwid_size:])
        ):
            problems.append(Mismatch("VCEK hwID", extensions.hwid.hex(),
                                     f"the report's CHIP_ID {report.chip_id.hex()}"))
        chip = f"hwID {extensions.hwid.hex()[:16]}..."
    else:
        chip = "CHIP_ID masked by the host: hwID not compared"
    ask = collateral.ask
    if ask is None:
        problems.append(Mismatch("ASK", "none in the collateral", f"the {product} ASK"))
        return _failed(name, problems), learnt
    external = options.roots is not None
    candidates = list(options.roots) if options.roots is not None else [amd_ark(product)]
    root, why = None, []
    for candidate in candidates:
        failure = _chain_to(candidate, ask, vcek)
        if failure is None:
            root = candidate
            break
        why.append(f"{_cn(candidate)}: {failure}")
    if root is None:
        anchor = "the given roots" if external else f"AMD's pinned {product} ARK"
        problems.append(Mismatch("chain", "; ".join(why), f"VCEK <- ASK <- {anchor}"))
        return _failed(name, problems), learnt
    root_sha256 = fingerprint(root)
    simulated = root_sha256 != product.ark_sha256
    learnt = attrs.evolve(learnt, root_sha256=root_sha256, simulated=simulated)
    if simulated and not options.allow_simulator:
        problems.append(Mismatch(
            "root", f"{_cn(root)} (sha256 {root_sha256[:16]}...)",
            f"AMD's {product} ARK (sha256 {product.ark_sha256[:16]}...); a test root is "
            "accepted only with allow_simulator",
        ))
    for role, cert in (("ARK", root), ("ASK", ask)):
        if not _is_ca(cert):
            problems.append(Mismatch(f"{role} basicConstraints", "not a CA", "CA:TRUE"))
    moment = datetime.fromtimestamp(options.now, UTC)
    for role, cert in (("ARK", root), ("ASK", ask), ("VCEK", vcek)):
        expired = _validity(role, cert, moment)
        if expired is not None:
            problems.append(expired)
    revoked, revocation = _revocation(collateral, root, ask, vcek, moment, options.require_crl)
    problems += revoked
    if problems:
        return _failed(name, problems), learnt
    anchor = ("a test root, accepted by allow_simulator" if simulated
              else f"AMD's pinned {product} ARK")
    return SnpCheck(
        name=name, status="pass",
        detail=(f"VCEK ({extensions.product_name}, {chip}) <- {_cn(ask)} <- {_cn(root)} "
                f"({anchor}, sha256 {root_sha256[:16]}...), all valid at {_when(moment)}; "
                f"{revocation}"),
    ), learnt


def _check_signature(report: SnpReport, vcek: x509.Certificate | None) -> SnpCheck:
    name = "snp_signature"
    problems = []
    if report.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        problems.append(Mismatch("signature_algo", str(report.signature_algo),
                                 f"{SIGNATURE_ALGO_ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)"))
    if report.signer_info & SIGNER_INFO_RESERVED_MASK:
        problems.append(Mismatch("signer_info", f"{report.signer_info:#x}", "bits 5-31 zero"))
    if report.signing_key != SIGNING_KEY_VCEK:
        signer = _SIGNING_KEYS.get(report.signing_key, "reserved")
        vlek = report.signing_key == SIGNING_KEY_VLEK
        hint = " (VLEK-signed reports are not supported)" if vlek else ""
        problems.append(Mismatch("signer_info.SIGNING_KEY", f"{report.signing_key} ({signer})",
                                 f"{SIGNING_KEY_VCEK} (VCEK){hint}"))
    if report.signer_info & SIGNER_INFO_MASK_CHIP_KEY:
        problems.append(Mismatch("signer_info.MASK_CHIP_KEY", "1", "0 (the chip key signs)"))
    if problems:
        return _failed(name, problems)
    if vcek is None:
        return SnpCheck(name=name, status="skipped",
                        detail="no VCEK to verify the signature with (see vcek_chain)")
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return _failed(name, [Mismatch("VCEK key", type(key).__name__, "ECDSA P-384")])
    try:
        report.verify_signature(key)
    except EvidenceError:
        return _failed(name, [Mismatch(
            "signature", f"not valid under the VCEK (sha256 {fingerprint(vcek)[:16]}...)",
            "ECDSA P-384/SHA-384 over report bytes 0x000-0x29F by the VCEK",
        )])
    return SnpCheck(name=name, status="pass",
                    detail="ECDSA P-384/SHA-384 over report bytes 0x000-0x29F verifies under "
                           f"the VCEK (sha256 {fingerprint(vcek)[:16]}...)")


def _tcb_status(report: SnpReport) -> str:
    reported = report.reported_tcb
    same = report.current_tcb == reported and report.committed_tcb == reported
    return "UpToDate" if same and report.launch_tcb == reported else "OutOfDate"


def _check_tcb(report: SnpReport, chain: _Chain, policy: SnpPolicy) -> SnpCheck:
    name = "snp_tcb"
    if chain.extensions is None or chain.product is None:
        return SnpCheck(name=name, status="skipped",
                        detail="no readable VCEK to compare the TCB with (see vcek_chain)")
    product = chain.product
    reported = TcbVersion(raw=report.reported_tcb, product=product)
    try:
        issued = chain.extensions.tcb(product)
    except EvidenceError as exc:
        return _failed(name, [Mismatch("VCEK TCB", exc.message, "every TCB extension")])
    wanted = issued.parts
    problems = [
        Mismatch(f"reported_tcb.{component}", str(value), f"{wanted[component]} (the VCEK's)")
        for component, value in reported.parts.items()
        if value != wanted[component]
    ]
    problems += tcb_minimum_findings(reported, policy)
    status = _tcb_status(report)
    if problems:
        return _failed(name, problems, f"{product} layout; the TCB is {status}")
    minimum = ("" if policy.minimum_tcb is None
               else f", at least the policy minimum {dict(policy.minimum_tcb)}")
    return SnpCheck(name=name, status="pass",
                    detail=f"reported TCB {reported} is the VCEK's{minimum}; {status}")


def _check_policy(report: SnpReport, policy: SnpPolicy) -> SnpCheck:
    problems, found = policy_findings(report, policy)
    if problems:
        return _failed("snp_policy", problems, found)
    return SnpCheck(name="snp_policy", status="pass", detail=found)


def verify_report(
    report: SnpReport | bytes,
    collateral: SnpCollateral | None,
    options: SnpVerifyOptions,
) -> SnpVerification:
    """Run every check on one report; pure (collateral and time are inputs).

    :param report: the 1184-byte report, or parsed.
    :param collateral: the VCEK and ASK (and optional CRL), or None (then ``vcek_chain``
        fails and the checks needing the VCEK are skipped).
    :param options: the trust anchors, the time and the policy.
    :returns: the result, never None; failed checks are data in it.
    :raises EvidenceError: ``report`` is not a structurally valid SNP report.
    """
    if not isinstance(report, SnpReport):
        report = SnpReport.from_bytes(report)
    chain_check, chain = _check_chain(report, collateral, options)
    checks = (
        chain_check,
        _check_signature(report, chain.vcek),
        _check_tcb(report, chain, options.policy),
        _check_policy(report, options.policy),
    )
    product = chain.product
    return SnpVerification(
        report=report,
        checks=checks,
        product=product,
        reported_tcb=(None if product is None
                      else TcbVersion(raw=report.reported_tcb, product=product)),
        tcb_status=None if product is None else _tcb_status(report),
        root_sha256=chain.root_sha256,
        simulated=chain.simulated,
        vcek=chain.vcek,
    )
