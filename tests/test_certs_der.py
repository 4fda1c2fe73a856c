"""The hand-encoded leaf (certs.issue_certificate) against cryptography's x509 builder.

The builder is the oracle: for every request shape, the TBSCertificate we encode must be
byte for byte the one cryptography's CertificateBuilder writes for the same values, the
signature must verify under the CA. dstack_core.der's
primitives are pinned to known encodings here too.
"""

from __future__ import annotations

import ipaddress
import warnings
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core import certs, der
from dstack_core.certs import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_CERT_USAGE,
    CertificateAuthority,
    TlsCertificateRequest,
    derive_p256_key,
    new_app_ca,
)
from dstack_core.errors import InvalidRequest

NOW = datetime(2025, 6, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)
P256_CA = new_app_ca(derive_p256_key(b"\x02" * 32, [b"ca"]), now=NOW)
P384_CA = new_app_ca(ec.derive_private_key(0x1234567, ec.SECP384R1()), now=NOW,
                     common_name="P-384 CA", org="Ünïcode Org")
LEAF = derive_p256_key(b"\x03" * 32, [b"leaf"]).public_key()


def _builder_certificate(
    ca: CertificateAuthority, public_key: ec.EllipticCurvePublicKey,
    request: TlsCertificateRequest, now: datetime,
) -> x509.Certificate:
    """The same leaf through cryptography's object model (the implementation before the
    hand encoder; kept here as its oracle)."""
    now = now.astimezone(timezone.utc).replace(microsecond=0)
    not_before = (certs.DEFAULT_NOT_BEFORE if request.not_before is None
                  else datetime.fromtimestamp(request.not_before, timezone.utc))
    not_after = (now + certs.DEFAULT_VALIDITY if request.not_after is None
                 else datetime.fromtimestamp(request.not_after, timezone.utc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CNs outside 1..64 characters
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, request.subject, _validate=False)]
        if request.org_name is not None:
            attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, request.org_name))
    builder = (
        x509.CertificateBuilder()
        .serial_number(certs.serial_number_for(public_key))
        .issuer_name(ca.cert.subject)
        .subject_name(x509.Name(attributes))
        .public_key(public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if request.alt_names:
        names: list[x509.GeneralName] = []
        for name in request.alt_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                      crl_sign=False, encipher_only=False, decipher_only=False),
        critical=True,
    )
    usages = [oid for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, request.usage_server_auth),
                                      (ExtendedKeyUsageOID.CLIENT_AUTH, request.usage_client_auth))
              if wanted]
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    for oid, payload in ((OID_APP_ID, request.app_id), (OID_APP_INFO, request.app_info),
                         (OID_CERT_USAGE, None if request.usage is None
                          else request.usage.encode("utf-8")),
                         (OID_ATTESTATION, request.attestation)):
        if payload is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(oid, der.octet_string(payload)), critical=False)
    return builder.sign(ca.key, certs._ca_hash(ca.key))


def _assert_same(ca: CertificateAuthority, request: TlsCertificateRequest,
                 now: datetime = NOW) -> None:
    ours = certs.issue_certificate(ca, LEAF, request, now=now)
    oracle = _builder_certificate(ca, LEAF, request, now)
    assert ours.tbs_certificate_bytes == oracle.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == oracle.signature_algorithm_oid
    ours.verify_directly_issued_by(ca.cert)
    # The outer SEQUENCE: the oracle's signatureAlgorithm (a short TLV after its TBS), then
    # our signature as a BIT STRING with no unused bits.
    oracle_der = oracle.public_bytes(serialization.Encoding.DER)
    start = oracle_der.index(oracle.tbs_certificate_bytes) + len(oracle.tbs_certificate_bytes)
    algorithm = oracle_der[start : start + 2 + oracle_der[start + 1]]
    signature = bytes((0x03, len(ours.signature) + 1, 0)) + ours.signature
    body = ours.tbs_certificate_bytes + algorithm + signature
    assert ours.public_bytes(serialization.Encoding.DER) == der.sequence(body)


@pytest.mark.parametrize("ca", [P256_CA, P384_CA], ids=["p256", "p384"])
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"subject": "bench", "alt_names": ("localhost",), "usage_server_auth": True},
        {"subject": "", "usage_client_auth": True, "usage": None},
        {"subject": "x" * 300, "org_name": "Dstack", "usage_server_auth": True,
         "usage_client_auth": True},
        {"subject": "名前 ü", "alt_names": ("10.0.0.1", "::1", "fe80::1", "a.example",
                                            "1.2.3", "2001:db8::ff00:42:8329")},
        {"app_id": b"\x11" * 20, "app_info": b"\x99", "usage": "app:ca",
         "attestation": b"\x00" * 127},
        {"attestation": b"\x01" * 128, "app_info": b""},
        {"attestation": b"\x02" * 255, "usage": "ünï"},
        {"attestation": b"\x03" * 256},
        {"attestation": b"\x04" * 70_000},
        {"not_before": 0, "not_after": certs.MAX_CERT_TIMESTAMP},
        {"not_before": 2_524_607_999, "not_after": 2_524_608_000},  # 2049 -> 2050
        {"not_after": 315_532_800},  # 1980: only the bound given, the default start before it
        {"not_before": 4_102_444_800},  # 2100: GeneralizedTime, default end (2035) refused below
    ],
)
def test_leaf_is_the_builders_leaf(ca: CertificateAuthority, fields: dict[str, object]) -> None:
    request = TlsCertificateRequest(**fields)  # type: ignore[arg-type]
    if request.not_before is not None and request.not_after is None:
        with pytest.raises(InvalidRequest):  # the default end precedes the given start
            certs.issue_certificate(ca, LEAF, request, now=NOW)
        request = TlsCertificateRequest(**fields, not_after=request.not_before + 1)  # type: ignore[arg-type]
    _assert_same(ca, request)


@settings(max_examples=60, deadline=None)
@given(
    subject=st.text(max_size=80),
    alt_names=st.lists(st.one_of(
        st.from_regex(r"[a-z0-9*.-]{1,30}", fullmatch=True),
        st.ip_addresses().map(str)), max_size=4),
    server=st.booleans(),
    client=st.booleans(),
    attestation=st.one_of(st.none(), st.binary(max_size=600)),
    not_after=st.one_of(st.none(), st.integers(157_766_400, certs.MAX_CERT_TIMESTAMP)),
    days=st.integers(-40_000, 40_000),
)
def test_any_request_is_the_builders_leaf(
    subject: str, alt_names: list[str], server: bool, client: bool,
    attestation: bytes | None, not_after: int | None, days: int,
) -> None:
    try:
        request = TlsCertificateRequest(
            subject=subject, alt_names=alt_names, usage_server_auth=server,
            usage_client_auth=client, attestation=attestation, not_after=not_after,
        )
    except InvalidRequest:
        return  # e.g. a lone surrogate in the subject: refused before any encoding
    now = NOW + timedelta(days=days)
    try:
        _assert_same(P256_CA, request, now)
    except InvalidRequest:
        # Only a default bound can cross the other: here the default notAfter (now + 10
        # years) against the default notBefore (1975), or an explicit notAfter before 1975.
        end = now + certs.DEFAULT_VALIDITY if not_after is None else datetime.fromtimestamp(
            not_after, timezone.utc)
        assert end < certs.DEFAULT_NOT_BEFORE


def test_validity_crossing_default_start_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        certs.issue_certificate(P256_CA, LEAF, TlsCertificateRequest(not_after=100), now=NOW)


class TestDer:
    @pytest.mark.parametrize(("value", "encoded"), [
        (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"),
        (256, "02020100"), (-1, "0201ff"), (-128, "020180"), (-129, "0202ff7f"),
    ])
    def test_integer(self, value: int, encoded: str) -> None:
        assert der.integer(value).hex() == encoded

    @pytest.mark.parametrize(("dotted", "encoded"), [
        ("1.2.840.10045.4.3.2", "06082a8648ce3d040302"),
        ("2.5.29.17", "0603551d11"),
        ("1.3.6.1.5.5.7.3.1", "06082b06010505070301"),
        ("2.999.3", "0603883703"),
    ])
    def test_oid(self, dotted: str, encoded: str) -> None:
        assert der.oid(dotted).hex() == encoded

    @pytest.mark.parametrize("dotted", ["1", "3.1", "1.40", "1.-2.3", "a.b"])
    def test_oid_rejects(self, dotted: str) -> None:
        with pytest.raises(ValueError):
            der.oid(dotted)

    @pytest.mark.parametrize(("size", "header"), [
        (0, "0400"), (127, "047f"), (128, "048180"), (255, "0481ff"), (256, "04820100"),
        (65_536, "0483010000"),
    ])
    def test_lengths(self, size: int, header: str) -> None:
        assert der.octet_string(bytes(size)).hex().startswith(header)
        assert len(der.octet_string(bytes(size))) == size + len(header) // 2

    @pytest.mark.parametrize(("moment", "encoded"), [
        (datetime(1975, 1, 1, tzinfo=timezone.utc), b"\x17\x0d750101000000Z"),
        (datetime(2049, 12, 31, 23, 59, 59, 999, tzinfo=timezone.utc), b"\x17\x0d491231235959Z"),
        (datetime(2050, 1, 1, tzinfo=timezone.utc), b"\x18\x0f20500101000000Z"),
        (datetime(1949, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2))),
         b"\x17\x0d500101010000Z"),
        (datetime(1949, 12, 31, 23, 0, tzinfo=timezone.utc), b"\x18\x0f19491231230000Z"),
    ])
    def test_time(self, moment: datetime, encoded: bytes) -> None:
        assert der.time(moment) == encoded

    def test_naive_time_is_refused(self) -> None:
        with pytest.raises(ValueError):
            der.time(datetime(2020, 1, 1))
