"""Tests for dstack_core.verify (and dstack_core.collateral): evidence from a real simulator
agent, evidence built with the mock PKI, tampering, dcap-qvl failure mapping, fuzzing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from dstack_tdx.qvl import QvlOutcome as _QvlOutcome
from dstack_tdx.qvl import dcap_checks as _dcap_checks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack_core import certs, mockpki
from dstack_core.collateral import (
    Collateral,
    CollateralCache,
    CollateralSource,
    collateral_key,
    load_collateral_file,
)
from dstack_core.envelope import Envelope
from dstack_core.errors import ConfigurationError, DstackError, EvidenceError
from dstack_core.eventlog import TdxEvent, events_from_json, events_to_json
from dstack_core.mockpki import MOCK_TD_ATTRIBUTES, SIMULATOR_USER_DATA, MockIntelPki
from dstack_core.quote import TdReport, TdxQuote
from dstack_core.testing import AgentProcess
from dstack_core.verify import (
    CHECK_NAMES,
    MAX_EVIDENCE_SIZE,
    CheckResult,
    ExpectedReportData,
    VerificationResult,
    VerifyOptions,
    evidence_from_json,
    load_evidence,
    sniff_evidence,
    verify,
    verify_evidence,
)

from .conftest import Bundle, trust_bundle_for

DATA = Path(__file__).parent / "data"
REAL_QUOTE = (DATA / "tdx_quote_v4.bin").read_bytes()
NOW = int(time.time())
XFAM_OFFSET = 48 + 128
REPORT_DATA = b"verify-tests".ljust(64, b"\0")


@attrs.frozen
class Sample:
    """Evidence taken once from the module's simulator agent."""

    attestation: bytes
    get_quote: dict[str, Any]
    tls_chain: list[str]
    bundle: Bundle


@pytest.fixture(scope="module")
def sample(agent: AgentProcess, bundle: Bundle) -> Sample:
    status, attest = agent.call("Attest", {"report_data": REPORT_DATA.hex()})
    assert status == 200
    status, quote = agent.call("GetQuote", {"report_data": REPORT_DATA.hex()})
    assert status == 200
    status, tls = agent.call(
        "GetTlsKey", {"subject": "app.example", "alt_names": ["app.example"], "usage_ra_tls": True}
    )
    assert status == 200
    return Sample(bytes.fromhex(attest["attestation"]), quote, tls["certificate_chain"], bundle)


@pytest.fixture(scope="module")
def collateral(sample: Sample) -> Collateral:
    return Collateral.from_json(sample.bundle.collateral_json)


def trusting(sample: Sample, **changes: Any) -> VerifyOptions:
    """Options that trust the simulator (its root CA, opt-in, its OS image policy)."""
    return sample.bundle.verify_options(NOW, **changes)


def statuses(result: VerificationResult) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}


def reencode(raw: bytes, **changes: Any) -> bytes:
    return attrs.evolve(Envelope.from_cbor(raw), **changes).to_cbor()


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


class TestSimulatorEvidence:
    def test_attest_envelope_passes_with_bundle_and_opt_in(self, sample, collateral):
        """Real Attest evidence verifies with the trust bundle and opt-in; simulated: true."""
        result = verify(sample.attestation, trusting(sample), collateral)
        assert result.verdict == "pass", result.to_json()
        assert result.simulated and result.platform == "simulator"
        assert result.to_json()["simulated"] is True
        assert "SIMULATED" in result.to_json()["warning"]
        assert "SIMULATED" in result.check("simulator_policy").detail
        assert result.tcb_status == "UpToDate"
        assert result.report_data == REPORT_DATA
        assert [c.name for c in result.checks] == list(CHECK_NAMES)
        for name in (
            "collateral",
            "certificate_chain",
            "qe_identity",
            "quote_signature",
            "tcb_status",
            "td_attributes",
            "mr_signer_seam",
            "event_log",
            "runtime_events",
            "envelope_binding",
        ):
            assert result.check(name).status == "pass", name
            assert result.check(name).mandatory, name

    def test_extracted_values_match_the_agent(self, agent, sample, collateral):
        """app_id, compose_hash, instance_id, key_provider, mr_aggregated equal Info's."""
        status, info = agent.call("Info")
        assert status == 200
        result = verify(sample.attestation, trusting(sample), collateral)
        assert result.app_id.hex() == info["app_id"]
        assert result.compose_hash.hex() == info["compose_hash"]
        assert result.instance_id.hex() == info["instance_id"]
        assert result.mr_aggregated.hex() == info["mr_aggregated"]
        assert result.os_image_hash.hex() == info["os_image_hash"]
        assert result.key_provider == json.loads(info["key_provider_info"])
        assert result.device_id == hashlib.sha256(bytes(16)).digest()
        tcb = json.loads(info["tcb_info"])
        assert [r.hex() for r in result.rtmrs] == [tcb[f"rtmr{i}"] for i in range(4)]

    def test_rejected_without_opt_in(self, sample, collateral):
        """Without --allow-simulator the simulator_policy check fails, and the verdict."""
        options = VerifyOptions(now=NOW, root_ca_der=sample.bundle.root_ca_der)
        result = verify(sample.attestation, options, collateral)
        assert result.verdict == "fail"
        assert result.check("simulator_policy").status == "fail"
        assert "--allow-simulator" in result.check("simulator_policy").detail
        assert result.reason.startswith("simulator_policy")

    def test_rejected_under_intel_root(self, sample, collateral):
        """Against Intel's root the mock collateral fails dcap-qvl, and the policy fails."""
        result = verify(sample.attestation, VerifyOptions(now=NOW), collateral)
        assert result.verdict == "fail"
        assert result.check("simulator_policy").status == "fail"
        assert result.check("collateral").status == "fail"
        assert "root CA CRL" in result.check("collateral").detail
        assert result.check("quote_signature").status == "skipped"
        assert "not reached" in result.check("quote_signature").detail

    def test_opt_in_without_root_fails(self, sample, collateral):
        """Opting in without the simulator's root is not enough."""
        result = verify(
            sample.attestation, VerifyOptions(now=NOW, allow_simulator=True), collateral
        )
        assert result.check("simulator_policy").status == "fail"
        assert "no simulator root CA" in result.check("simulator_policy").detail

    def test_get_quote_json_passes(self, sample, collateral):
        """GetQuote's JSON body (quote + stripped event log) verifies; binding to its report_data."""
        result = verify(json.dumps(sample.get_quote), trusting(sample), collateral)
        assert result.verdict == "pass", result.to_json()
        assert result.evidence_kind == "quote"
        assert result.platform == "simulator"

    def test_ratls_certificate_passes(self, sample, collateral):
        """A GetTlsKey RA-TLS chain verifies: the attestation binds the leaf's key. Its chain
        is untrusted (never pass) until the caller names a trust anchor, then it passes."""
        result = verify("".join(sample.tls_chain), trusting(sample), collateral)
        assert result.verdict == "pass", result.to_json()
        assert result.evidence_kind == "ratls-certificate"
        assert result.check("ratls_binding").status == "pass"
        assert result.check("ratls_binding").mandatory
        assert result.check("ratls_chain").status == "skipped"
        assert "UNTRUSTED" in result.check("ratls_chain").detail
        ca = x509.load_pem_x509_certificate(sample.tls_chain[1].encode())
        anchored = trusting(sample, ratls_trust_anchors=[ca.public_bytes(Encoding.DER)])
        result = verify("".join(sample.tls_chain), anchored, collateral)
        assert result.check("ratls_chain").status == "pass" and result.verdict == "pass"

    def test_expected_report_data(self, sample, collateral):
        """report_data passes when it equals the expectation, fails otherwise."""
        good = trusting(sample, expected_report_data=ExpectedReportData.raw(b"verify-tests"))
        assert verify(sample.attestation, good, collateral).check("report_data").status == "pass"
        bad = trusting(sample, expected_report_data=ExpectedReportData.raw(b"other"))
        result = verify(sample.attestation, bad, collateral)
        assert result.check("report_data").status == "fail"
        assert result.verdict == "fail"

    def test_app_data_content_type(self, agent, sample, collateral):
        """Tappd's sha512("app-data:" || data) quote matches a content-type expectation."""
        status, body = agent.call(
            "prpc/Tappd.TdxQuote", {"report_data": b"hello".hex(), "hash_algorithm": "sha512"}
        )
        assert status == 200
        expected = ExpectedReportData.for_content(b"hello")
        assert expected.description == 'sha512("app-data:" || data)'
        result = verify(
            json.dumps(body), trusting(sample, expected_report_data=expected), collateral
        )
        assert result.check("report_data").status == "pass", result.to_json()

    def test_skipped_checks_say_why(self, sample, collateral):
        """Every skipped check has a reason; without collateral the verdict is fail."""
        result = verify(sample.attestation, trusting(sample), None)
        assert result.verdict == "fail"
        for check in result.checks:
            if check.status == "skipped":
                assert check.detail, check.name
        assert "no collateral" in result.check("quote_signature").detail
        assert "no expectation" in result.check("report_data").detail


class TestTampering:
    def test_flipped_quote_byte_fails_quote_signature(self, sample, collateral):
        """One flipped byte in the quote body fails quote_signature (and nothing before it)."""
        envelope = Envelope.from_cbor(sample.attestation)
        tampered = reencode(sample.attestation, quote=flip(envelope.quote, XFAM_OFFSET))
        result = verify(tampered, trusting(sample), collateral)
        found = statuses(result)
        assert found["quote_signature"] == "fail"
        assert "ISV enclave report signature" in result.check("quote_signature").detail
        assert found["collateral"] == found["certificate_chain"] == found["qe_identity"] == "pass"
        assert found["tcb_status"] == "skipped"
        assert result.verdict == "fail"

    def test_flipped_quote_report_data_fails(self, sample, collateral):
        """A flipped report_data byte in the quote breaks the signature and the binding."""
        envelope = Envelope.from_cbor(sample.attestation)
        offset = TdxQuote.from_bytes(envelope.quote).report_data_offset
        result = verify(
            reencode(sample.attestation, quote=flip(envelope.quote, offset)),
            trusting(sample),
            collateral,
        )
        assert statuses(result)["quote_signature"] == "fail"
        assert statuses(result)["envelope_binding"] == "fail"

    def test_flipped_boot_event_fails_event_log(self, sample, collateral):
        """One flipped byte in a boot event digest fails event_log (RTMR0 mismatch)."""
        envelope = Envelope.from_cbor(sample.attestation)
        first = envelope.event_log[0]
        events = (attrs.evolve(first, digest=flip(first.digest, 5)),) + envelope.event_log[1:]
        result = verify(
            reencode(sample.attestation, event_log=events), trusting(sample), collateral
        )
        assert result.check("event_log").status == "fail"
        assert "RTMR0 MISMATCH" in result.check("event_log").detail
        assert result.check("quote_signature").status == "pass"
        assert result.verdict == "fail"

    def test_flipped_runtime_payload_fails_replay_and_claims(self, sample, collateral):
        """A flipped byte in the app-id payload fails RTMR3, the digest and the claims."""
        envelope = Envelope.from_cbor(sample.attestation)
        events = tuple(
            attrs.evolve(e, event_payload=flip(e.event_payload, 0)) if e.event == "app-id" else e
            for e in envelope.event_log
        )
        result = verify(
            reencode(sample.attestation, event_log=events), trusting(sample), collateral
        )
        found = statuses(result)
        assert found["event_log"] == "fail" and "RTMR3 MISMATCH" in result.check("event_log").detail
        assert found["runtime_events"] == "fail"
        assert found["envelope_binding"] == "fail"
        assert "RTMR3 does not replay" in result.check("envelope_binding").detail
        assert result.app_id == b"" and not result.identity_bound

    def test_flipped_envelope_report_data_fails_binding(self, sample, collateral):
        """One flipped byte in the envelope's report_data fails envelope_binding only."""
        result = verify(
            reencode(sample.attestation, report_data=flip(REPORT_DATA, 3)),
            trusting(sample),
            collateral,
        )
        failed = result.failed
        assert failed == ("envelope_binding",)
        assert "report_data" in result.check("envelope_binding").detail

    def test_forged_app_info_claim_fails_binding(self, sample, collateral):
        """A claimed compose_hash that the event log does not support fails the binding."""
        envelope = Envelope.from_cbor(sample.attestation)
        forged = attrs.evolve(envelope.app_info, compose_hash=b"\x00" * 32)
        result = verify(reencode(sample.attestation, app_info=forged), trusting(sample), collateral)
        assert result.failed == ("envelope_binding",)
        assert "compose_hash" in result.check("envelope_binding").detail

    def test_tdx_platform_tag_on_simulator_quote_fails(self, sample, collateral):
        """An envelope relabelled 'tdx' around a simulator quote is caught."""
        result = verify(reencode(sample.attestation, platform="tdx"), trusting(sample), collateral)
        assert result.check("envelope_binding").status == "fail"
        assert "DSTACK-SIMULATOR" in result.check("envelope_binding").detail
        assert result.simulated

    def test_flipped_certificate_byte_fails_chain(self, sample, collateral):
        """One flipped byte in the leaf's subject fails ratls_chain (the CA's signature)."""
        leaf = x509.load_pem_x509_certificate(sample.tls_chain[0].encode())
        der = leaf.public_bytes(Encoding.DER)
        tampered = x509.load_der_x509_certificate(flip(der, der.index(b"app.example")))
        chain = certs.cert_pem(tampered) + sample.tls_chain[1]
        result = verify(chain, trusting(sample), collateral)
        assert result.check("ratls_chain").status == "fail"
        assert "not issued by certificate 1" in result.check("ratls_chain").detail
        assert result.check("ratls_binding").status == "pass"
        assert result.verdict == "fail"

    def test_attestation_on_another_key_fails_binding(self, sample, collateral):
        """An attestation copied into a certificate for another key fails ratls_binding."""
        leaf = certs.RaTlsCertificate.from_certificate(
            x509.load_pem_x509_certificate(sample.tls_chain[0].encode())
        )
        ca = certs.new_app_ca(certs.new_tls_key(), now=datetime.now(UTC))
        thief = certs.issue_certificate(
            ca,
            certs.new_tls_key().public_key(),
            certs.TlsCertificateRequest(subject="thief", attestation=leaf.attestation),
            now=datetime.now(UTC),
        )
        result = verify(certs.cert_pem(thief) + ca.cert_pem, trusting(sample), collateral)
        assert result.check("ratls_binding").status == "fail"
        assert "does not belong to this certificate's key" in result.check("ratls_binding").detail
        assert result.check("ratls_chain").status == "skipped"
        assert result.verdict == "fail"

    def test_stripped_boot_log_skips_then_allows(self, sample, collateral):
        """A log without boot events (lite-stripped) leaves event_log skipped unless allowed."""
        doc = dict(sample.get_quote)
        events = [e for e in events_from_json(doc["event_log"]) if e.imr == 3 or e.is_acpi_data]
        doc["event_log"] = events_to_json(events, strip=True)
        result = verify(json.dumps(doc), trusting(sample), collateral)
        assert result.check("event_log").status == "skipped"
        assert "lite-stripped" in result.check("event_log").detail
        assert "RTMR3 ok" in result.check("event_log").detail
        assert result.verdict == "fail"
        allowed = verify(
            json.dumps(doc), trusting(sample, allow_stripped_event_log=True), collateral
        )
        assert allowed.verdict == "pass", allowed.to_json()


# --- dcap-qvl failure mapping with quotes from our own mock PKI ---------------------------

SEED = b"verify-tests".ljust(32, b"\0")
PKI = MockIntelPki.from_seed(SEED)


def mock_report(**changes: Any) -> TdReport:
    fields: dict[str, Any] = {
        "tee_tcb_svn": bytes(16),
        "mr_seam": bytes(48),
        "mr_signer_seam": bytes(48),
        "seam_attributes": bytes(8),
        "td_attributes": MOCK_TD_ATTRIBUTES,
        "xfam": bytes(8),
        "mr_td": bytes(48),
        "mr_config_id": bytes(48),
        "mr_owner": bytes(48),
        "mr_owner_config": bytes(48),
        "rtmr0": bytes(48),
        "rtmr1": bytes(48),
        "rtmr2": bytes(48),
        "rtmr3": bytes(48),
        "report_data": bytes(64),
    }
    fields.update(changes)
    return TdReport(**fields)


def mock_quote(version: int = 4, **changes: Any) -> bytes:
    return PKI.sign_quote(mock_report(**changes), user_data=SIMULATOR_USER_DATA, version=version)


def mock_options(**changes: Any) -> VerifyOptions:
    fields: dict[str, Any] = {"now": NOW, "root_ca_der": PKI.root_ca_der, "allow_simulator": True}
    return VerifyOptions(**{**fields, **changes})


def collateral_with(**fields: Any) -> Collateral:
    doc = json.loads(PKI.collateral_json())
    doc.update(fields)
    return Collateral.from_json(json.dumps(doc))


def resigned_tcb_info(**level: Any) -> Collateral:
    """The PKI's collateral with a TCB level changed and re-signed by its TCB key."""
    info = mockpki._tcb_info()
    info["tcbLevels"][0].update(level)
    text, signature = mockpki._sign_json(info, mockpki._derive_key(SEED, "tcb-signing"))
    return collateral_with(tcb_info=text, tcb_info_signature=signature.hex())


@pytest.fixture(scope="module")
def pki_collateral() -> Collateral:
    return Collateral.from_json(PKI.collateral_json())


class TestDcapMapping:
    def test_bare_mock_quote_checks_pass_but_event_log_skipped(self, pki_collateral):
        """A bare quote verifies through dcap-qvl; without a log the verdict stays fail."""
        result = verify(mock_quote(), mock_options(), pki_collateral)
        found = statuses(result)
        assert all(
            found[n] == "pass"
            for n in (
                "collateral",
                "certificate_chain",
                "qe_identity",
                "quote_signature",
                "tcb_status",
            )
        )
        assert found["event_log"] == "skipped" and result.check("event_log").mandatory
        assert found["envelope_binding"] == "skipped"
        assert not result.check("envelope_binding").mandatory
        assert result.verdict == "fail"

    def test_debug_td(self, pki_collateral):
        """The debug bit fails td_attributes (ours and dcap-qvl's 'Debug mode')."""
        quote = mock_quote(td_attributes=bytes.fromhex("0100001000000000"))
        result = verify(quote, mock_options(), pki_collateral)
        detail = result.check("td_attributes").detail
        assert result.check("td_attributes").status == "fail"
        assert "DEBUG bit is set" in detail and "Debug mode is enabled" in detail
        assert result.check("quote_signature").status == "pass"

    def test_mr_signer_seam(self, pki_collateral):
        """A non-zero mr_signer_seam fails mr_signer_seam and dcap-qvl's module identity."""
        result = verify(mock_quote(mr_signer_seam=b"\x01" * 48), mock_options(), pki_collateral)
        assert result.check("mr_signer_seam").status == "fail"
        assert result.check("tcb_status").status == "fail"
        assert "TDX module identity" in result.check("tcb_status").detail

    def test_v5_quote_and_mr_service_td(self, pki_collateral):
        """v5 (TD 1.5) quotes verify; a non-zero mr_service_td fails that check."""
        good = verify(mock_quote(version=5), mock_options(), pki_collateral)
        assert good.quote_version == 5
        assert good.check("mr_service_td").status == "pass"
        assert good.check("mr_service_td").mandatory
        assert good.check("quote_signature").status == "pass"
        bad = verify(
            mock_quote(version=5, tee_tcb_svn2=bytes(16), mr_service_td=b"\x02" * 48),
            mock_options(),
            pki_collateral,
        )
        assert bad.check("mr_service_td").status == "fail"
        assert "Invalid MR service TD" in bad.check("mr_service_td").detail

    def test_qe_report_flip_fails_qe_identity(self, pki_collateral):
        """A flipped QE report byte fails qe_identity; the chain before it passed."""
        quote = mock_quote()
        result = verify(flip(quote, 800), mock_options(), pki_collateral)
        assert result.check("qe_identity").status == "fail"
        assert result.check("certificate_chain").status == "pass"
        assert result.check("quote_signature").status == "skipped"

    def test_pck_chain_from_other_pki_fails_certificate_chain(self, pki_collateral):
        """A quote signed by another mock PKI fails certificate_chain, collateral passes."""
        other = MockIntelPki.from_seed(b"\x07" * 32)
        quote = other.sign_quote(mock_report(), user_data=SIMULATOR_USER_DATA)
        result = verify(quote, mock_options(), pki_collateral)
        assert result.check("certificate_chain").status == "fail"
        assert result.check("collateral").status == "pass"

    def test_bad_tcb_info_signature_fails_collateral(self):
        """A TCB info signature that does not verify fails collateral."""
        result = verify(mock_quote(), mock_options(), collateral_with(tcb_info_signature="00" * 64))
        assert result.check("collateral").status == "fail"
        assert "tcb_info" in result.check("collateral").detail
        assert result.check("certificate_chain").status == "skipped"

    def test_foreign_tcb_issuer_chain_is_attributed_to_collateral(self):
        """dcap-qvl's ambiguous 'Failed to verify certificate chain' is pinned on collateral
        when the TCB-info chain is the broken one."""
        other = json.loads(MockIntelPki.from_seed(b"\x08" * 32).collateral_json())
        collateral = collateral_with(tcb_info_issuer_chain=other["tcb_info_issuer_chain"])
        result = verify(mock_quote(), mock_options(), collateral)
        assert result.check("collateral").status == "fail"
        assert "Failed to verify certificate chain" in result.check("collateral").detail
        assert result.check("certificate_chain").status == "skipped"

    def test_pinned_now_before_issue_fails_collateral(self, pki_collateral):
        """--now before the collateral's issue date fails collateral ("in the future")."""
        result = verify(mock_quote(), mock_options(now=1_500_000_000), pki_collateral)
        assert result.check("collateral").status == "fail"
        assert "future" in result.check("collateral").detail
        assert result.verified_at == 1_500_000_000

    def test_tcb_status_policy_and_advisories(self):
        """A non-UpToDate status fails by default, passes when allowed; advisories can fail."""
        collateral = resigned_tcb_info(
            tcbStatus="SWHardeningNeeded", advisoryIDs=["INTEL-SA-00615"]
        )
        quote = mock_quote()
        default = verify(quote, mock_options(), collateral)
        assert default.tcb_status == "SWHardeningNeeded"
        assert default.advisory_ids == ("INTEL-SA-00615",)
        assert default.check("tcb_status").status == "fail"
        allowed = verify(
            quote, mock_options(allowed_tcb_statuses={"UpToDate", "SWHardeningNeeded"}), collateral
        )
        assert allowed.check("tcb_status").status == "pass"
        assert allowed.check("advisory_ids").status == "pass"
        rejected = verify(
            quote,
            mock_options(
                allowed_tcb_statuses={"SWHardeningNeeded"}, rejected_advisory_ids={"INTEL-SA-00615"}
            ),
            collateral,
        )
        assert rejected.check("advisory_ids").status == "fail"
        assert rejected.verdict == "fail"

    def test_revoked_is_a_tcb_status_failure(self):
        """dcap-qvl rejects a Revoked TCB; it is reported on tcb_status."""
        result = verify(mock_quote(), mock_options(), resigned_tcb_info(tcbStatus="Revoked"))
        assert result.check("tcb_status").status == "fail"
        assert result.check("quote_signature").status == "pass"

    def test_unattributable_failure_fails_every_dcap_check(self):
        """A dcap-qvl message we cannot place fails every check dcap-qvl performs."""
        mapped = _dcap_checks(_QvlOutcome(failure="something new", stage="unknown"), "")
        assert {status for status, _ in mapped.values()} == {"fail"}
        assert all("cannot attribute" in detail for _, detail in mapped.values())


class TestV5Agent:
    def test_v5_simulator_evidence_verifies(self):
        """An agent configured for v5 quotes produces evidence that verifies (TD 1.5 body)."""
        proc = AgentProcess("simulator", extra_args=["--platform-option", "quote_version=5"])
        proc.start()
        try:
            bundle = trust_bundle_for(proc.state_dir)
            status, body = proc.call("Attest", {"report_data": "05"})
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)
        assert status == 200
        options = VerifyOptions(now=NOW, root_ca_der=bundle.root_ca_der, allow_simulator=True)
        result = verify(body["attestation"], options, Collateral.from_json(bundle.collateral_json))
        assert result.verdict == "pass", result.to_json()
        assert result.quote_version == 5
        assert "TD 1.5" in result.check("evidence").detail
        assert result.report_data.startswith(b"\x05")


class TestRealIntelQuote:
    def test_real_quote_parses_and_reports_what_was_not_checked(self):
        """The real v4 quote (tests/data) loads as a bare quote; without collateral every
        dcap-qvl check is skipped with a reason and the verdict is fail."""
        evidence = load_evidence(REAL_QUOTE)
        assert evidence.kind == "quote" and evidence.platform == "tdx"
        assert evidence.quote.version == 4 and len(evidence.quote.raw) == 4936
        result = verify_evidence(evidence, VerifyOptions(now=NOW))
        assert result.verdict == "fail"
        assert not result.simulated
        assert result.check("simulator_policy").status == "pass"
        assert result.check("quote_signature").status == "skipped"
        assert result.report_data.startswith(b"# ~/.bashrc")
        assert result.mrtd == TdxQuote.from_bytes(REAL_QUOTE).report.mr_td

    def test_real_quote_as_hex_and_json(self):
        """The same quote given as wrapped hex text or as a GetQuote-shaped JSON body."""
        wrapped = "\n".join(REAL_QUOTE.hex()[i : i + 64] for i in range(0, 2 * len(REAL_QUOTE), 64))
        assert load_evidence(wrapped).quote.raw == REAL_QUOTE[:4936]
        doc = {"quote": REAL_QUOTE.hex(), "event_log": "[]", "vm_config": ""}
        evidence = load_evidence(json.dumps(doc))
        assert evidence.event_log == () and evidence.event_log_given

    def test_real_quote_under_mock_collateral_is_attributed(self, pki_collateral):
        """Real Intel quote against the mock PKI: the PCK chain is what fails."""
        result = verify(REAL_QUOTE, mock_options(), pki_collateral)
        assert result.check("certificate_chain").status == "fail"
        assert result.check("collateral").status == "pass"


class TestSniffing:
    def test_each_input_form(self, sample):
        """Binary, hex, JSON (Attest, GetQuote, GetTlsKey), PEM and DER are recognised."""
        leaf_der = x509.load_pem_x509_certificate(sample.tls_chain[0].encode()).public_bytes(
            Encoding.DER
        )
        cases = {
            sample.attestation: ("dstack-core", "dstack-core"),
            sample.attestation.hex().encode(): ("hex", "dstack-core"),
            json.dumps({"attestation": sample.attestation.hex()}).encode(): ("json", "dstack-core"),
            json.dumps(sample.get_quote).encode(): ("json", "quote"),
            json.dumps({"key": "x", "certificate_chain": sample.tls_chain}).encode(): (
                "json",
                "ratls-certificate",
            ),
            "".join(sample.tls_chain).encode(): ("certificate-pem", "ratls-certificate"),
            leaf_der: ("certificate-der", "ratls-certificate"),
            leaf_der.hex().encode(): ("hex", "ratls-certificate"),
            REAL_QUOTE: ("quote", "quote"),
        }
        for data, (sniffed, kind) in cases.items():
            assert sniff_evidence(data) == sniffed
            assert load_evidence(data).kind == kind

    def test_pem_inside_other_text(self, sample, collateral):
        """PEM blocks inside tool output (openssl s_client -showcerts) are found."""
        text = "CONNECTED(00000003)\n---\nCertificate chain\n" + "".join(sample.tls_chain) + "---\n"
        assert sniff_evidence(text.encode()) == "certificate-pem"
        assert verify(text, trusting(sample), collateral).verdict == "pass"

    def test_attestation_wins_over_quote_in_json(self, sample):
        """As upstream, a non-empty 'attestation' makes the other fields irrelevant."""
        doc = {"attestation": sample.attestation.hex(), "quote": "zz", "event_log": "junk"}
        assert evidence_from_json(doc).kind == "dstack-core"


class TestMalformed:
    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"   ",
            b"garbage that is not evidence",
            b"\xd9\xd9\xf7\xa1",
            b"\x00\x00\x01",
            b"\x83\xa7version",
            REAL_QUOTE[:700],
            b"{not json",
            b"[1, 2, 3]",
            b'{"quote": "00"}',
            b'{"quote": "zz"}',
            b'{"attestation": 5}',
            b'{"quote": "' + REAL_QUOTE.hex().encode() + b'", "event_log": "{}"}',
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            b"0a0",
            b"\x30\x82\x00\x10" + bytes(16),
            "\udcff".encode("utf-8", "surrogatepass"),
        ],
    )
    def test_clear_error(self, data):
        """Truncated, garbage or wrong-shape evidence raises EvidenceError with a message."""
        with pytest.raises(EvidenceError) as info:
            load_evidence(data)
        assert info.value.message
        assert info.value.http_status == 400

    def test_wrong_envelope_version(self, sample):
        """Our envelope with version 2 is refused by version, not by accident."""
        doc = dict(cbor2.loads(sample.attestation))
        doc["version"] = 2
        data = cbor2.dumps(cbor2.CBORTag(55799, doc), canonical=True)
        with pytest.raises(EvidenceError, match="version"):
            load_evidence(data)

    def test_quote_version_3_refused(self):
        """An SGX (version 3) quote header is not a TDX quote."""
        data = bytearray(REAL_QUOTE)
        data[0] = 3
        with pytest.raises(EvidenceError):
            load_evidence(bytes(data))

    def test_huge_input_refused_fast(self):
        """Evidence over the limit is refused before any parsing."""
        started = time.perf_counter()
        with pytest.raises(EvidenceError, match="limit"):
            load_evidence(b"\xd9\xd9\xf7" + bytes(MAX_EVIDENCE_SIZE))
        assert time.perf_counter() - started < 1.0

    def test_sev_snp_envelope_with_zero_report_is_malformed(self):
        """Our sev-snp envelope is recognised (tests/test_snp.py verifies it); an all-zero
        report (version 0) is malformed, not unsupported."""
        envelope = Envelope(
            platform="sev-snp",
            evidence_format="sev-snp",
            quote=bytes(1184),
            report_data=bytes(64),
        )
        with pytest.raises(EvidenceError, match="SEV-SNP report version 0") as info:
            load_evidence(envelope.to_cbor())
        assert info.value.code == "malformed_evidence"

    def test_envelope_with_non_tdx_quote(self):
        """A 'tdx' envelope whose quote is not a TDX quote is malformed."""
        envelope = Envelope(
            platform="tdx", evidence_format="tdx", quote=b"nope", report_data=bytes(64)
        )
        with pytest.raises(EvidenceError, match="not an Intel TDX quote"):
            load_evidence(envelope.to_cbor())

    def test_certificate_without_attestation(self, sample):
        """A CA certificate (no RA-TLS extension) is not evidence."""
        with pytest.raises(EvidenceError, match="no RA-TLS attestation"):
            load_evidence(sample.tls_chain[1])


def _mutated(sample_bytes: bytes) -> st.SearchStrategy[bytes]:
    def apply(edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(sample_bytes)
        for position, value in edits:
            data[position % len(data)] = value
        return bytes(data[:cut])

    return st.builds(
        apply,
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=3),
        st.integers(1, len(sample_bytes)),
    )


_REAL_QUOTE_JSON = json.dumps(
    {"quote": REAL_QUOTE.hex(), "event_log": "[]", "report_data": REAL_QUOTE[568:632].hex()}
).encode()


class TestFuzz:
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=700))
    def test_random_bytes(self, data):
        """Any bytes, bare or behind each format's first bytes (CBOR tag, V0, V1 map, quote
        header, PEM, DER), load or raise a DstackError subclass; nothing else escapes."""
        for prefix in (
            b"",
            b"\xd9\xd9\xf7",
            b"\x00\x00",
            b"\x83",
            REAL_QUOTE[:48],
            b"-----BEGIN CERTIFICATE-----\n",
            b"\x30\x82",
        ):
            try:
                load_evidence(prefix + data)
            except DstackError:
                pass

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_random_text(self, text):
        """Any text (JSON-ish, hex-ish, PEM-ish) loads or raises a DstackError."""
        for candidate in (text, "{" + text, "-----BEGIN CERTIFICATE-----" + text, "0x" + text):
            try:
                load_evidence(candidate)
            except DstackError:
                pass

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "quote",
                            "event_log",
                            "attestation",
                            "report_data",
                            "vm_config",
                            "certificate_chain",
                            "imr",
                            "digest",
                            "event",
                            "event_payload",
                            "event_type",
                            "preimage",
                            "version",
                        ]
                    ),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=25,
        )
    )
    def test_json_documents(self, value):
        """JSON objects of the right vocabulary and wrong shapes raise only DstackError."""
        doc = value if isinstance(value, dict) else {"quote": REAL_QUOTE.hex(), "event_log": value}
        try:
            evidence_from_json(doc)
        except DstackError:
            pass

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(data=st.data())
    def test_mutated_real_evidence(self, sample, collateral, data):
        """Byte-flipped or truncated real evidence of every form loads or raises
        EvidenceError; what loads, verifies to a result (never raises)."""
        source = data.draw(
            st.sampled_from(
                [
                    sample.attestation,
                    json.dumps(sample.get_quote).encode(),
                    "".join(sample.tls_chain).encode(),
                    _REAL_QUOTE_JSON,
                ]
            )
        )
        mutated = data.draw(_mutated(source))
        try:
            evidence = load_evidence(mutated)
        except DstackError:
            return
        result = verify_evidence(evidence, trusting(sample), collateral)
        assert result.verdict in ("pass", "fail")


class TestValues:
    def test_check_result_validates(self):
        """Check names and statuses are closed sets."""
        with pytest.raises(ValueError):
            CheckResult(name="nope", status="pass", detail="")
        with pytest.raises(ValueError):
            CheckResult(name="evidence", status="maybe", detail="")

    def test_options_validate(self):
        """now must be non-negative; expected report data is 64 bytes."""
        with pytest.raises(ValueError):
            VerifyOptions(now=-1)
        with pytest.raises(EvidenceError):
            ExpectedReportData.raw(bytes(65))
        assert ExpectedReportData.raw(b"ab").value == b"ab" + bytes(62)

    def test_upstream_json_shape(self, sample, collateral):
        """to_upstream_json has the upstream keys plus verdict and checks."""
        doc = verify(sample.attestation, trusting(sample), collateral).to_upstream_json()
        assert doc["is_valid"] is True and doc["reason"] is None
        details = doc["details"]
        for key in (
            "quote_verified",
            "event_log_verified",
            "os_image_hash_verified",
            "tee_variant",
            "report_data",
            "tcb_status",
            "advisory_ids",
            "app_info",
            "boot_info",
            "key_provider",
        ):
            assert key in details
        assert details["quote_verified"] and details["event_log_verified"]
        assert details["os_image_hash_verified"]  # the simulator's image, by its policy
        assert details["boot_info"]["teeVariant"] == "dstack-tdx"
        assert set(doc["checks"]) == set(CHECK_NAMES)


# --- collateral -------------------------------------------------------------------------


class TestCollateral:
    def test_window_and_key(self):
        """The window spans the PKI's issue and next-update dates; the key names the FMSPC."""
        collateral = Collateral.from_json(PKI.collateral_json())
        assert collateral.issued_at == 1577836800  # 2020-01-01
        assert collateral.expires_at == 4102358400  # 2099-12-31
        assert collateral.valid_at(NOW) and not collateral.valid_at(1_000)
        assert collateral_key(mock_quote()) == "platform-000000000000"
        assert collateral_key(REAL_QUOTE) == "platform-B0C06F000000"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "not JSON"),
            ("[]", "JSON object"),
            ("{}", "missing"),
            (json.dumps({**json.loads(PKI.collateral_json()), "tcb_info": "{}"}), "issueDate"),
            (json.dumps({**json.loads(PKI.collateral_json()), "pck_crl": "00"}), "CRL"),
        ],
    )
    def test_invalid_collateral(self, text, message):
        """Bad collateral is an EvidenceError that says what is wrong."""
        with pytest.raises(EvidenceError, match=message):
            Collateral.from_json(text)

    def test_load_file(self, tmp_path):
        """A collateral file loads; a missing file is a configuration error."""
        path = tmp_path / "collateral.json"
        path.write_text(PKI.collateral_json())
        assert load_collateral_file(path).expires_at == 4102358400
        with pytest.raises(ConfigurationError):
            load_collateral_file(tmp_path / "missing.json")

    def test_cache_expiry(self, tmp_path):
        """Cached entries serve within max_age and the collateral window, not after."""
        cache = CollateralCache(directory=tmp_path / "cache", max_age=100)
        collateral = Collateral.from_json(PKI.collateral_json())
        key = "platform-000000000000"
        assert cache.get(key, now=NOW) is None
        cache.put(key, collateral, wall_clock=1_000)
        assert cache.get(key, now=NOW, wall_clock=1_050) == collateral
        assert cache.get(key, now=NOW, wall_clock=1_100) is None
        assert cache.get(key, now=1_500_000_000, wall_clock=1_050) is None
        (tmp_path / "cache" / f"{key}.json").write_text("{corrupt")
        assert cache.get(key, now=NOW, wall_clock=1_050) is None
        with pytest.raises(EvidenceError):
            cache.put("../escape", collateral)

    def test_source_fetches_once_then_caches(self, tmp_path):
        """A miss fetches from the PCCS (an injected fake: no network), the next call hits."""
        calls: list[str] = []

        async def fake_fetch(url: str, quote: bytes) -> str:
            calls.append(url)
            return PKI.collateral_json()

        source = CollateralSource(
            cache=CollateralCache(directory=tmp_path),
            pccs_url="https://pccs.invalid",
            fetcher=fake_fetch,
        )
        quote = mock_quote()
        first = asyncio.run(source.collateral_for(quote, now=NOW))
        second = asyncio.run(source.collateral_for(quote, now=NOW))
        assert first == second and calls == ["https://pccs.invalid"]
        assert (tmp_path / "platform-000000000000.json").exists()
        assert verify(quote, mock_options(), second).check("quote_signature").status == "pass"

    def test_fetch_failure_is_reported_in_the_result(self):
        """A PCCS failure leaves the dcap-qvl checks skipped, saying why."""

        async def failing(url: str, quote: bytes) -> str:
            raise EvidenceError("cannot fetch collateral: connection refused")

        source = CollateralSource(pccs_url="https://pccs.invalid", fetcher=failing)
        quote = mock_quote()
        with pytest.raises(EvidenceError) as info:
            asyncio.run(source.collateral_for(quote, now=NOW))
        result = verify_evidence(
            load_evidence(quote), mock_options(), None, collateral_error=info.value.message
        )
        assert "connection refused" in result.check("quote_signature").detail

    def test_no_source_gives_none(self):
        """Nothing configured: no collateral, no network."""
        assert asyncio.run(CollateralSource().collateral_for(b"", now=NOW)) is None
        assert not CollateralSource().configured


def test_event_log_check_handles_no_action_events(sample, collateral):
    """EV_NO_ACTION records in the boot log are not extended (TCG rule)."""
    envelope = Envelope.from_cbor(sample.attestation)
    marker = TdxEvent(imr=0, event_type=3, digest=bytes(48), event="", event_payload=b"spec")
    data = reencode(sample.attestation, event_log=(marker,) + envelope.event_log)
    assert verify(data, trusting(sample), collateral).check("event_log").status == "pass"
