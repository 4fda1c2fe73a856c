"""The official JavaScript SDK (@phala/dstack-sdk) against a real agent subprocess.

``scripts/install --test`` installs the SDK from tests/js/package-lock.json with npm; the
test is skipped only where Node.js or npm is absent from the machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from coincurve import PublicKey
from coincurve.ecdsa import cdata_to_der, deserialize_compact
from cryptography import x509

from dstack_core import keys
from dstack_core.envelope import Envelope
from dstack_core.eventlog import events_from_json
from dstack_core.quote import TdxQuote

JS_DIR = Path(__file__).parent / "js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


def run_js_smoke(socket: Path) -> dict[str, Any]:
    """Run tests/js/sdk_smoke.mjs (the official JS SDK) against the agent on ``socket``."""
    if not (JS_DIR / "node_modules" / "@phala" / "dstack-sdk").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       capture_output=True, timeout=300)
    proc = subprocess.run(["node", "sdk_smoke.mjs", str(socket)], cwd=JS_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def js_result(agent):
    return run_js_smoke(agent.socket)


class TestJsSdk:
    def test_get_key_chain(self, js_result):
        """getKey's chain recovers to the app key, as the Python SDK's does."""
        pub = PublicKey.from_secret(bytes.fromhex(js_result["key"])).format()
        message = keys.keccak256(f"js-purpose:{pub.hex()}".encode())
        sig0 = bytes.fromhex(js_result["signature_chain"][0])
        assert PublicKey.from_signature_and_message(sig0, message, hasher=None)

    def test_quotes_and_replay(self, js_result):
        """getQuote binds the report data; the SDK's replay equals the quote's RTMRs."""
        report = TdxQuote.from_bytes(bytes.fromhex(js_result["quote"])).report
        assert report.report_data == b"js-report-data".ljust(64, b"\0")
        assert js_result["quote_replay"] == [r.hex() for r in report.rtmrs]
        after = TdxQuote.from_bytes(bytes.fromhex(js_result["after_quote"])).report
        assert js_result["after_replay"] == [r.hex() for r in after.rtmrs]
        last = events_from_json(js_result["after_event_log"])[-1]
        assert (last.event, last.event_payload) == ("js-event", b"js-payload")

    def test_sign_verify(self, js_result):
        """sign/verify agree with libsecp256k1."""
        sig = bytes.fromhex(js_result["signature"])
        pub = PublicKey(bytes.fromhex(js_result["public_key"]))
        assert pub.verify(cdata_to_der(deserialize_compact(sig)),
                          hashlib.sha256(b"js message").digest(), hasher=None)
        assert js_result["verified"] is True

    def test_tls_and_attest(self, js_result):
        """getTlsKey returns a chain that verifies; attest returns our envelope."""
        leaf, ca = (x509.load_pem_x509_certificate(p.encode()) for p in js_result["tls_chain"])
        leaf.verify_directly_issued_by(ca)
        envelope = Envelope.from_cbor(bytes.fromhex(js_result["attestation"]))
        assert envelope.report_data == b"js-attest".ljust(64, b"\0")
        tappd = TdxQuote.from_bytes(bytes.fromhex(js_result["tappd_quote"])).report
        assert tappd.report_data == hashlib.sha512(b"app-data:tappd-data").digest()
        assert js_result["version"]
