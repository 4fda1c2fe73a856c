"""Tests for dstack_core.mockpki: a deterministic mock Intel DCAP PKI that dcap-qvl accepts."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from dstack_core.mockpki import (
    MOCK_QE_MR_SIGNER,
    QUOTE_CACHE,
    SIMULATOR_USER_DATA,
    MockIntelPki,
    mock_td_report,
)
from dstack_core.quote import (
    INTEL_QE_VENDOR_ID,
    TD_REPORT_OFFSETS,
    TdReport,
    TdxQuote,
)

dcap_qvl = pytest.importorskip("dcap_qvl")

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
NOW = 1767225600  # 2026-01-01T00:00:00Z
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
ROOT_DER_SHA256 = "e2a0579eb5512018575f6abc915f20c1fbe3f6a8768ab561b87c8d6f3855892d"
COLLATERAL_SHA256 = "f8b90345fcac3a65aa77f38cf7fe499a29c1ff09b6e54863c3c8e03e5c684f91"


def _report(**changes: bytes | None) -> TdReport:
    base = mock_td_report(
        mr_td=b"\x11" * 48,
        rtmrs=(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48),
        report_data=b"\x5a" * 64,
    )
    return attrs.evolve(base, **changes)


@pytest.fixture(scope="module")
def pki() -> MockIntelPki:
    return MockIntelPki.from_seed(SEED)


@pytest.fixture(scope="module")
def collateral(pki: MockIntelPki) -> object:
    return pki.collateral()


@pytest.fixture(scope="module")
def verify(pki: MockIntelPki, collateral: object) -> Callable[[bytes], object]:
    def run(quote: bytes) -> object:
        return dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, NOW)

    return run


def _flip(data: bytes, offset: int) -> bytes:
    buffer = bytearray(data)
    buffer[offset] ^= 0x01
    return bytes(buffer)


class TestDeterminism:
    def test_same_seed_same_bytes(self, pki: MockIntelPki) -> None:
        """Two instances from one seed agree byte for byte on root, chain and collateral."""
        again = MockIntelPki.from_seed(SEED)
        assert again.root_ca_der == pki.root_ca_der
        assert again.root_ca_pem == pki.root_ca_pem
        assert again.pck_chain_pem == pki.pck_chain_pem
        assert again.collateral_json() == pki.collateral_json()

    def test_known_answer(self, pki: MockIntelPki) -> None:
        """Root DER and collateral JSON for a fixed seed are pinned across processes/releases."""
        assert hashlib.sha256(pki.root_ca_der).hexdigest() == ROOT_DER_SHA256
        assert hashlib.sha256(pki.collateral_json().encode()).hexdigest() == COLLATERAL_SHA256

    def test_other_seed_other_root(self, pki: MockIntelPki) -> None:
        """A different seed gives a different root and different collateral."""
        other = MockIntelPki.from_seed(OTHER_SEED)
        assert other.root_ca_der != pki.root_ca_der
        assert other.collateral_json() != pki.collateral_json()

    @pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33)])
    def test_seed_must_be_32_bytes(self, seed: bytes) -> None:
        """Seeds of any length but 32 are refused."""
        with pytest.raises(ValueError, match="32 bytes"):
            MockIntelPki.from_seed(seed)


class TestCertificatesAndCollateral:
    def test_collateral_json_is_dcap_qvl_form(self, pki: MockIntelPki) -> None:
        """collateral_json() is exactly what QuoteCollateralV3.to_json() writes."""
        text = pki.collateral_json()
        assert dcap_qvl.QuoteCollateralV3.from_json(text).to_json() == text

    def test_every_subject_says_mock(self, pki: MockIntelPki) -> None:
        """Every certificate in chain and collateral names itself a mock, valid 2020..2100."""
        collateral = json.loads(pki.collateral_json())
        pems = (
            pki.pck_chain_pem
            + collateral["tcb_info_issuer_chain"].encode()
            + collateral["qe_identity_issuer_chain"].encode()
        )
        certs = x509.load_pem_x509_certificates(pems)
        assert len(certs) == 7
        for cert in certs:
            assert "Mock" in cert.subject.rfc4514_string()
            assert cert.not_valid_before_utc.year == 2020
            assert cert.not_valid_after_utc.year == 2100

    def test_chain_order_and_sgx_extension(self, pki: MockIntelPki) -> None:
        """The chain is leaf, platform CA, root; only the leaf carries the SGX extension."""
        leaf, platform, root = x509.load_pem_x509_certificates(pki.pck_chain_pem)
        assert leaf.issuer == platform.subject and platform.issuer == root.subject
        assert root.issuer == root.subject
        assert leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).critical is False
        for ca in (platform, root):
            with pytest.raises(x509.ExtensionNotFound):
                ca.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
        leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
        extension = dcap_qvl.parse_pck_extension_from_pem(leaf_pem)
        assert (extension.fmspc, extension.pce_id, extension.pce_svn) == (bytes(6), bytes(2), 0)
        assert extension.cpu_svn == bytes(16) and extension.sgx_type == 0

    def test_crls_have_numbers_and_long_validity(self, pki: MockIntelPki) -> None:
        """Both CRLs carry a CRL number, are signed by their issuer and last until 2099."""
        collateral = json.loads(pki.collateral_json())
        _, platform, root = x509.load_pem_x509_certificates(pki.pck_chain_pem)
        for field, issuer in (("root_ca_crl", root), ("pck_crl", platform)):
            crl = x509.load_der_x509_crl(bytes.fromhex(collateral[field]))
            assert crl.issuer == issuer.subject
            assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1
            assert crl.next_update_utc == datetime.datetime(2099, 12, 31, tzinfo=datetime.UTC)

    def test_collateral_dates(self, pki: MockIntelPki) -> None:
        """TCB info and QE identity are issued 2020-01-01 and valid to 2099-12-31."""
        collateral = json.loads(pki.collateral_json())
        for field in ("tcb_info", "qe_identity"):
            document = json.loads(collateral[field])
            assert document["issueDate"] == "2020-01-01T00:00:00Z"
            assert document["nextUpdate"] == "2099-12-31T00:00:00Z"


class TestSignQuote:
    def test_header_and_qe_report(self, pki: MockIntelPki) -> None:
        """Quotes carry the Intel vendor id, the caller's user_data and the mock QE identity."""
        quote = TdxQuote.from_bytes(pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA))
        assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
        assert quote.header.user_data == b"DSTACK-SIMULATOR\0\0\0\0"
        qe = quote.signature_data.qe_report
        assert (qe.mr_signer, qe.isv_prod_id, qe.isv_svn) == (MOCK_QE_MR_SIGNER, 1, 1)
        assert quote.signature_data.pck_cert_chain_data == pki.pck_chain_pem + b"\0"

    def test_signatures_verify_with_cryptography(self, pki: MockIntelPki) -> None:
        """The quote signature verifies under the attestation key, the QE report under the PCK."""
        quote = TdxQuote.from_bytes(pki.sign_quote(_report(), user_data=bytes(20)))
        data = quote.signature_data
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + data.attestation_key
        )
        key.verify(_der_signature(data.signature), quote.signed_region, ec.ECDSA(hashes.SHA256()))
        leaf = x509.load_pem_x509_certificates(pki.pck_chain_pem)[0]
        leaf.public_key().verify(  # type: ignore[call-arg, union-attr]
            _der_signature(data.qe_report_signature),
            data.qe_report_body,
            ec.ECDSA(hashes.SHA256()),  # type: ignore[arg-type]
        )

    def test_one_attestation_key_per_instance(self, pki: MockIntelPki) -> None:
        """Like a QE, an instance signs every quote with its one attestation key; another
        instance from the same seed has its own key."""
        first, second = (
            TdxQuote.from_bytes(pki.sign_quote(_report(), user_data=bytes(20))) for _ in range(2)
        )
        assert first.signature_data.attestation_key == second.signature_data.attestation_key
        assert first.signature_data.signature != second.signature_data.signature
        other = MockIntelPki.from_seed(SEED)
        third = TdxQuote.from_bytes(other.sign_quote(_report(), user_data=bytes(20)))
        assert third.signature_data.attestation_key != first.signature_data.attestation_key

    def test_v5_keeps_caller_td15_fields(self, pki: MockIntelPki) -> None:
        """A TD 1.5 report given for v5 is signed as is."""
        report = _report(tee_tcb_svn2=b"\x01" * 16, mr_service_td=b"\x02" * 48)
        quote = TdxQuote.from_bytes(pki.sign_quote(report, user_data=bytes(20), version=5))
        assert quote.report == report

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"user_data": bytes(20), "version": 3}, "version"),
            ({"user_data": bytes(19)}, "user_data"),
        ],
    )
    def test_bad_arguments(
        self, pki: MockIntelPki, kwargs: dict[str, object], message: str
    ) -> None:
        """A version other than 4/5 or user_data of the wrong size is a ValueError."""
        with pytest.raises(ValueError, match=message):
            pki.sign_quote(_report(), **kwargs)  # type: ignore[arg-type]

    def test_v4_refuses_td15_report(self, pki: MockIntelPki) -> None:
        """A TD 1.5 report cannot be signed as a v4 quote."""
        report = _report(tee_tcb_svn2=bytes(16), mr_service_td=bytes(48))
        with pytest.raises(ValueError):
            pki.sign_quote(report, user_data=bytes(20), version=4)


class TestQuoteSigner:
    @pytest.mark.parametrize("version", [4, 5])
    def test_same_quote_as_sign_quote_but_the_signature(
        self, pki: MockIntelPki, verify: Callable[[bytes], object], version: int
    ) -> None:
        """A template signer fills in registers and report data: the signed region equals
        sign_quote's over the same report, and the quote verifies with dcap-qvl."""
        template = _report(rtmr0=bytes(48), rtmr3=bytes(48), report_data=bytes(64))
        signer = pki.quote_signer(template, user_data=bytes(20), version=version)
        wanted = _report()
        quote = signer.sign(rtmrs=wanted.rtmrs, report_data=wanted.report_data)
        reference = pki.sign_quote(wanted, user_data=bytes(20), version=version)
        parsed, expected = TdxQuote.from_bytes(quote), TdxQuote.from_bytes(reference)
        assert parsed.signed_region == expected.signed_region
        assert len(quote) == len(reference)
        assert verify(quote).status == "UpToDate"  # type: ignore[attr-defined]

    def test_cache_is_keyed_on_registers_and_report_data(
        self, pki: MockIntelPki, verify: Callable[[bytes], object]
    ) -> None:
        """A repeated request gets the kept quote; a change of any register or of the report
        data gets a new one over exactly those values; the cache stays bounded."""
        signer = pki.quote_signer(_report(), user_data=bytes(20))
        rtmrs, data = [bytes([i]) * 48 for i in range(4)], b"\x07" * 64
        first = signer.sign(rtmrs=rtmrs, report_data=data)
        assert signer.sign(rtmrs=rtmrs, report_data=data) is first
        for index in range(4):
            changed = list(rtmrs)
            changed[index] = b"\xee" * 48
            quote = TdxQuote.from_bytes(signer.sign(rtmrs=changed, report_data=data))
            assert quote.report.rtmrs == tuple(changed) and quote.report.report_data == data
            assert verify(quote.raw).status == "UpToDate"  # type: ignore[attr-defined]
        other = TdxQuote.from_bytes(signer.sign(rtmrs=rtmrs, report_data=b"\x08" * 64))
        assert other.report.report_data == b"\x08" * 64
        for n in range(QUOTE_CACHE + 10):
            signer.sign(rtmrs=rtmrs, report_data=n.to_bytes(64, "big"))
        assert len(signer._cache) == QUOTE_CACHE

    @pytest.mark.parametrize(
        ("rtmrs", "report_data"),
        [((bytes(48),) * 3, bytes(64)), ((bytes(48),) * 4, bytes(63)), ((bytes(47),) * 4, bytes(64))],
    )
    def test_refuses_wrong_lengths(self, pki: MockIntelPki, rtmrs, report_data) -> None:
        """Four 48-byte registers and 64 bytes of report data, nothing else."""
        signer = pki.quote_signer(_report(), user_data=bytes(20))
        with pytest.raises(ValueError):
            signer.sign(rtmrs=rtmrs, report_data=report_data)


class TestVerification:
    @pytest.mark.parametrize("version", [4, 5])
    def test_up_to_date(
        self, pki: MockIntelPki, verify: Callable[[bytes], object], version: int
    ) -> None:
        """v4 and v5 mock quotes verify UpToDate under the mock root."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA, version=version)
        report = verify(quote)
        assert report.status == "UpToDate"  # type: ignore[attr-defined]
        assert report.advisory_ids == []  # type: ignore[attr-defined]

    def test_instance_from_same_seed_publishes_same_trust(self) -> None:
        """Root and collateral from a second instance verify quotes of the first."""
        signer = MockIntelPki.from_seed(SEED)
        publisher = MockIntelPki.from_seed(SEED)
        quote = signer.sign_quote(_report(), user_data=SIMULATOR_USER_DATA)
        result = dcap_qvl.verify_with_root_ca(
            quote, publisher.collateral(), publisher.root_ca_der, NOW
        )
        assert result.status == "UpToDate"

    def test_other_seed_root_rejects(self, pki: MockIntelPki) -> None:
        """A different mock PKI's root and collateral do not verify this PKI's quotes."""
        other = MockIntelPki.from_seed(OTHER_SEED)
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA)
        with pytest.raises(ValueError):
            dcap_qvl.verify_with_root_ca(quote, other.collateral(), other.root_ca_der, NOW)
        with pytest.raises(ValueError):
            dcap_qvl.verify_with_root_ca(quote, pki.collateral(), other.root_ca_der, NOW)

    def test_intel_root_rejects(self, pki: MockIntelPki, collateral: object) -> None:
        """dcap_qvl.verify (Intel's production root) never accepts a mock quote."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA)
        with pytest.raises(ValueError):
            dcap_qvl.verify(quote, collateral, NOW)

    @pytest.mark.parametrize(
        "offset",
        [
            8,  # header: qe_svn
            40,  # header: user_data
            48 + TD_REPORT_OFFSETS["report_data"],
            48 + TD_REPORT_OFFSETS["report_data"] + 63,
            48 + TD_REPORT_OFFSETS["rtmr3"],
            48 + TD_REPORT_OFFSETS["mr_td"] + 5,
        ],
        ids=["qe_svn", "user_data", "report_data[0]", "report_data[63]", "rtmr3", "mr_td"],
    )
    def test_flipped_v4_byte_fails(
        self, pki: MockIntelPki, verify: Callable[[bytes], object], offset: int
    ) -> None:
        """Flipping any signed byte of a v4 quote makes verification fail."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA)
        with pytest.raises(ValueError):
            verify(_flip(quote, offset))

    @pytest.mark.parametrize("field", ["report_data", "rtmr0", "mr_service_td"])
    def test_flipped_v5_byte_fails(
        self, pki: MockIntelPki, verify: Callable[[bytes], object], field: str
    ) -> None:
        """Flipping a body byte of a v5 quote (body at 54) makes verification fail."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA, version=5)
        with pytest.raises(ValueError):
            verify(_flip(quote, 54 + TD_REPORT_OFFSETS[field]))

    def test_debug_td_fails(self, pki: MockIntelPki, verify: Callable[[bytes], object]) -> None:
        """A correctly signed quote of a debug TD is rejected."""
        report = _report(td_attributes=bytes.fromhex("0100001000000000"))
        assert report.is_debug
        with pytest.raises(ValueError, match=r"(?i)debug"):
            verify(pki.sign_quote(report, user_data=SIMULATOR_USER_DATA))

    def test_collateral_window(self, pki: MockIntelPki, collateral: object) -> None:
        """Verification times before 2020 or after 2099-12-31 fail; inside, it passes."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA)
        late = int(datetime.datetime(2100, 6, 1, tzinfo=datetime.UTC).timestamp())
        early = int(datetime.datetime(2019, 6, 1, tzinfo=datetime.UTC).timestamp())
        for now in (early, late):
            with pytest.raises(ValueError):
                dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, now)
        edge = int(datetime.datetime(2099, 12, 30, tzinfo=datetime.UTC).timestamp())
        result = dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, edge)
        assert result.status == "UpToDate"

    def test_rtmrs_are_not_checked_by_dcap_qvl(
        self, pki: MockIntelPki, verify: Callable[[bytes], object]
    ) -> None:
        """Arbitrary signed RTMR and report_data values still verify (checks are ours)."""
        report = _report(rtmr3=b"\xee" * 48, report_data=b"\xff" * 64, mr_td=b"\x99" * 48)
        result = verify(pki.sign_quote(report, user_data=bytes(20)))
        assert result.status == "UpToDate"  # type: ignore[attr-defined]


def _der_signature(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
