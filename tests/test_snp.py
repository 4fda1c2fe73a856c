"""SEV-SNP reports (dstack_core.snp) and the verifier's sev-snp branch.

The layout is pinned against the spec's table with offsets written out here, against the
fake firmware's independently written reports, and fuzzed with hypothesis. The verifier
tests pin SNP evidence through the ``sev-snp`` verifier plugin: it passes under the fake's
mock AMD chain with the simulator opt-in, and under no other circumstance.
"""

from __future__ import annotations

import itertools
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from dstack_sev_snp_stub.kds import SnpCollateral
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core import certs, snp
from dstack_core.envelope import AppInfo, Envelope
from dstack_core.errors import EvidenceError
from dstack_core.eventlog import RuntimeEvent
from dstack_core.osimage import OsImagePolicy
from dstack_core.snp import SnpReport, build_report, encode_signature, is_snp_report
from dstack_core.testing.fake_tee import FAKE_SNP_FAMILY_ID, FakeSnpMachine
from dstack_core.verify import (
    SNP_CHECK_NAMES,
    ExpectedReportData,
    VerifyOptions,
    evidence_from_json,
    load_evidence,
    verify_evidence,
)

from .conftest import run_cli

NOW = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp())
RD = bytes(range(64))
P384 = ec.SECP384R1()

# The spec's table (linux-tee-interfaces.md 4.2), written out independently of snp.py.
SPEC_OFFSETS = {
    "VERSION_OFFSET": 0x000, "GUEST_SVN_OFFSET": 0x004, "POLICY_OFFSET": 0x008,
    "FAMILY_ID_OFFSET": 0x010, "IMAGE_ID_OFFSET": 0x020, "VMPL_OFFSET": 0x030,
    "SIGNATURE_ALGO_OFFSET": 0x034, "CURRENT_TCB_OFFSET": 0x038, "PLATFORM_INFO_OFFSET": 0x040,
    "SIGNER_INFO_OFFSET": 0x048, "REPORT_DATA_OFFSET": 0x050, "MEASUREMENT_OFFSET": 0x090,
    "HOST_DATA_OFFSET": 0x0C0, "ID_KEY_DIGEST_OFFSET": 0x0E0, "AUTHOR_KEY_DIGEST_OFFSET": 0x110,
    "REPORT_ID_OFFSET": 0x140, "REPORT_ID_MA_OFFSET": 0x160, "REPORTED_TCB_OFFSET": 0x180,
    "CPUID_OFFSET": 0x188, "CHIP_ID_OFFSET": 0x1A0, "COMMITTED_TCB_OFFSET": 0x1E0,
    "LAUNCH_TCB_OFFSET": 0x1F0, "SIGNATURE_OFFSET": 0x2A0, "REPORT_SIZE": 0x4A0,
}


def signed(key: ec.EllipticCurvePrivateKey, **fields: object) -> bytes:
    """A report with ``fields``, signed over 0x000..0x29F as the firmware signs it."""
    report = build_report(**fields)
    r, s = decode_dss_signature(key.sign(report[:0x2A0], ec.ECDSA(hashes.SHA384())))
    return report[:0x2A0] + encode_signature(r, s)


@pytest.fixture(scope="module")
def vcek() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(P384)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> FakeSnpMachine:
    return FakeSnpMachine.create(tmp_path_factory.mktemp("snp") / "tree")


SNP_PLATFORM_CHECKS = ("vcek_chain", "snp_signature", "snp_tcb", "snp_policy")


@attrs.frozen
class Trust:
    """What verifies the fake machine's reports: its mock ARK (with the opt-in) and its
    VCEK and ASK."""

    options: VerifyOptions
    collateral: SnpCollateral


@pytest.fixture(scope="module")
def trust(machine: FakeSnpMachine) -> Trust:
    bundle = machine.trust_bundle()
    root = x509.load_pem_x509_certificate(bundle.root_ca_pem)
    return Trust(
        VerifyOptions(now=NOW, root_ca_der=root.public_bytes(serialization.Encoding.DER),
                      allow_simulator=True),
        SnpCollateral.from_bytes(bundle.collateral_json.encode()),
    )


def envelope_of(report: bytes, report_data: bytes = RD, **extra: object) -> Envelope:
    return Envelope(platform="sev-snp", evidence_format="sev-snp", quote=report,
                    report_data=report_data, **extra)  # type: ignore[arg-type]


def check_json(result) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}


class TestLayout:
    def test_offsets_are_the_specs(self):
        """Every named offset equals the spec table's value; the signature covers 0..0x29F."""
        for name, value in SPEC_OFFSETS.items():
            assert getattr(snp, name) == value, name
        assert snp.SIGNED_SIZE == 0x2A0 and snp.SIGNATURE_SIZE == 512
        assert snp.POLICY_DEBUG == 1 << 19

    def test_fields_read_from_their_offsets(self):
        """Every parsed field is the little-endian value at its spec offset."""
        raw = bytearray(bytes(range(256)) * 5)[:0x4A0]
        struct.pack_into("<I", raw, 0, 5)
        report = SnpReport.from_bytes(bytes(raw))
        assert report.guest_svn == struct.unpack_from("<I", raw, 0x4)[0]
        assert report.policy == struct.unpack_from("<Q", raw, 0x8)[0]
        assert report.vmpl == struct.unpack_from("<I", raw, 0x30)[0]
        assert report.signature_algo == struct.unpack_from("<I", raw, 0x34)[0]
        assert report.report_data == raw[0x50:0x90]
        assert report.measurement == raw[0x90:0xC0]
        assert report.host_data == raw[0xC0:0xE0]
        assert report.chip_id == raw[0x1A0:0x1E0]
        assert report.committed_tcb == struct.unpack_from("<Q", raw, 0x1E0)[0]
        assert report.signature_r == int.from_bytes(raw[0x2A0:0x2E8], "little")
        assert report.signature_s == int.from_bytes(raw[0x2E8:0x330], "little")
        assert report.signed_region == raw[:0x2A0] and report.signature == raw[0x2A0:]

    def test_build_report_round_trips(self):
        """build_report puts each field where from_bytes finds it."""
        report = SnpReport.from_bytes(build_report(
            version=2, guest_svn=7, policy=snp.POLICY_RESERVED_ONE | snp.POLICY_DEBUG, vmpl=1,
            report_data=RD, measurement=b"\x11" * 48, host_data=b"\x22" * 32,
            chip_id=b"\x33" * 64, committed_tcb=0x1234, family_id=b"fam",
        ))
        assert (report.version, report.guest_svn, report.vmpl) == (2, 7, 1)
        assert report.is_debug and report.cpuid_fms is None
        assert (report.report_data, report.measurement) == (RD, b"\x11" * 48)
        assert (report.host_data, report.chip_id) == (b"\x22" * 32, b"\x33" * 64)
        assert report.committed_tcb == 0x1234 and report.family_id == b"fam".ljust(16, b"\0")
        with pytest.raises(ValueError, match="unknown SNP report field"):
            build_report(nonsense=1)
        with pytest.raises(ValueError, match="at most"):
            build_report(host_data=bytes(33))

    @pytest.mark.parametrize("length", [0, 1, 0x49F, 0x4A1, 4000])
    def test_wrong_length_is_malformed(self, length):
        """Anything but exactly 1184 bytes is EvidenceError."""
        with pytest.raises(EvidenceError, match="1184"):
            SnpReport.from_bytes(bytes(length))
        assert not is_snp_report(bytes(length))

    @pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
    def test_unknown_version_is_malformed(self, version):
        """Versions other than 2..5 are refused with the version named."""
        data = build_report(version=version)
        with pytest.raises(EvidenceError, match=f"version {version}"):
            SnpReport.from_bytes(data)
        assert not is_snp_report(data)

    def test_not_bytes_is_malformed(self):
        """A str is refused as EvidenceError, not TypeError."""
        with pytest.raises(EvidenceError):
            SnpReport.from_bytes("x" * 1184)  # type: ignore[arg-type]

    def test_fake_firmware_report_parses_and_verifies(self, machine):
        """The fake's report (layout written independently) parses field by field, and its
        signature verifies with the fake VCEK."""
        report = SnpReport.from_bytes(machine.report(RD))
        assert report.version == 3 and report.vmpl == 0 and report.signature_algo == 1
        assert report.report_data == RD
        assert report.measurement == machine.measurement
        assert report.host_data == machine.host_data
        assert report.family_id == FAKE_SNP_FAMILY_ID
        assert not report.is_debug and report.cpuid_fms == (0x19, 1, 1)
        report.verify_signature(machine.vcek_public_key())
        assert json.loads(json.dumps(report.to_json()))["measurement"] == machine.measurement.hex()


class TestSignature:
    def test_valid_signature_verifies(self, vcek):
        """R and S as 72-byte little-endian numbers at 0x2A0 verify over 0x000..0x29F."""
        SnpReport.from_bytes(signed(vcek, report_data=RD)).verify_signature(vcek.public_key())

    @pytest.mark.parametrize("offset", [0x0, 0x50, 0x8F, 0x90, 0x29F])
    def test_flipped_signed_byte_fails(self, vcek, offset):
        """A flipped byte anywhere in the signed region fails verification."""
        data = bytearray(signed(vcek, report_data=RD))
        data[offset] ^= 1
        if offset == 0:
            data[0] = 2  # keep a known version
        with pytest.raises(EvidenceError, match="does not verify"):
            SnpReport.from_bytes(bytes(data)).verify_signature(vcek.public_key())

    def test_other_key_fails(self, vcek):
        """Another P-384 key does not verify it; a P-256 key is refused outright."""
        report = SnpReport.from_bytes(signed(vcek))
        with pytest.raises(EvidenceError, match="does not verify"):
            report.verify_signature(ec.generate_private_key(P384).public_key())
        with pytest.raises(EvidenceError, match="P-384"):
            report.verify_signature(ec.generate_private_key(ec.SECP256R1()).public_key())

    def test_zero_signature_and_other_algorithm_fail(self, vcek):
        """An all-zero signature, or signature_algo other than 1, never verifies."""
        with pytest.raises(EvidenceError, match="empty or out of range"):
            SnpReport.from_bytes(build_report()).verify_signature(vcek.public_key())
        other = signed(vcek, signature_algo=2)
        with pytest.raises(EvidenceError, match="algorithm 2"):
            SnpReport.from_bytes(other).verify_signature(vcek.public_key())


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=1300))
    def test_arbitrary_bytes_parse_or_raise_evidence_error(self, data):
        """Any input either parses or raises EvidenceError; nothing else escapes."""
        try:
            report = SnpReport.from_bytes(data)
        except EvidenceError:
            return
        assert len(data) == 0x4A0 and report.raw == data

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(sorted(snp.REPORT_VERSIONS)),
        st.binary(min_size=0x4A0 - 4, max_size=0x4A0 - 4),
    )
    def test_any_well_sized_report_parses_to_its_slices(self, version, body):
        """A 1184-byte report of a known version parses, whatever its other bytes."""
        data = struct.pack("<I", version) + body
        report = SnpReport.from_bytes(data)
        assert report.version == version
        assert report.report_data == data[0x50:0x90]
        assert report.measurement == data[0x90:0xC0]
        assert report.host_data == data[0xC0:0xE0]
        assert report.is_debug == bool(struct.unpack_from("<Q", data, 8)[0] >> 19 & 1)
        assert is_snp_report(data)

    @settings(max_examples=100, deadline=None)
    @given(
        report_data=st.binary(min_size=64, max_size=64),
        measurement=st.binary(min_size=48, max_size=48),
        host_data=st.binary(min_size=32, max_size=32),
        policy=st.integers(0, 2**64 - 1),
        vmpl=st.integers(0, 3),
        guest_svn=st.integers(0, 2**32 - 1),
    )
    def test_build_then_parse_is_identity(self, report_data, measurement, host_data, policy,
                                          vmpl, guest_svn):
        """build_report and from_bytes agree on every field for any values."""
        report = SnpReport.from_bytes(build_report(
            report_data=report_data, measurement=measurement, host_data=host_data,
            policy=policy, vmpl=vmpl, guest_svn=guest_svn,
        ))
        assert (report.report_data, report.measurement, report.host_data) == (
            report_data, measurement, host_data)
        assert (report.policy, report.vmpl, report.guest_svn) == (policy, vmpl, guest_svn)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=1, max_size=2000))
    def test_envelope_with_arbitrary_quote_loads_or_raises(self, quote):
        """A sev-snp envelope with any quote bytes loads or raises EvidenceError."""
        data = envelope_of(quote).to_cbor()
        try:
            evidence = load_evidence(data)
        except EvidenceError:
            return
        assert evidence.snp_report is not None and evidence.snp_report.raw == quote


class TestVerifier:
    """SNP evidence through the core and the ``sev-snp`` verifier plugin: it verifies
    ``pass`` under the fake machine's mock AMD chain with the simulator opt-in, and under no
    other circumstance."""

    def test_envelope_is_recognised_and_checked(self, machine, trust):
        """A sev-snp envelope decodes to SNP evidence; every SNP check is listed in order and
        the platform checks are the plugin's, all mandatory."""
        evidence = load_evidence(envelope_of(machine.report(RD)).to_cbor())
        assert evidence.evidence_format == "sev-snp" and evidence.quote is None
        assert evidence.snp_report is not None and evidence.bound_report_data == RD
        result = verify_evidence(evidence, trust.options, trust.collateral)
        assert [c.name for c in result.checks] == list(SNP_CHECK_NAMES)
        assert check_json(result) == {
            "evidence": "pass", "vcek_chain": "pass", "snp_signature": "pass",
            "snp_tcb": "pass", "snp_policy": "pass", "event_log": "skipped",
            "runtime_events": "skipped", "envelope_binding": "pass", "report_data": "skipped",
            "ratls_binding": "skipped", "ratls_chain": "skipped", "os_image": "skipped",
        }
        assert all(result.check(n).mandatory for n in SNP_PLATFORM_CHECKS)
        assert result.verifier is not None
        assert (result.verifier.plugin, result.verifier.evidence_format) == (
            "dstack-sev-snp-stub", "sev-snp")

    def test_passes_with_its_mock_trust_bundle(self, machine, trust):
        """With the machine's mock ARK, VCEK and ASK and --allow-simulator: pass, simulated,
        its TCB status, and no identity claim (SNP has no registers to bind events to)."""
        result = verify_evidence(
            load_evidence(envelope_of(machine.report(RD)).to_cbor()),
            attrs.evolve(trust.options, expected_report_data=ExpectedReportData.raw(RD)),
            trust.collateral,
        )
        assert result.verdict == "pass", result.reason
        assert result.simulated and result.platform == "sev-snp"
        assert result.tcb_status == "UpToDate" and result.report_data == RD
        assert not result.identity_bound and result.app_id == b"" and result.mrtd == b""
        assert any("no MRTD or RTMRs" in w for w in result.warnings)

    def test_fails_without_allow_simulator(self, machine, trust):
        """The same evidence and anchors without the opt-in: vcek_chain fails on the root."""
        options = attrs.evolve(trust.options, allow_simulator=False)
        result = verify_evidence(
            load_evidence(envelope_of(machine.report(RD)).to_cbor()), options, trust.collateral
        )
        assert result.verdict == "fail"
        assert result.reason.startswith("vcek_chain:") and "allow_simulator" in result.reason
        assert result.tcb_status is None

    def test_never_under_amds_roots(self, machine, trust):
        """AMD's pinned ARKs do not sign the mock chain, opt-in or not."""
        for allow in (False, True):
            options = VerifyOptions(now=NOW, allow_simulator=allow)
            result = verify_evidence(
                load_evidence(envelope_of(machine.report(RD)).to_cbor()), options,
                trust.collateral,
            )
            assert result.verdict == "fail" and result.reason.startswith("vcek_chain:")

    @pytest.mark.parametrize(
        ("allow_simulator", "root", "stripped"),
        list(itertools.product([False, True], [None, "mock"], [False, True])),
    )
    def test_no_option_passes_without_collateral(
        self, machine, trust, allow_simulator, root, stripped
    ):
        """No combination of verifier options accepts a report without its VCEK chain."""
        options = VerifyOptions(
            now=NOW, allow_simulator=allow_simulator,
            root_ca_der=trust.options.root_ca_der if root else None,
            allow_stripped_event_log=stripped, expected_report_data=ExpectedReportData.raw(RD),
        )
        result = verify_evidence(load_evidence(envelope_of(machine.report(RD)).to_cbor()), options)
        assert result.verdict == "fail"
        assert result.check("vcek_chain").status == "fail"
        assert result.check("snp_signature").status != "pass"

    def test_envelope_report_data_mismatch_fails_binding(self, machine, trust):
        """An envelope claiming report data other than the report's fails envelope_binding."""
        result = verify_evidence(
            load_evidence(envelope_of(machine.report(RD), report_data=bytes(64)).to_cbor()),
            trust.options, trust.collateral,
        )
        assert result.check("envelope_binding").status == "fail"
        assert result.reason.startswith("envelope_binding: envelope report_data")

    def test_unexpected_report_data_fails(self, machine, trust):
        """An expectation that the report does not carry fails report_data (named first)."""
        result = verify_evidence(
            load_evidence(envelope_of(machine.report(RD)).to_cbor()),
            attrs.evolve(trust.options, expected_report_data=ExpectedReportData.raw(b"other")),
            trust.collateral,
        )
        assert result.check("report_data").status == "fail"
        assert result.reason.startswith("report_data:")

    def test_debug_policy_fails(self, vcek):
        """A report whose policy allows DEBUG fails snp_policy."""
        report = signed(vcek, report_data=RD, policy=snp.POLICY_RESERVED_ONE | snp.POLICY_DEBUG)
        result = verify_evidence(load_evidence(envelope_of(report).to_cbor()), VerifyOptions(now=NOW))
        assert result.check("snp_policy").status == "fail"
        assert "DEBUG" in result.check("snp_policy").detail
        assert result.verdict == "fail"

    def test_reserved_policy_bit_clear_fails(self, vcek):
        """Policy bit 17 must be one; a report without it fails snp_policy."""
        report = signed(vcek, report_data=RD, policy=0)
        result = verify_evidence(load_evidence(envelope_of(report).to_cbor()), VerifyOptions(now=NOW))
        assert result.check("snp_policy").status == "fail"

    def test_resigned_report_fails_signature(self, machine, trust):
        """The machine's report with one bit of its measurement flipped: the VCEK chain
        still verifies, the signature does not."""
        report = bytearray(machine.report(RD))
        report[0x90] ^= 1
        result = verify_evidence(load_evidence(envelope_of(bytes(report)).to_cbor()),
                                 trust.options, trust.collateral)
        assert result.check("vcek_chain").status == "pass"
        assert result.check("snp_signature").status == "fail"
        assert result.verdict == "fail" and result.tcb_status is None

    def test_app_info_claims_fail_binding(self, machine, trust):
        """app_info claims cannot be backed by an SNP report: envelope_binding fails."""
        envelope = envelope_of(machine.report(RD), app_info=AppInfo(app_id=b"\x01" * 20))
        result = verify_evidence(load_evidence(envelope.to_cbor()), trust.options, trust.collateral)
        assert result.check("envelope_binding").status == "fail"
        assert "app_info" in result.check("envelope_binding").detail
        assert result.app_id == b""

    def test_event_log_is_reported_unbound(self, machine, trust):
        """Events in an SNP envelope are skipped as unverified claims (no RTMRs), never
        reported, whatever the verdict."""
        event = RuntimeEvent(event="app-id", payload=b"\x01" * 20).to_tdx_event()
        envelope = envelope_of(machine.report(RD), event_log=(event,))
        result = verify_evidence(load_evidence(envelope.to_cbor()), trust.options, trust.collateral)
        assert result.check("event_log").status == "skipped"
        assert "unverified" in result.check("event_log").detail
        assert result.verdict == "pass"
        assert result.runtime_events == () and not result.identity_bound

    def test_os_image_policy_cannot_be_met(self, machine, trust):
        """With an OS image policy, os_image is mandatory and SNP evidence cannot meet it."""
        policy = OsImagePolicy.single(b"\x01" * 32, b"\x02" * 48, [b"\x03" * 48] * 3)
        result = verify_evidence(
            load_evidence(envelope_of(machine.report(RD)).to_cbor()),
            attrs.evolve(trust.options, os_image_policy=policy), trust.collateral,
        )
        assert result.check("os_image").mandatory and result.verdict == "fail"
        assert result.reason.startswith("os_image:")

    def test_json_documents(self, machine, trust):
        """to_json carries the parsed report and names the plugin; the upstream shape says
        the quote verified, the SNP variant, and is not valid (no OS image policy applies)."""
        result = verify_evidence(load_evidence(envelope_of(machine.report(RD)).to_cbor()),
                                 trust.options, trust.collateral)
        doc = json.loads(json.dumps(result.to_json()))
        assert doc["evidence_format"] == "sev-snp" and doc["quote_version"] == 3
        assert doc["sev_snp"]["measurement"] == machine.measurement.hex()
        assert doc["sev_snp"]["report_data"] == RD.hex() == doc["report_data"]
        assert set(doc["checks"]) == set(SNP_CHECK_NAMES)
        assert doc["verifier"]["plugin"] == "dstack-sev-snp-stub"
        assert doc["verifier"]["checks"] == list(SNP_PLATFORM_CHECKS)
        upstream = result.to_upstream_json()
        assert upstream["is_valid"] is False and upstream["reason"].startswith("os_image:")
        assert upstream["details"]["quote_verified"] is True
        assert upstream["details"]["tee_variant"] == "dstack-amd-sev-snp"

    def test_json_attestation_body(self, machine):
        """An Attest-shaped JSON body with the envelope in hex is recognised too."""
        evidence = evidence_from_json({"attestation": envelope_of(machine.report(RD)).to_cbor().hex()})
        assert evidence.snp_report is not None

    def test_ratls_certificate_with_snp_envelope(self, machine, trust):
        """An RA-TLS certificate carrying an SNP envelope: the binding to its key and the
        chain are checked, and with the mock trust bundle it verifies."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = certs.new_app_ca(ca_key, now=datetime.now(UTC))
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        report_data = certs.ratls_report_data(certs.spki_der(leaf_key.public_key()))
        envelope = envelope_of(machine.report(report_data), report_data=report_data)
        leaf = certs.issue_certificate(
            ca, leaf_key.public_key(),
            certs.TlsCertificateRequest(subject="snp", attestation=envelope.to_cbor()),
            now=datetime.now(UTC),
        )
        pem = certs.cert_pem(leaf) + ca.cert_pem
        anchor = ca.cert.public_bytes(serialization.Encoding.DER)
        options = attrs.evolve(trust.options, now=int(datetime.now(UTC).timestamp()),
                               ratls_trust_anchors=[anchor])
        result = verify_evidence(load_evidence(pem), options, trust.collateral)
        assert result.evidence_kind == "ratls-certificate"
        assert result.check("ratls_binding").status == "pass"
        assert result.check("ratls_binding").mandatory
        assert result.check("ratls_chain").status == "pass"
        assert result.verdict == "pass", result.reason
        unverified = verify_evidence(load_evidence(pem), options)
        assert unverified.verdict == "fail"

    def test_ratls_binding_to_other_key_fails(self, machine):
        """An SNP envelope bound to another key fails ratls_binding."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = certs.new_app_ca(ca_key, now=datetime.now(UTC))
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        envelope = envelope_of(machine.report(RD))
        leaf = certs.issue_certificate(
            ca, leaf_key.public_key(),
            certs.TlsCertificateRequest(subject="snp", attestation=envelope.to_cbor()),
            now=datetime.now(UTC),
        )
        result = verify_evidence(load_evidence(certs.cert_pem(leaf)),
                                 VerifyOptions(now=int(datetime.now(UTC).timestamp())))
        assert result.check("ratls_binding").status == "fail"

    def test_cli_verify(self, machine, tmp_path: Path):
        """dstack-agent verify on an SNP envelope: exit 0 with the machine's trust bundle and
        --allow-simulator; exit 1 naming vcek_chain without the opt-in or without anchors."""
        path = tmp_path / "snp.cbor"
        path.write_bytes(envelope_of(machine.report(RD)).to_cbor())
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        anchors = machine.trust_bundle()
        (bundle / "root_ca.pem").write_bytes(anchors.root_ca_pem)
        (bundle / "collateral.json").write_text(anchors.collateral_json)
        done = run_cli("verify", str(path), "--trust-bundle", str(bundle), "--allow-simulator",
                       "--now", str(NOW), check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(done.stdout)
        assert doc["verdict"] == "pass" and doc["evidence_format"] == "sev-snp"
        assert doc["checks"]["snp_signature"]["status"] == "pass"
        for extra in ([], ["--allow-simulator"]):
            flags = ["--trust-bundle", str(bundle)] if not extra else extra
            done = run_cli("verify", str(path), *flags, "--now", str(NOW), check=False)
            assert done.returncode == 1, done.stdout + done.stderr
            assert "verdict fail: vcek_chain:" in done.stderr

    def test_fake_signature_is_real_but_not_trusted(self, machine):
        """The fake's signature verifies with its key, but without its chain (or under AMD's
        roots) the verifier does not pass it: nothing says the key is a VCEK."""
        report = SnpReport.from_bytes(machine.report(RD))
        report.verify_signature(machine.vcek_public_key())
        result = verify_evidence(load_evidence(envelope_of(report.raw).to_cbor()),
                                 VerifyOptions(now=NOW))
        assert result.check("snp_signature").status == "skipped"
        assert result.verdict == "fail"
