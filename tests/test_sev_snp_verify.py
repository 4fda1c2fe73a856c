"""SEV-SNP verification (dstack_sev_snp_stub.amd, .verify, .validate): AMD's pinned roots,
VCEK extensions, real reports with their VCEKs at a pinned time, and the mock AMD PKI that
signs the fake guest's reports; every check is forged and must fail by name.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from dstack_sev_snp_stub.amd import (
    GENOA,
    MILAN,
    OID_HWID,
    PRODUCTS,
    TURIN,
    TcbVersion,
    VcekExtensions,
    amd_ark,
    fingerprint,
    load_certificate,
    product_for_cpuid,
)
from dstack_sev_snp_stub.kds import COLLATERAL_FORMAT, SnpCollateral
from dstack_sev_snp_stub.validate import SnpPolicy
from dstack_sev_snp_stub.verify import (
    CHECK_NAMES,
    SnpVerification,
    SnpVerifyOptions,
    verify_issued_by,
    verify_report,
)

from dstack_core.errors import EvidenceError
from dstack_core.mockpki_amd import MOCK_PRODUCTS, MockAmdPki, mock_chip_id
from dstack_core.snp import (
    CHIP_ID_OFFSET,
    MEASUREMENT_OFFSET,
    PLATFORM_INFO_SMT_EN,
    POLICY_MIGRATE_MA,
    POLICY_RESERVED_ONE,
    POLICY_SMT,
    REPORT_DATA_OFFSET,
    REPORTED_TCB_OFFSET,
    SIGNATURE_OFFSET,
    SnpReport,
    build_report,
    encode_signature,
)
from dstack_core.testing.fake_tee import FakeSnpMachine

DATA = Path(__file__).parent / "data"
PINNED_NOW = 1704067200
"""2024-01-01T00:00:00Z: inside the validity of every certificate in tests/data."""
AFTER_VCEK_EXPIRY = 1924992000
"""2031-01-01: the Milan VCEK (valid to 2030-04-03) has expired."""
SEED = bytes(range(32))


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _collateral(*names: str) -> SnpCollateral:
    collateral = SnpCollateral()
    for name in names:
        collateral = collateral.merged(SnpCollateral.from_bytes(_read(name)))
    return collateral


GENUINE = "sev_snp_report_milan.bin"
GENUINE_COLLATERAL = ("sev_snp_vcek_milan.der", "sev_snp_cert_chain_milan.pem")
DEBUG = "sev_snp_report_milan_debug.bin"
DEBUG_COLLATERAL = ("sev_snp_vcek_milan_debug.der", "sev_snp_cert_chain_milan.pem")


def _verify(report: bytes, collateral: SnpCollateral | None, **options: object) -> SnpVerification:
    options.setdefault("now", PINNED_NOW)
    return verify_report(report, collateral, SnpVerifyOptions(**options))  # type: ignore[arg-type]


def _statuses(result: SnpVerification) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}


def _fields(result: SnpVerification, check: str) -> dict[str, tuple[str, str]]:
    return {m.field: (m.found, m.wanted) for m in result.check(check).mismatches}


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _sign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    r, s = decode_dss_signature(key.sign(report[:SIGNATURE_OFFSET], ec.ECDSA(hashes.SHA384())))
    return report[:SIGNATURE_OFFSET] + encode_signature(r, s)


def _mock_report(pki: MockAmdPki, *, tcb: int = 0x7308000000000003, **fields: object) -> bytes:
    """A version 3 report of ``pki``'s product, signed by its VCEK."""
    family, model, stepping = pki.product.cpuid
    values: dict[str, object] = {
        "policy": POLICY_RESERVED_ONE | POLICY_SMT,
        "chip_id": mock_chip_id(SEED, pki.product.name),
        "reported_tcb": tcb, "current_tcb": tcb, "committed_tcb": tcb, "launch_tcb": tcb,
        "report_data": b"mock".ljust(64, b"\0"),
        "platform_info": PLATFORM_INFO_SMT_EN,
        **fields,
    }
    raw = bytearray(build_report(**values))
    raw[0x188:0x18B] = bytes((family, model, stepping))
    return pki.sign_report(bytes(raw))


def _mock_options(pki: MockAmdPki, **options: object) -> dict[str, object]:
    return {"roots": [load_certificate(pki.ark_pem)], "allow_simulator": True, **options}


def _mock_collateral(pki: MockAmdPki, report: bytes, **pieces: object) -> SnpCollateral:
    parsed = SnpReport.from_bytes(report)
    collateral = SnpCollateral.from_bytes(
        pki.collateral_json(parsed.chip_id, parsed.reported_tcb).encode()
    )
    return attrs.evolve(collateral, **pieces)


@pytest.fixture(scope="module")
def milan() -> MockAmdPki:
    return MockAmdPki.from_seed(SEED)


class TestPinnedRoots:
    @pytest.mark.parametrize("product", [MILAN, GENOA, TURIN], ids=str)
    def test_ark_is_amds_and_self_signed_with_rsa_pss(self, product):
        """Each pinned ARK matches its fingerprint and verifies its own RSA-PSS signature."""
        ark = amd_ark(product)
        assert fingerprint(ark) == product.ark_sha256
        assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product},O=Advanced Micro Devices")
        assert ark.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS
        assert ark.public_key().key_size == 4096
        verify_issued_by(ark, ark)

    @pytest.mark.parametrize("product", [MILAN, GENOA, TURIN], ids=str)
    def test_amds_ask_chains_to_its_ark_only(self, product):
        """AMD's published ASK verifies under its product's ARK and under no other."""
        collateral = SnpCollateral.from_bytes(_read(f"sev_snp_cert_chain_{product.name.lower()}.pem"))
        assert collateral.ark is not None and fingerprint(collateral.ark) == product.ark_sha256
        verify_issued_by(collateral.ask, amd_ark(product))
        for other in set(PRODUCTS.values()) - {product}:
            with pytest.raises(EvidenceError):
                verify_issued_by(collateral.ask, amd_ark(other))

    def test_cpuid_names_the_products(self):
        """Family 19h models 0x00-0x0F are Milan, 0x10-0x1F/0xA0-0xAF Genoa; 1Ah 0x00-0x11 Turin."""
        assert product_for_cpuid(0x19, 0x01) is MILAN
        assert product_for_cpuid(0x19, 0x11) is GENOA and product_for_cpuid(0x19, 0xA0) is GENOA
        assert product_for_cpuid(0x1A, 0x02) is TURIN
        assert product_for_cpuid(0x19, 0x30) is None and product_for_cpuid(0x17, 0x31) is None


class TestVcekExtensions:
    def test_real_milan_vcek(self):
        """AMD's Milan VCEK: struct 0, Milan-B0, the report's 64-byte chip id, its TCB."""
        ext = VcekExtensions.from_certificate(load_certificate(_read("sev_snp_vcek_milan.der")))
        report = SnpReport.from_bytes(_read(GENUINE))
        assert (ext.struct_version, ext.product_name, ext.hwid) == (0, "Milan-B0", report.chip_id)
        tcb = ext.tcb(MILAN)
        assert tcb.raw == report.reported_tcb == 0x7308000000000003
        assert tcb.parts == {"bootloader": 3, "tee": 0, "spl4": 0, "spl5": 0, "spl6": 0,
                             "spl7": 0, "snp": 8, "microcode": 115}

    def test_real_turin_vcek(self):
        """AMD's Turin VCEK: struct 1, product Turin, an FMC level, an 8-byte hwID."""
        ext = VcekExtensions.from_certificate(load_certificate(_read("sev_snp_vcek_turin.der")))
        assert (ext.struct_version, ext.product_name, len(ext.hwid)) == (1, "Turin", 8)
        assert 9 in ext.spls and 4 not in ext.spls
        tcb = ext.tcb(TURIN)
        assert tcb.parts == {"fmc": 0, "bootloader": 0, "tee": 0, "snp": 0, "microcode": 9}
        assert tcb.raw == 9 << 56
        assert tcb.kds_query() == "fmcSPL=0&blSPL=0&teeSPL=0&snpSPL=0&ucodeSPL=9"

    def test_real_turin_vcek_chains_to_amds_turin_ark(self):
        """The Turin VCEK <- ASK <- pinned ARK signatures verify (RSA-PSS all the way)."""
        chain = SnpCollateral.from_bytes(_read("sev_snp_cert_chain_turin.pem"))
        vcek = load_certificate(_read("sev_snp_vcek_turin.der"))
        verify_issued_by(vcek, chain.ask)
        verify_issued_by(chain.ask, amd_ark(TURIN))

    @pytest.mark.parametrize(("real", "product"), [("sev_snp_vcek_milan.der", "Milan"),
                                                    ("sev_snp_vcek_turin.der", "Turin")])
    def test_mock_vcek_has_amds_extension_layout(self, real, product):
        """The mock VCEK carries AMD's extension OIDs, in AMD's order, with AMD's encodings."""
        def layout(cert: x509.Certificate) -> list[tuple[str, int, int]]:
            return [(e.oid.dotted_string, e.value.value[0], len(e.value.value))
                    for e in cert.extensions if e.oid.dotted_string.startswith("1.3.6.1.4.1.3704")]

        pki = MockAmdPki.from_seed(SEED, product=product)
        mock = load_certificate(pki.vcek_pem(mock_chip_id(SEED, product), 0))
        real_cert = load_certificate(_read(real))
        assert [(o, t) for o, t, _ in layout(mock) if o != OID_HWID] == [
            (o, t) for o, t, _ in layout(real_cert) if o != OID_HWID]
        hwid = [n for o, _, n in layout(mock) if o == OID_HWID]
        assert hwid == [n for o, _, n in layout(real_cert) if o == OID_HWID]
        assert VcekExtensions.from_certificate(mock).product_name == \
            VcekExtensions.from_certificate(real_cert).product_name

    @pytest.mark.parametrize("case", ["missing_hwid", "vlek_csp", "unknown_oid", "bad_integer"])
    def test_malformed_extensions_are_refused(self, milan, case):
        """A VCEK without hwID, with a VLEK's CSP_ID, an unknown AMD OID or a bad INTEGER fails."""
        vcek = load_certificate(milan.vcek_pem(mock_chip_id(SEED), 0))
        extensions = [e for e in vcek.extensions if not (case == "missing_hwid"
                                                         and e.oid.dotted_string == OID_HWID)]
        if case == "vlek_csp":
            extensions.append(_ext("1.3.6.1.4.1.3704.1.5", b"\x16\x03aws"))
        elif case == "unknown_oid":
            extensions.append(_ext("1.3.6.1.4.1.3704.1.9", b"\x02\x01\x00"))
        elif case == "bad_integer":
            extensions = [_ext(e.oid.dotted_string, b"\x04\x01\x00")
                          if e.oid.dotted_string.endswith(".3.1") else e for e in extensions]
        builder = x509.CertificateBuilder().subject_name(vcek.subject).issuer_name(vcek.issuer) \
            .public_key(vcek.public_key()).serial_number(1) \
            .not_valid_before(vcek.not_valid_before_utc).not_valid_after(vcek.not_valid_after_utc)
        for extension in extensions:
            builder = builder.add_extension(extension.value, critical=False)
        forged = builder.sign(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
        with pytest.raises(EvidenceError):
            VcekExtensions.from_certificate(forged)


def _ext(oid: str, value: bytes) -> x509.Extension[x509.UnrecognizedExtension]:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
    return x509.Extension(ext.oid, False, ext)


class TestGenuineReport:
    def test_passes_at_pinned_time(self):
        """A real Milan report with AMD's VCEK, ASK and pinned ARK passes every check."""
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL))
        assert result.passed, result.reason
        assert [c.name for c in result.checks] == list(CHECK_NAMES)
        assert (result.product, result.simulated, result.tcb_status) == (MILAN, False, "UpToDate")
        assert result.root_sha256 == MILAN.ark_sha256
        claims = result.claims()
        assert claims is not None
        assert claims["report_data"] == SnpReport.from_bytes(_read(GENUINE)).report_data
        assert "AMD's pinned Milan ARK" in result.check("vcek_chain").detail
        assert result.to_json()["verdict"] == "pass"

    @pytest.mark.parametrize("offset", [0x000, 0x008, REPORT_DATA_OFFSET + 7,
                                        MEASUREMENT_OFFSET, REPORTED_TCB_OFFSET + 7,
                                        CHIP_ID_OFFSET + 63, SIGNATURE_OFFSET - 1,
                                        SIGNATURE_OFFSET, SIGNATURE_OFFSET + 72])
    def test_flipped_byte_fails_the_signature(self, offset):
        """One flipped bit anywhere in the signed region or the signature fails snp_signature."""
        result = _verify(_flip(_read(GENUINE), offset), _collateral(*GENUINE_COLLATERAL))
        assert not result.passed and result.claims() is None
        assert result.check("snp_signature").status == "fail"

    def test_wrong_vcek_fails_chain_signature_and_tcb(self):
        """Another chip's genuine VCEK: hwID, signature and TCB all fail by name."""
        collateral = _collateral("sev_snp_vcek_milan_debug.der", "sev_snp_cert_chain_milan.pem")
        result = _verify(_read(GENUINE), collateral)
        assert _statuses(result) == {"vcek_chain": "fail", "snp_signature": "fail",
                                     "snp_tcb": "fail", "snp_policy": "pass"}
        assert "VCEK hwID" in _fields(result, "vcek_chain")
        assert "reported_tcb.microcode" in _fields(result, "snp_tcb")

    def test_wrong_ark_fails_the_chain(self):
        """Given Genoa's ARK as the only root, the Milan chain fails vcek_chain."""
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL),
                         roots=[amd_ark(GENOA)], allow_simulator=True)
        assert _statuses(result)["vcek_chain"] == "fail"
        assert "chain" in _fields(result, "vcek_chain")

    def test_mock_root_does_not_verify_amds_chain(self, milan):
        """The mock ARK never verifies a genuine chain, even with allow_simulator."""
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL),
                         **_mock_options(milan))
        assert result.check("vcek_chain").status == "fail"

    def test_wrong_ask_fails_the_chain(self):
        """Genoa's ASK in place of Milan's fails vcek_chain."""
        collateral = _collateral("sev_snp_vcek_milan.der", "sev_snp_cert_chain_genoa.pem")
        result = _verify(_read(GENUINE), collateral)
        assert result.check("vcek_chain").status == "fail"
        assert result.check("snp_signature").status == "pass"

    def test_tcb_below_policy_minimum_fails_tcb(self):
        """A minimum microcode level above the reported 115 fails snp_tcb, naming the field."""
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL),
                         policy=SnpPolicy(minimum_tcb={"microcode": 116, "snp": 8}))
        assert _statuses(result) == {"vcek_chain": "pass", "snp_signature": "pass",
                                     "snp_tcb": "fail", "snp_policy": "pass"}
        assert _fields(result, "snp_tcb") == {
            "reported_tcb.microcode": ("115", ">= 116 (policy minimum)")}

    def test_tcb_at_policy_minimum_passes(self):
        """The reported TCB itself as the minimum passes."""
        minimum = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 99}
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL),
                         policy=SnpPolicy(minimum_tcb=minimum))
        assert result.passed, result.reason

    def test_genuine_debug_report_fails_policy(self):
        """A genuine report of a guest that allows DEBUG fails snp_policy (and only it)."""
        result = _verify(_read(DEBUG), _collateral(*DEBUG_COLLATERAL))
        assert _statuses(result) == {"vcek_chain": "pass", "snp_signature": "pass",
                                     "snp_tcb": "pass", "snp_policy": "fail"}
        assert _fields(result, "snp_policy") == {"policy.DEBUG": ("1", "0")}
        assert result.reason.startswith("snp_policy: policy.DEBUG is 1, wanted 0")
        assert _verify(_read(DEBUG), _collateral(*DEBUG_COLLATERAL),
                       policy=SnpPolicy(allow_debug=True)).passed

    @pytest.mark.parametrize("now", [AFTER_VCEK_EXPIRY, 1672531200])
    def test_outside_the_vceks_validity_fails_the_chain(self, now):
        """After the VCEK expired, or before it was issued (2023-01-01), vcek_chain fails."""
        result = _verify(_read(GENUINE), _collateral(*GENUINE_COLLATERAL), now=now)
        assert _statuses(result)["vcek_chain"] == "fail"
        assert "VCEK validity" in _fields(result, "vcek_chain")

    def test_no_collateral_fails_closed(self):
        """Without collateral: vcek_chain fails, the VCEK checks are skipped, no claims."""
        result = _verify(_read(GENUINE), None)
        assert _statuses(result) == {"vcek_chain": "fail", "snp_signature": "skipped",
                                     "snp_tcb": "skipped", "snp_policy": "pass"}
        assert not result.passed and result.claims() is None

    def test_collateral_without_ask_fails_the_chain(self):
        """A VCEK alone (no ASK) fails vcek_chain naming the ASK."""
        result = _verify(_read(GENUINE), _collateral("sev_snp_vcek_milan.der"))
        assert "ASK" in _fields(result, "vcek_chain")

    def test_every_collateral_form_verifies(self, tmp_path):
        """Our JSON, a PEM bundle, DER + KDS cert_chain, and a host certificate table all work."""
        base = _collateral(*GENUINE_COLLATERAL)
        vcek_der = _read("sev_snp_vcek_milan.der")
        pem = load_certificate(vcek_der).public_bytes(serialization.Encoding.PEM)
        ask = base.ask.public_bytes(serialization.Encoding.DER)
        forms = {
            "json": base.to_json().encode(),
            "pem": pem + _read("sev_snp_cert_chain_milan.pem"),
            "table": _cert_table([(uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"), vcek_der),
                                  (uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"), ask)]),
        }
        for name, data in forms.items():
            result = _verify(_read(GENUINE), SnpCollateral.from_bytes(data))
            assert result.passed, (name, result.reason)
        assert json.loads(forms["json"])["format"] == COLLATERAL_FORMAT


def _cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header = bytearray()
    body = b""
    start = 24 * (len(entries) + 1)
    for guid, blob in entries:
        header += guid.bytes + struct.pack("<II", start + len(body), len(blob))
        body += blob
    return bytes(header) + bytes(24) + body


class TestMockChain:
    @pytest.mark.parametrize("product", list(MOCK_PRODUCTS))
    def test_fake_guest_report_verifies_with_its_trust_bundle(self, tmp_path, product):
        """The fake guest's report passes with its bundle and allow_simulator: simulated."""
        machine = FakeSnpMachine.create(tmp_path / "tree", product=product)
        bundle = machine.trust_bundle()
        report = machine.report(b"x" * 64)
        result = _verify(report, SnpCollateral.from_bytes(bundle.collateral_json.encode()),
                         now=int(time.time()), roots=[load_certificate(bundle.root_ca_pem)],
                         allow_simulator=True)
        assert result.passed, result.reason
        assert result.simulated and result.product == PRODUCTS[product]
        assert "a test root, accepted by allow_simulator" in result.check("vcek_chain").detail

    def test_fake_guest_report_never_verifies_against_amds_roots(self, tmp_path):
        """With AMD's pinned roots (the default) the fake's chain fails vcek_chain."""
        machine = FakeSnpMachine.create(tmp_path / "tree")
        collateral = SnpCollateral.from_bytes(machine.trust_bundle().collateral_json.encode())
        result = _verify(machine.report(bytes(64)), collateral, now=int(time.time()))
        assert result.check("vcek_chain").status == "fail" and not result.simulated
        assert "AMD's pinned Milan ARK" in result.check("vcek_chain").detail
        with_amds = _verify(machine.report(bytes(64)), collateral, now=int(time.time()),
                            roots=[amd_ark(MILAN)], allow_simulator=True)
        assert with_amds.check("vcek_chain").status == "fail"

    def test_mock_root_needs_allow_simulator(self, milan):
        """The mock root without allow_simulator fails vcek_chain naming the root."""
        report = _mock_report(milan)
        result = _verify(report, _mock_collateral(milan, report),
                         **_mock_options(milan, allow_simulator=False))
        assert "root" in _fields(result, "vcek_chain")
        assert result.simulated and not result.passed

    def test_mock_is_deterministic_across_processes(self, milan):
        """The same seed gives byte-identical ARK, ASK and VCEK in another process."""
        code = ("import sys; from dstack_core.mockpki_amd import MockAmdPki, mock_chip_id;"
                "p = MockAmdPki.from_seed(bytes(range(32)));"
                "sys.stdout.write((p.ark_pem + p.ask_pem + p.vcek_pem(mock_chip_id(bytes(range(32))), 5)).decode())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert out == (milan.ark_pem + milan.ask_pem + milan.vcek_pem(mock_chip_id(SEED), 5)).decode()

    def test_report_claiming_a_higher_tcb_than_its_vcek_fails_tcb(self, milan):
        """Signed with the VCEK of TCB 2 but reporting TCB 3: snp_tcb fails, naming the fields."""
        old, new = 0x7308000000000002, 0x7308000000000003
        chip = mock_chip_id(SEED)
        forged = _sign(_mock_report(milan, tcb=new), milan.vcek_key(chip, old))
        collateral = SnpCollateral.from_bytes(milan.collateral_json(chip, old).encode())
        result = _verify(forged, collateral, **_mock_options(milan))
        assert _statuses(result) == {"vcek_chain": "pass", "snp_signature": "pass",
                                     "snp_tcb": "fail", "snp_policy": "pass"}
        assert _fields(result, "snp_tcb") == {"reported_tcb.bootloader": ("3", "2 (the VCEK's)")}

    def test_cpuid_of_another_product_fails_the_chain(self, milan):
        """A report whose CPUID says Genoa, with a Milan VCEK, fails vcek_chain."""
        raw = bytearray(_mock_report(milan))
        raw[0x188:0x18B] = bytes((0x19, 0x11, 0x01))
        report = milan.sign_report(bytes(raw))
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert "CPUID family/model" in _fields(result, "vcek_chain")

    @pytest.mark.parametrize(("signer_info", "field"), [
        (1 << 2, "signer_info.SIGNING_KEY"), (7 << 2, "signer_info.SIGNING_KEY"),
        (1 << 1, "signer_info.MASK_CHIP_KEY"), (1 << 5, "signer_info"),
    ])
    def test_signer_info_other_than_vcek_fails_the_signature(self, milan, signer_info, field):
        """VLEK, no key, a masked chip key or reserved bits fail snp_signature by name."""
        report = _mock_report(milan, signer_info=signer_info)
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert result.check("snp_signature").status == "fail"
        assert field in _fields(result, "snp_signature")

    def test_unknown_signature_algorithm_fails_the_signature(self, milan):
        """signature_algo 2 fails snp_signature, found 2, wanted 1."""
        report = _mock_report(milan, signature_algo=2)
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert _fields(result, "snp_signature")["signature_algo"][0] == "2"

    def test_zero_signature_fails(self, milan):
        """An unsigned report (zero signature field) fails snp_signature."""
        report = _mock_report(milan)[:SIGNATURE_OFFSET] + bytes(512)
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert result.check("snp_signature").status == "fail"

    @pytest.mark.parametrize(("fields", "policy", "expected"), [
        ({"policy": POLICY_RESERVED_ONE | POLICY_SMT | POLICY_MIGRATE_MA}, SnpPolicy(),
         {"policy.MIGRATE_MA": ("1", "0")}),
        ({}, SnpPolicy(allow_smt=False), {"policy.SMT": ("1", "0")}),
        ({"policy": POLICY_RESERVED_ONE}, SnpPolicy(allow_smt=False),
         {"platform_info.SMT_EN": ("1", "0 (policy.SMT is 0)")}),
        ({"policy": POLICY_SMT}, SnpPolicy(), {"policy bit 17": ("0", "1 (reserved, must be one)")}),
        ({"vmpl": 2}, SnpPolicy(vmpl=0), {"vmpl": ("2", "0")}),
        ({"guest_svn": 1}, SnpPolicy(minimum_guest_svn=2), {"guest_svn": ("1", ">= 2")}),
        ({"policy": POLICY_RESERVED_ONE | POLICY_SMT | 0x0105}, SnpPolicy(minimum_abi=(1, 55)),
         {"policy.ABI": ("1.5", ">= 1.55")}),
        ({"policy": POLICY_RESERVED_ONE | POLICY_SMT | (1 << 23)}, SnpPolicy(),
         {"platform_info.RAPL_DIS": ("0", "1 (policy.RAPL_DIS is 1)")}),
    ])
    def test_policy_findings_name_field_found_and_wanted(self, milan, fields, policy, expected):
        """Each policy violation fails snp_policy with the field, value found and value wanted."""
        report = _mock_report(milan, **fields)
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan, policy=policy))
        assert _statuses(result)["snp_policy"] == "fail"
        assert _fields(result, "snp_policy") == expected

    def test_policy_defaults_accept_a_normal_guest(self, milan):
        """Default policy: SMT allowed, no debug, no migration agent, VMPL not checked."""
        report = _mock_report(milan, vmpl=1)
        result = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert result.passed, result.reason
        assert "VMPL 1" in result.check("snp_policy").detail

    def test_crl_not_listing_the_chain_passes(self, milan):
        """A current CRL signed by the root that lists neither ASK nor VCEK: not revoked."""
        report = _mock_report(milan)
        crl = x509.load_pem_x509_crl(milan.crl_pem([12345]))
        result = _verify(report, _mock_collateral(milan, report, crl=crl),
                         **_mock_options(milan, require_crl=True))
        assert result.passed, result.reason
        assert "not revoked" in result.check("vcek_chain").detail

    @pytest.mark.parametrize("case", ["revoked_ask", "revoked_vcek", "expired", "foreign", "absent"])
    def test_bad_or_missing_crl_fails_the_chain(self, milan, case):
        """A CRL revoking the ASK or VCEK, stale, signed by another root, or required and absent."""
        report = _mock_report(milan)
        collateral = _mock_collateral(milan, report)
        serials = {"revoked_ask": [collateral.ask.serial_number],
                   "revoked_vcek": [collateral.vceks[0].serial_number]}.get(case, [])
        signer = MockAmdPki.from_seed(bytes(32)) if case == "foreign" else milan
        import datetime
        next_update = datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC)
        pem = signer.crl_pem(serials, next_update=next_update) if case == "expired" \
            else signer.crl_pem(serials)
        crl = None if case == "absent" else x509.load_pem_x509_crl(pem)
        result = _verify(report, attrs.evolve(collateral, crl=crl),
                         **_mock_options(milan, require_crl=True))
        assert result.check("vcek_chain").status == "fail", case

    def test_claims_only_after_every_check(self, milan):
        """claims() is None for a report that fails any check, the fields once it passes."""
        report = _mock_report(milan)
        good = _verify(report, _mock_collateral(milan, report), **_mock_options(milan))
        assert good.claims()["measurement"] == SnpReport.from_bytes(report).measurement
        bad = _verify(report, _mock_collateral(milan, report), **_mock_options(milan),
                      policy=SnpPolicy(vmpl=3))
        assert bad.claims() is None

    def test_malformed_report_raises(self):
        """A report that is not 1184 bytes is an EvidenceError, not a result."""
        with pytest.raises(EvidenceError):
            _verify(bytes(100), None)


class TestOptions:
    def test_policy_rejects_unknown_tcb_component_and_bad_vmpl(self):
        """SnpPolicy validates minimum_tcb names and the VMPL range."""
        with pytest.raises(ValueError):
            SnpPolicy(minimum_tcb={"ucode": 1})
        with pytest.raises(ValueError):
            SnpPolicy(vmpl=4)

    def test_tcb_version_round_trip(self):
        """TcbVersion composes and decomposes each product's layout."""
        for product in PRODUCTS.values():
            parts = {f.name: i + 1 for i, f in enumerate(product.tcb_fields)}
            assert TcbVersion.from_parts(product, parts).parts == parts


class TestThroughThePlugin:
    """The real Milan report, wrapped in our envelope, through the core and the sev-snp
    verifier plugin: AMD's pinned ARK (no root given, no opt-in), its VCEK and ASK as
    collateral, at the pinned time."""

    def _envelope(self, name: str) -> bytes:
        from dstack_core.envelope import Envelope

        report = _read(name)
        return Envelope(platform="sev-snp", evidence_format="sev-snp", quote=report,
                        report_data=SnpReport.from_bytes(report).report_data).to_cbor()

    def test_genuine_report_passes(self):
        """verdict pass, not simulated, under AMD's root; the plugin is named."""
        from dstack_core.verify import VerifyOptions, load_evidence, verify_evidence

        result = verify_evidence(load_evidence(self._envelope(GENUINE)),
                                 VerifyOptions(now=PINNED_NOW), _collateral(*GENUINE_COLLATERAL))
        assert result.verdict == "pass", result.reason
        assert not result.simulated and result.tcb_status == "UpToDate"
        assert result.verifier is not None and result.verifier.plugin == "dstack-sev-snp-stub"
        assert "AMD's pinned Milan ARK" in result.check("vcek_chain").detail

    def test_genuine_report_with_the_cli(self, tmp_path):
        """``dstack-agent verify --collateral FILE --now PINNED`` passes it (exit 0); the
        debug guest's fails snp_policy unless sev-snp:allow_debug=true."""
        import subprocess
        import sys

        def cli(name: str, collateral: tuple[str, ...], *extra: str) -> subprocess.CompletedProcess[str]:
            evidence = tmp_path / f"{name}.cbor"
            evidence.write_bytes(self._envelope(name))
            document = tmp_path / f"{name}.pem"
            document.write_bytes(b"".join(
                (_read(n) if n.endswith(".pem") else
                 load_certificate(_read(n)).public_bytes(serialization.Encoding.PEM))
                for n in collateral))
            return subprocess.run(
                [sys.executable, "-m", "dstack_core.cli", "verify", str(evidence), "--collateral",
                 str(document), "--now", str(PINNED_NOW), *extra],
                capture_output=True, text=True, timeout=120, check=False,
            )

        genuine = cli(GENUINE, GENUINE_COLLATERAL)
        assert genuine.returncode == 0, genuine.stdout + genuine.stderr
        assert json.loads(genuine.stdout)["checks"]["snp_signature"]["status"] == "pass"
        debug = cli(DEBUG, DEBUG_COLLATERAL)
        assert debug.returncode == 1 and "verdict fail: snp_policy:" in debug.stderr
        allowed = cli(DEBUG, DEBUG_COLLATERAL, "--verifier-option", "sev-snp:allow_debug=true")
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
