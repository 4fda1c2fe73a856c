"""``--attestation-format upstream``: Attest and RA-TLS certificates in upstream's wire
format, verified by our verifier; version-2 runtime events with their preimages."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sdk import DstackClient

from dstack_core import certs
from dstack_core.collateral import Collateral
from dstack_core.envelope import Envelope
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.testing.fake_tee import FakeTdxMachine
from dstack_core.types import TrustBundle
from dstack_core.upstream import decode_attestation
from dstack_core.verify import (
    ExpectedReportData,
    VerificationResult,
    VerifyOptions,
    load_evidence,
    verify_evidence,
)

from .conftest import Bundle, trust_bundle_for


def verify(evidence: bytes, bundle: TrustBundle | Bundle, report_data: bytes, *,
           stripped: bool = False) -> VerificationResult:
    if isinstance(bundle, TrustBundle):
        root = x509.load_pem_x509_certificate(bundle.root_ca_pem).public_bytes(
            serialization.Encoding.DER)
    else:
        root = bundle.root_ca_der
    result = verify_evidence(
        load_evidence(evidence),
        VerifyOptions(now=int(time.time()), root_ca_der=root, allow_simulator=True,
                      expected_report_data=ExpectedReportData.raw(report_data),
                      allow_stripped_event_log=stripped),
        Collateral.from_json(bundle.collateral_json),
    )
    assert result.passed, result.reason
    return result


@pytest.fixture(scope="module")
def upstream_agent() -> Iterator[tuple[AgentProcess, Bundle]]:
    agent = AgentProcess("simulator", extra_args=["--attestation-format", "upstream"]).start()
    bundle = trust_bundle_for(agent.state_dir)
    yield agent, bundle
    agent.stop()
    shutil.rmtree(agent.workdir, ignore_errors=True)


class TestUpstreamFormat:
    def test_attest_is_v0_and_verifies(self, upstream_agent):
        """Attest answers upstream's V0 SCALE attestation (all events are version 1): the
        full event log, the runtime events, vm_config; our verifier passes it."""
        agent, bundle = upstream_agent
        raw = DstackClient(str(agent.socket)).attest(b"up").decode_attestation()
        decoded = decode_attestation(raw)
        assert raw[0] == 0x00 and decoded.wire_version == 0 and decoded.platform == "tdx"
        padded = b"up".ljust(64, b"\0")
        assert decoded.report_data == padded
        assert [e.event for e in decoded.runtime_events][:2] == ["system-preparing", "app-id"]
        assert decoded.config == agent.call("Info")[1]["vm_config"]
        result = verify(raw, bundle, padded)
        assert result.app_id.hex() == agent.call("Info")[1]["app_id"]

    def test_ratls_certificate_carries_upstream_extensions(self, upstream_agent):
        """GetTlsKey: .1.8 is upstream's stripped attestation binding the leaf key, .1.9
        upstream's nine-element msgpack app info."""
        agent, bundle = upstream_agent
        result = DstackClient(str(agent.socket)).get_tls_key(
            subject="u", usage_ra_tls=True, with_app_info=True)
        leaf = x509.load_pem_x509_certificate(result.certificate_chain[0].encode())
        ratls = certs.RaTlsCertificate.from_certificate(leaf)
        attestation = decode_attestation(ratls.attestation)
        assert all(e.imr == 3 or e.is_acpi_data for e in attestation.event_log)
        assert all(e.digest == b"" for e in attestation.event_log if e.imr == 3)
        verify(ratls.attestation, bundle, ratls.expected_report_data, stripped=True)
        info = msgpack.unpackb(ratls.app_info)
        assert len(info) == 9 and info[0].hex() == agent.call("Info")[1]["app_id"]
        assert info[8] == []  # no init-script-hash events

    def test_default_stays_our_envelope(self, agent):
        """Without the option Attest is our CBOR envelope."""
        raw = DstackClient(str(agent.socket)).attest(b"x").decode_attestation()
        assert Envelope.from_cbor(raw).platform == "simulator"


@pytest.fixture(scope="module")
def v2_agent() -> Iterator[AgentProcess]:
    """A fake TDX guest whose boot used version-2 runtime event digests."""
    workdir = short_tempdir("v2")
    machine = FakeTdxMachine.create(workdir / "tree", event_log_version=2)
    agent = machine.agent(workdir=workdir, extra_args=["--attestation-format", "upstream"]).start()
    yield agent
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class TestVersion2Events:
    def test_get_quote_events_carry_version_and_preimage(self, v2_agent):
        """As upstream: version-2 runtime events in GetQuote's log carry "version": 2 and
        the hex preimage, which hashes to the event's digest and is the JCS document."""
        status, body = v2_agent.call("GetQuote", {"report_data": "00"})
        assert status == 200
        runtime = [e for e in json.loads(body["event_log"]) if e["imr"] == 3]
        assert runtime and all(e["version"] == 2 for e in runtime)
        for event in runtime:
            preimage = bytes.fromhex(event["preimage"])
            assert json.loads(preimage) == {
                "name": event["event"], "payload": event["event_payload"], "type": 134217729,
            }
            assert hashlib.sha384(preimage).hexdigest() == event["digest"]
        boot = [e for e in json.loads(body["event_log"]) if e["imr"] != 3]
        assert boot and all("preimage" not in e for e in boot)

    def test_attest_is_v1_with_preimages(self, v2_agent):
        """Attest in upstream's format is V1 (V0 cannot carry version 2) with the preimages
        filled, and verifies."""
        raw = DstackClient(str(v2_agent.socket)).attest(b"v2").decode_attestation()
        decoded = decode_attestation(raw)
        assert decoded.wire_version == 1
        assert all(e.version == 2 for e in decoded.runtime_events)
        for event, preimage in zip(decoded.event_log, decoded.preimages):
            if event.imr == 3:
                assert preimage == event.preimage
        verify(raw, v2_agent.machine.trust_bundle(), b"v2".ljust(64, b"\0"))
