"""AMD's SEV-SNP key hierarchy: products, the pinned root keys, VCEK certificates, TCB versions.

Each EPYC generation has its own hierarchy: a self-signed **ARK** (AMD Root Key, RSA-4096)
signs an **ASK** (AMD SEV Key), which signs one **VCEK** (Versioned Chip Endorsement Key,
ECDSA P-384) per chip and TCB version; the VCEK signs the chip's attestation reports.
Certificates are signed with RSASSA-PSS, SHA-384, MGF1-SHA-384 and a 48-byte salt.

This module holds the facts and nothing that decides: product table, the three ARKs pinned
by SHA-256 fingerprint (files in ``roots/``, see the package README for their provenance),
the VCEK's X.509 extensions (OIDs ``1.3.6.1.4.1.3704.1.*`` of AMD's KDS specification), and
the per-generation layout of the 64-bit ``TCB_VERSION``. Sources: AMD's *Versioned Chip
Endorsement Key (VCEK) Certificate and KDS Interface Specification* (57230) and the SEV-SNP
firmware ABI, as google/go-sev-guest (``kds/kds.go``) and virtee/sev
(``TcbVersion``, ``Generation``) implement them; certificates from AMD's KDS as both
projects ship them. Checked facts that differ by generation:

* Milan and Genoa: TCB bytes are boot loader, TEE, four reserved, SNP, microcode; the
  VCEK's ``hwID`` is the report's 64-byte ``CHIP_ID``; VCEK struct version 0 and product
  names with a stepping (``Milan-B0``).
* Turin: TCB bytes are FMC, boot loader, TEE, SNP, three reserved, microcode; the FMC
  level is VCEK extension ``...3.9`` (there is no ``...3.4``); ``hwID`` is 8 bytes, the
  first 8 of ``CHIP_ID`` (the rest is zero); struct version 1, product name ``Turin``; KDS
  URLs take an ``fmcSPL`` parameter.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Mapping
from importlib import resources
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from dstack_core.errors import EvidenceError
from dstack_core.snp import CHIP_ID_SIZE

__all__ = [
    "GENOA",
    "MILAN",
    "OID_HWID",
    "OID_PRODUCT_NAME",
    "OID_STRUCT_VERSION",
    "PRODUCTS",
    "TURIN",
    "VCEK_OID_PREFIX",
    "Product",
    "TcbField",
    "TcbVersion",
    "VcekExtensions",
    "amd_ark",
    "amd_arks",
    "fingerprint",
    "load_certificate",
    "product_for_cpuid",
    "product_for_name",
]

VCEK_OID_PREFIX: Final = "1.3.6.1.4.1.3704.1"
"""AMD's arc for the V[CL]EK certificate extensions (KDS spec, "VCEK certificate")."""
OID_STRUCT_VERSION: Final = f"{VCEK_OID_PREFIX}.1"
OID_PRODUCT_NAME: Final = f"{VCEK_OID_PREFIX}.2"
OID_SPL_PREFIX: Final = f"{VCEK_OID_PREFIX}.3"
"""``...3.<n>``: one security patch level per TCB component (INTEGER)."""
OID_HWID: Final = f"{VCEK_OID_PREFIX}.4"
"""The chip's hardware id: raw bytes (AMD omits the OCTET STRING tag)."""
OID_CSP_ID: Final = f"{VCEK_OID_PREFIX}.5"
"""A VLEK's cloud service provider; never in a VCEK."""

_DER_INTEGER: Final = 0x02
_DER_OCTET_STRING: Final = 0x04
_DER_IA5STRING: Final = 0x16
_TCB_BYTES: Final = 8


@attrs.frozen
class TcbField:
    """One component of a ``TCB_VERSION``.

    :ivar name: ``bootloader``, ``tee``, ``snp``, ``microcode``, ``fmc`` or ``spl4``..``spl7``
        (reserved).
    :ivar byte: its byte in the little-endian 64-bit word.
    :ivar spl: ``n`` of its VCEK extension ``1.3.6.1.4.1.3704.1.3.<n>``.
    :ivar kds: its query parameter in KDS VCEK URLs, or None for a reserved component.
    """

    name: str
    byte: int
    spl: int
    kds: str | None = None


_LEGACY_TCB: Final = (
    TcbField("bootloader", 0, 1, "blSPL"),
    TcbField("tee", 1, 2, "teeSPL"),
    TcbField("spl4", 2, 4),
    TcbField("spl5", 3, 5),
    TcbField("spl6", 4, 6),
    TcbField("spl7", 5, 7),
    TcbField("snp", 6, 3, "snpSPL"),
    TcbField("microcode", 7, 8, "ucodeSPL"),
)
_TURIN_TCB: Final = (
    TcbField("fmc", 0, 9, "fmcSPL"),
    TcbField("bootloader", 1, 1, "blSPL"),
    TcbField("tee", 2, 2, "teeSPL"),
    TcbField("snp", 3, 3, "snpSPL"),
    TcbField("microcode", 7, 8, "ucodeSPL"),
)


@attrs.frozen(kw_only=True)
class Product:
    """One EPYC generation's SEV-SNP hierarchy.

    :ivar name: the KDS product name (``Milan``, ``Genoa``, ``Turin``).
    :ivar family: the CPUID family a version 3+ report carries.
    :ivar models: the CPUID models of that family that belong to this product.
    :ivar tcb_fields: the ``TCB_VERSION`` layout. Reserved bytes of Turin's word are not
        listed: AMD's Turin VCEKs do not map them one to one.
    :ivar hwid_size: bytes of ``CHIP_ID`` that identify the chip (the VCEK's ``hwID``).
    :ivar ark_sha256: the SHA-256 of the pinned ARK's DER encoding.
    """

    name: str
    family: int
    models: frozenset[int]
    tcb_fields: tuple[TcbField, ...]
    hwid_size: int
    ark_sha256: str

    def hwid(self, chip_id: bytes) -> bytes:
        """The VCEK ``hwID`` (and KDS URL component) of a report's ``CHIP_ID``."""
        return chip_id[: self.hwid_size]

    def __str__(self) -> str:
        return self.name


MILAN: Final = Product(
    name="Milan",
    family=0x19,
    models=frozenset(range(0x10)),
    tcb_fields=_LEGACY_TCB,
    hwid_size=CHIP_ID_SIZE,
    ark_sha256="69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
)
GENOA: Final = Product(
    name="Genoa",
    family=0x19,
    models=frozenset(range(0x10, 0x20)) | frozenset(range(0xA0, 0xB0)),
    tcb_fields=_LEGACY_TCB,
    hwid_size=CHIP_ID_SIZE,
    ark_sha256="4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
)
TURIN: Final = Product(
    name="Turin",
    family=0x1A,
    models=frozenset(range(0x12)),
    tcb_fields=_TURIN_TCB,
    hwid_size=8,
    ark_sha256="1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
)
PRODUCTS: Final[Mapping[str, Product]] = {p.name: p for p in (MILAN, GENOA, TURIN)}
"""Every product this package knows, by KDS name. Bergamo and Siena parts are Genoa's."""


def product_for_cpuid(family: int, model: int) -> Product | None:
    """The product of a version 3+ report's CPUID family and model, or None."""
    for product in PRODUCTS.values():
        if product.family == family and model in product.models:
            return product
    return None


def product_for_name(product_name: str) -> Product | None:
    """The product of a VCEK's ``productName`` (``Milan-B0``, ``Genoa-B1``, ``Turin``)."""
    return PRODUCTS.get(product_name.split("-", 1)[0])


@attrs.frozen(kw_only=True)
class TcbVersion:
    """A ``TCB_VERSION`` read with a product's layout.

    :ivar raw: the 64-bit word as the report carries it.
    :ivar product: whose layout applies.
    """

    raw: int
    product: Product

    @classmethod
    def from_parts(cls, product: Product, parts: Mapping[str, int]) -> TcbVersion:
        """Compose a TCB from named components (missing ones are zero).

        :raises ValueError: an unknown component or a value outside 0..255.
        """
        fields = {f.name: f for f in product.tcb_fields}
        raw = 0
        for name, value in parts.items():
            if name not in fields:
                raise ValueError(f"{product} TCB has no component {name!r}")
            if not 0 <= value <= 0xFF:
                raise ValueError(f"TCB component {name} must be 0..255, got {value}")
            raw |= value << (8 * fields[name].byte)
        return cls(raw=raw, product=product)

    @property
    def parts(self) -> dict[str, int]:
        """``{component: value}`` in the product's layout order."""
        return {f.name: (self.raw >> (8 * f.byte)) & 0xFF for f in self.product.tcb_fields}

    def kds_query(self) -> str:
        """The KDS VCEK URL's query, e.g. ``blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115``."""
        parts = self.parts
        fields = sorted(
            (f for f in self.product.tcb_fields if f.kds is not None),
            key=lambda f: ("fmc", "bootloader", "tee", "snp", "microcode").index(f.name),
        )
        return "&".join(f"{f.kds}={parts[f.name]}" for f in fields)

    def __str__(self) -> str:
        named = ", ".join(f"{k} {v}" for k, v in self.parts.items() if not k.startswith("spl"))
        return f"{self.raw:#018x} ({named})"


def _der_value(data: bytes, tag: int, what: str) -> bytes:
    """The content of one DER TLV with ``tag`` filling all of ``data``."""
    if len(data) < 2 or data[0] != tag:
        raise EvidenceError(f"VCEK extension {what} is not DER tag {tag:#04x}")
    length, start = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 2 or len(data) < 2 + count:
            raise EvidenceError(f"VCEK extension {what} has a bad DER length")
        length, start = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if start + length != len(data):
        raise EvidenceError(f"VCEK extension {what} has trailing or missing bytes")
    return data[start:]


def _der_small_int(data: bytes, what: str) -> int:
    content = _der_value(data, _DER_INTEGER, what)
    if not 1 <= len(content) <= 2:
        raise EvidenceError(f"VCEK extension {what} is not a small INTEGER")
    value = int.from_bytes(content, "big", signed=True)
    if not 0 <= value <= 0xFF:
        raise EvidenceError(f"VCEK extension {what} is {value}, outside 0..255")
    return value


@attrs.frozen(kw_only=True)
class VcekExtensions:
    """The KDS extensions of a VCEK certificate, parsed strictly.

    :ivar struct_version: ``...1.1`` (0 for Milan/Genoa VCEKs, 1 for Turin's).
    :ivar product_name: ``...1.2``, e.g. ``Milan-B0``.
    :ivar hwid: ``...1.4``, the chip id the VCEK was issued for.
    :ivar spls: ``{n: level}`` for every ``...1.3.<n>`` present.
    """

    struct_version: int
    product_name: str
    hwid: bytes
    spls: Mapping[int, int]

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> VcekExtensions:
        """Read the extensions of a VCEK.

        :raises EvidenceError: one is missing, duplicated or malformed, a VLEK's ``CSP_ID``
            is present, or an unknown extension in AMD's arc appears.
        """
        values: dict[str, bytes] = {}
        for extension in cert.extensions:
            oid = extension.oid.dotted_string
            if not oid.startswith(VCEK_OID_PREFIX + "."):
                continue
            value = extension.value
            if not isinstance(value, x509.UnrecognizedExtension):
                raise EvidenceError(f"VCEK extension {oid} is not in AMD's encoding")
            values[oid] = value.value
        if OID_CSP_ID in values:
            raise EvidenceError("the certificate is a VLEK (it names a CSP), not a VCEK")
        for required in (OID_STRUCT_VERSION, OID_PRODUCT_NAME, OID_HWID):
            if required not in values:
                raise EvidenceError(f"the VCEK lacks extension {required}")
        spls: dict[int, int] = {}
        for oid, raw in values.items():
            if oid in (OID_STRUCT_VERSION, OID_PRODUCT_NAME, OID_HWID):
                continue
            prefix, _, minor = oid.rpartition(".")
            if prefix != OID_SPL_PREFIX or not minor.isdigit():
                raise EvidenceError(f"the VCEK carries unknown AMD extension {oid}")
            spls[int(minor)] = _der_small_int(raw, oid)
        try:
            name = _der_value(values[OID_PRODUCT_NAME], _DER_IA5STRING, "productName").decode(
                "ascii"
            )
        except UnicodeDecodeError:
            raise EvidenceError("VCEK productName is not ASCII") from None
        hwid = values[OID_HWID]
        if len(hwid) not in (CHIP_ID_SIZE, TURIN.hwid_size):
            # A future KDS may add the OCTET STRING tag it omits today.
            hwid = _der_value(hwid, _DER_OCTET_STRING, "hwID")
        return cls(
            struct_version=_der_small_int(values[OID_STRUCT_VERSION], "structVersion"),
            product_name=name,
            hwid=bytes(hwid),
            spls=spls,
        )

    def tcb(self, product: Product) -> TcbVersion:
        """The TCB this VCEK was issued for, in ``product``'s layout.

        :raises EvidenceError: a component's extension is missing.
        """
        parts = {}
        for field in product.tcb_fields:
            if field.spl not in self.spls:
                raise EvidenceError(
                    f"the VCEK lacks {field.name} (extension {OID_SPL_PREFIX}.{field.spl})"
                )
            parts[field.name] = self.spls[field.spl]
        return TcbVersion.from_parts(product, parts)


def load_certificate(data: bytes) -> x509.Certificate:
    """One certificate, PEM or DER.

    AMD issues VCEKs with serial number 0, which RFC 5280 forbids and ``cryptography``
    warns about on load; the warning is silenced here, where it is expected.

    :raises EvidenceError: not a certificate.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise EvidenceError(f"not an X.509 certificate: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@functools.cache
def amd_ark(product: Product) -> x509.Certificate:
    """AMD's root key certificate for ``product``, as pinned in this package.

    :raises RuntimeError: the shipped file does not match its pinned fingerprint (a broken
        or tampered installation).
    """
    data = resources.files(__package__).joinpath(f"roots/ark_{product.name.lower()}.pem")
    cert = load_certificate(data.read_bytes())
    if fingerprint(cert) != product.ark_sha256:
        raise RuntimeError(f"the pinned {product} ARK does not match its SHA-256 fingerprint")
    return cert


def amd_arks() -> dict[Product, x509.Certificate]:
    """Every pinned ARK, by product."""
    return {product: amd_ark(product) for product in PRODUCTS.values()}
