"""Tests for dstack_core.server.verifier: POST /verify (upstream shape + checks), GET /health."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import attrs
import pytest
from aiohttp import test_utils, web

from dstack_core.collateral import Collateral, CollateralSource
from dstack_core.envelope import Envelope
from dstack_core.errors import EvidenceError
from dstack_core.server.verifier import (
    VerifierSettings,
    app_from_env,
    create_verifier_app,
    settings_from_env,
)
from dstack_core.snp import build_report
from dstack_core.testing import short_tempdir
from dstack_core.testing.logscan import record_output
from dstack_core.verify import CHECK_NAMES

from .conftest import Bundle
from .test_upstream import encode_v0, encode_v1

REPORT_DATA = b"service-tests".ljust(64, b"\0")


@attrs.frozen
class Sample:
    attestation: bytes
    get_quote: dict[str, Any]
    tls_chain: list[str]


@pytest.fixture(scope="module")
def sample(agent) -> Sample:
    _, attest = agent.call("Attest", {"report_data": REPORT_DATA.hex()})
    _, quote = agent.call("GetQuote", {"report_data": REPORT_DATA.hex()})
    _, tls = agent.call("GetTlsKey", {"subject": "svc", "usage_ra_tls": True})
    return Sample(bytes.fromhex(attest["attestation"]), quote, tls["certificate_chain"])


@pytest.fixture(scope="module")
def settings(bundle: Bundle) -> VerifierSettings:
    return VerifierSettings(
        collateral=CollateralSource(fixed=Collateral.from_json(bundle.collateral_json)),
        root_ca_der=bundle.root_ca_der,
        allow_simulator=True,
        os_image_policy=bundle.os_image_policy,
    )


def request(
    settings: VerifierSettings,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One request against an in-process server; returns (status, parsed JSON)."""

    async def go() -> tuple[int, Any]:
        async with test_utils.TestClient(
            test_utils.TestServer(create_verifier_app(settings))
        ) as client:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            response = await client.request(method, path, data=data)
            return response.status, await response.json()

    return asyncio.run(go())


def upstream_envelope(attestation: bytes, encoder: Any) -> bytes:
    """Our agent's evidence re-encoded as an upstream V0/V1 envelope (what the upstream
    agent would send for the same quote and events)."""
    envelope = Envelope.from_cbor(attestation)
    runtime = [e.to_runtime_event() for e in envelope.event_log if e.is_runtime]
    return encoder(
        envelope.quote, envelope.event_log, runtime, envelope.report_data, envelope.vm_config
    )


class TestVerify:
    def test_health(self, settings):
        """GET /health answers like upstream's verifier."""
        assert request(settings, "GET", "/health") == (
            200,
            {"status": "ok", "service": "dstack-verifier"},
        )

    def test_attestation_is_valid(self, settings, sample):
        """An Attest envelope verifies: upstream keys, our verdict and per-check map."""
        status, doc = request(
            settings, "POST", "/verify", {"attestation": sample.attestation.hex()}
        )
        assert status == 200
        assert doc["is_valid"] is True and doc["verdict"] == "pass" and doc["reason"] is None
        assert doc["simulated"] is True
        assert set(doc["checks"]) == set(CHECK_NAMES)
        details = doc["details"]
        assert details["quote_verified"] and details["event_log_verified"]
        assert details["report_data"] == REPORT_DATA.hex()
        assert details["tcb_status"] == "UpToDate"
        assert details["tee_variant"] == "dstack-tdx"
        assert details["app_info"]["app_id"] == details["boot_info"]["appId"]
        assert details["key_provider"] == {"name": "none", "id": ""}

    def test_raw_quote_request(self, settings, sample):
        """Upstream's raw-quote request (quote + event_log JSON string + vm_config) verifies."""
        body = {k: sample.get_quote[k] for k in ("quote", "event_log", "vm_config")}
        status, doc = request(settings, "POST", "/verify", {**body, "debug": True})
        assert status == 200 and doc["is_valid"], doc["reason"]

    @pytest.mark.parametrize("encoder", [encode_v0, encode_v1], ids=["v0", "v1"])
    def test_upstream_envelopes(self, settings, sample, encoder):
        """The same evidence as an upstream V0 or V1 envelope verifies too."""
        data = upstream_envelope(sample.attestation, encoder)
        status, doc = request(settings, "POST", "/verify", {"attestation": data.hex()})
        assert status == 200 and doc["is_valid"], doc["reason"]
        assert doc["checks"]["evidence"]["detail"].startswith("decoded upstream-v")

    def test_certificate_chain_and_expectation(self, settings, sample):
        """An RA-TLS chain verifies; a wrong expected_report_data makes it invalid."""
        status, doc = request(settings, "POST", "/verify", {"certificate_chain": sample.tls_chain})
        assert status == 200 and doc["is_valid"], doc["reason"]
        status, doc = request(
            settings,
            "POST",
            "/verify",
            {
                "attestation": sample.attestation.hex(),
                "expected_report_data": "00" * 64,
            },
        )
        assert status == 200 and not doc["is_valid"]
        assert doc["reason"].startswith("report_data")
        assert doc["checks"]["report_data"]["status"] == "fail"

    def test_simulator_rejected_without_opt_in(self, settings, sample):
        """A service without --allow-simulator answers is_valid false, naming the policy."""
        strict = attrs.evolve(settings, allow_simulator=False)
        status, doc = request(strict, "POST", "/verify", {"attestation": sample.attestation.hex()})
        assert status == 200 and doc["is_valid"] is False
        assert doc["checks"]["simulator_policy"]["status"] == "fail"

    def test_tampered_evidence_is_invalid_not_an_error(self, settings, sample):
        """A failed check is a 200 with is_valid false, not an HTTP error."""
        envelope = Envelope.from_cbor(sample.attestation)
        tampered = attrs.evolve(envelope, report_data=bytes(64)).to_cbor()
        status, doc = request(settings, "POST", "/verify", {"attestation": tampered.hex()})
        assert status == 200 and not doc["is_valid"]
        assert doc["checks"]["envelope_binding"]["status"] == "fail"

    def test_collateral_fetch_failure_reported(self, settings, sample):
        """An unreachable PCCS (a fake fetcher: no network) leaves the quote checks
        skipped with the reason, and the answer is invalid, not an error."""

        async def unreachable(url: str, quote: bytes) -> str:
            raise EvidenceError("cannot fetch collateral from https://pccs.invalid: refused")

        fetching = attrs.evolve(
            settings,
            collateral=CollateralSource(pccs_url="https://pccs.invalid", fetcher=unreachable),
        )
        status, doc = request(
            fetching, "POST", "/verify", {"attestation": sample.attestation.hex()}
        )
        assert status == 200 and not doc["is_valid"]
        assert "refused" in doc["checks"]["quote_signature"]["detail"]


class TestErrors:
    @pytest.mark.parametrize(
        ("body", "code"),
        [
            (b"not json", "invalid_request"),
            (b"[1]", "invalid_request"),
            (b"{}", "malformed_evidence"),
            (b'{"attestation": "zz"}', "malformed_evidence"),
            (b'{"attestation": "d9d9f7a0"}', "malformed_evidence"),
            (b'{"quote": "0400"}', "malformed_evidence"),
            (
                b'{"attestation": "' + b"00" * 8 + b'", "expected_report_data": 7}',
                "invalid_request",
            ),
        ],
    )
    def test_bad_input_is_400(self, settings, body, code):
        """Malformed requests answer 400 {"error", "code"}."""
        status, doc = request(settings, "POST", "/verify", raw=body)
        assert status == 400
        assert set(doc) == {"error", "code"} and doc["code"] == code and doc["error"]

    def test_unsupported_platform_is_400(self, settings):
        """Evidence of an unsupported platform (upstream V0 GCP TDX): 400 unsupported_evidence."""
        gcp_v0 = b"\x00\x01" + bytes(80)
        status, doc = request(settings, "POST", "/verify", {"attestation": gcp_v0.hex()})
        assert status == 400 and doc["code"] == "unsupported_evidence"

    def test_sev_snp_envelope_is_verified_but_never_valid(self, settings):
        """An SEV-SNP envelope without its VCEK chain (the service has only Intel
        collateral) is checked (200), never valid: vcek_chain fails, the signature is
        skipped."""
        report = build_report(report_data=b"\x07" * 64, signature=b"\x01" * 144)
        envelope = Envelope(
            platform="sev-snp", evidence_format="sev-snp", quote=report, report_data=b"\x07" * 64
        )
        status, doc = request(
            settings, "POST", "/verify", {"attestation": envelope.to_cbor().hex()}
        )
        assert status == 200 and doc["is_valid"] is False
        assert doc["details"]["tee_variant"] == "dstack-amd-sev-snp"
        assert doc["details"]["quote_verified"] is False
        assert doc["checks"]["envelope_binding"]["status"] == "pass"
        assert doc["checks"]["snp_signature"]["status"] == "skipped"
        assert doc["reason"].startswith("vcek_chain:")
        assert doc["verifier"]["plugin"] == "dstack-sev-snp-stub"

    def test_body_limit(self, settings, sample):
        """Bodies over max_body_size are refused with payload_too_large."""
        small = attrs.evolve(settings, max_body_size=1000)
        status, doc = request(small, "POST", "/verify", {"attestation": sample.attestation.hex()})
        assert status == 400 and doc["code"] == "payload_too_large"

    def test_wrong_method_and_path(self, settings):
        """GET /verify is 405, unknown paths 404, both JSON."""
        assert request(settings, "GET", "/verify")[0] == 405
        status, doc = request(settings, "GET", "/nope")
        assert status == 404 and doc["code"] == "not_found"


class TestConfiguration:
    def test_settings_from_env(self, tmp_path, bundle):
        """DSTACK_VERIFIER_* variables configure the service (gunicorn has no flags)."""
        (tmp_path / "collateral.json").write_text(bundle.collateral_json)
        from cryptography import x509

        root = x509.load_der_x509_certificate(bundle.root_ca_der)
        from cryptography.hazmat.primitives.serialization import Encoding

        (tmp_path / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
        env = {
            "DSTACK_VERIFIER_COLLATERAL": str(tmp_path / "collateral.json"),
            "DSTACK_VERIFIER_ROOT_CA": str(tmp_path / "root.pem"),
            "DSTACK_VERIFIER_ALLOW_SIMULATOR": "true",
            "DSTACK_VERIFIER_ALLOW_TCB_STATUS": "SWHardeningNeeded, OutOfDate",
            "DSTACK_VERIFIER_REJECT_ADVISORY": "INTEL-SA-00001",
            "DSTACK_VERIFIER_COLLATERAL_CACHE": str(tmp_path / "cache"),
            "DSTACK_VERIFIER_MAX_BODY_SIZE": "4096",
        }
        settings = settings_from_env(env)
        assert settings.root_ca_der == bundle.root_ca_der and settings.allow_simulator
        assert settings.allowed_tcb_statuses == {"UpToDate", "SWHardeningNeeded", "OutOfDate"}
        assert settings.rejected_advisory_ids == {"INTEL-SA-00001"}
        assert settings.collateral.fixed is not None and settings.collateral.cache is not None
        assert settings.max_body_size == 4096
        assert settings_from_env({}).collateral.configured is False

    def test_app_from_env_is_a_gunicorn_factory(self, monkeypatch):
        """app_from_env is the coroutine factory aiohttp's gunicorn worker awaits."""
        monkeypatch.setenv("DSTACK_VERIFIER_ALLOW_SIMULATOR", "1")
        app = asyncio.run(app_from_env())
        assert isinstance(app, web.Application)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_serves_verify(bundle, sample):
    """`dstack-agent verifier --listen` serves /verify over TCP until terminated."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out = short_tempdir("vbundle")
    (out / "collateral.json").write_text(bundle.collateral_json)
    root = x509.load_der_x509_certificate(bundle.root_ca_der).public_bytes(Encoding.PEM)
    (out / "root_ca.pem").write_bytes(root)
    (out / "os_image_policy.json").write_text(bundle.os_image_policy_json or "")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dstack_core.cli",
            "verifier",
            "--listen",
            f"127.0.0.1:{port}",
            "--trust-bundle",
            str(out),
            "--allow-simulator",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "verifier did not start"
                time.sleep(0.1)
        body = json.dumps({"attestation": sample.attestation.hex()}).encode()
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/verify",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=10) as response:
            doc = json.load(response)
        assert doc["is_valid"] is True and doc["simulated"] is True
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            record_output("verifier", proc.stderr.read())
        shutil.rmtree(out, ignore_errors=True)
