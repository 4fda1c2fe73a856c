"""Tests for dstack_core.ccel: the TCG2 boot log parser, its dstack projection and the builder."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core import ccel
from dstack_core.ccel import (
    EV_EVENT_TAG,
    EV_NO_ACTION,
    EV_PLATFORM_CONFIG_FLAGS,
    TPM_ALG_SHA1,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    Tcg2LogBuilder,
    build_ccel_table,
    parse_ccel,
    parse_ccel_table,
    parse_tcg2,
)
from dstack_core.errors import EvidenceError
from dstack_core.eventlog import InvalidEvent, replay, replay_rtmrs

SAMPLE = (Path(__file__).parent / "data" / "ccel.bin").read_bytes()
SAMPLE_LOG_END = 1933  # formats.md 3.3: "log ends at 1933, rest 0xFF"


def walk_sample(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """Our own minimal walk of a SHA-384-only TCG2 log: (mr_index, type, digest, event)."""
    pos = 4 + 4 + 20
    (header_size,) = struct.unpack("<I", data[pos : pos + 4])
    pos += 4 + header_size
    records = []
    while data[pos : pos + 4] != b"\xff\xff\xff\xff":
        mr_index, event_type, count = struct.unpack("<III", data[pos : pos + 12])
        pos += 12
        assert count == 1
        (alg,) = struct.unpack("<H", data[pos : pos + 2])
        assert alg == 0x000C
        digest = data[pos + 2 : pos + 50]
        pos += 50
        (size,) = struct.unpack("<I", data[pos : pos + 4])
        event = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        records.append((mr_index, event_type, digest, event))
    return records


def independent_rtmrs(records: list[tuple[int, int, bytes, bytes]]) -> list[bytes]:
    rtmrs = [bytes(48)] * 4
    for mr_index, event_type, digest, _ in records:
        if mr_index == 0 or event_type == 3:
            continue
        rtmrs[mr_index - 1] = hashlib.sha384(rtmrs[mr_index - 1] + digest).digest()
    return rtmrs


class TestSample:
    def test_eighteen_events(self) -> None:
        """dstack's projection of the real CCEL yields 18 events: 13 on RTMR0, 5 on RTMR1."""
        events = parse_ccel(SAMPLE)
        assert len(events) == 18
        assert Counter(e.imr for e in events) == {0: 13, 1: 5}

    def test_event_types(self) -> None:
        """The event types match the research notes' census of the sample."""
        types = Counter(e.event_type for e in parse_ccel(SAMPLE))
        assert types == {
            0x80000001: 5,
            0xA: 3,
            0x80000007: 3,
            0x4: 2,
            0x80000002: 2,
            0x8000000B: 1,
            0x8000000A: 1,
            0x80000003: 1,
        }

    def test_acpi_events_named(self) -> None:
        """The three RTMR0 ACPI DATA events are named in order; every other name is empty."""
        events = parse_ccel(SAMPLE)
        named = [(i, e.event) for i, e in enumerate(events) if e.event]
        assert [name for _, name in named] == ["acpi-loader", "acpi-rsdp", "acpi-tables"]
        for i, _ in named:
            assert events[i].imr == 0 and events[i].event_type == 10
            assert events[i].event_payload == b"ACPI DATA"

    def test_events_match_independent_walk(self) -> None:
        """Types, digests and payloads equal our own walk of the raw bytes."""
        walked = [r for r in walk_sample(SAMPLE) if r[0] != 0]
        events = parse_ccel(SAMPLE)
        assert [(e.imr + 1, e.event_type, e.digest, e.event_payload) for e in events] == walked

    def test_replay_matches_independent_walk(self) -> None:
        """Replaying RTMR0..2 equals values computed from the raw bytes by the test itself."""
        expected = independent_rtmrs(walk_sample(SAMPLE))
        rtmrs = replay_rtmrs(parse_ccel(SAMPLE))
        assert list(rtmrs) == expected
        assert rtmrs[0].hex().startswith("274c2344")
        assert rtmrs[2] == rtmrs[3] == bytes(48)
        assert replay(parse_ccel(SAMPLE), 1) == expected[1]

    def test_replay_values(self) -> None:
        """The sample's RTMR0 and RTMR1 have these exact values (pinned from the walk above)."""
        rtmrs = replay_rtmrs(parse_ccel(SAMPLE))
        assert rtmrs[0].hex() == (
            "274c2344116db7c663470693b5ba62b8621eac28cb41d2f816ddf188f9f423f9"
            "00a1c44d32386fd3c993dc814e62af9d"
        )
        assert rtmrs[1].hex() == (
            "bdcf4ee0f7fdfe7c73fbb19ded73193aee23a6726b86d3b282ea097cf4c9ed7a"
            "0db21b5c1ccd513e410d90e310836b26"
        )

    def test_tcg2_header_and_end(self) -> None:
        """The Spec ID header has MR index 1 and one SHA-384 bank; the log ends at 1933."""
        log = parse_tcg2(SAMPLE)
        assert log.spec_id.header_mr_index == 1
        assert log.spec_id.algorithms == ((TPM_ALG_SHA384, 48),)
        assert (log.spec_id.spec_version_major, log.spec_id.uintn_size) == (2, 2)
        assert log.end == SAMPLE_LOG_END
        assert set(SAMPLE[SAMPLE_LOG_END:]) == {0xFF}
        assert len(log.records) == 18
        assert log.records[0].offset == 4 + 4 + 20 + 4 + 33

    def test_builder_reproduces_sample(self) -> None:
        """Rebuilding the parsed sample with the builder gives the file byte for byte."""
        builder = Tcg2LogBuilder()
        for record in parse_tcg2(SAMPLE).records:
            builder.add(
                record.mr_index,
                record.event_type,
                record.event,
                digest=record.digest(TPM_ALG_SHA384),
            )
        assert builder.build(pad_to=len(SAMPLE)) == SAMPLE

    def test_log_without_padding(self) -> None:
        """A log cut exactly at its end (no 0xFF padding) parses the same."""
        assert parse_ccel(SAMPLE[:SAMPLE_LOG_END]) == parse_ccel(SAMPLE)

    @pytest.mark.parametrize("extra", [1, 2, 3])
    def test_short_ff_tail(self, extra: int) -> None:
        """Up to three trailing 0xFF bytes (too short for an MR index) end the log."""
        assert parse_ccel(SAMPLE[: SAMPLE_LOG_END + extra]) == parse_ccel(SAMPLE)


def build(*records: tuple[int, int, bytes], **kwargs: object) -> bytes:
    builder = Tcg2LogBuilder()
    for mr_index, event_type, event in records:
        builder.add(mr_index, event_type, event)
    return builder.build(**kwargs)  # type: ignore[arg-type]


class TestBuilder:
    def test_round_trip(self) -> None:
        """parse_ccel reads back the builder's records with imr = mr_index - 1."""
        data = build((1, 0x80000001, b"hob"), (2, EV_EVENT_TAG, b"cmdline"), (3, 0xD, b"initrd"))
        events = parse_ccel(data)
        assert [(e.imr, e.event_type, e.event_payload) for e in events] == [
            (0, 0x80000001, b"hob"),
            (1, EV_EVENT_TAG, b"cmdline"),
            (2, 0xD, b"initrd"),
        ]
        assert all(e.digest == hashlib.sha384(e.event_payload).digest() for e in events)
        assert all(e.event == "" and e.version == 1 for e in events)

    def test_padding(self) -> None:
        """pad_to fills with 0xFF up to the size and parsing stops there."""
        data = build((1, 1, b"a"), pad_to=4096)
        assert len(data) == 4096 and data.endswith(b"\xff" * 100)
        assert len(parse_ccel(data)) == 1

    def test_pad_too_small(self) -> None:
        """A log longer than pad_to is refused."""
        with pytest.raises(InvalidEvent):
            build((1, 1, b"a" * 100), pad_to=64)

    def test_explicit_digest_must_be_48_bytes(self) -> None:
        """The SHA-384 digest given to add() must be 48 bytes."""
        with pytest.raises(InvalidEvent):
            Tcg2LogBuilder().add(1, 1, b"", digest=bytes(32))

    def test_mrtd_records_dropped(self) -> None:
        """Records with MR index 0 (MRTD) are not dstack events."""
        data = build((0, EV_NO_ACTION, b"sp800-155"), (0, 1, b"mrtd"), (1, 1, b"a"))
        assert len(parse_tcg2(data).records) == 3
        assert [e.event_payload for e in parse_ccel(data)] == [b"a"]

    def test_no_action_kept_but_not_replayed(self) -> None:
        """EV_NO_ACTION records above MR index 0 are kept, as dstack does, and skipped by replay."""
        data = build((1, 1, b"a"), (1, EV_NO_ACTION, b"info"))
        events = parse_ccel(data)
        assert [e.event_type for e in events] == [1, EV_NO_ACTION]
        assert replay(events, 0) == replay(events[:1], 0)

    def test_sha384_taken_among_banks(self) -> None:
        """With several digest banks the SHA-384 one is used."""
        builder = Tcg2LogBuilder(
            algorithms=((TPM_ALG_SHA1, 20), (TPM_ALG_SHA384, 48), (TPM_ALG_SHA256, 32))
        )
        builder.add(
            1, 1, b"a", extra_digests=[(TPM_ALG_SHA1, bytes(20)), (TPM_ALG_SHA256, bytes(32))]
        )
        (event,) = parse_ccel(builder.build())
        assert event.digest == hashlib.sha384(b"a").digest()
        record = parse_tcg2(builder.build()).records[0]
        assert record.digest(TPM_ALG_SHA256) == bytes(32) and record.digest(0x0012) is None

    def test_only_first_three_acpi_events_named(self) -> None:
        """Only the first three RTMR0 type-10 ACPI DATA events get names."""
        acpi = (1, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA")
        data = build(
            (2, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA"), acpi, (1, 10, b"other"), acpi, acpi, acpi
        )
        assert [e.event for e in parse_ccel(data)] == [
            "",
            "acpi-loader",
            "",
            "acpi-rsdp",
            "acpi-tables",
            "",
        ]

    def test_header_mr_index_zero(self) -> None:
        """A TPM-style header with index 0 parses too."""
        data = Tcg2LogBuilder(header_mr_index=0).add(1, 1, b"a").build()
        assert parse_tcg2(data).spec_id.header_mr_index == 0

    def test_declared_algorithm_size_is_used(self) -> None:
        """An algorithm unknown to the table but declared in the Spec ID event is sized from it."""
        builder = Tcg2LogBuilder(algorithms=((TPM_ALG_SHA384, 48), (0x0099, 16)))
        builder.add(1, 1, b"a", extra_digests=[(0x0099, b"\x01" * 16)])
        assert parse_tcg2(builder.build()).records[0].digest(0x0099) == b"\x01" * 16

    def test_vendor_info(self) -> None:
        """Vendor info in the Spec ID event is carried through."""
        data = Tcg2LogBuilder(vendor_info=b"vendor").add(1, 1).build()
        assert parse_tcg2(data).spec_id.vendor_info == b"vendor"


def record(mr_index: int, event_type: int, digests: bytes, count: int, event: bytes) -> bytes:
    return (
        struct.pack("<III", mr_index, event_type, count)
        + digests
        + struct.pack("<I", len(event))
        + event
    )


HEADER = Tcg2LogBuilder().header()
SHA384_DIGEST = struct.pack("<H", TPM_ALG_SHA384) + bytes(48)


class TestMalformed:
    def test_every_truncation(self) -> None:
        """Every prefix of the real log parses or raises EvidenceError naming an offset."""
        boundaries = {SAMPLE_LOG_END} | {r.offset for r in parse_tcg2(SAMPLE).records}
        for length in range(SAMPLE_LOG_END + 1):
            if length in boundaries:
                parse_ccel(SAMPLE[:length])
                continue
            with pytest.raises(EvidenceError, match="offset"):
                parse_ccel(SAMPLE[:length])

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (
                record(1, 1, struct.pack("<H", 0x0042) + bytes(48), 1, b""),
                "unknown digest algorithm",
            ),
            (record(1, 1, struct.pack("<H", TPM_ALG_SHA256) + bytes(32), 1, b""), "0 SHA-384"),
            (record(1, 1, SHA384_DIGEST * 2, 2, b""), "2 SHA-384"),
            (record(1, 1, b"", 0, b""), "0 SHA-384"),
            (record(5, 1, SHA384_DIGEST, 1, b""), "MR index 5"),
            (struct.pack("<III", 1, 1, 2**31), "digests"),
            (
                struct.pack("<III", 1, 1, 1) + SHA384_DIGEST + struct.pack("<I", 2**32 - 2),
                "truncated",
            ),
            (b"\x00\x00", "stray"),
        ],
    )
    def test_bad_records(self, body: bytes, message: str) -> None:
        """Bad records raise EvidenceError with a message naming the problem and the offset."""
        with pytest.raises(EvidenceError, match=message) as info:
            parse_ccel(HEADER + body)
        assert "offset" in info.value.message

    @pytest.mark.parametrize(
        "header",
        [
            b"",
            HEADER[:10],
            struct.pack("<II20sI", 1, 4, bytes(20), 33) + HEADER[32:],
            HEADER[:32] + b"Spec ID Event02\x00" + HEADER[48:],
            struct.pack("<II20sI", 1, 3, bytes(20), 34) + HEADER[32:] + b"\x00",
            struct.pack("<II20sI", 1, 3, bytes(20), 32) + HEADER[32:-1],
            HEADER[:56] + struct.pack("<I", 1000) + HEADER[60:],
            HEADER[:60] + struct.pack("<HH", TPM_ALG_SHA384, 32) + HEADER[64:],
        ],
    )
    def test_bad_header(self, header: bytes) -> None:
        """A missing, mistyped, mis-signed or mis-sized Spec ID header raises EvidenceError."""
        with pytest.raises(EvidenceError, match="offset|signature"):
            parse_ccel(header)

    def test_not_bytes(self) -> None:
        """Non-bytes input is EvidenceError, not TypeError."""
        with pytest.raises(EvidenceError):
            parse_ccel("text")  # type: ignore[arg-type]

    def test_size_cap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Data over MAX_CCEL_SIZE is refused."""
        monkeypatch.setattr(ccel, "MAX_CCEL_SIZE", 1000)
        with pytest.raises(EvidenceError, match="more than 1000"):
            parse_ccel(SAMPLE)

    def test_record_cap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """More than MAX_RECORDS records are refused."""
        monkeypatch.setattr(ccel, "MAX_RECORDS", 5)
        with pytest.raises(EvidenceError, match="more than 5"):
            parse_ccel(SAMPLE)


class TestFuzz:
    @settings(max_examples=400)
    @given(st.binary(max_size=512))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes either parse or raise EvidenceError."""
        try:
            parse_ccel(data)
        except EvidenceError:
            pass

    @settings(max_examples=400)
    @given(st.binary(max_size=512))
    def test_random_records_after_header(self, body: bytes) -> None:
        """Random bytes after a valid header either parse or raise EvidenceError."""
        try:
            parse_ccel(HEADER + body)
        except EvidenceError:
            pass

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, SAMPLE_LOG_END + 3), st.integers(0, 255)),
            min_size=1,
            max_size=4,
        ),
        st.integers(0, SAMPLE_LOG_END + 64),
    )
    def test_mutated_sample(self, changes: list[tuple[int, int]], length: int) -> None:
        """The real log with bytes changed and cut anywhere parses or raises EvidenceError."""
        data = bytearray(SAMPLE[:length])
        for position, value in changes:
            if position < len(data):
                data[position] = value
        try:
            parse_ccel(bytes(data))
        except EvidenceError:
            pass


class TestCcelTable:
    def test_round_trip(self) -> None:
        """build_ccel_table makes a 56-byte table parse_ccel_table reads back."""
        table = build_ccel_table(65536, 0x7F000000)
        assert len(table) == 56 and table[:4] == b"CCEL" and sum(table) % 256 == 0
        parsed = parse_ccel_table(table)
        assert (parsed.cc_type, parsed.laml, parsed.lasa) == (2, 65536, 0x7F000000)

    @pytest.mark.parametrize(
        "table",
        [
            build_ccel_table(1, 2)[:55],
            b"XCEL" + build_ccel_table(1, 2)[4:],
            build_ccel_table(1, 2)[:40] + b"\x07" + build_ccel_table(1, 2)[41:],
        ],
        ids=["short", "signature", "checksum"],
    )
    def test_bad_table(self, table: bytes) -> None:
        """Wrong size, signature or checksum is EvidenceError."""
        with pytest.raises(EvidenceError):
            parse_ccel_table(table)
