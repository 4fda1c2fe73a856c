"""Event logs of a TDX guest: events, digests, register replay and the durable runtime log.

A TDX guest has four runtime measurement registers (RTMR0..3) of 48 bytes each. Each
starts as 48 zero bytes and is only ever *extended*: ``r := SHA-384(r || digest)``. The
firmware extends RTMR0..2 during boot and records what it measured in the CCEL boot log
(parsed by :mod:`dstack_core.ccel`); dstack extends RTMR3 with *runtime events*, which it
records in a JSON-lines file. A verifier replays the logs and compares the result with the
registers in a quote.

This module holds:

* :class:`TdxEvent`, the event as it appears in the JSON event log of the guest-agent API
  (``imr`` is the 0-based register index), with strict JSON parsing and stripping;
* the runtime-event digests (:func:`runtime_event_digest`, versions 1 and 2);
* replay (:func:`extend`, :func:`replay`, :func:`replay_rtmrs`, :func:`replay_until`);
* :class:`RuntimeEvent` and :class:`RuntimeEventLog`, the durable RTMR3 log with a
  write-ahead protocol that survives a crash at any point between extending the register
  and appending to the log.

Everything except :class:`RuntimeEventLog` is pure. Malformed evidence raises
:class:`~dstack_core.errors.EvidenceError`; values built in code or from caller input with
bad fields raise :class:`InvalidEvent` (an :class:`~dstack_core.errors.InvalidRequest` and a
``ValueError``); an on-disk log that cannot be reconciled with the register raises
:class:`~dstack_core.errors.StateError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import importlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import attrs

from . import strictjson
from .errors import EvidenceError, InvalidRequest, StateError
from .statefile import fsync_dir

if TYPE_CHECKING:
    from _hashlib import HASH as _Hash

__all__ = [
    "ACPI_DATA_EVENT_NAMES",
    "ACPI_DATA_PAYLOAD",
    "EV_NO_ACTION",
    "EV_PLATFORM_CONFIG_FLAGS",
    "MAX_EVENTS",
    "MAX_EVENT_LOG_JSON_SIZE",
    "REGISTER_SIZE",
    "RTMR_COUNT",
    "RUNTIME_EVENT_TYPE",
    "RUNTIME_IMR",
    "SHA384_DIGEST_SIZE",
    "ZERO_REGISTER",
    "InvalidEvent",
    "LogBatch",
    "RecoveryOutcome",
    "RecoveryPlan",
    "RuntimeEvent",
    "RuntimeEventLog",
    "TdxEvent",
    "WAL_HEADER",
    "WAL_MAGIC",
    "WAL_SUFFIX",
    "events_from_json",
    "events_to_json",
    "extend",
    "replay",
    "replay_rtmrs",
    "replay_until",
    "runtime_event",
    "runtime_event_digest",
    "runtime_event_preimage",
    "sha384",
]

RUNTIME_EVENT_TYPE: Final = 0x08000001
"""Event type of every dstack runtime event (``DSTACK_RUNTIME_EVENT_TYPE``, 134217729)."""

RTMR_COUNT: Final = 4
"""Number of runtime measurement registers (RTMR0..3)."""

RUNTIME_IMR: Final = 3
"""The register runtime events extend (RTMR3)."""

SHA384_DIGEST_SIZE: Final = 48
"""Length in bytes of a SHA-384 digest: every event digest."""

REGISTER_SIZE: Final = SHA384_DIGEST_SIZE
"""Length in bytes of a measurement register."""

ZERO_REGISTER: Final = bytes(REGISTER_SIZE)
"""The value every register starts from."""

EV_NO_ACTION: Final = 0x00000003
"""TCG event type of informational records, which are logged but never extended."""

EV_PLATFORM_CONFIG_FLAGS: Final = 0x0000000A
"""TCG event type the firmware uses for the three RTMR0 ``ACPI DATA`` measurements."""

ACPI_DATA_PAYLOAD: Final = b"ACPI DATA"
"""Event bytes of the RTMR0 ACPI measurements (kept when a log is stripped)."""

ACPI_DATA_EVENT_NAMES: Final = ("acpi-loader", "acpi-rsdp", "acpi-tables")
"""Names given, in order, to the first three RTMR0 ``ACPI DATA`` events."""

MAX_EVENTS: Final = 100_000
"""Most events :func:`events_from_json` accepts in one log."""

MAX_EVENT_LOG_JSON_SIZE: Final = 64 * 1024 * 1024
"""Longest JSON text, in bytes or characters, :func:`events_from_json` accepts."""


def _small_sha384() -> Callable[[bytes], _Hash]:
    """CPython's own SHA-384 constructor (``_sha2`` from 3.12, ``_sha512`` before), else
    :func:`hashlib.sha384`.

    The same function, cheaper on the short inputs of a replay (48 + 48 bytes, event
    preimages): hashlib's OpenSSL constructor looks the algorithm up on every call (about
    0.35 us more per digest under OpenSSL 3; a verification makes some 45). Stdlib C code,
    tested against hashlib in tests/test_eventlog.py.
    """
    for name in ("_sha2", "_sha512"):
        with contextlib.suppress(ImportError):
            constructor = getattr(importlib.import_module(name), "sha384", None)
            if constructor is not None:
                return cast("Callable[[bytes], _Hash]", constructor)
    return hashlib.sha384


sha384: Final = _small_sha384()
"""``sha384(data)``: a SHA-384 hash object, as :func:`hashlib.sha384` (see
:func:`_small_sha384`)."""


class InvalidEvent(InvalidRequest, ValueError):
    """An event value built in code or from caller input is malformed (HTTP 400).

    Also a :class:`ValueError`, so code that builds attrs values the usual way and catches
    ``ValueError`` handles it too.
    """

    code = "invalid_event"


_U32_MAX: Final = 0xFFFFFFFF
_RUNTIME_TYPE_LE: Final = RUNTIME_EVENT_TYPE.to_bytes(4, "little")
_TDX_EVENT_KEYS: Final = ("imr", "event_type", "digest", "event", "event_payload")
_DIGEST_VERSIONS: Final = (1, 2)


_NEW: Final = object.__new__
_SET: Final = object.__setattr__


def _utf8(name: str) -> bytes:
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"event name is not valid UTF-8 text: {exc}") from None


def _check_version(version: object) -> int:
    if type(version) is not int or version not in _DIGEST_VERSIONS:
        raise InvalidEvent(f"event log version must be 1 or 2, not {version!r}")
    return version


def runtime_event_preimage(name: str, payload: bytes, version: int = 1) -> bytes:
    """Return the bytes hashed into a runtime event's digest.

    * version 1: ``le32(0x08000001) || b":" || utf8(name) || b":" || payload``;
    * version 2: RFC 8785 (JCS) JSON of ``{"name": name, "payload": lowercase-hex(payload),
      "type": 134217729}``, i.e. keys in that order, no whitespace, non-ASCII verbatim.

    :param name: the event name; any text that encodes as UTF-8 (empty allowed).
    :param payload: the event payload, any length.
    :param version: the digest version of the boot, 1 or 2.
    :raises InvalidEvent: on a name with lone surrogates or an unknown version.
    """
    version = _check_version(version)
    if not isinstance(name, str) or not isinstance(payload, (bytes, bytearray)):
        raise InvalidEvent("event name must be str and payload bytes")
    encoded = _utf8(name)
    if version == 1:
        return _RUNTIME_TYPE_LE + b":" + encoded + b":" + bytes(payload)
    # For three fixed ASCII keys and an integer, sorted compact json.dumps is exactly JCS:
    # same key order, same escapes (short forms and lowercase \u00xx), UTF-8 verbatim.
    canonical = json.dumps(
        {"name": name, "payload": bytes(payload).hex(), "type": RUNTIME_EVENT_TYPE},
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    )
    return canonical.encode("utf-8")


def runtime_event_digest(name: str, payload: bytes, version: int = 1) -> bytes:
    """Return the 48-byte SHA-384 digest a runtime event extends RTMR3 with.

    See :func:`runtime_event_preimage` for what is hashed.

    :raises InvalidEvent: as :func:`runtime_event_preimage`.
    """
    return sha384(runtime_event_preimage(name, payload, version)).digest()


def _check_imr(imr: object) -> int:
    if type(imr) is not int or not 0 <= imr < RTMR_COUNT:
        raise InvalidEvent(f"imr must be an integer 0..{RTMR_COUNT - 1}, not {imr!r}")
    return imr


def _validate_imr(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    _check_imr(value)


def _validate_u32(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise InvalidEvent(f"{attr.name} must be an unsigned 32-bit integer, not {value!r}")


def _validate_bytes(_inst: object, attr: attrs.Attribute[bytes], value: bytes) -> None:
    if type(value) is not bytes:
        raise InvalidEvent(f"{attr.name} must be bytes, not {type(value).__name__}")


def _validate_name(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if type(value) is not str:
        raise InvalidEvent(f"{attr.name} must be str, not {type(value).__name__}")
    _utf8(value)


def _validate_version(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    _check_version(value)


@attrs.frozen(kw_only=True)
class TdxEvent:
    """One measured event, as carried in the guest agent's JSON event log.

    :ivar imr: the 0-based register the event extended (0..3 = RTMR0..3).
    :ivar event_type: the TCG event type (u32); :data:`RUNTIME_EVENT_TYPE` for dstack events.
    :ivar digest: the SHA-384 digest extended, 48 bytes; ``b""`` only for a runtime event,
        whose digest is recomputable from name, payload and version (see :attr:`digest_for_replay`).
    :ivar event: the event name; ``""`` for firmware events other than the ACPI ones.
    :ivar event_payload: the measured or described bytes (may be stripped to ``b""``).
    :ivar version: the runtime digest version, 1 or 2.
    :raises InvalidEvent: from the constructor, on any field out of range.
    """

    imr: int = attrs.field(validator=_validate_imr)
    event_type: int = attrs.field(validator=_validate_u32)
    digest: bytes = attrs.field(validator=_validate_bytes)
    event: str = attrs.field(validator=_validate_name)
    event_payload: bytes = attrs.field(validator=_validate_bytes)
    version: int = attrs.field(default=1, validator=_validate_version)

    def __attrs_post_init__(self) -> None:
        if len(self.digest) == SHA384_DIGEST_SIZE:
            return
        if self.digest == b"" and self.is_runtime:
            return
        raise InvalidEvent(
            f"digest must be {SHA384_DIGEST_SIZE} bytes (empty only for a runtime event), "
            f"got {len(self.digest)}"
        )

    @property
    def is_runtime(self) -> bool:
        """Whether this is a dstack runtime event (RTMR3, type ``0x08000001``)."""
        return self.imr == RUNTIME_IMR and self.event_type == RUNTIME_EVENT_TYPE

    @property
    def is_acpi_data(self) -> bool:
        """Whether this is one of the RTMR0 ``ACPI DATA`` firmware events."""
        return (
            self.imr == 0
            and self.event_type == EV_PLATFORM_CONFIG_FLAGS
            and self.event_payload == ACPI_DATA_PAYLOAD
        )

    @property
    def computed_digest(self) -> bytes:
        """The digest recomputed from name, payload and version; runtime events only.

        :raises InvalidEvent: if this is not a runtime event.
        """
        if not self.is_runtime:
            raise InvalidEvent("only runtime events have a recomputable digest")
        return runtime_event_digest(self.event, self.event_payload, self.version)

    @property
    def digest_for_replay(self) -> bytes:
        """The digest replay extends with: :attr:`digest`, or the recomputed one if empty.

        A runtime event whose recorded digest disagrees with its content keeps the recorded
        one here: a verifier compares the replay with the quote and will see the mismatch.
        """
        return self.digest if self.digest else self.computed_digest

    @property
    def preimage(self) -> bytes:
        """The preimage of a runtime event's digest (see :func:`runtime_event_preimage`).

        :raises InvalidEvent: if this is not a runtime event.
        """
        if not self.is_runtime:
            raise InvalidEvent("only runtime events have a digest preimage")
        return runtime_event_preimage(self.event, self.event_payload, self.version)

    def stripped(self) -> TdxEvent:
        """Return the event as upstream sends it in quotes and certificates.

        Runtime events keep their payload and lose the digest (the verifier recomputes it);
        other events keep the digest and lose the payload, except the RTMR0 ``ACPI DATA``
        events, which keep the payload ``b"ACPI DATA"`` that identifies them.
        """
        if self.is_runtime:
            return attrs.evolve(self, digest=b"")
        payload = ACPI_DATA_PAYLOAD if self.is_acpi_data else b""
        return attrs.evolve(self, event_payload=payload)

    def to_runtime_event(self) -> RuntimeEvent:
        """Return the :class:`RuntimeEvent` this runtime event records.

        :raises InvalidEvent: if this is not a runtime event.
        """
        if not self.is_runtime:
            raise InvalidEvent("not a runtime event")
        # A TdxEvent's name, payload and version already hold RuntimeEvent's invariants
        # (the same validators ran, and both are frozen): built without running them again
        # (a verification makes one per bound runtime event).
        event = _NEW(RuntimeEvent)
        _SET(event, "event", self.event)
        _SET(event, "payload", self.event_payload)
        _SET(event, "version", self.version)
        return event

    def to_json(self, *, include_preimage: bool = False) -> dict[str, Any]:
        """Return the upstream JSON object, keys in upstream order, hex in lowercase.

        ``{"imr", "event_type", "digest", "event", "event_payload"}`` plus ``"version": 2``
        for version-2 events and, with ``include_preimage``, ``"preimage"`` (hex) for
        version-2 runtime events only, as upstream fills it.
        """
        obj: dict[str, Any] = {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.event,
            "event_payload": self.event_payload.hex(),
        }
        if self.version == 2:
            obj["version"] = 2
            if include_preimage and self.is_runtime:
                obj["preimage"] = self.preimage.hex()
        return obj

    @classmethod
    def from_json(cls, obj: object) -> TdxEvent:
        """Parse one event object of the upstream JSON format, strictly.

        The five fields of :meth:`to_json` are required with exact JSON types (integers that
        are not booleans, strings); ``version`` is optional (1 or 2); ``preimage`` must be hex
        if present and is otherwise ignored, since it is recomputable; other keys are ignored,
        as upstream does. Hex may carry a ``0x`` prefix and upper-case digits. A runtime event
        with an empty digest gets the recomputed one; a runtime event with a wrong digest is
        kept as given.

        :raises EvidenceError: on a non-object, a missing key, a wrong type, bad hex, an
            ``imr`` outside 0..3 or a digest that is neither 48 bytes nor (runtime) empty.
        """
        if not isinstance(obj, Mapping):
            raise EvidenceError(f"event must be a JSON object, not {type(obj).__name__}")
        for key in _TDX_EVENT_KEYS:
            if key not in obj:
                raise EvidenceError(f"event is missing {key!r}")
        imr = _json_int(obj, "imr")
        event_type = _json_int(obj, "event_type")
        digest = _json_hex(obj, "digest")
        name = obj["event"]
        if not isinstance(name, str):
            raise EvidenceError(f"'event' must be a string, not {type(name).__name__}")
        payload = _json_hex(obj, "event_payload")
        version = _json_int(obj, "version") if "version" in obj else 1
        if "preimage" in obj:
            _json_hex(obj, "preimage")
        try:
            event = cls(
                imr=imr,
                event_type=event_type,
                digest=digest,
                event=name,
                event_payload=payload,
                version=version,
            )
            if not digest and event.is_runtime:
                event = attrs.evolve(event, digest=event.computed_digest)
        except InvalidEvent as exc:
            raise EvidenceError(f"invalid event: {exc.message}") from None
        return event


def _json_int(obj: Mapping[str, object], key: str) -> int:
    value = obj[key]
    if type(value) is not int:
        raise EvidenceError(f"{key!r} must be an integer, not {type(value).__name__}")
    return value


def _json_hex(obj: Mapping[str, object], key: str) -> bytes:
    value = obj[key]
    if not isinstance(value, str):
        raise EvidenceError(f"{key!r} must be a hex string, not {type(value).__name__}")
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        # Not a regex: a repeated group over a long string backtracks into gigabytes.
        return binascii.a2b_hex(text)
    except (binascii.Error, ValueError):  # odd length, a non-hex or non-ASCII character
        raise EvidenceError(f"{key!r} is not an even-length hex string") from None


def runtime_event(name: str, payload: bytes, version: int = 1) -> TdxEvent:
    """Return the RTMR3 :class:`TdxEvent` for a runtime event, digest computed.

    :raises InvalidEvent: as :func:`runtime_event_preimage`.
    """
    return RuntimeEvent(event=name, payload=bytes(payload), version=version).to_tdx_event()


def extend(register: bytes, digest: bytes) -> bytes:
    """Return ``SHA-384(register || digest)``, the register after one extend.

    :param register: the current value, 48 bytes.
    :param digest: the digest extended, 48 bytes.
    :raises InvalidEvent: if either is not 48 bytes.
    """
    if len(register) != REGISTER_SIZE or len(digest) != SHA384_DIGEST_SIZE:
        raise InvalidEvent(
            f"extend needs a {REGISTER_SIZE}-byte register and a {SHA384_DIGEST_SIZE}-byte "
            f"digest, got {len(register)} and {len(digest)}"
        )
    return sha384(bytes(register) + bytes(digest)).digest()


def replay(events: Iterable[TdxEvent], imr: int) -> bytes:
    """Return the value register ``imr`` has after extending with ``events`` from zero.

    Only events of that register count; ``EV_NO_ACTION`` events are skipped (they are
    informational and never extended). Runtime events with an empty digest use the
    recomputed one.

    :raises InvalidEvent: if ``imr`` is not 0..3.
    """
    _check_imr(imr)
    register = ZERO_REGISTER
    for event in events:
        if event.imr == imr and event.event_type != EV_NO_ACTION:
            register = extend(register, event.digest_for_replay)
    return register


def replay_rtmrs(events: Iterable[TdxEvent]) -> tuple[bytes, bytes, bytes, bytes]:
    """Return RTMR0..3 after replaying ``events`` from zero (see :func:`replay`)."""
    registers = [ZERO_REGISTER] * RTMR_COUNT
    for event in events:
        if event.event_type != EV_NO_ACTION:
            registers[event.imr] = extend(registers[event.imr], event.digest_for_replay)
    return registers[0], registers[1], registers[2], registers[3]


def replay_until(
    events: Iterable[TdxEvent], imr: int, stop_after_event_name: str, *, require: bool = False
) -> bytes:
    """Replay register ``imr`` up to and including the first event named ``stop_after_event_name``.

    This gives boot-time values such as RTMR3 at ``boot-mr-done``. As upstream does, the
    whole register is replayed when no such event exists, unless ``require`` is true.

    :raises InvalidEvent: if ``imr`` is not 0..3.
    :raises EvidenceError: with ``require``, if no event of that register has the name.
    """
    _check_imr(imr)
    register = ZERO_REGISTER
    for event in events:
        if event.imr != imr or event.event_type == EV_NO_ACTION:
            continue
        register = extend(register, event.digest_for_replay)
        if event.event == stop_after_event_name:
            return register
    if require:
        raise EvidenceError(f"no event {stop_after_event_name!r} in the log of register {imr}")
    return register


def events_to_json(
    events: Iterable[TdxEvent], *, strip: bool = False, include_preimage: bool = False
) -> str:
    """Return the compact JSON array of ``events`` as upstream serialises it.

    :param strip: send each event :meth:`~TdxEvent.stripped`.
    :param include_preimage: add ``preimage`` to version-2 runtime events.
    """
    items = [
        (event.stripped() if strip else event).to_json(include_preimage=include_preimage)
        for event in events
    ]
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


def events_from_json(text_or_list: str | bytes | Sequence[object]) -> tuple[TdxEvent, ...]:
    """Parse a JSON event log: JSON text, or an already decoded list.

    Each element is parsed with :meth:`TdxEvent.from_json`.

    :raises EvidenceError: on invalid JSON (including NaN, duplicate keys and excessive
        nesting), a top level that is not an array, more than :data:`MAX_EVENTS` events,
        text over :data:`MAX_EVENT_LOG_JSON_SIZE`, or any malformed event (named by index).
    """
    if isinstance(text_or_list, (str, bytes, bytearray)):
        if len(text_or_list) > MAX_EVENT_LOG_JSON_SIZE:
            raise EvidenceError("event log JSON is too large")
        text = bytes(text_or_list) if isinstance(text_or_list, bytearray) else text_or_list
        try:
            decoded = strictjson.loads(text)
        except ValueError as exc:
            raise EvidenceError(f"event log is not valid JSON: {exc}") from None
    else:
        decoded = text_or_list
    if not isinstance(decoded, (list, tuple)):
        raise EvidenceError(f"event log must be a JSON array, not {type(decoded).__name__}")
    if len(decoded) > MAX_EVENTS:
        raise EvidenceError(f"event log has {len(decoded)} events, more than {MAX_EVENTS}")
    events = []
    for index, item in enumerate(decoded):
        try:
            events.append(TdxEvent.from_json(item))
        except EvidenceError as exc:
            raise EvidenceError(f"event {index}: {exc.message}") from None
    return tuple(events)


@attrs.frozen(kw_only=True)
class RuntimeEvent:
    """A dstack runtime event: what the RTMR3 log file records per line.

    :ivar event: the name; any UTF-8 text, empty allowed (upstream does not restrict it).
    :ivar payload: the payload bytes.
    :ivar version: the digest version, 1 or 2 (fixed per boot).
    :raises InvalidEvent: from the constructor, on a bad field.
    """

    event: str = attrs.field(validator=_validate_name)
    payload: bytes = attrs.field(validator=_validate_bytes)
    version: int = attrs.field(default=1, validator=_validate_version)

    @functools.cached_property
    def digest(self) -> bytes:
        """The 48-byte digest RTMR3 is extended with (:func:`runtime_event_digest`)."""
        return runtime_event_digest(self.event, self.payload, self.version)

    def to_tdx_event(self) -> TdxEvent:
        """Return the RTMR3 :class:`TdxEvent` of this event, digest filled."""
        return TdxEvent(
            imr=RUNTIME_IMR,
            event_type=RUNTIME_EVENT_TYPE,
            digest=self.digest,
            event=self.event,
            event_payload=self.payload,
            version=self.version,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the log-line object ``{"event", "payload": base64}`` (+ ``"version": 2``)."""
        obj: dict[str, Any] = {
            "event": self.event,
            "payload": base64.b64encode(self.payload).decode("ascii"),
        }
        if self.version == 2:
            obj["version"] = 2
        return obj

    def to_log_line(self) -> bytes:
        """Return the event as one compact UTF-8 JSON line, newline included."""
        return self._log_line

    @functools.cached_property
    def _log_line(self) -> bytes:
        text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, obj: object) -> RuntimeEvent:
        """Parse a log-line object: ``event`` string, ``payload`` standard padded base64.

        ``version`` is optional (1 or 2); other keys are ignored, as upstream does.

        :raises EvidenceError: on anything else.
        """
        if not isinstance(obj, Mapping):
            raise EvidenceError(f"runtime event must be a JSON object, not {type(obj).__name__}")
        name = obj.get("event")
        payload = obj.get("payload")
        if not isinstance(name, str) or not isinstance(payload, str):
            raise EvidenceError("runtime event needs string fields 'event' and 'payload'")
        try:
            raw = base64.b64decode(payload.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            raise EvidenceError("runtime event payload is not standard base64") from None
        version = _json_int(obj, "version") if "version" in obj else 1
        try:
            return cls(event=name, payload=raw, version=version)
        except InvalidEvent as exc:
            raise EvidenceError(f"invalid runtime event: {exc.message}") from None

    @classmethod
    def from_log_line(cls, line: bytes) -> RuntimeEvent:
        """Parse one line of the runtime log (without or with its newline).

        :raises EvidenceError: if the line is not a valid event.
        """
        try:
            obj = strictjson.loads(line)
        except ValueError as exc:
            raise EvidenceError(f"runtime event line is not valid JSON: {exc}") from None
        return cls.from_json(obj)


RecoveryOutcome = Literal["committed", "discarded", "clean"]
"""What :meth:`RuntimeEventLog.recover` found and did."""

WAL_SUFFIX: Final = ".wal"
"""The write-ahead record lives next to the log, as ``<log>.wal``."""

WAL_MAGIC: Final = b"DSTKWAL1"
"""First bytes of a write-ahead record (format version 1)."""

WAL_HEADER: Final = struct.Struct("<8sQQII32s")
"""magic, position (events before the batch), offset (bytes before it), event count, body
length, SHA-256 over the header's first five fields and the body. The body is the batch's
log lines exactly as they will be appended."""

_WAL_CHECKED: Final = struct.Struct("<8sQQII")
_LEGACY_PENDING_SUFFIX: Final = ".pending"


@attrs.frozen(kw_only=True)
class LogBatch:
    """Runtime events that enter the log together, and where in the log they go.

    :ivar position: how many events the log holds before the batch.
    :ivar offset: how many bytes the log holds before the batch (its complete lines).
    :ivar events: the batch, in the order the register is extended.
    :ivar lines: each event's log line (:meth:`RuntimeEvent.to_log_line`).
    """

    position: int
    offset: int
    events: tuple[RuntimeEvent, ...]
    lines: tuple[bytes, ...] = attrs.field(repr=False)

    @classmethod
    def at(cls, position: int, offset: int, events: Sequence[RuntimeEvent]) -> LogBatch:
        """The batch of ``events`` to be appended at ``position`` / ``offset``."""
        events = tuple(events)
        return cls(
            position=position,
            offset=offset,
            events=events,
            lines=tuple(e.to_log_line() for e in events),
        )

    @property
    def data(self) -> bytes:
        """The bytes appended to the log."""
        return b"".join(self.lines)

    @property
    def end_position(self) -> int:
        return self.position + len(self.events)

    @property
    def end_offset(self) -> int:
        return self.offset + sum(map(len, self.lines))

    def head(self, count: int) -> LogBatch:
        """The first ``count`` events, at the same place."""
        return attrs.evolve(self, events=self.events[:count], lines=self.lines[:count])

    def tail(self, count: int) -> LogBatch:
        """The events after the first ``count``, placed after them."""
        skipped = sum(map(len, self.lines[:count]))
        return LogBatch(
            position=self.position + count,
            offset=self.offset + skipped,
            events=self.events[count:],
            lines=self.lines[count:],
        )

    def to_record(self) -> bytes:
        """The write-ahead record of this batch (:data:`WAL_HEADER` + body)."""
        body = self.data
        fields = (WAL_MAGIC, self.position, self.offset, len(self.events), len(body))
        checked = _WAL_CHECKED.pack(*fields)
        return WAL_HEADER.pack(*fields, hashlib.sha256(checked + body).digest()) + body

    @classmethod
    def from_record(cls, data: bytes) -> LogBatch | None:
        """Parse a write-ahead record; None for an empty, torn or cleared one.

        A record whose checksum holds but whose lines do not parse cannot come from a
        torn write.

        :raises StateError: such a record.
        """
        if len(data) < WAL_HEADER.size:
            return None
        magic, position, offset, count, length, digest = WAL_HEADER.unpack_from(data)
        body = data[WAL_HEADER.size : WAL_HEADER.size + length]
        if magic != WAL_MAGIC or count == 0 or len(body) != length:
            return None
        checked = _WAL_CHECKED.pack(magic, position, offset, count, length)
        if not hmac.compare_digest(hashlib.sha256(checked + body).digest(), digest):
            return None
        lines = body.split(b"\n")[:-1]
        try:
            events = tuple(RuntimeEvent.from_log_line(line) for line in lines)
        except EvidenceError as exc:
            raise StateError(f"write-ahead record is corrupt: {exc.message}") from None
        if len(events) != count:
            raise StateError("write-ahead record is corrupt: wrong event count")
        return cls.at(position, offset, events)


_CLEARED_RECORD: Final = WAL_HEADER.pack(WAL_MAGIC, 0, 0, 0, 0, bytes(32))


@attrs.frozen(kw_only=True)
class RecoveryPlan:
    """What start-up recovery found, and the repair that makes the log replay to RTMR3.

    :ivar outcome: ``clean``, ``committed`` (written-ahead events the register holds are
        to be appended) or ``discarded`` (written-ahead events it does not hold are dropped).
    :ivar events: the log as it reads once repaired; it replays to the register.
    :ivar size: the repaired log's size in bytes.
    :ivar repair: the append still to be made durable (it may only cut a torn tail), or
        None when the file is already right.
    """

    outcome: RecoveryOutcome
    events: tuple[RuntimeEvent, ...]
    size: int
    repair: LogBatch | None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class RuntimeEventLog:
    """The durable RTMR3 event log: one JSON-lines file in upstream's format.

    Each line is ``{"event": name, "payload": <standard base64>}`` plus ``"version": 2`` for
    version-2 events, UTF-8, newline-terminated. The boot process writes the first lines
    (``system-preparing`` ... ``system-ready``) to the same file, so replaying *every* line
    from 48 zero bytes must give RTMR3. Files are created with mode 0600.

    Recording events is a write-ahead protocol over batches, so that a crash at any point
    leaves a state :meth:`recover` can reconcile with the register::

        log.write_ahead(batch)           # durable <path>.wal: where the batch goes, and what
        platform.extend(each digest)     # in order; a failure may leave a prefix extended
        log.append(batch.head(m))        # durable append of what the register holds
        log.clear_ahead()                # not durable: recovery ignores a stale record

    :meth:`append` is idempotent (it first cuts the file to ``batch.offset``), so a failed
    append is simply tried again. Recovery reads the record's position: the register says
    how many of its events were extended, and exactly those end up in the log.

    The class takes no locks: the caller serialises writers (the agent's committer task is
    the only writer after boot). Readers may call :meth:`read` at any time; a line being
    appended is not visible until complete.
    """

    def __init__(self, path: Path) -> None:
        """:param path: the log file; its directory must exist."""
        self.path = Path(path)
        self.wal_path = self.path.with_name(self.path.name + WAL_SUFFIX)
        # Written by dstack-core before 0.2 (one event, no position); still recovered.
        self._legacy_pending = self.path.with_name(self.path.name + _LEGACY_PENDING_SUFFIX)
        self._legacy_tmp = self.path.with_name(self.path.name + _LEGACY_PENDING_SUFFIX + ".tmp")

    def __repr__(self) -> str:
        return f"RuntimeEventLog({str(self.path)!r})"

    # --- reading ---

    def read(self) -> tuple[RuntimeEvent, ...]:
        """Return the events of every complete line; a missing file is an empty log.

        A final line without its newline is a torn append and is treated as not written.

        :raises StateError: if a complete line is not a valid event (names the line).
        """
        return self._load()[0]

    def _load(self) -> tuple[tuple[RuntimeEvent, ...], list[int], int]:
        """Events, the byte offset after each, and the file's size."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return (), [], 0
        events: list[RuntimeEvent] = []
        ends: list[int] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            try:
                events.append(RuntimeEvent.from_log_line(data[start:end]))
            except EvidenceError as exc:
                raise StateError(
                    f"{self.path}: line {len(events) + 1} is corrupt: {exc.message}"
                ) from None
            start = end + 1
            ends.append(start)
        return tuple(events), ends, len(data)

    def replay(self) -> bytes:
        """Return RTMR3 as the complete lines of the log replay it."""
        register = ZERO_REGISTER
        for event in self.read():
            register = extend(register, event.digest)
        return register

    def written_ahead(self) -> LogBatch | None:
        """The last write-ahead record, or None (none, cleared or torn).

        A pending record left by dstack-core before 0.2 counts as a batch of one at the
        end of the log.

        :raises StateError: a record that is corrupt though not torn.
        """
        try:
            record = self.wal_path.read_bytes()
        except FileNotFoundError:
            record = b""
        batch = LogBatch.from_record(record)
        if batch is not None:
            return batch
        try:
            legacy = self._legacy_pending.read_bytes()
        except FileNotFoundError:
            return None
        try:
            event = RuntimeEvent.from_log_line(legacy)
        except EvidenceError as exc:
            raise StateError(f"{self._legacy_pending} is corrupt: {exc.message}") from None
        events, ends, _ = self._load()
        return LogBatch.at(len(events), ends[-1] if ends else 0, (event,))

    def pending(self) -> tuple[RuntimeEvent, ...]:
        """The written-ahead events that are not in the log (empty when there are none).

        :raises StateError: as :meth:`written_ahead` and :meth:`read`.
        """
        batch = self.written_ahead()
        if batch is None:
            return ()
        events = self.read()
        in_log = _in_log(batch, events)
        return () if in_log is None else batch.events[in_log:]

    # --- writing ---

    def write_ahead(self, batch: LogBatch) -> None:
        """Durably record ``batch`` before any of it is extended (one write, one fdatasync).

        :raises OSError: the record could not be made durable; nothing was extended, so
            the caller drops the batch.
        """
        created = not self.wal_path.exists()
        fd = os.open(self.wal_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_all(fd, batch.to_record(), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.wal_path.parent)

    def append(self, batch: LogBatch) -> None:
        """Durably append ``batch`` at ``batch.offset`` (one write, one fdatasync).

        Whatever follows ``batch.offset`` (a torn line of an earlier failed attempt) is cut
        first, so appending the same batch again is harmless.

        :raises OSError: the append is not durable; try again later.
        :raises StateError: the log is shorter than ``batch.offset`` (lines were lost).
        """
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)
            if st.st_size < batch.offset:
                raise StateError(
                    f"runtime event log {self.path} holds {st.st_size} bytes, fewer than the "
                    f"{batch.offset} already recorded: it was truncated behind our back"
                )
            if st.st_size > batch.offset:
                os.ftruncate(fd, batch.offset)
            _pwrite_all(fd, batch.data, batch.offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def clear_ahead(self) -> None:
        """Mark the write-ahead record done. Not durable, and best effort: recovery
        recognises a stale record by its position, so losing this write is harmless."""
        try:
            fd = os.open(self.wal_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.pwrite(fd, _CLEARED_RECORD, 0)
        except OSError:
            pass
        finally:
            os.close(fd)
        for legacy in (self._legacy_pending, self._legacy_tmp):
            with contextlib.suppress(OSError):
                legacy.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the log and its write-ahead record (a fresh machine boots)."""
        for path in (self.path, self.wal_path, self._legacy_pending, self._legacy_tmp):
            path.unlink(missing_ok=True)

    # --- one event at a time (boot processes, tests) ---

    def begin(self, event: RuntimeEvent) -> LogBatch:
        """Write ``event`` ahead as a batch of one at the end of the log.

        :raises StateError: written-ahead events are still pending (recover first).
        """
        if not isinstance(event, RuntimeEvent):
            raise InvalidEvent("begin() takes a RuntimeEvent")
        if self.pending():
            raise StateError(
                f"{self.wal_path} holds events not yet in the log; recover first"
            )
        events, ends, _ = self._load()
        batch = LogBatch.at(len(events), ends[-1] if ends else 0, (event,))
        self.write_ahead(batch)
        return batch

    def commit(self, event: RuntimeEvent) -> None:
        """Append ``event`` after the register was extended with it, then clear the record.

        :raises StateError: ``event`` is not the pending event written by :meth:`begin`.
        """
        batch = self.written_ahead()
        if batch is None or self.pending() != (event,):
            raise StateError("commit() without a matching begin(): this event is not pending")
        self.append(batch)
        self.clear_ahead()

    def abort(self) -> None:
        """Drop a pending record; call only when the extend certainly did not happen."""
        self.clear_ahead()

    # --- recovery ---

    def plan_recovery(self, register_value: bytes) -> RecoveryPlan:
        """Decide, without writing, what the log must hold to replay to ``register_value``.

        A torn final line is cut. Then, with a write-ahead batch not (fully) in the log,
        the register says how many of its events were extended: exactly those are
        appended (``"committed"``), the rest dropped (``"discarded"``). Without one,
        replaying the log must give the register (``"clean"``).

        :raises InvalidEvent: if ``register_value`` is not 48 bytes.
        :raises StateError: if no case matches (the message has the replays and the register
            in hex), or a complete line or the record is corrupt.
        """
        if len(register_value) != REGISTER_SIZE:
            raise InvalidEvent(f"RTMR3 must be {REGISTER_SIZE} bytes, got {len(register_value)}")
        events, ends, size = self._load()
        good = ends[-1] if ends else 0
        logged = ZERO_REGISTER
        for event in events:
            logged = extend(logged, event.digest)
        batch = self.written_ahead()
        in_log = None if batch is None else _in_log(batch, events, ends)
        if batch is None or in_log is None or in_log == len(batch.events):
            if not hmac.compare_digest(logged, register_value):
                raise StateError(
                    f"runtime event log {self.path} does not replay to RTMR3: "
                    f"replay(log)={logged.hex()} register={register_value.hex()}"
                )
            repair = LogBatch.at(len(events), good, ()) if size != good else None
            return RecoveryPlan(outcome="clean", events=events, size=good, repair=repair)
        value = logged
        extended = None
        for count in range(in_log, len(batch.events) + 1):
            if hmac.compare_digest(value, register_value):
                extended = count
                break
            if count < len(batch.events):
                value = extend(value, batch.events[count].digest)
        if extended is None:
            raise StateError(
                f"runtime event log {self.path} does not replay to RTMR3: "
                f"replay(log)={logged.hex()} replay(log+written ahead)={value.hex()} "
                f"register={register_value.hex()}"
            )
        missing = batch.head(extended).tail(in_log)
        outcome: RecoveryOutcome = (
            "committed" if missing.events else "discarded" if extended < len(batch.events)
            else "clean"
        )
        repair = missing if missing.events or size != good else None
        return RecoveryPlan(
            outcome=outcome,
            events=events + missing.events,
            size=missing.end_offset,
            repair=repair,
        )

    def apply(self, plan: RecoveryPlan) -> None:
        """Make ``plan`` durable: the repair append, then clear the write-ahead record.

        :raises OSError: the repair could not be written (try again later).
        """
        if plan.repair is not None:
            self.append(plan.repair)
        self.clear_ahead()

    def recover(self, register_value: bytes) -> RecoveryOutcome:
        """Reconcile the log with RTMR3 (:meth:`plan_recovery`, then :meth:`apply`).

        Safe to call again after a crash inside it.

        :raises InvalidEvent: if ``register_value`` is not 48 bytes.
        :raises StateError: as :meth:`plan_recovery`.
        :raises OSError: the repair could not be written.
        """
        plan = self.plan_recovery(register_value)
        self.apply(plan)
        return plan.outcome


def _in_log(
    batch: LogBatch, events: Sequence[RuntimeEvent], ends: Sequence[int] | None = None
) -> int | None:
    """How many of ``batch``'s events the log already holds at its position, or None when
    the log disagrees with the record there (a stale record of an earlier layout)."""
    if batch.position > len(events):
        return None
    if ends is not None:
        start = ends[batch.position - 1] if batch.position else 0
        if start != batch.offset:
            return None
    present = min(len(events) - batch.position, len(batch.events))
    if tuple(events[batch.position : batch.position + present]) != batch.events[:present]:
        return None
    return present
