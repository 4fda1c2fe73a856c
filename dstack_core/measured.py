"""The event log as quotes see it: every event with the RTMR3 it leads to and its
serialised forms, kept and extended, never rebuilt per request.

A :class:`MeasuredLog` holds the boot events (RTMR0-2) and the runtime events (RTMR3) in
the three forms the API sends them in: the compact JSON of GetQuote's ``event_log``, the
indented JSON inside Info's ``tcb_info``, and the CBOR items of an envelope (and their hex,
as Attest's answer carries them). Each form is a
:class:`_Rope` of byte strings that only grows at the end, so cutting the log after any
number of runtime events and joining it costs what sending it costs.

It also keeps RTMR3 after every runtime event, so that a quote can be matched to the log
that replays to it by the RTMR3 it carries (:meth:`MeasuredLog.count_of`): quotes need no
lock against EmitEvent.
"""

from __future__ import annotations

import binascii
import json
from array import array
from json.encoder import encode_basestring_ascii as _ascii
from collections.abc import Mapping, Sequence
from typing import Final

from .appinfo import IDENTITY_EVENTS, SYSTEM_READY
from .envelope import EncodedEvents, encode_event
from .eventlog import REGISTER_SIZE, ZERO_REGISTER, RuntimeEvent, TdxEvent, extend
from .jsonout import EncodedJson, escaped

__all__ = ["MeasuredLog"]

_QUOTE_SEP: Final = b","
_INFO_SEP: Final = escaped(",\n    ")
_INFO_OPEN: Final = escaped("[\n    ")
_INFO_CLOSE: Final = escaped("\n  ]")


def _quote_item(event: TdxEvent) -> bytes:
    # With the preimage of version-2 runtime events, as upstream's GetQuote sends them.
    text = json.dumps(
        event.to_json(include_preimage=True), separators=(",", ":"), ensure_ascii=False
    )
    return _QUOTE_SEP + escaped(text)


def _info_item(event: TdxEvent) -> bytes:
    # json.dumps(..., indent=2) of an element of a list that is a value of the top-level
    # object (two levels deep). Written out because indent= turns off json's C encoder,
    # and an event is a flat object of strings and integers.
    fields = ",\n      ".join(
        f"{_ascii(key)}: {_ascii(value) if isinstance(value, str) else int(value)}"
        for key, value in event.to_json().items()
    )
    return _INFO_SEP + escaped("{\n      " + fields + "\n    }")


class _Rope:
    """Append-only bytes made of items, cut after any item without copying the rest.

    Items are stored in chunks whose sizes fall geometrically (a chunk is merged into the
    one before it once that is no longer more than twice as large), so there are
    O(log n) chunks and each byte is copied O(log n) times over the rope's life.
    """

    __slots__ = ("_chunks", "_ends", "_starts")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._ends = array("Q")

    def __len__(self) -> int:
        return len(self._ends)

    def end(self, count: int) -> int:
        """The size in bytes of the first ``count`` items."""
        return self._ends[count - 1] if count else 0

    def append(self, items: Sequence[bytes]) -> None:
        if not items:
            return
        start = position = self.end(len(self))
        for item in items:
            position += len(item)
            self._ends.append(position)
        self._chunks.append(b"".join(items))
        self._starts.append(start)
        while len(self._chunks) > 1 and len(self._chunks[-2]) <= 2 * len(self._chunks[-1]):
            last = self._chunks.pop()
            self._starts.pop()
            self._chunks[-1] += last

    def truncate(self, count: int) -> None:
        """Drop every item after the first ``count``."""
        end = self.end(count)
        del self._ends[count:]
        while self._chunks and self._starts[-1] >= end:
            self._chunks.pop()
            self._starts.pop()
        if self._chunks and self._starts[-1] + len(self._chunks[-1]) > end:
            self._chunks[-1] = self._chunks[-1][: end - self._starts[-1]]

    def pieces(self, count: int, skip: int = 0) -> list[bytes | memoryview]:
        """The bytes of the first ``count`` items, less the first ``skip`` bytes, as pieces
        to join at once (before the rope changes)."""
        end = self.end(count)
        pieces: list[bytes | memoryview] = []
        for start, chunk in zip(self._starts, self._chunks):
            if start >= end:
                break
            low, high = max(skip - start, 0), min(end - start, len(chunk))
            if low >= high:
                continue
            pieces.append(chunk if (low, high) == (0, len(chunk)) else memoryview(chunk)[low:high])
        return pieces


class MeasuredLog:
    """Boot and runtime events in their wire forms, with RTMR3 after each runtime event.

    Runtime events are added before RTMR3 is extended with them (so that a quote that
    already carries the new value finds its log) and dropped again if the extension did not
    happen. Single-threaded: the agent's event loop owns it.

    :param boot_events: the platform's boot event log (RTMR0-2), in order.
    :param runtime: the runtime events already in the durable log.
    """

    def __init__(self, boot_events: Sequence[TdxEvent], runtime: Sequence[RuntimeEvent]) -> None:
        self.boot_events = tuple(boot_events)
        self._boot = len(self.boot_events)
        self._registers = bytearray(ZERO_REGISTER)
        self._quote = _Rope()
        self._info = _Rope()
        self._cbor = _Rope()
        self._cbor_hex = _Rope()
        self._quote.append([_quote_item(e.stripped()) for e in self.boot_events])
        self._info.append([_info_item(e) for e in self.boot_events])
        self._add_cbor(self.boot_events)
        # (runtime count from which it holds, identity); changes only before system-ready.
        self._unformed: list[RuntimeEvent] = []  # runtime events whose forms are not made
        self._runtime: list[TdxEvent] = []  # the runtime events whose forms are made
        self._identities: list[tuple[int, dict[str, bytes]]] = [(0, {})]
        self._ready_at: int | None = None  # runtime count that includes system-ready
        self.extend(runtime)

    @property
    def count(self) -> int:
        """How many runtime events the log holds (extended or being extended)."""
        return len(self._registers) // REGISTER_SIZE - 1

    def register(self, count: int) -> bytes:
        """RTMR3 after the first ``count`` runtime events."""
        return bytes(self._registers[count * REGISTER_SIZE : (count + 1) * REGISTER_SIZE])

    def extend(self, events: Sequence[RuntimeEvent]) -> None:
        """Add runtime events at the end, in extend order.

        Their registers are computed now; their wire forms when a log is first cut after
        them, so that recording an event costs no encoding while nobody reads the log.
        """
        register = self.register(self.count)
        for event in events:
            register = extend(register, event.digest)
            self._registers += register
        self._track_identity(events, self.count - len(events))
        self._unformed.extend(events)

    def _form(self) -> None:
        if not self._unformed:
            return
        shown = [e.to_tdx_event() for e in self._unformed]
        self._unformed = []
        self._runtime += shown
        self._quote.append([_quote_item(e) for e in shown])
        self._info.append([_info_item(e) for e in shown])
        self._add_cbor(shown)

    def truncate(self, count: int) -> None:
        """Drop the runtime events after the first ``count`` (their extension failed)."""
        del self._registers[(count + 1) * REGISTER_SIZE :]
        formed = len(self._runtime)
        if count < formed:
            self._unformed = []
            del self._runtime[count:]
            for rope in (self._quote, self._info, self._cbor, self._cbor_hex):
                rope.truncate(self._boot + count)
        else:
            del self._unformed[count - formed :]
        while len(self._identities) > 1 and self._identities[-1][0] > count:
            self._identities.pop()
        if self._ready_at is not None and self._ready_at > count:
            self._ready_at = None

    def count_of(self, rtmr3: bytes) -> int | None:
        """How many runtime events replay to ``rtmr3`` (the newest match), or None."""
        end = len(self._registers)
        while (found := self._registers.rfind(rtmr3, 0, end)) >= 0:
            if found % REGISTER_SIZE == 0:
                return found // REGISTER_SIZE
            end = found + REGISTER_SIZE - 1
        return None

    def identity(self, count: int) -> Mapping[str, bytes]:
        """:func:`~dstack_core.appinfo.identity_payloads` of the first ``count`` runtime events."""
        for start, found in reversed(self._identities):
            if start <= count:
                return found
        raise AssertionError("the first identity starts at 0")

    def events(self, count: int) -> tuple[TdxEvent, ...]:
        """The boot events and the first ``count`` runtime events, as values (for
        upstream's attestation formats, which are encoded from them)."""
        self._form()
        return self.boot_events + tuple(self._runtime[:count])

    def quote_log(self, count: int) -> EncodedJson:
        """GetQuote's ``event_log`` (a JSON string): boot events stripped, then ``count``
        runtime events."""
        self._form()
        pieces = self._quote.pieces(self._boot + count, skip=len(_QUOTE_SEP))
        return EncodedJson.string([b"[", *pieces, b"]"])

    def info_log(self, count: int) -> list[bytes | memoryview]:
        """Info's ``tcb_info`` ``event_log`` list as escaped JSON-string content: every
        event in full, indented as ``json.dumps(..., indent=2)`` nests it."""
        if not self._boot + count:
            return [b"[]"]
        self._form()
        pieces = self._info.pieces(self._boot + count, skip=len(_INFO_SEP))
        return [_INFO_OPEN, *pieces, _INFO_CLOSE]

    def envelope_events(self, count: int) -> EncodedEvents:
        """An envelope's ``event_log``: every event in full, boot then ``count`` runtime
        (in CBOR, and in its hex for Attest's answer)."""
        self._form()
        total = self._boot + count
        return EncodedEvents(
            count=total, chunks=self._cbor.pieces(total), hex_chunks=self._cbor_hex.pieces(total)
        )

    def _add_cbor(self, events: Sequence[TdxEvent]) -> None:
        items = [encode_event(e) for e in events]
        self._cbor.append(items)
        self._cbor_hex.append([binascii.hexlify(item) for item in items])

    def _track_identity(self, events: Sequence[RuntimeEvent], first: int) -> None:
        if self._ready_at is not None:
            return
        current = self._identities[-1][1]
        for offset, event in enumerate(events):
            if event.event == SYSTEM_READY:
                self._ready_at = first + offset + 1
                return
            if event.event in IDENTITY_EVENTS and event.event not in current:
                current = {**current, event.event: event.payload}
                self._identities.append((first + offset + 1, current))
