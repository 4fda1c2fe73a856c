"""A deterministic mock of AMD's SEV-SNP key hierarchy that signs attestation reports.

The fake SEV-SNP guest (:mod:`dstack_core.testing.fake_tee`) signs its reports with it, so
that the SEV-SNP platform's evidence verifies end to end -- but only when the verifier is
explicitly given this PKI's root (and allows a test root), never against AMD's ARKs. Every
subject says "Mock", so nobody mistakes it for AMD's.

The hierarchy has AMD's shape: a self-signed **ARK** signs an **ASK**, which signs one
**VCEK** per chip and TCB, with the VCEK's X.509 extensions exactly as AMD's KDS issues
them (``1.3.6.1.4.1.3704.1.*``: struct version, product name, one INTEGER per TCB
component, the raw hardware id), per product: Milan and Genoa (TCB bytes boot loader, TEE,
four reserved, SNP, microcode; 64-byte hwID) and Turin (FMC, boot loader, TEE, SNP, three
reserved, microcode; FMC as extension ``...3.9``; 8-byte hwID). One deliberate difference:
AMD signs certificates with RSASSA-PSS under RSA-4096 keys; this PKI uses ECDSA P-384 with
SHA-384, so that certificates are deterministic (RFC 6979) and cheap to derive.

Determinism is the contract that makes trust bundles work: :meth:`MockAmdPki.from_seed`
with the same 32-byte seed and product yields byte-identical ARK, ASK, VCEK certificates
and CRL in any process. Keys are derived from the seed with HKDF-SHA256 under distinct
labels (a VCEK's from its chip id and TCB, as AMD's firmware derives it from the chip
secret and the TCB). Only report signatures are random, as the firmware's are.

The layouts are written out here from AMD's KDS specification as the project notes
record it, independently of the SEV-SNP plugin's verifier, so the two check each other.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from . import der
from .snp import CHIP_ID_OFFSET, CHIP_ID_SIZE, REPORT_SIZE, REPORTED_TCB_OFFSET, SIGNED_SIZE
from .snp import encode_signature as _encode_signature
from .types import TrustBundle

__all__ = [
    "MOCK_PRODUCTS",
    "SEED_SIZE",
    "MockAmdPki",
    "MockProduct",
    "mock_chip_id",
]

SEED_SIZE: Final = 32

_HKDF_SALT: Final = b"dstack-core mock amd pki v1"
_CURVE: Final = ec.SECP384R1()
_P384_ORDER: Final = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)
_NOT_BEFORE: Final = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER: Final = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
_ORGANIZATION: Final = "dstack-core Mock AMD PKI (not AMD)"
_OID_ARC: Final = "1.3.6.1.4.1.3704.1"
_COLLATERAL_FORMAT: Final = "dstack-core/sev-snp-collateral"


@attrs.frozen(kw_only=True)
class MockProduct:
    """How one EPYC generation's hierarchy and reports look.

    :ivar name: the KDS product name.
    :ivar product_name: the VCEK's ``productName`` extension.
    :ivar struct_version: the VCEK's ``structVersion`` extension.
    :ivar cpuid: family, model, stepping for version 3+ reports.
    :ivar tcb: ``(component, byte in TCB_VERSION, n of extension ...1.3.n)``; every
        extension AMD's VCEKs of this product carry, in AMD's order.
    :ivar hwid_size: bytes of CHIP_ID in the VCEK's hwID.
    """

    name: str
    product_name: str
    struct_version: int
    cpuid: tuple[int, int, int]
    tcb: tuple[tuple[str, int | None, int], ...]
    hwid_size: int


MOCK_PRODUCTS: Final[Mapping[str, MockProduct]] = {
    p.name: p
    for p in (
        MockProduct(
            name="Milan", product_name="Milan-B0", struct_version=0, cpuid=(0x19, 0x01, 0x01),
            tcb=(("bootloader", 0, 1), ("tee", 1, 2), ("spl4", 2, 4), ("spl5", 3, 5),
                 ("spl6", 4, 6), ("spl7", 5, 7), ("snp", 6, 3), ("microcode", 7, 8)),
            hwid_size=CHIP_ID_SIZE,
        ),
        MockProduct(
            name="Genoa", product_name="Genoa-B1", struct_version=0, cpuid=(0x19, 0x11, 0x01),
            tcb=(("bootloader", 0, 1), ("tee", 1, 2), ("spl4", 2, 4), ("spl5", 3, 5),
                 ("spl6", 4, 6), ("spl7", 5, 7), ("snp", 6, 3), ("microcode", 7, 8)),
            hwid_size=CHIP_ID_SIZE,
        ),
        MockProduct(
            name="Turin", product_name="Turin", struct_version=1, cpuid=(0x1A, 0x02, 0x01),
            tcb=(("fmc", 0, 9), ("bootloader", 1, 1), ("tee", 2, 2), ("snp", 3, 3),
                 ("spl5", None, 5), ("spl6", None, 6), ("spl7", None, 7), ("microcode", 7, 8)),
            hwid_size=8,
        ),
    )
}
"""The products the mock can be, by KDS name. Turin's reserved TCB bytes have no
extension of their own; its VCEKs carry ``spl5``..``spl7`` as zero, as AMD's do."""


def mock_chip_id(seed: bytes, product: str = "Milan") -> bytes:
    """A 64-byte CHIP_ID of ``product``'s shape derived from ``seed`` (Turin: 8 bytes set)."""
    size = MOCK_PRODUCTS[product].hwid_size
    return _hkdf(seed, b"chip-id", 64)[:size].ljust(CHIP_ID_SIZE, b"\0")


def _hkdf(seed: bytes, label: bytes, length: int = 48) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=label).derive(seed)


def _derive_key(seed: bytes, label: bytes) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(_hkdf(seed, b"key:" + label, 64), "big") % (_P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, _CURVE)


def _serial(seed: bytes, label: bytes) -> int:
    return int.from_bytes(_hkdf(seed, b"serial:" + label, 16), "big") >> 1 | 1


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _tcb_parts(product: MockProduct, tcb: int) -> dict[str, int]:
    return {
        name: 0 if byte is None else (tcb >> (8 * byte)) & 0xFF for name, byte, _ in product.tcb
    }


@attrs.frozen(kw_only=True, eq=False)
class MockAmdPki:
    """A seeded mock of one product's AMD SEV-SNP hierarchy. Build with :meth:`from_seed`.

    :ivar product: the :class:`MockProduct` it mimics.
    :ivar ark_pem: the self-signed root: the trust anchor verifiers must be given.
    :ivar ask_pem: the intermediate that signs every VCEK.
    """

    product: MockProduct
    ark_pem: bytes = attrs.field(repr=False)
    ask_pem: bytes = attrs.field(repr=False)
    _seed: bytes = attrs.field(repr=False, alias="seed")
    _ark_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, alias="ark_key")
    _ask_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, alias="ask_key")

    @classmethod
    def from_seed(cls, seed: bytes, *, product: str = "Milan") -> MockAmdPki:
        """Derive the hierarchy from a 32-byte seed, byte-identically in every process.

        :param product: a :data:`MOCK_PRODUCTS` name.
        :raises ValueError: the seed is not 32 bytes, or an unknown product.
        """
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise ValueError(f"mock AMD PKI seed must be {SEED_SIZE} bytes")
        if product not in MOCK_PRODUCTS:
            raise ValueError(f"unknown mock product {product!r}; known: {', '.join(MOCK_PRODUCTS)}")
        return _build(seed, product)

    @property
    def ark_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.ark_pem).public_bytes(serialization.Encoding.DER)

    def _label(self, what: str) -> bytes:
        return f"{self.product.name}:{what}".encode()

    def vcek_key(self, chip_id: bytes, tcb: int) -> ec.EllipticCurvePrivateKey:
        """The VCEK private key of ``chip_id`` at ``tcb`` (a TCB_VERSION word)."""
        return _derive_key(self._seed, self._label("vcek:") + chip_id + tcb.to_bytes(8, "little"))

    def vcek_pem(self, chip_id: bytes, tcb: int) -> bytes:
        """The VCEK certificate of ``chip_id`` at ``tcb``, as the KDS would issue it (PEM).

        :raises ValueError: ``chip_id`` is not 64 bytes.
        """
        return _vcek(self, bytes(chip_id), tcb)

    def sign_report(self, report: bytes) -> bytes:
        """``report`` with its signature field set: ECDSA P-384/SHA-384 over bytes
        ``0x000..0x29F`` by the VCEK of the report's CHIP_ID and REPORTED_TCB (random
        nonce, as the firmware's).

        :raises ValueError: not 1184 bytes.
        """
        if len(report) != REPORT_SIZE:
            raise ValueError(f"an SNP report is {REPORT_SIZE} bytes, got {len(report)}")
        chip_id = report[CHIP_ID_OFFSET : CHIP_ID_OFFSET + CHIP_ID_SIZE]
        tcb = int.from_bytes(report[REPORTED_TCB_OFFSET : REPORTED_TCB_OFFSET + 8], "little")
        der = self.vcek_key(chip_id, tcb).sign(report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
        return report[:SIGNED_SIZE] + _encode_signature(*decode_dss_signature(der))

    def crl_pem(self, revoked_serials: Sequence[int] = (), *,
                last_update: datetime.datetime = _NOT_BEFORE,
                next_update: datetime.datetime = _NOT_AFTER) -> bytes:
        """A CRL signed by the ARK, as the KDS's ``crl`` endpoint serves (PEM here)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(_name(f"Mock ARK-{self.product.name}"))
            .last_update(last_update)
            .next_update(next_update)
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(last_update).build()
            )
        crl = builder.sign(self._ark_key, hashes.SHA384(), ecdsa_deterministic=True)
        return crl.public_bytes(serialization.Encoding.PEM)

    def collateral_json(self, chip_id: bytes, tcb: int) -> str:
        """SNP collateral for one chip and TCB: the VCEK, ASK and ARK in the JSON document
        ``dstack-core/sev-snp-collateral`` (version 1; see ``docs/platforms/sev-snp.md``)."""
        doc = {
            "format": _COLLATERAL_FORMAT,
            "version": 1,
            "vcek": [self.vcek_pem(chip_id, tcb).decode()],
            "ask": self.ask_pem.decode(),
            "ark": self.ark_pem.decode(),
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def trust_bundle(self, chip_id: bytes, tcb: int) -> TrustBundle:
        """What a verifier needs for this chip's reports: the ARK as the root, the VCEK and
        ASK as collateral."""
        return TrustBundle(
            root_ca_pem=self.ark_pem, collateral_json=self.collateral_json(chip_id, tcb)
        )


@functools.lru_cache(maxsize=32)
def _build(seed: bytes, product_name: str) -> MockAmdPki:
    product = MOCK_PRODUCTS[product_name]
    ark_key = _derive_key(seed, f"{product_name}:ark".encode())
    ask_key = _derive_key(seed, f"{product_name}:ask".encode())
    ark_name, ask_name = _name(f"Mock ARK-{product_name}"), _name(f"Mock SEV-{product_name}")
    ark = _ca(seed, f"{product_name}:ark", ark_name, ark_key, ark_name, ark_key, path_length=None)
    ask = _ca(seed, f"{product_name}:ask", ask_name, ask_key, ark_name, ark_key, path_length=0)
    return MockAmdPki(
        product=product,
        ark_pem=ark.public_bytes(serialization.Encoding.PEM),
        ask_pem=ask.public_bytes(serialization.Encoding.PEM),
        seed=seed,
        ark_key=ark_key,
        ask_key=ask_key,
    )


def _ca(seed: bytes, label: str, subject: x509.Name, key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
        path_length: int | None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(_serial(seed, label.encode()))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    )
    if issuer_key is not key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA384(), ecdsa_deterministic=True)


@functools.lru_cache(maxsize=256)
def _vcek(pki: MockAmdPki, chip_id: bytes, tcb: int) -> bytes:
    if len(chip_id) != CHIP_ID_SIZE:
        raise ValueError(f"chip_id must be {CHIP_ID_SIZE} bytes")
    product = pki.product
    extensions = [
        (f"{_OID_ARC}.1", der.integer(product.struct_version)),
        (f"{_OID_ARC}.2", der.ia5_string(product.product_name)),
    ]
    parts = _tcb_parts(product, tcb)
    extensions += [
        (f"{_OID_ARC}.3.{spl}", der.integer(parts[name])) for name, _, spl in product.tcb
    ]
    extensions.append((f"{_OID_ARC}.4", chip_id[: product.hwid_size]))
    label = pki._label("vcek:") + chip_id + tcb.to_bytes(8, "little")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("Mock SEV-VCEK"))
        .issuer_name(_name(f"Mock SEV-{product.name}"))
        .public_key(pki.vcek_key(chip_id, tcb).public_key())
        .serial_number(_serial(pki._seed, label))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
    )
    for oid, value in extensions:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    cert = builder.sign(pki._ask_key, hashes.SHA384(), ecdsa_deterministic=True)
    return cert.public_bytes(serialization.Encoding.PEM)
