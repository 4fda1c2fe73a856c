"""KMS-issued certificates, end to end: a real agent with KMS-provisioned app keys, the
fake KMS over mutual TLS, the official SDK as the client.

The fake KMS (dstack_core.testing.fake_kms) checks the CSR signature and verifies the
attestation with our verifier before it signs, so every chain asserted here went through
upstream's whole SignCert protocol.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sdk import DstackClient

from dstack_core import certs, upstream
from dstack_core.collateral import Collateral
from dstack_core.errors import EvidenceError
from dstack_core.inputs import app_compose_document, document_text
from dstack_core.kms import CertConfig, CertSigningRequest, sanitize_remote_message
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.testing.fake_kms import FakeKms
from dstack_core.testing.fake_tee import FakeTdxMachine
from dstack_core.types import RootKey, TrustBundle
from dstack_core.verify import ExpectedReportData, VerifyOptions, load_evidence, verify_evidence

from .conftest import Bundle, trust_bundle_for
from .test_js_sdk import run_js_smoke

KMS_TIMEOUT = 2.0


def leaf_and_chain(pems: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


class KmsSetup:
    """A simulator agent whose app keys come from a running fake KMS."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.compose = workdir / "app-compose.json"
        self.compose.write_text(document_text(app_compose_document("kms-app")))
        self.app_id = hashlib.sha256(self.compose.read_bytes()).digest()[:20]
        bundle = trust_bundle_for(self.state_dir)  # creates the mock PKI the agent will use
        root_pem = x509.load_der_x509_certificate(bundle.root_ca_der).public_bytes(
            serialization.Encoding.PEM
        )
        self.kms = FakeKms(trust=TrustBundle(root_ca_pem=root_pem, collateral_json=bundle.collateral_json))
        self.bundle = bundle

    def agent(self, kms_url: str | None = None, *extra: str) -> AgentProcess:
        appkeys = self.workdir / "appkeys.json"
        appkeys.write_text(self.kms.app_keys(self.app_id, url=kms_url).to_appkeys_json())
        return AgentProcess(
            "simulator", workdir=self.workdir, state_dir=self.state_dir,
            extra_args=["--appkeys", str(appkeys), "--app-compose", str(self.compose),
                        "--kms-timeout", str(KMS_TIMEOUT), *extra],
        )


@pytest.fixture(scope="module")
def setup() -> Iterator[KmsSetup]:
    workdir = short_tempdir("kms")
    kms_setup = KmsSetup(workdir)
    with kms_setup.kms.running():
        agent = kms_setup.agent().start()
        kms_setup.agent_process = agent  # type: ignore[attr-defined]
        try:
            yield kms_setup
        finally:
            agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def agent(setup: KmsSetup) -> AgentProcess:
    setup.kms.behaviour = "sign"
    return setup.agent_process  # type: ignore[attr-defined,no-any-return]


def verify_attestation(attestation: bytes, spki: bytes, bundle: Bundle) -> None:
    result = verify_evidence(
        load_evidence(attestation),
        VerifyOptions(now=int(time.time()), root_ca_der=bundle.root_ca_der, allow_simulator=True,
                      expected_report_data=ExpectedReportData.raw(certs.ratls_report_data(spki)),
                      allow_stripped_event_log=True),
        Collateral.from_json(bundle.collateral_json),
    )
    assert result.passed, result.reason


class TestGetTlsKey:
    def test_sdk_gets_the_kms_chain(self, setup, agent):
        """The official SDK's get_tls_key returns [leaf, app CA, KMS root]: the leaf
        certifies the returned key, carries the app id and usage app:custom, and the chain
        verifies to the KMS root the app keys pin."""
        result = DstackClient(str(agent.socket)).get_tls_key(
            subject="kms.example", alt_names=["kms.example", "10.0.0.1"],
            usage_ra_tls=True, usage_server_auth=True,
        )
        leaf, app_ca, root = leaf_and_chain(result.certificate_chain)
        key = serialization.load_pem_private_key(result.key.encode(), None)
        assert certs.spki_der(leaf.public_key()) == certs.spki_der(key.public_key())
        certs.verify_chain([leaf, app_ca, root])
        assert root == setup.kms.root.cert
        # the app CA key is derived from the KMS root key and the app id (re-signed per call)
        assert certs.spki_der(app_ca.public_key()) == setup.kms.app_ca(setup.app_id).spki_der
        ratls = certs.RaTlsCertificate.from_certificate(leaf)
        assert ratls.app_id == setup.app_id and ratls.usage == "app:custom"
        assert leaf.subject.rfc4514_string() == "CN=kms.example"
        assert leaf in setup.kms.signed
        # the KMS embedded the stripped upstream attestation, and it verifies for this key
        assert upstream.decode_attestation(ratls.attestation).wire_version == 0
        verify_attestation(ratls.attestation, ratls.spki_der, setup.bundle)

    def test_app_info_extension(self, agent, setup):
        """with_app_info: the KMS adds upstream's msgpack app info with the verified app id."""
        result = DstackClient(str(agent.socket)).get_tls_key(subject="x", with_app_info=True)
        leaf = leaf_and_chain(result.certificate_chain)[0]
        info = msgpack.unpackb(certs.RaTlsCertificate.from_certificate(leaf).app_info)
        assert info[0] == setup.app_id and len(info) == 9

    def test_client_certificate_comes_from_the_temporary_ca(self, agent, setup):
        """The agent called the KMS with upstream's temporary RA-TLS client certificate."""
        DstackClient(str(agent.socket)).get_tls_key(subject="y")
        assert "CN=RA-TLS TEMP Cert" in setup.kms.client_subjects


class TestInfoAndTappd:
    def test_info_app_cert_is_kms_issued(self, agent, setup):
        """Info's app_cert is the KMS chain of a demo-cert client certificate."""
        deadline = time.monotonic() + 30
        while True:
            info = DstackClient(str(agent.socket)).info()
            if info.app_cert or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        leaf, app_ca, root = x509.load_pem_x509_certificates(info.app_cert.encode())
        assert leaf.subject.rfc4514_string() == "CN=demo-cert"
        assert root == setup.kms.root.cert
        certs.verify_chain([leaf, app_ca, root])
        assert json.loads(info.key_provider_info) == {
            "name": "kms", "id": setup.kms.root.spki_der.hex(),
        }

    def test_tappd_derive_key_is_kms_issued_and_deterministic(self, agent, setup):
        """Tappd DeriveKey: the key is derived from the app key and path; its certificate
        comes from the KMS."""
        first = agent.call("prpc/Tappd.DeriveKey", {"path": "tls/a", "subject": "a"})[1]
        second = agent.call("prpc/Tappd.DeriveKey", {"path": "tls/a", "subject": "a"})[1]
        assert first["key"] == second["key"]
        chain = leaf_and_chain(first["certificate_chain"])
        assert len(chain) == 3 and chain[-1] == setup.kms.root.cert


class TestKmsFailures:
    def test_refusal_is_502_with_the_kms_message(self, agent, setup):
        """A KMS that refuses: 502 kms_rejected with the KMS's own reason, no paths."""
        setup.kms.behaviour = "deny"
        setup.kms.deny_reason = "app not registered in /etc/kms/policy.json"
        status, body = agent.call("GetTlsKey", {"subject": "z"})
        assert status == 502 and body["code"] == "kms_rejected"
        assert "Boot denied: app not registered" in body["error"]
        assert "/etc/kms" not in body["error"] and "<path>" in body["error"]

    def test_hanging_kms_times_out(self, agent, setup):
        """A KMS that never answers: 503 kms_timeout after the configured timeout."""
        setup.kms.behaviour = "hang"
        started = time.monotonic()
        status, body = agent.call("GetTlsKey", {"subject": "z"})
        elapsed = time.monotonic() - started
        assert status == 503 and body["code"] == "kms_timeout", body
        assert KMS_TIMEOUT * 0.9 < elapsed < KMS_TIMEOUT + 10

    def test_overloaded_kms_is_503(self, agent, setup):
        setup.kms.behaviour = "unavailable"
        status, body = agent.call("GetTlsKey", {"subject": "z"})
        assert status == 503 and body["code"] == "kms_unavailable"
        assert "overloaded" in body["error"]

    def test_chain_for_another_key_is_refused(self, agent, setup):
        """A KMS that answers with a valid chain for some other key: 502 kms_bad_response,
        and the caller gets no certificate."""
        setup.kms.behaviour = "misissue"
        status, body = agent.call("GetTlsKey", {"subject": "z"})
        assert status == 502 and body["code"] == "kms_bad_response", body
        assert "does not certify the requested key" in body["error"]
        assert "certificate_chain" not in body

    def test_info_survives_a_refusing_kms(self, agent, setup):
        """Info never fails because of the KMS."""
        setup.kms.behaviour = "deny"
        status, body = agent.call("Info")
        assert status == 200 and body["app_id"] == setup.app_id.hex()


class TestUnreachableAndUntrusted:
    def test_unreachable_kms_is_503_and_heals(self):
        """Nothing listens at the KMS url: 503 kms_unavailable, and the agent recovers
        without a restart once the KMS is up."""
        workdir = short_tempdir("kms")
        try:
            kms_setup = KmsSetup(workdir)
            with kms_setup.kms.running():
                port = kms_setup.kms.port
            # the KMS is stopped: its port refuses connections
            agent = kms_setup.agent(f"https://localhost:{port}/prpc").start()
            try:
                status, body = agent.call("GetTlsKey", {"subject": "down"})
                assert status == 503 and body["code"] == "kms_unavailable", body
                assert "localhost" in body["error"]
                with kms_setup.kms.running(port):
                    status, body = agent.call("GetTlsKey", {"subject": "up"})
                    assert status == 200 and len(body["certificate_chain"]) == 3
            finally:
                agent.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def test_kms_with_another_root_is_not_trusted(self):
        """A server whose certificate is not from the root in appkeys.json (an impostor
        KMS) gets no CSR: 502 kms_untrusted, never a certificate."""
        workdir = short_tempdir("kms")
        try:
            kms_setup = KmsSetup(workdir)
            impostor = FakeKms(trust=kms_setup.kms.trust)
            with impostor.running():
                agent = kms_setup.agent(impostor.url).start()
                try:
                    status, body = agent.call("GetTlsKey", {"subject": "x"})
                finally:
                    agent.stop()
            assert status == 502 and body["code"] == "kms_untrusted", body
            assert impostor.signed == []
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def test_incomplete_kms_app_keys_stop_start_up():
    """KMS app keys without the temporary CA cannot work: start-up fails with a message."""
    workdir = short_tempdir("kms")
    try:
        keys = FakeKms().app_keys(b"\x02" * 20)
        doc = json.loads(keys.to_appkeys_json())
        del doc["key_provider"]["Kms"]["tmp_ca_key"]
        (workdir / "appkeys.json").write_text(json.dumps(doc))
        agent = AgentProcess("simulator", workdir=workdir,
                             extra_args=["--appkeys", str(workdir / "appkeys.json")])
        with pytest.raises(RuntimeError, match="needs tmp_ca_cert and tmp_ca_key"):
            agent.start()
        assert agent.proc is not None and agent.proc.wait(10) == 2
        assert not agent.socket.exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class TestCsrAndSanitising:
    def test_csr_roundtrip_and_forgery(self):
        """The CSR decodes to what was signed; a changed field or signature fails."""
        key = certs.new_tls_key()
        csr = CertSigningRequest(
            pubkey=certs.spki_der(key.public_key()),
            config=CertConfig(subject="s", subject_alt_names=("a", "b"), not_after=2**40),
            attestation=b"\x00attestation",
        )
        signature = csr.sign(key)
        decoded = CertSigningRequest.from_scale(csr.to_scale())
        assert decoded == csr
        decoded.verify(signature)
        forged = CertSigningRequest(pubkey=csr.pubkey, config=CertConfig(subject="evil"),
                                    attestation=csr.attestation)
        with pytest.raises(EvidenceError, match="signature"):
            forged.verify(signature)
        wrong_word = CertSigningRequest(pubkey=csr.pubkey, config=csr.config,
                                        attestation=csr.attestation, confirm="sign it")
        with pytest.raises(EvidenceError, match="confirm"):
            wrong_word.verify(wrong_word.sign(key))

    def test_sanitize_keeps_urls_and_drops_paths(self):
        text = "failed: /var/lib/kms/keys/root.key missing\n(see https://kms.example/prpc)"
        assert sanitize_remote_message(text) == "failed: <path> missing (see https://kms.example/prpc)"
        assert len(sanitize_remote_message("x" * 5000)) == 512

    def test_appkeys_roundtrip_with_kms_fields(self):
        kms = FakeKms()
        keys = kms.app_keys(b"\x01" * 20, url="https://kms:8000/prpc")
        again = RootKey.from_appkeys_json(keys.to_appkeys_json())
        assert again == keys
        assert again.key_provider.tmp_ca_key_pem == keys.key_provider.tmp_ca_key_pem
        doc = json.loads(keys.to_appkeys_json())
        assert list(doc["key_provider"]["Kms"]) == ["url", "pubkey", "tmp_ca_key", "tmp_ca_cert"]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_sdk_in_kms_mode(agent, setup):
    """The official JS SDK's getTlsKey (and the rest of its smoke run) against a
    KMS-provisioned agent: the chain is the KMS's."""
    result = run_js_smoke(agent.socket)
    leaf, app_ca, root = leaf_and_chain(result["tls_chain"])
    certs.verify_chain([leaf, app_ca, root])
    assert root == setup.kms.root.cert
    assert certs.RaTlsCertificate.from_certificate(leaf).app_id == setup.app_id
    assert result["info_app_id"] == setup.app_id.hex()


def test_tdx_platform_in_kms_mode():
    """The production TDX plugin (on the fake kernel) with KMS app keys: the CSR carries a
    TDX-on-fake quote that the KMS verifies against the machine's trust bundle."""
    workdir = short_tempdir("kms")
    try:
        machine_root = workdir / "tree"
        compose = document_text(app_compose_document("kms-tdx"))
        app_id = hashlib.sha256(compose.encode()).digest()[:20]
        kms = FakeKms()
        with kms.running():
            machine = FakeTdxMachine.create(machine_root, app_compose=compose,
                                           appkeys=kms.app_keys(app_id))
            kms.trust = machine.trust_bundle()
            agent = machine.agent(workdir=workdir).start()
            try:
                result = DstackClient(str(agent.socket)).get_tls_key(subject="t", usage_ra_tls=True)
            finally:
                agent.stop()
        leaf, app_ca, root = leaf_and_chain(result.certificate_chain)
        certs.verify_chain([leaf, app_ca, root])
        assert root == kms.root.cert
        assert certs.RaTlsCertificate.from_certificate(leaf).app_id == app_id
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
