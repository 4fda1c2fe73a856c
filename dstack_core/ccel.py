"""The TDX boot event log: TCG2 crypto-agile records in the ACPI CCEL log area.

TDX firmware (TDVF) measures the boot into RTMR0..2 and records each measurement in the
log area the ACPI ``CCEL`` table points at; Linux exposes that area as
``/sys/firmware/acpi/tables/data/CCEL``. All integers are little-endian. The area holds:

1. one legacy ``TCG_PCClientPCREvent`` (SHA-1 format) of type ``EV_NO_ACTION`` whose event is
   the ``TCG_EfiSpecIdEvent`` "Spec ID Event03", declaring the digest algorithms;
2. ``TCG_PCR_EVENT2`` records: MR index, event type, a list of (algorithm, digest), event bytes;
3. the unused rest, filled with 0xFF (so the next "MR index" reads ``0xFFFFFFFF``).

MR index 0 is MRTD, which firmware does not extend at runtime; MR index *n* ≥ 1 is RTMR
*n − 1*. :func:`parse_tcg2` decodes the records faithfully; :func:`parse_ccel` projects them
the way dstack does into :class:`~dstack_core.eventlog.TdxEvent` values.
:class:`Tcg2LogBuilder` and :func:`build_ccel_table` make synthetic logs and tables for tests
and fake kernels.

Parsing is total: any malformed or truncated input raises
:class:`~dstack_core.errors.EvidenceError` naming the byte offset, never another exception.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from dstack_core.errors import EvidenceError
from dstack_core.eventlog import (
    ACPI_DATA_EVENT_NAMES,
    ACPI_DATA_PAYLOAD,
    EV_NO_ACTION,
    EV_PLATFORM_CONFIG_FLAGS,
    RTMR_COUNT,
    SHA384_DIGEST_SIZE,
    InvalidEvent,
    TdxEvent,
)

__all__ = [
    "ACPI_DATA_PAYLOAD",
    "CCEL_TABLE",
    "CCEL_TABLE_SIZE",
    "CC_TYPE_TDX",
    "DIGEST_ALGORITHM",
    "DIGEST_SIZES",
    "END_OF_LOG",
    "EVENT2_HEADER",
    "EVENT_SIZE",
    "EV_EVENT_TAG",
    "EV_NO_ACTION",
    "EV_PLATFORM_CONFIG_FLAGS",
    "LEGACY_EVENT_HEADER",
    "MAX_CCEL_SIZE",
    "MAX_DIGESTS",
    "MAX_RECORDS",
    "MRTD_INDEX",
    "SPEC_ID_ALGORITHM",
    "SPEC_ID_HEADER",
    "SPEC_ID_SIGNATURE",
    "SPEC_ID_VENDOR_INFO_SIZE",
    "TPM_ALG_SHA1",
    "TPM_ALG_SHA256",
    "TPM_ALG_SHA384",
    "TPM_ALG_SHA512",
    "TPM_ALG_SM3_256",
    "CcelTable",
    "SpecIdEvent",
    "Tcg2Log",
    "Tcg2LogBuilder",
    "Tcg2Record",
    "build_ccel_table",
    "parse_ccel",
    "parse_ccel_table",
    "parse_tcg2",
]

TPM_ALG_SHA1: Final = 0x0004
TPM_ALG_SHA256: Final = 0x000B
TPM_ALG_SHA384: Final = 0x000C
TPM_ALG_SHA512: Final = 0x000D
TPM_ALG_SM3_256: Final = 0x0012

DIGEST_SIZES: Final[dict[int, int]] = {
    TPM_ALG_SHA1: 20,
    TPM_ALG_SHA256: 32,
    TPM_ALG_SHA384: 48,
    TPM_ALG_SHA512: 64,
    TPM_ALG_SM3_256: 32,
}
"""Digest size in bytes of each TCG algorithm id this parser knows without a declaration."""

EV_EVENT_TAG: Final = 0x00000006
"""TCG event type of tagged events (e.g. the kernel command line on RTMR2)."""

SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\x00"
"""Signature that opens the ``TCG_EfiSpecIdEvent`` of a crypto-agile log."""

END_OF_LOG: Final = 0xFFFFFFFF
"""An MR index with this value is the start of the 0xFF padding after the last record."""

MRTD_INDEX: Final = 0
"""CC MR index of MRTD; dstack drops such records (some clouds log into it)."""

MAX_CCEL_SIZE: Final = 64 * 1024 * 1024
"""Largest log area accepted (real ones are 64 KiB to a few MiB)."""

MAX_RECORDS: Final = 100_000
"""Most ``TCG_PCR_EVENT2`` records accepted in one log."""

MAX_DIGESTS: Final = 64
"""Most digests per record, and most algorithms in the Spec ID event."""

LEGACY_EVENT_HEADER: Final = struct.Struct("<II20sI")
"""``TCG_PCClientPCREvent`` before its event: PCR index, event type, SHA-1 digest, event size."""

SPEC_ID_HEADER: Final = struct.Struct("<16sIBBBBI")
"""``TCG_EfiSpecIdEvent`` up to its algorithm table: signature, platform class, spec version
minor, major, errata, uintn size, number of algorithms."""

SPEC_ID_ALGORITHM: Final = struct.Struct("<HH")
"""One Spec ID algorithm entry: algorithm id, digest size."""

SPEC_ID_VENDOR_INFO_SIZE: Final = struct.Struct("<B")
"""The vendor-info length byte that ends the Spec ID algorithm table."""

EVENT2_HEADER: Final = struct.Struct("<III")
"""``TCG_PCR_EVENT2`` up to its digests: MR index, event type, digest count."""

DIGEST_ALGORITHM: Final = struct.Struct("<H")
"""The algorithm id in front of each digest of a record."""

EVENT_SIZE: Final = struct.Struct("<I")
"""The event size in front of each record's event bytes."""

CCEL_TABLE: Final = struct.Struct("<4sIBB6s8sI4sIBBHQQ")
"""The ACPI CCEL table: the 36-byte ACPI header (signature, length, revision, checksum, OEM id,
OEM table id, OEM revision, creator id, creator revision), then CC type, CC subtype,
reserved, LAML (log area minimum length) and LASA (log area start address)."""

CCEL_TABLE_SIZE: Final = CCEL_TABLE.size
"""Size of the ACPI CCEL table: 56 bytes."""

CC_TYPE_TDX: Final = 2
"""CCEL ``CC type`` of Intel TDX (1 is AMD SEV)."""

_U32: Final = struct.Struct("<I")


@attrs.frozen(kw_only=True)
class SpecIdEvent:
    """The ``TCG_EfiSpecIdEvent`` header of a crypto-agile log.

    :ivar header_mr_index: the index field of the legacy header record (1 on TDX, 0 on TPMs).
    :ivar algorithms: declared ``(algorithm id, digest size)`` pairs, in log order.
    """

    header_mr_index: int
    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[tuple[int, int], ...]
    vendor_info: bytes


@attrs.frozen(kw_only=True)
class Tcg2Record:
    """One ``TCG_PCR_EVENT2`` record, as logged.

    :ivar offset: where the record starts in the log area.
    :ivar mr_index: the CC MR index (0 = MRTD, n = RTMR n-1).
    :ivar digests: ``(algorithm id, digest)`` pairs in log order.
    :ivar event: the raw event bytes.
    """

    offset: int
    mr_index: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]
    event: bytes

    def digest(self, algorithm: int) -> bytes | None:
        """Return the digest for ``algorithm``, or None if the record has none."""
        for alg, value in self.digests:
            if alg == algorithm:
                return value
        return None


@attrs.frozen(kw_only=True)
class Tcg2Log:
    """A decoded log area: the Spec ID header, the records, and where the log ends.

    :ivar end: offset of the first byte after the last record (start of padding).
    """

    spec_id: SpecIdEvent
    records: tuple[Tcg2Record, ...]
    end: int


class _Reader:
    """Bounds-checked cursor over ``data[offset:end]``; offsets reported are absolute."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.offset

    def need(self, size: int, what: str) -> None:
        if size > self.remaining:
            raise EvidenceError(
                f"CCEL truncated at offset {self.offset}: {what} needs {size} bytes, "
                f"{self.remaining} left"
            )

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(layout.size, what)
        values = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return values

    def take(self, size: int, what: str) -> bytes:
        self.need(size, what)
        value = self.data[self.offset : self.offset + size]
        self.offset += size
        return value


def _parse_spec_id(reader: _Reader) -> SpecIdEvent:
    start = reader.offset
    mr_index, event_type, _sha1, size = reader.unpack(LEGACY_EVENT_HEADER, "header record")
    if event_type != EV_NO_ACTION:
        raise EvidenceError(
            f"CCEL header record at offset {start} has type {event_type}, not EV_NO_ACTION"
        )
    reader.need(size, "Spec ID event")
    body = _Reader(reader.data, reader.offset, reader.offset + size)
    reader.offset += size
    signature, platform_class, minor, major, errata, uintn, count = body.unpack(
        SPEC_ID_HEADER, "Spec ID event"
    )
    if signature != SPEC_ID_SIGNATURE:
        raise EvidenceError(f"CCEL Spec ID event at offset {start} has signature {signature!r}")
    if count > MAX_DIGESTS:
        raise EvidenceError(f"CCEL Spec ID event at offset {start} declares {count} algorithms")
    algorithms = []
    for _ in range(count):
        alg_offset = body.offset
        alg, alg_size = body.unpack(SPEC_ID_ALGORITHM, "Spec ID algorithm")
        known = DIGEST_SIZES.get(alg)
        if known is not None and known != alg_size:
            raise EvidenceError(
                f"CCEL Spec ID algorithm at offset {alg_offset}: {alg:#06x} has size "
                f"{alg_size}, not {known}"
            )
        algorithms.append((alg, alg_size))
    (vendor_size,) = body.unpack(SPEC_ID_VENDOR_INFO_SIZE, "Spec ID vendor info size")
    vendor_info = body.take(vendor_size, "Spec ID vendor info")
    if body.remaining:
        raise EvidenceError(
            f"CCEL Spec ID event at offset {start} has {body.remaining} trailing bytes"
        )
    return SpecIdEvent(
        header_mr_index=mr_index,
        platform_class=platform_class,
        spec_version_minor=minor,
        spec_version_major=major,
        spec_errata=errata,
        uintn_size=uintn,
        algorithms=tuple(algorithms),
        vendor_info=vendor_info,
    )


def _at_end(reader: _Reader) -> bool:
    remaining = reader.remaining
    if remaining == 0:
        return True
    if remaining < _U32.size:
        if reader.data[reader.offset :] == b"\xff" * remaining:
            return True
        raise EvidenceError(f"CCEL truncated at offset {reader.offset}: {remaining} stray bytes")
    (mr_index,) = _U32.unpack_from(reader.data, reader.offset)
    return bool(mr_index == END_OF_LOG)


def parse_tcg2(data: bytes) -> Tcg2Log:
    """Decode a TCG2 crypto-agile log area (e.g. the CCEL data) record by record.

    Decoding stops at an MR index of ``0xFFFFFFFF`` (the 0xFF padding), at the end of the
    data, or at up to three trailing 0xFF bytes. Digest sizes come from :data:`DIGEST_SIZES`
    and the Spec ID declarations (which must agree with it). Nothing is dropped or
    interpreted: see :func:`parse_ccel` for that.

    :param data: the log area, at most :data:`MAX_CCEL_SIZE` bytes.
    :raises EvidenceError: on a missing or malformed Spec ID header, a truncated record, an
        unknown digest algorithm, more than :data:`MAX_DIGESTS` digests or
        :data:`MAX_RECORDS` records; the message names the offset.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceError(f"CCEL data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_CCEL_SIZE:
        raise EvidenceError(f"CCEL data is {len(data)} bytes, more than {MAX_CCEL_SIZE}")
    reader = _Reader(data)
    spec_id = _parse_spec_id(reader)
    sizes = dict(DIGEST_SIZES)
    sizes.update(spec_id.algorithms)
    records: list[Tcg2Record] = []
    while not _at_end(reader):
        if len(records) >= MAX_RECORDS:
            raise EvidenceError(f"CCEL has more than {MAX_RECORDS} records")
        start = reader.offset
        mr_index, event_type, count = reader.unpack(EVENT2_HEADER, "record header")
        if count > MAX_DIGESTS:
            raise EvidenceError(f"CCEL record at offset {start} has {count} digests")
        digests = []
        for _ in range(count):
            alg_offset = reader.offset
            (alg,) = reader.unpack(DIGEST_ALGORITHM, "digest algorithm")
            size = sizes.get(alg)
            if size is None:
                raise EvidenceError(
                    f"CCEL record at offset {start} uses unknown digest algorithm {alg:#06x} "
                    f"(at offset {alg_offset})"
                )
            digests.append((alg, reader.take(size, "digest")))
        (event_size,) = reader.unpack(EVENT_SIZE, "event size")
        event = reader.take(event_size, "event data")
        records.append(
            Tcg2Record(
                offset=start,
                mr_index=mr_index,
                event_type=event_type,
                digests=tuple(digests),
                event=event,
            )
        )
    return Tcg2Log(spec_id=spec_id, records=tuple(records), end=reader.offset)


def parse_ccel(data: bytes) -> tuple[TdxEvent, ...]:
    """Decode a CCEL log area into dstack's boot events (RTMR0..2).

    The dstack projection of :func:`parse_tcg2`: records with MR index 0 (MRTD) are dropped;
    every other record must carry exactly one SHA-384 digest (other banks are ignored) and
    an MR index of 1..4, mapped to ``imr = mr_index - 1``; ``event`` is ``""`` and
    ``event_payload`` the raw event bytes; the first three RTMR0 ``EV_PLATFORM_CONFIG_FLAGS``
    events with payload ``b"ACPI DATA"`` are named ``acpi-loader``, ``acpi-rsdp`` and
    ``acpi-tables``. ``EV_NO_ACTION`` records are kept, as dstack does; replay skips them.

    :raises EvidenceError: as :func:`parse_tcg2`, or on a record without a SHA-384 digest,
        with two of them, or with an MR index above 4.
    """
    log = parse_tcg2(data)
    acpi_names = iter(ACPI_DATA_EVENT_NAMES)
    events = []
    for record in log.records:
        if record.mr_index == MRTD_INDEX:
            continue
        if not 1 <= record.mr_index <= RTMR_COUNT:
            raise EvidenceError(
                f"CCEL record at offset {record.offset} has MR index {record.mr_index}"
            )
        sha384 = [value for alg, value in record.digests if alg == TPM_ALG_SHA384]
        if len(sha384) != 1:
            raise EvidenceError(
                f"CCEL record at offset {record.offset} has {len(sha384)} SHA-384 digests, "
                "not exactly one"
            )
        imr = record.mr_index - 1
        name = ""
        if (
            imr == 0
            and record.event_type == EV_PLATFORM_CONFIG_FLAGS
            and record.event == ACPI_DATA_PAYLOAD
        ):
            name = next(acpi_names, "")
        events.append(
            TdxEvent(
                imr=imr,
                event_type=record.event_type,
                digest=sha384[0],
                event=name,
                event_payload=record.event,
            )
        )
    return tuple(events)


@attrs.frozen(kw_only=True)
class CcelTable:
    """The fields of the ACPI ``CCEL`` table a guest needs.

    :ivar cc_type: 1 = AMD SEV, 2 = Intel TDX.
    :ivar laml: log area minimum length: the size of ``tables/data/CCEL``.
    :ivar lasa: log area start (guest physical address).
    """

    cc_type: int
    cc_subtype: int
    laml: int
    lasa: int


def parse_ccel_table(data: bytes) -> CcelTable:
    """Decode the 56-byte ACPI ``CCEL`` table (``/sys/firmware/acpi/tables/CCEL``).

    :raises EvidenceError: on a wrong size, signature, length field or checksum.
    """
    if len(data) != CCEL_TABLE_SIZE:
        raise EvidenceError(f"CCEL table is {len(data)} bytes, not {CCEL_TABLE_SIZE}")
    fields = CCEL_TABLE.unpack(data)
    signature, length = fields[0], fields[1]
    if signature != b"CCEL" or length != CCEL_TABLE_SIZE:
        raise EvidenceError(f"not a CCEL table: signature {signature!r}, length {length}")
    if sum(data) % 256:
        raise EvidenceError("CCEL table checksum does not add up to zero")
    cc_type, cc_subtype, _reserved, laml, lasa = fields[9:]
    return CcelTable(cc_type=cc_type, cc_subtype=cc_subtype, laml=laml, lasa=lasa)


def build_ccel_table(laml: int, lasa: int, *, cc_type: int = CC_TYPE_TDX) -> bytes:
    """Return a 56-byte ACPI ``CCEL`` table with a valid checksum (for fakes and tests)."""
    table = bytearray(
        CCEL_TABLE.pack(
            b"CCEL",
            CCEL_TABLE_SIZE,
            1,
            0,
            b"DSTACK",
            b"FAKECCEL",
            1,
            b"DSTK",
            1,
            cc_type,
            0,
            0,
            laml,
            lasa,
        )
    )
    table[9] = -sum(table) % 256
    return bytes(table)


class Tcg2LogBuilder:
    """Builds a TCG2 crypto-agile log area, as TDVF writes it, for tests and fake kernels.

    ``Tcg2LogBuilder().add(1, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA").build(pad_to=65536)``
    gives the Spec ID header record and one ``TCG_PCR_EVENT2`` record whose SHA-384 digest
    is that of the event bytes, padded with 0xFF. :func:`parse_ccel` reads it back.
    """

    def __init__(
        self,
        *,
        header_mr_index: int = 1,
        algorithms: Sequence[tuple[int, int]] = ((TPM_ALG_SHA384, SHA384_DIGEST_SIZE),),
        vendor_info: bytes = b"",
    ) -> None:
        """:param header_mr_index: index field of the header record (TDVF writes 1).
        :param algorithms: ``(algorithm id, digest size)`` pairs the Spec ID event declares.
        """
        self._header_mr_index = header_mr_index
        self._algorithms = tuple(algorithms)
        self._vendor_info = bytes(vendor_info)
        self._records: list[bytes] = []

    def add(
        self,
        mr_index: int,
        event_type: int,
        event: bytes = b"",
        *,
        digest: bytes | None = None,
        extra_digests: Iterable[tuple[int, bytes]] = (),
    ) -> Tcg2LogBuilder:
        """Append one record and return the builder.

        :param mr_index: CC MR index (1..3 = RTMR0..2; 0 = MRTD).
        :param event: the event bytes.
        :param digest: the 48-byte SHA-384 digest; default SHA-384 of ``event``.
        :param extra_digests: ``(algorithm id, digest)`` pairs logged after the SHA-384 one.
        :raises InvalidEvent: on a digest that is not 48 bytes.
        """
        sha384 = hashlib.sha384(event).digest() if digest is None else bytes(digest)
        if len(sha384) != SHA384_DIGEST_SIZE:
            raise InvalidEvent(f"SHA-384 digest must be 48 bytes, got {len(sha384)}")
        digests = [(TPM_ALG_SHA384, sha384), *extra_digests]
        parts = [EVENT2_HEADER.pack(mr_index, event_type, len(digests))]
        for alg, value in digests:
            parts.append(DIGEST_ALGORITHM.pack(alg) + value)
        parts.append(EVENT_SIZE.pack(len(event)) + event)
        self._records.append(b"".join(parts))
        return self

    def header(self) -> bytes:
        """Return the legacy header record carrying the Spec ID event."""
        spec_id = b"".join(
            [
                SPEC_ID_HEADER.pack(SPEC_ID_SIGNATURE, 0, 0, 2, 0, 2, len(self._algorithms)),
                *(SPEC_ID_ALGORITHM.pack(alg, size) for alg, size in self._algorithms),
                SPEC_ID_VENDOR_INFO_SIZE.pack(len(self._vendor_info)),
                self._vendor_info,
            ]
        )
        return (
            LEGACY_EVENT_HEADER.pack(self._header_mr_index, EV_NO_ACTION, bytes(20), len(spec_id))
            + spec_id
        )

    def build(self, *, pad_to: int | None = None) -> bytes:
        """Return the log area: header, records, then 0xFF up to ``pad_to`` bytes if given.

        :raises InvalidEvent: if the log is longer than ``pad_to``.
        """
        log = self.header() + b"".join(self._records)
        if pad_to is None:
            return log
        if len(log) > pad_to:
            raise InvalidEvent(f"log of {len(log)} bytes does not fit in {pad_to}")
        return log + b"\xff" * (pad_to - len(log))
