"""SEV-SNP collateral: the certificates a verifier needs, from a file, a cache or AMD's KDS.

A report is verified with its chip's **VCEK** certificate and the **ASK** that issued it
(and, optionally, the product's certificate revocation list); the ARK is pinned in
:mod:`.amd` and never taken from collateral. This module does all the I/O of SNP
verification, *before* it, as :mod:`dstack_core.collateral` does for Intel:

* :class:`SnpCollateral` is the value :func:`.verify.verify_report` is handed. It reads
  our JSON document (:data:`COLLATERAL_FORMAT`, what :meth:`SnpCollateral.to_json`
  writes and a trust bundle's ``collateral.json`` holds), a PEM bundle of certificates
  (and a CRL) in any order, one DER certificate, or the host's certificate table (GUID
  table of configfs-tsm ``auxblob`` / ``SNP_GET_EXT_REPORT``).
* :func:`fetch_collateral` asks AMD's Key Distribution Service:
  ``GET {base}/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`` (Turin
  adds ``fmcSPL``; its ``hwid`` is the first 8 bytes of ``CHIP_ID``) answers the VCEK in
  DER, ``GET {base}/vcek/v1/{product}/cert_chain`` the ASK and ARK in PEM, ``.../crl`` the
  CRL in DER. The product comes from the report's CPUID (version 3+), else each product is
  tried in turn.
* :class:`SnpCollateralCache` keeps fetched collateral per chip and TCB (a VCEK never
  changes for a chip and TCB), :class:`SnpCollateralSource` chains file, cache and KDS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dstack_core.errors import ConfigurationError, EvidenceError
from dstack_core.snp import SnpReport
from dstack_core.statefile import atomic_write

from .amd import (
    PRODUCTS,
    TURIN,
    Product,
    TcbVersion,
    VcekExtensions,
    load_certificate,
    product_for_cpuid,
    product_for_name,
)

__all__ = [
    "COLLATERAL_FORMAT",
    "COLLATERAL_VERSION",
    "KDS_URL",
    "MAX_COLLATERAL_SIZE",
    "Fetcher",
    "SnpCollateral",
    "SnpCollateralCache",
    "SnpCollateralSource",
    "cert_chain_url",
    "crl_url",
    "fetch_collateral",
    "http_get",
    "load_collateral_file",
    "products_to_try",
    "vcek_url",
]

COLLATERAL_FORMAT: Final = "dstack-core/sev-snp-collateral"
COLLATERAL_VERSION: Final = 1
KDS_URL: Final = "https://kdsintf.amd.com"
"""AMD's Key Distribution Service."""
MAX_COLLATERAL_SIZE: Final = 1024 * 1024
"""Collateral (a file or one KDS answer) longer than 1 MiB is refused unread."""
KDS_TIMEOUT: Final = 30.0
"""Seconds for one KDS request, connection included."""
KDS_RETRY_AFTER_MAX: Final = 10.0
"""The longest ``Retry-After`` honoured once when the KDS rate-limits (429/503)."""

_PEM_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_CRL: Final = re.compile(
    rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL
)
_CERT_TABLE_ENTRY: Final = struct.Struct("<16sII")
"""The host's certificate table: (GUID, offset, length) entries, an all-zero terminator."""
GUID_VCEK: Final = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
GUID_VLEK: Final = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes
GUID_ASK: Final = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes
GUID_ARK: Final = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes
"""Certificate table GUIDs of AMD's guest-hypervisor communication block spec (56421)."""

Fetcher = Callable[[str], Awaitable[bytes]]
"""``async get(url) -> body``: one HTTP GET answered 200; raises :class:`EvidenceError`
with code ``collateral_unavailable`` otherwise. Injectable for tests."""


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@attrs.frozen(kw_only=True, eq=False)
class SnpCollateral:
    """Certificates (and a CRL) for verifying SNP reports.

    :ivar vceks: VCEK certificates (one per chip and TCB; usually exactly one).
    :ivar ask: the ASK that issued them, or None.
    :ivar ark: the ARK as it was delivered, or None. Informational only: the verifier
        trusts the ARKs pinned in :mod:`.amd` (or roots it is explicitly given).
    :ivar crl: the product's certificate revocation list, or None.
    """

    vceks: tuple[x509.Certificate, ...] = ()
    ask: x509.Certificate | None = None
    ark: x509.Certificate | None = None
    crl: x509.CertificateRevocationList | None = None

    @classmethod
    def from_certificates(
        cls, certificates: Iterable[x509.Certificate],
        crl: x509.CertificateRevocationList | None = None,
    ) -> SnpCollateral:
        """Sort certificates into their roles: self-signed is the ARK, another CA the ASK,
        the rest VCEKs.

        :raises EvidenceError: two different ARKs or ASKs.
        """
        vceks: list[x509.Certificate] = []
        roles: dict[str, x509.Certificate] = {}
        for cert in certificates:
            role = "ARK" if _is_self_signed(cert) else "ASK" if _is_ca(cert) else None
            if role is None:
                if cert not in vceks:
                    vceks.append(cert)
            elif roles.setdefault(role, cert) != cert:
                raise EvidenceError(f"the collateral carries two different {role} certificates")
        return cls(vceks=tuple(vceks), ask=roles.get("ASK"), ark=roles.get("ARK"), crl=crl)

    @classmethod
    def from_bytes(cls, data: bytes) -> SnpCollateral:
        """Read collateral in any of the forms the module docstring lists.

        :raises EvidenceError: oversize, or nothing usable in it.
        """
        if len(data) > MAX_COLLATERAL_SIZE:
            raise EvidenceError(f"SNP collateral is over {MAX_COLLATERAL_SIZE} bytes")
        stripped = data.lstrip()
        if stripped.startswith(b"{"):
            return cls._from_document(stripped)
        if stripped.startswith(b"-----BEGIN"):
            certs = [load_certificate(m.group()) for m in _PEM_CERTIFICATE.finditer(data)]
            crls = [_load_crl(m.group()) for m in _PEM_CRL.finditer(data)]
            if len(crls) > 1:
                raise EvidenceError("SNP collateral carries more than one CRL")
            if not certs:
                raise EvidenceError("SNP collateral PEM holds no certificate")
            return cls.from_certificates(certs, crls[0] if crls else None)
        if data[:1] == b"\x30":
            return cls.from_certificates([load_certificate(data)])
        return cls.from_certificate_table(data)

    @classmethod
    def _from_document(cls, text: bytes) -> SnpCollateral:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise EvidenceError(f"SNP collateral is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != COLLATERAL_FORMAT:
            raise EvidenceError(f"SNP collateral JSON must have format {COLLATERAL_FORMAT!r}")
        if doc.get("version") != COLLATERAL_VERSION:
            raise EvidenceError(
                f"SNP collateral version {doc.get('version')!r} is not {COLLATERAL_VERSION}"
            )
        unknown = set(doc) - {"format", "version", "vcek", "ask", "ark", "crl"}
        if unknown:
            raise EvidenceError(f"SNP collateral has unknown fields {sorted(unknown)}")
        vceks = doc.get("vcek", [])
        if isinstance(vceks, str):
            vceks = [vceks]
        certs: list[x509.Certificate] = []
        for name, values in (("vcek", vceks), ("ask", [doc.get("ask")]), ("ark", [doc.get("ark")])):
            for value in values:
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise EvidenceError(f"SNP collateral {name} must be PEM text")
                certs.append(load_certificate(value.encode()))
        crl = doc.get("crl")
        if crl is not None and not isinstance(crl, str):
            raise EvidenceError("SNP collateral crl must be PEM text")
        collateral = cls.from_certificates(certs, None if crl is None else _load_crl(crl.encode()))
        if len(collateral.vceks) != len(vceks):
            raise EvidenceError("SNP collateral lists a CA certificate as a VCEK")
        return collateral

    @classmethod
    def from_certificate_table(cls, table: bytes) -> SnpCollateral:
        """Read the host's certificate table (configfs ``auxblob``, ``SNP_GET_EXT_REPORT``).

        :raises EvidenceError: a malformed table, a VLEK (not supported), or no certificate.
        """
        certs: list[x509.Certificate] = []
        position = 0
        while True:
            if position + _CERT_TABLE_ENTRY.size > len(table):
                raise EvidenceError("the certificate table has no terminating entry")
            guid, offset, length = _CERT_TABLE_ENTRY.unpack_from(table, position)
            position += _CERT_TABLE_ENTRY.size
            if guid == bytes(16) and offset == 0 and length == 0:
                break
            if length == 0 or offset < position or offset + length > len(table):
                raise EvidenceError("a certificate table entry points outside the table")
            if guid == GUID_VLEK:
                raise EvidenceError("the certificate table carries a VLEK; VLEKs are not supported")
            if guid in (GUID_VCEK, GUID_ASK, GUID_ARK):
                certs.append(load_certificate(table[offset : offset + length].rstrip(b"\0")))
        if not certs:
            raise EvidenceError("the certificate table holds no VCEK, ASK or ARK")
        return cls.from_certificates(certs)

    def merged(self, other: SnpCollateral) -> SnpCollateral:
        """This collateral with ``other``'s pieces added (for collateral fetched in parts)."""
        certs = [*self.vceks, *other.vceks]
        certs += [c for c in (self.ask, other.ask, self.ark, other.ark) if c is not None]
        return SnpCollateral.from_certificates(certs, self.crl or other.crl)

    def vcek_for(self, report: SnpReport) -> x509.Certificate | None:
        """The VCEK to verify ``report`` with: the only one, else the one issued for the
        report's chip (its ``hwID`` a prefix of ``CHIP_ID``) at its reported TCB, else one
        for its chip; None when none fits."""
        if len(self.vceks) == 1:
            return self.vceks[0]
        same_chip = []
        for cert in self.vceks:
            try:
                ext = VcekExtensions.from_certificate(cert)
            except EvidenceError:
                continue
            if ext.hwid and report.chip_id.startswith(ext.hwid):
                product = product_for_name(ext.product_name)
                if product is not None and ext.tcb(product).raw == report.reported_tcb:
                    return cert
                same_chip.append(cert)
        return same_chip[0] if same_chip else None

    def to_json(self) -> str:
        """Our JSON document (:data:`COLLATERAL_FORMAT`), certificates in PEM."""
        doc: dict[str, Any] = {
            "format": COLLATERAL_FORMAT,
            "version": COLLATERAL_VERSION,
            "vcek": [_pem(c) for c in self.vceks],
        }
        if self.ask is not None:
            doc["ask"] = _pem(self.ask)
        if self.ark is not None:
            doc["ark"] = _pem(self.ark)
        if self.crl is not None:
            doc["crl"] = self.crl.public_bytes(serialization.Encoding.PEM).decode()
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise EvidenceError(f"not an X.509 CRL: {exc}") from None


def load_collateral_file(path: Path) -> SnpCollateral:
    """Read SNP collateral from a file (any form :meth:`SnpCollateral.from_bytes` reads).

    :raises ConfigurationError: the file cannot be read.
    :raises EvidenceError: its content is not usable collateral.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_COLLATERAL_SIZE + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read SNP collateral {path}: {exc}") from None
    return SnpCollateral.from_bytes(data)


def vcek_url(product: Product, chip_id: bytes, tcb: TcbVersion, *, base_url: str = KDS_URL) -> str:
    """The KDS URL of the VCEK for ``chip_id`` at ``tcb`` (answered in DER)."""
    hwid = product.hwid(chip_id).hex()
    return f"{base_url.rstrip('/')}/vcek/v1/{product.name}/{hwid}?{tcb.kds_query()}"


def cert_chain_url(product: Product, *, base_url: str = KDS_URL) -> str:
    """The KDS URL of ``product``'s ASK and ARK (PEM, ASK first)."""
    return f"{base_url.rstrip('/')}/vcek/v1/{product.name}/cert_chain"


def crl_url(product: Product, *, base_url: str = KDS_URL) -> str:
    """The KDS URL of ``product``'s certificate revocation list (DER, signed by the ARK)."""
    return f"{base_url.rstrip('/')}/vcek/v1/{product.name}/crl"


class _NotFound(EvidenceError):
    """The KDS answered 404: no such certificate under this product."""


async def http_get(url: str) -> bytes:
    """GET ``url`` (network I/O), honouring one short ``Retry-After`` on 429/503.

    :raises EvidenceError: code ``collateral_unavailable``: unreachable, a status other
        than 200, or a body over :data:`MAX_COLLATERAL_SIZE`.
    """
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=KDS_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(2):
                async with session.get(url, allow_redirects=False) as response:
                    if response.status == 200:
                        body = await response.content.read(MAX_COLLATERAL_SIZE + 1)
                        if len(body) > MAX_COLLATERAL_SIZE:
                            break
                        return body
                    retry_after = response.headers.get("Retry-After", "")
                    if (
                        attempt == 0 and response.status in (429, 503)
                        and retry_after.isdigit() and int(retry_after) <= KDS_RETRY_AFTER_MAX
                    ):
                        await asyncio.sleep(int(retry_after))
                        continue
                    kind = _NotFound if response.status == 404 else EvidenceError
                    raise kind(
                        f"AMD KDS answered {response.status} for {url}",
                        code="collateral_unavailable",
                    )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise EvidenceError(
            f"cannot reach AMD KDS at {url}: {type(exc).__name__}", code="collateral_unavailable"
        ) from None
    raise EvidenceError(f"AMD KDS answer for {url} is too large", code="collateral_unavailable")


def products_to_try(report: SnpReport) -> tuple[Product, ...]:
    """The products whose KDS may know this report's chip: the CPUID's (version 3+), else
    all of them, Turin first when ``CHIP_ID`` has Turin's shape (only 8 bytes set).

    :raises EvidenceError: a version 3+ report of a CPU no known product has.
    """
    fms = report.cpuid_fms
    if fms is not None:
        family, model, _ = fms
        product = product_for_cpuid(family, model)
        if product is None:
            raise EvidenceError(
                f"the report's CPUID family {family:#x} model {model:#x} is no SEV-SNP product "
                f"this verifier knows ({', '.join(PRODUCTS)})"
            )
        return (product,)
    products = tuple(PRODUCTS.values())
    if not any(report.chip_id[TURIN.hwid_size :]):
        products = (TURIN, *(p for p in products if p is not TURIN))
    return products


async def fetch_collateral(
    report: SnpReport,
    *,
    base_url: str = KDS_URL,
    fetcher: Fetcher = http_get,
    with_crl: bool = False,
) -> SnpCollateral:
    """Fetch the VCEK and ASK for ``report`` (and the CRL if asked) from AMD's KDS.

    :raises EvidenceError: ``CHIP_ID`` is masked (the KDS cannot be asked), no product's
        KDS knows the chip, or a request fails (code ``collateral_unavailable``).
    """
    if not any(report.chip_id):
        raise EvidenceError(
            "the report's CHIP_ID is masked (all zero): AMD KDS cannot be asked for its VCEK; "
            "give the VCEK and ASK as a collateral file",
            code="collateral_unavailable",
        )
    misses = []
    for product in products_to_try(report):
        tcb = TcbVersion(raw=report.reported_tcb, product=product)
        try:
            vcek = load_certificate(await fetcher(vcek_url(product, report.chip_id, tcb,
                                                           base_url=base_url)))
        except _NotFound as exc:
            misses.append(f"{product}: {exc.message}")
            continue
        chain = SnpCollateral.from_bytes(await fetcher(cert_chain_url(product, base_url=base_url)))
        collateral = SnpCollateral.from_certificates([vcek]).merged(chain)
        if with_crl:
            crl = _load_crl(await fetcher(crl_url(product, base_url=base_url)))
            collateral = attrs.evolve(collateral, crl=crl)
        return collateral
    raise EvidenceError(
        f"AMD KDS has no VCEK for this chip at its reported TCB: {'; '.join(misses)}",
        code="collateral_unavailable",
    )


def cache_key(report: SnpReport) -> str:
    """The cache entry of a report's collateral: its chip and reported TCB."""
    digest = hashlib.sha256(report.chip_id + report.reported_tcb.to_bytes(8, "little"))
    return f"snp-{digest.hexdigest()[:40]}"


_CACHE_FORMAT: Final = "dstack-core/sev-snp-collateral-cache"


@attrs.frozen(kw_only=True)
class SnpCollateralCache:
    """Fetched SNP collateral on disk, one file per chip and reported TCB.

    VCEKs and ASKs do not change for a chip and TCB, so entries do not expire; an entry
    with a CRL is used only while the CRL is current at the verification time. Writes are
    atomic, so several verifier processes may share the directory.

    :ivar directory: created on first write.
    """

    directory: Path

    def get(self, report: SnpReport, *, now: int, with_crl: bool = False) -> SnpCollateral | None:
        """The cached collateral for ``report``, or None (a corrupt entry counts as absent)."""
        try:
            doc = json.loads((self.directory / f"{cache_key(report)}.json").read_text())
            if doc.get("format") != _CACHE_FORMAT:
                return None
            collateral = SnpCollateral.from_bytes(doc["collateral"].encode())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EvidenceError):
            return None
        if with_crl:
            crl = collateral.crl
            if crl is None or not _crl_current(crl, now):
                return None
        return collateral

    def put(self, report: SnpReport, collateral: SnpCollateral) -> None:
        """Store ``collateral`` for ``report``'s chip and TCB, replacing any older entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {"format": _CACHE_FORMAT, "collateral": collateral.to_json()}
        atomic_write(self.directory / f"{cache_key(report)}.json", json.dumps(doc).encode(),
                     mode=0o644)


def _crl_current(crl: x509.CertificateRevocationList, now: int) -> bool:
    moment = datetime.fromtimestamp(now, UTC)
    next_update = crl.next_update_utc
    return crl.last_update_utc <= moment and (next_update is None or moment < next_update)


@attrs.frozen(kw_only=True)
class SnpCollateralSource:
    """Where SNP collateral comes from, in order: a fixed file, the cache, the KDS.

    :ivar fixed: collateral used for every report, or None.
    :ivar cache: a :class:`SnpCollateralCache`, or None.
    :ivar kds_url: the KDS to fetch from on a cache miss (:data:`KDS_URL`), or None (never
        fetch).
    :ivar with_crl: also fetch (and require in the cache) the product's CRL.
    :ivar fetcher: the network call; :func:`http_get` unless a test injects one.
    """

    fixed: SnpCollateral | None = None
    cache: SnpCollateralCache | None = None
    kds_url: str | None = None
    with_crl: bool = False
    fetcher: Fetcher = http_get

    async def collateral_for(self, report: SnpReport, *, now: int) -> SnpCollateral | None:
        """Collateral for ``report`` at verification time ``now``, or None if none is known.

        :raises EvidenceError: the KDS fetch fails (code ``collateral_unavailable``).
        """
        if self.fixed is not None:
            return self.fixed
        if self.cache is not None:
            cached = self.cache.get(report, now=now, with_crl=self.with_crl)
            if cached is not None:
                return cached
        if self.kds_url is None:
            return None
        collateral = await fetch_collateral(
            report, base_url=self.kds_url, fetcher=self.fetcher, with_crl=self.with_crl
        )
        if self.cache is not None:
            self.cache.put(report, collateral)
        return collateral
