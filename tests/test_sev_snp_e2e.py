"""The sev-snp-stub platform end to end: a real agent subprocess on the fake SEV-SNP kernel,
driven by the official SDK; then the verifier on what it produced.

Each test checks the cryptography, not only the response shapes: keys recover to the
firmware-derived app key, reports parse and carry the fake firmware's signature, the RA-TLS
certificate binds its key, and the verifier (its sev-snp plugin) passes the envelope under
the machine's mock AMD chain, published by ``dstack-agent trust-bundle``, only with the
simulator opt-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import coincurve
import nacl.signing
import pytest
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PublicKey
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sdk import AsyncDstackClient, DstackClient
from dstack_sev_snp_stub import SevSnpStubPlatform
from dstack_sev_snp_stub.kds import SnpCollateral

from dstack_core import certs, keys
from dstack_core.envelope import Envelope
from dstack_core.server.verifier import VerifierSettings, create_verifier_app
from dstack_core.snp import SnpReport
from dstack_core.testing import short_tempdir
from dstack_core.testing.fake_tee import FakeSnpAgent, FakeSnpMachine
from dstack_core.types import PlatformConfig, RootKey
from dstack_core.verify import (
    SNP_CHECK_NAMES,
    ExpectedReportData,
    VerifyOptions,
    load_evidence,
    verify_evidence,
)

from .conftest import run_cli

NOW = int(time.time())


def _agent(kernel: str = "6.10", **options: str) -> Iterator[FakeSnpAgent]:
    workdir = short_tempdir("esnp")
    machine = FakeSnpMachine.create(workdir / "tree", kernel=kernel)
    agent = machine.agent(workdir=workdir, options=options).start()
    yield agent
    if agent.proc is not None:
        agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def agent() -> Iterator[FakeSnpAgent]:
    """An sev-snp-stub agent on a freshly launched fake SNP guest (configfs-tsm)."""
    yield from _agent()


@pytest.fixture(scope="module")
def root_key(agent: FakeSnpAgent, tmp_path_factory: pytest.TempPathFactory) -> RootKey:
    """The root key the plugin derives on the agent's machine, derived again in process."""
    machine = agent.machine
    tmp = tmp_path_factory.mktemp("rk")
    platform = SevSnpStubPlatform(machine.io())
    platform.configure(PlatformConfig(
        state_dir=tmp, runtime_log=machine.paths.runtime_log,
        app_compose=machine.paths.app_compose, sys_config=machine.paths.sys_config,
        options={"root": str(machine.root)},
    ))
    return platform.derive_root_key()


@attrs.frozen
class Bundle:
    directory: Path
    root_ca_der: bytes
    collateral: SnpCollateral


@pytest.fixture(scope="module")
def bundle(agent: FakeSnpAgent, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The machine's anchors as ``dstack-agent trust-bundle --platform sev-snp-stub``
    publishes them (the fake kernel selected by its options)."""
    out = tmp_path_factory.mktemp("snp-bundle")
    options = [arg for key, value in agent.machine.agent_options().items()
               for arg in ("--platform-option", f"{key}={value}")]
    done = subprocess.run(
        [sys.executable, "-m", "dstack_core.cli", "trust-bundle", "--platform", "sev-snp-stub",
         "--state-dir", str(out / "state"), "--out", str(out), *options],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, **agent.machine.agent_env()},
    )
    assert done.returncode == 0, done.stderr
    root = x509.load_pem_x509_certificate((out / "root_ca.pem").read_bytes())
    return Bundle(out, root.public_bytes(serialization.Encoding.DER),
                  SnpCollateral.from_bytes((out / "collateral.json").read_bytes()))


def _post_verify(settings: VerifierSettings, body: dict[str, str]) -> tuple[int, dict]:
    async def go() -> tuple[int, dict]:
        async with TestClient(TestServer(create_verifier_app(settings))) as http:
            response = await http.post("/verify", json=body)
            return response.status, await response.json()

    return asyncio.run(go())


def client(agent: FakeSnpAgent) -> DstackClient:
    return DstackClient(str(agent.socket))


def app_public_key(root_key: RootKey) -> bytes:
    return PublicKey.from_secret(root_key.k256_key).format()


class TestGetKey:
    def test_signature_chain_recovers_to_the_derived_app_key(self, agent, root_key):
        """GetKey's chain recovers to the firmware-derived app key; no KMS signature."""
        result = client(agent).get_key("wallet/eth", "ethereum")
        pub = PublicKey.from_secret(result.decode_key()).format()
        sig0, kms_sig = result.decode_signature_chain()
        message = keys.keccak256(f"ethereum:{pub.hex()}".encode())
        recovered = PublicKey.from_signature_and_message(sig0, message, hasher=None).format()
        assert recovered == app_public_key(root_key)
        assert kms_sig == b""

    def test_deterministic_per_path(self, agent):
        """The same path gives the same key; another path another; ed25519 shares the secret."""
        c = client(agent)
        a = c.get_key("p/a", "x")
        assert c.get_key("p/a", "x").key == a.key != c.get_key("p/b", "x").key
        assert c.get_key("p/a", "x", "ed25519").key == a.key


class TestSignVerify:
    def test_secp256k1(self, agent, root_key):
        """Sign verifies with libsecp256k1 and through Verify; the chain links to the app key."""
        c = client(agent)
        result = c.sign("secp256k1", b"hello snp")
        sig = result.decode_signature()
        der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(sig))
        assert PublicKey(result.decode_public_key()).verify(
            der, hashlib.sha256(b"hello snp").digest(), hasher=None)
        assert c.verify("secp256k1", b"hello snp", sig, result.decode_public_key()).valid
        assert not c.verify("secp256k1", b"hello snP", sig, result.decode_public_key()).valid
        chain = result.decode_signature_chain()
        message = keys.keccak256(f"signing:{result.public_key}".encode())
        assert PublicKey.from_signature_and_message(chain[1], message, hasher=None).format() == (
            app_public_key(root_key))

    def test_ed25519(self, agent):
        """An ed25519 signature verifies with PyNaCl and through Verify."""
        c = client(agent)
        result = c.sign("ed25519", b"payload")
        nacl.signing.VerifyKey(result.decode_public_key()).verify(
            b"payload", result.decode_signature())
        assert c.verify("ed25519", b"payload", result.decode_signature(),
                        result.decode_public_key()).valid


def quoted_report(agent, report_data: bytes) -> SnpReport:
    """The SNP report inside GetQuote's ``attestation`` (upstream's shape without TDX)."""
    status, body = agent.call("GetQuote", {"report_data": report_data.hex()})
    assert status == 200, body
    return SnpReport.from_bytes(Envelope.from_cbor(bytes.fromhex(body["attestation"])).quote)


class TestQuote:
    def test_get_quote_answers_with_the_attestation(self, agent):
        """Without TDX quotes GetQuote answers as upstream does: ``quote`` and ``event_log``
        empty, ``attestation`` set. Inside is the 1184-byte report over the padded report
        data, with the launch measurement, signed by the (fake) firmware."""
        result = client(agent).get_quote(b"hello")
        assert (result.quote, result.event_log) == ("", "")
        padded = b"hello".ljust(64, b"\0")
        assert result.report_data == padded.hex()
        report = quoted_report(agent, b"hello")
        assert report.report_data == padded
        assert report.measurement == agent.machine.measurement
        report.verify_signature(agent.machine.vcek_public_key())

    def test_async_client(self, agent):
        """AsyncDstackClient works too (quote, info, key)."""
        import asyncio

        async def main():
            c = AsyncDstackClient(str(agent.socket))
            return await c.get_quote(b"async"), await c.info(), await c.get_key("a", "b")

        quote, info, key = asyncio.run(main())
        assert quote.report_data.startswith(b"async".hex()) and quote.decode_quote() == b""
        assert info.app_name and len(key.decode_key()) == 32

    def test_emit_event_refused_and_agent_serves_on(self, agent):
        """EmitEvent through the SDK fails (501 platform_unsupported); the agent serves on."""
        with pytest.raises(Exception, match="501"):
            client(agent).emit_event("app-event", b"x")
        status, body = agent.call("EmitEvent", {"event": "app-event", "payload": "78"})
        assert (status, body["code"]) == (501, "platform_unsupported")
        assert quoted_report(agent, b"after").report_data.startswith(b"after")


class TestAttest:
    def test_envelope_is_sev_snp_and_bound(self, agent):
        """Attest returns our CBOR envelope with platform and format sev-snp, bound, no log."""
        raw = client(agent).attest(b"attest-me").decode_attestation()
        envelope = Envelope.from_cbor(raw)
        assert envelope.to_cbor() == raw
        assert (envelope.platform, envelope.evidence_format) == ("sev-snp", "sev-snp")
        assert envelope.report_data == b"attest-me".ljust(64, b"\0")
        assert SnpReport.from_bytes(envelope.quote).report_data == envelope.report_data
        assert envelope.event_log == () and envelope.extra == {}

    def test_verifies_with_its_mock_trust_bundle(self, agent, bundle):
        """The verifier, through the sev-snp plugin, passes the envelope under the machine's
        mock AMD chain with the opt-in: chain, signature, TCB and policy, report data bound,
        simulated, and no identity (SNP has no registers to bind events to)."""
        raw = client(agent).attest(b"verify-me").decode_attestation()
        expected = ExpectedReportData.raw(b"verify-me")
        options = VerifyOptions(now=NOW, expected_report_data=expected,
                                root_ca_der=bundle.root_ca_der, allow_simulator=True)
        result = verify_evidence(load_evidence(raw), options, bundle.collateral)
        assert [c.name for c in result.checks] == list(SNP_CHECK_NAMES)
        assert result.verdict == "pass", result.reason
        statuses = {c.name: c.status for c in result.checks}
        assert statuses["envelope_binding"] == statuses["report_data"] == "pass"
        assert statuses["vcek_chain"] == statuses["snp_signature"] == "pass"
        assert result.platform == "sev-snp" and result.simulated
        assert not result.identity_bound
        unanchored = verify_evidence(load_evidence(raw), VerifyOptions(now=NOW))
        assert unanchored.verdict == "fail" and unanchored.reason.startswith("vcek_chain:")

    def test_cli_verify(self, agent, bundle, tmp_path: Path):
        """``dstack-agent trust-bundle --platform sev-snp-stub`` then ``verify`` on the Attest
        JSON body: exit 0 with --allow-simulator, exit 1 (vcek_chain) without."""
        body = agent.call("Attest", {"report_data": b"cli".hex()})[1]
        path = tmp_path / "attest.json"
        path.write_text(json.dumps(body))
        flags = ["--trust-bundle", str(bundle.directory), "--expect-report-data", b"cli".hex()]
        done = run_cli("verify", str(path), *flags, "--allow-simulator", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(done.stdout)
        assert doc["checks"]["report_data"]["status"] == "pass"
        assert doc["checks"]["snp_signature"]["status"] == "pass"
        assert doc["sev_snp"]["measurement"] == agent.machine.measurement.hex()
        assert doc["verifier"]["plugin"] == "dstack-sev-snp-stub"
        refused = run_cli("verify", str(path), *flags, check=False)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "verdict fail: vcek_chain:" in refused.stderr

    def test_post_verify(self, agent, bundle):
        """POST /verify of the service configured with the bundle: verdict pass (is_valid
        stays false: no OS image policy can apply to SNP evidence); without the opt-in,
        fail on vcek_chain."""
        raw = client(agent).attest(b"service").decode_attestation()
        settings = VerifierSettings(
            documents={"sev-snp": bundle.collateral}, root_ca_der=bundle.root_ca_der,
            allow_simulator=True,
        )
        for allow, verdict in ((True, "pass"), (False, "fail")):
            configured = attrs.evolve(settings, allow_simulator=allow)
            status, doc = _post_verify(configured, {"attestation": raw.hex()})
            assert status == 200 and doc["verdict"] == verdict, doc["reason"]
            assert doc["details"]["tee_variant"] == "dstack-amd-sev-snp"
        assert doc["checks"]["vcek_chain"]["status"] == "fail"

class TestInfo:
    def test_info(self, agent, root_key):
        """Info parses with the SDK: app name from the compose, no TDX registers, and a demo
        certificate issued by the derived CA."""
        info = client(agent).info()
        compose = json.loads(agent.input_files["app-compose.json"].read_text())
        assert info.app_name == compose["name"]
        assert info.tcb_info.mrtd in (None, "") and info.tcb_info.rtmr3 in (None, "")
        chain = certs.load_certificate_chain(info.app_cert.encode())
        ca = x509.load_pem_x509_certificate(root_key.ca_cert_pem.encode())
        chain[0].verify_directly_issued_by(ca)


class TestTlsKey:
    def test_chain_verifies_to_the_derived_ca(self, agent, root_key):
        """GetTlsKey's chain ends in the derived CA, which signs the leaf."""
        result = client(agent).get_tls_key(subject="app.example", usage_server_auth=True)
        leaf_pem, ca_pem = result.certificate_chain
        assert ca_pem == root_key.ca_cert_pem
        x509.load_pem_x509_certificate(leaf_pem.encode()).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_pem.encode()))

    def test_ra_tls_certificate_carries_the_snp_envelope(self, agent, bundle):
        """The RA-TLS leaf embeds an SNP envelope binding its key; the verifier checks the
        binding and the chain, and passes it only with the mock chain and the opt-in."""
        result = client(agent).get_tls_key(subject="ratls", usage_ra_tls=True)
        leaf = x509.load_pem_x509_certificate(result.certificate_chain[0].encode())
        envelope = Envelope.from_cbor(certs.RaTlsCertificate.from_certificate(leaf).attestation)
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert envelope.evidence_format == "sev-snp"
        assert SnpReport.from_bytes(envelope.quote).report_data == hashlib.sha512(
            b"ratls-cert:" + spki).digest()
        ca = x509.load_pem_x509_certificate(result.certificate_chain[1].encode())
        anchored = VerifyOptions(
            now=NOW, ratls_trust_anchors=[ca.public_bytes(serialization.Encoding.DER)])
        outcome = verify_evidence(load_evidence("".join(result.certificate_chain)), anchored)
        statuses = {c.name: c.status for c in outcome.checks}
        assert statuses["ratls_binding"] == statuses["ratls_chain"] == "pass"
        assert statuses["vcek_chain"] == "fail" and outcome.verdict == "fail"
        trusted = attrs.evolve(anchored, root_ca_der=bundle.root_ca_der, allow_simulator=True)
        verified = verify_evidence(load_evidence("".join(result.certificate_chain)), trusted,
                                   bundle.collateral)
        assert verified.verdict == "pass", verified.reason
        # Without the CA as a trust anchor the chain is reported untrusted, never passed.
        unanchored = verify_evidence(load_evidence("".join(result.certificate_chain)),
                                     VerifyOptions(now=NOW))
        assert unanchored.check("ratls_chain").status == "skipped"


class TestRestart:
    def test_keys_and_ca_survive_a_restart(self):
        """After a restart the agent derives the same keys and the byte-identical CA."""
        for agent in _agent():
            c = client(agent)
            key = c.get_key("stable", "x").key
            ca = c.get_tls_key(subject="a").certificate_chain[1]
            assert agent.stop() == 0
            agent.start()
            c = client(agent)
            assert c.get_key("stable", "x").key == key
            assert c.get_tls_key(subject="a").certificate_chain[1] == ca

    def test_ioctl_only_kernel(self):
        """On a 5.19 guest (no configfs-tsm) the agent serves through /dev/sev-guest."""
        for agent in _agent(kernel="5.19"):
            assert quoted_report(agent, b"ioctl").report_data.startswith(b"ioctl")
            assert "via ioctl" in agent.output()
