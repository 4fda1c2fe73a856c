"""Upstream dstack attestation envelopes: V0 (SCALE) and V1 (MessagePack), decoded and encoded.

The upstream agent (``dstack-attest``) sends a ``VersionedAttestation`` whose first byte
selects the wire format (formats.md 2.1, agent-api.md 9.6):

* ``0x00``: V0, the legacy enum tag, followed by a SCALE-encoded ``Attestation``
  (``quote: AttestationQuote``, ``runtime_events: Vec<RuntimeEvent>``,
  ``report_data: [u8; 64]``, ``config: String``); trailing bytes are an error.
* a MessagePack map (``0x80..0x8f``, ``0xde``, ``0xdf``): V1, ``rmp_serde::to_vec_named``
  of ``{"version": 1, "platform": {"kind", "data"}, "stack": {"kind", "data"}}``.

Both decode into one frozen :class:`UpstreamAttestation`. Decoding is pure, bounded and
strict: every length is checked against the bytes that remain before anything is read or
allocated, so a hostile compact length or array count fails at once instead of hanging,
and every malformed input raises :class:`~dstack_core.errors.EvidenceError` (never
``IndexError``, ``struct.error`` or a msgpack exception). Decoding proves nothing; the
verifier (:mod:`dstack_core.verify`) checks the quote and replays the events.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import attrs
import msgpack  # type: ignore[import-untyped]

from .appinfo import boot_event_payloads, derive_app_info
from .envelope import AppInfo
from .errors import EvidenceError
from .eventlog import MAX_EVENTS, InvalidEvent, RuntimeEvent, TdxEvent
from .quote import TdxQuote

__all__ = [
    "MAX_ATTESTATION_SIZE",
    "PLATFORM_KINDS",
    "REPORT_DATA_SIZE",
    "STACK_KINDS",
    "V0_QUOTE_VARIANTS",
    "V0_TAG",
    "V1_VERSION",
    "UpstreamAttestation",
    "decode_attestation",
    "decode_v0",
    "decode_v1",
    "is_upstream_attestation",
    "V0_PLATFORM_VARIANTS",
    "build_attestation",
    "certificate_extensions",
    "encode_app_info",
    "encode_attestation",
    "encode_v0",
    "encode_v1",
    "scale_bool",
    "scale_bytes",
    "scale_compact",
    "scale_str",
    "strip_for_certificate",
]

MAX_ATTESTATION_SIZE: Final = 10 * 1024 * 1024
"""Upstream refuses envelopes over 10 MiB; so do we, before decoding."""

V0_TAG: Final = 0x00
"""First byte of a V0 envelope (``LegacyVersionedAttestation::V0``)."""

V1_VERSION: Final = 1
"""The ``version`` a V1 envelope must carry."""

REPORT_DATA_SIZE: Final = 64

_MSGPACK_FIXMAP_FIRST: Final = 0x80
_MSGPACK_FIXMAP_LAST: Final = 0x8F
_MSGPACK_MAP16: Final = 0xDE
_MSGPACK_MAP32: Final = 0xDF

V0_QUOTE_VARIANTS: Final[Mapping[int, str]] = MappingProxyType(
    {0: "tdx", 1: "gcp-tdx", 2: "nitro-enclave", 3: "sev-snp", 4: "aws-nitro-tpm"}
)
"""SCALE index of ``AttestationQuote`` -> the V1 platform kind it corresponds to."""

PLATFORM_KINDS: Final = frozenset(V0_QUOTE_VARIANTS.values())
STACK_KINDS: Final = frozenset({"dstack", "dstack-pod"})

_U32: Final = struct.Struct("<I")
_COMPACT_MODE_MASK: Final = 0b11
_COMPACT_SINGLE: Final = 0
_COMPACT_TWO: Final = 1
_COMPACT_FOUR: Final = 2
_COMPACT_BIG: Final = 3
_COMPACT_TWO_MIN: Final = 1 << 6
_COMPACT_FOUR_MIN: Final = 1 << 14
_COMPACT_BIG_MIN: Final = 1 << 30
_U32_MAX: Final = 0xFFFF_FFFF
# Smallest SCALE encodings, used to bound element counts before looping.
_MIN_TDX_EVENT_SIZE: Final = 4 + 4 + 1 + 1 + 1
_MIN_RUNTIME_EVENT_SIZE: Final = 1 + 1
_MIN_VEC_SIZE: Final = 1


@attrs.frozen(kw_only=True)
class UpstreamAttestation:
    """An upstream ``VersionedAttestation``, decoded but not verified.

    :ivar wire_version: 0 (SCALE) or 1 (MessagePack).
    :ivar platform: the V1 platform kind (``tdx``, ``gcp-tdx``, ``nitro-enclave``,
        ``aws-nitro-tpm``, ``sev-snp``); V0 variants map to the same names.
    :ivar stack: ``dstack`` or ``dstack-pod`` (V0 is always ``dstack``).
    :ivar quote: the platform's primary evidence: the TDX quote, the SNP report, the NSM
        quote or the NitroTPM attestation document.
    :ivar event_log: the TDX event log (empty for other platforms).
    :ivar runtime_events: the runtime (RTMR3) events, the ones upstream replays.
    :ivar report_data: the 64 bytes the evidence must bind.
    :ivar config: the ``config`` string (a vm_config or sys-config JSON text).
    :ivar report_data_payload: ``dstack-pod`` only: the text whose ``app-data`` hash is
        the report data.
    :ivar preimages: V1 only: per event-log entry, the ``preimage`` bytes it carried, or
        None (same length as ``event_log``; empty for V0, which cannot carry preimages).
    :ivar extra: platform fields beyond the quote (``cert_chain``, ``mr_config``,
        ``tpm_quote``), as decoded.
    """

    wire_version: int
    platform: str
    stack: str = "dstack"
    quote: bytes
    event_log: tuple[TdxEvent, ...] = ()
    runtime_events: tuple[RuntimeEvent, ...] = ()
    report_data: bytes
    config: str = ""
    report_data_payload: str | None = None
    preimages: tuple[bytes | None, ...] = ()
    extra: Mapping[str, Any] = attrs.field(factory=dict)


def is_upstream_attestation(data: bytes) -> bool:
    """Whether the first byte selects an upstream wire format (V0 or V1). Not a validation."""
    if not data:
        return False
    first = data[0]
    return (
        first == V0_TAG
        or _MSGPACK_FIXMAP_FIRST <= first <= _MSGPACK_FIXMAP_LAST
        or first in (_MSGPACK_MAP16, _MSGPACK_MAP32)
    )


def decode_attestation(data: bytes) -> UpstreamAttestation:
    """Decode an upstream ``VersionedAttestation``, choosing V0 or V1 by the first byte.

    :param data: at most :data:`MAX_ATTESTATION_SIZE` bytes.
    :raises EvidenceError: empty, oversize, an unknown first byte, or any decoding error
        of :func:`decode_v0` / :func:`decode_v1`.
    """
    data = _as_bytes(data)
    if not data:
        raise EvidenceError("Empty attestation bytes")
    if data[0] == V0_TAG:
        return decode_v0(data)
    if is_upstream_attestation(data):
        return decode_v1(data)
    raise EvidenceError(f"Unknown attestation wire format (first byte {data[0]:#04x})")


def _as_bytes(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"attestation must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ATTESTATION_SIZE:
        raise EvidenceError(
            f"attestation is {len(data)} bytes, over the {MAX_ATTESTATION_SIZE}-byte limit"
        )
    return data


# --- V0: SCALE -------------------------------------------------------------------------


class _ScaleReader:
    """A bounded SCALE cursor; every short read or bad length is an :class:`EvidenceError`."""

    def __init__(self, data: bytes, label: str = "V0 attestation") -> None:
        self._data = data
        self._pos = 0
        self._label = label  # what errors call the input (a CSR reuses this reader)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise EvidenceError(
                f"{self._label} truncated: {what} needs {size} bytes at offset {self._pos},"
                f" only {self.remaining} left"
            )
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        (value,) = _U32.unpack(self.take(_U32.size, what))
        return int(value)

    def compact(self, what: str) -> int:
        """A canonical ``Compact<u32>`` (the length prefix of every Vec and String)."""
        first = self.u8(what)
        mode = first & _COMPACT_MODE_MASK
        if mode == _COMPACT_SINGLE:
            return first >> 2
        if mode == _COMPACT_TWO:
            value = (first | self.u8(what) << 8) >> 2
            minimum = _COMPACT_TWO_MIN
        elif mode == _COMPACT_FOUR:
            (raw,) = _U32.unpack(bytes([first]) + self.take(3, what))
            value = raw >> 2
            minimum = _COMPACT_FOUR_MIN
        else:
            extra = (first >> 2) + 4
            if extra != _U32.size:
                raise EvidenceError(f"{what}: compact length of {extra} bytes exceeds u32")
            value = int.from_bytes(self.take(extra, what), "little")
            minimum = _COMPACT_BIG_MIN
        if value < minimum:
            raise EvidenceError(f"{what}: non-canonical compact encoding")
        return value

    def count(self, what: str, min_item_size: int) -> int:
        """An element count, refused when the remaining bytes cannot possibly hold it."""
        value = self.compact(what)
        if value * min_item_size > self.remaining:
            raise EvidenceError(
                f"{self._label} truncated: {what} claims {value} items, only"
                f" {self.remaining} bytes left"
            )
        if value > MAX_EVENTS:
            raise EvidenceError(f"{what}: {value} items, more than {MAX_EVENTS}")
        return value

    def vec_u8(self, what: str) -> bytes:
        return self.take(self.compact(what), what)

    def string(self, what: str) -> str:
        raw = self.vec_u8(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise EvidenceError(f"{what} is not valid UTF-8") from None

    def expect_end(self) -> None:
        if self.remaining:
            raise EvidenceError(
                f"{self._label} has {self.remaining} trailing bytes after offset {self._pos}"
            )


def _scale_tdx_event(reader: _ScaleReader, index: int) -> TdxEvent:
    where = f"event_log[{index}]"
    imr = reader.u32(f"{where}.imr")
    event_type = reader.u32(f"{where}.event_type")
    digest = reader.vec_u8(f"{where}.digest")
    name = reader.string(f"{where}.event")
    payload = reader.vec_u8(f"{where}.event_payload")
    return _tdx_event(where, imr, event_type, digest, name, payload, 1)


def _tdx_event(
    where: str, imr: int, event_type: int, digest: bytes, name: str, payload: bytes, version: int
) -> TdxEvent:
    try:
        return TdxEvent(
            imr=imr,
            event_type=event_type,
            digest=digest,
            event=name,
            event_payload=payload,
            version=version,
        )
    except InvalidEvent as exc:
        raise EvidenceError(f"invalid {where}: {exc.message}") from None


def _runtime_event(where: str, name: str, payload: bytes, version: int) -> RuntimeEvent:
    try:
        return RuntimeEvent(event=name, payload=payload, version=version)
    except InvalidEvent as exc:
        raise EvidenceError(f"invalid {where}: {exc.message}") from None


def _scale_tdx_events(reader: _ScaleReader) -> tuple[TdxEvent, ...]:
    count = reader.count("event_log", _MIN_TDX_EVENT_SIZE)
    return tuple(_scale_tdx_event(reader, i) for i in range(count))


def decode_v0(data: bytes) -> UpstreamAttestation:
    """Decode a V0 envelope: ``0x00`` then SCALE ``Attestation``, nothing after it.

    ``DstackGcpTdx`` (variant 1) carries a TPM quote whose SCALE layout is not documented
    in our notes and is refused; the other four variants decode.

    :raises EvidenceError: a wrong tag, truncation, a non-canonical or impossible compact
        length, invalid UTF-8, an invalid event, an unknown or unsupported variant, or
        trailing bytes.
    """
    data = _as_bytes(data)
    reader = _ScaleReader(data)
    if reader.u8("version tag") != V0_TAG:
        raise EvidenceError("not a V0 attestation (first byte is not 0x00)")
    variant = reader.u8("AttestationQuote variant")
    platform = V0_QUOTE_VARIANTS.get(variant)
    if platform is None:
        raise EvidenceError(f"unknown AttestationQuote variant {variant}")
    event_log: tuple[TdxEvent, ...] = ()
    extra: dict[str, Any] = {}
    if platform == "tdx":
        quote = reader.vec_u8("quote")
        event_log = _scale_tdx_events(reader)
    elif platform == "gcp-tdx":
        raise EvidenceError(
            "V0 DstackGcpTdx attestations are not supported yet", code="unsupported_evidence"
        )
    elif platform == "sev-snp":
        quote = reader.vec_u8("report")
        chain_len = reader.count("cert_chain", _MIN_VEC_SIZE)
        extra["cert_chain"] = tuple(reader.vec_u8(f"cert_chain[{i}]") for i in range(chain_len))
        extra["mr_config"] = reader.string("mr_config")
    else:  # nitro-enclave: nsm_quote; aws-nitro-tpm: attestation_doc
        quote = reader.vec_u8("nsm_quote" if platform == "nitro-enclave" else "attestation_doc")
    count = reader.count("runtime_events", _MIN_RUNTIME_EVENT_SIZE)
    runtime = []
    for index in range(count):
        where = f"runtime_events[{index}]"
        name = reader.string(f"{where}.event")
        payload = reader.vec_u8(f"{where}.payload")
        runtime.append(_runtime_event(where, name, payload, 1))
    report_data = reader.take(REPORT_DATA_SIZE, "report_data")
    config = reader.string("config")
    reader.expect_end()
    return UpstreamAttestation(
        wire_version=0,
        platform=platform,
        quote=quote,
        event_log=event_log,
        runtime_events=tuple(runtime),
        report_data=report_data,
        config=config,
        extra=extra,
    )


# --- V1: MessagePack -------------------------------------------------------------------


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
        )
    except msgpack.ExtraData:
        raise EvidenceError("V1 attestation has trailing bytes after the map") from None
    except (
        msgpack.UnpackException,
        ValueError,
        TypeError,
        UnicodeDecodeError,
        RecursionError,
        OverflowError,
    ) as exc:
        detail = str(exc) or type(exc).__name__
        raise EvidenceError(f"V1 attestation is not valid MessagePack: {detail}") from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"unexpected MessagePack extension type {code}")


def _field(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise EvidenceError(f"{where} is missing {key!r}")
    return doc[key]


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise EvidenceError(f"{where} must be a map, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise EvidenceError(f"{where} must be an array, not {type(value).__name__}")
    if len(value) > MAX_EVENTS:
        raise EvidenceError(f"{where} has more than {MAX_EVENTS} items")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EvidenceError(f"{where} must be a string, not {type(value).__name__}")
    return value


def _uint(value: Any, where: str, maximum: int = _U32_MAX) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise EvidenceError(f"{where} must be an integer in 0..{maximum}")
    return value


def _bytes(value: Any, where: str) -> bytes:
    """``Vec<u8>``: rmp_serde writes an array of small integers; ``bin`` is accepted too."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, list):
        if not all(type(b) is int and 0 <= b <= 0xFF for b in value):
            raise EvidenceError(f"{where} must be an array of bytes (0..255)")
        return bytes(value)
    raise EvidenceError(f"{where} must be bytes, not {type(value).__name__}")


def _kind_and_data(value: Any, where: str) -> tuple[str, Mapping[str, Any]]:
    doc = _map(value, where)
    kind = _str(_field(doc, "kind", where), f"{where}.kind")
    return kind, _map(_field(doc, "data", where), f"{where}.data")


def _v1_tdx_event(value: Any, index: int) -> tuple[TdxEvent, bytes | None]:
    where = f"event_log[{index}]"
    doc = _map(value, where)
    version = _uint(doc.get("version", 1), f"{where}.version")
    preimage: bytes | None = None
    if doc.get("preimage") is not None:
        text = _str(doc["preimage"], f"{where}.preimage")
        try:
            # Not a regex: a repeated group over a long string backtracks into gigabytes.
            preimage = binascii.a2b_hex(text)
        except (binascii.Error, ValueError):
            raise EvidenceError(f"{where}.preimage is not an even-length hex string") from None
    event = _tdx_event(
        where,
        _uint(_field(doc, "imr", where), f"{where}.imr"),
        _uint(_field(doc, "event_type", where), f"{where}.event_type"),
        _bytes(_field(doc, "digest", where), f"{where}.digest"),
        _str(_field(doc, "event", where), f"{where}.event"),
        _bytes(_field(doc, "event_payload", where), f"{where}.event_payload"),
        version,
    )
    return event, preimage


def _v1_runtime_event(value: Any, index: int) -> RuntimeEvent:
    where = f"runtime_events[{index}]"
    doc = _map(value, where)
    return _runtime_event(
        where,
        _str(_field(doc, "event", where), f"{where}.event"),
        _bytes(_field(doc, "payload", where), f"{where}.payload"),
        _uint(doc.get("version", 1), f"{where}.version"),
    )


def _v1_platform(kind: str, data: Mapping[str, Any]) -> tuple[bytes, list[Any], dict[str, Any]]:
    where = f"platform[{kind}]"
    extra: dict[str, Any] = {}
    events: list[Any] = []
    if kind in ("tdx", "gcp-tdx"):
        quote = _bytes(_field(data, "quote", where), f"{where}.quote")
        events = _list(_field(data, "event_log", where), f"{where}.event_log")
        if kind == "gcp-tdx":
            extra["tpm_quote"] = _field(data, "tpm_quote", where)
    elif kind == "nitro-enclave":
        quote = _bytes(_field(data, "nsm_quote", where), f"{where}.nsm_quote")
    elif kind == "aws-nitro-tpm":
        quote = _bytes(_field(data, "attestation_doc", where), f"{where}.attestation_doc")
    elif kind == "sev-snp":
        quote = _bytes(_field(data, "report", where), f"{where}.report")
        chain = _list(_field(data, "cert_chain", where), f"{where}.cert_chain")
        extra["cert_chain"] = tuple(
            _bytes(c, f"{where}.cert_chain[{i}]") for i, c in enumerate(chain)
        )
        extra["mr_config"] = _str(_field(data, "mr_config", where), f"{where}.mr_config")
    else:
        raise EvidenceError(f"unknown V1 platform kind {kind!r}")
    return quote, events, extra


def decode_v1(data: bytes) -> UpstreamAttestation:
    """Decode a V1 envelope: one MessagePack map, nothing after it.

    Byte fields are accepted both as rmp_serde writes plain ``Vec<u8>`` (an array of
    integers) and as ``bin``; unknown map keys are ignored, as serde does.

    :raises EvidenceError: invalid MessagePack, trailing bytes, ``version`` other than 1,
        a missing or mistyped field, an unknown platform or stack kind, an invalid event,
        or report data that is not 64 bytes.
    """
    data = _as_bytes(data)
    doc = _map(_unpack(data), "V1 attestation")
    version = _field(doc, "version", "V1 attestation")
    if type(version) is not int or version != V1_VERSION:
        raise EvidenceError(f"unsupported V1 attestation version {version!r}")
    platform, platform_data = _kind_and_data(_field(doc, "platform", "V1"), "platform")
    stack, stack_data = _kind_and_data(_field(doc, "stack", "V1"), "stack")
    if stack not in STACK_KINDS:
        raise EvidenceError(f"unknown V1 stack kind {stack!r}")
    quote, raw_events, extra = _v1_platform(platform, platform_data)
    decoded = [_v1_tdx_event(e, i) for i, e in enumerate(raw_events)]
    report_data = _bytes(_field(stack_data, "report_data", "stack"), "stack.report_data")
    if len(report_data) != REPORT_DATA_SIZE:
        raise EvidenceError(
            f"stack.report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
        )
    runtime = _list(_field(stack_data, "runtime_events", "stack"), "stack.runtime_events")
    payload = None
    if stack == "dstack-pod":
        payload = _str(
            _field(stack_data, "report_data_payload", "stack"), "stack.report_data_payload"
        )
    return UpstreamAttestation(
        wire_version=1,
        platform=platform,
        stack=stack,
        quote=quote,
        event_log=tuple(event for event, _ in decoded),
        runtime_events=tuple(_v1_runtime_event(e, i) for i, e in enumerate(runtime)),
        report_data=report_data,
        config=_str(_field(stack_data, "config", "stack"), "stack.config"),
        report_data_payload=payload,
        preimages=tuple(preimage for _, preimage in decoded),
        extra=extra,
    )


# --- Encoding ----------------------------------------------------------------------------
#
# The inverse of the decoders above, for agents that must speak upstream's wire format: to an
# upstream KMS (CSR attestations), to upstream verifiers (Attest, RA-TLS certificates) and in
# GetQuote on platforms without TDX quotes. Encoding is canonical: decoding a genuine
# upstream envelope and encoding it again gives the same bytes.

V0_PLATFORM_VARIANTS: Final[Mapping[str, int]] = MappingProxyType(
    {kind: index for index, kind in V0_QUOTE_VARIANTS.items()}
)
"""V1 platform kind -> SCALE index of its ``AttestationQuote`` variant."""

RUNTIME_EVENT_VERSION_V2: Final = 2
_RUNTIME_IMR: Final = 3
INIT_SCRIPT_HASH_EVENT: Final = "init-script-hash"


def scale_compact(value: int) -> bytes:
    """SCALE ``Compact<u32>`` of ``value`` (canonical: the shortest mode that fits)."""
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"compact value out of range: {value}")
    if value < _COMPACT_TWO_MIN:
        return bytes([value << 2 | _COMPACT_SINGLE])
    if value < _COMPACT_FOUR_MIN:
        return (value << 2 | _COMPACT_TWO).to_bytes(2, "little")
    if value < _COMPACT_BIG_MIN:
        return (value << 2 | _COMPACT_FOUR).to_bytes(4, "little")
    return bytes([(_U32.size - 4) << 2 | _COMPACT_BIG]) + _U32.pack(value)


def scale_bytes(data: bytes) -> bytes:
    """SCALE ``Vec<u8>``: compact length, then the bytes."""
    return scale_compact(len(data)) + data


def scale_str(text: str) -> bytes:
    """SCALE ``String``: compact length, then UTF-8."""
    return scale_bytes(text.encode("utf-8"))


def scale_bool(value: bool) -> bytes:
    """SCALE ``bool``: one byte, 0 or 1."""
    return b"\x01" if value else b"\x00"


def _scale_tdx_event_bytes(event: TdxEvent) -> bytes:
    # version and preimage are #[codec(skip)] upstream: V0 cannot carry them.
    return (
        struct.pack("<II", event.imr, event.event_type)
        + scale_bytes(event.digest)
        + scale_str(event.event)
        + scale_bytes(event.event_payload)
    )


def _scale_vec(items: Sequence[bytes]) -> bytes:
    return scale_compact(len(items)) + b"".join(items)


def _extra_chain(attestation: UpstreamAttestation) -> tuple[bytes, ...]:
    return tuple(bytes(c) for c in attestation.extra.get("cert_chain", ()))


def encode_v0(attestation: UpstreamAttestation) -> bytes:
    """``0x00`` then the SCALE ``Attestation``: the exact inverse of :func:`decode_v0`.

    :raises ValueError: the attestation cannot be represented in V0: a ``dstack-pod``
        stack, a version-2 runtime event, a ``gcp-tdx`` platform (its TPM quote layout is
        not implemented) or report data that is not 64 bytes.
    """
    if attestation.stack != "dstack":
        raise ValueError("a dstack-pod attestation cannot be encoded as V0")
    if any(e.version != 1 for e in attestation.runtime_events):
        raise ValueError("version-2 runtime events cannot be encoded as V0")
    if len(attestation.report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes")
    platform = attestation.platform
    variant = V0_PLATFORM_VARIANTS.get(platform)
    if variant is None or platform == "gcp-tdx":
        raise ValueError(f"platform {platform!r} cannot be encoded as V0")
    out = bytes([V0_TAG, variant])
    if platform == "tdx":
        out += scale_bytes(attestation.quote)
        out += _scale_vec([_scale_tdx_event_bytes(e) for e in attestation.event_log])
    elif platform == "sev-snp":
        out += scale_bytes(attestation.quote)
        out += _scale_vec([scale_bytes(c) for c in _extra_chain(attestation)])
        out += scale_str(str(attestation.extra.get("mr_config", "")))
    else:  # nitro-enclave, aws-nitro-tpm: one Vec<u8>
        out += scale_bytes(attestation.quote)
    out += _scale_vec([scale_str(e.event) + scale_bytes(e.payload) for e in attestation.runtime_events])
    return out + attestation.report_data + scale_str(attestation.config)


def _msgpack_vec_u8(data: bytes) -> list[int]:
    # rmp_serde writes a plain Vec<u8> (no serde_bytes) as an array of small integers.
    return list(data)


def _v1_event_map(event: TdxEvent, preimage: bytes | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "imr": event.imr,
        "event_type": event.event_type,
        "digest": event.digest,
        "event": event.event,
        "event_payload": event.event_payload,
    }
    if event.version != 1:
        doc["version"] = event.version
    if preimage is not None:
        doc["preimage"] = preimage.hex()
    return doc


def _v1_runtime_map(event: RuntimeEvent) -> dict[str, Any]:
    doc: dict[str, Any] = {"event": event.event, "payload": event.payload}
    if event.version != 1:
        doc["version"] = event.version
    return doc


def _v1_platform_data(attestation: UpstreamAttestation) -> dict[str, Any]:
    platform = attestation.platform
    if platform in ("tdx", "gcp-tdx"):
        preimages = attestation.preimages or (None,) * len(attestation.event_log)
        if len(preimages) != len(attestation.event_log):
            raise ValueError("preimages must have one entry per event_log entry")
        data: dict[str, Any] = {
            "quote": _msgpack_vec_u8(attestation.quote),
            "event_log": [_v1_event_map(e, p) for e, p in zip(attestation.event_log, preimages)],
        }
        if platform == "gcp-tdx":
            data["tpm_quote"] = attestation.extra["tpm_quote"]
        return data
    if platform == "sev-snp":
        return {
            "report": _msgpack_vec_u8(attestation.quote),
            "cert_chain": [_msgpack_vec_u8(c) for c in _extra_chain(attestation)],
            "mr_config": str(attestation.extra.get("mr_config", "")),
        }
    if platform == "nitro-enclave":
        return {"nsm_quote": _msgpack_vec_u8(attestation.quote)}
    if platform == "aws-nitro-tpm":
        return {"attestation_doc": _msgpack_vec_u8(attestation.quote)}
    raise ValueError(f"unknown platform kind {platform!r}")


def encode_v1(attestation: UpstreamAttestation) -> bytes:
    """``rmp_serde::to_vec_named`` of the V1 ``Attestation``: the inverse of :func:`decode_v1`.

    Structs are maps with their fields in declaration order; plain ``Vec<u8>`` fields
    (quote, report, report_data, certificate chain entries) are arrays of integers, event
    digests and payloads are ``bin``; ``version`` is written only when it is not 1 and
    ``preimage`` (hex) only when given.

    :raises ValueError: an unknown platform or stack kind, or report data not 64 bytes.
    """
    if attestation.stack not in STACK_KINDS:
        raise ValueError(f"unknown stack kind {attestation.stack!r}")
    if len(attestation.report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes")
    stack: dict[str, Any] = {
        "report_data": _msgpack_vec_u8(attestation.report_data),
        "runtime_events": [_v1_runtime_map(e) for e in attestation.runtime_events],
        "config": attestation.config,
    }
    if attestation.stack == "dstack-pod":
        stack["report_data_payload"] = attestation.report_data_payload or ""
    doc = {
        "version": V1_VERSION,
        "platform": {"kind": attestation.platform, "data": _v1_platform_data(attestation)},
        "stack": {"kind": attestation.stack, "data": stack},
    }
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def encode_attestation(attestation: UpstreamAttestation) -> bytes:
    """The wire bytes of ``attestation`` in its own ``wire_version`` (0 or 1).

    :raises ValueError: as :func:`encode_v0` / :func:`encode_v1`, or an unknown version.
    """
    if attestation.wire_version == 0:
        return encode_v0(attestation)
    if attestation.wire_version == 1:
        return encode_v1(attestation)
    raise ValueError(f"unknown wire version {attestation.wire_version}")


def build_attestation(
    *,
    platform: str,
    quote: bytes,
    event_log: Sequence[TdxEvent],
    report_data: bytes,
    config: str,
    extra: Mapping[str, Any] | None = None,
) -> UpstreamAttestation:
    """Upstream's attestation of this guest, as its agent makes it (``Attestation::quote``
    then ``into_versioned``).

    * ``tdx``: the full event log (boot events then runtime events) and, separately, the
      runtime events it contains; version-2 runtime events carry their ``preimage``
      (``fill_event_preimages``).
    * ``sev-snp``: the report, ``extra["cert_chain"]`` and ``extra["mr_config"]``; no
      runtime events, as upstream's SNP attestations have none.

    The wire version is V0 unless a runtime event is version 2 (V0 cannot say so).

    :param config: the sys-config ``vm_config`` string.
    :raises ValueError: another platform, or report data that is not 64 bytes.
    """
    extra = dict(extra or {})
    if platform == "sev-snp":
        return UpstreamAttestation(
            wire_version=0,
            platform=platform,
            quote=quote,
            report_data=report_data,
            config=config,
            extra={
                "cert_chain": tuple(bytes(c) for c in extra.get("cert_chain", ())),
                "mr_config": str(extra.get("mr_config", "")),
            },
        )
    if platform != "tdx":
        raise ValueError(f"cannot build an upstream attestation for platform {platform!r}")
    events = tuple(event_log)
    runtime = tuple(e.to_runtime_event() for e in events if e.is_runtime)
    v2 = any(e.version != 1 for e in runtime)
    return UpstreamAttestation(
        wire_version=1 if v2 else 0,
        platform=platform,
        quote=quote,
        event_log=events,
        runtime_events=runtime,
        report_data=report_data,
        config=config,
        preimages=tuple(
            e.preimage if e.is_runtime and e.version != 1 else None for e in events
        ) if v2 else (),
    )


def strip_for_certificate(attestation: UpstreamAttestation) -> UpstreamAttestation:
    """``VersionedAttestation::into_stripped``: what an RA-TLS certificate embeds.

    TDX keeps only the RTMR0 ``ACPI DATA`` events (digest kept, payload ``ACPI DATA``) and
    the RTMR3 events (payload kept, digest emptied: it is recomputable); GCP TDX keeps the
    RTMR3 events only. Other platforms are unchanged.
    """
    platform = attestation.platform
    if platform not in ("tdx", "gcp-tdx"):
        return attestation
    kept: list[tuple[TdxEvent, bytes | None]] = []
    preimages = attestation.preimages or (None,) * len(attestation.event_log)
    for event, preimage in zip(attestation.event_log, preimages):
        if platform == "tdx" and event.is_acpi_data:
            kept.append((event.stripped(), preimage))
        elif event.imr == _RUNTIME_IMR:
            kept.append((event.stripped(), preimage))
    return attrs.evolve(
        attestation,
        event_log=tuple(e for e, _ in kept),
        preimages=tuple(p for _, p in kept) if attestation.preimages else (),
    )


def certificate_extensions(attestation: UpstreamAttestation) -> tuple[bytes, bytes]:
    """Upstream's RA-TLS extension payloads for ``attestation`` (made over the key's report
    data): the stripped attestation (``.1.8``) and the msgpack app info (``.1.9``), the latter
    derived from the unverified evidence as upstream's ``decode_app_info(false)`` does."""
    info = AppInfo()
    if attestation.platform == "tdx":
        report = TdxQuote.from_bytes(attestation.quote).report
        info = derive_app_info(report, attestation.event_log, attestation.config)
    app_info = encode_app_info(
        **attrs.asdict(info),
        init_script_hashes=boot_event_payloads(attestation.event_log, INIT_SCRIPT_HASH_EVENT),
    )
    return encode_attestation(strip_for_certificate(attestation)), app_info


def encode_app_info(
    *,
    app_id: bytes,
    compose_hash: bytes,
    instance_id: bytes,
    device_id: bytes,
    mr_system: bytes,
    mr_aggregated: bytes,
    os_image_hash: bytes,
    key_provider_info: bytes,
    init_script_hashes: Sequence[bytes] | None,
) -> bytes:
    """Upstream's RA-TLS app-info extension (``.1.9``): ``rmp_serde::to_vec`` of ``AppInfo``,
    a nine-element array of ``bin`` fields (``init_script_hashes`` nil or an array)."""
    hashes = None if init_script_hashes is None else [bytes(h) for h in init_script_hashes]
    packed: bytes = msgpack.packb(
        [app_id, compose_hash, instance_id, device_id, mr_system, mr_aggregated,
         os_image_hash, key_provider_info, hashes],
        use_bin_type=True,
    )
    return packed

