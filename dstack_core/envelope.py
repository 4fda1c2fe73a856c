"""dstack-core's versioned attestation envelope: canonical CBOR, self-identifying.

The byte layout is specified (with CDDL) in ``docs/envelope.md``. In short: CBOR tag 55799
(self-described CBOR, bytes ``d9 d9 f7``) around a map whose ``format`` names this envelope,
``version`` is 1 and ``platform`` is the tag of the platform that made it (``simulator``
is never ``tdx``). The first byte, ``0xd9``, can never start upstream's V0 (``0x00``) or V1
(a msgpack map) envelopes, so :func:`sniff_envelope` tells all three apart.

Encoding is canonical (RFC 8949 core deterministic encoding), so one attestation has one
byte string. Decoding is strict: input that is not that one encoding of its value
(non-shortest integers or lengths, indefinite lengths, unsorted or duplicate map keys),
unknown versions or a version that is not an unsigned integer, missing or unknown keys,
wrong types and trailing bytes are :class:`~dstack_core.errors.EvidenceError`.
"""

from __future__ import annotations

import binascii
import functools
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs
import cbor2

from .errors import EvidenceError
from .eventlog import RUNTIME_EVENT_TYPE, RUNTIME_IMR, SHA384_DIGEST_SIZE, TdxEvent
from .slots import slot_setters
from .types import REPORT_DATA_LENGTH, is_evidence_format

__all__ = [
    "ENVELOPE_FORMAT",
    "ENVELOPE_VERSION",
    "SELF_DESCRIBE_TAG",
    "MAX_ENVELOPE_SIZE",
    "AppInfo",
    "EncodedEvents",
    "Envelope",
    "EnvelopeFields",
    "encode_envelope",
    "encode_envelope_hex",
    "encode_event",
    "sniff_envelope",
]

ENVELOPE_FORMAT: Final = "dstack-core/attestation"
ENVELOPE_VERSION: Final = 1
SELF_DESCRIBE_TAG: Final = 55799
ENVELOPE_MAGIC: Final = b"\xd9\xd9\xf7"
MAX_ENVELOPE_SIZE: Final = 10 * 1024 * 1024
MAX_EVENTS: Final = 100_000

_TOP_KEYS: Final = frozenset(
    {"format", "version", "platform", "evidence_format", "quote", "event_log", "report_data",
     "vm_config", "app_info", "extra"}
)
_EVENT_KEYS: Final = frozenset({"imr", "type", "digest", "event", "payload", "version"})
_APP_INFO_KEYS: Final = frozenset(
    {"app_id", "compose_hash", "instance_id", "device_id", "mr_aggregated", "mr_system",
     "os_image_hash", "key_provider_info"}
)


@attrs.frozen(kw_only=True)
class AppInfo:
    """What the agent claims about the app; a verifier recomputes it from the evidence."""

    app_id: bytes = b""
    compose_hash: bytes = b""
    instance_id: bytes = b""
    device_id: bytes = b""
    mr_aggregated: bytes = b""
    mr_system: bytes = b""
    os_image_hash: bytes = b""
    key_provider_info: bytes = b""

    def to_cbor_map(self) -> dict[str, bytes]:
        return attrs.asdict(self)

    def to_cbor(self) -> bytes:
        """Canonical CBOR map (the RA-TLS app-info extension's content)."""
        return self._cbor

    @functools.cached_property
    def _cbor(self) -> bytes:
        return cbor2.dumps(self.to_cbor_map(), canonical=True)

    @classmethod
    def from_cbor_map(cls, value: Any) -> AppInfo:
        doc = _expect_map(value, "app_info", _APP_INFO_KEYS, required=frozenset())
        return cls(**{k: _expect(v, bytes, f"app_info.{k}") for k, v in doc.items()})


@attrs.frozen(kw_only=True)
class Envelope:
    """One attestation: hardware evidence, the full event log and what it binds.

    :ivar platform: the producing platform's tag (``simulator``, ``tdx``, ``sev-snp``, ...).
    :ivar evidence_format: how to parse ``quote``: ``tdx``, ``sev-snp``, or a vendor's
        format (the verifier plugin registered under that name parses it).
    :ivar quote: the raw hardware evidence.
    :ivar event_log: boot events (RTMR0..2) then runtime events (RTMR3), full payloads.
    :ivar report_data: the 64 bytes the quote binds.
    :ivar vm_config: the sys-config ``vm_config`` JSON string.
    :ivar app_info: the agent's claims, recomputable from the rest.
    :ivar extra: platform-specific evidence (text keys, CBOR values).
    """

    platform: str = attrs.field(validator=attrs.validators.min_len(1))
    evidence_format: str
    quote: bytes
    event_log: tuple[TdxEvent, ...] = ()
    report_data: bytes = attrs.field()
    vm_config: str = ""
    app_info: AppInfo = attrs.field(factory=AppInfo)
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    version: int = ENVELOPE_VERSION

    @report_data.validator
    def _check_report_data(self, attribute: attrs.Attribute[Any], value: bytes) -> None:
        if len(value) != REPORT_DATA_LENGTH:
            raise ValueError(f"report_data must be {REPORT_DATA_LENGTH} bytes")

    def to_cbor(self) -> bytes:
        """Canonical CBOR bytes, starting with the self-describe tag ``d9 d9 f7``."""
        return encode_envelope(EnvelopeFields(
            platform=self.platform,
            evidence_format=self.evidence_format,
            quote=self.quote,
            events=EncodedEvents.of(self.event_log),
            report_data=self.report_data,
            vm_config=self.vm_config,
            app_info=self.app_info,
            extra=self.extra,
            version=self.version,
        ))

    @classmethod
    def from_cbor(cls, data: bytes) -> Envelope:
        """Decode and validate an envelope.

        :raises EvidenceError: not our envelope, not canonical CBOR, a version that is not
            the unsigned integer 1, wrong types, missing fields, trailing bytes, or more
            than :data:`MAX_ENVELOPE_SIZE` bytes.
        """
        if len(data) > MAX_ENVELOPE_SIZE:
            raise EvidenceError(f"envelope is larger than {MAX_ENVELOPE_SIZE} bytes")
        if not data.startswith(ENVELOPE_MAGIC):
            raise EvidenceError("not a dstack-core envelope (expected CBOR tag 55799)")
        fast = _decode_canonical(cls, data)
        if fast is not None:
            return fast
        return _decode_full(cls, data)

    @property
    def simulated(self) -> bool:
        """True when the producing platform says so by its tag (never trust it to say no)."""
        return self.platform == "simulator"


def _decode_full(cls: type[Envelope], data: bytes) -> Envelope:
    """:meth:`Envelope.from_cbor` of any input that starts with the magic: the full path,
    which decides every input and says why it refuses one."""
    # The magic is the self-describe tag's whole head: decode what it tags (whose maps
    # and arrays cbor2 then hands back as plain, mutable ones).
    stream = io.BytesIO(data)
    stream.seek(len(ENVELOPE_MAGIC))
    try:
        tagged = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise EvidenceError(f"envelope is not valid CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise EvidenceError(f"{len(data) - stream.tell()} trailing bytes after the envelope")
    # cbor2 strips a nested self-describe tag itself; accept either shape.
    doc = tagged.value if isinstance(tagged, cbor2.CBORTag) else tagged
    _require_canonical(doc, data)
    if not isinstance(doc, Mapping) or doc.get("format") != ENVELOPE_FORMAT:
        raise EvidenceError(f"envelope format is not {ENVELOPE_FORMAT!r}")
    version = doc.get("version")
    if type(version) is not int:
        raise EvidenceError(f"envelope version must be an unsigned integer, not {version!r}")
    if version != ENVELOPE_VERSION:
        raise EvidenceError(f"unsupported envelope version {version!r}")
    doc = _expect_map(
        doc, "envelope", _TOP_KEYS, required=_TOP_KEYS - {"extra", "app_info"}
    )
    events = _expect(doc["event_log"], (list, tuple), "event_log")
    if len(events) > MAX_EVENTS:
        raise EvidenceError(f"event log has more than {MAX_EVENTS} events")
    evidence_format = _expect(doc["evidence_format"], str, "evidence_format")
    if not is_evidence_format(evidence_format):
        raise EvidenceError(
            f"evidence_format {evidence_format[:80]!r} is not a format name (lower-case "
            "letters, digits, '.' and '-')"
        )
    try:
        return cls(
            platform=_expect(doc["platform"], str, "platform"),
            evidence_format=evidence_format,
            quote=_expect(doc["quote"], bytes, "quote"),
            event_log=tuple(_event_from_map(e, i) for i, e in enumerate(events)),
            report_data=_expect(doc["report_data"], bytes, "report_data"),
            vm_config=_expect(doc["vm_config"], str, "vm_config"),
            app_info=AppInfo.from_cbor_map(doc.get("app_info", {})),
            extra=_thaw(_expect(doc.get("extra", {}), Mapping, "extra")),
        )
    except ValueError as exc:
        raise EvidenceError(f"invalid envelope: {exc}") from None


@attrs.frozen(kw_only=True)
class EncodedEvents:
    """An event log already encoded for an envelope, so that an agent encodes each event
    once in its life rather than once per envelope.

    :ivar count: how many events.
    :ivar chunks: their canonical CBOR maps (:func:`encode_event`), concatenated and split
        anywhere into byte strings.
    :ivar hex_chunks: the same bytes in lower-case hex, for :func:`encode_envelope_hex`;
        None when not kept.
    """

    count: int
    chunks: Sequence[bytes | memoryview]
    hex_chunks: Sequence[bytes | memoryview] | None = None

    @classmethod
    def of(cls, events: Iterable[TdxEvent]) -> EncodedEvents:
        items = [encode_event(e) for e in events]
        return cls(count=len(items), chunks=items)


def encode_event(event: TdxEvent) -> bytes:
    """One event of an envelope's ``event_log``: a canonical CBOR map."""
    return cbor2.dumps(_event_to_map(event), canonical=True)


@attrs.frozen(kw_only=True)
class EnvelopeFields:
    """What an envelope says, with its events already encoded (:class:`EncodedEvents`);
    the caller vouches for the values (an :class:`Envelope` validates them)."""

    platform: str
    evidence_format: str
    quote: bytes
    events: EncodedEvents
    report_data: bytes
    vm_config: str
    app_info: AppInfo
    extra: Mapping[str, Any]
    version: int = ENVELOPE_VERSION


def encode_envelope(fields: EnvelopeFields) -> bytes:
    """The canonical CBOR of an envelope (:meth:`Envelope.to_cbor`), with pre-encoded events.

    Written out rather than through ``cbor2.dumps(..., canonical=True)``: the keys and their
    canonical order are fixed, the big values (quote, events) are only copied once, and
    this runs for every attestation. Tests hold it to cbor2's encoding.
    """
    return b"".join(_envelope_parts(fields, hexed=False))


def encode_envelope_hex(fields: EnvelopeFields) -> list[bytes | memoryview]:
    """:func:`encode_envelope` in lower-case hex, as pieces to join (the events must keep
    ``hex_chunks``): the events go in as kept, so a large log is not hex-encoded again."""
    return _envelope_parts(fields, hexed=True)


def _envelope_parts(fields: EnvelopeFields, *, hexed: bool) -> list[bytes | memoryview]:
    quote, report_data, events, extra = (
        fields.quote, fields.report_data, fields.events, fields.extra
    )
    values: dict[str, tuple[bytes | memoryview, ...]] = {
        "format": (_FORMAT,),
        "version": (cbor2.dumps(fields.version),),
        "platform": (cbor2.dumps(fields.platform),),
        "evidence_format": (cbor2.dumps(fields.evidence_format),),
        "quote": (_head(_BYTES, len(quote)), quote),
        "report_data": (_head(_BYTES, len(report_data)), report_data),
        "vm_config": (cbor2.dumps(fields.vm_config),),
        "app_info": (fields.app_info.to_cbor(),),
    }
    if extra:
        values["extra"] = (cbor2.dumps(dict(extra), canonical=True),)
    order = _ORDER_WITH_EXTRA if extra else _ORDER
    before: list[bytes | memoryview] = [ENVELOPE_MAGIC, _head(_MAP, len(order))]
    after: list[bytes | memoryview] = []
    current = before
    for key in order:
        current.append(_KEYS[key])
        if key == "event_log":
            current.append(_head(_ARRAY, events.count))
            current = after
        else:
            current.extend(values[key])
    if not hexed:
        return [*before, *events.chunks, *after]
    if events.hex_chunks is None:
        raise ValueError("encode_envelope_hex needs events that keep hex_chunks")
    hexlify = binascii.hexlify
    return [hexlify(b"".join(before)), *events.hex_chunks, hexlify(b"".join(after))]


_BYTES: Final = 2
_ARRAY: Final = 4
_MAP: Final = 5
_FORMAT: Final = cbor2.dumps(ENVELOPE_FORMAT)
_KEYS: Final = {key: cbor2.dumps(key) for key in _TOP_KEYS}
# RFC 7049 canonical order, as cbor2 sorts: shorter encoded keys first, then bytewise.
_ORDER: Final = tuple(
    sorted(_TOP_KEYS - {"extra"}, key=lambda key: (len(_KEYS[key]), _KEYS[key]))
)
_ORDER_WITH_EXTRA: Final = tuple(
    sorted(_TOP_KEYS, key=lambda key: (len(_KEYS[key]), _KEYS[key]))
)


def _head(major: int, value: int) -> bytes:
    """A CBOR head: major type and argument, in the shortest form."""
    if value < 24:
        return bytes([major << 5 | value])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | extra]) + value.to_bytes(size, "big")
    raise ValueError("value too large for a CBOR head")


def sniff_envelope(data: bytes) -> Literal["dstack-core", "upstream-v0", "upstream-v1"] | None:
    """Tell the three envelope formats apart by their first byte(s); None if none fits."""
    if data.startswith(ENVELOPE_MAGIC):
        return "dstack-core"
    if not data:
        return None
    first = data[0]
    if first == 0x00:
        return "upstream-v0"
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return "upstream-v1"
    return None


def _require_canonical(doc: Any, data: bytes) -> None:
    """Refuse any encoding but the canonical one of the decoded value.

    cbor2's decoder is lenient: it accepts non-shortest integers and lengths, indefinite
    lengths and unsorted keys, and keeps the last of duplicate map keys. Re-encoding the
    value canonically gives the one encoding; any difference (a duplicate key shortens the
    map) means the input was something else, which two decoders might read differently.

    A value of the envelope's own shape takes a quicker road to the same answer
    (:func:`_canonical_in_order`); anything else is re-encoded canonically.
    """
    if _canonical_in_order(doc, data):
        return
    try:
        canonical = cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBE_TAG, doc), canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError, RecursionError):
        canonical = b""
    if canonical != data:
        at = _first_difference(canonical, data)
        raise EvidenceError(
            f"envelope is not canonical CBOR (differs from the one encoding of its value at "
            f"byte {at}): non-shortest integers or lengths, indefinite lengths, or unsorted "
            "or duplicate map keys"
        )


_MAPS: Final = (dict, cbor2.frozendict)
"""What cbor2 decodes a map to (immutable inside a tag, such as the envelope's)."""
_SCALARS: Final = (int, str, bytes)
_KEY_ORDERS: dict[tuple[str, ...], bool] = {}
"""Whether a tuple of the schema's map keys is in canonical order (bounded: only tuples of
schema keys are remembered, at most a few hundred)."""
_SCHEMA_KEYS: Final = _TOP_KEYS | _EVENT_KEYS | _APP_INFO_KEYS


def _in_order(doc: dict[Any, Any]) -> bool:
    """Whether a map's keys are text in canonical order: shorter encodings first, then
    bytewise (cbor2's canonical map order)."""
    keys = tuple(doc)
    known = _KEY_ORDERS.get(keys)
    if known is not None:
        return known
    if not all(type(k) is str for k in keys):
        return False
    encoded = [k.encode("utf-8", "surrogatepass") for k in keys]
    ordered = encoded == sorted(encoded, key=lambda e: (len(e), e))
    if all(k in _SCHEMA_KEYS for k in keys):
        _KEY_ORDERS[keys] = ordered
    return ordered


def _canonical_in_order(doc: Any, data: bytes) -> bool:
    """Whether ``data`` is the canonical encoding of ``doc``, decided without sorting: true
    when every map has text keys in canonical order, every other value is an integer
    (not a boolean), text or bytes, and encoding ``doc`` in its own order gives ``data``.
    cbor2 always writes shortest heads and definite lengths, so for such a value the
    in-order encoding *is* the canonical one. False means "not decided here".
    """
    if type(doc) is not dict or not _in_order(doc):
        return False
    for key, value in doc.items():
        kind = type(value)
        if kind in _SCALARS:
            continue
        if key == "event_log" and kind is list:
            for event in value:
                if type(event) is not dict or not _in_order(event):
                    return False
                for item in event.values():
                    if type(item) not in _SCALARS:
                        return False
        elif key == "app_info" and kind is dict and _in_order(value):
            if not all(type(v) is bytes for v in value.values()):
                return False
        else:
            return False
    try:
        return cbor2.dumps(doc) == data[len(ENVELOPE_MAGIC):]
    except (cbor2.CBOREncodeError, ValueError, TypeError, RecursionError):
        return False


def _first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte where ``a`` and ``b`` differ (bisection over views, so
    a 10 MiB envelope costs a few comparisons, not a Python loop)."""
    left, right = memoryview(a), memoryview(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi) // 2
        if left[: mid + 1] == right[: mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _thaw(value: Any) -> Any:
    # cbor2 hands back immutable containers inside tags; callers expect plain ones.
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _event_to_map(event: TdxEvent) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "imr": event.imr,
        "type": event.event_type,
        "digest": event.digest,
        "event": event.event,
        "payload": event.event_payload,
    }
    if event.version != 1:
        doc["version"] = event.version
    return doc


_NEW_EVENT: Final = object.__new__
_EVENT_SLOTS: Final = slot_setters(
    TdxEvent, "imr", "event_type", "digest", "event", "event_payload", "version"
)
_FULL_EVENT: Final = frozenset(_EVENT_KEYS)
_SHORT_EVENT: Final = _EVENT_KEYS - {"version"}


def _fast_event(doc: Any) -> TdxEvent | None:
    """The event of a well-formed map, without attrs' per-field validator calls: every
    check of :func:`_event_from_map` and of :class:`TdxEvent`'s validators, inline. None
    when any does not hold (the slow path then says which)."""
    if type(doc) not in _MAPS or not (doc.keys() == _SHORT_EVENT or doc.keys() == _FULL_EVENT):
        return None
    imr, event_type, digest = doc["imr"], doc["type"], doc["digest"]
    name, payload, version = doc["event"], doc["payload"], doc.get("version", 1)
    if (
        type(imr) is not int or not 0 <= imr <= RUNTIME_IMR
        or type(event_type) is not int or not 0 <= event_type <= 0xFFFFFFFF
        or type(digest) is not bytes or type(payload) is not bytes
        or type(name) is not str or type(version) is not int or version not in (1, 2)
    ):
        return None
    if len(digest) != SHA384_DIGEST_SIZE and not (
        digest == b"" and imr == RUNTIME_IMR and event_type == RUNTIME_EVENT_TYPE
    ):
        return None
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return None
    event = _NEW_EVENT(TdxEvent)
    set_imr, set_type, set_digest, set_name, set_payload, set_version = _EVENT_SLOTS
    set_imr(event, imr)
    set_type(event, event_type)
    set_digest(event, digest)
    set_name(event, name)
    set_payload(event, payload)
    set_version(event, version)
    return event


_EVENT_ORDERS: Final = tuple(
    tuple(sorted(keys, key=lambda key: (len(key), key.encode())))
    for keys in (_SHORT_EVENT, _FULL_EVENT)
)
"""An event map's keys in canonical order, without and with ``version`` (ASCII keys:
the encoded length is the text's)."""


def _decode_canonical(cls: type[Envelope], data: bytes) -> Envelope | None:
    """The envelope of ``data`` when it is, beyond doubt, the canonical encoding of an
    envelope of the usual shape (no ``extra``, every field valid); None means "not decided
    here": :meth:`Envelope.from_cbor`'s full path then decides, and says why it refuses.

    One pass instead of decode, canonicity walk and event building: every map's keys are
    compared with their canonical order, every value's type with what the schema allows
    (integers that are not booleans, text, bytes: values with one encoding), and the value
    re-encoded in that order by cbor2's C encoder, which writes shortest heads and definite
    lengths, must give the input back byte for byte (so no duplicate key, no non-shortest
    head, no indefinite length, no nested tag and no trailing byte was there). For such a
    value that in-order encoding *is* the canonical one (``tests/test_envelope.py`` holds
    this path to the full one, forged inputs included).
    """
    body = data[len(ENVELOPE_MAGIC):]
    try:
        doc = cbor2.loads(body)
    except Exception:  # noqa: BLE001 - any failure: the full path decides and says why
        return None
    if type(doc) is not dict or tuple(doc) != _ORDER:
        return None
    platform, evidence_format, quote, report_data, vm_config, app_info, log = (
        doc["platform"], doc["evidence_format"], doc["quote"], doc["report_data"],
        doc["vm_config"], doc["app_info"], doc["event_log"],
    )
    if (
        doc["format"] != ENVELOPE_FORMAT
        or type(doc["version"]) is not int or doc["version"] != ENVELOPE_VERSION
        or type(platform) is not str or not platform
        or type(evidence_format) is not str or not is_evidence_format(evidence_format)
        or type(quote) is not bytes
        or type(report_data) is not bytes or len(report_data) != REPORT_DATA_LENGTH
        or type(vm_config) is not str
        or type(app_info) is not dict or not _in_order(app_info)
        or not app_info.keys() <= _APP_INFO_KEYS
        or any(type(v) is not bytes for v in app_info.values())
        or type(log) is not list or len(log) > MAX_EVENTS
    ):
        return None
    orders = _EVENT_ORDERS
    events = []
    for item in log:
        if type(item) is not dict or tuple(item) not in orders:
            return None
        event = _fast_event(item)
        if event is None:
            return None
        events.append(event)
    try:
        if cbor2.dumps(doc) != body:
            return None
    except Exception:  # noqa: BLE001 - as above
        return None
    return cls(
        platform=platform,
        evidence_format=evidence_format,
        quote=quote,
        event_log=tuple(events),
        report_data=report_data,
        vm_config=vm_config,
        app_info=AppInfo(**app_info),
        extra={},
    )


def _event_from_map(value: Any, index: int) -> TdxEvent:
    fast = _fast_event(value)
    if fast is not None:
        return fast
    where = f"event_log[{index}]"
    doc = _expect_map(value, where, _EVENT_KEYS, required=_EVENT_KEYS - {"version"})
    try:
        return TdxEvent(
            imr=_expect(doc["imr"], int, f"{where}.imr"),
            event_type=_expect(doc["type"], int, f"{where}.type"),
            digest=_expect(doc["digest"], bytes, f"{where}.digest"),
            event=_expect(doc["event"], str, f"{where}.event"),
            event_payload=_expect(doc["payload"], bytes, f"{where}.payload"),
            version=_expect(doc.get("version", 1), int, f"{where}.version"),
        )
    except (ValueError, TypeError) as exc:
        raise EvidenceError(f"invalid {where}: {exc}") from None


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int subclass; an envelope never carries booleans where integers belong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise EvidenceError(f"{where} must be {names}, got {type(value).__name__}")
    return value


def _expect_map(
    value: Any, where: str, allowed: frozenset[str], *, required: frozenset[str]
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise EvidenceError(f"{where} must be a map, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise EvidenceError(f"{where} has unknown keys: {sorted(map(str, unknown))}")
    missing = required - set(value)
    if missing:
        raise EvidenceError(f"{where} is missing keys: {sorted(missing)}")
    return value
