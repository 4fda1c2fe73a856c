"""The CBOR attestation envelope: canonical, self-identifying, strictly decoded."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack_core.envelope import ENVELOPE_MAGIC, AppInfo, Envelope, sniff_envelope
from dstack_core.errors import EvidenceError
from dstack_core.eventlog import TdxEvent, runtime_event

from .noncanonical import variants


def sample(**overrides) -> Envelope:
    values = dict(
        platform="simulator",
        evidence_format="tdx",
        quote=b"\x04\x00" + bytes(100),
        event_log=(
            TdxEvent(imr=0, event_type=10, digest=bytes(48), event="acpi-loader", event_payload=b"ACPI DATA"),
            runtime_event("app-id", bytes(20)),
            runtime_event("compose-hash", b"\x01" * 32, version=2),
        ),
        report_data=bytes(range(64)),
        vm_config='{"os_image_hash":"00"}',
        app_info=AppInfo(app_id=bytes(20), compose_hash=b"\x01" * 32),
    )
    values.update(overrides)
    return Envelope(**values)


def reencode(doc) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, doc), canonical=True)


def as_doc(envelope: Envelope) -> dict:
    return dict(cbor2.loads(envelope.to_cbor()))


class TestEncoding:
    def test_round_trip(self):
        """to_cbor/from_cbor round-trips every field, v2 events included."""
        env = sample(extra={"cert_chain": [b"a", b"b"]})
        assert Envelope.from_cbor(env.to_cbor()) == env

    def test_canonical_and_deterministic(self):
        """The encoding is canonical: equal values give equal bytes, re-encoding is stable."""
        data = sample().to_cbor()
        assert data == sample().to_cbor()
        assert reencode(as_doc(sample())) == data

    def test_first_bytes_differ_from_upstream(self):
        """Our envelope starts d9 d9 f7, never 0x00 (upstream V0) or a msgpack map (V1)."""
        data = sample().to_cbor()
        assert data.startswith(ENVELOPE_MAGIC)
        assert sniff_envelope(data) == "dstack-core"
        assert sniff_envelope(b"\x00\x00") == "upstream-v0"
        assert sniff_envelope(b"\x83\xa7version") == "upstream-v1"
        assert sniff_envelope(b"\xde\x00\x03") == "upstream-v1"
        assert sniff_envelope(b"") is None and sniff_envelope(b"{") is None

    def test_platform_tag_is_inside(self):
        """The platform tag is part of the encoded map, so simulator output says so."""
        assert as_doc(sample())["platform"] == "simulator"
        assert Envelope.from_cbor(sample(platform="tdx").to_cbor()).simulated is False
        assert Envelope.from_cbor(sample().to_cbor()).simulated is True

    def test_report_data_length_enforced(self):
        """An envelope's report_data is exactly 64 bytes."""
        with pytest.raises(ValueError):
            sample(report_data=bytes(63))


class TestStrictDecoding:
    def test_any_well_formed_evidence_format_decodes(self):
        """A vendor's evidence format decodes: which formats can be verified is the
        verifier's business (its plugins), not the envelope's."""
        doc = as_doc(sample())
        doc["event_log"] = list(doc["event_log"])
        doc["evidence_format"] = "acme-cc"
        assert Envelope.from_cbor(reencode(doc)).evidence_format == "acme-cc"

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda d: d.update(version=2), "unsupported envelope version"),
            (lambda d: d.update(format="other"), "format"),
            (lambda d: d.pop("quote"), "missing keys"),
            (lambda d: d.update(surprise=1), "unknown keys"),
            (lambda d: d.update(quote="text"), "quote must be bytes"),
            (lambda d: d.update(report_data=bytes(65)), "report_data"),
            (lambda d: d.update(evidence_format="SGX quote!"), "evidence_format"),
            (lambda d: d.update(evidence_format=""), "evidence_format"),
            (lambda d: d.update(event_log=[{"imr": True}]), "event_log"),
            (lambda d: d.update(event_log=[{"imr": 9, "type": 1, "digest": b"", "event": "", "payload": b""}]), "event_log"),
            (lambda d: d.update(platform=""), "platform"),
        ],
    )
    def test_rejects_malformed_maps(self, mutate, message):
        """Unknown versions, missing/unknown keys and wrong types are EvidenceError."""
        doc = as_doc(sample())
        doc["event_log"] = list(doc["event_log"])
        mutate(doc)
        with pytest.raises(EvidenceError, match=message):
            Envelope.from_cbor(reencode(doc))

    def test_rejects_trailing_bytes(self):
        """Bytes after the envelope are an error, not ignored."""
        with pytest.raises(EvidenceError, match="trailing"):
            Envelope.from_cbor(sample().to_cbor() + b"\x00")

    def test_rejects_truncation_everywhere(self):
        """Every truncation of a valid envelope is a clean EvidenceError."""
        data = sample().to_cbor()
        for cut in range(len(data)):
            with pytest.raises(EvidenceError):
                Envelope.from_cbor(data[:cut])

    def test_rejects_huge(self):
        """Inputs over 10 MiB are refused before decoding."""
        with pytest.raises(EvidenceError, match="larger than"):
            Envelope.from_cbor(ENVELOPE_MAGIC + bytes(10 * 1024 * 1024))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=512))
    def test_fuzz_random_bytes(self, tail):
        """Random bytes after the magic raise only EvidenceError."""
        try:
            Envelope.from_cbor(ENVELOPE_MAGIC + tail)
        except EvidenceError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_fuzz_mutations(self, data):
        """Byte flips of a valid envelope decode or raise EvidenceError, nothing else."""
        raw = bytearray(sample().to_cbor())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        try:
            Envelope.from_cbor(bytes(raw))
        except EvidenceError:
            pass


class TestCanonical:
    """Only the one canonical encoding decodes (issue 8): cbor2 alone is lenient."""

    def test_reference_encoder_agrees(self):
        """The test's own CBOR writer gives our encoder's bytes when asked for canonical."""
        from .noncanonical import encode

        env = sample()
        assert encode(cbor2.CBORTag(55799, as_doc(env))) == env.to_cbor()

    @pytest.mark.parametrize("name", sorted(variants(as_doc(sample()))))
    def test_non_canonical_rejected(self, name):
        """Non-shortest heads, indefinite lengths, unsorted or duplicate keys: refused,
        though cbor2 decodes every one of them."""
        data = variants(as_doc(sample()))[name]
        cbor2.loads(data)  # valid CBOR...
        with pytest.raises(EvidenceError, match="not canonical CBOR"):
            Envelope.from_cbor(data)  # ...but not the one encoding

    @pytest.mark.parametrize("version", [1.0, True, -1, "1", b"\x01", [1]])
    def test_version_must_be_an_unsigned_integer(self, version):
        """1.0 or true equal 1 in Python; the envelope refuses them."""
        doc = as_doc(sample())
        doc["version"] = version
        with pytest.raises(EvidenceError, match="version"):
            Envelope.from_cbor(reencode(doc))


class TestFastEventPath:
    """The envelope decodes events without attrs' validator calls; it must accept exactly
    what the validating constructor accepts, and build the same event."""

    @settings(max_examples=400, deadline=None)
    @given(
        st.fixed_dictionaries(
            {
                "imr": st.sampled_from([0, 1, 2, 3, 4, -1, True, 3.0, "3"]),
                "type": st.sampled_from([0, 1, 0x08000001, 0xFFFFFFFF, 1 << 32, -1, False]),
                "digest": st.sampled_from([b"", b"\x01" * 48, b"\x01" * 47, "ab" * 48, None]),
                "event": st.sampled_from(["", "app-id", "\udcff", "é", b"x"]),
                "payload": st.sampled_from([b"", b"\x00" * 20, "text", 5]),
            },
            optional={"version": st.sampled_from([1, 2, 3, 0, True, "1"]),
                      "extra": st.just(1)},
        )
    )
    def test_accepts_exactly_what_the_constructor_accepts(self, doc):
        """_fast_event answers None or the very event the validating path builds."""
        import cbor2

        from dstack_core.envelope import _event_from_map, _fast_event

        for container in (doc, cbor2.frozendict(doc)):
            fast = _fast_event(container)
            try:
                slow = _event_from_map(dict(container), 0) if fast is None else None
            except EvidenceError:
                continue
            if fast is None:
                pytest.fail(f"the fast path refused what the constructor accepts: {slow}")
            expected = TdxEvent(imr=doc["imr"], event_type=doc["type"], digest=doc["digest"],
                                event=doc["event"], event_payload=doc["payload"],
                                version=doc.get("version", 1))
            assert fast == expected and type(fast) is TdxEvent


class TestCanonicalFastPath:
    """The canonical check's quick road decides only what the full re-encoding would."""

    keys = st.sampled_from(["format", "version", "quote", "event_log", "imr", "type", "app_id",
                            "app_info", "x", "é", "zz"])
    scalars = st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.binary(max_size=30),
                        st.text(max_size=10), st.none(), st.floats(allow_nan=False))

    @settings(max_examples=400, deadline=None)
    @given(st.dictionaries(keys, st.one_of(
        scalars,
        st.lists(st.dictionaries(keys, scalars, max_size=4), max_size=3),
        st.dictionaries(keys, scalars, max_size=3),
    ), max_size=6))
    def test_agrees_with_the_canonical_encoding(self, doc):
        """For any value, a yes from the quick road means the in-order bytes are the
        canonical ones; it never says yes to a non-canonical encoding."""
        from dstack_core.envelope import ENVELOPE_MAGIC, _canonical_in_order

        in_order = cbor2.dumps(doc)
        canonical = cbor2.dumps(doc, canonical=True)
        if _canonical_in_order(doc, ENVELOPE_MAGIC + in_order):
            assert in_order == canonical
        assert not _canonical_in_order(doc, ENVELOPE_MAGIC + in_order + b"\x00")

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.sampled_from(["format", "version", "quote", "platform", "vm_config"]),
                           st.one_of(st.integers(0, 2**64), st.binary(max_size=30),
                                     st.text(max_size=10)), min_size=1),
           st.lists(st.dictionaries(st.sampled_from(["imr", "type", "digest", "event"]),
                                    st.integers(0, 9), min_size=1), max_size=3))
    def test_says_yes_to_canonical_envelopes(self, top, events):
        """Maps of the envelope's shape in canonical key order are decided here, rightly."""
        from dstack_core.envelope import ENVELOPE_MAGIC, _canonical_in_order

        def ordered(d):
            return dict(sorted(d.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode())))

        doc = ordered({**top, "event_log": [ordered(e) for e in events]})
        data = ENVELOPE_MAGIC + cbor2.dumps(doc)
        assert _canonical_in_order(doc, data)
        assert data == cbor2.dumps(cbor2.CBORTag(55799, doc), canonical=True)


def _decoded_by_both(data: bytes):
    """(fast path's answer or None, full path's envelope or its EvidenceError)."""
    from dstack_core.envelope import _decode_canonical, _decode_full

    fast = _decode_canonical(Envelope, data)
    try:
        full = _decode_full(Envelope, data)
    except EvidenceError as exc:
        full = exc
    return fast, full


def _assert_same_answer(data: bytes) -> None:
    """The one-pass decode answers None (undecided) or exactly what the full path
    decodes; never an envelope the full path refuses."""
    fast, full = _decoded_by_both(data)
    if fast is None:
        return
    assert not isinstance(full, EvidenceError), f"fast path accepted what the full path refuses: {full}"
    assert fast == full
    assert [type(e) for e in fast.event_log] == [TdxEvent] * len(full.event_log)


class TestOnePassDecode:
    """Envelope.from_cbor decides an envelope of the usual shape in one pass (decode, key
    order, types, events, re-encoding compared); everything else goes the full way. The
    one pass must give the full path's answer, forged and non-canonical inputs included."""

    def test_takes_the_usual_envelope(self):
        """The common case (no extra, every field valid) is decided by the fast path."""
        from dstack_core.envelope import _decode_canonical

        data = sample().to_cbor()
        assert _decode_canonical(Envelope, data) == Envelope.from_cbor(data) == sample()

    def test_leaves_extra_to_the_full_path(self):
        from dstack_core.envelope import _decode_canonical

        env = sample(extra={"cert_chain": [b"a"]})
        assert _decode_canonical(Envelope, env.to_cbor()) is None
        assert Envelope.from_cbor(env.to_cbor()) == env

    @pytest.mark.parametrize("name", sorted(variants(as_doc(sample()))))
    def test_refuses_every_non_canonical_variant(self, name):
        """Non-shortest heads, indefinite lengths, unsorted or duplicate keys (events'
        too): not decided here, refused by the full path."""
        from dstack_core.envelope import _decode_canonical

        data = variants(as_doc(sample()))[name]
        assert _decode_canonical(Envelope, data) is None
        with pytest.raises(EvidenceError, match="not canonical CBOR"):
            Envelope.from_cbor(data)

    @pytest.mark.parametrize(
        "tail", [b"\x00", b"\xd9\xd9\xf7", b"\xff"], ids=["zero", "tag", "break"]
    )
    def test_trailing_bytes_refused(self, tail):
        """cbor2.loads ignores trailing bytes; the re-encoding comparison does not."""
        from dstack_core.envelope import _decode_canonical

        data = sample().to_cbor() + tail
        assert _decode_canonical(Envelope, data) is None
        with pytest.raises(EvidenceError):
            Envelope.from_cbor(data)

    def test_nested_self_describe_tag_refused(self):
        """cbor2 strips a second self-describe tag; the fast path must not accept it."""
        data = sample().to_cbor()
        _assert_same_answer(ENVELOPE_MAGIC + data)
        from dstack_core.envelope import _decode_canonical

        assert _decode_canonical(Envelope, ENVELOPE_MAGIC + data) is None

    values = st.one_of(
        st.integers(-(2**66), 2**66), st.booleans(), st.none(), st.floats(allow_nan=False),
        st.binary(max_size=70), st.text(max_size=8), st.just(b"\x01" * 48), st.just(bytes(64)),
        st.just("tdx"), st.just(""), st.just("dstack-core/attestation"),
        st.lists(st.integers(0, 3), max_size=2),
    )

    @settings(max_examples=300, deadline=None)
    @given(
        replaced=st.dictionaries(
            st.sampled_from(["format", "version", "platform", "evidence_format", "quote",
                             "report_data", "vm_config", "app_info", "event_log", "extra"]),
            values, max_size=2,
        ),
        dropped=st.sets(st.sampled_from(["app_info", "platform", "extra"]), max_size=1),
        event_field=st.sampled_from(["imr", "type", "digest", "event", "payload", "version",
                                     "other"]),
        event_value=values,
        app_field=st.sampled_from(["app_id", "mr_system", "unknown"]),
        app_value=values,
        style=st.sampled_from(["", "wide", "indefinite", "unsorted"]),
        at=st.sampled_from(["", "/version", "/quote", "/event_log", "/event_log/1",
                            "/event_log/1/imr", "/event_log/2/payload", "/app_info",
                            "/app_info/app_id", "/report_data"]),
    )
    def test_agrees_with_the_full_path(
        self, replaced, dropped, event_field, event_value, app_field, app_value, style, at
    ):
        """Forged fields (wrong types, booleans, floats, out-of-range values, unknown
        keys), missing keys, in canonical or non-canonical encodings: the fast path gives
        None or the full path's very envelope."""
        from .noncanonical import encode

        doc = as_doc(sample())
        doc["event_log"] = [dict(e) for e in doc["event_log"]]
        doc["app_info"] = dict(doc["app_info"])
        doc.update(replaced)
        for key in dropped:
            doc.pop(key, None)
        events = doc.get("event_log")
        if isinstance(events, list) and len(events) > 1 and isinstance(events[1], dict):
            events[1][event_field] = event_value
        if isinstance(doc.get("app_info"), dict):
            doc["app_info"][app_field] = app_value
        try:
            data = encode(cbor2.CBORTag(55799, doc), style=style, at=at)
        except (TypeError, ValueError):  # None, floats, bignums: let cbor2 write them
            data = reencode(doc)
        _assert_same_answer(data)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_agrees_on_mutated_bytes(self, data):
        """Any byte flipped, dropped or inserted in a valid envelope: same answer."""
        valid = sample().to_cbor()
        at = data.draw(st.integers(3, len(valid) - 1))
        how = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        byte = data.draw(st.integers(0, 255))
        if how == "flip":
            mutated = valid[:at] + bytes([valid[at] ^ (byte or 1)]) + valid[at + 1:]
        elif how == "drop":
            mutated = valid[:at] + valid[at + 1:]
        else:
            mutated = valid[:at] + bytes([byte]) + valid[at:]
        _assert_same_answer(mutated)


class TestWrittenOutEncoding:
    @settings(max_examples=150, deadline=None)
    @given(
        platform=st.text(min_size=1, max_size=20),
        quote=st.binary(max_size=300),
        names=st.lists(st.text(max_size=5), max_size=30),
        vm_config=st.text(max_size=40),
        app_id=st.binary(max_size=30),
        extra=st.dictionaries(st.text(max_size=6), st.one_of(st.binary(max_size=8), st.integers(),
                                                             st.text(max_size=4)), max_size=3),
    )
    def test_equals_cbor2_canonical(self, platform, quote, names, vm_config, app_id, extra):
        """encode_envelope (written out, events pre-encoded) is byte for byte cbor2's
        canonical encoding of the same document, with and without extra."""
        events = tuple(runtime_event(name, name.encode()) for name in names)
        envelope = sample(platform=platform, quote=quote, event_log=events, vm_config=vm_config,
                          app_info=AppInfo(app_id=app_id), extra=extra)
        doc = {
            "format": "dstack-core/attestation", "version": 1, "platform": platform,
            "evidence_format": "tdx", "quote": quote,
            "event_log": [{"imr": e.imr, "type": e.event_type, "digest": e.digest,
                           "event": e.event, "payload": e.event_payload} for e in events],
            "report_data": envelope.report_data, "vm_config": vm_config,
            "app_info": envelope.app_info.to_cbor_map(),
        }
        if extra:
            doc["extra"] = extra
        assert envelope.to_cbor() == reencode(doc)
