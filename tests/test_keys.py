"""Key derivation and signature chains: upstream's known answers, byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import coincurve
import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dstack_core import keys
from dstack_core.errors import InvalidRequest, UnsupportedAlgorithm
from dstack_core.testing import uds_request

VECTORS = json.loads((Path(__file__).parent / "vectors" / "keys.json").read_text())
DUMMY = VECTORS["dummy_key"]
SIM = VECTORS["upstream_simulator"]
APP_KEY = bytes.fromhex(SIM["app_key"])
KMS_SIG = bytes.fromhex(SIM["kms_signature"])


class TestDerivation:
    def test_hkdf_vector(self):
        """HKDF-SHA256(salt RATLS, info=path) of the dummy key gives upstream's secret."""
        assert keys.derive_key(bytes.fromhex(DUMMY["app_key"]), [b"vms"]).hex() == DUMMY["secret"]

    @pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100, 255 * 32])
    def test_hkdf_matches_cryptography(self, length):
        """Our one-shot-HMAC HKDF equals cryptography's HKDF for any length and info."""
        for ikm, context in ((APP_KEY, [b"vms"]), (b"\x01" * 7, [b"a", b"", b"bc"]), (b"", [])):
            reference = HKDF(
                algorithm=hashes.SHA256(), length=length, salt=b"RATLS", info=b"".join(context)
            ).derive(ikm)
            assert keys.derive_key(ikm, context, length) == reference

    @pytest.mark.parametrize("length", [0, 255 * 32 + 1])
    def test_hkdf_refuses_impossible_lengths(self, length):
        """HKDF-SHA256 cannot give 0 or more than 8160 bytes."""
        with pytest.raises(ValueError):
            keys.derive_key(APP_KEY, [b"vms"], length)

    @pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
    @pytest.mark.parametrize("path", ["", "vms", "a/b/c", "é"])
    def test_app_key_object_derives_like_the_function(self, algorithm, path):
        """AppKey (extract step and key object kept) derives exactly as derive_app_key."""
        kept = keys.AppKey(APP_KEY, KMS_SIG)
        assert kept.derive(path=path, purpose="p", algorithm=algorithm) == keys.derive_app_key(
            APP_KEY, KMS_SIG, path=path, purpose="p", algorithm=algorithm
        )

    def test_public_keys_for_both_algorithms(self):
        """The same 32 bytes give upstream's ed25519 and compressed secp256k1 keys."""
        secret = bytes.fromhex(DUMMY["secret"])
        assert keys.public_key_for("ed25519", secret).hex() == DUMMY["ed25519_public_key"]
        assert keys.public_key_for("secp256k1", secret).hex() == DUMMY["secp256k1_public_key"]

    def test_dummy_signature_chain(self):
        """GetKey(vms, signing) on the dummy key signs exactly as upstream's test asserts."""
        derived = keys.derive_app_key(
            bytes.fromhex(DUMMY["app_key"]), b"", path="vms", purpose="signing", algorithm="secp256k1"
        )
        assert derived.signature_chain[0].hex() == DUMMY["signing_signature_chain_0"]
        assert derived.signature_chain[1] == b""

    @pytest.mark.parametrize("algorithm", ["secp256k1", "k256", ""])
    def test_simulator_get_key(self, algorithm):
        """GetKey on upstream's simulator key: key, public key and chain[0] match; aliases agree."""
        v = SIM["get_key"]
        derived = keys.derive_app_key(APP_KEY, KMS_SIG, path=v["path"], purpose=v["purpose"], algorithm=algorithm)
        assert derived.secret.hex() == v["key"]
        assert derived.public_key.hex() == v["secp256k1_public_key"]
        assert derived.signature_chain == (bytes.fromhex(v["signature_chain_0"]), KMS_SIG)

    def test_simulator_get_key_ed25519(self):
        """ed25519 shares the secret but signs its own 32-byte public key in the chain."""
        v = SIM["get_key"]
        derived = keys.derive_app_key(APP_KEY, KMS_SIG, path=v["path"], purpose=v["purpose"], algorithm="ed25519")
        assert derived.secret.hex() == v["key"]
        assert derived.public_key.hex() == v["ed25519_public_key"]

    def test_purpose_does_not_change_the_key(self):
        """purpose enters only the signed message, never the key (upstream rule)."""
        a = keys.derive_app_key(APP_KEY, b"", path="p", purpose="a", algorithm="secp256k1")
        b = keys.derive_app_key(APP_KEY, b"", path="p", purpose="b", algorithm="secp256k1")
        assert a.secret == b.secret and a.signature_chain[0] != b.signature_chain[0]

    @pytest.mark.parametrize("algorithm", ["rsa", "Ed25519", "secp256k1_prehashed", "SECP256K1"])
    def test_unknown_algorithm(self, algorithm):
        """GetKey rejects names upstream rejects (case-sensitive, no prehashed)."""
        with pytest.raises(UnsupportedAlgorithm):
            keys.derive_app_key(APP_KEY, b"", path="p", purpose="x", algorithm=algorithm)

    def test_chain_recovers_to_app_and_kms_keys(self):
        """chain[0] recovers to the app key, chain[1] to the KMS key over the app id."""
        derived = keys.derive_app_key(APP_KEY, KMS_SIG, path="x", purpose="y", algorithm="secp256k1")
        message = keys.keccak256(f"y:{derived.public_key.hex()}".encode())
        app_pub = keys.recover_public_key(derived.signature_chain[0], message)
        assert app_pub.hex() == SIM["app_public_key"]
        kms = keys.recover_public_key(KMS_SIG, keys.kms_message(bytes.fromhex(SIM["app_id"]), app_pub))
        assert kms.hex() == SIM["kms_public_key"]


class TestSign:
    @pytest.mark.parametrize("name", ["sign_secp256k1", "sign_ed25519"])
    def test_simulator_vectors(self, name):
        """Sign reproduces upstream's signature, public key and chain[1]."""
        v = SIM[name]
        algorithm = name.removeprefix("sign_")
        sig = keys.sign_with_app_key(APP_KEY, KMS_SIG, algorithm=algorithm, data=bytes.fromhex(v["data"]))
        assert sig.signature.hex() == v["signature"]
        assert sig.public_key.hex() == v["public_key"]
        assert sig.signature_chain[0] == sig.signature
        assert sig.signature_chain[1].hex() == v["chain_1"]
        assert sig.signature_chain[2] == KMS_SIG

    def test_prehashed_signs_digest_as_is(self):
        """secp256k1_prehashed signs the 32 bytes given, equal to secp256k1 over their preimage."""
        data = b"message"
        plain = keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1", data=data)
        pre = keys.sign_with_app_key(
            APP_KEY, b"", algorithm="secp256k1_prehashed", data=hashlib.sha256(data).digest()
        )
        assert plain.signature == pre.signature

    @pytest.mark.parametrize("length", [0, 31, 33, 64])
    def test_prehashed_requires_32_bytes(self, length):
        """Pre-hashed signing of anything but 32 bytes is the caller's error, with upstream's text."""
        with pytest.raises(InvalidRequest, match="requires a 32-byte digest, but received"):
            keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1_prehashed", data=bytes(length))

    @pytest.mark.parametrize("algorithm", ["", "rsa", "ED25519"])
    def test_unknown_algorithm(self, algorithm):
        """Sign rejects empty and unknown algorithm names."""
        with pytest.raises(UnsupportedAlgorithm):
            keys.sign_with_app_key(APP_KEY, b"", algorithm=algorithm, data=b"x")

    def test_secp256k1_signature_is_low_s(self):
        """Signatures are normalised to low S, as k256 makes them."""
        for i in range(20):
            sig = keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1", data=bytes([i]))
            assert int.from_bytes(sig.signature[32:], "big") <= keys._SECP256K1_N // 2


class TestVerify:
    def test_round_trip_all_algorithms(self):
        """Every Sign algorithm's output verifies, and a changed message does not."""
        for algorithm, data in (("secp256k1", b"m"), ("ed25519", b"m"), ("secp256k1_prehashed", bytes(32))):
            sig = keys.sign_with_app_key(APP_KEY, b"", algorithm=algorithm, data=data)
            assert keys.verify_signature(algorithm, data, sig.signature, sig.public_key)
            other = bytes([data[0] ^ 1]) + data[1:]
            assert not keys.verify_signature(algorithm, other, sig.signature, sig.public_key)

    def test_high_s_is_invalid_not_an_error(self):
        """A high-S twin of a valid signature verifies False, as k256 rejects it."""
        sig = keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1", data=b"m")
        r, s = sig.signature[:32], int.from_bytes(sig.signature[32:], "big")
        high = r + (keys._SECP256K1_N - s).to_bytes(32, "big")
        assert not keys.verify_signature("secp256k1", b"m", high, sig.public_key)

    def test_uncompressed_public_key_accepted(self):
        """secp256k1 Verify accepts a 65-byte uncompressed key."""
        sig = keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1", data=b"m")
        full = coincurve.PublicKey(sig.public_key).format(compressed=False)
        assert keys.verify_signature("secp256k1", b"m", sig.signature, full)

    @pytest.mark.parametrize(
        ("algorithm", "signature", "public_key"),
        [
            ("ed25519", bytes(64), bytes(31)),
            ("ed25519", bytes(63), bytes(nacl.signing.SigningKey(bytes(32)).verify_key)),
            ("secp256k1", bytes(64), bytes(33)),
            ("secp256k1", bytes(65), bytes.fromhex(SIM["app_public_key"])),
            ("secp256k1", bytes(64), bytes.fromhex(SIM["app_public_key"])),
        ],
    )
    def test_malformed_inputs_are_errors(self, algorithm, signature, public_key):
        """Malformed keys or signatures are 400-class errors, not valid:false."""
        with pytest.raises(InvalidRequest):
            keys.verify_signature(algorithm, b"m", signature, public_key)

    def test_prehashed_short_data_is_false(self):
        """Prehashed verification of under 16 bytes fails as a check (ecdsa bits2field)."""
        sig = keys.sign_with_app_key(APP_KEY, b"", algorithm="secp256k1_prehashed", data=bytes(32))
        assert not keys.verify_signature("secp256k1_prehashed", bytes(15), sig.signature, sig.public_key)


class TestWire:
    def test_get_key_body_is_byte_identical(self, upstream_agent):
        """POST /GetKey on upstream's app keys returns upstream's exact compact JSON body."""
        v = SIM["get_key"]
        body = json.dumps({"path": v["path"], "purpose": v["purpose"]}).encode()
        status, headers, payload = uds_request(upstream_agent.socket, "POST", "/GetKey", body)
        assert status == 200
        assert payload.decode() == v["response_body"]
        assert headers["content-type"].startswith("application/json")
        assert int(headers["content-length"]) == len(payload)
