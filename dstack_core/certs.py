"""RA-TLS certificates: issuing them as the upstream agent does, and reading them back.

Pure functions: no I/O. Issuing is byte-compatible in shape with the upstream agent (rcgen
0.13 driven by ``ra-tls``); only the ECDSA signature differs between runs.

* A leaf binds its key to the TEE through the attestation in extension ``.1.8``, whose
  report data is :func:`ratls_report_data` of the leaf's SubjectPublicKeyInfo.
* Every RA-TLS extension is non-critical and its ``extnValue`` is a DER OCTET STRING that
  wraps the payload, so the certificate holds ``OCTET STRING { OCTET STRING { payload } }``.
* Serial numbers are derived from the public key (first 20 bytes of SHA-256 of the
  uncompressed point, top bit cleared), so re-issuing for the same key keeps the serial.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Final

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as _CryptoUnsupported
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import der
from .errors import (
    ConfigurationError,
    DstackError,
    EvidenceError,
    InvalidRequest,
    UnsupportedAlgorithm,
)
from .keys import derive_key
from .types import KeyProvider, RootKey

__all__ = [
    "RATLS_OID_ARC",
    "OID_LEGACY_TDX_QUOTE",
    "OID_LEGACY_EVENT_LOG",
    "OID_APP_ID",
    "OID_CERT_USAGE",
    "OID_ATTESTATION",
    "OID_APP_INFO",
    "RATLS_CERT_TAG",
    "DEFAULT_CERT_USAGE",
    "DEFAULT_NOT_BEFORE",
    "DEFAULT_VALIDITY",
    "REPORT_DATA_HASHES",
    "ratls_report_data",
    "report_data_for",
    "derive_p256_key",
    "new_tls_key",
    "spki_der",
    "private_key_pem",
    "cert_pem",
    "serial_number_for",
    "CertificateAuthority",
    "new_app_ca",
    "TlsCertificateRequest",
    "issue_certificate",
    "RaTlsCertificate",
    "load_certificate_chain",
    "verify_chain",
    "new_local_root_key",
]

RATLS_OID_ARC: Final = "1.3.6.1.4.1.62397.1"
OID_LEGACY_TDX_QUOTE: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.1")
OID_LEGACY_EVENT_LOG: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.2")
OID_APP_ID: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.3")
OID_CERT_USAGE: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.4")
OID_ATTESTATION: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.8")
OID_APP_INFO: Final = x509.ObjectIdentifier(f"{RATLS_OID_ARC}.9")

RATLS_CERT_TAG: Final = "ratls-cert"
REPORT_DATA_LENGTH: Final = 64
DEFAULT_CERT_USAGE: Final = "app:custom"
#: rcgen's default notBefore, kept by upstream whenever the caller gives none.
DEFAULT_NOT_BEFORE: Final = datetime(1975, 1, 1, tzinfo=timezone.utc)
DEFAULT_VALIDITY: Final = timedelta(days=3650)
SERIAL_LENGTH: Final = 20
KEY_ID_LENGTH: Final = 20
CA_PATH_LENGTH: Final = 1
#: 9999-12-31T23:59:59Z, the last instant a GeneralizedTime can hold.
MAX_CERT_TIMESTAMP: Final = 253402300799
EVENT_LOG_GZIP_MAGIC: Final = b"ELGZv1"
MAX_LEGACY_EVENT_LOG_SIZE: Final = 16 * 1024

_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS


def _keccak(bits: int) -> Callable[[bytes], bytes]:
    def digest(data: bytes) -> bytes:
        from Crypto.Hash import keccak  # on first use: its import is slow (see keys.keccak256)

        return keccak.new(digest_bits=bits, data=data).digest()

    return digest


def _hashlib(name: str) -> Callable[[bytes], bytes]:
    return lambda data: hashlib.new(name, data).digest()


#: Hash names :func:`report_data_for` accepts besides ``""`` and ``"raw"``, spelled as upstream.
REPORT_DATA_HASHES: Final[Mapping[str, Callable[[bytes], bytes]]] = MappingProxyType(
    {
        "sha256": _hashlib("sha256"),
        "sha384": _hashlib("sha384"),
        "sha512": _hashlib("sha512"),
        "sha3-256": _hashlib("sha3_256"),
        "sha3-384": _hashlib("sha3_384"),
        "sha3-512": _hashlib("sha3_512"),
        "keccak256": _keccak(256),
        "keccak384": _keccak(384),
        "keccak512": _keccak(512),
    }
)

# CA curves rcgen can sign with, the digest it pairs with each, and the DER
# AlgorithmIdentifier of that signature (ecdsa-with-SHA256/384, RFC 5758: no parameters).
_CA_SIGNATURE_HASHES: Final[dict[str, type[hashes.SHA256] | type[hashes.SHA384]]] = {
    ec.SECP256R1.name: hashes.SHA256,
    ec.SECP384R1.name: hashes.SHA384,
}
_ECDSA_SIGNATURE_ALGORITHMS: Final = {
    hashes.SHA256.name: der.sequence(der.oid("1.2.840.10045.4.3.2")),
    hashes.SHA384.name: der.sequence(der.oid("1.2.840.10045.4.3.3")),
}


def ratls_report_data(spki_der: bytes) -> bytes:
    """The 64-byte report data that binds a TLS key: ``sha512(b"ratls-cert:" + spki_der)``.

    :param spki_der: the DER SubjectPublicKeyInfo of the certified key (the whole TLV).
    """
    return hashlib.sha512(RATLS_CERT_TAG.encode() + b":" + spki_der).digest()


def report_data_for(content: bytes, hash_algorithm: str, tag: str) -> bytes:
    """Upstream ``QuoteContentType::to_report_data_with_hash``: 64 bytes of report data.

    ``H(tag + ":" + content)`` right-padded with zeros to 64 bytes; ``""`` means sha512.
    ``"raw"`` returns ``content`` itself, which must then be exactly 64 bytes.

    :param hash_algorithm: ``""``, ``"raw"`` or a key of :data:`REPORT_DATA_HASHES`.
    :param tag: the domain tag, e.g. ``"app-data"``, ``"ratls-cert"``, ``"kms-root-ca"``.
    :returns: exactly 64 bytes.
    :raises InvalidRequest: ``raw`` with content that is not 64 bytes long.
    :raises UnsupportedAlgorithm: any other algorithm name.
    """
    if hash_algorithm == "raw":
        if len(content) != REPORT_DATA_LENGTH:
            raise InvalidRequest("invalid content length")
        return bytes(content)
    digest = REPORT_DATA_HASHES.get(hash_algorithm or "sha512")
    if digest is None:
        raise UnsupportedAlgorithm("invalid hash algorithm")
    return digest(tag.encode() + b":" + content).ljust(REPORT_DATA_LENGTH, b"\0")


def derive_p256_key(ikm: bytes, context: Sequence[bytes]) -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose scalar is ``HKDF-SHA256(salt=b"RATLS", ikm, info=concat(context), 32)``.

    Upstream ``derive_p256_key_pair_from_bytes``; the scalar is used as is, not reduced.

    :raises DstackError: the 32 bytes are 0 or not below the group order (probability about
        2^-32; upstream fails the same way rather than retrying).
    """
    scalar = int.from_bytes(derive_key(ikm, context, 32), "big")
    try:
        return ec.derive_private_key(scalar, ec.SECP256R1())
    except ValueError as exc:
        raise DstackError("derived P-256 scalar is out of range") from exc


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh random P-256 key, as GetTlsKey makes for every call."""
    return ec.generate_private_key(ec.SECP256R1())


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of ``public_key``."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """Unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``, LF line endings)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def cert_pem(cert: x509.Certificate) -> str:
    """The certificate as PEM text (LF line endings, trailing newline)."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def serial_number_for(public_key: ec.EllipticCurvePublicKey) -> int:
    """rcgen's key-derived serial: SHA-256 of the uncompressed point, 20 bytes, top bit cleared."""
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    serial = bytearray(hashlib.sha256(point).digest()[:SERIAL_LENGTH])
    serial[0] &= 0x7F
    return int.from_bytes(serial, "big")


def _key_identifier(public_key: PublicKeyTypes) -> bytes:
    # rcgen's KeyIdMethod::Sha256 hashes the whole SPKI, unlike RFC 5280's SHA-1 method.
    return hashlib.sha256(spki_der(public_key)).digest()[:KEY_ID_LENGTH]


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc).replace(microsecond=0)


def _parse_der_octet_string(data: bytes, what: str) -> bytes:
    """The contents of a single DER OCTET STRING that spans all of ``der``."""
    if len(data) < 2 or data[0] != der.TAG_OCTET_STRING:
        raise EvidenceError(f"{what} is not a DER OCTET STRING")
    first = data[1]
    if first < der.LONG_LENGTH_FLAG:
        length, start = first, 2
    else:
        count = first & ~der.LONG_LENGTH_FLAG & 0xFF
        length_bytes = data[2 : 2 + count]
        if count == 0 or len(length_bytes) != count or length_bytes[0] == 0:
            raise EvidenceError(f"{what} has an invalid DER length")
        length, start = int.from_bytes(length_bytes, "big"), 2 + count
        if length < der.LONG_LENGTH_FLAG:
            raise EvidenceError(f"{what} has a non-minimal DER length")
    if len(data) - start != length:
        raise EvidenceError(f"{what} length does not match its contents")
    return data[start:]


def _ca_hash(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    hash_type = _CA_SIGNATURE_HASHES.get(key.curve.name)
    if hash_type is None:
        raise ConfigurationError(f"unsupported CA key curve {key.curve.name}")
    return hash_type()


@attrs.frozen(kw_only=True)
class CertificateAuthority:
    """A CA that signs leaves locally: the app CA of the None/Local/TPM key providers.

    Construction checks that ``key`` is the private half of ``cert``'s public key, that the
    curve is P-256 or P-384, and that ``cert`` is not marked as a non-CA.

    :ivar cert: the CA certificate; its subject becomes every leaf's issuer.
    :ivar key: the CA's private key (never shown in ``repr``).
    :raises ConfigurationError: from the constructor, if any check fails.
    """

    cert: x509.Certificate
    # eq is carried by cert: the constructor guarantees the key matches it.
    key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, eq=False)
    #: The DER of the CA's subject, every leaf's issuer (derived, encoded once).
    subject_der: bytes = attrs.field(init=False, repr=False, eq=False)
    #: The DER AlgorithmIdentifier of the CA's signatures (derived from its curve).
    signature_algorithm: bytes = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("CA key is not an elliptic-curve key")
        algorithm = _ECDSA_SIGNATURE_ALGORITHMS[_ca_hash(self.key).name]
        object.__setattr__(self, "signature_algorithm", algorithm)
        object.__setattr__(self, "subject_der", self.cert.subject.public_bytes())
        if spki_der(self.key.public_key()) != spki_der(self.cert.public_key()):
            raise ConfigurationError("CA key does not match the CA certificate")
        try:
            constraints = self.cert.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            return
        except ValueError as exc:
            raise ConfigurationError(f"CA certificate has malformed extensions: {exc}") from exc
        if not constraints.value.ca:
            raise ConfigurationError("CA certificate is not marked as a CA")

    @classmethod
    def from_pem(cls, cert_pem: str | bytes, key_pem: str | bytes) -> CertificateAuthority:
        """Load a CA from PEM, e.g. ``appkeys.json``'s ``ca_cert`` and ``key_provider.*.key``.

        :param key_pem: PKCS#8 or SEC1 PEM of an unencrypted EC key.
        :raises ConfigurationError: unparseable PEM, a non-EC key, or a mismatched pair.
        """
        cert_bytes = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        key_bytes = key_pem.encode() if isinstance(key_pem, str) else key_pem
        try:
            cert = x509.load_pem_x509_certificate(cert_bytes)
        except (ValueError, x509.InvalidVersion) as exc:
            raise ConfigurationError(f"CA certificate is not valid PEM: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError, _CryptoUnsupported) as exc:
            raise ConfigurationError(f"CA key is not a valid unencrypted PEM key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("CA key is not an elliptic-curve key")
        return cls(cert=cert, key=key)

    @property
    def cert_pem(self) -> str:
        """The CA certificate as PEM text (the second entry of a GetTlsKey chain)."""
        return cert_pem(self.cert)

    @property
    def spki_der(self) -> bytes:
        """The CA's DER SubjectPublicKeyInfo (upstream's local key-provider id)."""
        return spki_der(self.cert.public_key())


def new_app_ca(
    key: ec.EllipticCurvePrivateKey,
    *,
    now: datetime,
    common_name: str = "dstack-core App CA",
    org: str = "Dstack",
) -> CertificateAuthority:
    """A self-signed CA shaped like the upstream simulator's local CA.

    Subject ``O=<org>, CN=<common_name>``; serial as :func:`serial_number_for`; validity
    1975-01-01 to ``now`` + 3650 days; extensions KeyUsage (critical: digitalSignature,
    keyCertSign, cRLSign), SubjectKeyIdentifier (SHA-256 of the SPKI, 20 bytes),
    BasicConstraints (critical: CA, pathlen 1), in that order.

    :param now: an aware datetime; the start of the ten-year lifetime.
    :raises ConfigurationError: the key's curve cannot sign (not P-256 or P-384).
    """
    signature_hash = _ca_hash(key)
    public_key = key.public_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .serial_number(serial_number_for(public_key))
        .issuer_name(name)
        .subject_name(name)
        .public_key(public_key)
        .not_valid_before(DEFAULT_NOT_BEFORE)
        .not_valid_after(_utc(now) + DEFAULT_VALIDITY)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier(_key_identifier(public_key)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=CA_PATH_LENGTH), critical=True)
        .sign(key, signature_hash)
    )
    return CertificateAuthority(cert=cert, key=key)


_IP_CHARACTERS: Final = "0123456789abcdefABCDEF.:"
"""Every character of an IPv4 or IPv6 address (without a zone id)."""


_ID_AT_ORGANIZATION: Final = der.oid(NameOID.ORGANIZATION_NAME.dotted_string)
_ID_AT_COMMON_NAME: Final = der.oid(NameOID.COMMON_NAME.dotted_string)
_ID_CE_SUBJECT_ALT_NAME: Final = der.oid(x509.OID_SUBJECT_ALTERNATIVE_NAME.dotted_string)
_ID_CE_KEY_USAGE: Final = der.oid(x509.OID_KEY_USAGE.dotted_string)
_ID_CE_EXT_KEY_USAGE: Final = der.oid(x509.OID_EXTENDED_KEY_USAGE.dotted_string)
_ID_KP_SERVER_AUTH: Final = der.oid(ExtendedKeyUsageOID.SERVER_AUTH.dotted_string)
_ID_KP_CLIENT_AUTH: Final = der.oid(ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string)
#: TBSCertificate.version: [0] EXPLICIT INTEGER 2 (v3).
_VERSION_3: Final = der.explicit(0, der.integer(2))
_DEFAULT_NOT_BEFORE_DER: Final = der.time(DEFAULT_NOT_BEFORE)
#: GeneralName choices (RFC 5280 4.2.1.6), IMPLICIT.
_GENERAL_NAME_DNS: Final = 2
_GENERAL_NAME_IP: Final = 7
# Leaf extensions after KeyUsage/ExtendedKeyUsage, in upstream's order.
_RATLS_EXTENSIONS: Final = tuple(
    (name, der.oid(oid.dotted_string))
    for name, oid in (
        ("app_id", OID_APP_ID),
        ("app_info", OID_APP_INFO),
        ("usage", OID_CERT_USAGE),
        ("attestation", OID_ATTESTATION),
    )
)


def _alt_name_der(entry: str) -> bytes:
    """A GeneralName: iPAddress if ``entry`` parses as Rust's ``IpAddr`` would, else dNSName."""
    # Rust's IpAddr rejects IPv6 zone ids, which Python's ipaddress accepts. A name with a
    # character no address has is a DNS name: parsing it (and raising) would cost more.
    if "%" not in entry and not entry.strip(_IP_CHARACTERS):
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            pass
        else:
            return der.implicit(_GENERAL_NAME_IP, address.packed)
    if not entry.isascii():
        raise InvalidRequest(f"alt name is neither an IP address nor an ASCII DNS name: {entry!r}")
    return der.implicit(_GENERAL_NAME_DNS, entry.encode("ascii"))


def _check_utf8(what: str) -> Callable[[object, attrs.Attribute[Any], str | None], None]:
    def check(_instance: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is None:
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{what} is not valid Unicode") from exc

    return check


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_alt_names(
    _instance: object, _attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    for entry in value:
        if not isinstance(entry, str):
            raise TypeError("alt_names must be strings")
        _alt_name_der(entry)


def _check_timestamp(
    _instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int or None")
    if not 0 <= value <= MAX_CERT_TIMESTAMP:
        raise InvalidRequest(f"{attribute.name} is out of range")


_OPTIONAL_BYTES = attrs.validators.optional(attrs.validators.instance_of(bytes))
_BOOL = attrs.validators.instance_of(bool)


@attrs.frozen(kw_only=True)
class TlsCertificateRequest:
    """What a leaf certificate should say (upstream ``CertConfigV2`` plus the CA's additions).

    :ivar subject: the CN; may be empty (upstream's default).
    :ivar alt_names: SANs; IPv4/IPv6 literals become iPAddress, the rest dNSName (ASCII only).
    :ivar usage_server_auth: add the serverAuth EKU.
    :ivar usage_client_auth: add the clientAuth EKU.
    :ivar not_before: unix seconds, or None for 1975-01-01T00:00:00Z.
    :ivar not_after: unix seconds, or None for issuance time + 3650 days.
    :ivar attestation: stripped VersionedAttestation bytes for extension ``.1.8``, or None.
    :ivar app_info: msgpack AppInfo for extension ``.1.9``, or None.
    :ivar usage: the UTF-8 text of extension ``.1.4``, or None for no usage extension (the
        temporary client certificates upstream makes for RA-TLS calls carry none).
    :ivar app_id: raw app id for extension ``.1.3`` (KMS-issued certificates), or None.
    :ivar org_name: an ``O=`` attribute before the CN (upstream's ``org_name``), or None.
    :raises InvalidRequest: a non-ASCII DNS name, a bound outside 0..9999-12-31, or
        ``not_before >= not_after`` when both are given.
    """

    subject: str = attrs.field(default="", validator=_check_utf8("subject"))
    alt_names: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=_check_alt_names
    )
    usage_server_auth: bool = attrs.field(default=False, validator=_BOOL)
    usage_client_auth: bool = attrs.field(default=False, validator=_BOOL)
    not_before: int | None = attrs.field(default=None, validator=_check_timestamp)
    not_after: int | None = attrs.field(default=None, validator=_check_timestamp)
    attestation: bytes | None = attrs.field(default=None, validator=_OPTIONAL_BYTES)
    app_info: bytes | None = attrs.field(default=None, validator=_OPTIONAL_BYTES)
    usage: str | None = attrs.field(
        default=DEFAULT_CERT_USAGE, validator=_check_utf8("usage")
    )
    app_id: bytes | None = attrs.field(default=None, validator=_OPTIONAL_BYTES)
    org_name: str | None = attrs.field(
        default=None, validator=_check_utf8("org_name")
    )

    def __attrs_post_init__(self) -> None:
        if (
            self.not_before is not None
            and self.not_after is not None
            and self.not_before >= self.not_after
        ):
            raise InvalidRequest("not_before must be earlier than not_after")


def _subject_der(request: TlsCertificateRequest) -> bytes:
    # Name ::= SEQUENCE OF SET OF AttributeTypeAndValue, one attribute per set, UTF8String
    # as cryptography and rcgen write them. Upstream writes any CN, the empty default too.
    names = [der.tlv(der.TAG_SET, der.sequence(_ID_AT_COMMON_NAME,
                                                der.utf8_string(request.subject)))]
    if request.org_name is not None:
        names.insert(0, der.tlv(der.TAG_SET, der.sequence(
            _ID_AT_ORGANIZATION, der.utf8_string(request.org_name)
        )))
    return der.sequence(*names)


def _extension(oid: bytes, value: bytes, *, critical: bool = False) -> bytes:
    return der.sequence(oid, der.TRUE, der.octet_string(value)) if critical else der.sequence(
        oid, der.octet_string(value)
    )


#: KeyUsage, critical, with only digitalSignature (bit 0: one byte, seven unused bits).
_KEY_USAGE_EXTENSION: Final = _extension(
    _ID_CE_KEY_USAGE, der.bit_string(b"\x80", unused_bits=7), critical=True
)
#: ExtendedKeyUsage by (serverAuth, clientAuth): serverAuth first, none at all for neither.
_EXT_KEY_USAGE_EXTENSIONS: Final = {
    (server, client): _extension(_ID_CE_EXT_KEY_USAGE, der.sequence(*(
        oid for oid, wanted in ((_ID_KP_SERVER_AUTH, server), (_ID_KP_CLIENT_AUTH, client))
        if wanted
    ))) if server or client else b""
    for server in (False, True)
    for client in (False, True)
}


def issue_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    request: TlsCertificateRequest,
    *,
    now: datetime,
) -> x509.Certificate:
    """Sign a leaf for ``public_key`` with exactly the upstream shape (agent-api.md 5.1).

    v3; serial :func:`serial_number_for`; issuer = the CA's subject; subject ``CN=<subject>``
    (``O=<org_name>, CN=<subject>`` with an org name);
    validity from the request or 1975-01-01 .. ``now`` + 3650 days; extensions in order:
    SubjectAltName (if any), KeyUsage (critical, digitalSignature), ExtendedKeyUsage (if any:
    serverAuth then clientAuth), then non-critical app-id, app-info, cert-usage, attestation,
    each present only when set. No SKI, AKI or BasicConstraints. Signed with ECDSA and
    SHA-256 (P-256 CA) or SHA-384 (P-384 CA).

    The TBSCertificate is encoded here rather than by cryptography's builder: byte for byte
    what the builder writes for the same values (``tests/test_certs.py`` holds the two
    together), at a fraction of the cost, on every GetTlsKey.

    :param now: an aware datetime; only used for the default notAfter.
    :raises InvalidRequest: the effective notAfter would precede the effective notBefore
        (only one bound was given and the default for the other crosses it).
    """
    return x509.load_der_x509_certificate(_leaf_der(ca, public_key, request, now=now))


def _leaf_der(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    request: TlsCertificateRequest,
    *,
    now: datetime,
) -> bytes:
    not_before = (
        DEFAULT_NOT_BEFORE
        if request.not_before is None
        else datetime.fromtimestamp(request.not_before, timezone.utc)
    )
    not_after = (
        _utc(now) + DEFAULT_VALIDITY
        if request.not_after is None
        else datetime.fromtimestamp(request.not_after, timezone.utc)
    )
    if not_after < not_before:
        raise InvalidRequest("not_before must be earlier than not_after")
    extensions = []
    if request.alt_names:
        names = der.sequence(*(_alt_name_der(name) for name in request.alt_names))
        extensions.append(_extension(_ID_CE_SUBJECT_ALT_NAME, names))
    extensions.append(_KEY_USAGE_EXTENSION)
    extensions.append(_EXT_KEY_USAGE_EXTENSIONS[request.usage_server_auth, request.usage_client_auth])
    for name, oid in _RATLS_EXTENSIONS:
        payload = getattr(request, name)
        if payload is not None:
            if isinstance(payload, str):
                payload = payload.encode("utf-8")
            extensions.append(_extension(oid, der.octet_string(payload)))
    tbs = der.sequence(
        _VERSION_3,
        der.integer(serial_number_for(public_key)),
        ca.signature_algorithm,
        ca.subject_der,
        der.sequence(
            _DEFAULT_NOT_BEFORE_DER if request.not_before is None else der.time(not_before),
            der.time(not_after),
        ),
        _subject_der(request),
        spki_der(public_key),
        der.explicit(3, der.sequence(*extensions)),
    )
    signature = ca.key.sign(tbs, ec.ECDSA(_ca_hash(ca.key)))
    return der.sequence(tbs, ca.signature_algorithm, der.bit_string(signature))


def _decompress_event_log(data: bytes) -> bytes:
    if not data.startswith(EVENT_LOG_GZIP_MAGIC):
        return data
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        out = inflater.decompress(data[len(EVENT_LOG_GZIP_MAGIC) :], MAX_LEGACY_EVENT_LOG_SIZE + 1)
    except zlib.error as exc:
        raise EvidenceError(f"legacy event log extension is not valid gzip: {exc}") from exc
    if len(out) > MAX_LEGACY_EVENT_LOG_SIZE:
        raise EvidenceError("legacy event log extension decompresses to more than 16 KiB")
    if not inflater.eof:
        raise EvidenceError("legacy event log extension is truncated gzip")
    return out


@attrs.frozen(kw_only=True)
class RaTlsCertificate:
    """The RA-TLS view of a certificate: its key and the dstack extensions it carries.

    Payloads are the bytes inside the inner OCTET STRING. Reading this proves nothing: check
    :attr:`expected_report_data` against the verified attestation, and the chain for issuer
    claims (app id, usage).

    :ivar certificate: the parsed certificate.
    :ivar spki_der: its DER SubjectPublicKeyInfo.
    :ivar attestation: extension ``.1.8`` (stripped VersionedAttestation), or None.
    :ivar legacy_quote: extension ``.1.1`` (raw TDX quote), or None.
    :ivar legacy_event_log: extension ``.1.2``, gunzipped when ``ELGZv1``-prefixed, or None.
    :ivar app_info: extension ``.1.9`` (msgpack AppInfo), or None.
    :ivar usage: extension ``.1.4`` decoded as UTF-8, or None.
    :ivar app_id: extension ``.1.3``, or None.
    """

    certificate: x509.Certificate
    spki_der: bytes
    attestation: bytes | None = None
    legacy_quote: bytes | None = None
    legacy_event_log: bytes | None = None
    app_info: bytes | None = None
    usage: str | None = None
    app_id: bytes | None = None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> RaTlsCertificate:
        """Read the RA-TLS extensions of ``cert``.

        :raises EvidenceError: duplicate or malformed extensions, an RA-TLS value that is not
            exactly one DER OCTET STRING, a usage that is not UTF-8, or a bad legacy event log.
        """
        try:
            extensions = cert.extensions
        except (x509.DuplicateExtension, ValueError) as exc:
            raise EvidenceError(f"certificate has malformed extensions: {exc}") from exc
        found: dict[x509.ObjectIdentifier, bytes] = {}
        for extension in extensions:
            if not extension.oid.dotted_string.startswith(RATLS_OID_ARC + "."):
                continue
            value = extension.value
            if not isinstance(value, x509.UnrecognizedExtension):
                raise EvidenceError(
                    f"extension {extension.oid.dotted_string} has an unexpected type"
                )
            found[extension.oid] = _parse_der_octet_string(
                value.value, f"extension {extension.oid.dotted_string}"
            )
        usage = found.get(OID_CERT_USAGE)
        try:
            usage_text = None if usage is None else usage.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvidenceError("cert-usage extension is not UTF-8") from exc
        event_log = found.get(OID_LEGACY_EVENT_LOG)
        try:
            public_key = cert.public_key()
        except (ValueError, _CryptoUnsupported) as exc:
            raise EvidenceError(f"certificate public key is unusable: {exc}") from exc
        return cls(
            certificate=cert,
            spki_der=spki_der(public_key),
            attestation=found.get(OID_ATTESTATION),
            legacy_quote=found.get(OID_LEGACY_TDX_QUOTE),
            legacy_event_log=None if event_log is None else _decompress_event_log(event_log),
            app_info=found.get(OID_APP_INFO),
            usage=usage_text,
            app_id=found.get(OID_APP_ID),
        )

    @property
    def expected_report_data(self) -> bytes:
        """The report data an honest attestation of this key carries (:func:`ratls_report_data`)."""
        return ratls_report_data(self.spki_der)


DER_SEQUENCE_TAG: Final = b"\x30"


def load_certificate_chain(data: bytes | str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates, or a single DER certificate, in the given order.

    :raises EvidenceError: nothing parseable, or trailing bytes after a DER certificate.
    """
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    try:
        # A DER RA-TLS leaf contains PEM text inside its quote's PCK chain, so DER is
        # recognised by its leading SEQUENCE tag, not by the absence of PEM markers.
        if raw.startswith(DER_SEQUENCE_TAG):
            return [x509.load_der_x509_certificate(raw)]
        return x509.load_pem_x509_certificates(raw)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise EvidenceError(f"not a PEM or DER certificate: {exc}") from exc


def verify_chain(chain: Sequence[x509.Certificate]) -> None:
    """Check that each certificate is signed by the next one (leaf first, anchor last).

    Signatures and issuer/subject names only: no validity periods, CA flags or trust in
    the last certificate, which is the caller's anchor to judge.

    :raises EvidenceError: an empty chain, or the first link that fails, by index.
    """
    if not chain:
        raise EvidenceError("empty certificate chain")
    for index, (child, parent) in enumerate(zip(chain, chain[1:])):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, _CryptoUnsupported) as exc:
            detail = str(exc) or type(exc).__name__
            raise EvidenceError(
                f"certificate {index} is not issued by certificate {index + 1}: {detail}"
            ) from exc


def new_local_root_key(*, now: datetime) -> RootKey:
    """Fresh app keys with a local CA (key provider ``None``), as dstack-util makes them
    without a KMS: random secp256k1 app key, no KMS signature, a self-signed app CA."""
    ca_key = new_tls_key()
    return RootKey(
        k256_key=os.urandom(32),
        disk_crypt_key=os.urandom(32),
        env_crypt_key=os.urandom(32),
        ca_cert_pem=new_app_ca(ca_key, now=now).cert_pem,
        key_provider=KeyProvider(kind="None", name="none", key_pem=private_key_pem(ca_key)),
    )
