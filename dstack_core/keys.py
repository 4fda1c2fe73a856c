"""App key derivation and signature chains, byte-compatible with the upstream dstack agent.

Pure functions: no I/O, no randomness (ECDSA and Ed25519 here are deterministic), so every
result can be pinned by a known-answer test.

* :func:`derive_key` is HKDF-SHA256 with salt ``b"RATLS"`` over the app's 32-byte secp256k1
  key; ``info`` is the concatenation of the context parts (for GetKey: the path bytes).
* secp256k1 signatures are RFC 6979 (HMAC-SHA256 nonces) with low-S normalisation, as both
  libsecp256k1 and Rust's ``k256`` produce them; recoverable ones are ``r || s || recid``
  with ``recid`` in {0, 1}.
* The GetKey chain is ``[sig_app, kms_signature]`` where ``sig_app`` is the app key's
  recoverable signature over ``keccak256(purpose + ":" + hex(public_key))``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final, Literal

import attrs
import coincurve
import nacl.bindings
import nacl.exceptions
import nacl.signing

from .errors import InvalidRequest, UnsupportedAlgorithm

__all__ = [
    "KDF_SALT",
    "SIGN_KEY_PATH",
    "SIGN_KEY_PURPOSE",
    "KeyAlgorithm",
    "SignAlgorithm",
    "AppKey",
    "DerivedKey",
    "Signature",
    "derive_key",
    "keccak256",
    "normalize_key_algorithm",
    "normalize_sign_algorithm",
    "public_key_for",
    "derive_app_key",
    "sign_with_app_key",
    "sign_key_algorithm",
    "SignKey",
    "verify_signature",
    "recover_public_key",
    "kms_message",
]

KDF_SALT: Final = b"RATLS"
HKDF_BLOCK: Final = 32
SECRET_LENGTH: Final = 32
RECOVERABLE_SIGNATURE_LENGTH: Final = 65
COMPACT_SIGNATURE_LENGTH: Final = 64
ED25519_PUBLIC_KEY_LENGTH: Final = 32
ED25519_SIGNATURE_LENGTH: Final = 64
PREHASH_LENGTH: Final = 32
# Sign derives its key exactly as GetKey(path="vms", purpose="signing") does upstream.
SIGN_KEY_PATH: Final = "vms"
SIGN_KEY_PURPOSE: Final = "signing"
KMS_ISSUED_TAG: Final = b"dstack-kms-issued"

KeyAlgorithm = Literal["secp256k1", "ed25519"]
SignAlgorithm = Literal["secp256k1", "secp256k1_prehashed", "ed25519"]

_KEY_ALGORITHMS: Final[dict[str, KeyAlgorithm]] = {
    "": "secp256k1",
    "secp256k1": "secp256k1",
    "k256": "secp256k1",
    "ed25519": "ed25519",
}
_SIGN_ALGORITHMS: Final[dict[str, SignAlgorithm]] = {
    "secp256k1": "secp256k1",
    "k256": "secp256k1",
    "secp256k1_prehashed": "secp256k1_prehashed",
    "ed25519": "ed25519",
}


@attrs.frozen(kw_only=True)
class DerivedKey:
    """A key derived for a path, with the chain that ties it to the app key.

    :ivar secret: the 32-byte secret (secp256k1 scalar or Ed25519 seed; the same bytes).
    :ivar public_key: SEC1 compressed (33 B) for secp256k1, raw 32 B for Ed25519.
    :ivar signature_chain: ``[app signature (65 B), KMS signature (65 B or empty)]``.
    """

    algorithm: KeyAlgorithm
    secret: bytes = attrs.field(repr=False)
    public_key: bytes
    signature_chain: tuple[bytes, ...]


@attrs.frozen(kw_only=True)
class Signature:
    """The result of :func:`sign_with_app_key` (the Sign endpoint)."""

    signature: bytes
    public_key: bytes
    signature_chain: tuple[bytes, ...]


def derive_key(ikm: bytes, context: Sequence[bytes], length: int = SECRET_LENGTH) -> bytes:
    """HKDF-SHA256 with salt ``RATLS``; ``info`` is the concatenation of ``context``."""
    return _hkdf_expand(_hkdf_extract(ikm), b"".join(context), length)


def _hkdf_extract(ikm: bytes) -> bytes:
    # RFC 5869 2.2, with one-shot HMACs: building cryptography's HKDF object costs more
    # than the hashing itself.
    return hmac.digest(KDF_SALT, ikm, "sha256")


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 2.3.
    if not 0 < length <= 255 * HKDF_BLOCK:
        raise ValueError(f"HKDF-SHA256 output must be 1..{255 * HKDF_BLOCK} bytes")
    output = block = b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        output += block
        counter += 1
    return output[:length]


def keccak256(data: bytes) -> bytes:
    """Ethereum's Keccak-256 (not SHA3-256)."""
    # Imported on first use: pycryptodome's import parses C declarations (cffi), a tenth
    # of the agent's start-up, and nothing at start-up needs Keccak.
    from Crypto.Hash import keccak

    return keccak.new(digest_bits=256, data=data).digest()


def normalize_key_algorithm(name: str) -> KeyAlgorithm:
    """Map a GetKey algorithm name (``""`` and ``k256`` mean secp256k1; case-sensitive).

    :raises UnsupportedAlgorithm: for anything else, including ``secp256k1_prehashed``.
    """
    try:
        return _KEY_ALGORITHMS[name]
    except KeyError:
        raise UnsupportedAlgorithm(f"Unsupported algorithm: {name!r}") from None


def normalize_sign_algorithm(name: str) -> SignAlgorithm:
    """Map a Sign/Verify algorithm name (``k256`` means secp256k1; empty is not allowed).

    :raises UnsupportedAlgorithm: for anything else.
    """
    try:
        return _SIGN_ALGORITHMS[name]
    except KeyError:
        raise UnsupportedAlgorithm(f"Unsupported algorithm: {name!r}") from None


def public_key_for(algorithm: KeyAlgorithm, secret: bytes) -> bytes:
    """The public key of a 32-byte secret: compressed SEC1 or raw Ed25519."""
    if algorithm == "ed25519":
        return bytes(nacl.signing.SigningKey(secret).verify_key)
    # PublicKey.from_secret: PrivateKey() would also build the x-only (Schnorr) key pair.
    return coincurve.PublicKey.from_secret(secret).format(compressed=True)


class AppKey:
    """The app's secp256k1 key, ready to derive with.

    The HKDF extract step and the key object depend only on the key, so they are computed
    once; every derivation gives exactly what :func:`derive_app_key` gives.

    :param secret: the app's 32-byte secp256k1 private key.
    :param kms_signature: 65 bytes from the KMS, or empty without a KMS.
    """

    __slots__ = ("_key", "_kms_signature", "_prk")

    def __init__(self, secret: bytes, kms_signature: bytes) -> None:
        self._prk = _hkdf_extract(secret)
        # coincurve yields r || s || recid, recid in {0, 1} and low S: upstream's exact bytes.
        self._key = coincurve.PrivateKey(secret)
        self._kms_signature = kms_signature

    def __repr__(self) -> str:
        return "AppKey(<secret>)"

    def derive(self, *, path: str, purpose: str, algorithm: str) -> DerivedKey:
        """GetKey (see :func:`derive_app_key`).

        :raises UnsupportedAlgorithm: for an unknown algorithm.
        """
        alg = normalize_key_algorithm(algorithm)
        secret = _hkdf_expand(self._prk, path.encode(), SECRET_LENGTH)
        public_key = public_key_for(alg, secret)
        message = f"{purpose}:{public_key.hex()}".encode()
        app_signature = self._key.sign_recoverable(keccak256(message), hasher=None)
        return DerivedKey(
            algorithm=alg,
            secret=secret,
            public_key=public_key,
            signature_chain=(app_signature, self._kms_signature),
        )


def derive_app_key(
    app_key: bytes, kms_signature: bytes, *, path: str, purpose: str, algorithm: str
) -> DerivedKey:
    """GetKey: derive the key for ``path`` and sign its public key with the app key.

    ``purpose`` enters only the signed message, never the key; ``algorithm`` chooses how
    the same 32 bytes are used.

    :param app_key: the app's 32-byte secp256k1 private key.
    :param kms_signature: 65 bytes from the KMS, or empty without a KMS.
    :raises UnsupportedAlgorithm: for an unknown algorithm.
    """
    return AppKey(app_key, kms_signature).derive(path=path, purpose=purpose, algorithm=algorithm)


def sign_key_algorithm(algorithm: SignAlgorithm) -> KeyAlgorithm:
    """The algorithm of the key Sign uses for a (normalised) signature algorithm."""
    return "ed25519" if algorithm == "ed25519" else "secp256k1"


@attrs.frozen(kw_only=True)
class SignKey:
    """The key Sign uses for one key algorithm, ready to sign: GetKey(path="vms",
    purpose="signing") derived once. It depends only on the app key and the algorithm, so a
    caller may keep it for the life of the app key.
    """

    derived: DerivedKey = attrs.field(repr=False)
    # libsodium's 64-byte secret key (seed || public key), signed with directly: PyNaCl's
    # SigningKey wrapper costs a tenth of a signature per call.
    _ed25519: bytes | None = attrs.field(repr=False, alias="ed25519")
    _secp256k1: coincurve.PrivateKey | None = attrs.field(repr=False, alias="secp256k1")

    @classmethod
    def derive(cls, app_key: bytes, kms_signature: bytes, algorithm: KeyAlgorithm) -> SignKey:
        derived = derive_app_key(
            app_key, kms_signature, path=SIGN_KEY_PATH, purpose=SIGN_KEY_PURPOSE,
            algorithm=algorithm,
        )
        ed = (
            nacl.bindings.crypto_sign_seed_keypair(derived.secret)[1]
            if algorithm == "ed25519"
            else None
        )
        k256 = coincurve.PrivateKey(derived.secret) if algorithm == "secp256k1" else None
        return cls(derived=derived, ed25519=ed, secp256k1=k256)

    def sign(self, algorithm: SignAlgorithm, data: bytes) -> Signature:
        """Sign ``data`` (see :func:`sign_with_app_key`).

        :raises InvalidRequest: prehashed data that is not 32 bytes long, or an algorithm
            this key is not for.
        """
        if self._ed25519 is not None and algorithm == "ed25519":
            # crypto_sign returns the signature followed by the message.
            signature = nacl.bindings.crypto_sign(data, self._ed25519)[:ED25519_SIGNATURE_LENGTH]
        elif self._secp256k1 is not None and algorithm != "ed25519":
            if algorithm == "secp256k1_prehashed":
                if len(data) != PREHASH_LENGTH:
                    raise InvalidRequest(
                        "Pre-hashed signing requires a 32-byte digest, "
                        f"but received {len(data)} bytes",
                        code="invalid_digest_length",
                    )
                digest = data
            else:
                digest = hashlib.sha256(data).digest()
            signature = self._secp256k1.sign_recoverable(digest, hasher=None)
            signature = signature[:COMPACT_SIGNATURE_LENGTH]
        else:
            raise InvalidRequest(f"a {self.derived.algorithm} key cannot make {algorithm} signatures")
        return Signature(
            signature=signature,
            public_key=self.derived.public_key,
            signature_chain=(signature, *self.derived.signature_chain),
        )


def sign_with_app_key(
    app_key: bytes, kms_signature: bytes, *, algorithm: str, data: bytes
) -> Signature:
    """Sign: sign ``data`` with the key GetKey(path="vms", purpose="signing") derives.

    secp256k1 hashes ``data`` with SHA-256; secp256k1_prehashed signs exactly 32 given
    bytes; both give 64-byte ``r || s`` (low S). Ed25519 signs ``data`` as is.

    :returns: the signature, public key and chain ``[signature, app sig, KMS sig]``.
    :raises UnsupportedAlgorithm: for an unknown algorithm.
    :raises InvalidRequest: prehashed data that is not 32 bytes long.
    """
    alg = normalize_sign_algorithm(algorithm)
    return SignKey.derive(app_key, kms_signature, sign_key_algorithm(alg)).sign(alg, data)


def _prehash_field(data: bytes) -> bytes | None:
    # ecdsa's bits2field: shorter than 16 bytes fails, 16..31 left-pads, longer truncates.
    if len(data) < PREHASH_LENGTH // 2:
        return None
    if len(data) < PREHASH_LENGTH:
        return bytes(PREHASH_LENGTH - len(data)) + data
    return data[:PREHASH_LENGTH]


def verify_signature(algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
    """Verify: check a signature as upstream does.

    Malformed keys or signatures are errors; only a well-formed signature that does not
    verify gives ``False``. secp256k1 rejects high-S signatures (returns ``False``).

    :raises UnsupportedAlgorithm: for an unknown algorithm.
    :raises InvalidRequest: a key or signature of the wrong length or encoding.
    """
    alg = normalize_sign_algorithm(algorithm)
    if alg == "ed25519":
        if len(public_key) != ED25519_PUBLIC_KEY_LENGTH:
            raise InvalidRequest("invalid public key", code="invalid_public_key")
        if len(signature) != ED25519_SIGNATURE_LENGTH:
            raise InvalidRequest("invalid signature length", code="invalid_signature")
        try:
            nacl.bindings.crypto_sign_open(signature + data, public_key)
        except nacl.exceptions.BadSignatureError:
            # Upstream (dalek) refuses keys that are not a point; libsodium only fails to
            # verify. The point check costs about as much as verifying, so it is made
            # only when the answer is not already "valid".
            if not nacl.bindings.crypto_core_ed25519_is_valid_point(public_key):
                raise InvalidRequest("invalid public key", code="invalid_public_key") from None
            return False
        return True
    # SEC1 compressed or uncompressed only: libsecp256k1 also takes "hybrid" 06/07 keys,
    # which upstream's k256 refuses.
    if (len(public_key), public_key[:1]) not in _SEC1_FORMS:
        raise InvalidRequest("invalid public key", code="invalid_public_key")
    try:
        key = coincurve.PublicKey(public_key)
    except (ValueError, TypeError):
        raise InvalidRequest("invalid public key", code="invalid_public_key") from None
    if len(signature) != COMPACT_SIGNATURE_LENGTH:
        raise InvalidRequest(
            "signature error: expected 64 bytes r || s", code="invalid_signature"
        )
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < _SECP256K1_N and 0 < s < _SECP256K1_N):
        raise InvalidRequest("signature error: r or s out of range", code="invalid_signature")
    if s > _SECP256K1_N // 2:
        return False
    if alg == "secp256k1":
        digest: bytes | None = hashlib.sha256(data).digest()
    else:
        digest = _prehash_field(data)
    if digest is None:
        return False
    der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(signature))
    return bool(key.verify(der, digest, hasher=None))


_SEC1_FORMS: Final = frozenset({(33, b"\x02"), (33, b"\x03"), (65, b"\x04")})
_SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def recover_public_key(signature: bytes, message_hash: bytes) -> bytes:
    """The compressed secp256k1 key that made a 65-byte recoverable signature.

    :raises InvalidRequest: when the signature is malformed or does not recover.
    """
    if len(signature) != RECOVERABLE_SIGNATURE_LENGTH:
        raise InvalidRequest("a recoverable signature is 65 bytes", code="invalid_signature")
    try:
        key = coincurve.PublicKey.from_signature_and_message(signature, message_hash, hasher=None)
    except Exception as exc:  # coincurve raises a bare Exception on failure
        raise InvalidRequest(f"signature does not recover: {exc}", code="invalid_signature") from None
    return key.format(compressed=True)


def kms_message(app_id: bytes, app_public_key: bytes) -> bytes:
    """The hash the KMS signs to vouch for an app key: ``keccak256("dstack-kms-issued:" || app_id || pub)``."""
    return keccak256(KMS_ISSUED_TAG + b":" + app_id + app_public_key)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets or digests without leaking where they differ."""
    return hmac.compare_digest(a, b)
