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
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from . import strictjson
from .errors import EvidenceError, InvalidRequest, StateError

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
    "RecoveryOutcome",
    "RuntimeEvent",
    "RuntimeEventLog",
    "TdxEvent",
    "events_from_json",
    "events_to_json",
    "extend",
    "replay",
    "replay_rtmrs",
    "replay_until",
    "runtime_event",
    "runtime_event_digest",
    "runtime_event_preimage",
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
    return hashlib.sha384(runtime_event_preimage(name, payload, version)).digest()


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
        return RuntimeEvent(event=self.event, payload=self.event_payload, version=self.version)

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
    return hashlib.sha384(bytes(register) + bytes(digest)).digest()


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

    @property
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _truncate_torn_tail(fd: int) -> None:
    """Cut everything after the last newline of the open file, durably."""
    size = os.fstat(fd).st_size
    end = size
    chunk = 4096
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    if keep != size:
        os.ftruncate(fd, keep)
        os.fsync(fd)


class RuntimeEventLog:
    """The durable RTMR3 event log: one JSON-lines file in upstream's format.

    Each line is ``{"event": name, "payload": <standard base64>}`` plus ``"version": 2`` for
    version-2 events, UTF-8, newline-terminated. The boot process writes the first lines
    (``system-preparing`` ... ``system-ready``) to the same file, so replaying *every* line
    from 48 zero bytes must give RTMR3. Files are created with mode 0600.

    Emitting an event is a write-ahead protocol, so that a crash at any point leaves a state
    :meth:`recover` can reconcile with the register::

        log.begin(event)                 # durable <path>.pending
        platform.extend_rtmr3(event.digest)   # on failure known not to have extended: log.abort()
        log.commit(event)                # durable append, then pending removed

    If the extend fails in a way that leaves its effect unknown, call :meth:`recover` with
    the register read back instead of :meth:`abort`.

    The class takes no locks: the caller must serialise ``begin``/extend/``commit``/
    ``abort``/``recover`` across threads and processes (e.g. one asyncio lock in the agent,
    which is the only writer after boot). Readers may call :meth:`read` at any time; a line
    being appended is not visible until complete.
    """

    def __init__(self, path: Path) -> None:
        """:param path: the log file; its directory must exist."""
        self.path = Path(path)
        self.pending_path = self.path.with_name(self.path.name + ".pending")
        self._pending_tmp = self.path.with_name(self.path.name + ".pending.tmp")

    def __repr__(self) -> str:
        return f"RuntimeEventLog({str(self.path)!r})"

    def read(self) -> tuple[RuntimeEvent, ...]:
        """Return the events of every complete line; a missing file is an empty log.

        A final line without its newline is a torn append and is treated as not written.

        :raises StateError: if a complete line is not a valid event (names the line).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ()
        return self._parse(data)

    def _parse(self, data: bytes) -> tuple[RuntimeEvent, ...]:
        lines = data.split(b"\n")[:-1]  # the last piece is empty or a torn append
        events = []
        for number, line in enumerate(lines, start=1):
            try:
                events.append(RuntimeEvent.from_log_line(line))
            except EvidenceError as exc:
                raise StateError(f"{self.path}: line {number} is corrupt: {exc.message}") from None
        return tuple(events)

    def replay(self) -> bytes:
        """Return RTMR3 as the complete lines of the log replay it."""
        register = ZERO_REGISTER
        for event in self.read():
            register = extend(register, event.digest)
        return register

    def pending(self) -> RuntimeEvent | None:
        """Return the event of an unfinished :meth:`begin`, or None.

        :raises StateError: if the pending record is unreadable.
        """
        try:
            data = self.pending_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return RuntimeEvent.from_log_line(data)
        except EvidenceError as exc:
            raise StateError(f"{self.pending_path} is corrupt: {exc.message}") from None

    def begin(self, event: RuntimeEvent) -> None:
        """Durably record that ``event`` is about to be extended into RTMR3.

        Writes ``<path>.pending`` atomically (temporary file, fsync, rename, fsync of the
        directory). Call before extending the register.

        :raises StateError: if a pending record already exists (an earlier emission was not
            finished: call :meth:`recover`).
        """
        if not isinstance(event, RuntimeEvent):
            raise InvalidEvent("begin() takes a RuntimeEvent")
        if self.pending_path.exists():
            raise StateError(
                f"{self.pending_path} exists: an earlier event was not committed; recover first"
            )
        fd = os.open(self._pending_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, event.to_log_line())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._pending_tmp, self.pending_path)
        _fsync_dir(self.pending_path.parent)

    def commit(self, event: RuntimeEvent) -> None:
        """Durably append ``event`` after the register was extended, then drop the pending record.

        A torn tail left by an earlier failed append is cut first, so the new line never
        follows garbage.

        :raises StateError: if there is no pending record for ``event``.
        """
        pending = self.pending()
        if pending != event:
            raise StateError(
                "commit() without a matching begin(): no pending record for this event"
            )
        self._append(event)
        self.pending_path.unlink()
        _fsync_dir(self.pending_path.parent)

    def abort(self) -> None:
        """Drop a pending record; call only when the extend certainly did not happen."""
        self._pending_tmp.unlink(missing_ok=True)
        self.pending_path.unlink(missing_ok=True)
        _fsync_dir(self.pending_path.parent)

    def _append(self, event: RuntimeEvent) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)
            _truncate_torn_tail(fd)
            _write_all(fd, event.to_log_line())
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    def recover(self, register_value: bytes) -> RecoveryOutcome:
        """Reconcile the log with RTMR3 at start-up; returns what was found.

        ``register_value`` is RTMR3 read from the platform. A torn final line is cut. Then:

        * with a pending record: if replaying log + pending gives the register, the extend
          happened and the event is appended (``"committed"``); else if replaying the log
          alone gives it, the extend did not happen, or the append had already completed,
          and the record is dropped (``"discarded"``);
        * without one: replaying the log must give the register (``"clean"``).

        Safe to call again after a crash inside it.

        :raises InvalidEvent: if ``register_value`` is not 48 bytes.
        :raises StateError: if no case matches (the message has the replays and the register
            in hex), or a complete line or the pending record is corrupt.
        """
        if len(register_value) != REGISTER_SIZE:
            raise InvalidEvent(f"RTMR3 must be {REGISTER_SIZE} bytes, got {len(register_value)}")
        self._pending_tmp.unlink(missing_ok=True)
        if self.path.exists():
            fd = os.open(self.path, os.O_RDWR)
            try:
                _truncate_torn_tail(fd)
            finally:
                os.close(fd)
        logged = self.replay()
        pending = self.pending()
        if pending is None:
            if hmac.compare_digest(logged, register_value):
                return "clean"
            raise StateError(
                f"runtime event log {self.path} does not replay to RTMR3: "
                f"replay(log)={logged.hex()} register={register_value.hex()}"
            )
        with_pending = extend(logged, pending.digest)
        if hmac.compare_digest(with_pending, register_value):
            self._append(pending)
            self.pending_path.unlink()
            _fsync_dir(self.pending_path.parent)
            return "committed"
        if hmac.compare_digest(logged, register_value):
            self.abort()
            return "discarded"
        raise StateError(
            f"runtime event log {self.path} does not replay to RTMR3: "
            f"replay(log)={logged.hex()} replay(log+pending)={with_pending.hex()} "
            f"register={register_value.hex()}"
        )
