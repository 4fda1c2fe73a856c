"""The official dstack SDK, unchanged, against a real agent subprocess on the simulator.

Each test checks the cryptography, not only the response shapes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import dcap_qvl
import nacl.signing
import pytest
from coincurve import PublicKey
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk import AsyncDstackClient, DstackClient, TappdClient

from dstack_core import certs, keys
from dstack_core.envelope import Envelope
from dstack_core.eventlog import events_from_json, replay_rtmrs
from dstack_core.quote import TdxQuote
from dstack_core.types import RootKey

from .conftest import UPSTREAM_APPKEYS, Bundle, input_path

NOW = int(time.time())


def verify_quote(quote: bytes, bundle: Bundle) -> str:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(bundle.collateral_json)
    return dcap_qvl.verify_with_root_ca(quote, collateral, bundle.root_ca_der, NOW).status


def app_public_key(agent) -> bytes:
    root = RootKey.from_appkeys_json(input_path(agent, "appkeys.json").read_bytes())
    return PublicKey.from_secret(root.k256_key).format()


class TestGetKey:
    def test_signature_chain_recovers_to_app_key(self, agent):
        """GetKey's first chain signature recovers to the app key over keccak(purpose:pubhex)."""
        result = DstackClient(str(agent.socket)).get_key("wallet/eth", "ethereum")
        secret = result.decode_key()
        pub = PublicKey.from_secret(secret).format()
        sig0, kms_sig = result.decode_signature_chain()
        message = keys.keccak256(f"ethereum:{pub.hex()}".encode())
        assert PublicKey.from_signature_and_message(sig0, message, hasher=None).format() == app_public_key(agent)
        assert kms_sig == b""

    def test_known_answer_on_upstream_app_keys(self, upstream_agent):
        """With upstream's simulator app keys the key and chain equal upstream's bytes."""
        result = DstackClient(str(upstream_agent.socket)).get_key("/test/path", "test-purpose")
        assert result.key == "b9fbb7171185c421c58610a2acba8ceae93623ae47815618cbad1e98fc042cb7"
        assert result.signature_chain[0] == (
            "f50c51735a97072f0c98125ed61fc84e2fdb36e95990b9e57337dadc0e2a9712"
            "227f04e07209faecb8891d59ec144a6c13e411dc90b3423f28071bd3fe11978d01"
        )

    def test_kms_signature_recovers_to_kms_key(self, upstream_agent):
        """The second chain link recovers to upstream's KMS key over the app id and app key."""
        root = RootKey.from_appkeys_json(UPSTREAM_APPKEYS.read_bytes())
        result = DstackClient(str(upstream_agent.socket)).get_key("any", "x")
        app_pub = PublicKey.from_secret(root.k256_key).format()
        message = keys.kms_message(bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56"), app_pub)
        kms = PublicKey.from_signature_and_message(result.decode_signature_chain()[1], message, hasher=None)
        assert kms.format().hex() == "0321529e458424ab1f710a3a57ec4dad2fb195ddca572f7469242ba6c7563085b6"

    def test_ed25519_uses_the_same_secret(self, agent):
        """ed25519 and secp256k1 keys for one path share the 32 secret bytes (upstream rule)."""
        client = DstackClient(str(agent.socket))
        assert client.get_key("p", "x", "ed25519").key == client.get_key("p", "x").key


class TestSignVerify:
    def test_secp256k1_sign_verifies_with_coincurve(self, agent):
        """A secp256k1 Sign signature verifies under the returned key with libsecp256k1."""
        client = DstackClient(str(agent.socket))
        result = client.sign("secp256k1", b"hello dstack")
        sig = result.decode_signature()
        der = __import__("coincurve").ecdsa.cdata_to_der(
            __import__("coincurve").ecdsa.deserialize_compact(sig)
        )
        pub = PublicKey(result.decode_public_key())
        assert pub.verify(der, hashlib.sha256(b"hello dstack").digest(), hasher=None)
        assert client.verify("secp256k1", b"hello dstack", sig, result.decode_public_key()).valid
        assert not client.verify("secp256k1", b"hello dstacK", sig, result.decode_public_key()).valid

    def test_ed25519_sign_verifies_with_pynacl(self, agent):
        """An ed25519 Sign signature verifies with PyNaCl and through Verify."""
        client = DstackClient(str(agent.socket))
        result = client.sign("ed25519", b"payload")
        nacl.signing.VerifyKey(result.decode_public_key()).verify(b"payload", result.decode_signature())
        assert client.verify("ed25519", b"payload", result.decode_signature(), result.decode_public_key()).valid

    def test_sign_chain_links_to_app_key(self, agent):
        """Sign's chain[1] recovers to the app key over keccak("signing:" + public key hex)."""
        result = DstackClient(str(agent.socket)).sign("secp256k1_prehashed", bytes(range(32)))
        chain = result.decode_signature_chain()
        assert chain[0] == result.decode_signature()
        message = keys.keccak256(f"signing:{result.public_key}".encode())
        assert PublicKey.from_signature_and_message(chain[1], message, hasher=None).format() == app_public_key(agent)

    def test_known_answers_on_upstream_app_keys(self, upstream_agent):
        """Sign on upstream's simulator keys reproduces upstream's signatures byte for byte."""
        client = DstackClient(str(upstream_agent.socket))
        k1 = client.sign("secp256k1", bytes.fromhex("deadbeef"))
        assert k1.signature.startswith("03a365030a087f52246dad00e2ce9160")
        assert k1.public_key == "036105f01d1fd781568f7c208b087b1c4f522601410ed7e9c7870d573de7c46d54"
        ed = client.sign("ed25519", bytes.fromhex("deadbeef"))
        assert ed.public_key == "698f56bd587d8ce3ca8db0e1c361ba9d190089f98dc4d9df800ff92ed073a65d"
        assert ed.signature.startswith("6fb88fa2d00510bad307acc1dc4ef0f3")


class TestQuote:
    def test_quote_verifies_with_trust_bundle(self, agent, bundle):
        """GetQuote's quote verifies UpToDate with dcap-qvl under the published mock root."""
        result = DstackClient(str(agent.socket)).get_quote(b"hello")
        quote = result.decode_quote()
        assert quote[:8] == bytes.fromhex("0400020081000000")
        assert quote[568:632] == b"hello".ljust(64, b"\0")
        assert result.report_data == b"hello".ljust(64, b"\0").hex()
        assert verify_quote(quote, bundle) == "UpToDate"

    def test_quote_marked_simulated_and_rejected_by_intel_root(self, agent, bundle, platform_traits):
        """The header carries the platform's marker (DSTACK-SIMULATOR) and Intel's root rejects it."""
        quote = DstackClient(str(agent.socket)).get_quote(b"x").decode_quote()
        assert TdxQuote.from_bytes(quote).header.user_data.startswith(platform_traits.user_data_marker)
        collateral = dcap_qvl.QuoteCollateralV3.from_json(bundle.collateral_json)
        with pytest.raises(ValueError):
            dcap_qvl.verify(quote, collateral, NOW)

    def test_flipped_byte_fails(self, agent, bundle):
        """Any flipped byte in the signed region makes verification fail."""
        quote = bytearray(DstackClient(str(agent.socket)).get_quote(b"x").decode_quote())
        for offset in (10, 200, 530, 600):
            tampered = bytearray(quote)
            tampered[offset] ^= 1
            with pytest.raises(Exception):
                verify_quote(bytes(tampered), bundle)

    def test_event_log_replays_to_quote_registers(self, agent):
        """The SDK's own RTMR replay of the returned event log equals RTMR0-3 in the quote."""
        result = DstackClient(str(agent.socket)).get_quote(b"replay")
        report = TdxQuote.from_bytes(result.decode_quote()).report
        replayed = result.replay_rtmrs()
        assert [replayed[i] for i in range(4)] == [r.hex() for r in report.rtmrs]

    def test_emit_event_extends_rtmr3(self, agent, bundle):
        """EmitEvent moves RTMR3; the next quote verifies and its log replays to it."""
        client = DstackClient(str(agent.socket))
        before = TdxQuote.from_bytes(client.get_quote(b"a").decode_quote()).report.rtmr3
        client.emit_event("my-app-event", b"payload-1")
        result = client.get_quote(b"b")
        report = TdxQuote.from_bytes(result.decode_quote()).report
        assert report.rtmr3 != before
        events = events_from_json(result.event_log)
        assert events[-1].event == "my-app-event" and events[-1].event_payload == b"payload-1"
        assert replay_rtmrs(events)[3] == report.rtmr3
        assert verify_quote(result.decode_quote(), bundle) == "UpToDate"

    def test_async_client(self, agent):
        """AsyncDstackClient works too (quote, info, key)."""

        async def main():
            client = AsyncDstackClient(str(agent.socket))
            quote = await client.get_quote(b"async")
            info = await client.info()
            key = await client.get_key("a", "b")
            return quote, info, key

        quote, info, key = asyncio.run(main())
        assert TdxQuote.from_bytes(quote.decode_quote()).report.report_data.startswith(b"async")
        assert info.app_id and len(key.decode_key()) == 32


class TestAttest:
    def test_envelope_round_trips_and_binds(self, agent, bundle, platform_traits):
        """Attest returns our CBOR envelope: platform tag set, report data bound, quote valid."""
        raw = DstackClient(str(agent.socket)).attest(b"attest-me").decode_attestation()
        assert raw[0] == 0xD9
        envelope = Envelope.from_cbor(raw)
        assert envelope.to_cbor() == raw
        assert envelope.platform == platform_traits.tag
        assert envelope.simulated == platform_traits.simulated
        assert envelope.report_data == b"attest-me".ljust(64, b"\0")
        report = TdxQuote.from_bytes(envelope.quote).report
        assert report.report_data == envelope.report_data
        assert replay_rtmrs(envelope.event_log) == report.rtmrs
        assert verify_quote(envelope.quote, bundle) == "UpToDate"


class TestInfo:
    def test_info_fields_are_consistent(self, agent):
        """Info's identity comes from the boot events and matches the inputs and the quote."""
        info = DstackClient(str(agent.socket)).info()
        compose = input_path(agent, "app-compose.json").read_bytes()
        compose_hash = hashlib.sha256(compose).hexdigest()
        assert info.compose_hash == compose_hash
        assert info.app_id == compose_hash[:40]
        assert len(bytes.fromhex(info.instance_id)) == 20
        assert info.tcb_info.app_compose == compose.decode()
        assert json.loads(info.key_provider_info) == {"name": "none", "id": ""}
        assert info.device_id == hashlib.sha256(b"").hexdigest()
        tcb = info.tcb_info
        assert tcb.mr_aggregated == info.mr_aggregated
        assert info.os_image_hash == json.loads(json.loads(
            input_path(agent, "sys-config.json").read_text())["vm_config"])["os_image_hash"]
        chain = certs.load_certificate_chain(info.app_cert.encode())
        assert chain[0].subject.rfc4514_string() == "CN=demo-cert"

    def test_mr_aggregated_recomputes(self, agent):
        """mr_aggregated = sha256(mrtd || rtmr0..3 || mr_config_id) from tcb_info values."""
        info = DstackClient(str(agent.socket)).info()
        tcb = info.tcb_info
        report = TdxQuote.from_bytes(
            DstackClient(str(agent.socket)).get_quote(b"\0").decode_quote()
        ).report
        expected = hashlib.sha256(
            bytes.fromhex(tcb.mrtd + tcb.rtmr0 + tcb.rtmr1 + tcb.rtmr2 + tcb.rtmr3)
            + report.mr_config_id + report.mr_owner + report.mr_owner_config
        ).hexdigest()
        assert info.mr_aggregated == expected


class TestTlsKey:
    def test_ra_tls_certificate_binds_key(self, agent, bundle):
        """The RA-TLS certificate carries an envelope whose report data binds the cert key."""
        result = DstackClient(str(agent.socket)).get_tls_key(
            subject="app.example", alt_names=["app.example", "10.0.0.1"], usage_ra_tls=True,
            usage_server_auth=True, usage_client_auth=True,
        )
        leaf_pem, ca_pem = result.certificate_chain
        leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        leaf.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key(result.key.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
        ratls = certs.RaTlsCertificate.from_certificate(leaf)
        envelope = Envelope.from_cbor(ratls.attestation)
        assert envelope.report_data == hashlib.sha512(
            b"ratls-cert:" + leaf.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ).digest()
        assert TdxQuote.from_bytes(envelope.quote).report.report_data == envelope.report_data
        assert verify_quote(envelope.quote, bundle) == "UpToDate"
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["app.example"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]

    def test_fresh_key_per_call_and_validity(self, agent):
        """Every call makes a new key; not_before/not_after are honoured exactly."""
        client = DstackClient(str(agent.socket))
        a = client.get_tls_key(subject="a", not_before=1_700_000_000, not_after=1_800_000_000)
        b = client.get_tls_key(subject="a")
        assert a.key != b.key
        leaf = x509.load_pem_x509_certificate(a.certificate_chain[0].encode())
        assert int(leaf.not_valid_before_utc.timestamp()) == 1_700_000_000
        assert int(leaf.not_valid_after_utc.timestamp()) == 1_800_000_000
        assert certs.RaTlsCertificate.from_certificate(leaf).attestation is None


class TestMisc:
    def test_version_and_gpu_info(self, agent):
        """Version answers (the SDK probes it) and GpuInfo is empty without a GPU."""
        assert DstackClient(str(agent.socket)).version().version
        from dstack_core.testing import uds_request

        status, _, body = uds_request(agent.socket, "POST", "/GpuInfo", b"{}")
        assert status == 200 and json.loads(body) == {"attestation": ""}


class TestTappd:
    def test_derive_key_known_answer(self, upstream_agent):
        """Tappd DeriveKey derives the P-256 key from the app key and path (upstream vector)."""
        client = TappdClient(str(upstream_agent.socket))
        result = client.derive_key("my/key/path", "example.com")
        key = serialization.load_pem_private_key(result.key.encode(), None)
        assert key.private_numbers().private_value == int(
            "866d0884686e5afdbdaace8bd77c0b4f69a30dbe9506d69270a07bf247c8f4f0", 16
        )

    def test_tdx_quote_hashes_with_prefix(self, upstream_agent):
        """Tappd TdxQuote with sha512 quotes sha512("app-data:" || data)."""
        client = TappdClient(str(upstream_agent.socket))
        result = client.tdx_quote(b"test", "sha512")
        report = TdxQuote.from_bytes(result.decode_quote()).report
        assert report.report_data == hashlib.sha512(b"app-data:test").digest()

    def test_tappd_info(self, upstream_agent):
        """Tappd Info parses with the SDK's v0.3 model."""
        info = TappdClient(str(upstream_agent.socket)).info()
        assert info.tcb_info.rtmr3 and info.app_id
