"""The verifier's soundness property, proven by structured mutation of genuine evidence.

Genuine evidence of every kind the verifier accepts: our envelope from the simulator, from
tdx-on-fake and from the SEV-SNP stub; Attest and GetQuote JSON; RA-TLS certificate chains;
upstream V0 and V1 envelopes (re-encoded simulator evidence, and upstream's real fixture
re-signed by a mock PKI). Hypothesis applies structured mutations: insert, drop, reorder,
retype and re-digest events, change their registers, names, payloads and digest versions;
swap fields between two genuine pieces of evidence; flip bytes in every region (quote header,
TD report, signature data, the rest); re-encode our envelope non-canonically; rebuild RA-TLS
chains. The property, for every mutant:

* it is refused as malformed (``EvidenceError``), or
* the verdict is ``fail``, or every reported claim is identical to a genuine one's;
* and whatever the verdict, no identity claim (app identity, key provider, OS image hash,
  runtime and boot events, ...) is anything but a genuine value or empty.

CI runs a bounded number of examples per source; ``DSTACK_MUTATION_EXAMPLES=N`` runs N per
source (docs/verify.md records the last long run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from dstack_core import certs
from dstack_core.collateral import Collateral
from dstack_core.envelope import Envelope
from dstack_core.errors import DstackError
from dstack_core.eventlog import (
    EV_NO_ACTION,
    RUNTIME_EVENT_TYPE,
    InvalidEvent,
    RuntimeEvent,
    TdxEvent,
    events_from_json,
    events_to_json,
    replay_rtmrs,
)
from dstack_core.mockpki import MockIntelPki, mock_td_report
from dstack_core.osimage import OsImagePolicy
from dstack_core.quote import TdxQuote
from dstack_core.testing import short_tempdir
from dstack_core.testing.fake_tee import FakeSnpMachine, FakeTdxMachine
from dstack_core.types import RootKey
from dstack_core.upstream import UpstreamAttestation, decode_attestation
from dstack_core.verify import VerificationResult, VerifyOptions, load_evidence, verify_evidence

from .conftest import DATA, Bundle, input_path
from .noncanonical import variants
from .test_upstream import encode_v0, encode_v1

EXAMPLES = int(os.environ.get("DSTACK_MUTATION_EXAMPLES", "100"))
NOW = int(datetime.now(UTC).timestamp())
SETTINGS = settings(
    max_examples=EXAMPLES,
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
    verify both."""

    name: str
    evidence: Any
    partner: Any
    options: VerifyOptions
    collateral: Collateral | None
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
    found = []
    for piece in (source.evidence, source.partner):
        result = verify_data(source, source.render(piece))
        assert result is not None
        if source.expect_pass:
            assert result.verdict == "pass", (source.name, result.reason)
        found.append(result.claims())
    return found


# --- mutations of events ------------------------------------------------------------------------

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


def mutate_runtime(data: st.DataObject, events: Sequence[RuntimeEvent]) -> tuple[RuntimeEvent, ...]:
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


# --- mutations of bytes ---------------------------------------------------------------------

QUOTE_REGIONS = {"header": (0, 48), "td report": (48, 632), "signature data": (632, None)}


def flip(data: st.DataObject, raw: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Flip one to three bits inside ``raw[start:end]``."""
    end = len(raw) if end is None else min(end, len(raw))
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(start, max(start, end - 1)), label="offset")
        out[position] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(out)


def flip_quote(data: st.DataObject, quote: bytes) -> bytes:
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


# --- our envelope ---------------------------------------------------------------------------

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


# --- GetQuote JSON --------------------------------------------------------------------------


def mutate_get_quote(data: st.DataObject, doc: dict[str, Any], partner: dict[str, Any]) -> str:
    out = dict(doc)
    kind = data.draw(
        st.sampled_from(
            ["events", "events", "events", "json-event", "quote", "report_data", "vm_config",
             "swap", "text"]
        )
    )
    note(f"GetQuote mutation: {kind}")
    if kind == "events":
        out["event_log"] = events_to_json(mutate_events(data, events_from_json(doc["event_log"])))
    elif kind == "json-event":
        # Edited as JSON, where a digest may be anything (upstream sends runtime ones empty).
        log = json.loads(doc["event_log"])
        index = data.draw(st.integers(0, len(log) - 1))
        log[index] = {
            **log[index],
            "event_type": data.draw(st.sampled_from(TYPES)),
            "digest": data.draw(st.sampled_from(["", "00", log[index]["digest"], "ab" * 48])),
        }
        out["event_log"] = json.dumps(log)
    elif kind == "quote":
        out["quote"] = flip_quote(data, bytes.fromhex(doc["quote"])).hex()
    elif kind == "report_data":
        out["report_data"] = flip(data, bytes.fromhex(doc["report_data"])).hex()
    elif kind == "vm_config":
        out["vm_config"] = json.dumps({"os_image_hash": "ee" * 32})
    elif kind == "swap":
        names = data.draw(
            st.lists(st.sampled_from(["quote", "event_log", "report_data", "vm_config"]), min_size=1, unique=True)
        )
        out.update({n: partner[n] for n in names})
    else:
        text = json.dumps(doc).encode()
        return flip(data, text).decode("utf-8", "replace")
    return json.dumps(out)


# --- RA-TLS chains --------------------------------------------------------------------------


@attrs.frozen
class TlsSample:
    chain: tuple[str, ...]
    key_pem: str
    ca: certs.CertificateAuthority

    def reissue(self, attestation: bytes, subject: str = "app.example") -> str:
        key = serialization.load_pem_private_key(self.key_pem.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = certs.issue_certificate(
            self.ca,
            key.public_key(),
            certs.TlsCertificateRequest(subject=subject, attestation=attestation),
            now=datetime.now(UTC),
        )
        return certs.cert_pem(cert)


def mutate_chain(data: st.DataObject, sample: TlsSample, partner: TlsSample) -> str:
    leaf = x509.load_pem_x509_certificate(sample.chain[0].encode())
    kind = data.draw(st.sampled_from(["attestation", "leaf-bytes", "chain", "swap"]))
    note(f"chain mutation: {kind}")
    if kind == "attestation":
        inner = certs.RaTlsCertificate.from_certificate(leaf).attestation
        assert inner is not None
        mutated = mutate_envelope(data, inner, inner)
        subject = data.draw(st.sampled_from(["app.example", "bank.attacker.example"]))
        return sample.reissue(mutated, subject) + sample.chain[1]
    if kind == "leaf-bytes":
        # Flipped DER, wrapped as PEM unparsed: the verifier is the one to parse it.
        der = flip(data, leaf.public_bytes(serialization.Encoding.DER))
        text = base64.encodebytes(der).decode()
        return f"-----BEGIN CERTIFICATE-----\n{text}-----END CERTIFICATE-----\n" + sample.chain[1]
    if kind == "swap":
        return sample.chain[0] + partner.chain[1]
    shape = data.draw(st.sampled_from(["lone", "foreign ca", "twice", "reversed"]))
    if shape == "lone":
        return sample.chain[0]
    if shape == "foreign ca":
        return sample.chain[0] + certs.new_app_ca(certs.new_tls_key(), now=datetime.now(UTC)).cert_pem
    if shape == "twice":
        return sample.chain[0] + sample.chain[1] + sample.chain[1]
    return sample.chain[1] + sample.chain[0]


# --- upstream V0/V1 -------------------------------------------------------------------------


def encode(attestation: UpstreamAttestation, wire: int) -> bytes:
    encoder = encode_v0 if wire == 0 else encode_v1
    return encoder(
        attestation.quote,
        attestation.event_log,
        attestation.runtime_events,
        attestation.report_data,
        attestation.config,
    )


def mutate_upstream(data: st.DataObject, raw: bytes, partner: bytes) -> bytes:
    decoded = decode_attestation(raw)
    wire = decoded.wire_version
    kind = data.draw(
        st.sampled_from(
            ["event_log", "event_log", "runtime_events", "runtime_events", "quote",
             "report_data", "config", "swap", "bytes"]
        )
    )
    note(f"upstream mutation: {kind}")
    if kind == "bytes":
        return flip_region(data, raw, decoded.quote)
    if kind == "swap":
        other = decode_attestation(partner)
        names = data.draw(
            st.lists(
                st.sampled_from(["quote", "event_log", "runtime_events", "report_data", "config"]),
                min_size=1,
                unique=True,
            )
        )
        return encode(attrs.evolve(decoded, **{n: getattr(other, n) for n in names}), wire)
    if kind == "event_log":
        changed: Any = mutate_events(data, decoded.event_log)
    elif kind == "runtime_events":
        changed = mutate_runtime(data, decoded.runtime_events)
    elif kind == "quote":
        changed = flip_quote(data, decoded.quote)
    elif kind == "report_data":
        changed = flip(data, decoded.report_data)
    else:
        changed = json.dumps({"vm_config": json.dumps({"os_image_hash": "ee" * 32})})
    return encode(attrs.evolve(decoded, **{"config" if kind == "config" else kind: changed}), wire)


# --- genuine evidence --------------------------------------------------------------------


@attrs.frozen
class SimulatorEvidence:
    envelopes: tuple[bytes, bytes]
    get_quotes: tuple[dict[str, Any], dict[str, Any]]
    tls: tuple[TlsSample, TlsSample]
    bundle: Bundle


@pytest.fixture(scope="module")
def simulator(agent, bundle: Bundle) -> SimulatorEvidence:
    """Two of each kind from the module's simulator agent, an EmitEvent apart (so they
    differ in RTMR3, runtime events and report data)."""
    root_key = RootKey.from_appkeys_json(input_path(agent, "appkeys.json").read_bytes())
    assert root_key.key_provider.key_pem is not None
    ca = certs.CertificateAuthority.from_pem(root_key.ca_cert_pem, root_key.key_provider.key_pem)
    pieces: list[tuple[bytes, dict[str, Any], TlsSample]] = []
    for index in range(2):
        if index:
            assert agent.call("EmitEvent", {"event": "mutation-suite", "payload": "01"})[0] == 200
        report_data = f"mutations-{index}".encode().hex()
        _, attest = agent.call("Attest", {"report_data": report_data})
        _, quote = agent.call("GetQuote", {"report_data": report_data})
        _, tls = agent.call("GetTlsKey", {"subject": "app.example", "usage_ra_tls": True})
        pieces.append(
            (
                bytes.fromhex(attest["attestation"]),
                quote,
                TlsSample(tuple(tls["certificate_chain"]), tls["key"], ca),
            )
        )
    (a, qa, ta), (b, qb, tb) = pieces
    return SimulatorEvidence((a, b), (qa, qb), (ta, tb), bundle)


def _fake_agent(machine_type: Any, **create: Any) -> Iterator[Any]:
    workdir = short_tempdir("mut")
    machine = machine_type.create(workdir / "tree", **create)
    agent = machine.agent(workdir=workdir).start()
    yield agent
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_tdx() -> Iterator[tuple[tuple[bytes, bytes], VerifyOptions, Collateral]]:
    """Two Attest envelopes from a tdx agent on the fake TDX kernel, and what verifies them
    (its trust bundle, with the OS image policy of what it booted)."""
    for agent in _fake_agent(FakeTdxMachine):
        pieces = []
        for index in range(2):
            if index:
                assert agent.call("EmitEvent", {"event": "mutation-suite", "payload": "02"})[0] == 200
            _, body = agent.call("Attest", {"report_data": f"fake-{index}".encode().hex()})
            pieces.append(bytes.fromhex(body["attestation"]))
        trust = agent.machine.trust_bundle()
        root = x509.load_pem_x509_certificate(trust.root_ca_pem)
        assert trust.os_image_policy_json is not None
        options = VerifyOptions(
            now=NOW,
            root_ca_der=root.public_bytes(serialization.Encoding.DER),
            allow_simulator=True,
            os_image_policy=OsImagePolicy.from_json(trust.os_image_policy_json),
        )
        yield (pieces[0], pieces[1]), options, Collateral.from_json(trust.collateral_json)


@pytest.fixture(scope="module")
def fake_snp() -> Iterator[tuple[bytes, bytes]]:
    """Two Attest envelopes from the sev-snp-stub agent on the fake SNP kernel."""
    for agent in _fake_agent(FakeSnpMachine):
        pieces = []
        for index in range(2):
            _, body = agent.call("Attest", {"report_data": f"snp-{index}".encode().hex()})
            pieces.append(bytes.fromhex(body["attestation"]))
        yield pieces[0], pieces[1]


UPSTREAM_PKI = MockIntelPki.from_seed(b"mutation-upstream".ljust(32, b"\0"))


@pytest.fixture(scope="module")
def upstream_fixture() -> tuple[bytes, bytes, VerifyOptions]:
    """Upstream's real V0 fixture re-signed by a mock PKI, and a second piece with one more
    app event (registers recomputed, re-signed), plus options with its image's policy."""
    decoded = decode_attestation((DATA / "upstream_attestation_v0.bin").read_bytes())
    real = TdxQuote.from_bytes(decoded.quote).report
    pieces = []
    for index, runtime in enumerate(
        (decoded.runtime_events, (*decoded.runtime_events, RuntimeEvent(event="app", payload=b"1")))
    ):
        log = tuple(e for e in decoded.event_log if e.imr < 3) + tuple(
            e.to_tdx_event() for e in runtime
        )
        rtmrs = replay_rtmrs(log)
        assert rtmrs[:3] == real.rtmrs[:3]
        report_data = f"upstream-{index}".encode().ljust(64, b"\0")
        report = mock_td_report(
            mr_td=real.mr_td, rtmrs=rtmrs, report_data=report_data, mr_config_id=real.mr_config_id
        )
        quote = UPSTREAM_PKI.sign_quote(report, user_data=b"UPSTREAM-FIXTURE".ljust(20, b"\0"))
        pieces.append(encode_v0(quote, log, runtime, report_data, decoded.config))
    measured = next(e.payload for e in decoded.runtime_events if e.event == "os-image-hash")
    options = VerifyOptions(
        now=NOW,
        root_ca_der=UPSTREAM_PKI.root_ca_der,
        allow_simulator=True,
        os_image_policy=OsImagePolicy.single(measured, real.mr_td, real.rtmrs),
    )
    return pieces[0], pieces[1], options


def upstream_from_envelope(raw: bytes, wire: int) -> bytes:
    """Our agent's evidence as the upstream agent would send it for the same quote."""
    envelope = Envelope.from_cbor(raw)
    runtime = tuple(e.to_runtime_event() for e in envelope.event_log if e.is_runtime)
    return encode(
        UpstreamAttestation(
            wire_version=wire,
            platform="tdx",
            quote=envelope.quote,
            event_log=envelope.event_log,
            runtime_events=runtime,
            report_data=envelope.report_data,
            config=envelope.vm_config,
        ),
        wire,
    )


# --- the tests -------------------------------------------------------------------------------


def run(source: Source, data: st.DataObject, mutate: Callable[[st.DataObject, Any, Any], Any]) -> None:
    genuine = GENUINE.setdefault(source.name, genuine_claims(source))
    mutant = mutate(data, source.evidence, source.partner)
    result = verify_data(source, mutant)
    if result is None:
        note("refused as malformed")
        return
    note(f"verdict {result.verdict}" + (f": {result.reason.split(':')[0]}" if result.reason else ""))
    assert_sound(result, genuine)


GENUINE: dict[str, list[dict[str, Any]]] = {}


def _identity(value: Any) -> Any:
    return value


class TestMutations:
    @SETTINGS
    @given(data=st.data())
    def test_simulator_envelope(self, simulator, data):
        """Our envelope (bytes, hex, Attest JSON) from the simulator."""
        a, b = simulator.envelopes
        source = Source(
            "simulator envelope", a, b, simulator.bundle.verify_options(NOW),
            Collateral.from_json(simulator.bundle.collateral_json), _identity,
        )
        run(source, data, lambda d, raw, partner: as_form(d, mutate_envelope(d, raw, partner)))

    @SETTINGS
    @given(data=st.data())
    def test_get_quote_json(self, simulator, data):
        """GetQuote's JSON body (stripped boot events, runtime events with payloads)."""
        a, b = simulator.get_quotes
        source = Source(
            "get quote", a, b, simulator.bundle.verify_options(NOW),
            Collateral.from_json(simulator.bundle.collateral_json), json.dumps,
        )
        run(source, data, mutate_get_quote)

    @SETTINGS
    @given(data=st.data())
    def test_ratls_chain(self, simulator, data):
        """GetTlsKey RA-TLS chains, with and without the app CA as a trust anchor."""
        a, b = simulator.tls
        anchor = x509.load_pem_x509_certificate(a.chain[1].encode())
        anchored = data.draw(st.booleans(), label="trust anchor")
        source = Source(
            f"ratls {anchored}", a, b,
            simulator.bundle.verify_options(
                NOW,
                ratls_trust_anchors=[anchor.public_bytes(serialization.Encoding.DER)] if anchored else [],
            ),
            Collateral.from_json(simulator.bundle.collateral_json),
            lambda sample: "".join(sample.chain),
        )
        run(source, data, mutate_chain)

    @SETTINGS
    @given(data=st.data())
    def test_upstream_from_simulator(self, simulator, data):
        """Upstream V0 and V1 envelopes around the simulator's quotes and events."""
        wire = data.draw(st.sampled_from([0, 1]), label="wire version")
        a, b = (upstream_from_envelope(e, wire) for e in simulator.envelopes)
        source = Source(
            f"upstream v{wire}", a, b, simulator.bundle.verify_options(NOW),
            Collateral.from_json(simulator.bundle.collateral_json), _identity,
        )
        run(source, data, mutate_upstream)

    @SETTINGS
    @given(data=st.data())
    def test_upstream_fixture(self, upstream_fixture, data):
        """Upstream's real V0 fixture (33 events, os-image-hash), re-signed."""
        a, b, options = upstream_fixture
        source = Source(
            "upstream fixture", a, b, options,
            Collateral.from_json(UPSTREAM_PKI.collateral_json()), _identity,
        )
        run(source, data, mutate_upstream)

    @SETTINGS
    @given(data=st.data())
    def test_fake_tdx_envelope(self, fake_tdx, data):
        """Our envelope from the tdx platform on the fake TDX kernel (real CCEL boot log,
        an os-image-hash event)."""
        (a, b), options, collateral = fake_tdx
        source = Source("fake tdx", a, b, options, collateral, _identity)
        run(source, data, lambda d, raw, partner: as_form(d, mutate_envelope(d, raw, partner)))

    @SETTINGS
    @given(data=st.data())
    def test_sev_snp_envelope(self, fake_snp, data):
        """Our SEV-SNP envelope: its verdict is always fail; no mutant may report claims."""
        a, b = fake_snp
        source = Source("sev-snp", a, b, VerifyOptions(now=NOW), None, _identity, expect_pass=False)
        run(source, data, lambda d, raw, partner: as_form(d, mutate_envelope(d, raw, partner)))

