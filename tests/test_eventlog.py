"""Tests for dstack_core.eventlog: digests, replay, JSON, stripping and the durable log."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack_core import eventlog
from dstack_core.errors import EvidenceError, InvalidRequest, StateError
from dstack_core.eventlog import (
    EV_NO_ACTION,
    RUNTIME_EVENT_TYPE,
    WAL_HEADER,
    WAL_MAGIC,
    ZERO_REGISTER,
    InvalidEvent,
    LogBatch,
    RuntimeEvent,
    RuntimeEventLog,
    TdxEvent,
    events_from_json,
    events_to_json,
    extend,
    replay,
    replay_rtmrs,
    replay_until,
    runtime_event,
    runtime_event_digest,
    runtime_event_preimage,
)

# agent-api.md 14.4 and 9.2 (the simulator fixture's first runtime event).
APP_ID_V1_PREIMAGE = "010000083a6170702d69643adeadbeef"
APP_ID_V1_DIGEST = (
    "67b4be4efed0893cfa2bb1d35dca209ad8348b4c97f980807bcde8b9a0f26398"
    "dd0923d6eccb5aa2096d98046da8740f"
)
COMPOSE_V2_PREIMAGE = b'{"name":"compose-hash","payload":"abcd","type":134217729}'
COMPOSE_V2_DIGEST = (
    "9dde1673f544faa94b921825209593ddde08d0baf9cd6990175dffaf3081f1bb"
    "10311d56de189491feb33842a050ad7b"
)
SYSTEM_PREPARING_JSON = (
    '{"imr":3,"event_type":134217729,"digest":"f9974020ef507068183313d0ca808e0d1ca9b2d1ad0c61f5'
    '784e7157c362c06536f5ddacdad4451693f48fcc72fff624","event":"system-preparing",'
    '"event_payload":""}'
)


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def boot_event(imr: int = 0, event_type: int = 0x80000001, payload: bytes = b"x") -> TdxEvent:
    return TdxEvent(
        imr=imr, event_type=event_type, digest=sha384(payload), event="", event_payload=payload
    )


def acpi_event() -> TdxEvent:
    return TdxEvent(
        imr=0,
        event_type=10,
        digest=sha384(b"tables"),
        event="acpi-rsdp",
        event_payload=b"ACPI DATA",
    )


def valid_event_json(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "imr": 0,
        "event_type": 1,
        "digest": "aa" * 48,
        "event": "",
        "event_payload": "00",
    }
    obj.update(changes)
    return obj


class TestDigests:
    def test_v1_vector(self) -> None:
        """The V1 preimage and digest of app-id/deadbeef equal the spec vector."""
        payload = bytes.fromhex("deadbeef")
        assert runtime_event_preimage("app-id", payload).hex() == APP_ID_V1_PREIMAGE
        assert runtime_event_digest("app-id", payload).hex() == APP_ID_V1_DIGEST

    def test_v2_vector(self) -> None:
        """The V2 preimage is the JCS JSON of name/payload/type and hashes to the vector."""
        payload = bytes.fromhex("abcd")
        assert runtime_event_preimage("compose-hash", payload, 2) == COMPOSE_V2_PREIMAGE
        assert runtime_event_digest("compose-hash", payload, 2).hex() == COMPOSE_V2_DIGEST

    def test_observed_boot_event_digest(self) -> None:
        """system-preparing with an empty payload has the digest seen in upstream fixtures."""
        assert runtime_event_digest("system-preparing", b"").hex().startswith("f9974020ef507068")

    def test_v2_text_is_utf8_verbatim_with_json_escapes(self) -> None:
        """V2 keeps non-ASCII as UTF-8 and escapes control characters as JCS does."""
        preimage = runtime_event_preimage('é\n\x01"', b"\xff", 2)
        assert preimage == '{"name":"é\\n\\u0001\\"","payload":"ff","type":134217729}'.encode()

    def test_v1_is_raw_bytes(self) -> None:
        """V1 hashes the UTF-8 name and raw payload with colons, no escaping."""
        assert runtime_event_preimage("a:b", b"\n") == bytes.fromhex("01000008") + b":a:b:\n"

    @pytest.mark.parametrize("version", [0, 3, True, "1"])
    def test_unknown_version_rejected(self, version: Any) -> None:
        """Only digest versions 1 and 2 exist."""
        with pytest.raises(InvalidEvent):
            runtime_event_digest("x", b"", version)

    def test_lone_surrogate_name_rejected(self) -> None:
        """A name that is not encodable as UTF-8 is invalid input, not a crash."""
        with pytest.raises(InvalidRequest):
            runtime_event_digest("\ud800", b"")

    def test_runtime_event_builds_rtmr3_event(self) -> None:
        """runtime_event() gives an RTMR3 event of the dstack type with the computed digest."""
        event = runtime_event("compose-hash", bytes.fromhex("abcd"), 2)
        assert (event.imr, event.event_type, event.version) == (3, RUNTIME_EVENT_TYPE, 2)
        assert event.digest.hex() == COMPOSE_V2_DIGEST
        assert event.is_runtime

    def test_invalid_event_is_value_error_and_invalid_request(self) -> None:
        """InvalidEvent is caught both as ValueError and as a 400 InvalidRequest."""
        with pytest.raises(ValueError):
            TdxEvent(imr=4, event_type=1, digest=bytes(48), event="", event_payload=b"")
        assert issubclass(InvalidEvent, InvalidRequest) and InvalidEvent.http_status == 400


class TestReplay:
    def test_extend_is_sha384_of_concatenation(self) -> None:
        """extend(r, d) = SHA-384(r || d)."""
        digest = sha384(b"d")
        assert extend(ZERO_REGISTER, digest) == sha384(bytes(48) + digest)

    @pytest.mark.parametrize(("register", "digest"), [(bytes(47), bytes(48)), (bytes(48), b"")])
    def test_extend_rejects_wrong_lengths(self, register: bytes, digest: bytes) -> None:
        """Both operands of extend must be 48 bytes."""
        with pytest.raises(InvalidEvent):
            extend(register, digest)

    def test_replay_empty_is_zero(self) -> None:
        """Replaying nothing leaves the register at 48 zero bytes."""
        assert replay([], 3) == bytes(48)

    def test_replay_extends_only_that_register(self) -> None:
        """replay() chains the digests of the chosen register, in order."""
        events = [
            boot_event(0, payload=b"a"),
            boot_event(1, payload=b"b"),
            boot_event(0, payload=b"c"),
        ]
        expected = sha384(sha384(bytes(48) + sha384(b"a")) + sha384(b"c"))
        assert replay(events, 0) == expected
        assert replay(events, 1) == sha384(bytes(48) + sha384(b"b"))

    def test_replay_rtmrs_skips_no_action(self) -> None:
        """EV_NO_ACTION events are logged but never extended."""
        events = [boot_event(2, payload=b"a"), boot_event(2, EV_NO_ACTION, b"spec")]
        rtmrs = replay_rtmrs(events)
        assert rtmrs[2] == sha384(bytes(48) + sha384(b"a"))
        assert rtmrs[0] == rtmrs[1] == rtmrs[3] == bytes(48)
        assert replay(events, 2) == rtmrs[2]

    def test_replay_recomputes_stripped_runtime_digests(self) -> None:
        """A runtime event with an empty digest replays with the recomputed digest."""
        full = [runtime_event("a", b"1"), runtime_event("b", b"2", 2)]
        stripped = [e.stripped() for e in full]
        assert all(e.digest == b"" for e in stripped)
        assert replay(stripped, 3) == replay(full, 3) == replay_rtmrs(full)[3]

    def test_replay_until_stops_after_named_event(self) -> None:
        """replay_until includes the named event and nothing after it."""
        events = [
            runtime_event("a", b""),
            runtime_event("boot-mr-done", b""),
            runtime_event("c", b""),
        ]
        assert replay_until(events, 3, "boot-mr-done") == replay(events[:2], 3)

    def test_replay_until_without_the_event(self) -> None:
        """Without the named event the whole register is replayed, or EvidenceError if required."""
        events = [runtime_event("a", b"")]
        assert replay_until(events, 3, "boot-mr-done") == replay(events, 3)
        with pytest.raises(EvidenceError):
            replay_until(events, 3, "boot-mr-done", require=True)

    def test_replay_rejects_bad_register_index(self) -> None:
        """Only registers 0..3 exist."""
        with pytest.raises(InvalidEvent):
            replay([], 4)


class TestTdxEventJson:
    def test_upstream_serialisation_is_exact(self) -> None:
        """A v1 runtime event serialises byte for byte as in the upstream fixture."""
        assert (
            events_to_json([runtime_event("system-preparing", b"")]) == f"[{SYSTEM_PREPARING_JSON}]"
        )

    def test_field_order_and_lowercase_hex(self) -> None:
        """to_json() keeps upstream's field order and lowercase hex, no version for v1."""
        obj = boot_event(payload=b"\xab\xcd").to_json()
        assert list(obj) == ["imr", "event_type", "digest", "event", "event_payload"]
        assert obj["event_payload"] == "abcd" and obj["digest"] == obj["digest"].lower()

    def test_version_2_is_appended(self) -> None:
        """Version-2 events end with "version": 2."""
        obj = runtime_event("x", b"", 2).to_json()
        assert list(obj) == ["imr", "event_type", "digest", "event", "event_payload", "version"]
        assert obj["version"] == 2

    def test_preimage_only_for_v2_runtime_events(self) -> None:
        """include_preimage adds the hex preimage to v2 runtime events only."""
        v2 = runtime_event("compose-hash", bytes.fromhex("abcd"), 2).to_json(include_preimage=True)
        assert bytes.fromhex(v2["preimage"]) == COMPOSE_V2_PREIMAGE
        assert "preimage" not in runtime_event("x", b"").to_json(include_preimage=True)
        assert "preimage" not in runtime_event("x", b"", 2).to_json()

    def test_round_trip(self) -> None:
        """events_from_json(events_to_json(x)) == x, for boot and v1/v2 runtime events."""
        events = (
            boot_event(),
            acpi_event(),
            runtime_event("a", b"\x00\xff"),
            runtime_event("é", b"", 2),
        )
        text = events_to_json(events, include_preimage=True)
        assert ", " not in text and ": " not in text
        assert events_from_json(text) == events
        assert events_from_json(text.encode()) == events
        assert events_from_json(json.loads(text)) == events

    def test_hex_prefix_and_upper_case_accepted(self) -> None:
        """Hex fields may carry 0x and upper-case digits."""
        obj = valid_event_json(digest="0X" + "AB" * 48, event_payload="0xDEADbeef")
        event = TdxEvent.from_json(obj)
        assert event.digest == b"\xab" * 48 and event.event_payload == bytes.fromhex("deadbeef")

    def test_empty_runtime_digest_is_recomputed(self) -> None:
        """A runtime event with digest "" gets its digest from name, payload and version."""
        obj = runtime_event("x", b"p", 2).to_json()
        obj["digest"] = ""
        assert TdxEvent.from_json(obj).digest == runtime_event_digest("x", b"p", 2)

    def test_wrong_runtime_digest_is_kept(self) -> None:
        """A runtime digest that disagrees with the content is kept, so replay exposes it."""
        obj = runtime_event("x", b"p").to_json()
        obj["digest"] = "11" * 48
        event = TdxEvent.from_json(obj)
        assert event.digest == b"\x11" * 48
        assert replay([event], 3) != replay([runtime_event("x", b"p")], 3)

    def test_unknown_keys_ignored(self) -> None:
        """Unknown keys are ignored, as upstream's serde does."""
        assert TdxEvent.from_json(valid_event_json(extra=[1, 2])) == TdxEvent.from_json(
            valid_event_json()
        )

    def test_version_1_may_be_explicit(self) -> None:
        """ "version": 1 is accepted and equals the default."""
        assert TdxEvent.from_json(valid_event_json(version=1)).version == 1

    def test_to_runtime_event(self) -> None:
        """A runtime TdxEvent converts back to the RuntimeEvent it records."""
        assert runtime_event("a", b"b", 2).to_runtime_event() == RuntimeEvent(
            event="a", payload=b"b", version=2
        )
        with pytest.raises(InvalidEvent):
            boot_event().to_runtime_event()

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=12), st.binary(max_size=40), st.sampled_from([1, 2]))
    def test_to_runtime_event_is_the_validated_one(self, name, payload, version) -> None:
        """to_runtime_event skips the validators (the TdxEvent's fields already passed
        them): the event is equal to, hashes, digests and logs as the validated one."""
        try:
            validated = RuntimeEvent(event=name, payload=payload, version=version)
        except InvalidEvent:  # lone surrogates: no TdxEvent can carry them either
            with pytest.raises(InvalidEvent):
                runtime_event(name, payload, version)
            return
        converted = runtime_event(name, payload, version).to_runtime_event()
        assert converted == validated and hash(converted) == hash(validated)
        assert converted.digest == validated.digest
        assert converted.to_log_line() == validated.to_log_line()
        assert type(converted) is RuntimeEvent


class TestStripping:
    def test_runtime_event_keeps_payload_loses_digest(self) -> None:
        """Stripped runtime events keep the payload and carry an empty digest."""
        stripped = runtime_event("a", b"payload", 2).stripped()
        assert (stripped.digest, stripped.event_payload, stripped.version) == (b"", b"payload", 2)

    def test_boot_event_keeps_digest_loses_payload(self) -> None:
        """Stripped boot events keep the digest and carry an empty payload."""
        event = boot_event(1, payload=b"kernel")
        assert event.stripped() == TdxEvent(
            imr=1, event_type=event.event_type, digest=event.digest, event="", event_payload=b""
        )

    def test_acpi_data_events_keep_marker(self) -> None:
        """RTMR0 ACPI DATA events keep the payload b"ACPI DATA" when stripped."""
        assert acpi_event().stripped() == acpi_event()

    def test_non_acpi_type_10_payload_is_stripped(self) -> None:
        """Only RTMR0 type-10 events whose payload is ACPI DATA are special."""
        event = boot_event(1, 10, b"ACPI DATA")
        assert event.stripped().event_payload == b""

    def test_stripped_log_replays_like_the_full_log(self) -> None:
        """A stripped log parsed back replays to the same registers as the full log."""
        events = [boot_event(0), acpi_event(), boot_event(2), runtime_event("a", b"1")]
        parsed = events_from_json(events_to_json(events, strip=True))
        assert replay_rtmrs(parsed) == replay_rtmrs(events)
        assert parsed[3].digest == events[3].digest


class TestFromJsonErrors:
    @pytest.mark.parametrize(
        "obj",
        [
            [],
            "event",
            {k: v for k, v in valid_event_json().items() if k != "digest"},
            valid_event_json(imr=True),
            valid_event_json(imr=1.0),
            valid_event_json(imr="1"),
            valid_event_json(imr=4),
            valid_event_json(imr=-1),
            valid_event_json(event_type=2**32),
            valid_event_json(event_type=None),
            valid_event_json(digest="a" * 95),
            valid_event_json(digest="aa " * 48),
            valid_event_json(digest="zz" * 48),
            valid_event_json(digest="aa" * 47),
            valid_event_json(digest=""),
            valid_event_json(digest=["aa"]),
            valid_event_json(event=1),
            valid_event_json(event="\ud800"),
            valid_event_json(event_payload="0x0"),
            valid_event_json(event_payload="\u0663\u0663"),
            valid_event_json(version=3),
            valid_event_json(version=True),
            valid_event_json(version=None),
            valid_event_json(preimage="xyz"),
        ],
    )
    def test_malformed_event_rejected(self, obj: Any) -> None:
        """Wrong types, bad hex and bad lengths raise EvidenceError."""
        with pytest.raises(EvidenceError):
            TdxEvent.from_json(obj)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "{",
            "{}",
            '"x"',
            "null",
            '[{"imr":NaN}]',
            "[" * 100_000 + "]" * 100_000,
            b"[\xff]",
            '[{"imr":0,"imr":1,"event_type":1,"digest":"","event":"","event_payload":""}]',
            '[{"imr":' + "9" * 5000 + "}]",
        ],
    )
    def test_malformed_log_rejected(self, text: str | bytes) -> None:
        """Invalid JSON, non-arrays, NaN, duplicate keys and deep nesting raise EvidenceError."""
        with pytest.raises(EvidenceError):
            events_from_json(text)

    def test_error_names_the_event_index(self) -> None:
        """The message says which event is malformed."""
        with pytest.raises(EvidenceError, match="event 1"):
            events_from_json([valid_event_json(), valid_event_json(imr=9)])

    def test_event_count_is_capped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """More than MAX_EVENTS events are refused."""
        monkeypatch.setattr(eventlog, "MAX_EVENTS", 2)
        with pytest.raises(EvidenceError, match="more than 2"):
            events_from_json([valid_event_json()] * 3)

    def test_text_size_is_capped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """JSON text over MAX_EVENT_LOG_JSON_SIZE is refused before parsing."""
        monkeypatch.setattr(eventlog, "MAX_EVENT_LOG_JSON_SIZE", 10)
        with pytest.raises(EvidenceError, match="too large"):
            events_from_json("[" + " " * 20 + "]")

    def test_empty_digest_only_for_runtime_events(self) -> None:
        """Building a boot event without a digest is refused."""
        with pytest.raises(InvalidEvent):
            TdxEvent(imr=0, event_type=1, digest=b"", event="", event_payload=b"")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
event_keys = st.sampled_from(
    ["imr", "event_type", "digest", "event", "event_payload", "version", "preimage"]
)


class TestFromJsonFuzz:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.text(), st.binary()))
    def test_random_text(self, text: str | bytes) -> None:
        """Random text or bytes either parse or raise EvidenceError."""
        try:
            events_from_json(text)
        except EvidenceError:
            pass

    @settings(max_examples=300)
    @given(json_values)
    def test_random_json_values(self, value: Any) -> None:
        """Random decoded JSON values either parse or raise EvidenceError."""
        try:
            events_from_json(value if isinstance(value, list) else [value])
        except EvidenceError:
            pass

    @settings(max_examples=500)
    @given(st.dictionaries(event_keys, json_values, max_size=3), st.sets(event_keys, max_size=2))
    def test_mutated_events(self, changes: dict[str, Any], removed: set[str]) -> None:
        """Valid events with fields replaced or removed either parse or raise EvidenceError."""
        obj = runtime_event("x", b"p", 2).to_json(include_preimage=True)
        obj.update(changes)
        for key in removed:
            obj.pop(key, None)
        try:
            events_from_json(json.dumps([obj]))
        except EvidenceError:
            pass


class TestRuntimeEvent:
    def test_log_line_format(self) -> None:
        """Log lines are compact JSON with padded standard base64, version only for v2."""
        assert RuntimeEvent(event="app-id", payload=bytes.fromhex("deadbeef")).to_log_line() == (
            b'{"event":"app-id","payload":"3q2+7w=="}\n'
        )
        assert RuntimeEvent(event="é", payload=b"\xfb\xff", version=2).to_log_line() == (
            '{"event":"é","payload":"+/8=","version":2}\n'.encode()
        )

    def test_log_line_round_trip(self) -> None:
        """from_log_line reverses to_log_line."""
        event = RuntimeEvent(event="a\nb", payload=os.urandom(33), version=2)
        assert RuntimeEvent.from_log_line(event.to_log_line()) == event

    @pytest.mark.parametrize(
        "line",
        [
            b'{"event":"a","payload":"3q2+7w"}',
            b'{"event":"a","payload":"3q2-7w=="}',
            b'{"event":"a"}',
            b'{"event":1,"payload":""}',
            b'{"event":"a","payload":"","version":3}',
            b"[]",
            b"",
        ],
    )
    def test_bad_lines_rejected(self, line: bytes) -> None:
        """Unpadded or URL-safe base64, missing fields and bad versions are EvidenceError."""
        with pytest.raises(EvidenceError):
            RuntimeEvent.from_log_line(line)

    def test_digest_and_tdx_event(self) -> None:
        """A RuntimeEvent's digest and TdxEvent match runtime_event()."""
        event = RuntimeEvent(event="compose-hash", payload=bytes.fromhex("abcd"), version=2)
        assert event.digest.hex() == COMPOSE_V2_DIGEST
        assert event.to_tdx_event() == runtime_event("compose-hash", bytes.fromhex("abcd"), 2)


def ev(name: str, payload: bytes = b"", version: int = 1) -> RuntimeEvent:
    return RuntimeEvent(event=name, payload=payload, version=version)


def register_of(*events: RuntimeEvent) -> bytes:
    register = ZERO_REGISTER
    for event in events:
        register = extend(register, event.digest)
    return register


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestRuntimeEventLog:
    def emit(self, log: RuntimeEventLog, event: RuntimeEvent) -> None:
        log.begin(event)
        log.commit(event)

    def test_begin_writes_ahead_record(self, tmp_path: Path) -> None:
        """begin() writes a checksummed record to <path>.wal (mode 0600) and no log line."""
        log = RuntimeEventLog(tmp_path / "runtime_events.log")
        batch = log.begin(ev("a", b"1"))
        assert log.wal_path == tmp_path / "runtime_events.log.wal"
        assert log.wal_path.read_bytes().startswith(WAL_MAGIC)
        assert mode(log.wal_path) == 0o600
        assert log.written_ahead() == batch
        assert log.pending() == (ev("a", b"1"),) and log.read() == ()

    def test_commit_appends_and_clears_pending(self, tmp_path: Path) -> None:
        """commit() appends the line, creates the log with mode 0600 and clears the record."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a", b"1"))
        self.emit(log, ev("b", b"2", 2))
        assert log.path.read_bytes() == ev("a", b"1").to_log_line() + ev("b", b"2", 2).to_log_line()
        assert mode(log.path) == 0o600
        assert log.written_ahead() is None and log.pending() == ()
        assert log.read() == (ev("a", b"1"), ev("b", b"2", 2))
        assert log.replay() == register_of(ev("a", b"1"), ev("b", b"2", 2))

    def test_existing_log_mode_is_tightened(self, tmp_path: Path) -> None:
        """Appending to a log created with wider permissions makes it 0600."""
        path = tmp_path / "log"
        path.write_bytes(b"")
        path.chmod(0o644)
        self.emit(RuntimeEventLog(path), ev("a"))
        assert mode(path) == 0o600

    def test_begin_refuses_second_pending(self, tmp_path: Path) -> None:
        """begin() with unfinished written-ahead events raises StateError instead of losing them."""
        log = RuntimeEventLog(tmp_path / "log")
        log.begin(ev("a"))
        with pytest.raises(StateError):
            log.begin(ev("b"))
        assert log.pending() == (ev("a"),)

    def test_commit_requires_matching_begin(self, tmp_path: Path) -> None:
        """commit() without a pending record for that event raises StateError."""
        log = RuntimeEventLog(tmp_path / "log")
        with pytest.raises(StateError):
            log.commit(ev("a"))
        log.begin(ev("a"))
        with pytest.raises(StateError):
            log.commit(ev("b"))

    def test_abort_drops_pending(self, tmp_path: Path) -> None:
        """abort() clears the record and leaves the log unchanged."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        log.abort()
        assert log.pending() == () and log.read() == (ev("a"),)
        log.abort()

    def test_missing_log_reads_empty(self, tmp_path: Path) -> None:
        """A log file that does not exist is an empty log."""
        assert RuntimeEventLog(tmp_path / "nope").read() == ()

    def test_torn_final_line_is_not_written(self, tmp_path: Path) -> None:
        """A final line without its newline is ignored by read()."""
        path = tmp_path / "log"
        path.write_bytes(ev("a").to_log_line() + ev("b").to_log_line()[:-1])
        assert RuntimeEventLog(path).read() == (ev("a"),)

    @pytest.mark.parametrize(
        "middle", [b"garbage\n", b"\n", b'{"event":"a","payload":"@@"}\n', b"\x00" * 8 + b"\n"]
    )
    def test_corrupt_middle_line_is_state_error(self, tmp_path: Path, middle: bytes) -> None:
        """A complete line that is not an event raises StateError naming the line."""
        path = tmp_path / "log"
        path.write_bytes(ev("a").to_log_line() + middle + ev("b").to_log_line())
        with pytest.raises(StateError, match="line 2"):
            RuntimeEventLog(path).read()

    def test_reads_upstream_boot_lines(self, tmp_path: Path) -> None:
        """Lines written by the boot process in upstream's format are read and replayed."""
        path = tmp_path / "log"
        path.write_bytes(
            b'{"event":"system-preparing","payload":""}\n'
            b'{"event":"app-id","payload":"3q2+7w==","version":2}\n'
        )
        log = RuntimeEventLog(path)
        assert log.read() == (ev("system-preparing"), ev("app-id", bytes.fromhex("deadbeef"), 2))
        assert log.recover(register_of(*log.read())) == "clean"

    def test_append_is_idempotent(self, tmp_path: Path) -> None:
        """Appending the same batch again (a retried append) leaves it in the log once."""
        log = RuntimeEventLog(tmp_path / "log")
        batch = LogBatch.at(0, 0, [ev("a"), ev("b", b"2")])
        log.append(batch)
        log.append(batch)
        assert log.read() == (ev("a"), ev("b", b"2"))

    def test_append_cuts_what_a_failed_attempt_left(self, tmp_path: Path) -> None:
        """A torn or partial earlier attempt after the batch's offset is cut before the write."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        batch = LogBatch.at(1, len(ev("a").to_log_line()), [ev("b"), ev("c")])
        log.path.write_bytes(ev("a").to_log_line() + batch.data[:-5])
        log.append(batch)
        assert log.read() == (ev("a"), ev("b"), ev("c"))

    def test_append_refuses_a_log_that_lost_lines(self, tmp_path: Path) -> None:
        """A log shorter than the batch's offset was truncated behind our back: StateError."""
        log = RuntimeEventLog(tmp_path / "log")
        with pytest.raises(StateError, match="truncated"):
            log.append(LogBatch.at(3, 100, [ev("x")]))

    def test_batch_head_and_tail(self) -> None:
        """head() keeps the place; tail() moves position and offset past the skipped lines."""
        batch = LogBatch.at(5, 70, [ev("a"), ev("bb", b"123"), ev("c")])
        assert batch.head(1).events == (ev("a"),) and batch.head(1).offset == 70
        tail = batch.tail(2)
        assert tail.position == 7 and tail.events == (ev("c"),)
        assert tail.offset == 70 + len(ev("a").to_log_line() + ev("bb", b"123").to_log_line())
        assert tail.end_offset == batch.end_offset and batch.end_position == 8

    def test_record_round_trip_and_torn_records(self) -> None:
        """A record parses back; a torn, cleared or bit-flipped one reads as no record."""
        batch = LogBatch.at(2, 40, [ev("a", b"\x00"), ev("é", b"", 2)])
        record = batch.to_record()
        assert LogBatch.from_record(record) == batch
        assert LogBatch.from_record(record + b"stale tail of a longer record") == batch
        for cut in (0, 10, WAL_HEADER.size, len(record) - 1):
            assert LogBatch.from_record(record[:cut]) is None
        flipped = bytearray(record)
        flipped[-3] ^= 1
        assert LogBatch.from_record(bytes(flipped)) is None

    def test_checksummed_garbage_record_is_state_error(self) -> None:
        """A record whose checksum holds over lines that are not events is corruption."""
        body = b"not an event\n"
        checked = struct.pack("<8sQQII", WAL_MAGIC, 0, 0, 1, len(body))
        record = checked + hashlib.sha256(checked + body).digest() + body
        with pytest.raises(StateError, match="write-ahead record is corrupt"):
            LogBatch.from_record(record)

    def test_recover_clean(self, tmp_path: Path) -> None:
        """Without a pending record and with a matching register, recover() is "clean"."""
        log = RuntimeEventLog(tmp_path / "log")
        assert log.recover(ZERO_REGISTER) == "clean"
        self.emit(log, ev("a"))
        assert log.recover(register_of(ev("a"))) == "clean"
        assert log.read() == (ev("a"),)

    def test_recover_committed(self, tmp_path: Path) -> None:
        """A crash after the extend: recover() appends the pending event ("committed")."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b", b"x"))
        assert log.recover(register_of(ev("a"), ev("b", b"x"))) == "committed"
        assert log.read() == (ev("a"), ev("b", b"x"))
        assert log.pending() == ()

    def test_recover_discarded(self, tmp_path: Path) -> None:
        """A crash before the extend: recover() drops the pending event ("discarded")."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        assert log.recover(register_of(ev("a"))) == "discarded"
        assert log.read() == (ev("a"),) and log.pending() == ()

    @pytest.mark.parametrize("torn", [False, True])
    def test_recover_every_crash_point_of_a_batch(self, tmp_path: Path, torn: bool) -> None:
        """For each number of events extended and of lines appended (plus a torn line), the
        register decides: exactly the extended prefix of the batch ends up in the log."""
        before = (ev("boot-1"), ev("boot-2", b"p"))
        batch_events = [ev(f"e{i}", bytes([i]) * i, 1 + i % 2) for i in range(4)]
        for extended in range(len(batch_events) + 1):
            for appended in range(extended + 1):
                path = tmp_path / f"log-{extended}-{appended}-{torn}"
                log = RuntimeEventLog(path)
                for event in before:
                    self.emit(log, event)
                batch = LogBatch.at(2, path.stat().st_size, batch_events)
                log.write_ahead(batch)
                with path.open("ab") as f:
                    f.write(b"".join(batch.lines[:appended]))
                    if torn and appended < len(batch_events):
                        f.write(batch.lines[appended][:7])
                register = register_of(*before, *batch_events[:extended])
                plan = log.plan_recovery(register)
                assert plan.events == before + tuple(batch_events[:extended])
                expected = ("committed" if extended > appended
                            else "discarded" if extended < len(batch_events) else "clean")
                assert plan.outcome == expected
                assert log.recover(register) == expected
                assert log.read() == before + tuple(batch_events[:extended])
                assert path.stat().st_size == plan.size
                assert log.replay() == register and log.pending() == ()
                assert log.recover(register) == "clean"

    def test_stale_record_after_later_appends_is_ignored(self, tmp_path: Path) -> None:
        """A record whose batch is in the log (its clear was lost) changes nothing."""
        log = RuntimeEventLog(tmp_path / "log")
        batch = LogBatch.at(0, 0, [ev("a"), ev("b")])
        log.write_ahead(batch)
        log.append(batch)
        log.append(LogBatch.at(2, batch.end_offset, [ev("c")]))
        assert log.pending() == ()
        assert log.recover(register_of(ev("a"), ev("b"), ev("c"))) == "clean"

    def test_torn_record_is_ignored(self, tmp_path: Path) -> None:
        """A record torn mid-write (before any extend) leaves a clean log."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        record = LogBatch.at(1, len(ev("a").to_log_line()), [ev("b")]).to_record()
        log.wal_path.write_bytes(record[: len(record) // 2])
        assert log.written_ahead() is None
        assert log.recover(register_of(ev("a"))) == "clean"

    def test_plan_writes_nothing_until_applied(self, tmp_path: Path) -> None:
        """plan_recovery() only reads; apply() makes the repair durable."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        before = (log.path.read_bytes(), log.wal_path.read_bytes())
        plan = log.plan_recovery(register_of(ev("a"), ev("b")))
        assert (log.path.read_bytes(), log.wal_path.read_bytes()) == before
        assert plan.repair is not None and plan.repair.events == (ev("b"),)
        log.apply(plan)
        assert log.read() == (ev("a"), ev("b")) and log.pending() == ()

    def test_legacy_pending_record_is_recovered(self, tmp_path: Path) -> None:
        """A <log>.pending left by dstack-core 0.1 is committed or discarded by the register."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        legacy = tmp_path / "log.pending"
        legacy.write_bytes(ev("b").to_log_line())
        assert log.pending() == (ev("b"),)
        assert log.recover(register_of(ev("a"), ev("b"))) == "committed"
        assert not legacy.exists() and log.read() == (ev("a"), ev("b"))
        legacy.write_bytes(ev("c").to_log_line())
        assert log.recover(register_of(ev("a"), ev("b"))) == "discarded"
        assert log.read() == (ev("a"), ev("b"))

    def test_recover_cuts_torn_tail_without_pending(self, tmp_path: Path) -> None:
        """A torn tail with no pending record is cut and the log is clean."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        with log.path.open("ab") as f:
            f.write(b'{"event":"b","pay')
        assert log.recover(register_of(ev("a"))) == "clean"
        assert log.path.read_bytes() == ev("a").to_log_line()

    def test_commit_cuts_torn_tail_first(self, tmp_path: Path) -> None:
        """An append after a failed partial write never leaves garbage mid-file."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        with log.path.open("ab") as f:
            f.write(b"{partial")
        log.commit(ev("b"))
        assert log.read() == (ev("a"), ev("b"))

    def test_recover_mismatch_with_pending(self, tmp_path: Path) -> None:
        """A register matching neither replay raises StateError with all three values in hex."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        bogus = b"\x42" * 48
        with pytest.raises(StateError) as info:
            log.recover(bogus)
        message = info.value.message
        assert register_of(ev("a")).hex() in message
        assert register_of(ev("a"), ev("b")).hex() in message
        assert bogus.hex() in message
        assert log.pending() == (ev("b"),)

    def test_recover_mismatch_without_pending(self, tmp_path: Path) -> None:
        """Without a pending record, a register the log does not replay to is a StateError."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        with pytest.raises(StateError, match=register_of(ev("a")).hex()):
            log.recover(ZERO_REGISTER)

    def test_recover_rejects_bad_register(self, tmp_path: Path) -> None:
        """The register value must be 48 bytes."""
        with pytest.raises(InvalidRequest):
            RuntimeEventLog(tmp_path / "log").recover(bytes(32))

    def test_recover_is_idempotent(self, tmp_path: Path) -> None:
        """Recovering twice gives "clean" the second time and the same log."""
        log = RuntimeEventLog(tmp_path / "log")
        log.begin(ev("a"))
        register = register_of(ev("a"))
        assert log.recover(register) == "committed"
        assert log.recover(register) == "clean"
        assert log.read() == (ev("a"),)

    def test_corrupt_legacy_pending_is_state_error(self, tmp_path: Path) -> None:
        """An unreadable legacy pending record cannot be reconciled and raises StateError."""
        log = RuntimeEventLog(tmp_path / "log")
        (tmp_path / "log.pending").write_bytes(b"nonsense")
        with pytest.raises(StateError):
            log.recover(ZERO_REGISTER)

    def test_remove_deletes_log_and_record(self, tmp_path: Path) -> None:
        """remove() leaves a fresh machine: no log, no record."""
        log = RuntimeEventLog(tmp_path / "log")
        self.emit(log, ev("a"))
        log.begin(ev("b"))
        log.remove()
        assert log.read() == () and log.written_ahead() is None


CHILD_REGISTER = textwrap.dedent(
    """
    import os, random, sys
    from pathlib import Path
    from dstack_core.eventlog import LogBatch, RuntimeEvent, RuntimeEventLog, extend

    log_path, reg_path = Path(sys.argv[1]), Path(sys.argv[2])

    def read_register():
        return reg_path.read_bytes() if reg_path.exists() else bytes(48)

    def extend_register(digest):
        # The hardware extend is atomic: model it with rename.
        tmp = reg_path.with_name("rtmr3.tmp")
        tmp.write_bytes(extend(read_register(), digest))
        os.replace(tmp, reg_path)
    """
)

CHILD = CHILD_REGISTER + textwrap.dedent(
    """
    log = RuntimeEventLog(log_path)
    log.recover(read_register())
    n = len(log.read())
    print("ready", flush=True)
    while True:
        event = RuntimeEvent(event=f"e-{n}", payload=os.urandom(n % 300), version=1 + n % 2)
        log.begin(event)
        extend_register(event.digest)
        log.commit(event)
        n += 1
    """
)


BATCH_CHILD = CHILD_REGISTER + textwrap.dedent(
    """
    log = RuntimeEventLog(log_path)
    log.recover(read_register())
    n = len(log.read())
    offset = log_path.stat().st_size if log_path.exists() else 0
    rng = random.Random(n)
    print("ready", flush=True)
    while True:
        events = [RuntimeEvent(event=f"e-{n + i}", payload=os.urandom((n + i) % 300))
                  for i in range(rng.randint(1, 6))]
        batch = LogBatch.at(n, offset, events)
        log.write_ahead(batch)
        for event in events:
            extend_register(event.digest)
        log.append(batch)
        log.clear_ahead()
        n, offset = batch.end_position, batch.end_offset
    """
)


class TestCrashSafety:
    @pytest.mark.parametrize("child_code", [CHILD, BATCH_CHILD], ids=["single", "batches"])
    def test_sigkill_at_random_points(self, tmp_path: Path, child_code: str) -> None:
        """After SIGKILL at random points the log always recovers and replays to the register."""
        package_root = Path(eventlog.__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        log_path, reg_path = tmp_path / "runtime_events.log", tmp_path / "rtmr3"
        rng = random.Random(1234)
        outcomes: list[str] = []
        count = 0
        for _ in range(30):
            child = subprocess.Popen(
                [sys.executable, "-c", child_code, str(log_path), str(reg_path)],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0, 0.03))
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            register = reg_path.read_bytes() if reg_path.exists() else ZERO_REGISTER
            log = RuntimeEventLog(log_path)
            outcomes.append(log.recover(register))
            events = log.read()
            assert log.replay() == register
            assert log.pending() == ()
            assert [e.event for e in events] == [f"e-{i}" for i in range(len(events))]
            assert len(events) >= count
            count = len(events)
        assert count > 0
        assert set(outcomes) <= {"clean", "committed", "discarded"}

    def test_logged_payloads_survive(self, tmp_path: Path) -> None:
        """Every event in the recovered log decodes to the payload written (base64 intact)."""
        log = RuntimeEventLog(tmp_path / "log")
        payloads = [os.urandom(n) for n in range(0, 200, 17)]
        for i, payload in enumerate(payloads):
            log.begin(ev(f"p{i}", payload))
            log.commit(ev(f"p{i}", payload))
        lines = log.path.read_bytes().splitlines()
        assert [base64.b64decode(json.loads(line)["payload"]) for line in lines] == payloads


class TestSmallSha384:
    """eventlog.sha384 (CPython's own SHA-384, cheaper per call) is hashlib's SHA-384."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_equals_hashlib(self, data):
        from dstack_core.eventlog import sha384

        assert sha384(data).digest() == hashlib.sha384(data).digest()

    def test_known_answer(self):
        """FIPS 180-4's "abc" vector, so that both cannot be wrong together."""
        from dstack_core.eventlog import sha384

        assert sha384(b"abc").hexdigest() == (
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed"
            "8086072ba1e7cc2358baeca134c825a7"
        )
