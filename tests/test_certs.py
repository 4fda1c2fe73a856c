from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from Crypto.Hash import keccak
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from dstack_core import certs
from dstack_core.certs import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_CERT_USAGE,
    OID_LEGACY_EVENT_LOG,
    OID_LEGACY_TDX_QUOTE,
    CertificateAuthority,
    RaTlsCertificate,
    TlsCertificateRequest,
    derive_p256_key,
    issue_certificate,
    load_certificate_chain,
    new_app_ca,
    new_tls_key,
    ratls_report_data,
    report_data_for,
    spki_der,
    verify_chain,
)
from dstack_core.errors import (
    ConfigurationError,
    EvidenceError,
    InvalidRequest,
    UnsupportedAlgorithm,
)

DATA = Path(__file__).parent / "data"
NOW = datetime(2025, 6, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)
# agent-api.md 14.2: the simulator's k256 app key and the Tappd DeriveKey scalar for my/key/path.
SIM_APP_KEY = bytes.fromhex("d6e88992cdeeee35fe70b5db61ab66cdb191fb9b6ec9313757ef162dd7214d5d")
DERIVED_SCALAR = 0x866D0884686E5AFDBDAACE8BD77C0B4F69A30DBE9506D69270A07BF247C8F4F0
# agent-api.md 14.6
DERIVED_SPKI = bytes.fromhex(
    "3059301306072a8648ce3d020106082a8648ce3d030107034200045086e4c2af212bba0ebe265e7d96e472"
    "79df69d33f223a8c06124dbc9b2e7120f795df4509658dcb5636a0c972ef96a83baa1e0849a171d3e57496"
    "f27b50ca3c"
)
DERIVED_RATLS_REPORT_DATA = bytes.fromhex(
    "3d09922b9f23dd44ac2de57be6dfffd1faf0f8012281ef53b34379b2ec5a20c0b058f46aff2a9ca5eb39e01379"
    "be221b3d2c28ca1f40be3c5cdf1189b9b199a3"
)
# agent-api.md 14.5: key_provider_info.id, the SPKI of the simulator CA key.
SIM_CA_SPKI_HEX = (
    "3059301306072a8648ce3d020106082a8648ce3d0301070342000419b2457dd9b8aa6446d980f136fff7812ec"
    "d6c77740eeb0e28b10d56c0c00028a5b6e59dcea307d583bd1f70769e9c116df2bcfb1758a95d8613e7de1c84"
    "82c0"
)


def _appkeys() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "upstream_simulator_appkeys.json").read_text())
    return data


@pytest.fixture(scope="module")
def sim_ca() -> CertificateAuthority:
    appkeys = _appkeys()
    return CertificateAuthority.from_pem(appkeys["ca_cert"], appkeys["key_provider"]["None"]["key"])


@pytest.fixture(scope="module")
def local_ca() -> CertificateAuthority:
    return new_app_ca(derive_p256_key(b"\x01" * 32, [b"app-ca"]), now=NOW)


@pytest.fixture(scope="module")
def leaf_key() -> ec.EllipticCurvePrivateKey:
    return derive_p256_key(SIM_APP_KEY, [b"my/key/path"])


def _issue(
    ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey, **fields: Any
) -> x509.Certificate:
    return issue_certificate(ca, key.public_key(), TlsCertificateRequest(**fields), now=NOW)


def _der_octet_string(payload: bytes) -> bytes:
    """An independent DER OCTET STRING encoder (short and long form)."""
    n = len(payload)
    if n < 0x80:
        return bytes([0x04, n]) + payload
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(length)]) + length + payload


class TestReportData:
    def test_ratls_report_data_vector(self) -> None:
        """sha512("ratls-cert:" || SPKI) of the 14.2 key equals agent-api.md 14.6."""
        assert ratls_report_data(DERIVED_SPKI) == DERIVED_RATLS_REPORT_DATA

    def test_default_hash_is_sha512(self) -> None:
        """An empty algorithm name means sha512 (agent-api.md 14.3 AppData vector)."""
        assert report_data_for(b"test content", "", "app-data").hex() == (
            "7ea0b744ed5e9c0c83ff9f575668e1697652cd349f2027cdf26f918d4c53e8cd50b5ea9b449b4c3d50e2"
            "0ae00ec29688d5a214e8daff8a10041f5d624dae8a01"
        )

    def test_sha512_app_data_vector(self) -> None:
        """sha512("app-data:test") equals the upstream TdxQuote vector."""
        assert report_data_for(b"test", "sha512", "app-data").hex() == (
            "1864e059be7e1ec12d9fe9da903d3711e0d72edab19f044cc9d6ac90c32b996b545a9979309bd19c36b8"
            "03941e8e3485115e9b794001f2b9f367f6e03c52e532"
        )

    def test_ratls_tag_matches_ratls_report_data(self) -> None:
        """The generic rule with tag ratls-cert gives the RA-TLS binding."""
        assert report_data_for(DERIVED_SPKI, "sha512", "ratls-cert") == DERIVED_RATLS_REPORT_DATA

    @pytest.mark.parametrize(
        ("name", "hashlib_name"),
        [
            ("sha256", "sha256"),
            ("sha384", "sha384"),
            ("sha3-256", "sha3_256"),
            ("sha3-384", "sha3_384"),
            ("sha3-512", "sha3_512"),
        ],
    )
    def test_short_digests_are_zero_padded(self, name: str, hashlib_name: str) -> None:
        """H(tag:content) is left-aligned in 64 zero bytes."""
        digest = hashlib.new(hashlib_name, b"tag:content").digest()
        assert report_data_for(b"content", name, "tag") == digest + bytes(64 - len(digest))

    @pytest.mark.parametrize("bits", [256, 384, 512])
    def test_keccak_is_not_sha3(self, bits: int) -> None:
        """keccakN uses original Keccak padding, distinct from sha3-N."""
        digest = keccak.new(digest_bits=bits, data=b"tag:content").digest()
        result = report_data_for(b"content", f"keccak{bits}", "tag")
        assert result == digest.ljust(64, b"\0")
        assert result != report_data_for(b"content", f"sha3-{bits}", "tag")

    def test_keccak256_known_answer(self) -> None:
        """The keccak256 backend gives Ethereum's Keccak-256 (empty-input vector)."""
        assert keccak.new(digest_bits=256, data=b"").hexdigest() == (
            "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
        )

    def test_raw_passes_64_bytes_through(self) -> None:
        """raw returns the content itself and ignores the tag."""
        content = bytes(range(64))
        assert report_data_for(content, "raw", "ignored") == content

    @pytest.mark.parametrize("length", [0, 63, 65])
    def test_raw_requires_64_bytes(self, length: int) -> None:
        """raw with any other length is rejected as upstream does."""
        with pytest.raises(InvalidRequest, match="^invalid content length$"):
            report_data_for(bytes(length), "raw", "app-data")

    @pytest.mark.parametrize("name", ["md5", "SHA256", "sha-256", "blake2b"])
    def test_unknown_algorithm(self, name: str) -> None:
        """Unknown (or differently spelled) names are unsupported_algorithm errors."""
        with pytest.raises(UnsupportedAlgorithm, match="^invalid hash algorithm$") as info:
            report_data_for(b"x", name, "app-data")
        assert info.value.code == "unsupported_algorithm"
        assert info.value.http_status == 400


class TestDeriveP256Key:
    def test_tappd_derive_key_vector(self, leaf_key: ec.EllipticCurvePrivateKey) -> None:
        """HKDF-SHA256(salt RATLS) of the simulator app key gives the 14.2 scalar."""
        assert leaf_key.private_numbers().private_value == DERIVED_SCALAR

    def test_spki_vector(self, leaf_key: ec.EllipticCurvePrivateKey) -> None:
        """The derived key's SPKI is the one agent-api.md 14.6 hashes."""
        assert spki_der(leaf_key.public_key()) == DERIVED_SPKI

    def test_context_parts_are_concatenated(self) -> None:
        """The info is the plain concatenation of the context parts."""
        split = derive_p256_key(SIM_APP_KEY, [b"my/", b"key", b"/path"])
        assert split.private_numbers().private_value == DERIVED_SCALAR

    def test_pkcs8_is_138_bytes(self, leaf_key: ec.EllipticCurvePrivateKey) -> None:
        """The PKCS#8 DER has upstream's 138-byte layout, and the PEM uses LF endings."""
        der = leaf_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert len(der) == 138
        pem = certs.private_key_pem(leaf_key)
        assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")
        assert pem.endswith("-----END PRIVATE KEY-----\n")
        assert "\r" not in pem

    def test_new_tls_key_is_fresh_p256(self) -> None:
        """new_tls_key returns a different P-256 key every call."""
        first, second = new_tls_key(), new_tls_key()
        assert isinstance(first.curve, ec.SECP256R1)
        assert spki_der(first.public_key()) != spki_der(second.public_key())


class TestCertificateAuthority:
    def test_upstream_simulator_ca_loads(self, sim_ca: CertificateAuthority) -> None:
        """The simulator's appkeys CA pair loads and its SPKI is the 14.5 key-provider id."""
        assert sim_ca.spki_der.hex() == SIM_CA_SPKI_HEX
        assert sim_ca.cert.subject.rfc4514_string() == "CN=Dstack KMS CA,O=Dstack"

    def test_cert_pem_round_trips_upstream_text(self, sim_ca: CertificateAuthority) -> None:
        """cert_pem reproduces the appkeys ca_cert text byte for byte."""
        assert sim_ca.cert_pem == _appkeys()["ca_cert"]

    def test_mismatched_key_is_rejected(self) -> None:
        """A key that is not the certificate's is a ConfigurationError."""
        other = certs.private_key_pem(new_tls_key())
        with pytest.raises(ConfigurationError, match="does not match"):
            CertificateAuthority.from_pem(_appkeys()["ca_cert"], other)

    def test_garbage_pem_is_rejected(self) -> None:
        """Unparseable certificate or key PEM is a ConfigurationError."""
        key_pem = _appkeys()["key_provider"]["None"]["key"]
        with pytest.raises(ConfigurationError):
            CertificateAuthority.from_pem("not a cert", key_pem)
        with pytest.raises(ConfigurationError):
            CertificateAuthority.from_pem(_appkeys()["ca_cert"], "not a key")

    def test_non_ca_certificate_is_rejected(self, local_ca: CertificateAuthority) -> None:
        """A certificate with BasicConstraints CA:FALSE cannot be used as a CA."""
        key = new_tls_key()
        cert = (
            x509.CertificateBuilder()
            .serial_number(1)
            .issuer_name(local_ca.cert.subject)
            .subject_name(local_ca.cert.subject)
            .public_key(key.public_key())
            .not_valid_before(NOW)
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(ConfigurationError, match="not marked as a CA"):
            CertificateAuthority(cert=cert, key=key)

    def test_key_is_not_in_repr(self, sim_ca: CertificateAuthority) -> None:
        """The CA private key never appears in repr."""
        assert "key=" not in repr(sim_ca)

    def test_new_app_ca_shape(self, local_ca: CertificateAuthority) -> None:
        """new_app_ca is self-signed with the upstream simulator CA's shape."""
        cert = local_ca.cert
        assert cert.subject.rfc4514_string() == "CN=dstack-core App CA,O=Dstack"
        assert cert.issuer == cert.subject
        assert cert.not_valid_before_utc == datetime(1975, 1, 1, tzinfo=timezone.utc)
        assert cert.not_valid_after_utc == NOW.replace(microsecond=0) + timedelta(days=3650)
        assert cert.serial_number == certs.serial_number_for(local_ca.key.public_key())
        assert [(e.oid, e.critical) for e in cert.extensions] == [
            (ExtensionOID.KEY_USAGE, True),
            (ExtensionOID.SUBJECT_KEY_IDENTIFIER, False),
            (ExtensionOID.BASIC_CONSTRAINTS, True),
        ]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_cert_sign and usage.crl_sign
        assert not usage.key_encipherment
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca and constraints.path_length == 1
        cert.verify_directly_issued_by(cert)

    def test_upstream_ca_follows_the_same_rules(self, sim_ca: CertificateAuthority) -> None:
        """The upstream CA's serial and SKI follow the rules new_app_ca uses."""
        cert = sim_ca.cert
        assert cert.serial_number == certs.serial_number_for(sim_ca.key.public_key())
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski.digest == hashlib.sha256(sim_ca.spki_der).digest()[:20]
        rebuilt = new_app_ca(sim_ca.key, now=NOW, common_name="Dstack KMS CA")
        assert [e.value for e in rebuilt.cert.extensions] == [e.value for e in cert.extensions]

    def test_new_app_ca_requires_aware_now(self) -> None:
        """A naive datetime is a programming error, not silently taken as local time."""
        with pytest.raises(ValueError, match="timezone-aware"):
            new_app_ca(new_tls_key(), now=datetime(2025, 1, 1))


class TestTlsCertificateRequest:
    def test_defaults(self) -> None:
        """The defaults are GetTlsKey's: empty CN, no SANs, usage app:custom."""
        request = TlsCertificateRequest()
        assert request.subject == ""
        assert request.alt_names == ()
        assert request.usage == "app:custom"
        assert request.attestation is None

    def test_alt_names_become_a_tuple(self) -> None:
        """alt_names given as a list are stored as a tuple."""
        request = TlsCertificateRequest(alt_names=["a", "b"])  # type: ignore[arg-type]
        assert request.alt_names == ("a", "b")

    @pytest.mark.parametrize(("before", "after"), [(100, 100), (200, 100)])
    def test_bad_validity_order(self, before: int, after: int) -> None:
        """not_before >= not_after is rejected with the upstream message."""
        with pytest.raises(InvalidRequest, match="^not_before must be earlier than not_after$"):
            TlsCertificateRequest(not_before=before, not_after=after)

    @pytest.mark.parametrize("name", ["bücher.example", "例え.jp", "\u00e9"])
    def test_non_ascii_dns_name(self, name: str) -> None:
        """A SAN that is neither an IP address nor ASCII is an InvalidRequest."""
        with pytest.raises(InvalidRequest, match="ASCII DNS name"):
            TlsCertificateRequest(alt_names=(name,))

    @pytest.mark.parametrize("value", [-1, certs.MAX_CERT_TIMESTAMP + 1])
    def test_timestamp_out_of_range(self, value: int) -> None:
        """Bounds that no certificate time can hold are an InvalidRequest."""
        with pytest.raises(InvalidRequest, match="not_after is out of range"):
            TlsCertificateRequest(not_after=value)

    def test_lone_surrogate_subject(self) -> None:
        """A subject that cannot be UTF-8 encoded is an InvalidRequest."""
        with pytest.raises(InvalidRequest, match="subject"):
            TlsCertificateRequest(subject="\ud800")


class TestIssueCertificate:
    def test_serial_is_derived_from_the_public_point(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """serial = first 20 bytes of SHA-256(04||X||Y) with the top bit cleared."""
        cert = _issue(sim_ca, leaf_key)
        point = leaf_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert len(point) == 65
        expected = bytearray(hashlib.sha256(point).digest()[:20])
        expected[0] &= 0x7F
        assert cert.serial_number == int.from_bytes(expected, "big")
        assert cert.version is x509.Version.v3

    def test_names(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """The issuer is the CA subject and the subject is CN=<subject> only."""
        cert = _issue(sim_ca, leaf_key, subject="app.example.com")
        assert cert.issuer.public_bytes() == sim_ca.cert.subject.public_bytes()
        assert cert.subject.rfc4514_string() == "CN=app.example.com"

    @pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
    def test_empty_subject_is_allowed(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """An empty subject (GetTlsKey's default) gives an empty UTF8String CN."""
        cert = _issue(sim_ca, leaf_key)
        (attribute,) = cert.subject
        assert attribute.oid == NameOID.COMMON_NAME
        assert attribute.value == ""
        assert cert.subject.public_bytes() == bytes.fromhex("300b3109300706035504030c00")

    def test_minimal_extensions(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Without SANs, EKUs or payloads a leaf has KeyUsage and cert-usage only."""
        cert = _issue(sim_ca, leaf_key)
        assert [(e.oid, e.critical) for e in cert.extensions] == [
            (ExtensionOID.KEY_USAGE, True),
            (OID_CERT_USAGE, False),
        ]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage == x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    def test_full_extension_order(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """SAN, KeyUsage, EKU, app-id, app-info, cert-usage, attestation; no SKI/AKI/BC."""
        cert = _issue(
            sim_ca,
            leaf_key,
            alt_names=("a.example",),
            usage_server_auth=True,
            usage_client_auth=True,
            attestation=b"att",
            app_info=b"info",
            app_id=bytes(20),
        )
        assert [(e.oid, e.critical) for e in cert.extensions] == [
            (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False),
            (ExtensionOID.KEY_USAGE, True),
            (ExtensionOID.EXTENDED_KEY_USAGE, False),
            (OID_APP_ID, False),
            (OID_APP_INFO, False),
            (OID_CERT_USAGE, False),
            (OID_ATTESTATION, False),
        ]

    @pytest.mark.parametrize(
        ("server", "client", "expected"),
        [
            (True, False, [ExtendedKeyUsageOID.SERVER_AUTH]),
            (False, True, [ExtendedKeyUsageOID.CLIENT_AUTH]),
            (True, True, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ],
    )
    def test_eku_order(
        self,
        sim_ca: CertificateAuthority,
        leaf_key: ec.EllipticCurvePrivateKey,
        server: bool,
        client: bool,
        expected: list[x509.ObjectIdentifier],
    ) -> None:
        """EKU lists serverAuth before clientAuth, only those requested, non-critical."""
        cert = _issue(sim_ca, leaf_key, usage_server_auth=server, usage_client_auth=client)
        extension = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert not extension.critical
        assert list(extension.value) == expected

    def test_san_types(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """IPv4 and IPv6 literals become iPAddress, everything else dNSName, in order."""
        names = ("1.2.3.4", "::1", "app.example.com", "*.example.com", "fe80::1%eth0", "01.2.3.4")
        cert = _issue(sim_ca, leaf_key, alt_names=names)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert not san.critical
        assert list(san.value) == [
            x509.IPAddress(ipaddress.IPv4Address("1.2.3.4")),
            x509.IPAddress(ipaddress.IPv6Address("::1")),
            x509.DNSName("app.example.com"),
            x509.DNSName("*.example.com"),
            x509.DNSName("fe80::1%eth0"),
            x509.DNSName("01.2.3.4"),
        ]

    def test_custom_extensions_are_double_wrapped(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Each RA-TLS extnValue is DER OCTET STRING{payload}, also in long form."""
        attestation = bytes(range(256)) * 40
        cert = _issue(
            sim_ca, leaf_key, attestation=attestation, app_info=b"\x99", app_id=b"\x11" * 20
        )
        values = {
            e.oid: e.value.value
            for e in cert.extensions
            if isinstance(e.value, x509.UnrecognizedExtension)
        }
        assert values == {
            OID_APP_ID: _der_octet_string(b"\x11" * 20),
            OID_APP_INFO: _der_octet_string(b"\x99"),
            OID_CERT_USAGE: _der_octet_string(b"app:custom"),
            OID_ATTESTATION: _der_octet_string(attestation),
        }
        assert values[OID_ATTESTATION][:4] == bytes.fromhex("04822800")
        # In the certificate itself the extnValue is a further OCTET STRING.
        assert b"\x04\x0c\x04\x0aapp:custom" in cert.tbs_certificate_bytes

    def test_default_validity(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Without bounds: 1975-01-01T00:00:00Z until now + 3650 days (whole seconds)."""
        cert = _issue(sim_ca, leaf_key)
        assert cert.not_valid_before_utc == datetime(1975, 1, 1, tzinfo=timezone.utc)
        assert cert.not_valid_after_utc == datetime(2035, 5, 30, 12, 30, 45, tzinfo=timezone.utc)

    def test_explicit_validity(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Explicit unix-second bounds are used as given, including GeneralizedTime years."""
        after = int(datetime(2100, 1, 1, tzinfo=timezone.utc).timestamp())
        cert = _issue(sim_ca, leaf_key, not_before=1_700_000_000, not_after=after)
        assert cert.not_valid_before_utc.timestamp() == 1_700_000_000
        assert cert.not_valid_after_utc.timestamp() == after

    def test_only_not_after_before_default_start(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """A lone not_after earlier than the 1975 default start is an InvalidRequest."""
        with pytest.raises(InvalidRequest, match="not_before must be earlier"):
            _issue(sim_ca, leaf_key, not_after=100)

    def test_chain_verifies_under_the_ca(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """The leaf is ECDSA-SHA256 signed by the CA and [leaf, CA] verifies."""
        cert = _issue(sim_ca, leaf_key, subject="x")
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha256"
        assert isinstance(cert.signature_algorithm_parameters, ec.ECDSA)
        verify_chain([cert, sim_ca.cert])

    def test_local_ca_chain(self, local_ca: CertificateAuthority) -> None:
        """A leaf of a new_app_ca CA verifies through the CA up to itself."""
        cert = _issue(local_ca, new_tls_key())
        verify_chain([cert, local_ca.cert, local_ca.cert])


class TestRaTlsCertificate:
    def test_round_trip(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Every payload written by issue_certificate reads back unchanged."""
        attestation = b"\x01" * 9504
        cert = _issue(
            sim_ca, leaf_key, attestation=attestation, app_info=b"\x99info", app_id=b"\x22" * 20
        )
        parsed = RaTlsCertificate.from_certificate(cert)
        assert parsed.certificate == cert
        assert parsed.spki_der == DERIVED_SPKI
        assert parsed.attestation == attestation
        assert parsed.app_info == b"\x99info"
        assert parsed.app_id == b"\x22" * 20
        assert parsed.usage == "app:custom"
        assert parsed.legacy_quote is None
        assert parsed.legacy_event_log is None
        assert parsed.expected_report_data == DERIVED_RATLS_REPORT_DATA

    def test_absent_extensions_are_none(self, sim_ca: CertificateAuthority) -> None:
        """A plain CA certificate has no RA-TLS payloads."""
        parsed = RaTlsCertificate.from_certificate(sim_ca.cert)
        assert parsed.attestation is None and parsed.usage is None and parsed.app_id is None

    def _with_extensions(
        self, ca: CertificateAuthority, extensions: list[tuple[x509.ObjectIdentifier, bytes]]
    ) -> x509.Certificate:
        key = new_tls_key()
        builder = (
            x509.CertificateBuilder()
            .serial_number(1)
            .issuer_name(ca.cert.subject)
            .subject_name(x509.Name([]))
            .public_key(key.public_key())
            .not_valid_before(NOW)
            .not_valid_after(NOW + timedelta(days=1))
        )
        for oid, value in extensions:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
        return builder.sign(ca.key, hashes.SHA256())

    def test_legacy_extensions(self, local_ca: CertificateAuthority) -> None:
        """Legacy .1.1 quote and .1.2 event log (plain or ELGZv1 gzip) are read."""
        log = b'[{"imr":3}]'
        for stored in (log, b"ELGZv1" + gzip.compress(log)):
            cert = self._with_extensions(
                local_ca,
                [
                    (OID_LEGACY_TDX_QUOTE, _der_octet_string(b"quote")),
                    (OID_LEGACY_EVENT_LOG, _der_octet_string(stored)),
                ],
            )
            parsed = RaTlsCertificate.from_certificate(cert)
            assert parsed.legacy_quote == b"quote"
            assert parsed.legacy_event_log == log
            assert parsed.attestation is None

    def test_gzip_bomb_is_rejected(self, local_ca: CertificateAuthority) -> None:
        """A compressed legacy event log over 16 KiB is malformed evidence."""
        stored = b"ELGZv1" + gzip.compress(b"[" + b" " * (16 * 1024) + b"]")
        cert = self._with_extensions(local_ca, [(OID_LEGACY_EVENT_LOG, _der_octet_string(stored))])
        with pytest.raises(EvidenceError, match="16 KiB"):
            RaTlsCertificate.from_certificate(cert)

    @pytest.mark.parametrize(
        "value",
        [
            b"",
            b"\x0c\x03abc",
            b"\x04\x04abc",
            b"\x04\x02abc",
            b"\x04\x81\x03abc",
            b"\x04\x80abc",
        ],
        ids=["empty", "wrong-tag", "short", "trailing", "non-minimal", "indefinite"],
    )
    def test_malformed_wrapping(self, local_ca: CertificateAuthority, value: bytes) -> None:
        """An RA-TLS value that is not exactly one DER OCTET STRING is malformed evidence."""
        cert = self._with_extensions(local_ca, [(OID_ATTESTATION, value)])
        with pytest.raises(EvidenceError):
            RaTlsCertificate.from_certificate(cert)

    def test_non_utf8_usage(self, local_ca: CertificateAuthority) -> None:
        """A cert-usage payload that is not UTF-8 is malformed evidence."""
        cert = self._with_extensions(local_ca, [(OID_CERT_USAGE, _der_octet_string(b"\xff"))])
        with pytest.raises(EvidenceError, match="UTF-8"):
            RaTlsCertificate.from_certificate(cert)


class TestLoadCertificateChain:
    def test_pem_chain(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Concatenated PEM (bytes or str) gives every certificate in order."""
        leaf = _issue(sim_ca, leaf_key)
        text = certs.cert_pem(leaf) + sim_ca.cert_pem
        assert load_certificate_chain(text.encode()) == [leaf, sim_ca.cert]
        assert load_certificate_chain(text) == [leaf, sim_ca.cert]

    def test_der_single(self, sim_ca: CertificateAuthority) -> None:
        """A DER blob is one certificate."""
        der = sim_ca.cert.public_bytes(serialization.Encoding.DER)
        assert load_certificate_chain(der) == [sim_ca.cert]

    @pytest.mark.parametrize(
        "data",
        [b"", b"garbage", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----\nAAAA\n"],
        ids=["empty", "text", "bad-der", "bad-pem"],
    )
    def test_garbage(self, data: bytes) -> None:
        """Anything that is not a certificate is malformed evidence."""
        with pytest.raises(EvidenceError):
            load_certificate_chain(data)

    def test_der_with_trailing_bytes(self, sim_ca: CertificateAuthority) -> None:
        """Trailing bytes after a DER certificate are malformed evidence."""
        with pytest.raises(EvidenceError):
            load_certificate_chain(sim_ca.cert.public_bytes(serialization.Encoding.DER) + b"\0")


class TestVerifyChain:
    def test_wrong_issuer_names_the_link(
        self,
        sim_ca: CertificateAuthority,
        local_ca: CertificateAuthority,
        leaf_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        """A leaf presented under the wrong CA fails at link 0."""
        leaf = _issue(sim_ca, leaf_key)
        with pytest.raises(EvidenceError, match="^certificate 0 is not issued by certificate 1"):
            verify_chain([leaf, local_ca.cert])

    def test_forged_signature(
        self, sim_ca: CertificateAuthority, leaf_key: ec.EllipticCurvePrivateKey
    ) -> None:
        """Same issuer name but a different signing key fails at the right link."""
        impostor = CertificateAuthority(
            cert=new_app_ca(leaf_key, now=NOW, common_name="Dstack KMS CA").cert, key=leaf_key
        )
        leaf = _issue(impostor, new_tls_key())
        with pytest.raises(EvidenceError, match="^certificate 1 is not issued by certificate 2"):
            verify_chain([leaf, impostor.cert, sim_ca.cert])

    def test_empty_chain(self) -> None:
        """An empty chain is malformed evidence."""
        with pytest.raises(EvidenceError, match="empty"):
            verify_chain([])
