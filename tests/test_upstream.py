"""Tests for dstack_core.upstream: V0 (SCALE) and V1 (MessagePack) envelope decoding.

The encoders below are written from the spec (formats.md 2.1, agent-api.md 9.6), not from
the decoder, so a round trip checks the decoder against an independent reading of it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstack_core.collateral import Collateral
from dstack_core.errors import EvidenceError
from dstack_core.eventlog import RuntimeEvent, TdxEvent, replay_rtmrs
from dstack_core.mockpki import MOCK_TD_ATTRIBUTES, SIMULATOR_USER_DATA, MockIntelPki
from dstack_core.quote import TdReport
from dstack_core.upstream import (
    MAX_ATTESTATION_SIZE,
    UpstreamAttestation,
    decode_attestation,
    decode_v0,
    decode_v1,
    is_upstream_attestation,
)
from dstack_core.verify import VerifyOptions, load_evidence, verify_evidence

# --- encoders from the spec ------------------------------------------------------------


def scale_compact(n: int) -> bytes:
    """SCALE ``Compact<u32>``: modes by the two low bits (formats.md 2.1)."""
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 2).to_bytes(4, "little")
    return bytes([0b11]) + n.to_bytes(4, "little")


def scale_vec(data: bytes) -> bytes:
    return scale_compact(len(data)) + data


def scale_str(text: str) -> bytes:
    return scale_vec(text.encode())


def scale_tdx_event(event: TdxEvent) -> bytes:
    """``imr u32, event_type u32, digest Vec<u8>, event String, event_payload Vec<u8>``."""
    return (
        struct.pack("<II", event.imr, event.event_type)
        + scale_vec(event.digest)
        + scale_str(event.event)
        + scale_vec(event.event_payload)
    )


def encode_v0(
    quote: bytes,
    event_log: Sequence[TdxEvent],
    runtime_events: Sequence[RuntimeEvent],
    report_data: bytes,
    config: str,
) -> bytes:
    """``0x00`` (V0) + ``AttestationQuote::DstackTdx`` (0) + the Attestation fields."""
    out = b"\x00" + b"\x00" + scale_vec(quote)
    out += scale_compact(len(event_log)) + b"".join(scale_tdx_event(e) for e in event_log)
    out += scale_compact(len(runtime_events))
    out += b"".join(scale_str(e.event) + scale_vec(e.payload) for e in runtime_events)
    return out + report_data + scale_str(config)


def msgpack_event(event: TdxEvent, *, preimage: bool = True) -> dict[str, Any]:
    """TdxEvent as rmp_serde writes it: a map; digest/payload ``bin``; version only if 2."""
    doc: dict[str, Any] = {
        "imr": event.imr,
        "event_type": event.event_type,
        "digest": event.digest,
        "event": event.event,
        "event_payload": event.event_payload,
    }
    if event.version != 1:
        doc["version"] = event.version
        if preimage and event.is_runtime:
            doc["preimage"] = event.preimage.hex()
    return doc


def encode_v1(
    quote: bytes,
    event_log: Sequence[TdxEvent],
    runtime_events: Sequence[RuntimeEvent],
    report_data: bytes,
    config: str,
    *,
    stack: str = "dstack",
    payload: str | None = None,
    bytes_as_bin: bool = False,
    preimages: bool = True,
) -> bytes:
    """V1: ``{"version": 1, "platform": {...}, "stack": {...}}``; plain ``Vec<u8>`` fields
    (quote, report_data) as arrays of integers, unless ``bytes_as_bin``."""

    def plain(data: bytes) -> Any:
        return data if bytes_as_bin else list(data)

    stack_data: dict[str, Any] = {
        "report_data": plain(report_data),
        "runtime_events": [
            {"event": e.event, "payload": e.payload, **({"version": 2} if e.version == 2 else {})}
            for e in runtime_events
        ],
        "config": config,
    }
    if stack == "dstack-pod":
        stack_data["report_data_payload"] = payload
    doc = {
        "version": 1,
        "platform": {
            "kind": "tdx",
            "data": {
                "quote": plain(quote),
                "event_log": [msgpack_event(e, preimage=preimages) for e in event_log],
            },
        },
        "stack": {"kind": stack, "data": stack_data},
    }
    return msgpack.packb(doc, use_bin_type=True)


# --- evidence built from a mock PKI ----------------------------------------------------

PKI = MockIntelPki.from_seed(b"upstream-tests".ljust(32, b"\0"))
NOW = int(time.time())
VM_CONFIG = '{"os_image_hash":"' + "ab" * 32 + '","cpu_count":1}'
BOOT = (
    TdxEvent(
        imr=0,
        event_type=0x8000000B,
        digest=hashlib.sha384(b"hob").digest(),
        event="",
        event_payload=b"\x09TdxTable",
    ),
    TdxEvent(
        imr=0,
        event_type=0xA,
        digest=hashlib.sha384(b"acpi").digest(),
        event="acpi-tables",
        event_payload=b"ACPI DATA",
    ),
    TdxEvent(
        imr=1,
        event_type=0x80000003,
        digest=hashlib.sha384(b"kernel").digest(),
        event="",
        event_payload=b"kernel",
    ),
    TdxEvent(
        imr=2,
        event_type=6,
        digest=hashlib.sha384(b"cmdline").digest(),
        event="",
        event_payload=b"LOADED_IMAGE::LoadOptions",
    ),
)


def runtime(version: int) -> tuple[RuntimeEvent, ...]:
    names = [
        ("system-preparing", b""),
        ("app-id", b"\x01" * 20),
        ("compose-hash", b"\x02" * 32),
        ("instance-id", b"\x03" * 20),
        ("boot-mr-done", b""),
        ("key-provider", b'{"name":"kms","id":"abcd"}'),
        ("system-ready", b""),
        ("app-event", "ünïcode".encode()),
    ]
    return tuple(RuntimeEvent(event=n, payload=p, version=version) for n, p in names)


def signed_quote(
    runtime_events: Sequence[RuntimeEvent], report_data: bytes, *, version: int = 4
) -> tuple[bytes, tuple[TdxEvent, ...]]:
    """A mock-PKI quote whose RTMRs replay from BOOT + ``runtime_events``."""
    events = BOOT + tuple(e.to_tdx_event() for e in runtime_events)
    rtmrs = replay_rtmrs(events)
    report = TdReport(
        tee_tcb_svn=bytes(16),
        mr_seam=bytes(48),
        mr_signer_seam=bytes(48),
        seam_attributes=bytes(8),
        td_attributes=MOCK_TD_ATTRIBUTES,
        xfam=bytes(8),
        mr_td=b"\x11" * 48,
        mr_config_id=bytes(48),
        mr_owner=bytes(48),
        mr_owner_config=bytes(48),
        rtmr0=rtmrs[0],
        rtmr1=rtmrs[1],
        rtmr2=rtmrs[2],
        rtmr3=rtmrs[3],
        report_data=report_data,
    )
    return PKI.sign_quote(report, user_data=SIMULATOR_USER_DATA, version=version), events


def verify_options(**changes: Any) -> VerifyOptions:
    return VerifyOptions(now=NOW, root_ca_der=PKI.root_ca_der, allow_simulator=True, **changes)


@pytest.fixture(scope="module")
def collateral() -> Collateral:
    return Collateral.from_json(PKI.collateral_json())


class TestScaleCompact:
    @pytest.mark.parametrize(
        ("value", "encoded"),
        [
            (0, "00"),
            (1, "04"),
            (63, "fc"),
            (64, "0101"),
            (5010, "494e"),
            (16383, "fdff"),
            (16384, "02000100"),
            ((1 << 30) - 1, "feffffff"),
        ],
    )
    def test_known_vectors_decode(self, value, encoded):
        """Compact lengths decode as the spec's byte map says (5010 -> ``49 4e``)."""
        assert scale_compact(value).hex() == encoded
        if value <= 1 << 15:
            data = encode_v0(bytes(value), (), (), bytes(64), "")
            assert data[2 : 2 + len(encoded) // 2].hex() == encoded
            assert len(decode_v0(data).quote) == value

    def test_non_canonical_compact_rejected(self):
        """A length encoded in a wider mode than needed is refused, as parity-scale does."""
        quote_len = b"\x01\x00"  # 0 in two-byte mode
        with pytest.raises(EvidenceError, match="non-canonical"):
            decode_v0(b"\x00\x00" + quote_len)

    def test_huge_compact_length_fails_fast(self):
        """A 4-GiB length prefix fails at once on the remaining-bytes check, without reading."""
        started = time.perf_counter()
        with pytest.raises(EvidenceError, match="truncated"):
            decode_v0(b"\x00\x00\x03\xff\xff\xff\xff" + bytes(100))
        assert time.perf_counter() - started < 0.5

    def test_huge_event_count_fails_fast(self):
        """An event count the remaining bytes cannot hold is refused before any loop."""
        data = b"\x00\x00" + scale_vec(b"q") + b"\x02\xff\xff\xff" + bytes(50)
        with pytest.raises(EvidenceError, match="claims"):
            decode_v0(data)

    def test_big_integer_mode_beyond_u32_rejected(self):
        """Mode 3 with more than four value bytes exceeds Compact<u32>."""
        with pytest.raises(EvidenceError, match="exceeds u32"):
            decode_v0(b"\x00\x00\x07" + bytes(10))


class TestV0:
    def test_round_trip_fields(self):
        """Every field the spec lists decodes from the spec's encoding."""
        events = runtime(1)
        quote, log = signed_quote(events, b"v0".ljust(64, b"\0"))
        data = encode_v0(quote, log, events, b"v0".ljust(64, b"\0"), VM_CONFIG)
        assert data[:2] == b"\x00\x00"
        decoded = decode_attestation(data)
        assert decoded == decode_v0(data)
        assert (decoded.wire_version, decoded.platform, decoded.stack) == (0, "tdx", "dstack")
        assert decoded.quote == quote
        assert decoded.event_log == log
        assert decoded.runtime_events == events
        assert decoded.report_data == b"v0".ljust(64, b"\0")
        assert decoded.config == VM_CONFIG
        assert decoded.preimages == ()

    def test_decodes_and_replays_through_the_verifier(self, collateral):
        """A V0 envelope verifies: RTMR0-3 replay, runtime events bound, verdict pass."""
        events = runtime(1)
        report_data = hashlib.sha512(b"app-data:hello").digest()
        quote, log = signed_quote(events, report_data)
        data = encode_v0(quote, log, events, report_data, VM_CONFIG)
        result = verify_evidence(load_evidence(data), verify_options(), collateral)
        assert result.verdict == "pass", result.to_json()
        assert result.evidence_kind == "upstream-v0"
        assert result.check("event_log").detail.count(" ok ") == 4
        assert result.app_id == b"\x01" * 20 and result.compose_hash == b"\x02" * 32
        assert result.key_provider == {"name": "kms", "id": "abcd"}
        # No os-image-hash event and no OS image policy: the vm_config's hash is no claim.
        assert result.os_image_hash == b"" and result.check("os_image").status == "skipped"
        assert result.simulated

    def test_runtime_event_tamper_fails_replay(self, collateral):
        """A runtime event payload changed in the V0 list fails RTMR3 replay."""
        events = runtime(1)
        quote, log = signed_quote(events, bytes(64))
        forged = list(events)
        forged[1] = RuntimeEvent(event="app-id", payload=b"\x09" * 20)
        data = encode_v0(quote, log, forged, bytes(64), VM_CONFIG)
        result = verify_evidence(load_evidence(data), verify_options(), collateral)
        assert result.check("event_log").status == "fail"
        assert "RTMR3 MISMATCH" in result.check("event_log").detail
        assert result.check("runtime_events").status == "fail"
        assert result.verdict == "fail"

    def test_trailing_bytes_rejected(self):
        """Upstream refuses bytes after the SCALE value; so do we."""
        data = encode_v0(b"q", (), (), bytes(64), "") + b"\0"
        with pytest.raises(EvidenceError, match="trailing"):
            decode_v0(data)

    def test_unknown_variant_rejected(self):
        """An AttestationQuote index beyond 4 is unknown."""
        with pytest.raises(EvidenceError, match="unknown AttestationQuote variant 9"):
            decode_v0(b"\x00\x09" + bytes(80))

    def test_gcp_variant_refused_as_unsupported(self):
        """DstackGcpTdx (TPM quote layout undocumented) is refused with a clear code."""
        with pytest.raises(EvidenceError) as info:
            decode_v0(b"\x00\x01" + bytes(80))
        assert info.value.code == "unsupported_evidence"

    def test_sev_snp_decodes_but_is_not_verifiable_yet(self):
        """A V0 SEV-SNP attestation decodes; the verifier says it is not supported yet."""
        data = (
            b"\x00\x03"
            + scale_vec(bytes(1184))
            + scale_compact(2)
            + scale_vec(b"ask")
            + scale_vec(b"vcek")
            + scale_str('{"mr":1}')
            + scale_compact(0)
            + bytes(64)
            + scale_str("")
        )
        decoded = decode_v0(data)
        assert decoded.platform == "sev-snp"
        assert decoded.extra == {"cert_chain": (b"ask", b"vcek"), "mr_config": '{"mr":1}'}
        with pytest.raises(EvidenceError, match="not supported yet") as info:
            load_evidence(data)
        assert info.value.code == "unsupported_evidence"

    def test_invalid_utf8_and_bad_imr(self):
        """Strings must be UTF-8 and event imr 0..3."""
        bad_name = b"\x00\x00" + scale_vec(b"q") + scale_compact(0) + scale_compact(1)
        with pytest.raises(EvidenceError, match="UTF-8"):
            decode_v0(bad_name + scale_vec(b"\xff") + scale_vec(b"") + bytes(64) + b"\0")
        event = TdxEvent(imr=0, event_type=1, digest=bytes(48), event="", event_payload=b"")
        raw = bytearray(scale_tdx_event(event))
        raw[0] = 7
        data = b"\x00\x00" + scale_vec(b"q") + scale_compact(1) + bytes(raw)
        with pytest.raises(EvidenceError, match="imr"):
            decode_v0(data + scale_compact(0) + bytes(64) + b"\0")


class TestV1:
    def test_round_trip_with_v2_events_and_preimages(self):
        """V1 carries V2 runtime events, their preimages and array-encoded plain bytes."""
        events = runtime(2)
        quote, log = signed_quote(events, bytes(64))
        data = encode_v1(quote, log, events, bytes(64), VM_CONFIG)
        assert 0x80 <= data[0] <= 0x8F
        decoded = decode_attestation(data)
        assert (decoded.wire_version, decoded.platform, decoded.stack) == (1, "tdx", "dstack")
        assert decoded.quote == quote and decoded.event_log == log
        assert decoded.runtime_events == events
        assert [p is not None for p in decoded.preimages] == [e.is_runtime for e in log]

    def test_decodes_and_replays_through_the_verifier(self, collateral):
        """A V1 envelope with V2 digests verifies; preimages are checked."""
        events = runtime(2)
        quote, log = signed_quote(events, bytes(64))
        data = encode_v1(quote, log, events, bytes(64), VM_CONFIG)
        result = verify_evidence(load_evidence(data), verify_options(), collateral)
        assert result.verdict == "pass", result.to_json()
        assert result.evidence_kind == "upstream-v1"
        detail = result.check("runtime_events").detail
        assert "0 v1, 8 v2" in detail and "8 v2 preimages" in detail

    def test_wrong_preimage_fails_runtime_events(self, collateral):
        """A V2 event whose preimage is not the canonical JCS text fails runtime_events."""
        events = runtime(2)
        quote, log = signed_quote(events, bytes(64))
        doc = msgpack.unpackb(encode_v1(quote, log, events, bytes(64), VM_CONFIG))
        doc["platform"]["data"]["event_log"][-1]["preimage"] = b'{"name":"x"}'.hex()
        data = msgpack.packb(doc, use_bin_type=True)
        result = verify_evidence(load_evidence(data), verify_options(), collateral)
        assert result.check("runtime_events").status == "fail"
        assert "preimage is not the canonical one" in result.check("runtime_events").detail

    def test_bin_encoded_bytes_accepted(self):
        """Plain byte fields given as msgpack ``bin`` decode the same."""
        events = runtime(1)
        quote, log = signed_quote(events, bytes(64))
        as_list = decode_v1(encode_v1(quote, log, events, bytes(64), VM_CONFIG))
        as_bin = decode_v1(encode_v1(quote, log, events, bytes(64), VM_CONFIG, bytes_as_bin=True))
        assert as_list == as_bin

    def test_dstack_pod_binds_payload(self, collateral):
        """dstack-pod: report_data must be sha512("app-data:" || payload)."""
        events = runtime(1)
        payload = "pod-payload"
        report_data = hashlib.sha512(b"app-data:" + payload.encode()).digest()
        quote, log = signed_quote(events, report_data)
        good = encode_v1(quote, log, events, report_data, "", stack="dstack-pod", payload=payload)
        result = verify_evidence(load_evidence(good), verify_options(), collateral)
        assert result.check("envelope_binding").status == "pass", result.to_json()
        assert "dstack-pod" in result.check("envelope_binding").detail
        bad = encode_v1(quote, log, events, report_data, "", stack="dstack-pod", payload="other")
        result = verify_evidence(load_evidence(bad), verify_options(), collateral)
        assert result.check("envelope_binding").status == "fail"
        assert result.verdict == "fail"

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda d: d.update(version=2), "version"),
            (lambda d: d["platform"].update(kind="quantum"), "unknown V1 platform kind"),
            (lambda d: d["stack"].update(kind="k8s"), "unknown V1 stack kind"),
            (lambda d: d["stack"]["data"].update(report_data=[1, 2]), "64 bytes"),
            (lambda d: d["stack"]["data"].update(report_data=[300] * 64), "0..255"),
            (lambda d: d["stack"]["data"].pop("config"), "missing 'config'"),
            (lambda d: d["platform"]["data"]["event_log"][0].update(imr="0"), "imr"),
            (lambda d: d["platform"]["data"]["event_log"][0].update(digest=b"x"), "digest"),
        ],
    )
    def test_malformed_fields_rejected(self, mutate, message):
        """Each malformed V1 field is an EvidenceError naming it."""
        doc = msgpack.unpackb(encode_v1(b"q", BOOT, (), bytes(64), ""))
        mutate(doc)
        with pytest.raises(EvidenceError, match=message):
            decode_v1(msgpack.packb(doc, use_bin_type=True))

    def test_trailing_bytes_and_extensions_rejected(self):
        """Bytes after the map and msgpack extension types are refused."""
        data = encode_v1(b"q", (), (), bytes(64), "")
        with pytest.raises(EvidenceError, match="trailing"):
            decode_v1(data + b"\xc0")
        doc = msgpack.unpackb(data)
        doc["stack"]["data"]["config"] = msgpack.ExtType(5, b"x")
        with pytest.raises(EvidenceError, match="extension"):
            decode_v1(msgpack.packb(doc, use_bin_type=True))


class TestDispatch:
    def test_first_byte_selects_format(self):
        """0x00 -> V0, msgpack map -> V1, anything else -> unknown wire format."""
        assert is_upstream_attestation(b"\x00") and is_upstream_attestation(b"\x83")
        assert is_upstream_attestation(b"\xde\x00\x03") and not is_upstream_attestation(b"\xd9")
        with pytest.raises(EvidenceError, match="Unknown attestation wire format"):
            decode_attestation(b"\xa1")
        with pytest.raises(EvidenceError, match="Empty"):
            decode_attestation(b"")

    def test_oversize_refused_before_decoding(self):
        """More than 10 MiB is refused unread."""
        with pytest.raises(EvidenceError, match="limit"):
            decode_attestation(b"\x00" + bytes(MAX_ATTESTATION_SIZE))


_V0_SAMPLE = encode_v0(b"quote", BOOT[:2], runtime(1)[:2], bytes(64), VM_CONFIG)
_V1_SAMPLE = encode_v1(b"quote", BOOT[:2], runtime(2)[:2], bytes(64), VM_CONFIG)


def _mutations(sample: bytes) -> st.SearchStrategy[bytes]:
    def apply(edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(sample)
        for position, value in edits:
            data[position % len(data)] = value
        return bytes(data[: max(1, cut)])

    return st.builds(
        apply,
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        st.integers(1, len(sample)),
    )


class TestFuzz:
    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=600))
    def test_random_bytes_only_raise_evidence_error(self, data):
        """Arbitrary bytes decode or raise EvidenceError, never anything else."""
        for decoder in (decode_attestation, decode_v0, decode_v1):
            try:
                decoder(data)
            except EvidenceError:
                pass

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(_mutations(_V0_SAMPLE), _mutations(_V1_SAMPLE)))
    def test_mutated_envelopes_only_raise_evidence_error(self, data):
        """Truncated or byte-flipped valid envelopes decode or raise EvidenceError."""
        try:
            decoded = decode_attestation(data)
        except EvidenceError:
            return
        assert isinstance(decoded, UpstreamAttestation)

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(1 << 40), 1 << 40)
            | st.binary(max_size=8)
            | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "version",
                            "platform",
                            "stack",
                            "kind",
                            "data",
                            "quote",
                            "event_log",
                            "report_data",
                            "config",
                            "runtime_events",
                            "imr",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=20,
        )
    )
    def test_structured_msgpack_only_raises_evidence_error(self, value):
        """Any msgpack document shaped loosely like V1 decodes or raises EvidenceError."""
        data = msgpack.packb({"version": 1, "platform": value, "stack": value}, use_bin_type=True)
        try:
            decode_v1(data)
        except EvidenceError:
            pass
