"""The commit path and the caches of the service, in-process on the real simulator plugin
(subclassed to block, fail or change where a test needs it) with real files and crypto.

Group commit, quotes that never wait for an extension, partial and unknown extensions,
the size limits, and every cache keyed on each input that changes its answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import pytest
from dstack_simulator import SimulatorPlatform

from dstack_core import hookimpl, hookspecs, keys
from dstack_core.config import Settings
from dstack_core.errors import EventLogFull, PlatformBusy, PlatformError
from dstack_core.eventlog import RuntimeEventLog, events_from_json, events_to_json, replay_rtmrs
from dstack_core.journal import EventLimits
from dstack_core.mockpki import SIMULATOR_USER_DATA, mock_td_report
from dstack_core.platform import Platform
from dstack_core.quote import TdxQuote
from dstack_core.service import AgentService, ServiceFiles

T = TypeVar("T")


def build(
    tmp_path: Path,
    plugin: SimulatorPlatform | None = None,
    *,
    limits: EventLimits = EventLimits(),  # noqa: B008
    dmi: dict[str, str] | None = None,
) -> AgentService:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin or SimulatorPlatform(), name="simulator")
    dmi_dir = tmp_path / "dmi"
    dmi_dir.mkdir(parents=True, exist_ok=True)
    for name, value in (dmi or {}).items():
        (dmi_dir / name).write_text(value + "\n")
    config = Settings(platform="simulator", state_dir=tmp_path / "state").platform_config()
    return AgentService.start(
        Platform.from_plugin_manager(pm), config, ServiceFiles(dmi_dir=dmi_dir), limits=limits
    )


def run(service: AgentService, scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        service.warm_up()
        try:
            return await scenario()
        finally:
            await service.aclose()

    return asyncio.run(main())


async def quote_log(service: AgentService) -> tuple[TdxQuote, list[str]]:
    """A quote whose log replays to it, and the runtime event names of that log."""
    result = await service.get_quote(b"q")
    quote = TdxQuote.from_bytes(result.quote)
    events = events_from_json(result.event_log.decode())
    assert replay_rtmrs(events) == quote.report.rtmrs
    return quote, [e.event for e in events if e.imr == 3]


class Gated(SimulatorPlatform):
    """The simulator, whose batch extensions can be held (and counted, and failed)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.apply_then_fail: int | None = None
        self.only_batches_of: int | None = None  # apply_then_fail waits for this size
        self.unreadable = 0

    @hookimpl
    def extend_rtmr_many(self, index: int, digests: tuple[bytes, ...]) -> None:
        self.entered.set()
        assert self.hold.wait(30)
        self.batches.append(len(digests))
        size_matches = self.only_batches_of in (None, len(digests))
        if self.apply_then_fail is not None and size_matches:
            keep, self.apply_then_fail = self.apply_then_fail, None
            super().extend_rtmr_many(index=index, digests=digests[:keep])
            raise PlatformError("the extension failed half-way")
        super().extend_rtmr_many(index=index, digests=digests)

    @hookimpl
    def read_measurements(self) -> Any:
        if self.unreadable:
            self.unreadable -= 1
            raise PlatformError("register unreadable")
        return super().read_measurements()


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[AgentService, Gated]]:
    plugin = Gated()
    yield build(tmp_path, plugin), plugin


async def held_then_queued(
    service: AgentService, plugin: Gated, names: list[str]
) -> tuple[asyncio.Task[None], list[asyncio.Task[None]]]:
    """One event whose extension is held, and ``names`` queued behind it (one batch)."""
    plugin.hold.clear()
    first = asyncio.create_task(service.emit_event(event="first", payload=b""))
    await asyncio.to_thread(plugin.entered.wait, 10)
    rest = [
        asyncio.create_task(service.emit_event(event=name, payload=name.encode()))
        for name in names
    ]
    await asyncio.sleep(0.1)
    return first, rest


class TestGroupCommit:
    def test_concurrent_events_share_batches(self, gated: tuple[AgentService, Gated]) -> None:
        """50 concurrent EmitEvents take fewer extension calls than events, all land once,
        and the log replays to the register."""
        service, plugin = gated

        async def scenario() -> list[str]:
            first, rest = await held_then_queued(service, plugin, [f"e{i}" for i in range(49)])
            plugin.hold.set()
            await asyncio.gather(first, *rest)
            return (await quote_log(service))[1]

        names = run(service, scenario)
        boot = len(names) - 50
        assert sorted(names[boot:]) == sorted(["first", *(f"e{i}" for i in range(49))])
        assert plugin.batches[-2:] == [1, 49]
        log = RuntimeEventLog(service_log(service))
        assert [e.event for e in log.read()] == names and log.pending() == ()

    def test_quotes_do_not_wait_for_an_extension(self, gated: tuple[AgentService, Gated]) -> None:
        """While a batch is being extended (and saved), quotes, Info and Attest answer at
        once with a log that replays to their registers; the event shows once extended."""
        service, plugin = gated

        async def scenario() -> None:
            _, before = await quote_log(service)
            plugin.hold.clear()
            emitting = asyncio.create_task(service.emit_event(event="slow", payload=b""))
            await asyncio.to_thread(plugin.entered.wait, 10)
            quote, names = await asyncio.wait_for(quote_log(service), 5)
            assert names == before
            await asyncio.wait_for(service.info(), 5)
            await asyncio.wait_for(service.attest(b"a"), 5)
            assert not emitting.done()
            plugin.hold.set()
            await emitting
            _, after = await quote_log(service)
            assert after == [*before, "slow"]

        run(service, scenario)

    def test_partial_extension_keeps_what_the_register_holds(
        self, gated: tuple[AgentService, Gated]
    ) -> None:
        """A batch whose extension fails after two of four events: those two are
        acknowledged and logged, the other two get the platform's error."""
        service, plugin = gated

        async def scenario() -> list[Any]:
            first, batch = await held_then_queued(service, plugin, [f"b{i}" for i in range(4)])
            plugin.hold.set()
            await first
            return await asyncio.gather(*batch, return_exceptions=True)

        # The first batch runs alone; the four queued behind it form the failing one.
        plugin.apply_then_fail, plugin.only_batches_of = 2, 4
        results = run(service, scenario)
        assert results[:2] == [None, None]
        assert all(isinstance(r, PlatformError) for r in results[2:])
        names = [e.event for e in RuntimeEventLog(service_log(service)).read()]
        assert names[-3:] == ["first", "b0", "b1"]
        assert run(service, lambda: quote_log(service))[1] == names

    def test_unreadable_register_refuses_until_settled(
        self, gated: tuple[AgentService, Gated]
    ) -> None:
        """A failed extension whose outcome cannot be read back refuses EmitEvent with 503
        platform_busy until RTMR3 can be read; then it resumes, consistently."""
        service, plugin = gated

        async def scenario() -> None:
            plugin.apply_then_fail = 0
            plugin.unreadable = 3
            with pytest.raises(PlatformError):
                await service.emit_event(event="lost", payload=b"")
            with pytest.raises(PlatformBusy):
                await service.emit_event(event="refused", payload=b"")
            for _ in range(100):
                await asyncio.sleep(0.1)
                try:
                    await service.emit_event(event="resumed", payload=b"")
                    break
                except PlatformBusy:
                    continue
            _, names = await quote_log(service)
            assert names[-1] == "resumed" and "lost" not in names and "refused" not in names

        run(service, scenario)


def service_log(service: AgentService) -> Path:
    journal = service._journal
    assert journal is not None
    return journal._log.path


class TestLimits:
    def test_event_count_limit(self, tmp_path: Path) -> None:
        """With room for three more lines, the fourth event is 409 and nothing is dropped."""
        probe = build(tmp_path / "probe")
        boot = len(RuntimeEventLog(service_log(probe)).read())
        service = build(tmp_path, limits=EventLimits(events=boot + 3))

        async def scenario() -> None:
            for i in range(3):
                await service.emit_event(event=f"e{i}", payload=b"")
            with pytest.raises(EventLogFull):
                await service.emit_event(event="e3", payload=b"")
            _, names = await quote_log(service)
            assert names[boot:] == ["e0", "e1", "e2"]

        run(service, scenario)

    def test_refused_events_free_their_room(self, gated: tuple[AgentService, Gated]) -> None:
        """Room reserved by events whose extension failed is given back."""
        service, plugin = gated
        assert service._journal is not None
        journal = service._journal

        async def scenario() -> None:
            used = (journal._used_events, journal._used_size)
            plugin.apply_then_fail = 0
            with pytest.raises(PlatformError):
                await service.emit_event(event="failed", payload=b"x" * 100)
            assert (journal._used_events, journal._used_size) == used

        run(service, scenario)


class Shifting(SimulatorPlatform):
    """The simulator, whose boot-time measurements can change (as after a re-launch)."""

    def shift(self) -> None:
        assert self._pki is not None
        template = mock_td_report(
            mr_td=b"\x99" * 48, rtmrs=[bytes(48)] * 4, report_data=bytes(64),
        )
        self._signer = self._pki.quote_signer(template, user_data=SIMULATOR_USER_DATA)


class Counting(SimulatorPlatform):
    """The simulator, counting the quotes it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.quotes = 0

    @hookimpl
    def get_quote(self, report_data: bytes) -> Any:
        self.quotes += 1
        return super().get_quote(report_data)


class TestCaches:
    def test_info_takes_no_quote_per_call(self, tmp_path: Path) -> None:
        """Info takes quotes only on its first call (the boot-time registers, the demo
        certificate's evidence), none per call after, also after events."""
        plugin = Counting()
        service = build(tmp_path, plugin)

        async def scenario() -> int:
            await service.info()
            first = plugin.quotes
            for i in range(5):
                await service.emit_event(event=f"e{i}", payload=b"")
                await service.info()
                await service.info()
            return first

        assert run(service, scenario) == plugin.quotes <= 2

    def test_info_changes_with_every_input(self, tmp_path: Path) -> None:
        """Info is cached (the same answer object while nothing changes) and changes with
        each input: an event, the boot-time report the last quote carried, DMI."""
        plugin = Shifting()
        service = build(tmp_path, plugin, dmi={"sys_vendor": "Vendor A"})

        async def scenario() -> None:
            first = await service.info()
            assert await service.info() is first
            await service.emit_event(event="changes-info", payload=b"1")
            second = await service.info()
            assert second is not first and second.mr_aggregated != first.mr_aggregated
            tcb = json.loads(second.tcb_info.decode())
            assert tcb["event_log"][-1]["event"] == "changes-info"
            assert tcb["rtmr3"] != json.loads(first.tcb_info.decode())["rtmr3"]
            plugin.shift()
            await service.get_quote(b"")
            third = await service.info()
            assert json.loads(third.tcb_info.decode())["mrtd"] == "99" * 48
            assert third.mr_aggregated != second.mr_aggregated
            assert first.cloud_vendor == "Vendor A"

        run(service, scenario)
        other = build(tmp_path / "other", dmi={"sys_vendor": "Vendor B"})
        assert run(other, other.info).cloud_vendor == "Vendor B"

    def test_info_text_is_exactly_indented_json(self, tmp_path: Path) -> None:
        """tcb_info, assembled from kept pieces, is byte for byte json.dumps(indent=2) of
        its content, with non-ASCII events too."""
        service = build(tmp_path)

        async def scenario() -> str:
            await service.emit_event(event="é\"\\\n\u2028", payload=b"\x00\xff")
            return (await service.info()).tcb_info.decode()

        text = run(service, scenario)
        assert json.dumps(json.loads(text), indent=2) == text

    def test_quote_log_is_exactly_the_compact_event_log(self, tmp_path: Path) -> None:
        """GetQuote's kept event log is byte for byte events_to_json of its events."""
        service = build(tmp_path)

        async def scenario() -> str:
            await service.emit_event(event="ü", payload=b"\x01")
            return (await service.get_quote(b"")).event_log.decode()

        text = run(service, scenario)
        assert events_to_json(events_from_json(text), include_preimage=True) == text

    def test_attest_hex_is_the_envelope_in_hex(self, tmp_path: Path) -> None:
        """Attest's answer, assembled from the kept hex of the events, is exactly the hex of
        the envelope, after events (of both digest versions) too."""
        service = build(tmp_path)

        async def scenario() -> None:
            for i in range(3):
                assert (await service.attest_json(b"r")).decode() == (
                    await service.attest(b"r")
                ).hex()
                await service.emit_event(event=f"e{i}", payload=bytes([i]) * i)

        run(service, scenario)

    def test_attest_app_info_follows_the_log(self, tmp_path: Path) -> None:
        """The envelope's app info (cached per log length) changes with an event."""
        from dstack_core.envelope import Envelope

        service = build(tmp_path)

        async def scenario() -> tuple[bytes, bytes]:
            before = Envelope.from_cbor(await service.attest(b"")).app_info.mr_aggregated
            await service.emit_event(event="moves-rtmr3", payload=b"")
            after = Envelope.from_cbor(await service.attest(b"")).app_info.mr_aggregated
            return before, after

        before, after = run(service, scenario)
        assert before != after

    def test_sign_keys_are_kept_per_algorithm(self, tmp_path: Path) -> None:
        """Sign keeps one key per algorithm: alternating calls each sign with GetKey's
        vms/signing key of their own algorithm."""
        service = build(tmp_path)
        for algorithm, key_algorithm in [("ed25519", "ed25519"), ("secp256k1", "secp256k1"),
                                         ("ed25519", "ed25519"), ("k256", "secp256k1")]:
            signature = service.sign(algorithm=algorithm, data=b"data")
            expected = service.get_key(path="vms", purpose="signing", algorithm=key_algorithm)
            assert signature.public_key == expected.public_key
            assert keys.verify_signature(algorithm, b"data", signature.signature, expected.public_key)
