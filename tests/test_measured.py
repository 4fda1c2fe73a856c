"""MeasuredLog: the kept wire forms equal encoding the same events from scratch, after any
sequence of appends and rollbacks, and quotes find their log by the RTMR3 they carry."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core.envelope import EncodedEvents, encode_event
from dstack_core.eventlog import (
    RuntimeEvent,
    TdxEvent,
    events_to_json,
    extend,
    replay,
)
from dstack_core.measured import MeasuredLog, _Rope

BOOT = (
    TdxEvent(imr=0, event_type=10, digest=b"\x01" * 48, event="acpi-rsdp", event_payload=b"ACPI DATA"),
    TdxEvent(imr=1, event_type=0x80000001, digest=b"\x02" * 48, event="", event_payload=b"kernel"),
)

events_strategy = st.lists(
    st.builds(
        RuntimeEvent,
        event=st.text(min_size=1, max_size=8),
        payload=st.binary(max_size=20),
        version=st.sampled_from([1, 2]),
    ),
    max_size=6,
)


def expected_forms(boot: tuple[TdxEvent, ...], runtime: list[RuntimeEvent]) -> tuple[str, str, bytes]:
    events = [*boot, *(e.to_tdx_event() for e in runtime)]
    quote = events_to_json(
        [e.stripped() for e in boot] + [e.to_tdx_event() for e in runtime], include_preimage=True
    )
    info = json.dumps({"event_log": [e.to_json() for e in events]}, indent=2)
    cbor = b"".join(encode_event(e) for e in events)
    return quote, info, cbor


def joined(pieces: EncodedEvents) -> bytes:
    return b"".join(bytes(p) for p in pieces.chunks)


class TestRope:
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(
        st.lists(st.binary(min_size=1, max_size=9), max_size=5),
        st.integers(min_value=0, max_value=40),
    ), max_size=30))
    def test_pieces_equal_the_items(self, operations: list[list[bytes] | int]) -> None:
        """After any appends and truncations, the pieces of the first n items (minus a
        skipped prefix) are exactly those items' bytes."""
        rope, items = _Rope(), []
        for operation in operations:
            if isinstance(operation, int):
                count = min(operation, len(items))
                rope.truncate(count)
                del items[count:]
            else:
                rope.append(operation)
                items += operation
            for count in range(len(items) + 1):
                want = b"".join(items[:count])
                assert b"".join(rope.pieces(count)) == want
                if want:
                    assert b"".join(rope.pieces(count, skip=1)) == want[1:]


class TestMeasuredLog:
    @settings(max_examples=60, deadline=None)
    @given(events_strategy, events_strategy, st.integers(min_value=0, max_value=6))
    def test_forms_equal_encoding_from_scratch(
        self, first: list[RuntimeEvent], second: list[RuntimeEvent], keep: int
    ) -> None:
        """Every form, cut after any count, equals encoding those events again, also after
        a rollback of part of a batch."""
        log = MeasuredLog(BOOT, first)
        if keep % 2:
            log.quote_log(len(first))  # forms made for some events before the rollback
        log.extend(second)
        if keep % 3 == 0:
            log.quote_log(log.count)  # and for all of them
        log.truncate(len(first) + min(keep, len(second)))
        runtime = first + second[:keep]
        for count in range(len(runtime) + 1):
            quote, info, cbor = expected_forms(BOOT, runtime[:count])
            assert log.quote_log(count).decode() == quote
            text = '{\n  "event_log": ' + json.loads(
                '"' + b"".join(bytes(p) for p in log.info_log(count)).decode() + '"'
            ) + "\n}"
            assert text == info
            assert joined(log.envelope_events(count)) == cbor
            assert log.envelope_events(count).count == len(BOOT) + count
            assert log.events(count) == BOOT + tuple(e.to_tdx_event() for e in runtime[:count])
            replayed = replay([e.to_tdx_event() for e in runtime[:count]], 3)
            assert log.register(count) == replayed

    def test_count_of_finds_the_log_of_a_register(self) -> None:
        """count_of maps each RTMR3 value to its event count; an unknown value to None, and
        a match straddling two registers is not one."""
        events = [RuntimeEvent(event=f"e{i}", payload=b"") for i in range(5)]
        log = MeasuredLog(BOOT, events)
        for count in range(6):
            assert log.count_of(log.register(count)) == count
        assert log.count_of(b"\x42" * 48) is None
        straddle = log.register(2)[24:] + log.register(3)[:24]
        assert log.count_of(straddle) is None
        assert log.count_of(extend(log.register(5), b"\x00" * 48)) is None

    def test_identity_is_taken_before_system_ready(self) -> None:
        """identity(count) holds the first app-id before system-ready, as of that count."""
        events = [RuntimeEvent(event="app-id", payload=b"A"), RuntimeEvent(event="system-ready",
                  payload=b""), RuntimeEvent(event="app-id", payload=b"spoof")]
        log = MeasuredLog(BOOT, events)
        assert log.identity(0) == {} and log.identity(1) == {"app-id": b"A"}
        assert log.identity(3) == {"app-id": b"A"}
        log.truncate(0)
        log.extend([RuntimeEvent(event="app-id", payload=b"B")])
        assert log.identity(1) == {"app-id": b"B"}
