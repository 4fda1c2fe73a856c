"""Tests for dstack_core.quote: TDX quote v4/v5 layouts and the strict parser."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack_core.errors import EvidenceError
from dstack_core.mockpki import (
    SIMULATOR_USER_DATA,
    MockIntelPki,
    mock_td_report,
)
from dstack_core.quote import (
    BODY_DESCRIPTOR,
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    HEADER,
    HEADER_SIZE,
    INTEL_QE_VENDOR_ID,
    MAX_QUOTE_SIZE,
    SIG_DATA_LEN,
    TD_REPORT10_SIZE,
    TD_REPORT15_SIZE,
    TD_REPORT_OFFSETS,
    TEE_TYPE_TDX,
    V4_REPORT_DATA_OFFSET,
    V5_REPORT_DATA_OFFSET,
    QeReport,
    QuoteHeader,
    QuoteSignatureData,
    TdReport,
    TdxQuote,
    assemble_quote,
    encode_signed_region,
    is_tdx_quote,
)

REAL_QUOTE = (Path(__file__).parent / "data" / "tdx_quote_v4.bin").read_bytes()
REAL_QUOTE_LENGTH = 4936
V4_SIG_LEN_OFFSET = 632
V5_SIG_LEN_OFFSET = 702


def _report(**changes: bytes | None) -> TdReport:
    base = mock_td_report(
        mr_td=b"\x11" * 48,
        rtmrs=(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48),
        report_data=bytes(range(64)),
    )
    return attrs.evolve(base, **changes)


@pytest.fixture(scope="module")
def pki() -> MockIntelPki:
    return MockIntelPki.from_seed(b"quote-tests".ljust(32, b"\0"))


@pytest.fixture(scope="module")
def real() -> TdxQuote:
    return TdxQuote.from_bytes(REAL_QUOTE)


def _patched(data: bytes, offset: int, layout: struct.Struct, *values: object) -> bytes:
    buffer = bytearray(data)
    layout.pack_into(buffer, offset, *values)
    return bytes(buffer)


class TestLayout:
    def test_td_report_offsets_match_the_spec(self) -> None:
        """TD report field offsets are those of the Intel layout (td_attributes 120, ...)."""
        assert TD_REPORT_OFFSETS["td_attributes"] == 120
        assert TD_REPORT_OFFSETS["rtmr0"] == 328
        assert TD_REPORT_OFFSETS["report_data"] == 520
        assert TD_REPORT_OFFSETS["tee_tcb_svn2"] == 584
        assert TD_REPORT_OFFSETS["mr_service_td"] == 600

    def test_sizes_and_absolute_report_data_offsets(self) -> None:
        """Header 48, TD1.0 584, TD1.5 648; report_data at 568 (v4) and 574 (v5)."""
        assert (HEADER_SIZE, TD_REPORT10_SIZE, TD_REPORT15_SIZE) == (48, 584, 648)
        assert (V4_REPORT_DATA_OFFSET, V5_REPORT_DATA_OFFSET) == (568, 574)


class TestRealQuote:
    def test_header(self, real: TdxQuote) -> None:
        """The real quote is v4, ECDSA-P256, TEE type TDX, with Intel's QE vendor id."""
        assert real.version == 4
        assert real.header.att_key_type == 2
        assert real.header.tee_type == TEE_TYPE_TDX
        assert real.header.qe_vendor_id == INTEL_QE_VENDOR_ID
        assert real.body_type == BODY_TYPE_TD10

    def test_trailing_padding_is_ignored(self, real: TdxQuote) -> None:
        """The 70 trailing zero bytes are not part of the quote and change nothing."""
        assert len(REAL_QUOTE) == REAL_QUOTE_LENGTH + 70
        assert REAL_QUOTE[REAL_QUOTE_LENGTH:] == bytes(70)
        assert real.raw == real.to_bytes() == REAL_QUOTE[:REAL_QUOTE_LENGTH]
        assert TdxQuote.from_bytes(REAL_QUOTE[:REAL_QUOTE_LENGTH]) == real

    def test_report_data_location(self, real: TdxQuote) -> None:
        """report_data is bytes 568..632 of a v4 quote."""
        assert real.report_data_offset == 568
        assert real.report_data == REAL_QUOTE[568:632]
        assert real.report_data.startswith(b"# ~/.bashrc")

    def test_signed_region_is_header_and_body(self, real: TdxQuote) -> None:
        """The signed region is everything before the signature-data length (0..632)."""
        assert real.signed_region == REAL_QUOTE[:V4_SIG_LEN_OFFSET]

    def test_pck_chain_has_three_certificates(self, real: TdxQuote) -> None:
        """The inner type-5 data yields leaf, platform CA and root as loadable PEM."""
        pems = real.signature_data.pck_certificates
        assert len(pems) == 3
        names = [x509.load_pem_x509_certificate(pem).subject.rfc4514_string() for pem in pems]
        assert "Intel SGX PCK Certificate" in names[0]
        assert "Intel SGX Root CA" in names[2]
        assert real.signature_data.pck_cert_chain_data.endswith(b"\0")

    def test_qe_report_binds_attestation_key(self, real: TdxQuote) -> None:
        """QE report_data is SHA-256(attestation key || QE auth data) then 32 zero bytes."""
        data = real.signature_data
        expected = hashlib.sha256(data.attestation_key + data.qe_auth_data).digest()
        assert data.qe_report.report_data == expected + bytes(32)
        assert data.qe_auth_data == bytes(range(32))

    def test_td_report_round_trips(self, real: TdxQuote) -> None:
        """TdReport.to_bytes re-encodes exactly the 584 body bytes it was parsed from."""
        body = REAL_QUOTE[HEADER_SIZE:V4_SIG_LEN_OFFSET]
        assert real.report.to_bytes() == body
        assert TdReport.from_bytes(body) == real.report

    def test_whole_quote_round_trips(self, real: TdxQuote) -> None:
        """Header, signature data and assemble_quote re-encode the quote byte for byte."""
        assert real.header.to_bytes() == REAL_QUOTE[:HEADER_SIZE]
        assert encode_signed_region(real.header, real.report) == real.signed_region
        assert assemble_quote(real.signed_region, real.signature_data) == real.raw
        assert real.signature_data.qe_report.to_bytes() == real.signature_data.qe_report_body

    def test_agrees_with_dcap_qvl(self, real: TdxQuote) -> None:
        """Our field values equal those of dcap-qvl's parser."""
        dcap_qvl = pytest.importorskip("dcap_qvl")
        theirs = dcap_qvl.parse_quote(REAL_QUOTE)
        assert theirs.header.user_data == real.header.user_data
        assert theirs.report.mr_td == real.report.mr_td
        assert theirs.report.td_attributes == real.report.td_attributes
        assert (
            theirs.report.rt_mr0,
            theirs.report.rt_mr1,
            theirs.report.rt_mr2,
            theirs.report.rt_mr3,
        ) == real.report.rtmrs
        assert theirs.report.report_data == real.report_data

    def test_is_not_debug(self, real: TdxQuote) -> None:
        """The production quote's TD has the debug bit clear."""
        assert not real.report.is_debug


class TestTdReport:
    def test_rejects_wrong_field_length(self) -> None:
        """A field of the wrong length is refused at construction."""
        with pytest.raises(ValueError, match="rtmr2"):
            _report(rtmr2=bytes(47))

    def test_td15_fields_come_in_pairs(self) -> None:
        """tee_tcb_svn2 and mr_service_td are both set (TD 1.5) or both None (TD 1.0)."""
        with pytest.raises(ValueError, match="both"):
            _report(mr_service_td=bytes(48))
        with pytest.raises(ValueError, match="both"):
            _report(tee_tcb_svn2=bytes(16))

    def test_td15_round_trips(self) -> None:
        """A TD 1.5 report encodes to 648 bytes and decodes back equal."""
        report = _report(tee_tcb_svn2=b"\x07" * 16, mr_service_td=b"\x08" * 48)
        encoded = report.to_bytes()
        assert len(encoded) == TD_REPORT15_SIZE
        assert encoded[TD_REPORT_OFFSETS["mr_service_td"] :] == b"\x08" * 48
        assert TdReport.from_bytes(encoded) == report
        assert report.body_type == BODY_TYPE_TD15

    def test_from_bytes_rejects_other_lengths(self) -> None:
        """Only 584- or 648-byte bodies decode."""
        with pytest.raises(EvidenceError):
            TdReport.from_bytes(bytes(600))

    def test_rtmrs_and_debug(self) -> None:
        """rtmrs is the ordered 4-tuple; is_debug reads td_attributes byte 0 bit 0."""
        report = _report()
        assert report.rtmrs == (b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48)
        assert not report.is_debug
        assert _report(td_attributes=bytes.fromhex("0100001000000000")).is_debug

    def test_qe_report_round_trips(self) -> None:
        """QeReport encodes to 384 bytes with its fields at the SGX report offsets."""
        qe = QeReport(
            cpu_svn=bytes(16),
            misc_select=0,
            attributes=bytes(16),
            mr_enclave=bytes(32),
            mr_signer=b"\x44" * 32,
            isv_prod_id=1,
            isv_svn=2,
            report_data=b"\x09" * 64,
        )
        encoded = qe.to_bytes()
        assert len(encoded) == 384
        assert encoded[128:160] == b"\x44" * 32
        assert encoded[256:260] == b"\x01\x00\x02\x00"
        assert QeReport.from_bytes(encoded) == qe


class TestFromLayout:
    """from_bytes builds headers and TD reports without running the field validators (the
    struct layout fixes what they check): the result must be what the validating
    constructor builds from the same values."""

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=TD_REPORT15_SIZE, max_size=TD_REPORT15_SIZE), st.booleans())
    def test_td_report_is_the_validated_one(self, data: bytes, td15: bool) -> None:
        body = data if td15 else data[:TD_REPORT10_SIZE]
        fast = TdReport.from_bytes(body)
        validated = TdReport(**attrs.asdict(fast))
        assert fast == validated and hash(fast) == hash(validated)
        assert fast.is_td15 is td15 and fast.to_bytes() == body

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
    def test_header_is_the_validated_one(self, data: bytes) -> None:
        from dstack_core.quote import QuoteHeader

        fast = QuoteHeader.from_bytes(data)
        validated = QuoteHeader(**attrs.asdict(fast))
        assert fast == validated and fast.to_bytes() == data


class TestV5:
    def test_mock_v5_quote_parses(self, pki: MockIntelPki) -> None:
        """A v5 mock quote has body type 3 and report_data at 574..638."""
        quote = pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA, version=5)
        parsed = TdxQuote.from_bytes(quote)
        assert parsed.version == 5
        assert parsed.body_type == BODY_TYPE_TD15
        assert parsed.report_data_offset == 574
        assert quote[574:638] == parsed.report_data == bytes(range(64))
        assert len(parsed.signed_region) == V5_SIG_LEN_OFFSET
        assert parsed.report.mr_service_td == bytes(48)

    def test_v5_with_td10_body(self, pki: MockIntelPki) -> None:
        """A v5 quote may carry a TD 1.0 body (type 2); report_data is still at 574."""
        v4 = TdxQuote.from_bytes(pki.sign_quote(_report(), user_data=bytes(20)))
        header = attrs.evolve(v4.header, version=5)
        region = encode_signed_region(header, v4.report)
        parsed = TdxQuote.from_bytes(assemble_quote(region, v4.signature_data))
        assert parsed.body_type == BODY_TYPE_TD10
        assert parsed.report_data_offset == 574
        assert parsed.report == v4.report

    def test_v4_header_refuses_td15_report(self) -> None:
        """encode_signed_region refuses a TD 1.5 body under a v4 header."""
        header = TdxQuote.from_bytes(REAL_QUOTE).header
        with pytest.raises(ValueError, match="version 5"):
            encode_signed_region(header, _report(tee_tcb_svn2=bytes(16), mr_service_td=bytes(48)))

    def test_mock_v4_quote_parses(self, pki: MockIntelPki) -> None:
        """A v4 mock quote parses with the simulator marker and a 3-certificate chain."""
        parsed = TdxQuote.from_bytes(pki.sign_quote(_report(), user_data=SIMULATOR_USER_DATA))
        assert parsed.header.user_data == SIMULATOR_USER_DATA
        assert parsed.report_data_offset == 568
        assert len(parsed.signature_data.pck_certificates) == 3


class TestSniff:
    def test_is_tdx_quote(self, pki: MockIntelPki) -> None:
        """The sniff accepts v4/v5 TDX headers and refuses short or foreign data."""
        assert is_tdx_quote(REAL_QUOTE)
        assert is_tdx_quote(pki.sign_quote(_report(), user_data=bytes(20), version=5))
        assert not is_tdx_quote(REAL_QUOTE[:47])
        assert not is_tdx_quote(b"\xa1" * 100)
        assert not is_tdx_quote(_patched(REAL_QUOTE, 0, struct.Struct("<H"), 3))


CUT_POINTS = [0, 1, 2, 8, 47, 48, 49, 100, 567, 631, 632, 633, 635, 636, 699, 700, 763, 764,
              766, 769, 770, 1153, 1154, 1217, 1218, 1219, 1251, 1252, 1254, 1257, 1258, 2000,
              4935]  # fmt: skip


class TestMalformed:
    @pytest.mark.parametrize("cut", CUT_POINTS)
    def test_truncated(self, cut: int) -> None:
        """A quote cut anywhere before the end of its signature data is EvidenceError."""
        with pytest.raises(EvidenceError):
            TdxQuote.from_bytes(REAL_QUOTE[:cut])

    @pytest.mark.parametrize("cut", [V5_SIG_LEN_OFFSET - 1, 50, 53, 54, 700, 705])
    def test_truncated_v5(self, pki: MockIntelPki, cut: int) -> None:
        """A v5 quote cut in the descriptor, body or signature data is EvidenceError."""
        quote = pki.sign_quote(_report(), user_data=bytes(20), version=5)
        with pytest.raises(EvidenceError):
            TdxQuote.from_bytes(quote[:cut])

    def test_garbage(self) -> None:
        """Bytes that are not a quote are EvidenceError."""
        with pytest.raises(EvidenceError):
            TdxQuote.from_bytes(b"\xff" * 5000)

    @pytest.mark.parametrize("version", [0, 3, 6, 0xFFFF])
    def test_wrong_version(self, version: int) -> None:
        """Versions other than 4 and 5 are refused, and the message names the version."""
        data = _patched(REAL_QUOTE, 0, struct.Struct("<H"), version)
        with pytest.raises(EvidenceError, match=f"version {version}"):
            TdxQuote.from_bytes(data)

    def test_wrong_tee_type(self) -> None:
        """An SGX (TEE type 0) header is refused."""
        data = _patched(REAL_QUOTE, 4, struct.Struct("<I"), 0)
        with pytest.raises(EvidenceError, match="not TDX"):
            TdxQuote.from_bytes(data)

    def test_wrong_key_type(self) -> None:
        """An attestation key type other than ECDSA P-256 is refused."""
        data = _patched(REAL_QUOTE, 2, struct.Struct("<H"), 3)
        with pytest.raises(EvidenceError, match="attestation key type"):
            TdxQuote.from_bytes(data)

    def test_oversize(self) -> None:
        """Inputs over 1 MiB are refused before parsing."""
        with pytest.raises(EvidenceError, match="limit"):
            TdxQuote.from_bytes(REAL_QUOTE + bytes(MAX_QUOTE_SIZE))

    @pytest.mark.parametrize(
        ("body_type", "size", "message"),
        [(1, 384, "SGX"), (4, 648, "unknown"), (9, 584, "unknown"), (3, 584, "648")],
    )
    def test_bad_v5_body_descriptor(
        self, pki: MockIntelPki, body_type: int, size: int, message: str
    ) -> None:
        """SGX, unknown and mis-sized v5 bodies are refused."""
        quote = pki.sign_quote(_report(), user_data=bytes(20), version=5)
        data = _patched(quote, HEADER_SIZE, BODY_DESCRIPTOR, body_type, size)
        with pytest.raises(EvidenceError, match=message):
            TdxQuote.from_bytes(data)

    def test_signature_length_past_end(self) -> None:
        """A signature-data length beyond the input is EvidenceError, not an IndexError."""
        data = _patched(REAL_QUOTE, V4_SIG_LEN_OFFSET, SIG_DATA_LEN, 0xFFFF_FFFF)
        with pytest.raises(EvidenceError, match="truncated"):
            TdxQuote.from_bytes(data)

    def test_extra_bytes_inside_signature_data(self) -> None:
        """Signature data longer than its certification data is refused."""
        (sig_len,) = SIG_DATA_LEN.unpack_from(REAL_QUOTE, V4_SIG_LEN_OFFSET)
        data = _patched(REAL_QUOTE, V4_SIG_LEN_OFFSET, SIG_DATA_LEN, sig_len + 1)
        with pytest.raises(EvidenceError, match="unexpected"):
            TdxQuote.from_bytes(data)

    @pytest.mark.parametrize(("offset", "what"), [(764, "certification data type"),
                                                  (1252, "inner certification")])  # fmt: skip
    def test_wrong_certification_data_type(self, offset: int, what: str) -> None:
        """Outer type must be 6 (QE report) and inner type 5 (PCK chain)."""
        data = _patched(REAL_QUOTE, offset, struct.Struct("<H"), 4)
        with pytest.raises(EvidenceError, match=what):
            TdxQuote.from_bytes(data)

    def test_chain_without_pem(self) -> None:
        """A PCK chain without any PEM certificate is refused."""
        data = REAL_QUOTE.replace(b"BEGIN CERTIFICATE", b"BEGIN XXXXXXXXXXX")
        with pytest.raises(EvidenceError, match="PEM"):
            TdxQuote.from_bytes(data)

    def test_header_from_bytes_wrong_size(self) -> None:
        """QuoteHeader.from_bytes needs exactly 48 bytes."""
        with pytest.raises(EvidenceError):
            QuoteHeader.from_bytes(REAL_QUOTE[:40])

    def test_signature_data_from_bytes_empty(self) -> None:
        """Empty signature data is EvidenceError."""
        with pytest.raises(EvidenceError):
            QuoteSignatureData.from_bytes(b"")

    def test_non_bytes_is_type_error(self) -> None:
        """Passing a str is a programming error (TypeError), not evidence."""
        with pytest.raises(TypeError):
            TdxQuote.from_bytes("quote")  # type: ignore[arg-type]


_TDX_PREFIX = HEADER.pack(4, 2, TEE_TYPE_TDX, 0, 0, INTEL_QE_VENDOR_ID, bytes(20))
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_evidence_error(data: bytes) -> None:
    with contextlib.suppress(EvidenceError):
        TdxQuote.from_bytes(data)


class TestFuzz:
    @_FUZZ
    @given(st.binary(max_size=6000))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes either parse or raise EvidenceError; nothing else escapes."""
        _parse_or_evidence_error(data)

    @_FUZZ
    @given(st.binary(max_size=6000))
    def test_random_bodies_behind_a_valid_header(self, tail: bytes) -> None:
        """Random data after a valid v4 TDX header only ever raises EvidenceError."""
        _parse_or_evidence_error(_TDX_PREFIX + tail)

    @_FUZZ
    @given(
        st.lists(st.tuples(st.integers(0, len(REAL_QUOTE) - 1), st.integers(0, 255)), max_size=8),
        st.integers(0, len(REAL_QUOTE)),
    )
    def test_mutated_real_quote(self, writes: list[tuple[int, int]], cut: int) -> None:
        """Byte rewrites and truncations of the real quote only ever raise EvidenceError."""
        data = bytearray(REAL_QUOTE)
        for offset, value in writes:
            data[offset] = value
        _parse_or_evidence_error(bytes(data[:cut]))

    @_FUZZ
    @given(
        st.sampled_from([0, 2, 4, 48, 632, 764, 766, 1218, 1252, 1254]),
        st.integers(0, 0xFFFF_FFFF),
    )
    def test_mutated_length_fields(self, offset: int, value: int) -> None:
        """Any value in a type or length field only ever raises EvidenceError."""
        layout = struct.Struct("<I") if offset in (4, 632, 766, 1254) else struct.Struct("<H")
        _parse_or_evidence_error(_patched(REAL_QUOTE, offset, layout, value & _mask(layout)))


def _mask(layout: struct.Struct) -> int:
    return (1 << (8 * layout.size)) - 1
