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
import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sev_snp_stub.kds import SnpCollateral
from hypothesis import event as note
from hypothesis import given
from hypothesis import strategies as st

from dstack_core import certs
from dstack_core.collateral import Collateral
from dstack_core.envelope import Envelope
from dstack_core.eventlog import RuntimeEvent, events_from_json, events_to_json, replay_rtmrs
from dstack_core.mockpki import MockIntelPki, mock_td_report
from dstack_core.osimage import OsImagePolicy
from dstack_core.quote import TdxQuote
from dstack_core.testing import short_tempdir
from dstack_core.testing.fake_tee import FakeSnpMachine, FakeTdxMachine
from dstack_core.testing.mutations import (
    TYPES,
    Source,
    as_form,
    flip,
    flip_quote,
    flip_region,
    genuine_claims,
    mutate_envelope,
    mutate_events,
    mutate_runtime,
    mutation_settings,
    run_mutation,
)
from dstack_core.types import RootKey
from dstack_core.upstream import UpstreamAttestation, decode_attestation
from dstack_core.verify import VerifyOptions

from .conftest import DATA, Bundle, input_path
from .test_upstream import encode_v0, encode_v1

NOW = int(datetime.now(UTC).timestamp())
SETTINGS = mutation_settings()

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
def fake_snp() -> Iterator[tuple[tuple[bytes, bytes], VerifyOptions, SnpCollateral]]:
    """Two Attest envelopes from the sev-snp-stub agent on the fake SNP kernel, and what
    verifies them (its mock AMD chain, with the opt-in)."""
    for agent in _fake_agent(FakeSnpMachine):
        pieces = []
        for index in range(2):
            _, body = agent.call("Attest", {"report_data": f"snp-{index}".encode().hex()})
            pieces.append(bytes.fromhex(body["attestation"]))
        trust = agent.machine.trust_bundle()
        root = x509.load_pem_x509_certificate(trust.root_ca_pem)
        options = VerifyOptions(
            now=NOW, root_ca_der=root.public_bytes(serialization.Encoding.DER),
            allow_simulator=True,
        )
        yield (pieces[0], pieces[1]), options, SnpCollateral.from_bytes(
            trust.collateral_json.encode())


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


GENUINE: dict[str, list[dict[str, Any]]] = {}


def run(source: Source, data: st.DataObject, mutate: Callable[[st.DataObject, Any, Any], Any]) -> None:
    run_mutation(source, data, mutate, GENUINE.setdefault(source.name, genuine_claims(source)))


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
        """Our SEV-SNP envelope from the stub on the fake SNP kernel, verified by the sev-snp
        plugin under its mock AMD chain (it has no registers: no event is ever a claim)."""
        (a, b), options, collateral = fake_snp
        source = Source("sev-snp", a, b, options, collateral, _identity)
        run(source, data, lambda d, raw, partner: as_form(d, mutate_envelope(d, raw, partner)))

