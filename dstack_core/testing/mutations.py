"""The verifier's soundness property, and structured mutations of genuine evidence to test
it with (hypothesis): shared by dstack-core's mutation suite and the verifier conformance
suite a platform's evidence is held to.

The property (:func:`assert_sound`), for every mutant of genuine evidence:

* it is refused as malformed (``EvidenceError``), or
* the verdict is ``fail``, or every reported claim is identical to a genuine one's;
* and whatever the verdict, no identity claim (app identity, key provider, OS image hash,
  runtime and boot events, ...) is anything but a genuine value or empty.

Mutations: insert, drop, duplicate, reorder, retype and re-digest events, change their
register, name, payload and digest version (:func:`mutate_events`); flip bits in every
region of a quote (:func:`flip_quote`, TDX regions named) or anywhere; swap fields between
two genuine envelopes, re-encode them non-canonically (:func:`mutate_envelope`); the same
envelope as bytes, hex or Attest JSON (:func:`as_form`). Needs ``hypothesis`` (the test
extra).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import cbor2
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st

from ..envelope import Envelope
from ..errors import DstackError
from ..eventlog import EV_NO_ACTION, RUNTIME_EVENT_TYPE, InvalidEvent, RuntimeEvent, TdxEvent
from ..verify import VerificationResult, VerifyOptions, load_evidence, verify_evidence
from .noncanonical import variants

__all__ = [
    "EXAMPLES_ENV",
    "IDENTITY_CLAIMS",
    "Source",
    "as_form",
    "assert_sound",
    "examples",
    "flip",
    "flip_quote",
    "flip_region",
    "genuine_claims",
    "mutate_envelope",
    "mutate_events",
    "mutate_list",
    "mutate_runtime",
    "mutation_settings",
    "run_mutation",
    "verify_data",
]

EXAMPLES_ENV: Final = "DSTACK_MUTATION_EXAMPLES"
"""Examples per source: ``DSTACK_MUTATION_EXAMPLES=N`` for long runs."""


def examples(default: int = 100) -> int:
    """How many examples per source to run: the environment's, else ``default``."""
    return int(os.environ.get(EXAMPLES_ENV, str(default)))


def mutation_settings(default: int = 100) -> settings:
    """hypothesis settings for a mutation test (no deadline, no example database)."""
    return settings(
        max_examples=examples(default),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )


# Claims that come from the event log, the OS image policy or the PCK certificate: whatever
# the verdict, each is a genuine value or empty.
IDENTITY_CLAIMS = (
    "identity_bound",
    "app_id",
    "compose_hash",
    "instance_id",
    "key_provider",
    "key_provider_info",
    "os_image_hash",
    "os_image_verified",
    "mr_aggregated",
    "mr_system",
    "device_id",
    "init_script_hashes",
    "runtime_events",
)


# --- the property ----------------------------------------------------------------------------


@attrs.frozen
class Source:
    """Genuine evidence of one kind, a second genuine piece to swap fields with, and how to
    verify both.

    :ivar name: for messages.
    :ivar evidence: the genuine piece, in whatever form ``render`` turns into input.
    :ivar partner: a second genuine piece (an EmitEvent apart, another report data).
    :ivar options: what verifies them (trust anchors, policy).
    :ivar collateral: their collateral, in their verifier plugin's form, or None.
    :ivar render: evidence to verifier input (bytes or text).
    :ivar expect_pass: whether genuine evidence must verify ``pass``.
    """

    name: str
    evidence: Any
    partner: Any
    options: VerifyOptions
    collateral: object | None
    render: Callable[[Any], bytes | str]
    expect_pass: bool = True


def _boot_subset(mutant: list[dict[str, Any]], genuine: list[dict[str, Any]]) -> bool:
    """Boot events: per register, the genuine list or nothing; a payload may be absent (a
    stripped payload is no claim) but never different."""
    for imr in (0, 1, 2):
        mine = [e for e in mutant if e["imr"] == imr]
        theirs = [e for e in genuine if e["imr"] == imr]
        if not mine:
            continue
        if len(mine) != len(theirs):
            return False
        for a, b in zip(mine, theirs, strict=True):
            if a["digest"] != b["digest"] or a["payload"] not in (None, b["payload"]):
                return False
    return True


def _empty(value: Any) -> bool:
    return value in ("", None, False, [], {})


def _same_claims(mutant: Mapping[str, Any], genuine: Mapping[str, Any]) -> bool:
    rest = {k: v for k, v in mutant.items() if k != "boot_events"}
    theirs = {k: v for k, v in genuine.items() if k != "boot_events"}
    return rest == theirs and _boot_subset(mutant["boot_events"], genuine["boot_events"])


def assert_sound(result: VerificationResult, genuine: Sequence[Mapping[str, Any]]) -> None:
    """The soundness property of one mutant's result against the genuine claims."""
    claims = result.claims()
    if result.verdict == "pass":
        assert any(_same_claims(claims, g) for g in genuine), (
            f"pass with claims no genuine evidence has: {result.to_json()}"
        )
    for key in IDENTITY_CLAIMS:
        value = claims[key]
        assert _empty(value) or any(value == g[key] for g in genuine), (
            f"{key} = {value!r} is no genuine value (verdict {result.verdict}, "
            f"reason {result.reason})"
        )
    assert _empty(claims["boot_events"]) or any(
        _boot_subset(claims["boot_events"], g["boot_events"]) for g in genuine
    ), f"boot events no genuine evidence has: {claims['boot_events']}"


def verify_data(source: Source, data: bytes | str) -> VerificationResult | None:
    """Load and verify; None when refused as malformed (never another exception)."""
    try:
        evidence = load_evidence(data)
    except DstackError:
        return None
    return verify_evidence(evidence, source.options, source.collateral)


def genuine_claims(source: Source) -> list[dict[str, Any]]:
    """The claims of both genuine pieces (each must pass when ``expect_pass``)."""
    found = []
    for piece in (source.evidence, source.partner):
        result = verify_data(source, source.render(piece))
        assert result is not None
        if source.expect_pass:
            assert result.verdict == "pass", (source.name, result.reason)
        found.append(result.claims())
    return found


# --- mutations of events -----------------------------------------------------------

NAMES = (
    "app-id",
    "compose-hash",
    "instance-id",
    "key-provider",
    "os-image-hash",
    "init-script-hash",
    "boot-mr-done",
    "system-ready",
    "",
    "mutant",
)
TYPES = (RUNTIME_EVENT_TYPE, EV_NO_ACTION, 0x00000001, 0x00000004, 0x0000000A, 0x80000001, 0xFFFFFFFF)
PAYLOADS = (b"", b"\xee" * 20, b"\xee" * 32, b'{"name":"kms","id":"ee"}', b"ACPI DATA")


def _valid_event(**fields: Any) -> TdxEvent:
    """A TdxEvent from the drawn fields; a digest the type cannot carry becomes 48 bytes."""
    try:
        return TdxEvent(**fields)
    except InvalidEvent:
        fields["digest"] = hashlib.sha384(bytes(fields["digest"]) + b"fix").digest()
        return TdxEvent(**fields)


def _digest_for(data: st.DataObject, event: TdxEvent, events: Sequence[TdxEvent]) -> bytes:
    choice = data.draw(st.sampled_from(["computed", "empty", "random", "copied", "kept"]))
    if choice == "computed" and event.event_type == RUNTIME_EVENT_TYPE:
        return RuntimeEvent(
            event=event.event, payload=event.event_payload, version=event.version
        ).digest
    if choice == "empty":
        return b""
    if choice == "random":
        return data.draw(st.binary(min_size=48, max_size=48))
    if choice == "copied" and events:
        return data.draw(st.sampled_from(list(events))).digest or bytes(48)
    return event.digest


def new_event(data: st.DataObject, events: Sequence[TdxEvent]) -> TdxEvent:
    """An event of any register, type, name, payload and digest kind."""
    fields = {
        "imr": data.draw(st.integers(0, 3)),
        "event_type": data.draw(st.sampled_from(TYPES)),
        "digest": b"",
        "event": data.draw(st.sampled_from(NAMES)),
        "event_payload": data.draw(st.sampled_from(PAYLOADS) | st.binary(max_size=40)),
        "version": data.draw(st.sampled_from([1, 2])),
    }
    draft = _valid_event(**fields)
    return _valid_event(**{**fields, "digest": _digest_for(data, draft, events)})


def mutate_list(
    data: st.DataObject,
    items: Sequence[Any],
    new: Callable[[], Any],
    edit: Callable[[str, Any], Any],
    edits: Sequence[str],
) -> tuple[Any, ...]:
    """One structured change to a list of events: insert ``new()``, drop, reorder,
    duplicate, or one of ``edits`` applied to an element by ``edit(op, element)``."""
    out = list(items)
    ops = ["insert"] + (["drop", "reorder", "duplicate", *edits] if out else [])
    op = data.draw(st.sampled_from(ops), label="event op")
    note(f"event op: {op}")
    if op == "insert":
        out.insert(data.draw(st.integers(0, len(out))), new())
        return tuple(out)
    index = data.draw(st.integers(0, len(out) - 1), label="event")
    if op == "drop":
        del out[index]
    elif op == "reorder":
        other = data.draw(st.integers(0, len(out) - 1))
        out[index], out[other] = out[other], out[index]
    elif op == "duplicate":
        out.insert(data.draw(st.integers(0, len(out))), out[index])
    else:
        out[index] = edit(op, out[index])
    return tuple(out)


def mutate_events(data: st.DataObject, events: Sequence[TdxEvent]) -> tuple[TdxEvent, ...]:
    """One structured change to an event log: the list operations, or retype, re-digest,
    move to another register, change the payload, name or digest version of one event."""

    def edit(op: str, event: TdxEvent) -> TdxEvent:
        fields = attrs.asdict(event, recurse=False)
        if op == "retype":
            fields["event_type"] = data.draw(st.sampled_from(TYPES))
            fields["digest"] = _digest_for(data, event, events)
        elif op == "redigest":
            fields["digest"] = _digest_for(data, event, events)
        elif op == "reimr":
            fields["imr"] = data.draw(st.integers(0, 3))
        elif op == "payload":
            payload = bytearray(event.event_payload or b"\0")
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            fields["event_payload"] = data.draw(st.sampled_from([bytes(payload), b""] + list(PAYLOADS)))
        elif op == "rename":
            fields["event"] = data.draw(st.sampled_from(NAMES))
        else:
            fields["version"] = 3 - event.version
        return _valid_event(**fields)

    edits = ("retype", "redigest", "reimr", "payload", "rename", "version")
    return mutate_list(data, events, lambda: new_event(data, events), edit, edits)


def mutate_runtime(
    data: st.DataObject, events: Sequence[RuntimeEvent]
) -> tuple[RuntimeEvent, ...]:
    """One change to upstream's runtime_events list (what upstream replays)."""

    def new() -> RuntimeEvent:
        name = data.draw(st.sampled_from(NAMES))
        return RuntimeEvent(event=name, payload=data.draw(st.sampled_from(PAYLOADS)))

    def edit(op: str, event: RuntimeEvent) -> RuntimeEvent:
        if op == "payload":
            return attrs.evolve(event, payload=data.draw(st.sampled_from(PAYLOADS)))
        if op == "rename":
            return attrs.evolve(event, event=data.draw(st.sampled_from(NAMES)))
        return attrs.evolve(event, version=3 - event.version)

    return mutate_list(data, events, new, edit, ("payload", "rename", "version"))


# --- mutations of bytes -----------------------------------------------------------

QUOTE_REGIONS = {"header": (0, 48), "td report": (48, 632), "signature data": (632, None)}


def flip(data: st.DataObject, raw: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Flip one to three bits inside ``raw[start:end]`` (clamped to ``raw``: a region past
    the end of short evidence means its last bytes)."""
    if not raw:
        return raw
    end = len(raw) if end is None else min(end, len(raw))
    start = min(start, len(raw) - 1)
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(start, max(start, end - 1)), label="offset")
        out[position] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(out)


def flip_quote(data: st.DataObject, quote: bytes) -> bytes:
    """Flip bits in one region of a quote (TDX's header, TD report, signature data; in
    evidence of another format these are just its first bytes, the next ones, the rest)."""
    region = data.draw(st.sampled_from(sorted(QUOTE_REGIONS)), label="quote region")
    start, end = QUOTE_REGIONS[region]
    return flip(data, quote, start, end)


def flip_region(data: st.DataObject, raw: bytes, inner: bytes) -> bytes:
    """Flip bits in ``raw``: anywhere, or inside the embedded ``inner`` (the quote)."""
    at = raw.find(inner)
    if at >= 0 and data.draw(st.booleans(), label="inside the quote"):
        start, end = QUOTE_REGIONS[data.draw(st.sampled_from(sorted(QUOTE_REGIONS)))]
        return flip(data, raw, at + start, at + (len(inner) if end is None else end))
    return flip(data, raw)


# --- our envelope -----------------------------------------------------------------

ENVELOPE_FIELDS = ("quote", "event_log", "report_data", "vm_config", "app_info", "platform", "extra")
# Event mutations are what issue 8 is about: drawn three times as often as each other kind.
ENVELOPE_MUTATIONS = ("events", "events", "events", "field", "swap", "bytes", "noncanonical")


def mutate_envelope(data: st.DataObject, raw: bytes, partner: bytes) -> bytes:
    """Decode, change, re-encode (or change the bytes themselves)."""
    envelope = Envelope.from_cbor(raw)
    kind = data.draw(st.sampled_from(ENVELOPE_MUTATIONS), label="mutation")
    note(f"envelope mutation: {kind}")
    if kind == "bytes":
        return flip_region(data, raw, envelope.quote)
    if kind == "noncanonical":
        doc = dict(cbor2.loads(raw))
        return data.draw(st.sampled_from(sorted(variants(doc).items())))[1]
    if kind == "swap":
        other = Envelope.from_cbor(partner)
        names = data.draw(st.lists(st.sampled_from(ENVELOPE_FIELDS), min_size=1, unique=True))
        return attrs.evolve(envelope, **{n: getattr(other, n) for n in names}).to_cbor()
    if kind == "events":
        return attrs.evolve(envelope, event_log=mutate_events(data, envelope.event_log)).to_cbor()
    field = data.draw(st.sampled_from(ENVELOPE_FIELDS), label="field")
    if field == "quote":
        changed: Any = flip_quote(data, envelope.quote)
    elif field == "event_log":
        changed = mutate_events(data, envelope.event_log)
    elif field == "report_data":
        changed = flip(data, envelope.report_data)
    elif field == "vm_config":
        changed = data.draw(
            st.sampled_from(
                [
                    "",
                    "{}",
                    "not json",
                    json.dumps({"os_image_hash": "ee" * 32}),
                    '{"os_image_hash": "00", "os_image_hash": "11"}',
                    json.dumps({"vm_config": json.dumps({"os_image_hash": "ee" * 32})}),
                ]
            )
        )
    elif field == "app_info":
        name = data.draw(st.sampled_from(sorted(attrs.asdict(envelope.app_info))))
        changed = attrs.evolve(envelope.app_info, **{name: b"\xee" * 20})
    elif field == "platform":
        changed = data.draw(st.sampled_from(["tdx", "simulator", "sev-snp", "gcp-tdx", "x"]))
    else:
        changed = {"mutant": b"\xee"}
    return attrs.evolve(envelope, **{field: changed}).to_cbor()


def as_form(data: st.DataObject, raw: bytes) -> bytes | str:
    """The same envelope as bytes, hex text, or an Attest JSON body."""
    form = data.draw(st.sampled_from(["bytes", "hex", "attest-json"]), label="form")
    if form == "hex":
        return raw.hex()
    if form == "attest-json":
        return json.dumps({"attestation": raw.hex()})
    return raw


def run_mutation(
    source: Source,
    data: st.DataObject,
    mutate: Callable[[st.DataObject, Any, Any], Any],
    genuine: list[dict[str, Any]] | None = None,
) -> None:
    """Draw one mutant of ``source.evidence`` with ``mutate`` and assert the property.

    :param genuine: the genuine claims, if already computed (:func:`genuine_claims`).
    """
    claims = genuine if genuine is not None else genuine_claims(source)
    mutant = mutate(data, source.evidence, source.partner)
    result = verify_data(source, mutant)
    if result is None:
        note("refused as malformed")
        return
    note(f"verdict {result.verdict}" + (f": {result.reason.split(':')[0]}" if result.reason else ""))
    assert_sound(result, claims)
