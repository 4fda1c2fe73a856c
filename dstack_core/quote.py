"""Intel TDX DCAP quotes, versions 4 and 5: byte layouts and a strict parser.

Every layout lives here as a named offset, size or :class:`struct.Struct`; the rest of
dstack-core never slices quote bytes by hand. All integers are little-endian.

A quote is ``header (48 B) || [v5: body descriptor (6 B)] || TD report body ||
u32 signature-data length || signature data``, optionally followed by padding that the
parser ignores (real quotes read from the kernel carry 70 trailing zero bytes). The
*signed region*, covered by the attestation-key signature, is everything before the
signature-data length field.

Contract of the parser (:meth:`TdxQuote.from_bytes`): it is pure (no I/O, no clock, no
cryptography), it uses the length fields and never EOF to find the end, and every malformed
input raises :class:`~dstack_core.errors.EvidenceError` -- never ``IndexError`` or
``struct.error``. Parsing proves nothing about authenticity; signature and collateral checks
belong to the verifier.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

from dstack_core.errors import EvidenceError

__all__ = [
    "report_body",
    "ATT_KEY_TYPE_ECDSA_P256",
    "BODY_DESCRIPTOR",
    "BODY_TYPE_SGX",
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "CERT_DATA_HEADER",
    "CERT_TYPE_PCK_CERT_CHAIN",
    "CERT_TYPE_QE_REPORT",
    "ECDSA_P256_KEY_SIZE",
    "ECDSA_P256_SIGNATURE_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "MAX_QUOTE_SIZE",
    "QE_AUTH_DATA_SIZE",
    "QUOTE_VERSIONS",
    "RTMR_SIZE",
    "SGX_REPORT_BODY",
    "SGX_REPORT_BODY_SIZE",
    "SIG_DATA_LEN",
    "TD_ATTRIBUTES_DEBUG",
    "TD_REPORT10",
    "TD_REPORT10_SIZE",
    "TD_REPORT15_EXT",
    "TD_REPORT15_SIZE",
    "TD_REPORT_OFFSETS",
    "TEE_TYPE_TDX",
    "V4_BODY_OFFSET",
    "V4_REPORT_DATA_OFFSET",
    "V5_BODY_OFFSET",
    "V5_REPORT_DATA_OFFSET",
    "QeReport",
    "QuoteHeader",
    "QuoteSignatureData",
    "TdReport",
    "TdxQuote",
    "assemble_quote",
    "encode_signed_region",
    "is_tdx_quote",
]

QUOTE_VERSIONS = frozenset({4, 5})
"""Quote versions this module understands (3 is SGX-only and rejected)."""

TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
"""The QE vendor id of Intel's quoting enclave; dcap-qvl rejects every other value."""

MAX_QUOTE_SIZE = 1 << 20
"""Inputs longer than this (1 MiB) are refused before any parsing."""

HEADER = struct.Struct("<HHIHH16s20s")
"""version, att_key_type, tee_type, qe_svn, pce_svn, qe_vendor_id, user_data."""
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 48

BODY_DESCRIPTOR = struct.Struct("<HI")
"""v5 only: ``u16 body_type, u32 body_size`` right after the header."""

BODY_TYPE_SGX = 1
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3

V4_BODY_OFFSET = HEADER_SIZE
V5_BODY_OFFSET = HEADER_SIZE + BODY_DESCRIPTOR.size

RTMR_SIZE = 48

_TD_REPORT10_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", RTMR_SIZE),
    ("rtmr1", RTMR_SIZE),
    ("rtmr2", RTMR_SIZE),
    ("rtmr3", RTMR_SIZE),
    ("report_data", 64),
)
_TD_REPORT15_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn2", 16),
    ("mr_service_td", 48),
)


def _struct_of(fields: tuple[tuple[str, int], ...]) -> struct.Struct:
    return struct.Struct("<" + "".join(f"{size}s" for _, size in fields))


def _offsets_of(fields: tuple[tuple[str, int], ...]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    position = 0
    for name, size in fields:
        offsets[name] = position
        position += size
    return offsets


TD_REPORT10 = _struct_of(_TD_REPORT10_FIELDS)
"""The TD report 1.0 body (584 B), fields in the order of :class:`TdReport`."""
TD_REPORT15_EXT = _struct_of(_TD_REPORT15_FIELDS)
"""What TD report 1.5 appends to 1.0: tee_tcb_svn2 (16 B), mr_service_td (48 B)."""
TD_REPORT10_SIZE = TD_REPORT10.size
TD_REPORT15_SIZE = TD_REPORT10.size + TD_REPORT15_EXT.size
assert (TD_REPORT10_SIZE, TD_REPORT15_SIZE) == (584, 648)

TD_REPORT_OFFSETS: Mapping[str, int] = MappingProxyType(
    _offsets_of(_TD_REPORT10_FIELDS + _TD_REPORT15_FIELDS)
)
"""Offset of each TD report field relative to the start of the body."""
_TD_REPORT_SIZES: Mapping[str, int] = MappingProxyType(
    dict(_TD_REPORT10_FIELDS + _TD_REPORT15_FIELDS)
)

V4_REPORT_DATA_OFFSET = V4_BODY_OFFSET + TD_REPORT_OFFSETS["report_data"]
V5_REPORT_DATA_OFFSET = V5_BODY_OFFSET + TD_REPORT_OFFSETS["report_data"]
assert (V4_REPORT_DATA_OFFSET, V5_REPORT_DATA_OFFSET) == (568, 574)

TD_ATTRIBUTES_DEBUG = 0x01
"""Bit 0 of td_attributes byte 0: the TD runs in debug mode (its secrets are not secret)."""

SIG_DATA_LEN = struct.Struct("<I")
ECDSA_P256_SIGNATURE_SIZE = 64
"""Raw ``r || s``, 32 bytes big-endian each."""
ECDSA_P256_KEY_SIZE = 64
"""Raw ``x || y`` of an uncompressed P-256 point, without the ``04`` prefix."""

CERT_DATA_HEADER = struct.Struct("<HI")
"""``u16 certification_data_type, u32 size`` in front of certification data."""
CERT_TYPE_PCK_CERT_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

SGX_REPORT_BODY = struct.Struct("<16sI28s16s32s32s32s96sHH60s64s")
"""cpu_svn, misc_select, reserved, attributes, mr_enclave, reserved, mr_signer, reserved,
isv_prod_id, isv_svn, reserved, report_data."""
SGX_REPORT_BODY_SIZE = SGX_REPORT_BODY.size
assert SGX_REPORT_BODY_SIZE == 384

QE_AUTH_DATA_SIZE = struct.Struct("<H")

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def _exact_len(size: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attribute.name} must be bytes, not {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes, got {len(value)}")

    return check


def _optional_exact_len(size: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    inner = _exact_len(size)

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            inner(instance, attribute, value)

    return check


def _uint(maximum: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attribute.name} must be int, not {type(value).__name__}")
        if not 0 <= value <= maximum:
            raise ValueError(f"{attribute.name} must be in 0..{maximum}, got {value}")

    return check


def _field(name: str) -> Any:
    return attrs.field(validator=_exact_len(_TD_REPORT_SIZES[name]))


_T = TypeVar("_T")
_NEW = object.__new__
_SET = object.__setattr__


def _from_layout(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """An instance of the frozen attrs class ``cls`` from the values a fixed struct layout
    unpacked, without running the field validators: the layout already fixes what they
    check (every byte field's length, every integer's range). Each field not in
    ``values`` takes its (plain) default. Tests hold these ``from_bytes`` to the validating
    constructor (tests/test_quote.py)."""
    instance = _NEW(cls)
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        _SET(instance, field.name, values[field.name] if field.name in values else field.default)
    return instance


class _Reader:
    """A bounded cursor that turns every short read into :class:`EvidenceError`."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def position(self) -> int:
        return self._pos

    def take(self, size: int, field: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise EvidenceError(
                f"{self._what} truncated: {field} needs {size} bytes at offset {self._pos},"
                f" only {len(self._data) - self._pos} left"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def unpack(self, layout: struct.Struct, field: str) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size, field))

    def expect_end(self) -> None:
        if self._pos != len(self._data):
            raise EvidenceError(
                f"{self._what} has {len(self._data) - self._pos} unexpected bytes after"
                f" offset {self._pos}"
            )


@attrs.frozen(kw_only=True)
class QuoteHeader:
    """The 48-byte quote header.

    ``qe_svn`` and ``pce_svn`` are reserved in the v4 layout (zero in real quotes); the
    20-byte ``user_data`` is not interpreted by dcap-qvl, which is why the simulator puts its
    marker there.
    """

    version: int = attrs.field(validator=_uint(_U16_MAX))
    att_key_type: int = attrs.field(validator=_uint(_U16_MAX))
    tee_type: int = attrs.field(validator=_uint(_U32_MAX))
    qe_svn: int = attrs.field(validator=_uint(_U16_MAX))
    pce_svn: int = attrs.field(validator=_uint(_U16_MAX))
    qe_vendor_id: bytes = attrs.field(validator=_exact_len(16))
    user_data: bytes = attrs.field(validator=_exact_len(20))

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteHeader:
        """Decode exactly :data:`HEADER_SIZE` bytes; raises :class:`EvidenceError` otherwise."""
        if len(data) != HEADER_SIZE:
            raise EvidenceError(f"quote header must be {HEADER_SIZE} bytes, got {len(data)}")
        version, key_type, tee_type, qe_svn, pce_svn, vendor, user_data = HEADER.unpack(data)
        return _from_layout(cls, {
            "version": version,
            "att_key_type": key_type,
            "tee_type": tee_type,
            "qe_svn": qe_svn,
            "pce_svn": pce_svn,
            "qe_vendor_id": vendor,
            "user_data": user_data,
        })

    def to_bytes(self) -> bytes:
        """Encode to the 48-byte wire form."""
        return HEADER.pack(
            self.version,
            self.att_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )


def _check_td15_pair(instance: TdReport, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (instance.tee_tcb_svn2 is None) != (value is None):
        raise ValueError("tee_tcb_svn2 and mr_service_td must both be set (TD 1.5) or both None")


@attrs.frozen(kw_only=True)
class TdReport:
    """A TD report body: TD 1.0 (584 bytes) or, with the two trailing fields set, TD 1.5 (648).

    Field sizes in bytes: tee_tcb_svn 16, mr_seam 48, mr_signer_seam 48, seam_attributes 8,
    td_attributes 8, xfam 8, mr_td 48, mr_config_id 48, mr_owner 48, mr_owner_config 48,
    rtmr0..rtmr3 48 each, report_data 64; TD 1.5 only: tee_tcb_svn2 16, mr_service_td 48
    (``None`` for TD 1.0). :meth:`to_bytes` re-encodes exactly what :meth:`from_bytes` read.
    """

    tee_tcb_svn: bytes = _field("tee_tcb_svn")
    mr_seam: bytes = _field("mr_seam")
    mr_signer_seam: bytes = _field("mr_signer_seam")
    seam_attributes: bytes = _field("seam_attributes")
    td_attributes: bytes = _field("td_attributes")
    xfam: bytes = _field("xfam")
    mr_td: bytes = _field("mr_td")
    mr_config_id: bytes = _field("mr_config_id")
    mr_owner: bytes = _field("mr_owner")
    mr_owner_config: bytes = _field("mr_owner_config")
    rtmr0: bytes = _field("rtmr0")
    rtmr1: bytes = _field("rtmr1")
    rtmr2: bytes = _field("rtmr2")
    rtmr3: bytes = _field("rtmr3")
    report_data: bytes = _field("report_data")
    tee_tcb_svn2: bytes | None = attrs.field(
        default=None, validator=_optional_exact_len(_TD_REPORT_SIZES["tee_tcb_svn2"])
    )
    mr_service_td: bytes | None = attrs.field(
        default=None,
        validator=[_optional_exact_len(_TD_REPORT_SIZES["mr_service_td"]), _check_td15_pair],
    )

    @classmethod
    def from_bytes(cls, data: bytes) -> TdReport:
        """Decode a 584-byte (TD 1.0) or 648-byte (TD 1.5) body.

        :raises EvidenceError: for any other length.
        """
        data = bytes(data)
        if len(data) == TD_REPORT10_SIZE:
            extra: dict[str, bytes] = {}
        elif len(data) == TD_REPORT15_SIZE:
            values15 = TD_REPORT15_EXT.unpack_from(data, TD_REPORT10_SIZE)
            extra = {
                name: value for (name, _), value in zip(_TD_REPORT15_FIELDS, values15, strict=True)
            }
        else:
            raise EvidenceError(
                f"TD report must be {TD_REPORT10_SIZE} or {TD_REPORT15_SIZE} bytes, got {len(data)}"
            )
        values = TD_REPORT10.unpack_from(data, 0)
        fields = {name: value for (name, _), value in zip(_TD_REPORT10_FIELDS, values, strict=True)}
        return _from_layout(cls, {**fields, **extra})

    def to_bytes(self) -> bytes:
        """Encode to the wire form (584 bytes for TD 1.0, 648 for TD 1.5)."""
        body = TD_REPORT10.pack(*(getattr(self, name) for name, _ in _TD_REPORT10_FIELDS))
        if self.is_td15:
            body += TD_REPORT15_EXT.pack(self.tee_tcb_svn2, self.mr_service_td)
        return body

    @property
    def is_td15(self) -> bool:
        """Whether this is a TD 1.5 body (the two trailing fields are present)."""
        return self.mr_service_td is not None

    @property
    def body_type(self) -> int:
        """The v5 body type this report encodes as: :data:`BODY_TYPE_TD15` or ``_TD10``."""
        return BODY_TYPE_TD15 if self.is_td15 else BODY_TYPE_TD10

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The four runtime measurement registers, RTMR0 first."""
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def is_debug(self) -> bool:
        """Whether the DEBUG bit (td_attributes byte 0, bit 0) is set."""
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)


@attrs.frozen(kw_only=True)
class QeReport:
    """The Quoting Enclave's SGX report body (384 bytes), as carried in the signature data.

    Reserved regions are not kept: :meth:`to_bytes` writes them as zeros, so the signed bytes
    of a parsed quote are :attr:`QuoteSignatureData.qe_report_body`, not a re-encoding.
    """

    cpu_svn: bytes = attrs.field(validator=_exact_len(16))
    misc_select: int = attrs.field(validator=_uint(_U32_MAX))
    attributes: bytes = attrs.field(validator=_exact_len(16))
    mr_enclave: bytes = attrs.field(validator=_exact_len(32))
    mr_signer: bytes = attrs.field(validator=_exact_len(32))
    isv_prod_id: int = attrs.field(validator=_uint(_U16_MAX))
    isv_svn: int = attrs.field(validator=_uint(_U16_MAX))
    report_data: bytes = attrs.field(validator=_exact_len(64))

    @classmethod
    def from_bytes(cls, data: bytes) -> QeReport:
        """Decode exactly :data:`SGX_REPORT_BODY_SIZE` bytes; raises :class:`EvidenceError`."""
        if len(data) != SGX_REPORT_BODY_SIZE:
            raise EvidenceError(f"QE report must be {SGX_REPORT_BODY_SIZE} bytes, got {len(data)}")
        (
            cpu_svn,
            misc_select,
            _,
            attributes,
            mr_enclave,
            _,
            mr_signer,
            _,
            isv_prod_id,
            isv_svn,
            _,
            report_data,
        ) = SGX_REPORT_BODY.unpack(data)
        return cls(
            cpu_svn=cpu_svn,
            misc_select=misc_select,
            attributes=attributes,
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=report_data,
        )

    def to_bytes(self) -> bytes:
        """Encode to 384 bytes, reserved regions zero."""
        return SGX_REPORT_BODY.pack(
            self.cpu_svn,
            self.misc_select,
            b"",
            self.attributes,
            self.mr_enclave,
            b"",
            self.mr_signer,
            b"",
            self.isv_prod_id,
            self.isv_svn,
            b"",
            self.report_data,
        )


def _pem_blocks(data: bytes) -> Iterator[bytes]:
    """Each ``-----BEGIN CERTIFICATE-----`` ... ``-----END CERTIFICATE-----`` block, in
    order, found with linear scans (a lazy regex would rescan the rest of the input from
    every BEGIN: quadratic in a chain of nothing but BEGIN lines)."""
    start = data.find(_PEM_BEGIN)
    while start >= 0:
        end = data.find(_PEM_END, start + len(_PEM_BEGIN))
        if end < 0:
            return
        end += len(_PEM_END)
        yield data[start:end]
        start = data.find(_PEM_BEGIN, end)


def _split_pem_chain(data: bytes) -> list[bytes]:
    return [block + b"\n" for block in _pem_blocks(data)]


@attrs.frozen(kw_only=True)
class QuoteSignatureData:
    """The ECDSA-P256 signature data of a quote, with QE-report certification data (type 6).

    ``signature`` is the attestation key's raw ``r || s`` over the signed region;
    ``attestation_key`` the raw ``x || y`` public key; ``qe_report_body`` the exact 384 bytes
    the PCK leaf key signed into ``qe_report_signature``; ``qe_auth_data`` the QE's
    authentication data (hashed into the QE report's report_data); ``pck_cert_chain_data``
    the inner type-5 certification data: a PEM chain, leaf first, normally NUL-terminated.
    """

    signature: bytes = attrs.field(validator=_exact_len(ECDSA_P256_SIGNATURE_SIZE))
    attestation_key: bytes = attrs.field(validator=_exact_len(ECDSA_P256_KEY_SIZE))
    qe_report_body: bytes = attrs.field(validator=_exact_len(SGX_REPORT_BODY_SIZE))
    qe_report_signature: bytes = attrs.field(validator=_exact_len(ECDSA_P256_SIGNATURE_SIZE))
    qe_auth_data: bytes = attrs.field()
    pck_cert_chain_data: bytes = attrs.field()

    @qe_auth_data.validator
    def _check_auth_data(self, attribute: attrs.Attribute[Any], value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) > _U16_MAX:
            raise ValueError(f"qe_auth_data must be bytes, at most {_U16_MAX} of them")

    @pck_cert_chain_data.validator
    def _check_chain(self, attribute: attrs.Attribute[Any], value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError("pck_cert_chain_data must be bytes")

    @property
    def qe_report(self) -> QeReport:
        """The decoded QE report."""
        return QeReport.from_bytes(self.qe_report_body)

    @property
    def pck_certificates(self) -> list[bytes]:
        """The PEM certificates of the PCK chain, leaf first, each ending in a newline."""
        return _split_pem_chain(self.pck_cert_chain_data)

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteSignatureData:
        """Decode signature data whose length field has already been consumed.

        Every nested length must be consistent and fully used.

        :raises EvidenceError: on truncation, unsupported certification data types, extra
            bytes inside a sized structure, or a PCK chain without a PEM certificate.
        """
        outer = _Reader(bytes(data), "quote signature data")
        signature = outer.take(ECDSA_P256_SIGNATURE_SIZE, "quote signature")
        attestation_key = outer.take(ECDSA_P256_KEY_SIZE, "attestation key")
        cert_type, cert_size = outer.unpack(CERT_DATA_HEADER, "certification data header")
        if cert_type != CERT_TYPE_QE_REPORT:
            raise EvidenceError(
                f"unsupported certification data type {cert_type}"
                f" (expected {CERT_TYPE_QE_REPORT}, QE report certification data)"
            )
        qe = _Reader(outer.take(cert_size, "QE report certification data"), "QE report data")
        outer.expect_end()
        qe_report_body = qe.take(SGX_REPORT_BODY_SIZE, "QE report")
        qe_report_signature = qe.take(ECDSA_P256_SIGNATURE_SIZE, "QE report signature")
        (auth_size,) = qe.unpack(QE_AUTH_DATA_SIZE, "QE auth data size")
        qe_auth_data = qe.take(auth_size, "QE auth data")
        inner_type, inner_size = qe.unpack(CERT_DATA_HEADER, "PCK certification data header")
        if inner_type != CERT_TYPE_PCK_CERT_CHAIN:
            raise EvidenceError(
                f"unsupported inner certification data type {inner_type}"
                f" (expected {CERT_TYPE_PCK_CERT_CHAIN}, PCK certificate chain)"
            )
        chain = qe.take(inner_size, "PCK certificate chain")
        qe.expect_end()
        if next(_pem_blocks(chain), None) is None:
            raise EvidenceError("PCK certificate chain holds no PEM certificate")
        return cls(
            signature=signature,
            attestation_key=attestation_key,
            qe_report_body=qe_report_body,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            pck_cert_chain_data=chain,
        )

    def to_bytes(self) -> bytes:
        """Encode to the wire form (without the leading signature-data length)."""
        qe_data = b"".join(
            (
                self.qe_report_body,
                self.qe_report_signature,
                QE_AUTH_DATA_SIZE.pack(len(self.qe_auth_data)),
                self.qe_auth_data,
                CERT_DATA_HEADER.pack(CERT_TYPE_PCK_CERT_CHAIN, len(self.pck_cert_chain_data)),
                self.pck_cert_chain_data,
            )
        )
        return b"".join(
            (
                self.signature,
                self.attestation_key,
                CERT_DATA_HEADER.pack(CERT_TYPE_QE_REPORT, len(qe_data)),
                qe_data,
            )
        )


def encode_signed_region(header: QuoteHeader, report: TdReport) -> bytes:
    """The bytes the attestation key signs: header, v5 body descriptor, TD report body.

    A v4 header takes a TD 1.0 report; a v5 header takes either (body type 2 or 3).

    :raises ValueError: for another version, or a TD 1.5 report under a v4 header.
    """
    body = report.to_bytes()
    if header.version == 4:
        if report.is_td15:
            raise ValueError("a v4 quote carries a TD 1.0 report; use version 5 for TD 1.5")
        return header.to_bytes() + body
    if header.version == 5:
        return header.to_bytes() + BODY_DESCRIPTOR.pack(report.body_type, len(body)) + body
    raise ValueError(f"unsupported quote version {header.version}")


def assemble_quote(signed_region: bytes, signature_data: QuoteSignatureData) -> bytes:
    """Join a signed region and its signature data into a complete quote."""
    encoded = signature_data.to_bytes()
    return signed_region + SIG_DATA_LEN.pack(len(encoded)) + encoded


def report_body(data: bytes) -> bytes:
    """The TD report body of a TDX quote, found from the header alone: cheap, and no
    validation (a short or malformed quote gives a short or meaningless result).

    Fields are at :data:`TD_REPORT_OFFSETS` within it.
    """
    start = V5_BODY_OFFSET if data[:2] == b"\x05\x00" else V4_BODY_OFFSET
    return data[start : start + TD_REPORT10_SIZE]


def is_tdx_quote(data: bytes) -> bool:
    """Cheap sniff: a header says version 4 or 5 and TEE type TDX. Not a validation."""
    if len(data) < HEADER_SIZE:
        return False
    version, _, tee_type, *_ = HEADER.unpack_from(data, 0)
    return version in QUOTE_VERSIONS and tee_type == TEE_TYPE_TDX


@attrs.frozen(kw_only=True)
class TdxQuote:
    """A parsed Intel TDX quote (v4 with a TD 1.0 body, or v5 with a TD 1.0/1.5 body).

    ``raw`` is the quote proper, ``signed_region`` its first bytes up to the signature-data
    length field; trailing padding after the signature data is not kept.
    """

    header: QuoteHeader
    body_type: int
    report: TdReport
    signed_region: bytes = attrs.field(repr=False)
    signature_data: QuoteSignatureData = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> TdxQuote:
        """Parse a TDX quote, ignoring bytes after the signature data.

        :param data: at most :data:`MAX_QUOTE_SIZE` bytes.
        :raises EvidenceError: if the input is oversize, truncated, not version 4 or 5, not
            TEE type TDX, not ECDSA-P256, carries a non-TD body, or has inconsistent lengths.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"quote must be bytes, not {type(data).__name__}")
        if len(data) > MAX_QUOTE_SIZE:
            raise EvidenceError(f"quote is {len(data)} bytes, over the {MAX_QUOTE_SIZE}-byte limit")
        data = bytes(data)
        reader = _Reader(data, "TDX quote")
        header = QuoteHeader.from_bytes(reader.take(HEADER_SIZE, "header"))
        if header.version not in QUOTE_VERSIONS:
            raise EvidenceError(f"unsupported quote version {header.version} (expected 4 or 5)")
        if header.tee_type != TEE_TYPE_TDX:
            raise EvidenceError(f"TEE type {header.tee_type:#x} is not TDX ({TEE_TYPE_TDX:#x})")
        if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise EvidenceError(
                f"unsupported attestation key type {header.att_key_type}"
                f" (expected {ATT_KEY_TYPE_ECDSA_P256}, ECDSA P-256)"
            )
        if header.version == 4:
            body_type, body_size = BODY_TYPE_TD10, TD_REPORT10_SIZE
        else:
            body_type, body_size = reader.unpack(BODY_DESCRIPTOR, "body descriptor")
            expected = {BODY_TYPE_TD10: TD_REPORT10_SIZE, BODY_TYPE_TD15: TD_REPORT15_SIZE}
            if body_type == BODY_TYPE_SGX:
                raise EvidenceError("v5 quote carries an SGX enclave report (body type 1)")
            if body_type not in expected:
                raise EvidenceError(f"unknown v5 quote body type {body_type}")
            if body_size != expected[body_type]:
                raise EvidenceError(
                    f"body type {body_type} must be {expected[body_type]} bytes,"
                    f" descriptor says {body_size}"
                )
        report = TdReport.from_bytes(reader.take(body_size, "TD report"))
        signed_end = reader.position
        (sig_len,) = reader.unpack(SIG_DATA_LEN, "signature data length")
        signature_data = QuoteSignatureData.from_bytes(reader.take(sig_len, "signature data"))
        return cls(
            header=header,
            body_type=body_type,
            report=report,
            signed_region=data[:signed_end],
            signature_data=signature_data,
            raw=data[: reader.position],
        )

    @property
    def version(self) -> int:
        """The quote version, 4 or 5."""
        return self.header.version

    @property
    def body_offset(self) -> int:
        """Absolute offset of the TD report body: 48 (v4) or 54 (v5)."""
        return V4_BODY_OFFSET if self.version == 4 else V5_BODY_OFFSET

    @property
    def report_data_offset(self) -> int:
        """Absolute offset of report_data in :attr:`raw`: 568 (v4) or 574 (v5)."""
        return self.body_offset + TD_REPORT_OFFSETS["report_data"]

    @property
    def report_data(self) -> bytes:
        """The 64 bytes of report_data the TD asked to be quoted."""
        return self.report.report_data

    def to_bytes(self) -> bytes:
        """The quote bytes, without any trailing padding the input carried."""
        return self.raw
