"""The platform conformance suite: one set of tests every platform plugin must pass.

Run it against an installed plugin by naming the plugin::

    pytest --dstack-platform myplat --pyargs dstack_core.testing.conformance

or re-export it from a test module of your own, pinning the platform (and, for fake
hardware, the environment) with fixtures::

    from dstack_core.testing.conformance import *  # noqa: F403

    @pytest.fixture(scope="session")
    def dstack_platform_name():
        return "myplat"

The tests use only the fixtures of :mod:`dstack_core.testing.pytest_plugin` and the public
API (the façade, the hooks through the plugin manager, the agent over its socket and the
official SDK). A test that does not apply to a platform, judged from its
:class:`~dstack_core.types.PlatformInfo`, is skipped with the reason; none passes silently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import random
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Final, TypeVar

import attrs
import pluggy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .. import types
from ..envelope import Envelope
from ..errors import DstackError, EvidenceError, InvalidRequest, PlatformError, PlatformUnsupported
from ..eventlog import (
    RuntimeEvent,
    RuntimeEventLog,
    TdxEvent,
    events_from_json,
    extend,
    replay_rtmrs,
)
from ..hookspecs import REQUIRED_HOOKS
from ..keys import keccak256
from ..platform import Platform
from ..plugins import load_platform
from ..quote import HEADER_SIZE, TdxQuote
from ..snp import SnpReport
from ..types import (
    REPORT_DATA_LENGTH,
    RTMR_LENGTH,
    Measurements,
    PlatformConfig,
    PlatformEvidence,
    PlatformInfo,
    Quote,
    RootKey,
    TrustBundle,
)
from ..verify.options import VerifyOptions
from ..verify.types import PlatformReport
from .agent import uds_request
from .pytest_plugin import PlatformAgent, PlatformEnv, configured_platform

__all__ = [
    "TestAgent",
    "TestAttest",
    "TestErrors",
    "TestExtendRtmr",
    "TestHookResults",
    "TestMeasurements",
    "TestPlatformInfo",
    "TestQuote",
    "TestRootKey",
    "TestVerifier",
]

HARDWARE_TAGS: Final = types.HARDWARE_TAGS
"""Envelope platform tags that claim real TEE hardware; a simulated platform uses none
(nor one of them followed by ``-``: :func:`dstack_core.types.is_hardware_tag`)."""

EVIDENCE_FORMATS: Final = frozenset({"tdx", "sev-snp"})
"""The formats dstack-core's own plugins produce; a vendor's is any well-formed name
(:func:`dstack_core.types.is_evidence_format`) its verifier plugin is installed for."""
VERIFIER_EXAMPLES: Final = 30
"""Mutants of the platform's evidence per run (``DSTACK_MUTATION_EXAMPLES`` overrides)."""

SNP_REPORT_SIZE: Final = 0x4A0
"""An AMD SEV-SNP attestation report is 1184 bytes (SEV-SNP ABI, ATTESTATION_REPORT)."""
SNP_REPORT_DATA_OFFSET: Final = 0x50
"""Where the 64 bytes of REPORT_DATA sit in an SNP attestation report."""

REPORT_DATA_PATTERNS: Final = {
    "zeros": bytes(REPORT_DATA_LENGTH),
    "ones": b"\xff" * REPORT_DATA_LENGTH,
    "ascending": bytes(range(REPORT_DATA_LENGTH)),
    "random": random.Random(0x64).randbytes(REPORT_DATA_LENGTH),
}
BAD_REPORT_DATA_LENGTHS: Final = (0, 1, 32, 63, 65, 128)
BAD_DIGEST_LENGTHS: Final = (0, 32, 47, 49, 64)
CONCURRENT_EVENTS: Final = 48
CONCURRENT_QUOTES: Final = 8
CONCURRENT_THREADS: Final = 16
SDK_TIMEOUT: Final = 30.0

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one façade coroutine to completion."""
    return asyncio.run(coro)


def bound_report_data(quote: Quote) -> bytes:
    """The 64 report-data bytes at the offset the quote's evidence format defines (for a
    vendor's format: what its verifier plugin decodes)."""
    if quote.format == "tdx":
        parsed = TdxQuote.from_bytes(quote.data)
        start = parsed.report_data_offset
        assert quote.data[start:start + REPORT_DATA_LENGTH] == parsed.report_data
        return parsed.report_data
    if quote.format == "sev-snp":
        assert len(quote.data) == SNP_REPORT_SIZE, "an SNP quote is the bare 1184-byte report"
        return quote.data[SNP_REPORT_DATA_OFFSET:SNP_REPORT_DATA_OFFSET + REPORT_DATA_LENGTH]
    return decode_with_plugin(quote).report_data


def decode_with_plugin(quote: Quote) -> PlatformReport:
    """The quote decoded by the verifier plugin of its format (skips when none is installed:
    :class:`TestVerifier` fails on that)."""
    return _decode(quote.format, quote.data)


def _decode(evidence_format: str, data: bytes) -> PlatformReport:
    from ..verify import default_host

    try:
        verifier = default_host().get(evidence_format)
    except EvidenceError as exc:
        if exc.code != "unsupported_evidence":
            raise
        pytest.skip(f"no verifier plugin decodes evidence format {evidence_format!r}")
    return verifier.decode(data, {})


def tdx_registers(quote: bytes) -> tuple[bytes, tuple[bytes, bytes, bytes, bytes]]:
    """MRTD and RTMR0..3 from a TDX quote."""
    report = TdxQuote.from_bytes(quote).report
    return report.mr_td, report.rtmrs


def require_tdx(info: PlatformInfo, what: str) -> None:
    if info.evidence_format != "tdx":
        pytest.skip(f"{what}: only TDX-format evidence carries RTMRs "
                    f"(this platform's is {info.evidence_format})")


def require_runtime_registers(info: PlatformInfo) -> None:
    if not info.runtime_registers:
        pytest.skip(f"platform {info.name} has no runtime registers (runtime_registers=False)")


def measurements_or_skip(platform: Platform) -> Measurements:
    """``read_measurements``, or a skip when the platform has no such registers."""
    try:
        return platform.read_measurements_sync()
    except PlatformUnsupported as exc:
        if platform.info.runtime_registers:
            pytest.fail("runtime_registers=True but read_measurements is unsupported")
        pytest.skip(f"platform {platform.name} has no measurement registers: {exc.message}")


def trust_bundle_or_skip(
    platform: Platform, env: PlatformEnv, config: PlatformConfig
) -> TrustBundle:
    """The anchors that verify the platform's quotes in tests, or a skip."""
    bundle = env.trust_bundle or platform.trust_bundle_sync(config.state_dir, config.options)
    if bundle is None:
        pytest.skip("no trust anchors for this platform's quotes in tests (real hardware "
                    "needs Intel's collateral; give fake hardware's in PlatformEnv.trust_bundle)")
    return bundle


def log_extends(config: PlatformConfig, event: RuntimeEvent, times: int = 1) -> None:
    """Record in the runtime log ``times`` extensions by ``event`` that a test made.

    Tests that extend RTMR3 through the hook (not EmitEvent) log what they extended, so
    that the runtime log keeps replaying to the register: a device that keeps its
    registers between tests (and the agent a later test starts on it) stays consistent.
    """
    log = RuntimeEventLog(config.runtime_log)
    for _ in range(times):
        log.begin(event)
        log.commit(event)


def restart(name: str, config: PlatformConfig) -> contextlib.AbstractContextManager[Platform]:
    """A freshly loaded and configured instance of the platform on the same config."""
    return configured_platform(load_platform(name), config)


@contextlib.contextmanager
def hook_calls(pm: pluggy.PluginManager) -> Iterator[list[str]]:
    """The names of the hooks called on ``pm`` inside the block, in order."""
    names: list[str] = []
    undo = pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: names.append(name),
        lambda outcome, name, impls, kwargs: None,
    )
    try:
        yield names
    finally:
        undo()


def _replay_json_events(events: list[dict[str, Any]], imr: int) -> bytes:
    register = bytes(RTMR_LENGTH)
    for event in events:
        if event["imr"] == imr:
            register = extend(register, bytes.fromhex(event["digest"]))
    return register


def _sdk(agent: PlatformAgent) -> Any:
    from dstack_sdk import DstackClient

    return DstackClient(str(agent.socket), timeout=SDK_TIMEOUT)


def _post(agent: PlatformAgent, method: str, args: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = uds_request(agent.socket, "POST", f"/{method}", json.dumps(args).encode())
    return status, json.loads(body)


def _get_quote(agent: PlatformAgent, report_data: bytes) -> tuple[bytes, tuple[TdxEvent, ...]]:
    status, body = _post(agent, "GetQuote", {"report_data": report_data.hex()})
    assert status == 200, body
    return bytes.fromhex(body["quote"]), events_from_json(body["event_log"])


def _emit(agent: PlatformAgent, event: str, payload: bytes) -> tuple[int, Any]:
    return _post(agent, "EmitEvent", {"event": event, "payload": payload.hex()})


def _runtime(events: tuple[TdxEvent, ...]) -> list[tuple[str, bytes]]:
    return [(e.event, e.event_payload) for e in events if e.imr == 3]


class TestPlatformInfo:
    def test_info_is_typed_and_named(
        self, dstack_plugin_manager: pluggy.PluginManager, dstack_platform_name: str
    ) -> None:
        """platform_info returns a PlatformInfo named after the entry point, with valid fields."""
        info = dstack_plugin_manager.hook.platform_info()
        assert isinstance(info, PlatformInfo)
        assert info.name == dstack_platform_name
        assert isinstance(info.tag, str) and info.tag
        assert types.is_evidence_format(info.evidence_format)
        assert isinstance(info.simulated, bool) and isinstance(info.runtime_registers, bool)

    def test_simulated_tag_is_not_a_hardware_tag(self, dstack_platform_info: PlatformInfo) -> None:
        """A simulated platform's envelope tag is never one that real hardware uses."""
        if not dstack_platform_info.simulated:
            pytest.skip("platform is not simulated (simulated=False)")
        assert not types.is_hardware_tag(dstack_platform_info.tag)

    def test_trust_bundle_is_typed_or_none(
        self,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_config: PlatformConfig,
    ) -> None:
        """trust_bundle, given the platform's options, is a usable TrustBundle or None."""
        if not dstack_plugin_manager.hook.trust_bundle.get_hookimpls():
            pytest.skip("platform does not implement trust_bundle")
        platform = Platform.from_plugin_manager(dstack_plugin_manager)
        bundle = platform.trust_bundle_sync(
            dstack_platform_config.state_dir, dstack_platform_config.options
        )
        if bundle is None:
            return
        assert isinstance(bundle, TrustBundle)
        x509.load_pem_x509_certificate(bundle.root_ca_pem)
        json.loads(bundle.collateral_json)

    def test_hardware_platform_publishes_no_anchors_for_hardware(
        self,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_info: PlatformInfo,
        dstack_platform_config: PlatformConfig,
    ) -> None:
        """A hardware platform, with no options (real hardware), publishes no trust bundle."""
        if dstack_platform_info.simulated:
            pytest.skip("platform is simulated: its anchors are its mock PKI's")
        platform = Platform.from_plugin_manager(dstack_plugin_manager)
        assert platform.trust_bundle_sync(dstack_platform_config.state_dir, {}) is None


class TestHookResults:
    def test_hooks_are_synchronous(self, dstack_plugin_manager: pluggy.PluginManager) -> None:
        """No hook implementation is a coroutine or async generator function."""
        for hook in REQUIRED_HOOKS + ("configure", "unconfigure", "trust_bundle"):
            for impl in getattr(dstack_plugin_manager.hook, hook).get_hookimpls():
                assert not inspect.iscoroutinefunction(impl.function), hook
                assert not inspect.isasyncgenfunction(impl.function), hook

    @pytest.mark.parametrize(
        ("hook", "kwargs", "expected"),
        [
            ("derive_root_key", {}, RootKey),
            ("get_quote", {"report_data": bytes(REPORT_DATA_LENGTH)}, Quote),
            ("attest", {"report_data": bytes(REPORT_DATA_LENGTH)}, PlatformEvidence),
            ("boot_event_log", {}, tuple),
            ("read_measurements", {}, Measurements),
        ],
    )
    def test_hook_returns_its_type(
        self,
        dstack_platform: Platform,
        dstack_plugin_manager: pluggy.PluginManager,
        hook: str,
        kwargs: dict[str, Any],
        expected: type[Any],
    ) -> None:
        """Each answering hook, called directly, returns its declared type (never None)."""
        try:
            result: Any = getattr(dstack_plugin_manager.hook, hook)(**kwargs)
        except PlatformUnsupported:
            if hook == "read_measurements" and not dstack_platform.info.runtime_registers:
                pytest.skip("read_measurements is unsupported without runtime registers")
            raise
        assert isinstance(result, expected), f"{hook} returned {type(result).__name__}"
        if hook == "boot_event_log":
            assert all(isinstance(e, TdxEvent) for e in result)
        if hook in ("get_quote", "attest"):
            quote = result if isinstance(result, Quote) else result.quote
            assert quote.format == dstack_platform.info.evidence_format


class TestQuote:
    @pytest.mark.parametrize("pattern", sorted(REPORT_DATA_PATTERNS))
    def test_binds_report_data(self, dstack_platform: Platform, pattern: str) -> None:
        """get_quote binds exactly the 64 report-data bytes at its format's offset."""
        report_data = REPORT_DATA_PATTERNS[pattern]
        quote = run(dstack_platform.get_quote(report_data))
        assert quote.format == dstack_platform.info.evidence_format
        assert bound_report_data(quote) == report_data

    def test_distinct_report_data_give_distinct_bindings(self, dstack_platform: Platform) -> None:
        """Two quotes over different report data bind each its own bytes."""
        a, b = REPORT_DATA_PATTERNS["ascending"], REPORT_DATA_PATTERNS["random"]
        qa, qb = run(dstack_platform.get_quote(a)), run(dstack_platform.get_quote(b))
        assert (bound_report_data(qa), bound_report_data(qb)) == (a, b)

    @pytest.mark.parametrize("method", ["get_quote", "attest"])
    @pytest.mark.parametrize("length", BAD_REPORT_DATA_LENGTHS)
    def test_rejects_report_data_not_64_bytes(
        self,
        dstack_platform: Platform,
        dstack_plugin_manager: pluggy.PluginManager,
        method: str,
        length: int,
    ) -> None:
        """The façade rejects report data that is not 64 bytes before any hook runs."""
        with hook_calls(dstack_plugin_manager) as calls, pytest.raises(InvalidRequest):
            run(getattr(dstack_platform, method)(b"\x01" * length))
        assert calls == []

    def test_truncated_quote_is_rejected(self, dstack_platform: Platform) -> None:
        """A non-empty quote, cut anywhere, is rejected by the parser with EvidenceError."""
        data = run(dstack_platform.get_quote(REPORT_DATA_PATTERNS["random"])).data
        assert len(data) > 0
        evidence_format = dstack_platform.info.evidence_format
        if evidence_format == "sev-snp":
            SnpReport.from_bytes(data)
            cuts: tuple[int, ...] = (0, 1, 0x50, 0x90, len(data) // 2, len(data) - 1)
            parse: Any = SnpReport.from_bytes
        elif evidence_format == "tdx":
            parsed = TdxQuote.from_bytes(data)
            cuts = (0, 1, HEADER_SIZE - 1, HEADER_SIZE, parsed.report_data_offset,
                    len(parsed.signed_region), len(parsed.raw) // 2, len(parsed.raw) - 1)
            parse = TdxQuote.from_bytes
        else:
            _decode(evidence_format, data)
            cuts = (0, 1, len(data) // 2, len(data) - 1)

            def parse(cut: bytes) -> object:
                return _decode(evidence_format, cut)
        for cut in cuts:
            with pytest.raises(EvidenceError):
                parse(data[:cut])

    def test_quote_carries_current_registers(self, dstack_platform: Platform) -> None:
        """A TDX quote carries the MRTD and RTMR0-3 that read_measurements reports."""
        require_tdx(dstack_platform.info, "registers in the quote")
        measured = measurements_or_skip(dstack_platform)
        quote = run(dstack_platform.get_quote(bytes(REPORT_DATA_LENGTH)))
        assert tdx_registers(quote.data) == (measured.mrtd, measured.rtmrs)

    def test_quote_verifies_under_its_trust_anchors(
        self,
        dstack_platform: Platform,
        dstack_platform_env: PlatformEnv,
        dstack_platform_config: PlatformConfig,
    ) -> None:
        """dcap-qvl accepts the quote under its test anchors, not under Intel's root or tampered."""
        require_tdx(dstack_platform.info, "DCAP verification")
        bundle = trust_bundle_or_skip(dstack_platform, dstack_platform_env,
                                      dstack_platform_config)
        import dcap_qvl  # type: ignore[import-untyped]
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        root = x509.load_pem_x509_certificate(bundle.root_ca_pem).public_bytes(Encoding.DER)
        collateral = dcap_qvl.QuoteCollateralV3.from_json(bundle.collateral_json)
        now = int(time.time())
        quote = run(dstack_platform.get_quote(REPORT_DATA_PATTERNS["random"])).data
        assert dcap_qvl.verify_with_root_ca(quote, collateral, root, now).status
        with pytest.raises(ValueError):
            dcap_qvl.verify(quote, collateral, now)
        tampered = bytearray(quote)
        tampered[TdxQuote.from_bytes(quote).report_data_offset] ^= 1
        with pytest.raises(ValueError):
            dcap_qvl.verify_with_root_ca(bytes(tampered), collateral, root, now)


class TestAttest:
    @pytest.mark.parametrize("pattern", ["zeros", "random"])
    def test_evidence_binds_report_data(self, dstack_platform: Platform, pattern: str) -> None:
        """attest returns PlatformEvidence whose quote binds the report data; boot events typed."""
        report_data = REPORT_DATA_PATTERNS[pattern]
        evidence = run(dstack_platform.attest(report_data))
        assert isinstance(evidence, PlatformEvidence)
        assert evidence.quote.format == dstack_platform.info.evidence_format
        assert bound_report_data(evidence.quote) == report_data
        assert all(isinstance(e, TdxEvent) for e in evidence.boot_events)

    def test_boot_events_replay_to_quote_registers(self, dstack_platform: Platform) -> None:
        """attest's boot events replay to RTMR0-2 of its own quote."""
        require_tdx(dstack_platform.info, "boot event replay")
        evidence = run(dstack_platform.attest(bytes(REPORT_DATA_LENGTH)))
        _, rtmrs = tdx_registers(evidence.quote.data)
        assert replay_rtmrs(evidence.boot_events)[:3] == rtmrs[:3]

    def test_envelope_round_trips(self, dstack_platform: Platform) -> None:
        """An envelope built from attest's evidence round-trips through canonical CBOR."""
        report_data = REPORT_DATA_PATTERNS["ascending"]
        evidence = run(dstack_platform.attest(report_data))
        envelope = Envelope(
            platform=dstack_platform.info.tag,
            evidence_format=dstack_platform.info.evidence_format,
            quote=evidence.quote.data,
            event_log=tuple(evidence.boot_events),
            report_data=report_data,
            extra=dict(evidence.extra),
        )
        blob = envelope.to_cbor()
        decoded = Envelope.from_cbor(blob)
        assert decoded.to_cbor() == blob
        assert (decoded.platform, decoded.quote, decoded.report_data, decoded.event_log) == (
            envelope.platform, envelope.quote, envelope.report_data, envelope.event_log)


class TestMeasurements:
    def test_boot_event_log_is_typed(self, dstack_platform: Platform) -> None:
        """boot_event_log gives TdxEvents for RTMR0-2 only (possibly none)."""
        events = run(dstack_platform.boot_event_log())
        assert all(isinstance(e, TdxEvent) and e.imr in (0, 1, 2) for e in events)

    def test_boot_event_log_replays_to_rtmr0_2(self, dstack_platform: Platform) -> None:
        """Replaying boot_event_log gives read_measurements' RTMR0-2."""
        require_tdx(dstack_platform.info, "RTMR0-2 replay")
        measured = measurements_or_skip(dstack_platform)
        events = run(dstack_platform.boot_event_log())
        assert replay_rtmrs(events)[:3] == measured.rtmrs[:3]

    def test_runtime_log_replays_to_rtmr3(
        self, dstack_platform: Platform, dstack_platform_config: PlatformConfig,
    ) -> None:
        """After configure, the runtime event log replays to RTMR3 (the agent's start-up check)."""
        require_runtime_registers(dstack_platform.info)
        measured = measurements_or_skip(dstack_platform)
        assert RuntimeEventLog(dstack_platform_config.runtime_log).replay() == measured.rtmrs[3]


class TestExtendRtmr:
    def test_extend_moves_only_rtmr3(
        self, dstack_platform: Platform, dstack_platform_config: PlatformConfig,
    ) -> None:
        """extend_rtmr makes RTMR3 SHA384(RTMR3 || digest), touches nothing else; quotes show it."""
        require_runtime_registers(dstack_platform.info)
        before = measurements_or_skip(dstack_platform)
        event = RuntimeEvent(event="conformance-extend", payload=b"moves only rtmr3")
        digest = event.digest
        run(dstack_platform.extend_rtmr(digest))
        log_extends(dstack_platform_config, event)
        after = dstack_platform.read_measurements_sync()
        assert after.rtmrs[3] == extend(before.rtmrs[3], digest)
        assert (after.mrtd, after.rtmrs[:3]) == (before.mrtd, before.rtmrs[:3])
        if dstack_platform.info.evidence_format == "tdx":
            quote = run(dstack_platform.get_quote(bytes(REPORT_DATA_LENGTH)))
            assert tdx_registers(quote.data)[1][3] == after.rtmrs[3]

    @pytest.mark.parametrize("index", [0, 1, 2, 4])
    def test_rejects_other_registers(
        self, dstack_platform: Platform, dstack_plugin_manager: pluggy.PluginManager, index: int,
    ) -> None:
        """The extend_rtmr hook refuses any register but 3 with InvalidRequest; nothing moves."""
        require_runtime_registers(dstack_platform.info)
        before = measurements_or_skip(dstack_platform)
        with pytest.raises(InvalidRequest):
            dstack_plugin_manager.hook.extend_rtmr(index=index, digest=bytes(RTMR_LENGTH))
        assert dstack_platform.read_measurements_sync() == before

    @pytest.mark.parametrize("length", BAD_DIGEST_LENGTHS)
    def test_rejects_wrong_length_digest(
        self, dstack_platform: Platform, dstack_plugin_manager: pluggy.PluginManager, length: int,
    ) -> None:
        """A digest that is not 48 bytes is InvalidRequest in the façade and in the hook."""
        require_runtime_registers(dstack_platform.info)
        before = measurements_or_skip(dstack_platform)
        with hook_calls(dstack_plugin_manager) as calls, pytest.raises(InvalidRequest):
            run(dstack_platform.extend_rtmr(b"\x02" * length))
        assert calls == []
        with pytest.raises(InvalidRequest):
            dstack_plugin_manager.hook.extend_rtmr(index=3, digest=b"\x02" * length)
        assert dstack_platform.read_measurements_sync() == before

    def test_concurrent_extends_lose_no_update(
        self, dstack_platform: Platform, dstack_platform_config: PlatformConfig,
    ) -> None:
        """Extends from many threads, with quotes and reads between them, lose no update."""
        require_runtime_registers(dstack_platform.info)
        before = measurements_or_skip(dstack_platform)
        event = RuntimeEvent(event="conformance-extend", payload=b"same digest every time")
        digest = event.digest  # the same every time: order cannot matter

        async def hammer() -> None:
            calls: list[Coroutine[Any, Any, object]] = []
            for i in range(CONCURRENT_EVENTS):
                calls.append(dstack_platform.extend_rtmr(digest))
                if i % 6 == 0:
                    calls.append(dstack_platform.get_quote(bytes(REPORT_DATA_LENGTH)))
                    calls.append(dstack_platform.read_measurements())
            await asyncio.gather(*calls)

        run(hammer())
        log_extends(dstack_platform_config, event, CONCURRENT_EVENTS)
        expected = before.rtmrs[3]
        for _ in range(CONCURRENT_EVENTS):
            expected = extend(expected, digest)
        assert dstack_platform.read_measurements_sync().rtmrs[3] == expected

    def test_extension_is_durable(
        self,
        dstack_platform_name: str,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_config: PlatformConfig,
    ) -> None:
        """An extension survives closing the platform and configuring a new instance."""
        with configured_platform(dstack_plugin_manager, dstack_platform_config) as first:
            require_runtime_registers(first.info)
            measurements_or_skip(first)
            event = RuntimeEvent(event="conformance-extend", payload=b"durable")
            run(first.extend_rtmr(event.digest))
            log_extends(dstack_platform_config, event)
            extended = first.read_measurements_sync()
        with restart(dstack_platform_name, dstack_platform_config) as second:
            assert second.read_measurements_sync() == extended

    def test_unsupported_without_runtime_registers(self, dstack_platform: Platform) -> None:
        """A platform without runtime registers refuses extend_rtmr with PlatformUnsupported."""
        if dstack_platform.info.runtime_registers:
            pytest.skip("platform has runtime registers")
        with pytest.raises(PlatformUnsupported):
            run(dstack_platform.extend_rtmr(bytes(RTMR_LENGTH)))


def _assert_dstack_error(exc: BaseException) -> None:
    assert isinstance(exc, DstackError), f"{type(exc).__name__} escaped the façade"
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, DstackError):
        assert isinstance(exc, PlatformError), "a foreign exception must become PlatformError"


class TestErrors:
    def test_unconfigured_platform_fails_with_dstack_error(
        self, dstack_plugin_manager: pluggy.PluginManager,
    ) -> None:
        """A quote from an unconfigured platform fails as a DstackError (foreign: PlatformError)."""
        platform = Platform.from_plugin_manager(dstack_plugin_manager)
        try:
            run(platform.get_quote(bytes(REPORT_DATA_LENGTH)))
        except Exception as exc:  # noqa: BLE001 - what escapes is the point
            _assert_dstack_error(exc)
        else:
            pytest.skip("platform quotes without configure; no invalid state to provoke")

    def test_unusable_state_dir_fails_with_dstack_error(
        self, dstack_plugin_manager: pluggy.PluginManager, dstack_platform_config: PlatformConfig,
    ) -> None:
        """configure on a state dir that is a regular file fails as a DstackError."""
        blocker = dstack_platform_config.state_dir.parent / "not-a-directory"
        blocker.write_bytes(b"")
        config = attrs.evolve(dstack_platform_config, state_dir=blocker)
        try:
            with configured_platform(dstack_plugin_manager, config):
                pass
        except Exception as exc:  # noqa: BLE001 - what escapes is the point
            _assert_dstack_error(exc)
        else:
            pytest.skip("platform keeps no state in state_dir")

    def test_invalid_input_errors_are_typed(
        self, dstack_platform: Platform, dstack_plugin_manager: pluggy.PluginManager,
    ) -> None:
        """Input a hook cannot accept is refused with InvalidRequest, not a foreign exception."""
        require_runtime_registers(dstack_platform.info)
        with pytest.raises(InvalidRequest) as caught:
            dstack_plugin_manager.hook.extend_rtmr(index=3, digest=b"short")
        assert caught.value.http_status == 400


class TestRootKey:
    def test_root_key_is_typed(self, dstack_platform: Platform) -> None:
        """derive_root_key returns a RootKey with a 32-byte secp256k1 key."""
        key = dstack_platform.derive_root_key_sync()
        assert isinstance(key, RootKey) and len(key.k256_key) == 32

    def test_stable_across_restart(
        self,
        dstack_platform_name: str,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_config: PlatformConfig,
    ) -> None:
        """The root key is the same after configuring a new instance on the same state dir."""
        with configured_platform(dstack_plugin_manager, dstack_platform_config) as first:
            key = first.derive_root_key_sync()
        with restart(dstack_platform_name, dstack_platform_config) as second:
            assert second.derive_root_key_sync() == key


class TestAgent:
    def test_concurrent_emit_events_keep_log_and_rtmr3_consistent(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """Parallel EmitEvents and GetQuotes: each quote's log replays to its RTMRs; events once."""
        require_runtime_registers(dstack_platform_info)
        require_tdx(dstack_platform_info, "RTMR3 in the quote")
        run_tag = random.Random().getrandbits(32)  # the device's log may hold earlier runs
        names = [f"conformance-{run_tag:08x}-{i}" for i in range(CONCURRENT_EVENTS)]
        with concurrent.futures.ThreadPoolExecutor(CONCURRENT_THREADS) as pool:
            emits, quotes = [], []
            for i, name in enumerate(names):
                emits.append(pool.submit(_emit, dstack_agent, name, name.encode()))
                if i % (CONCURRENT_EVENTS // CONCURRENT_QUOTES) == 0:
                    quotes.append(pool.submit(_get_quote, dstack_agent, name.encode()))
            assert [f.result() for f in emits] == [(200, {})] * len(names)
            snapshots = [f.result() for f in quotes]
        snapshots.append(_get_quote(dstack_agent, b"final"))
        for quote, events in snapshots:
            assert replay_rtmrs(events) == tdx_registers(quote)[1]
        runtime = _runtime(snapshots[-1][1])
        emitted = [entry for entry in runtime if entry[0] in set(names)]
        assert sorted(emitted) == sorted((n, n.encode()) for n in names)
        logged = RuntimeEventLog(dstack_agent.config.runtime_log).read()
        assert [(e.event, e.payload) for e in logged] == runtime

    def test_events_survive_agent_restart(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """After a restart the agent serves the same RTMR3 and runtime log."""
        require_runtime_registers(dstack_platform_info)
        require_tdx(dstack_platform_info, "RTMR3 in the quote")
        for i in range(3):
            assert _emit(dstack_agent, f"before-restart-{i}", bytes([i]))[0] == 200
        quote, events = _get_quote(dstack_agent, b"before")
        assert dstack_agent.stop() == 0
        dstack_agent.start()
        quote2, events2 = _get_quote(dstack_agent, b"after")
        assert tdx_registers(quote2)[1] == tdx_registers(quote)[1]
        assert _runtime(events2) == _runtime(events)

    def test_emit_event_unsupported_without_runtime_registers(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """Without runtime registers EmitEvent is 501 platform_unsupported; the agent serves on."""
        if dstack_platform_info.runtime_registers:
            pytest.skip("platform has runtime registers")
        status, body = _emit(dstack_agent, "app-event", b"x")
        assert (status, body["code"]) == (501, "platform_unsupported")
        assert body["error"]
        assert _post(dstack_agent, "GetQuote", {"report_data": "00"})[0] == 200

    def test_sdk_get_quote(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """The SDK's GetQuote gives a quote binding the padded report data, and a replayable log;
        without TDX quotes, upstream's shape: no quote, the evidence in ``attestation``."""
        result = _sdk(dstack_agent).get_quote(b"dstack-conformance")
        padded = b"dstack-conformance".ljust(REPORT_DATA_LENGTH, b"\0")
        assert result.report_data == padded.hex()
        evidence = result.decode_quote()
        if dstack_platform_info.evidence_format != "tdx":
            assert evidence == b"" and result.event_log == ""
            status, body = _post(dstack_agent, "GetQuote", {"report_data": padded.hex()})
            assert status == 200, body
            evidence = Envelope.from_cbor(bytes.fromhex(body["attestation"])).quote
        quote = Quote(format=dstack_platform_info.evidence_format, data=evidence)
        assert bound_report_data(quote) == padded
        if dstack_platform_info.evidence_format == "tdx":
            replayed = result.replay_rtmrs()
            rtmrs = tdx_registers(quote.data)[1]
            assert [replayed[i] for i in range(4)] == [r.hex() for r in rtmrs]

    def test_sdk_attest(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """The SDK's Attest returns our envelope: right tag and format, bound and replayable."""
        raw = _sdk(dstack_agent).attest(b"attest-conformance").decode_attestation()
        envelope = Envelope.from_cbor(raw)
        assert envelope.to_cbor() == raw
        assert envelope.platform == dstack_platform_info.tag
        assert envelope.evidence_format == dstack_platform_info.evidence_format
        padded = b"attest-conformance".ljust(REPORT_DATA_LENGTH, b"\0")
        assert envelope.report_data == padded
        quote = Quote(format=envelope.evidence_format, data=envelope.quote)
        assert bound_report_data(quote) == padded
        if envelope.evidence_format == "tdx":
            assert replay_rtmrs(envelope.event_log) == tdx_registers(envelope.quote)[1]

    def test_sdk_info(
        self, dstack_agent: PlatformAgent, dstack_platform_info: PlatformInfo,
    ) -> None:
        """The SDK parses Info; TDX registers in tcb_info match a quote and replay from its log."""
        client = _sdk(dstack_agent)
        info = client.info()
        if info.compose_hash:
            compose = info.tcb_info.app_compose.encode()
            assert info.compose_hash == hashlib.sha256(compose).hexdigest()
        if dstack_platform_info.evidence_format != "tdx":
            return
        tcb = info.tcb_info
        mrtd, rtmrs = tdx_registers(client.get_quote(b"\0").decode_quote())
        assert (tcb.mrtd, tcb.rtmr0, tcb.rtmr1, tcb.rtmr2) == (
            mrtd.hex(), rtmrs[0].hex(), rtmrs[1].hex(), rtmrs[2].hex())
        events = [e.model_dump() for e in tcb.event_log]
        assert _replay_json_events(events, 3).hex() == tcb.rtmr3

    def test_sdk_get_key(self, dstack_agent: PlatformAgent) -> None:
        """GetKey is deterministic, per path, signed by one app key, and stable across a restart."""
        from coincurve import PublicKey

        client = _sdk(dstack_agent)
        a, b = client.get_key("conformance/a", "test"), client.get_key("conformance/b", "test")
        assert len(a.decode_key()) == 32 and a.key != b.key
        assert client.get_key("conformance/a", "test").key == a.key
        signers = set()
        for result in (a, b):
            public = PublicKey.from_secret(result.decode_key()).format()
            message = keccak256(f"test:{public.hex()}".encode())
            signers.add(PublicKey.from_signature_and_message(
                result.decode_signature_chain()[0], message, hasher=None).format())
        assert len(signers) == 1
        assert dstack_agent.stop() == 0
        dstack_agent.start()
        assert _sdk(dstack_agent).get_key("conformance/a", "test").key == a.key


@attrs.frozen
class _Anchors:
    """What verifies the agent's evidence in tests: the platform's trust bundle as options
    (its root with the simulator opt-in, its OS image policy) and collateral."""

    options: VerifyOptions
    collateral: object | None


def _anchors(agent: PlatformAgent, env: PlatformEnv, pm: pluggy.PluginManager,
             info: PlatformInfo) -> _Anchors:
    from ..osimage import OsImagePolicy, stated_os_image_hash
    from ..verify import parse_collateral_documents

    platform = Platform.from_plugin_manager(pm)
    bundle = env.trust_bundle or platform.trust_bundle_sync(
        agent.config.state_dir, agent.config.options
    )
    if bundle is None:
        pytest.skip("no trust anchors for this platform's evidence in tests (real hardware "
                    "verifies under the vendor's roots with its collateral)")
    root = x509.load_pem_x509_certificate(bundle.root_ca_pem)
    documents = parse_collateral_documents([("the trust bundle's collateral",
                                             bundle.collateral_json.encode())])
    policy = None
    if bundle.os_image_policy_json is not None:
        # The bundle's images are those the platform boots with its own inputs; the kit's
        # default sys-config names another, which that policy would (rightly) refuse.
        policy = OsImagePolicy.from_json(bundle.os_image_policy_json)
        stated = stated_os_image_hash(agent.config.sys_config.read_text())
        if stated not in {image.os_image_hash for image in policy.images}:
            policy = None
    return _Anchors(
        options=VerifyOptions(
            now=int(time.time()),
            root_ca_der=root.public_bytes(Encoding.DER),
            allow_simulator=True,
            os_image_policy=policy,
        ),
        collateral=documents.get(info.evidence_format),
    )


def _attest(agent: PlatformAgent, report_data: bytes) -> bytes:
    status, body = _post(agent, "Attest", {"report_data": report_data.hex()})
    assert status == 200, body
    return bytes.fromhex(body["attestation"])


class TestVerifier:
    """The platform's evidence through the verifier plugin of its format, as a relying party
    verifies it (``dstack-agent verify``, ``POST /verify``)."""

    def test_verifier_plugin_is_installed(self, dstack_platform_info: PlatformInfo) -> None:
        """Exactly one verifier plugin is installed for the platform's evidence format, and
        it loads and says it verifies that format."""
        from ..verify import default_host

        verifier = default_host().get(dstack_platform_info.evidence_format)
        assert verifier.info.evidence_format == dstack_platform_info.evidence_format

    def test_attestation_verifies_pass(
        self,
        dstack_agent: PlatformAgent,
        dstack_platform_env: PlatformEnv,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_info: PlatformInfo,
    ) -> None:
        """The agent's Attest output verifies ``pass`` under the platform's trust anchors,
        binding the report data; a simulated platform's only with the opt-in."""
        from ..verify import ExpectedReportData, load_evidence, verify_evidence

        anchors = _anchors(dstack_agent, dstack_platform_env, dstack_plugin_manager,
                           dstack_platform_info)
        padded = b"verifier-conformance".ljust(REPORT_DATA_LENGTH, b"\0")
        evidence = load_evidence(_attest(dstack_agent, padded))
        options = attrs.evolve(anchors.options,
                               expected_report_data=ExpectedReportData.raw(padded))
        result = verify_evidence(evidence, options, anchors.collateral)
        assert result.verdict == "pass", result.reason
        assert result.report_data == padded
        assert result.verifier is not None
        assert result.verifier.evidence_format == dstack_platform_info.evidence_format
        if dstack_platform_info.simulated:
            assert result.simulated
        refused = verify_evidence(evidence, attrs.evolve(options, allow_simulator=False),
                                  anchors.collateral)
        assert refused.verdict == "fail", "a test PKI's evidence passed without the opt-in"
        assert not refused.identity_bound and refused.os_image_hash == b""

    def test_tampered_evidence_fails(
        self,
        dstack_agent: PlatformAgent,
        dstack_platform_env: PlatformEnv,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_info: PlatformInfo,
    ) -> None:
        """Any one bit flipped in the platform evidence's signed part makes the verdict
        ``fail`` (or the evidence malformed): the plugin checks a signature over it. The
        envelope's report data is changed to match a flipped one in the evidence, so that
        only the plugin's signature check can catch it, not the core's binding."""
        from ..verify import load_evidence, verify_evidence

        anchors = _anchors(dstack_agent, dstack_platform_env, dstack_plugin_manager,
                           dstack_platform_info)
        raw = _attest(dstack_agent, b"tamper".ljust(REPORT_DATA_LENGTH, b"\0"))
        envelope = Envelope.from_cbor(raw)
        report_data_at = envelope.quote.find(envelope.report_data)
        assert report_data_at >= 0, "the report data is not in the evidence as given"
        for offset in (report_data_at, report_data_at + REPORT_DATA_LENGTH - 1, 0):
            quote = bytearray(envelope.quote)
            quote[offset] ^= 0x01
            report_data = bytes(quote[report_data_at:report_data_at + REPORT_DATA_LENGTH])
            tampered = attrs.evolve(envelope, quote=bytes(quote),
                                    report_data=report_data).to_cbor()
            try:
                evidence = load_evidence(tampered)
            except EvidenceError:
                continue
            result = verify_evidence(evidence, anchors.options, anchors.collateral)
            assert result.verdict == "fail", f"bit flipped at {offset} still passes"

    def test_mutants_are_sound(
        self,
        dstack_agent: PlatformAgent,
        dstack_platform_env: PlatformEnv,
        dstack_plugin_manager: pluggy.PluginManager,
        dstack_platform_info: PlatformInfo,
    ) -> None:
        """The soundness property over structured mutations of two of the agent's envelopes
        (an EmitEvent apart where it can): refused, ``fail``, or exactly a genuine piece's
        claims, and never an identity claim but a genuine one (dstack's mutation suite)."""
        from hypothesis import given
        from hypothesis import strategies as st

        from .mutations import (
            Source,
            as_form,
            genuine_claims,
            mutate_envelope,
            mutation_settings,
            run_mutation,
        )

        anchors = _anchors(dstack_agent, dstack_platform_env, dstack_plugin_manager,
                           dstack_platform_info)
        first = _attest(dstack_agent, b"mutant-0".ljust(REPORT_DATA_LENGTH, b"\0"))
        if dstack_platform_info.runtime_registers:
            assert _emit(dstack_agent, "conformance-mutation", b"\x01")[0] == 200
        second = _attest(dstack_agent, b"mutant-1".ljust(REPORT_DATA_LENGTH, b"\0"))
        source = Source(f"{dstack_platform_info.name} envelope", first, second, anchors.options,
                        anchors.collateral, lambda raw: raw)
        genuine = genuine_claims(source)

        @mutation_settings(VERIFIER_EXAMPLES)
        @given(data=st.data())
        def property_holds(data: st.DataObject) -> None:
            run_mutation(
                source, data, lambda d, raw, partner: as_form(d, mutate_envelope(d, raw, partner)),
                genuine,
            )

        property_holds()
