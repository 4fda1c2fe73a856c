"""Encoding upstream's attestation wire formats (dstack_core.upstream's encoders).

The decoders are the reference: every genuine upstream envelope in tests/data must decode
and encode back to the same bytes, and whatever the encoders write must decode to what
was encoded. Known-answer vectors come from upstream's own tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core.eventlog import RuntimeEvent, TdxEvent, runtime_event
from dstack_core.upstream import (
    UpstreamAttestation,
    build_attestation,
    decode_attestation,
    decode_v0,
    decode_v1,
    encode_app_info,
    encode_attestation,
    encode_v0,
    encode_v1,
    scale_compact,
    strip_for_certificate,
)

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("upstream_*attestation_v0.bin"))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_genuine_envelopes_encode_back_to_their_bytes(path):
    """decode then encode is the identity on upstream's own V0 fixtures (TDX, lite TDX,
    SEV-SNP, Nitro)."""
    data = path.read_bytes()
    assert encode_attestation(decode_attestation(data)) == data


def test_fixtures_are_present():
    assert {p.name for p in FIXTURES} >= {
        "upstream_attestation_v0.bin",
        "upstream_tdx_lite_attestation_v0.bin",
        "upstream_sev_snp_attestation_v0.bin",
        "upstream_nitro_attestation_v0.bin",
    }


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_v0_fixtures_survive_v1(path):
    """The same content in V1 decodes to the same fields (V1 is rmp_serde's named form)."""
    v0 = decode_attestation(path.read_bytes())
    v1 = decode_v1(encode_v1(v0))
    assert attrs.evolve(v1, wire_version=0, preimages=()) == v0


def test_empty_v0_known_answer():
    """Upstream's CSR vector ends with the empty DstackTdx V0 attestation: 00 00 00 00 00
    then 64 zero bytes of report data and an empty config (agent-api.md section 8)."""
    empty = UpstreamAttestation(wire_version=0, platform="tdx", quote=b"", report_data=bytes(64))
    assert encode_v0(empty) == bytes(5) + bytes(64) + b"\x00"


def test_scale_compact_modes():
    """The four compact modes, canonical, matching the decoder's reading."""
    assert scale_compact(0) == b"\x00"
    assert scale_compact(63) == b"\xfc"
    assert scale_compact(64) == b"\x01\x01"
    assert scale_compact(5010) == b"\x49\x4e"  # the simulator fixture's quote length
    assert scale_compact(1 << 14) == b"\x02\x00\x01\x00"
    assert scale_compact((1 << 30) + 1) == b"\x03\x01\x00\x00\x40"
    with pytest.raises(ValueError):
        scale_compact(1 << 32)


def test_v1_layout_is_rmp_serde_named():
    """Plain Vec<u8> fields are integer arrays, event digests and payloads are bin, the
    version is written only for v2 events and the preimage only when given."""
    events = (runtime_event("app-id", b"\x01\x02", version=2),)
    attestation = build_attestation(
        platform="tdx", quote=b"\x80\x01", event_log=events, report_data=bytes(64), config="{}"
    )
    assert attestation.wire_version == 1
    raw = msgpack.unpackb(encode_attestation(attestation), raw=False)
    assert list(raw) == ["version", "platform", "stack"]
    assert raw["platform"]["kind"] == "tdx"
    data = raw["platform"]["data"]
    assert data["quote"] == [0x80, 0x01]
    (event,) = data["event_log"]
    assert list(event) == ["imr", "event_type", "digest", "event", "event_payload", "version",
                           "preimage"]
    assert isinstance(event["digest"], bytes) and event["event_payload"] == b"\x01\x02"
    assert hashlib.sha384(bytes.fromhex(event["preimage"])).digest() == event["digest"]
    stack = raw["stack"]["data"]
    assert list(stack) == ["report_data", "runtime_events", "config"]
    assert stack["report_data"] == [0] * 64
    assert stack["runtime_events"] == [{"event": "app-id", "payload": b"\x01\x02", "version": 2}]


def test_build_attestation_picks_v0_for_v1_events():
    """Upstream's into_versioned: V0 unless a runtime event is version 2."""
    boot = TdxEvent(imr=0, event_type=1, digest=bytes(48), event="", event_payload=b"fw")
    events = (boot, runtime_event("app-id", b"id"))
    built = build_attestation(
        platform="tdx", quote=b"q", event_log=events, report_data=bytes(64), config="cfg"
    )
    assert built.wire_version == 0
    assert built.runtime_events == (RuntimeEvent(event="app-id", payload=b"id"),)
    assert decode_v0(encode_attestation(built)) == built


def test_v0_refuses_what_it_cannot_carry():
    v2 = build_attestation(platform="tdx", quote=b"q", event_log=(runtime_event("x", b"", 2),),
                           report_data=bytes(64), config="")
    with pytest.raises(ValueError, match="version-2"):
        encode_v0(v2)
    pod = UpstreamAttestation(wire_version=0, platform="tdx", stack="dstack-pod", quote=b"",
                              report_data=bytes(64), report_data_payload="p")
    with pytest.raises(ValueError, match="dstack-pod"):
        encode_v0(pod)
    with pytest.raises(ValueError, match="report_data"):
        encode_v0(UpstreamAttestation(wire_version=0, platform="tdx", quote=b"", report_data=b"x"))


def test_sev_snp_attestation_carries_chain_and_mr_config():
    built = build_attestation(
        platform="sev-snp", quote=b"r" * 1184, event_log=(), report_data=bytes(64),
        config="{}", extra={"cert_chain": [b"ask", b"vcek"], "mr_config": "doc"},
    )
    for encoded in (encode_v0(built), encode_v1(attrs.evolve(built, wire_version=1))):
        decoded = decode_attestation(encoded)
        assert decoded.extra == {"cert_chain": (b"ask", b"vcek"), "mr_config": "doc"}
        assert decoded.quote == built.quote and decoded.runtime_events == ()


def test_strip_for_certificate_matches_upstreams_lite_form():
    """Stripping the full simulator fixture leaves what upstream certificates carry: the
    three RTMR0 ACPI DATA events (digest kept) and the RTMR3 events (digest emptied); a
    certificate's attestation is already stripped, so stripping it changes nothing."""
    full = decode_attestation((DATA / "upstream_attestation_v0.bin").read_bytes())
    stripped = strip_for_certificate(full)
    acpi = [e for e in stripped.event_log if e.imr == 0]
    runtime = [e for e in stripped.event_log if e.imr == 3]
    assert len(acpi) == 3 and all(e.event_payload == b"ACPI DATA" and e.digest for e in acpi)
    assert len(runtime) == 9 and all(e.digest == b"" for e in runtime)
    assert len(stripped.event_log) == 12
    assert stripped.runtime_events == full.runtime_events
    lite = decode_attestation((DATA / "upstream_tdx_lite_attestation_v0.bin").read_bytes())
    assert strip_for_certificate(lite) == lite


def test_app_info_is_a_nine_element_array():
    encoded = encode_app_info(
        app_id=b"a" * 20, compose_hash=b"c" * 32, instance_id=b"i" * 20,
        device_id=b"d" * 32, mr_system=b"s" * 32, mr_aggregated=b"m" * 32,
        os_image_hash=b"o" * 32, key_provider_info=b'{"name":"kms","id":""}',
        init_script_hashes=[b"h" * 32],
    )
    decoded = msgpack.unpackb(encoded, raw=True)
    assert len(decoded) == 9 and decoded[0] == b"a" * 20 and decoded[8] == [b"h" * 32]
    assert encoded[0] == 0x99  # fixarray of 9


# --- property: encode then decode is the identity ------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_bytes = st.binary(max_size=80)


@st.composite
def tdx_attestations(draw: st.DrawFn) -> UpstreamAttestation:
    version = draw(st.sampled_from([1, 2]))
    runtime = draw(st.lists(st.tuples(_names, _bytes), max_size=5))
    boot = draw(st.lists(
        st.builds(TdxEvent, imr=st.integers(0, 2), event_type=st.integers(0, 0xFFFF_FFFF),
                  digest=st.binary(min_size=48, max_size=48), event=_names, event_payload=_bytes),
        max_size=4,
    ))
    events = tuple(boot) + tuple(runtime_event(n, p, version) for n, p in runtime)
    return build_attestation(
        platform="tdx",
        quote=draw(st.binary(max_size=300)),
        event_log=events,
        report_data=draw(st.binary(min_size=64, max_size=64)),
        config=draw(_names),
    )


@settings(max_examples=150, deadline=None)
@given(tdx_attestations())
def test_roundtrip_property(attestation):
    """Any attestation the builder makes decodes back to itself, in its own wire version."""
    assert decode_attestation(encode_attestation(attestation)) == attestation
