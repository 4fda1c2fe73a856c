"""Attacks on what the verifier reports (issue 8), tried as an attacker would.

Each attack starts from genuine evidence of the module's simulator agent (or from upstream's
real V0 fixture re-signed by a mock PKI) and goes through every input form: our CBOR
envelope, an Attest JSON body, a GetQuote JSON body, an RA-TLS certificate chain, the CLI
and ``POST /verify`` in the upstream-shaped answer. Each must end with verdict ``fail``,
the failing check named first in ``reason``, and none of the attacker's values reported as
a claim.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import test_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dstack_tdx.qvl import QvlOutcome as _QvlOutcome
from dstack_tdx.qvl import dcap_checks as _dcap_checks

from dstack_core import certs
from dstack_core.appinfo import derive_app_info
from dstack_core.cli import main
from dstack_core.collateral import Collateral, CollateralSource
from dstack_core.envelope import AppInfo, Envelope
from dstack_core.eventlog import (
    EV_NO_ACTION,
    RuntimeEvent,
    TdxEvent,
    events_from_json,
    events_to_json,
    replay_rtmrs,
    runtime_event,
)
from dstack_core.mockpki import MockIntelPki, mock_td_report
from dstack_core.osimage import OsImagePolicy
from dstack_core.quote import TdxQuote
from dstack_core.server.verifier import VerifierSettings, create_verifier_app
from dstack_core.types import RootKey
from dstack_core.upstream import decode_attestation
from dstack_core.verify import (
    VerificationResult,
    VerifyOptions,
    load_evidence,
    verify,
    verify_evidence,
)

from .conftest import DATA, Bundle, input_path
from .test_upstream import encode_v0, encode_v1

NOW = int(datetime.now(UTC).timestamp())
REPORT_DATA = b"soundness".ljust(64, b"\0")
EV_POST_CODE = 0x00000001
FORGED = {
    "app-id": b"\xee" * 20,
    "compose-hash": b"\xee" * 32,
    "instance-id": b"\xee" * 20,
    "key-provider": b'{"name":"kms","id":"eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"}',
    "init-script-hash": b"\xee" * 32,
}
FORGED_MARK = "ee" * 20
FORGED_OS = "ee" * 32


# --- genuine evidence ------------------------------------------------------------------


@attrs.frozen
class Genuine:
    """Evidence taken once from the module's simulator agent, with what verifies it."""

    attestation: bytes
    get_quote: dict[str, Any]
    tls_chain: list[str]
    tls_key: str
    ca: certs.CertificateAuthority
    bundle: Bundle


@pytest.fixture(scope="module")
def genuine(agent, bundle: Bundle) -> Genuine:
    _, attest = agent.call("Attest", {"report_data": REPORT_DATA.hex()})
    _, quote = agent.call("GetQuote", {"report_data": REPORT_DATA.hex()})
    status, tls = agent.call("GetTlsKey", {"subject": "app.example", "usage_ra_tls": True})
    assert status == 200, tls
    root_key = RootKey.from_appkeys_json(input_path(agent, "appkeys.json").read_bytes())
    assert root_key.key_provider.key_pem is not None
    ca = certs.CertificateAuthority.from_pem(root_key.ca_cert_pem, root_key.key_provider.key_pem)
    return Genuine(
        bytes.fromhex(attest["attestation"]),
        quote,
        list(tls["certificate_chain"]),
        tls["key"],
        ca,
        bundle,
    )


@pytest.fixture(scope="module")
def collateral(genuine: Genuine) -> Collateral:
    return Collateral.from_json(genuine.bundle.collateral_json)


def options(genuine: Genuine, **changes: Any) -> VerifyOptions:
    """Trust the simulator, with its bundle's OS image policy."""
    return genuine.bundle.verify_options(NOW, **changes)


# --- the attacks, on an event list ---------------------------------------------------------

Attack = Callable[[Sequence[TdxEvent]], tuple[TdxEvent, ...]]


def insert_no_action(events: Sequence[TdxEvent]) -> tuple[TdxEvent, ...]:
    """EV_NO_ACTION records named like dstack's identity events, in RTMR3, before the real
    ones: the replay skips them (TCG rule), a naive reader finds them first."""
    first = next(i for i, e in enumerate(events) if e.imr == 3)
    forged = tuple(
        TdxEvent(imr=3, event_type=EV_NO_ACTION, digest=bytes(48), event=n, event_payload=p)
        for n, p in FORGED.items()
    )
    return (*events[:first], *forged, *events[first:])


def retype_app_id(events: Sequence[TdxEvent]) -> tuple[TdxEvent, ...]:
    """The real ``app-id`` event retyped (EV_POST_CODE), keeping its real digest so RTMR3
    still replays, with the attacker's payload."""
    out = []
    for event in events:
        if event.is_runtime and event.event == "app-id":
            event = TdxEvent(
                imr=3,
                event_type=EV_POST_CODE,
                digest=event.computed_digest,
                event="app-id",
                event_payload=FORGED["app-id"],
            )
        out.append(event)
    return tuple(out)


ATTACKS = {"no_action": insert_no_action, "retype": retype_app_id}


def forge_envelope(raw: bytes, attack: Attack, **changes: Any) -> bytes:
    """Our envelope with the attacked log, and app_info claims made to match what a naive
    verifier derives from it (so that only the replay rules can catch the attack)."""
    envelope = Envelope.from_cbor(raw)
    envelope = attrs.evolve(envelope, event_log=attack(envelope.event_log), **changes)
    report = TdxQuote.from_bytes(envelope.quote).report
    naive = derive_app_info(report, envelope.event_log, envelope.vm_config)
    return attrs.evolve(envelope, app_info=naive).to_cbor()


def forge_get_quote(doc: dict[str, Any], attack: Attack) -> str:
    forged = dict(doc)
    forged["event_log"] = events_to_json(attack(events_from_json(doc["event_log"])))
    return json.dumps(forged)


def reissue(genuine: Genuine, attestation: bytes, **request: Any) -> str:
    """A certificate for the genuine leaf key carrying ``attestation``, issued by the app CA."""
    leaf_key = serialization.load_pem_private_key(genuine.tls_key.encode(), None)
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    cert = certs.issue_certificate(
        genuine.ca,
        leaf_key.public_key(),
        certs.TlsCertificateRequest(
            subject=request.pop("subject", "app.example"), attestation=attestation, **request
        ),
        now=datetime.now(UTC),
    )
    return certs.cert_pem(cert) + genuine.ca.cert_pem


def leaf_attestation(pem: str) -> bytes:
    leaf = certs.RaTlsCertificate.from_certificate(x509.load_pem_x509_certificate(pem.encode()))
    assert leaf.attestation is not None
    return leaf.attestation


def forged_inputs(genuine: Genuine, attack: Attack) -> dict[str, bytes | str]:
    """The attack in every input form the library and CLI read."""
    envelope = forge_envelope(genuine.attestation, attack)
    in_cert = forge_envelope(leaf_attestation(genuine.tls_chain[0]), attack)
    return {
        "envelope": envelope,
        "envelope-hex": envelope.hex(),
        "attest-json": json.dumps({"attestation": envelope.hex()}),
        "get-quote-json": forge_get_quote(genuine.get_quote, attack),
        "ratls-pem": reissue(genuine, in_cert),
    }


def assert_no_forged_claim(claims: Any) -> None:
    text = json.dumps(claims)
    assert FORGED_MARK not in text and "eeeeeeee" not in text, claims


def assert_failed_with(result: VerificationResult, check: str) -> None:
    assert result.verdict == "fail", result.to_json()
    assert result.reason is not None and result.reason.startswith(f"{check}:"), result.reason
    assert result.check(check).status == "fail"
    assert_no_forged_claim(result.claims())
    assert result.app_id == b"" and not result.identity_bound


# --- paragraph 1: identity from events the replay skipped ---------------------------------


class TestSkippedEvents:
    @pytest.mark.parametrize("attack", sorted(ATTACKS))
    @pytest.mark.parametrize(
        "form", ["envelope", "envelope-hex", "attest-json", "get-quote-json", "ratls-pem"]
    )
    def test_library(self, genuine, collateral, attack, form):
        """Every form: fail, event_log named, no forged claim."""
        data = forged_inputs(genuine, ATTACKS[attack])[form]
        result = verify(data, options(genuine), collateral)
        assert_failed_with(result, "event_log")
        assert "RTMR3 has type" in result.check("event_log").detail
        assert "only dstack runtime events" in result.check("event_log").detail

    @pytest.mark.parametrize("attack", sorted(ATTACKS))
    def test_cli(self, genuine, attack, tmp_path, capsys):
        """``dstack-agent verify``: exit 1, reason names event_log, no forged claim printed."""
        bundle_dir = write_bundle(genuine.bundle, tmp_path / "bundle")
        for form, data in forged_inputs(genuine, ATTACKS[attack]).items():
            path = tmp_path / form
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
            code = main(["verify", str(path), "--trust-bundle", str(bundle_dir), "--allow-simulator"])
            doc = json.loads(capsys.readouterr().out)
            assert code == 1, (form, doc["reason"])
            assert doc["verdict"] == "fail" and doc["reason"].startswith("event_log:"), form
            assert doc["app_id"] == "" and doc["runtime_events"] == []
            assert_no_forged_claim({k: v for k, v in doc.items() if k != "checks"})

    @pytest.mark.parametrize("attack", sorted(ATTACKS))
    def test_service(self, genuine, attack):
        """POST /verify: is_valid false, verdict fail, no app_info, in every body shape."""
        forged = forged_inputs(genuine, ATTACKS[attack])
        bodies = [
            {"attestation": forged["envelope-hex"]},
            json.loads(forged["get-quote-json"]),
            {"certificate_chain": split_pem(str(forged["ratls-pem"]))},
        ]
        for body in bodies:
            status, doc = post(service_settings(genuine), body)
            assert status == 200, doc
            assert doc["is_valid"] is False and doc["verdict"] == "fail"
            assert doc["reason"].startswith("event_log:"), doc["reason"]
            assert doc["details"]["app_info"] is None and doc["details"]["boot_info"] is None
            assert doc["details"]["event_log_verified"] is False
            assert_no_forged_claim(doc["details"])

    @pytest.mark.parametrize("event_type", [EV_NO_ACTION, EV_POST_CODE])
    def test_hand_edited_get_quote_event(self, genuine, collateral, tmp_path, capsys, event_type):
        """Upstream's GetQuote sends runtime events with "digest": "". Retyping one by hand
        (or adding an EV_NO_ACTION record shaped like them) leaves a digest nothing can
        replay: the verdict names event_log (exit 1), not a malformed input, and claims
        nothing."""
        doc = dict(genuine.get_quote)
        events = json.loads(doc["event_log"])
        app_id = next(i for i, e in enumerate(events) if e["event"] == "app-id")
        forged = {
            **events[app_id],
            "event_type": event_type,
            "digest": "",
            "event_payload": FORGED["app-id"].hex(),
        }
        for log in (
            [*events[:app_id], forged, *events[app_id + 1 :]],
            [*events[:app_id], forged, *events[app_id:]],
        ):
            doc["event_log"] = json.dumps(log)
            result = verify(json.dumps(doc), options(genuine), collateral)
            assert_failed_with(result, "event_log")
            assert "cannot be replayed" in result.check("event_log").detail
            code, out = cli(
                tmp_path, capsys, json.dumps(doc).encode(),
                "--trust-bundle", str(write_bundle(genuine.bundle, tmp_path / "b")),
                "--allow-simulator",
            )
            assert code == 1 and out["reason"].startswith("event_log:")
            assert_no_forged_claim({k: v for k, v in out.items() if k != "checks"})

    def test_boot_event_without_digest(self, genuine, collateral):
        """A boot event whose digest was removed cannot be replayed: event_log fails."""
        doc = dict(genuine.get_quote)
        events = json.loads(doc["event_log"])
        events[0] = {**events[0], "digest": ""}
        doc["event_log"] = json.dumps(events)
        result = verify(json.dumps(doc), options(genuine), collateral)
        assert result.verdict == "fail" and result.reason.startswith("event_log:")
        assert "event 0 (imr 0" in result.reason and result.boot_events == ()

    def test_runtime_event_version_is_bound(self, genuine, collateral):
        """Claiming digest version 2 for a version-1 event changes its digest: RTMR3 fails."""
        envelope = Envelope.from_cbor(genuine.attestation)
        flipped = tuple(
            attrs.evolve(e, version=2, digest=b"") if e.event == "app-id" else e
            for e in envelope.event_log
        )
        result = verify(
            attrs.evolve(envelope, event_log=flipped).to_cbor(), options(genuine), collateral
        )
        assert result.verdict == "fail" and result.reason.startswith("event_log:")
        assert not result.identity_bound


def split_pem(text: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    return [part + marker + "\n" for part in text.split(marker) if part.strip()]


def write_bundle(bundle: Bundle, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    root = x509.load_der_x509_certificate(bundle.root_ca_der)
    (out / "root_ca.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (out / "collateral.json").write_text(bundle.collateral_json)
    if bundle.os_image_policy_json is not None:
        (out / "os_image_policy.json").write_text(bundle.os_image_policy_json)
    return out


def service_settings(genuine: Genuine, **changes: Any) -> VerifierSettings:
    fields: dict[str, Any] = {
        "collateral": CollateralSource(fixed=Collateral.from_json(genuine.bundle.collateral_json)),
        "root_ca_der": genuine.bundle.root_ca_der,
        "allow_simulator": True,
        "os_image_policy": genuine.bundle.os_image_policy,
    }
    return VerifierSettings(**{**fields, **changes})


def post(settings: VerifierSettings, body: Any) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        server = test_utils.TestServer(create_verifier_app(settings))
        async with test_utils.TestClient(server) as client:
            data = body if isinstance(body, bytes) else json.dumps(body)
            response = await client.post("/verify", data=data)
            return response.status, await response.json()

    return asyncio.run(go())


# --- paragraph 2: claims nothing binds -----------------------------------------------------


class TestOsImage:
    def test_genuine_with_policy_binds_the_image(self, genuine, collateral):
        """With the simulator's OS image policy the signed registers are a known image:
        os_image passes and os_image_hash is that image's, bound through the registers."""
        result = verify(genuine.attestation, options(genuine), collateral)
        assert result.verdict == "pass", result.reason
        assert result.check("os_image").status == "pass" and result.check("os_image").mandatory
        assert result.os_image_verified and result.warnings == (
            result.warnings[0],
        )  # only the simulated-evidence warning
        policy = genuine.bundle.os_image_policy
        assert result.os_image_hash == policy.images[0].os_image_hash

    def test_genuine_without_policy_is_unverified(self, genuine, collateral):
        """Without a policy: pass, but os_image_hash is not a claim, the warnings say so
        plainly, and the upstream-shaped answer is not is_valid."""
        result = verify(genuine.attestation, options(genuine, os_image_policy=None), collateral)
        assert result.verdict == "pass"
        assert result.os_image_hash == b"" and not result.os_image_verified
        assert result.check("os_image").status == "skipped"
        assert not result.check("os_image").mandatory
        assert any("nothing ties this app to a known OS image" in w for w in result.warnings)
        upstream = result.to_upstream_json()
        assert upstream["is_valid"] is False and upstream["reason"].startswith("os_image:")
        assert upstream["details"]["os_image_hash_verified"] is False
        assert upstream["details"]["boot_info"]["osImageHash"] == ""

    def test_forged_vm_config(self, genuine, collateral):
        """A chosen vm_config (and matching app_info claim) is never reported; with the
        policy it fails os_image, without it stays unverified and is_valid is false."""
        envelope = Envelope.from_cbor(genuine.attestation)
        vm_config = json.dumps({"os_image_hash": FORGED_OS, "cpu_count": 1})
        claims = attrs.evolve(envelope.app_info, os_image_hash=bytes.fromhex(FORGED_OS))
        forged = attrs.evolve(envelope, vm_config=vm_config, app_info=claims).to_cbor()
        result = verify(forged, options(genuine), collateral)
        assert_failed_with_os(result, "os_image")
        unverified = verify(forged, options(genuine, os_image_policy=None), collateral)
        assert unverified.os_image_hash == b""
        assert FORGED_OS not in json.dumps(unverified.claims())
        detail = unverified.check("envelope_binding").detail
        assert "recomputed" in detail and "no signature covers" in detail
        upstream = unverified.to_upstream_json()
        assert upstream["is_valid"] is False
        assert FORGED_OS not in json.dumps(upstream["details"])
        status, doc = post(service_settings(genuine, os_image_policy=None), {"attestation": forged.hex()})
        assert status == 200 and doc["is_valid"] is False
        assert FORGED_OS not in json.dumps(doc["details"])

    def test_forged_vm_config_in_get_quote(self, genuine, collateral):
        """The same through GetQuote JSON, whose vm_config is equally unbound."""
        doc = dict(genuine.get_quote)
        doc["vm_config"] = json.dumps({"os_image_hash": FORGED_OS})
        result = verify(json.dumps(doc), options(genuine), collateral)
        assert_failed_with_os(result, "os_image")

    def test_empty_log_with_chosen_vm_config(self, genuine, collateral):
        """A genuine quote in our envelope with an empty log and a chosen vm_config does not
        pass: our envelopes always carry the full log, even with allow_stripped_event_log."""
        envelope = Envelope.from_cbor(genuine.attestation)
        forged = attrs.evolve(
            envelope,
            event_log=(),
            app_info=AppInfo(),
            vm_config=json.dumps({"os_image_hash": FORGED_OS}),
        ).to_cbor()
        for allow in (False, True):
            result = verify(
                forged,
                options(genuine, os_image_policy=None, allow_stripped_event_log=allow),
                collateral,
            )
            assert result.verdict == "fail" and result.reason.startswith("event_log:")
            assert FORGED_OS not in json.dumps(result.claims())

    def test_expected_registers(self, genuine, collateral):
        """--expect-mrtd/--expect-rtmr semantics: the right registers pass, a wrong one
        fails os_image, naming the register."""
        report = TdxQuote.from_bytes(Envelope.from_cbor(genuine.attestation).quote).report
        good = OsImagePolicy.combine(None, report.mr_td, {0: report.rtmr0, 2: report.rtmr2})
        result = verify(genuine.attestation, options(genuine, os_image_policy=good), collateral)
        assert result.check("os_image").status == "pass" and result.verdict == "pass"
        assert result.os_image_hash == b""  # registers pinned, no image hash known
        bad = OsImagePolicy.combine(None, report.mr_td, {1: bytes(48)})
        result = verify(genuine.attestation, options(genuine, os_image_policy=bad), collateral)
        assert result.verdict == "fail" and result.reason.startswith("os_image:")
        assert "RTMR1" in result.check("os_image").detail

    def test_policy_of_another_image(self, genuine, collateral):
        """A policy that knows only another image fails os_image."""
        other = OsImagePolicy.single(b"\x01" * 32, b"\x02" * 48, [b"\x03" * 48] * 3)
        result = verify(genuine.attestation, options(genuine, os_image_policy=other), collateral)
        assert result.verdict == "fail" and result.reason.startswith("os_image:")
        assert result.os_image_hash == b""


def assert_failed_with_os(result: VerificationResult, check: str) -> None:
    assert result.verdict == "fail", result.to_json()
    assert result.reason.startswith(f"{check}:"), result.reason
    assert FORGED_OS not in json.dumps(result.claims())
    assert not result.os_image_verified


class TestPlatformTag:
    @pytest.mark.parametrize(
        "tag", ["gcp-tdx-confidential-space", "tdx", "sev-snp", "nitro-enclave", "tdx-sim"]
    )
    def test_tag_that_disagrees_fails(self, genuine, collateral, tag):
        """The envelope's free-text platform never becomes the reported platform; one that
        names other hardware than the quote is fails envelope_binding."""
        forged = attrs.evolve(Envelope.from_cbor(genuine.attestation), platform=tag).to_cbor()
        result = verify(forged, options(genuine), collateral)
        assert result.platform == "simulator"
        assert result.verdict == "fail" and result.reason.startswith("envelope_binding:")
        assert tag in result.check("envelope_binding").detail
        assert json.dumps(tag) not in json.dumps(result.claims())
        _status, doc = post(service_settings(genuine), {"attestation": forged.hex()})
        assert doc["is_valid"] is False and doc["reason"].startswith("envelope_binding:")

    def test_simulated_vendor_tag_is_accepted_but_not_reported(self, genuine, collateral):
        """A simulated platform's own name (docs/plugins: never a hardware tag) on simulated
        evidence is accepted; the reported platform is still what the quote is."""
        forged = attrs.evolve(Envelope.from_cbor(genuine.attestation), platform="softtee")
        result = verify(forged.to_cbor(), options(genuine), collateral)
        assert result.verdict == "pass" and result.platform == "simulator"
        assert "softtee" not in json.dumps(result.claims())

    def test_hardware_quote_must_say_tdx(self):
        """An unmarked quote verified under Intel's root is hardware evidence: its envelope
        must say tdx (the mock signature fails too; the tag is what this test looks at)."""
        report = mock_td_report(mr_td=bytes(48), rtmrs=[bytes(48)] * 4, report_data=REPORT_DATA)
        quote = PKI.sign_quote(report, user_data=b"HARDWARE".ljust(20, b"\0"))
        for tag, ok in (("tdx", True), ("softtee", False), ("gcp-tdx-confidential-space", False)):
            envelope = Envelope(
                platform=tag, evidence_format="tdx", quote=quote, report_data=REPORT_DATA
            )
            result = verify(envelope.to_cbor(), VerifyOptions(now=NOW), None)
            assert result.platform == "tdx" and not result.simulated
            assert (result.check("envelope_binding").status == "pass") is ok, tag

    def test_upstream_and_quote_platform_come_from_the_quote(self, genuine, collateral):
        """Formats without a tag report what the quote is."""
        result = verify(json.dumps(genuine.get_quote), options(genuine), collateral)
        assert result.platform == "simulator"


# --- RA-TLS --------------------------------------------------------------------------------


def self_signed_leaf(attestation: bytes, key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    content = bytes([0x04, 0x82]) + len(attestation).to_bytes(2, "big") + attestation
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(certs.OID_ATTESTATION, content), critical=False)
        .sign(key, hashes.SHA256())
    )


def flip_signature(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature BIT STRING at the end
    return x509.load_der_x509_certificate(bytes(der))


class TestRaTls:
    @pytest.fixture(scope="class")
    @classmethod
    def lone_leaf(cls, agent) -> x509.Certificate:
        """A genuine self-signed RA-TLS leaf: the agent attests the key's report data."""
        key = ec.generate_private_key(ec.SECP256R1())
        report_data = certs.ratls_report_data(certs.spki_der(key.public_key()))
        _, attest = agent.call("Attest", {"report_data": report_data.hex()})
        return self_signed_leaf(bytes.fromhex(attest["attestation"]), key, "lone.example")

    def test_lone_leaf_self_signature_is_checked(self, genuine, collateral, lone_leaf):
        """A genuine lone leaf: untrusted (never pass) but valid; a broken self-signature
        fails ratls_chain and the verdict."""
        good = verify(certs.cert_pem(lone_leaf), options(genuine), collateral)
        assert good.check("ratls_binding").status == "pass"
        assert good.check("ratls_chain").status == "skipped"
        assert "UNTRUSTED" in good.check("ratls_chain").detail
        assert good.verdict == "pass"
        bad = verify(certs.cert_pem(flip_signature(lone_leaf)), options(genuine), collateral)
        assert bad.check("ratls_chain").status == "fail"
        assert "self-signature" in bad.check("ratls_chain").detail
        assert bad.verdict == "fail" and bad.reason.startswith("ratls_chain:")

    def test_reissued_by_attacker_ca(self, genuine, collateral):
        """The genuine key and extensions under forged names by an attacker's CA: never
        ratls_chain pass; with the genuine CA as trust anchor it fails; the names are not
        reported anywhere."""
        attacker = certs.new_app_ca(certs.new_tls_key(), now=datetime.now(UTC))
        leaf_key = serialization.load_pem_private_key(genuine.tls_key.encode(), None)
        assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
        forged = certs.issue_certificate(
            attacker,
            leaf_key.public_key(),
            certs.TlsCertificateRequest(
                subject="bank.attacker.example",
                alt_names=("bank.attacker.example",),
                attestation=leaf_attestation(genuine.tls_chain[0]),
            ),
            now=datetime.now(UTC),
        )
        chain = certs.cert_pem(forged) + attacker.cert_pem
        result = verify(chain, options(genuine), collateral)
        assert result.check("ratls_binding").status == "pass"
        assert result.check("ratls_chain").status != "pass"
        assert "attacker" not in json.dumps(result.to_json())
        anchor = x509.load_pem_x509_certificate(genuine.ca.cert_pem.encode())
        anchored = options(
            genuine, ratls_trust_anchors=[anchor.public_bytes(serialization.Encoding.DER)]
        )
        result = verify(chain, anchored, collateral)
        assert result.check("ratls_chain").status == "fail" and result.check("ratls_chain").mandatory
        assert result.verdict == "fail" and result.reason.startswith("ratls_chain:")
        genuine_result = verify("".join(genuine.tls_chain), anchored, collateral)
        assert genuine_result.check("ratls_chain").status == "pass", genuine_result.reason
        assert genuine_result.verdict == "pass"

    def test_cli_trust_anchor(self, genuine, tmp_path, capsys):
        """--trust-anchor FILE: the genuine chain passes ratls_chain, exit 0."""
        bundle_dir = write_bundle(genuine.bundle, tmp_path / "bundle")
        (tmp_path / "chain.pem").write_text("".join(genuine.tls_chain))
        (tmp_path / "ca.pem").write_text(genuine.ca.cert_pem)
        args = [str(tmp_path / "chain.pem"), "--trust-bundle", str(bundle_dir), "--allow-simulator"]
        code = main(["verify", *args, "--trust-anchor", str(tmp_path / "ca.pem")])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0 and doc["checks"]["ratls_chain"]["status"] == "pass", doc["reason"]


# --- upstream evidence ---------------------------------------------------------------------

UPSTREAM_FIXTURE = DATA / "upstream_attestation_v0.bin"
PKI = MockIntelPki.from_seed(b"soundness-upstream".ljust(32, b"\0"))


def resigned_fixture(report_data: bytes = REPORT_DATA) -> tuple[bytes, Any]:
    """Upstream's real V0 fixture (33 events, an ``os-image-hash`` event) with its quote's
    TD report re-signed by a mock PKI: real registers and log, a signature we can check."""
    decoded = decode_attestation(UPSTREAM_FIXTURE.read_bytes())
    real = TdxQuote.from_bytes(decoded.quote).report
    report = mock_td_report(
        mr_td=real.mr_td, rtmrs=real.rtmrs, report_data=report_data, mr_config_id=real.mr_config_id
    )
    quote = PKI.sign_quote(report, user_data=b"UPSTREAM-FIXTURE".ljust(20, b"\0"))
    return quote, decoded


def upstream_options(**changes: Any) -> VerifyOptions:
    fields: dict[str, Any] = {"now": NOW, "root_ca_der": PKI.root_ca_der, "allow_simulator": True}
    return VerifyOptions(**{**fields, **changes})


@pytest.fixture(scope="module")
def pki_collateral() -> Collateral:
    return Collateral.from_json(PKI.collateral_json())


class TestUpstream:
    def test_fixture_replays_and_binds_os_image_hash(self, pki_collateral):
        """The real log replays to the real registers; the os-image-hash event is bound."""
        quote, decoded = resigned_fixture()
        data = encode_v0(quote, decoded.event_log, decoded.runtime_events, REPORT_DATA, decoded.config)
        result = verify(data, upstream_options(), pki_collateral)
        assert result.verdict == "pass", result.reason
        measured = next(e.payload for e in decoded.runtime_events if e.event == "os-image-hash")
        assert result.os_image_hash == measured
        assert result.check("os_image").status == "skipped"  # no policy: still unverified
        assert result.app_id == next(e.payload for e in decoded.runtime_events if e.event == "app-id")
        assert result.key_provider["name"] == "kms"
        assert len(result.runtime_events) == 9 and len(result.boot_events) > 0

    def test_vm_config_disagreeing_with_the_event_fails(self, pki_collateral):
        """V0 carries a bound RTMR3 os-image-hash event: a vm_config naming another fails."""
        quote, decoded = resigned_fixture()
        config = json.dumps({"vm_config": json.dumps({"os_image_hash": FORGED_OS})})
        data = encode_v0(quote, decoded.event_log, decoded.runtime_events, REPORT_DATA, config)
        result = verify(data, upstream_options(), pki_collateral)
        assert result.verdict == "fail" and result.reason.startswith("os_image:")
        assert "RTMR3 measured os-image-hash" in result.check("os_image").detail
        assert FORGED_OS not in json.dumps(result.claims())

    def test_policy_matches_the_fixture_image(self, pki_collateral):
        """A policy entry for the measured hash with the real registers passes os_image."""
        quote, decoded = resigned_fixture()
        report = TdxQuote.from_bytes(quote).report
        measured = next(e.payload for e in decoded.runtime_events if e.event == "os-image-hash")
        policy = OsImagePolicy.single(measured, report.mr_td, report.rtmrs)
        data = encode_v0(quote, decoded.event_log, decoded.runtime_events, REPORT_DATA, decoded.config)
        result = verify(data, upstream_options(os_image_policy=policy), pki_collateral)
        assert result.verdict == "pass" and result.os_image_verified
        assert result.to_upstream_json()["is_valid"] is True
        wrong = OsImagePolicy.single(b"\x01" * 32, report.mr_td, report.rtmrs)
        result = verify(data, upstream_options(os_image_policy=wrong), pki_collateral)
        assert result.verdict == "fail" and result.reason.startswith("os_image:")

    @pytest.mark.parametrize("attack", sorted(ATTACKS))
    @pytest.mark.parametrize("encoder", [encode_v0, encode_v1], ids=["v0", "v1"])
    def test_event_log_rtmr3_entries_follow_the_rule(self, pki_collateral, attack, encoder):
        """Upstream's event_log RTMR3 entries: non-runtime entries fail even though
        runtime_events (what upstream replays) are untouched."""
        quote, decoded = resigned_fixture()
        log = ATTACKS[attack](decoded.event_log)
        data = encoder(quote, log, decoded.runtime_events, REPORT_DATA, decoded.config)
        result = verify(data, upstream_options(), pki_collateral)
        assert result.verdict == "fail" and result.reason.startswith("event_log:")
        assert result.check("runtime_events").status == "fail"
        assert_no_forged_claim(result.claims())
        assert not result.identity_bound

    def test_extra_runtime_entry_in_v1_event_log(self, pki_collateral):
        """A runtime-typed extra RTMR3 entry in the event log disagrees with runtime_events."""
        quote, decoded = resigned_fixture()
        log = (*decoded.event_log, runtime_event("app-id", FORGED["app-id"]))
        data = encode_v1(quote, log, decoded.runtime_events, REPORT_DATA, decoded.config)
        result = verify(data, upstream_options(), pki_collateral)
        assert result.verdict == "fail" and result.reason.startswith("runtime_events:")
        assert_no_forged_claim(result.claims())

    def test_no_action_is_not_a_boot_event(self, pki_collateral):
        """EV_NO_ACTION records in RTMR1/2 do not make a stripped log look complete."""
        quote, decoded = resigned_fixture()
        stripped = tuple(e for e in decoded.event_log if e.imr == 3 or e.is_acpi_data)
        markers = tuple(
            TdxEvent(imr=i, event_type=EV_NO_ACTION, digest=bytes(48), event="", event_payload=b"")
            for i in (1, 2)
        )
        data = encode_v0(quote, markers + stripped, decoded.runtime_events, REPORT_DATA, "")
        result = verify(data, upstream_options(), pki_collateral)
        assert result.check("event_log").status == "skipped"
        assert "RTMR1 not replayable" in result.check("event_log").detail
        assert result.boot_events == ()
        assert result.to_upstream_json()["details"]["event_log_verified"] is False

    def test_quote_verified_needs_the_simulator_opt_in(self, genuine):
        """details.quote_verified is false for simulator evidence without the opt-in."""
        status, doc = post(
            service_settings(genuine, allow_simulator=False), {"attestation": genuine.attestation.hex()}
        )
        assert status == 200 and doc["is_valid"] is False
        assert doc["details"]["quote_verified"] is False
        assert doc["details"]["app_info"] is None


# --- reasons --------------------------------------------------------------------------------


class TestReasons:
    def test_flipped_qe_vendor_id_names_qe_identity(self, pki_collateral):
        """dcap-qvl stops at the quote header: the reason is qe_identity, not a skipped
        collateral check."""
        quote, _decoded = resigned_fixture()
        flipped = bytearray(quote)
        flipped[12] ^= 0x01  # header: QE vendor id at offset 12
        result = verify_evidence(load_evidence(bytes(flipped)), upstream_options(), pki_collateral)
        assert result.reason.startswith("qe_identity:"), result.reason
        assert "QE vendor" in result.reason
        assert result.check("collateral").status == "skipped"

    def test_td10_mr_service_td_keeps_a_dcap_failure(self, pki_collateral):
        """For a TD 1.0 quote, a failure dcap-qvl attributes to mr_service_td is not turned
        into 'skipped'."""
        dcap = _dcap_checks(_QvlOutcome(failure="Invalid MR service TD", stage="mr_service_td"), "")
        assert dcap["mr_service_td"][0] == "fail"
        from dstack_tdx.verifier import mr_service_td_check as _mr_service_td_check

        quote, _ = resigned_fixture()
        report = TdxQuote.from_bytes(quote).report
        assert report.mr_service_td is None
        status, detail = _mr_service_td_check(report, dcap["mr_service_td"])
        assert status == "fail" and "MR service TD" in detail
        assert _mr_service_td_check(report, ("pass", "verified by dcap-qvl"))[0] == "skipped"


def test_runtime_events_claims_are_the_bound_ones(genuine, collateral):
    """The reported runtime events are exactly the log's RTMR3 events (name, payload,
    version), and the boot events only their bound parts."""
    result = verify(genuine.attestation, options(genuine), collateral)
    envelope = Envelope.from_cbor(genuine.attestation)
    runtime = [e.to_runtime_event() for e in envelope.event_log if e.imr == 3]
    assert list(result.runtime_events) == runtime
    boot = [e for e in envelope.event_log if e.imr < 3]
    assert [(b.imr, b.digest) for b in result.boot_events] == [(e.imr, e.digest) for e in boot]
    for claim, event in zip(result.boot_events, boot, strict=True):
        measured = hashlib.sha384(event.event_payload).digest() == event.digest
        assert claim.payload == (event.event_payload if measured else None)
    assert replay_rtmrs(envelope.event_log) == TdxQuote.from_bytes(envelope.quote).report.rtmrs
    assert isinstance(result.runtime_events[0], RuntimeEvent)


# --- strict inputs, one rule for the CLI and the service ------------------------------------


def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, *args: str) -> tuple[int, Any]:
    path = tmp_path / "evidence"
    path.write_bytes(data)
    code = main(["verify", str(path), *args])
    return code, json.loads(capsys.readouterr().out)


class TestStrictInputs:
    @pytest.mark.parametrize(
        "body",
        [
            b'{"attestation": "00", "attestation": "%s"}',
            b'{"attestation": NaN}',
            b'{"attestation": "%s", "debug": Infinity}',
            b'{"quote": "00", "event_log": "[{\\"imr\\": 0, \\"imr\\": 3}]"}',
        ],
        ids=["duplicate-key", "nan", "infinity", "duplicate-in-event-log"],
    )
    def test_json_refused_by_cli_and_service(self, genuine, tmp_path, capsys, body):
        """Duplicate keys (first-wins and last-wins parsers would disagree) and NaN/Infinity
        are refused by both: the CLI exits 2, the service answers 400."""
        if b"%s" in body:
            body = body.replace(b"%s", genuine.attestation.hex().encode())
        code, doc = cli(tmp_path, capsys, body)
        assert code == 2 and doc["verdict"] == "fail" and doc["code"] in (
            "malformed_evidence",
            "invalid_request",
        ), doc
        status, answer = post(service_settings(genuine), body)
        assert status == 400 and answer["code"] in ("invalid_request", "malformed_evidence")

    @pytest.mark.parametrize(
        "value", ["", "0x", "0X", "abc", "zz", "0x0", "00" * 65, " 00", "0x" + "0" * 130]
    )
    def test_bad_expected_report_data_is_an_error_in_both(self, genuine, tmp_path, capsys, value):
        """An empty, odd-length, non-hex or over-long expectation: CLI exit 2, service 400
        invalid_request; never "64 zero bytes" and never "no expectation"."""
        code, doc = cli(
            tmp_path, capsys, genuine.attestation, "--expect-report-data", value
        )
        assert code == 2 and "expect" in doc["error"], doc
        status, answer = post(
            service_settings(genuine),
            {"attestation": genuine.attestation.hex(), "expected_report_data": value},
        )
        assert status == 400 and answer["code"] == "invalid_request", answer

    @pytest.mark.parametrize(
        "value", [REPORT_DATA.hex(), "0x" + REPORT_DATA.hex(), b"soundness".hex(), "0X" + b"soundness".hex()]
    )
    def test_good_expected_report_data_means_the_same_in_both(
        self, genuine, tmp_path, capsys, value
    ):
        """Hex with or without 0x, shorter than 64 bytes zero-padded: pass in both."""
        bundle_dir = write_bundle(genuine.bundle, tmp_path / "bundle")
        code, doc = cli(
            tmp_path, capsys, genuine.attestation,
            "--trust-bundle", str(bundle_dir), "--allow-simulator", "--expect-report-data", value,
        )
        assert code == 0 and doc["checks"]["report_data"]["status"] == "pass", doc["reason"]
        status, answer = post(
            service_settings(genuine),
            {"attestation": genuine.attestation.hex(), "expected_report_data": value},
        )
        assert status == 200 and answer["checks"]["report_data"]["status"] == "pass"
        assert answer["is_valid"] is True

    def test_null_expectation_is_none_in_the_service(self, genuine):
        """JSON null (or no key) means no expectation."""
        status, answer = post(
            service_settings(genuine),
            {"attestation": genuine.attestation.hex(), "expected_report_data": None},
        )
        assert status == 200 and answer["checks"]["report_data"]["status"] == "skipped"


class TestBoundedResources:
    def test_oversized_body_refused_from_its_content_length(self, genuine):
        """A body declared over the limit is answered 400 payload_too_large before a byte
        of it is sent."""

        async def go() -> tuple[bytes, bytes]:
            server = test_utils.TestServer(create_verifier_app(service_settings(genuine)))
            await server.start_server()
            try:
                reader, writer = await asyncio.open_connection(server.host, server.port)
                writer.write(
                    b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000000\r\n\r\n"
                )
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                body = await asyncio.wait_for(reader.read(4096), 30)
                writer.close()
                return head, body
            finally:
                await server.close()

        head, body = asyncio.run(go())
        assert head.startswith(b"HTTP/1.1 400")
        assert json.loads(body[body.index(b"{"):])["code"] == "payload_too_large"

    def test_chunked_body_cut_at_the_limit(self, genuine):
        """A chunked body (no Content-Length) is cut off as soon as it passes the limit."""
        small = service_settings(genuine, max_body_size=4096)

        async def chunks():
            for _ in range(100):
                yield b" " * 1024

        async def go() -> tuple[int, Any]:
            server = test_utils.TestServer(create_verifier_app(small))
            async with test_utils.TestClient(server) as client:
                response = await client.post("/verify", data=chunks())
                return response.status, await response.json()

        status, doc = asyncio.run(go())
        assert status == 400 and doc["code"] == "payload_too_large"

    def test_slow_body_times_out(self, genuine):
        """A body that stops arriving gets 408 request_timeout after body_timeout."""
        slow = service_settings(genuine, body_timeout=0.5)

        async def go() -> bytes:
            server = test_utils.TestServer(create_verifier_app(slow))
            await server.start_server()
            try:
                reader, writer = await asyncio.open_connection(server.host, server.port)
                writer.write(
                    b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"att"
                )
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(4096), 30)
                writer.close()
                return answer
            finally:
                await server.close()

        answer = asyncio.run(go())
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"request_timeout" in answer

    def test_24_mib_hex_body_is_decoded_in_linear_memory(self):
        """A 24 MiB hex body costs a few times its size to decode (the backtracking hex
        regex it replaces took over 70 times), and is answered 400, not 500."""
        import tracemalloc

        from dstack_core.server.verifier import _decode_request

        body = json.dumps({"quote": "ab" * (12 << 20)}).encode()
        tracemalloc.start()
        try:
            with pytest.raises(Exception) as info:
                _decode_request(body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert getattr(info.value, "http_status", None) == 400
        assert peak < 4 * len(body), peak / len(body)

    def test_24_mib_event_payload_is_decoded_in_linear_memory(self):
        """The same for hex inside GetQuote's event log (its own hex decoder had the same
        backtracking regex)."""
        import tracemalloc

        from dstack_core.server.verifier import _decode_request

        quote = (DATA / "tdx_quote_v4.bin").read_bytes().hex()
        payload = "ab" * ((24 << 20) // 2 - 8000)
        log = json.dumps([{"imr": 3, "event_type": 0x08000001, "digest": "", "event": "x",
                           "event_payload": payload}])
        body = json.dumps({"quote": quote, "event_log": log}).encode()
        tracemalloc.start()
        try:
            _decode_request(body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(body), peak / len(body)

    def test_pck_chain_of_begin_lines_is_linear(self):
        """A quote (at most 1 MiB) whose PCK chain is nothing but BEGIN CERTIFICATE lines: a
        lazy PEM regex rescanned the rest of the input from each one (quadratic: half a MiB
        took two minutes, the whole MiB about eight); the linear scan refuses it at once."""
        import struct

        from dstack_core.errors import EvidenceError

        quote = PKI.sign_quote(
            mock_td_report(mr_td=bytes(48), rtmrs=[bytes(48)] * 4, report_data=REPORT_DATA),
            user_data=bytes(20),
        )
        start = quote.index(b"-----BEGIN CERTIFICATE-----")
        chain = b"-----BEGIN CERTIFICATE-----" * (((1 << 20) - 4096) // 27)
        grown = len(chain) - (len(quote) - start)
        forged = bytearray(quote[:start] + chain)
        for offset, delta in ((632, grown), (766, grown)):  # signature and QE data sizes
            (size,) = struct.unpack_from("<I", forged, offset)
            struct.pack_into("<I", forged, offset, size + delta)
        struct.pack_into("<I", forged, start - 4, len(chain))  # PCK chain size
        with pytest.raises(EvidenceError, match="no PEM certificate"):
            load_evidence(bytes(forged))

    def test_evidence_over_the_limit_is_refused_before_decoding(self, tmp_path, capsys):
        """The CLI reads at most the limit plus one byte and refuses more (exit 2)."""
        from dstack_core.verify import MAX_EVIDENCE_SIZE

        path = tmp_path / "big"
        with open(path, "wb") as handle:
            handle.truncate(MAX_EVIDENCE_SIZE + 1)
        code = main(["verify", str(path)])
        doc = json.loads(capsys.readouterr().out)
        assert code == 2 and "limit" in doc["error"]


def test_certificate_with_an_invalid_version_is_malformed_evidence():
    """A certificate whose version field says v4 (found by the mutation suite): cryptography
    raises InvalidVersion, which is no ValueError; the verifier reports malformed evidence
    (CLI exit 2, service 400) instead of crashing."""
    import base64

    from dstack_core.errors import EvidenceError

    ca = certs.new_app_ca(certs.new_tls_key(), now=datetime.now(UTC))
    der = bytearray(ca.cert.public_bytes(serialization.Encoding.DER))
    der[der.index(bytes.fromhex("a003020102")) + 4] = 3
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n"
    for data in (bytes(der), pem, json.dumps({"certificate_chain": [pem.decode()]})):
        with pytest.raises(EvidenceError):
            load_evidence(data)


def test_a_platform_without_boot_measurements_needs_no_boot_events(pki_collateral):
    """A TD whose RTMR0-2 are zero (a software TEE measuring nothing at boot) has nothing to
    strip: our envelope without boot events replays. With a non-zero RTMR1 the same empty
    boot log is incomplete, and an envelope never gets allow_stripped_event_log."""
    runtime = (runtime_event("app-id", b"\x01" * 20), runtime_event("system-ready", b""))
    for rtmr1, expected in ((bytes(48), "pass"), (b"\x01" * 48, "skipped")):
        rtmr3 = replay_rtmrs(runtime)[3]
        report = mock_td_report(
            mr_td=bytes(48), rtmrs=[bytes(48), rtmr1, bytes(48), rtmr3], report_data=REPORT_DATA
        )
        quote = PKI.sign_quote(report, user_data=b"SOFTTEE".ljust(20, b"\0"))
        envelope = Envelope(
            platform="softtee", evidence_format="tdx", quote=quote, event_log=runtime,
            report_data=REPORT_DATA,
        )
        for allow in (False, True):
            options = upstream_options(allow_stripped_event_log=allow)
            result = verify(envelope.to_cbor(), options, pki_collateral)
            assert result.check("event_log").status == expected, result.check("event_log").detail
        # RTMR3 is bound either way: its claims do not depend on RTMR0-2.
        assert result.app_id == b"\x01" * 20 and result.identity_bound
        assert (result.verdict == "pass") is (expected == "pass")
