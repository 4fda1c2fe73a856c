"""A deterministic mock Intel DCAP PKI that signs structurally valid TDX quotes.

The simulator platform (and fake TDX kernels in tests) use it to hand out quotes that a real
quote verification library accepts -- but only when the verifier is explicitly given this
PKI's root: ``dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, now)`` answers
``UpToDate`` for any ``now`` in 2020..2099, while ``dcap_qvl.verify`` (Intel's production
root) rejects every such quote. Every certificate subject says "Mock", so nobody mistakes the
PKI for Intel's.

Determinism is the contract that makes trust bundles work: :meth:`MockIntelPki.from_seed` with
the same 32-byte seed yields byte-identical root certificate, certificate chain, CRLs and
collateral JSON in any process. Keys are derived from the seed with HKDF-SHA256 under distinct
labels; certificates, CRLs and collateral are signed with deterministic ECDSA (RFC 6979) over
fixed validity dates. Only the quoting enclave's parts are random: like a real QE, a PKI
instance generates its attestation key (and signs its QE report) once, when it is made,
and then signs every quote with it.

The PKI's layout (names, extensions, collateral fields) is what dcap-qvl 0.7 checks; see
``formats.md`` sections 6 and 9 in the project notes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from dstack_core.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    ECDSA_P256_SIGNATURE_SIZE,
    INTEL_QE_VENDOR_ID,
    SIG_DATA_LEN,
    TD_REPORT_OFFSETS,
    TEE_TYPE_TDX,
    V4_BODY_OFFSET,
    V5_BODY_OFFSET,
    QeReport,
    QuoteHeader,
    QuoteSignatureData,
    TdReport,
    encode_signed_region,
)

if TYPE_CHECKING:
    import dcap_qvl  # type: ignore[import-untyped]

__all__ = [
    "MOCK_XFAM",
    "mock_td_report",
    "COLLATERAL_ISSUE_DATE",
    "COLLATERAL_NEXT_UPDATE",
    "MOCK_QE_AUTH_DATA",
    "MOCK_QE_ISV_PROD_ID",
    "MOCK_QE_ISV_SVN",
    "MOCK_QE_MR_SIGNER",
    "MOCK_TD_ATTRIBUTES",
    "SEED_SIZE",
    "SIMULATOR_USER_DATA",
    "MockIntelPki",
    "QUOTE_CACHE",
    "QuoteSigner",
]

SEED_SIZE = 32

SIMULATOR_USER_DATA = b"DSTACK-SIMULATOR" + bytes(4)
"""The 20-byte header user_data of simulator quotes: signed, but not checked by dcap-qvl,
so tooling can flag a simulator quote without any cryptography."""

MOCK_TD_ATTRIBUTES = bytes.fromhex("0000001000000000")
"""td_attributes with SEPT_VE_DISABLE (bit 28) set and DEBUG clear; dcap-qvl requires this."""

MOCK_XFAM = bytes.fromhex("e702060000000000")
"""An XFAM value as real TDs report it (x87, SSE, AVX, AVX-512 state, PKRU...)."""

REGISTER_SIZE = 48


def mock_td_report(
    *,
    mr_td: bytes,
    rtmrs: Sequence[bytes],
    report_data: bytes,
    mr_config_id: bytes = bytes(REGISTER_SIZE),
    mr_owner: bytes = bytes(REGISTER_SIZE),
    mr_owner_config: bytes = bytes(REGISTER_SIZE),
) -> TdReport:
    """A TD 1.0 report whose TCB fields match the mock collateral: zero SVNs and SEAM
    measurements, SEPT_VE_DISABLE set, not a debug TD. :meth:`MockIntelPki.sign_quote`
    widens it to TD 1.5 for v5 quotes.

    :param rtmrs: RTMR0..3, 48 bytes each.
    """
    rtmr0, rtmr1, rtmr2, rtmr3 = rtmrs
    return TdReport(
        tee_tcb_svn=bytes(16),
        mr_seam=bytes(REGISTER_SIZE),
        mr_signer_seam=bytes(REGISTER_SIZE),
        seam_attributes=bytes(8),
        td_attributes=MOCK_TD_ATTRIBUTES,
        xfam=MOCK_XFAM,
        mr_td=mr_td,
        mr_config_id=mr_config_id,
        mr_owner=mr_owner,
        mr_owner_config=mr_owner_config,
        rtmr0=rtmr0,
        rtmr1=rtmr1,
        rtmr2=rtmr2,
        rtmr3=rtmr3,
        report_data=report_data,
    )


MOCK_QE_MR_SIGNER = b"\x44" * 32
MOCK_QE_ISV_PROD_ID = 1
MOCK_QE_ISV_SVN = 1
MOCK_QE_AUTH_DATA = bytes(32)

COLLATERAL_ISSUE_DATE = "2020-01-01T00:00:00Z"
COLLATERAL_NEXT_UPDATE = "2099-12-31T00:00:00Z"

_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
_CRL_NEXT_UPDATE = datetime.datetime(2099, 12, 31, tzinfo=datetime.UTC)

_HKDF_SALT = b"dstack-core mock intel pki v1"
_CURVE = ec.SECP256R1()
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_DETERMINISTIC_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_RANDOM_ECDSA = ec.ECDSA(hashes.SHA256())

_ORGANIZATION = "dstack-core Mock PKI (not Intel)"
_ROOT_CN = "dstack-core Mock Intel SGX Root CA"
_PLATFORM_CA_CN = "dstack-core Mock Intel SGX PCK Platform CA"
_PCK_CN = "dstack-core Mock Intel SGX PCK Certificate"
_TCB_SIGNER_CN = "dstack-core Mock Intel SGX TCB Signing"
_QE_IDENTITY_SIGNER_CN = "dstack-core Mock Intel SGX QE Identity Signing"

_SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_FMSPC = bytes(6)
_PCE_ID = bytes(2)
_PCE_SVN = 0
_CPU_SVN = bytes(16)
_PPID = bytes(16)
_SGX_TYPE_STANDARD = 0
_TCB_COMPONENT_COUNT = 16


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(encoded))) + encoded + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_int(value: int, tag: int = 0x02) -> bytes:
    return _der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _der_octets(value: bytes) -> bytes:
    return _der(0x04, value)


def _der_seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _sgx_extension_value() -> bytes:
    """The PCK leaf's Intel SGX extension: (OID, value) pairs, every SVN zero."""
    arc = _SGX_EXTENSION_OID
    tcb = [_der_seq(_der_oid(f"{arc}.2.{i}"), _der_int(0)) for i in range(1, 17)]
    tcb.append(_der_seq(_der_oid(f"{arc}.2.17"), _der_int(_PCE_SVN)))
    tcb.append(_der_seq(_der_oid(f"{arc}.2.18"), _der_octets(_CPU_SVN)))
    return _der_seq(
        _der_seq(_der_oid(f"{arc}.1"), _der_octets(_PPID)),
        _der_seq(_der_oid(f"{arc}.2"), _der_seq(*tcb)),
        _der_seq(_der_oid(f"{arc}.3"), _der_octets(_PCE_ID)),
        _der_seq(_der_oid(f"{arc}.4"), _der_octets(_FMSPC)),
        _der_seq(_der_oid(f"{arc}.5"), _der_int(_SGX_TYPE_STANDARD, tag=0x0A)),
    )


def _hkdf(seed: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=label).derive(seed)


def _derive_key(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    for counter in range(256):
        candidate = int.from_bytes(_hkdf(seed, f"key:{label}:{counter}".encode()), "big")
        if 0 < candidate < _P256_ORDER:
            return ec.derive_private_key(candidate, _CURVE)
    raise AssertionError("unreachable: 256 HKDF outputs all outside the P-256 order")


def _derive_serial(seed: bytes, label: str) -> int:
    return int.from_bytes(_hkdf(seed, f"serial:{label}".encode())[:16], "big") >> 1 | 1


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _raw_signature(der_signature: bytes) -> bytes:
    r, s = decode_dss_signature(der_signature)
    half = ECDSA_P256_SIGNATURE_SIZE // 2
    return r.to_bytes(half, "big") + s.to_bytes(half, "big")


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    seed: bytes,
    label: str,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    path_length: int | None = None,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(_derive_serial(seed, label))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)


def _crl(*, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, number: int) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(_NOT_BEFORE)
        .next_update(_CRL_NEXT_UPDATE)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return crl.public_bytes(serialization.Encoding.DER)


def _sign_json(document: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> tuple[str, bytes]:
    text = json.dumps(document, separators=(",", ":"))
    return text, _raw_signature(key.sign(text.encode(), _DETERMINISTIC_ECDSA))


def _tcb_info() -> dict[str, Any]:
    zero_components = [{"svn": 0} for _ in range(_TCB_COMPONENT_COUNT)]
    return {
        "id": "TDX",
        "version": 3,
        "issueDate": COLLATERAL_ISSUE_DATE,
        "nextUpdate": COLLATERAL_NEXT_UPDATE,
        "fmspc": _FMSPC.hex().upper(),
        "pceId": _PCE_ID.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": 1,
        "tdxModule": {
            "mrsigner": bytes(48).hex().upper(),
            "attributes": bytes(8).hex().upper(),
            "attributesMask": bytes(8).hex().upper(),
        },
        "tcbLevels": [
            {
                "tcb": {
                    "sgxtcbcomponents": zero_components,
                    "pcesvn": _PCE_SVN,
                    "tdxtcbcomponents": zero_components,
                },
                "tcbDate": COLLATERAL_ISSUE_DATE,
                "tcbStatus": "UpToDate",
            }
        ],
    }


def _qe_identity() -> dict[str, Any]:
    return {
        "id": "TD_QE",
        "version": 2,
        "issueDate": COLLATERAL_ISSUE_DATE,
        "nextUpdate": COLLATERAL_NEXT_UPDATE,
        "tcbEvaluationDataNumber": 1,
        "miscselect": "00000000",
        "miscselectMask": "00000000",
        "attributes": bytes(16).hex().upper(),
        "attributesMask": bytes(16).hex().upper(),
        "mrsigner": MOCK_QE_MR_SIGNER.hex().upper(),
        "isvprodid": MOCK_QE_ISV_PROD_ID,
        "tcbLevels": [
            {
                "tcb": {"isvsvn": MOCK_QE_ISV_SVN},
                "tcbDate": COLLATERAL_ISSUE_DATE,
                "tcbStatus": "UpToDate",
            }
        ],
    }


@attrs.frozen(kw_only=True, eq=False)
class MockIntelPki:
    """A seeded mock of Intel's DCAP PKI: root CA, PCK chain, collateral, and a quote signer.

    Build it with :meth:`from_seed`; everything except the attestation key (one per instance,
    as a QE has one) and :meth:`sign_quote`'s signatures is a pure function of the seed.
    Certificates, collateral and the QE report are computed once, so signing a quote costs
    one ECDSA signature.
    """

    root_ca_der: bytes = attrs.field(repr=False)
    """The self-signed root certificate, DER: the trust anchor verifiers must be given."""
    root_ca_pem: bytes = attrs.field(repr=False)
    """The same root certificate, PEM."""
    pck_chain_pem: bytes = attrs.field(repr=False)
    """PCK leaf, platform CA and root, PEM, leaf first (as carried in quotes, minus the NUL)."""
    _pck_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, alias="pck_key")
    _collateral_json: str = attrs.field(repr=False, alias="collateral_json")
    _attestation_key: ec.EllipticCurvePrivateKey = attrs.field(
        repr=False, init=False, factory=lambda: ec.generate_private_key(_CURVE)
    )
    _qe: tuple[bytes, bytes, bytes] = attrs.field(repr=False, init=False)
    """attestation public key (raw), QE report body, its PCK signature (raw)."""

    @_qe.default
    def _sign_qe_report(self) -> tuple[bytes, bytes, bytes]:
        attestation_public = _raw_public_key(self._attestation_key)
        qe_report = QeReport(
            cpu_svn=bytes(16),
            misc_select=0,
            attributes=bytes(16),
            mr_enclave=bytes(32),
            mr_signer=MOCK_QE_MR_SIGNER,
            isv_prod_id=MOCK_QE_ISV_PROD_ID,
            isv_svn=MOCK_QE_ISV_SVN,
            report_data=hashlib.sha256(attestation_public + MOCK_QE_AUTH_DATA).digest() + bytes(32),
        ).to_bytes()
        signature = _raw_signature(self._pck_key.sign(qe_report, _RANDOM_ECDSA))
        return attestation_public, qe_report, signature

    _signature_tail: bytes = attrs.field(repr=False, init=False)
    """The signature data after the quote signature: the same in every quote."""

    @_signature_tail.default
    def _encode_signature_tail(self) -> bytes:
        attestation_public, qe_report, qe_report_signature = self._qe
        data = QuoteSignatureData(
            signature=bytes(ECDSA_P256_SIGNATURE_SIZE),
            attestation_key=attestation_public,
            qe_report_body=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=MOCK_QE_AUTH_DATA,
            pck_cert_chain_data=self.pck_chain_pem + b"\0",
        )
        return data.to_bytes()[ECDSA_P256_SIGNATURE_SIZE:]

    @classmethod
    def from_seed(cls, seed: bytes) -> MockIntelPki:
        """Derive the whole PKI from a 32-byte seed, byte-identically in every process.

        :param seed: exactly :data:`SEED_SIZE` (32) bytes; keep it secret only if the mock
            root is trusted somewhere that matters (it never should be).
        :raises ValueError: if the seed is not 32 bytes.
        """
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise ValueError(f"mock PKI seed must be {SEED_SIZE} bytes")
        root_key = _derive_key(seed, "root-ca")
        platform_key = _derive_key(seed, "pck-platform-ca")
        pck_key = _derive_key(seed, "pck-leaf")
        tcb_key = _derive_key(seed, "tcb-signing")
        qe_id_key = _derive_key(seed, "qe-identity-signing")

        root_name = _name(_ROOT_CN)
        platform_name = _name(_PLATFORM_CA_CN)
        root = _issue(
            seed, "root-ca", root_name, root_key, root_name, root_key, is_ca=True, path_length=1
        )
        platform = _issue(
            seed,
            "pck-platform-ca",
            platform_name,
            platform_key,
            root_name,
            root_key,
            is_ca=True,
            path_length=0,
        )
        sgx_extension = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(_SGX_EXTENSION_OID), _sgx_extension_value()
        )
        pck = _issue(
            seed,
            "pck-leaf",
            _name(_PCK_CN),
            pck_key,
            platform_name,
            platform_key,
            extra=(sgx_extension,),
        )
        tcb_signer = _issue(
            seed, "tcb-signing", _name(_TCB_SIGNER_CN), tcb_key, root_name, root_key
        )
        qe_id_signer = _issue(
            seed,
            "qe-identity-signing",
            _name(_QE_IDENTITY_SIGNER_CN),
            qe_id_key,
            root_name,
            root_key,
        )

        root_pem = _pem(root)
        tcb_info, tcb_info_signature = _sign_json(_tcb_info(), tcb_key)
        qe_identity, qe_identity_signature = _sign_json(_qe_identity(), qe_id_key)
        collateral = {
            "pck_crl_issuer_chain": (_pem(platform) + root_pem).decode(),
            "root_ca_crl": _crl(issuer=root_name, issuer_key=root_key, number=1).hex(),
            "pck_crl": _crl(issuer=platform_name, issuer_key=platform_key, number=1).hex(),
            "tcb_info_issuer_chain": (_pem(tcb_signer) + root_pem).decode(),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_info_signature.hex(),
            "qe_identity_issuer_chain": (_pem(qe_id_signer) + root_pem).decode(),
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_identity_signature.hex(),
        }
        return cls(
            root_ca_der=root.public_bytes(serialization.Encoding.DER),
            root_ca_pem=root_pem,
            pck_chain_pem=_pem(pck) + _pem(platform) + root_pem,
            pck_key=pck_key,
            collateral_json=json.dumps(collateral, indent=2),
        )

    def collateral_json(self) -> str:
        """The quote collateral in the JSON form of ``dcap_qvl.QuoteCollateralV3.to_json()``.

        Valid for verification times from 2020-01-01 to 2099-12-31 (UTC).
        """
        return self._collateral_json

    def collateral(self) -> dcap_qvl.QuoteCollateralV3:
        """The collateral as a dcap-qvl object; needs the optional ``dcap-qvl`` package."""
        import dcap_qvl

        return dcap_qvl.QuoteCollateralV3.from_json(self._collateral_json)

    def sign_quote(self, report: TdReport, *, user_data: bytes, version: int = 4) -> bytes:
        """Produce a TDX quote over ``report``, signed through this PKI.

        The caller owns every TD report field; for dcap-qvl to answer ``UpToDate`` the report
        needs td_attributes :data:`MOCK_TD_ATTRIBUTES` (debug clear, SEPT_VE_DISABLE set) and
        zero tee_tcb_svn, mr_signer_seam (and mr_service_td). The instance's attestation key
        signs it.

        :param report: a TD 1.0 report for version 4; for version 5 a TD 1.0 report is
            extended to TD 1.5 with zero tee_tcb_svn2 and mr_service_td (body type 3).
        :param user_data: the 20-byte header user data, e.g. :data:`SIMULATOR_USER_DATA`.
        :param version: quote version, 4 or 5.
        :returns: the quote bytes (no trailing padding), never None.
        :raises ValueError: for another version, a TD 1.5 report with version 4, or
            user_data that is not 20 bytes.
        """
        return self._sign_region(_signed_region(report, user_data=user_data, version=version))

    def quote_signer(self, report: TdReport, *, user_data: bytes, version: int = 4) -> QuoteSigner:
        """A signer of quotes that differ from ``report``'s only in RTMR0-3 and report data:
        everything else is encoded once (see :meth:`sign_quote` for the arguments)."""
        region = _signed_region(report, user_data=user_data, version=version)
        body = V4_BODY_OFFSET if version == 4 else V5_BODY_OFFSET
        return QuoteSigner(pki=self, region=region, body=body)

    def _sign_region(self, signed_region: bytes) -> bytes:
        signature = _raw_signature(self._attestation_key.sign(signed_region, _RANDOM_ECDSA))
        tail = self._signature_tail
        return signed_region + SIG_DATA_LEN.pack(len(signature) + len(tail)) + signature + tail


QUOTE_CACHE: Final = 64
"""Quotes a :class:`QuoteSigner` keeps (about 5 KiB each)."""
_RTMRS_AT: Final = TD_REPORT_OFFSETS["rtmr0"]
_RTMRS_SIZE: Final = 4 * REGISTER_SIZE
_REPORT_DATA_AT: Final = TD_REPORT_OFFSETS["report_data"]
assert TD_REPORT_OFFSETS["rtmr3"] == _RTMRS_AT + 3 * REGISTER_SIZE


@attrs.frozen(kw_only=True)
class QuoteSigner:
    """Quotes over one encoded TD report with RTMR0-3 and report data filled in per quote
    (:meth:`MockIntelPki.quote_signer`): one ECDSA signature and a few copies each.

    A quote is a signature over its signed region and nothing else, so one signed for the
    same registers and report data is as good as a new one: the last :data:`QUOTE_CACHE`
    quotes are kept, keyed on their whole signed region, and handed out again instead of
    being signed twice. Thread-safe.
    """

    pki: MockIntelPki = attrs.field(repr=False)
    region: bytes = attrs.field(repr=False)
    body: int
    _cache: OrderedDict[bytes, bytes] = attrs.field(init=False, factory=OrderedDict, repr=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False)

    def sign(self, *, rtmrs: Sequence[bytes], report_data: bytes) -> bytes:
        """A quote with these registers and report data.

        :raises ValueError: not four 48-byte registers and 64 bytes of report data.
        """
        registers = b"".join(rtmrs)
        if len(rtmrs) != 4 or len(registers) != _RTMRS_SIZE or len(report_data) != 64:
            raise ValueError("a quote takes four 48-byte RTMRs and 64 bytes of report data")
        buffer = bytearray(self.region)
        buffer[self.body + _RTMRS_AT : self.body + _RTMRS_AT + _RTMRS_SIZE] = registers
        buffer[self.body + _REPORT_DATA_AT : self.body + _REPORT_DATA_AT + 64] = report_data
        region = bytes(buffer)
        with self._lock:
            quote = self._cache.get(region)
            if quote is not None:
                self._cache.move_to_end(region)
                return quote
        quote = self.pki._sign_region(region)
        with self._lock:
            self._cache[region] = quote
            if len(self._cache) > QUOTE_CACHE:
                self._cache.popitem(last=False)
        return quote


def _signed_region(report: TdReport, *, user_data: bytes, version: int) -> bytes:
    if version not in (4, 5):
        raise ValueError(f"quote version must be 4 or 5, got {version}")
    if version == 5 and not report.is_td15:
        report = attrs.evolve(report, tee_tcb_svn2=bytes(16), mr_service_td=bytes(48))
    header = QuoteHeader(
        version=version,
        att_key_type=ATT_KEY_TYPE_ECDSA_P256,
        tee_type=TEE_TYPE_TDX,
        qe_svn=0,
        pce_svn=0,
        qe_vendor_id=INTEL_QE_VENDOR_ID,
        user_data=user_data,
    )
    return encode_signed_region(header, report)
