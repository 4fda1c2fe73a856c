"""The tdx platform end to end: a real agent subprocess on the fake kernel tree.

The SDK tests of ``test_sdk_e2e`` run here unchanged against ``--platform tdx`` (their
``agent``, ``upstream_agent``, ``bundle`` and ``platform_traits`` fixtures are overridden
below); then what only hardware-facing code has: the verifier on the fake's trust bundle,
every injected kernel failure through a live agent, and SIGKILL at random points of an
EmitEvent stream (for the simulator too).
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from dstack_sdk import DstackClient

from dstack_core.eventlog import RuntimeEventLog, events_from_json, extend, replay_rtmrs
from dstack_core.quote import TdxQuote
from dstack_core.testing import AgentProcess, short_tempdir, uds_request
from dstack_core.testing.fake_tee import FAKE_OS_IMAGE_HASH, FakeTdxAgent, FakeTdxMachine

from .conftest import UPSTREAM_APPKEYS, Bundle, PlatformTraits
from .test_sdk_e2e import (  # noqa: F401  (collected here again, on the tdx fixtures)
    NOW,
    TestAttest,
    TestGetKey,
    TestInfo,
    TestMisc,
    TestQuote,
    TestSignVerify,
    TestTappd,
    TestTlsKey,
)

FAKE_TDX_TRAITS = PlatformTraits(tag="tdx", simulated=False, user_data_marker=b"DSTACK-FAKE-TDX")
KILL_ROUNDS = 50


def _fake_agent(appkeys: str | None = None, **options: str) -> Iterator[FakeTdxAgent]:
    workdir = short_tempdir("ftdx")
    machine = FakeTdxMachine.create(workdir / "tree", appkeys=appkeys)
    proc = machine.agent(workdir=workdir, options=options).start()
    yield proc
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def agent() -> Iterator[FakeTdxAgent]:
    """A tdx agent on a freshly booted fake TD (fresh app keys), shared by the module."""
    yield from _fake_agent()


@pytest.fixture(scope="module")
def upstream_agent() -> Iterator[FakeTdxAgent]:
    """A tdx agent whose boot provisioned upstream's simulator app keys."""
    yield from _fake_agent(appkeys=UPSTREAM_APPKEYS.read_text())


@pytest.fixture(scope="module")
def bundle(agent: FakeTdxAgent) -> Bundle:
    """The fake machine's mock-PKI trust bundle."""
    trust = agent.machine.trust_bundle()
    root = x509.load_pem_x509_certificate(trust.root_ca_pem)
    return Bundle(root.public_bytes(Encoding.DER), trust.collateral_json, trust.os_image_policy_json)


@pytest.fixture(scope="module")
def platform_traits() -> PlatformTraits:
    return FAKE_TDX_TRAITS


def _quote_consistent(proc: AgentProcess) -> TdxQuote:
    """GetQuote succeeds and its event log replays to its registers; returns the quote."""
    status, body = proc.call("GetQuote", {"report_data": "00"})
    assert status == 200, body
    quote = TdxQuote.from_bytes(bytes.fromhex(body["quote"]))
    assert replay_rtmrs(events_from_json(body["event_log"])) == quote.report.rtmrs
    return quote


class TestTdxEvidence:
    def test_verifier_accepts_attestation_with_fake_trust_bundle(self, agent, bundle):
        """dstack_core.verify passes an Attest envelope given the fake's root and collateral."""
        from dstack_core.collateral import Collateral
        from dstack_core.verify import VerifyOptions, verify

        raw = DstackClient(str(agent.socket)).attest(b"verify-me").decode_attestation()
        options = VerifyOptions(now=NOW, root_ca_der=bundle.root_ca_der, allow_simulator=True)
        result = verify(raw, options, Collateral.from_json(bundle.collateral_json))
        assert result.passed, result.to_json()
        assert result.platform == "tdx"
        assert result.report_data == b"verify-me".ljust(64, b"\0")
        assert result.rtmrs == agent.machine.registers().rtmrs
        # The boot measured os-image-hash into RTMR3: bound, though no policy verifies it.
        assert result.os_image_hash.hex() == FAKE_OS_IMAGE_HASH
        assert result.check("os_image").status == "skipped" and not result.os_image_verified
        with_policy = verify(
            raw,
            attrs.evolve(options, os_image_policy=bundle.os_image_policy),
            Collateral.from_json(bundle.collateral_json),
        )
        assert with_policy.passed and with_policy.os_image_verified, with_policy.reason
        assert with_policy.to_upstream_json()["is_valid"] is True

    def test_verifier_rejects_without_trust_bundle(self, agent, bundle):
        """Without the fake's root (Intel's production root), the same evidence fails."""
        from dstack_core.collateral import Collateral
        from dstack_core.verify import VerifyOptions, verify

        raw = DstackClient(str(agent.socket)).attest(b"x").decode_attestation()
        result = verify(raw, VerifyOptions(now=NOW), Collateral.from_json(bundle.collateral_json))
        assert not result.passed

    def test_event_log_is_ccel_order_then_runtime(self, agent):
        """GetQuote's log is the CCEL boot events in log order, then the RTMR3 runtime log."""
        client = DstackClient(str(agent.socket))
        client.emit_event("order-check", b"1")
        result = client.get_quote(b"order")
        events = events_from_json(result.event_log)
        boot = [e for e in events if e.imr < 3]
        assert events[: len(boot)] == tuple(boot)
        from dstack_core.ccel import parse_ccel

        ccel = parse_ccel(agent.machine.paths.ccel_data.read_bytes())
        assert [e.digest for e in boot] == [e.digest for e in ccel]
        runtime = RuntimeEventLog(agent.machine.paths.runtime_log).read()
        assert [e.event for e in events[len(boot):]] == [e.event for e in runtime]
        assert events[-1].event == "order-check"
        report = TdxQuote.from_bytes(result.decode_quote()).report
        assert replay_rtmrs(events) == report.rtmrs == agent.machine.registers().rtmrs

    def test_emit_event_moves_the_hardware_register(self, agent):
        """EmitEvent extends the fake's RTMR3 by the event digest, through sysfs."""
        before = agent.machine.registers().rtmrs[3]
        DstackClient(str(agent.socket)).emit_event("hw", b"\x01\x02")
        after = agent.machine.registers().rtmrs[3]
        last = RuntimeEventLog(agent.machine.paths.runtime_log).read()[-1]
        assert (last.event, last.payload) == ("hw", b"\x01\x02")
        assert after == extend(before, last.digest)

    def test_no_report_entries_left_behind(self, agent):
        """Every request removes its configfs-tsm report entry."""
        client = DstackClient(str(agent.socket))
        for i in range(5):
            client.get_quote(bytes([i]))
        assert agent.machine.entries() == []

    def test_large_quote_is_read_whole(self, agent):
        """A quote over 8 KiB (as DICE quotes are) comes back whole through the API."""
        agent.machine.set_outblob_size(20_000)
        try:
            quote = DstackClient(str(agent.socket)).get_quote(b"big").decode_quote()
        finally:
            agent.machine.clear_faults()
        assert len(quote) == 20_000
        assert TdxQuote.from_bytes(quote).report_data.startswith(b"big")


@pytest.fixture(scope="module")
def fault_agent() -> Iterator[FakeTdxAgent]:
    """A tdx agent for fault injection (short commit timeout)."""
    yield from _fake_agent(commit_timeout="0.3")


Setup = Callable[[FakeTdxMachine], None]

QUOTE_FAULTS: list[tuple[str, Setup, int, str, str]] = [
    ("outblob-EBUSY", lambda m: m.inject("outblob", errno.EBUSY), 503, "platform_busy", "busy"),
    ("outblob-EAGAIN", lambda m: m.inject("outblob", errno.EAGAIN), 503, "platform_busy", "busy"),
    ("outblob-EIO", lambda m: m.inject("outblob", errno.EIO), 500, "platform_error", "(EIO"),
    ("outblob-ETIMEDOUT", lambda m: m.inject("outblob", errno.ETIMEDOUT), 500, "platform_error",
     "did not answer"),
    ("outblob-EINTR", lambda m: m.inject("outblob", errno.EINTR), 500, "platform_error",
     "interrupted"),
    ("outblob-EINVAL", lambda m: m.inject("outblob", errno.EINVAL), 500, "platform_error",
     "(EINVAL"),
    ("outblob-ENOMEM", lambda m: m.inject("outblob", errno.ENOMEM), 500, "platform_error",
     "out of memory"),
    ("outblob-too-big", lambda m: m.set_outblob_size(40_000), 500, "platform_error", "(EFBIG"),
    ("empty-outblob", lambda m: m.empty_outblob(), 500, "platform_error", "empty quote"),
    ("no-provider", lambda m: m.set_provider(None), 500, "platform_error",
     "no TEE quote provider"),
    ("wrong-provider", lambda m: m.set_provider("sev_guest"), 500, "platform_error",
     "not 'tdx_guest'"),
    ("mkdir-EACCES", lambda m: m.inject("mkdir", errno.EACCES), 500, "platform_error",
     "must run as root"),
    ("commit-dropped", lambda m: m.inject("commit", errno.EBUSY), 503, "platform_busy",
     "did not commit"),
    ("writer-races", lambda m: m.race("inblob", 3), 503, "platform_busy", "raced"),
    ("generation-EIO", lambda m: m.inject("generation", errno.EIO), 500, "platform_error",
     "generation"),
]

EXTEND_FAULTS: list[tuple[str, Setup, int, str, str]] = [
    ("extend-ENXIO", lambda m: m.inject("extend", errno.ENXIO), 500, "platform_error",
     "rejected the extend"),
    ("extend-EBUSY", lambda m: m.inject("extend", errno.EBUSY), 503, "platform_busy", "busy"),
    ("extend-EIO", lambda m: m.inject("extend", errno.EIO), 500, "platform_error",
     "failed the extend"),
    ("extend-EINVAL", lambda m: m.inject("extend", errno.EINVAL), 500, "platform_error",
     "48 bytes"),
    ("registers-read-only", lambda m: m.set_registers_writable(False), 500, "platform_error",
     "read-only"),
    ("register-read-EIO", lambda m: m.inject("rtmr_read", errno.EIO), 500, "platform_error",
     "(EIO"),
]


class TestLiveFaults:
    def _after(self, proc: FakeTdxAgent) -> None:
        proc.machine.clear_faults()
        assert proc.proc is not None and proc.proc.poll() is None, proc.output()
        status, body = proc.call("EmitEvent", {"event": "still-serving", "payload": "00"})
        assert status == 200, body
        quote = _quote_consistent(proc)
        assert quote.report.rtmrs == proc.machine.registers().rtmrs
        assert proc.machine.entries() == []

    @pytest.mark.parametrize(
        ("setup", "status", "code", "fragment"),
        [pytest.param(*case[1:], id=case[0]) for case in QUOTE_FAULTS],
    )
    def test_quote_fault_gives_clear_error(self, fault_agent, setup, status, code, fragment):
        """An injected quote failure answers a clear JSON error; the agent keeps serving."""
        setup(fault_agent.machine)
        try:
            got_status, body = fault_agent.call("GetQuote", {"report_data": "01"})
            assert (got_status, body["code"]) == (status, code), body
            assert body["error"].startswith("TDX quote failed: ") and fragment in body["error"]
        finally:
            self._after(fault_agent)

    @pytest.mark.parametrize(
        ("setup", "status", "code", "fragment"),
        [pytest.param(*case[1:], id=case[0]) for case in EXTEND_FAULTS],
    )
    def test_extend_fault_gives_clear_error(self, fault_agent, setup, status, code, fragment):
        """An injected extend failure answers a clear JSON error and logs nothing."""
        log = RuntimeEventLog(fault_agent.machine.paths.runtime_log)
        before = log.read()
        setup(fault_agent.machine)
        try:
            got_status, body = fault_agent.call("EmitEvent", {"event": "doomed", "payload": ""})
            assert (got_status, body["code"]) == (status, code), body
            assert fragment in body["error"]
            assert log.read() == before and log.pending() == ()
        finally:
            self._after(fault_agent)

    def test_attest_and_info_fail_cleanly_too(self, fault_agent):
        """Attest and Info report the kernel's failure the same way."""
        fault_agent.machine.inject("outblob", errno.EIO, times=2)
        try:
            for method in ("Attest", "Info"):
                status, body = fault_agent.call(method, {"report_data": ""} if method == "Attest" else {})
                assert status == 500 and "GetQuote" in body["error"], body
        finally:
            self._after(fault_agent)

    def test_single_race_is_retried_transparently(self, fault_agent):
        """One racing writer costs a retry with a fresh entry, not an error."""
        fault_agent.machine.race("inblob", 1)
        fault_agent.machine.race("outblob", 1)
        try:
            quote = _quote_consistent(fault_agent)
            assert quote.report_data == bytes(64)
        finally:
            self._after(fault_agent)


class TestQuoteQueue:
    def test_full_queue_answers_platform_busy_at_once(self):
        """With quote_queue=1 and a slow quote service, concurrent GetQuotes beyond the one
        served and the one waiting get 503 platform_busy before the first quote is done;
        the agent then serves normally."""
        for proc in _fake_agent(quote_queue="1"):
            proc.machine.defer_commit(30)  # about 0.3 s per quote
            results: list[tuple[int, str, float]] = []
            start = time.monotonic()

            def ask(n: int) -> None:
                body = json.dumps({"report_data": f"{n:02x}"}).encode()
                status, _, raw = uds_request(proc.socket, "POST", "/GetQuote", body)
                code = json.loads(raw).get("code", "") if status != 200 else ""
                results.append((status, code, time.monotonic() - start))

            threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            served = sorted(t for status, _, t in results if status == 200)
            busy = [t for status, code, t in results if (status, code) == (503, "platform_busy")]
            assert len(served) + len(busy) == 8, results
            assert 1 <= len(served) <= 2 and busy
            assert max(busy) < served[0], results
            proc.machine.defer_commit(0)
            _quote_consistent(proc)
            assert proc.machine.entries() == []


def _read_log_names(path: Path) -> list[str]:
    return [e.event for e in RuntimeEventLog(path).read()]


def _stream(socket: Path, prefix: str, attempted: list[str], acked: list[str]) -> None:
    """EmitEvent in a loop until the agent stops answering."""
    for i in range(100_000):
        name = f"{prefix}-{i}"
        attempted.append(name)
        body = json.dumps({"event": name, "payload": f"{i:08x}"}).encode()
        try:
            status, _, _ = uds_request(socket, "POST", "/EmitEvent", body, timeout=10)
        except (OSError, IndexError, ValueError):  # refused, reset, or cut mid-response
            return
        if status != 200:
            return
        acked.append(name)


def _kill_loop(proc: AgentProcess, log_path: Path, *, machine: FakeTdxMachine | None) -> str:
    """KILL_ROUNDS SIGKILLs during EmitEvent streams; every restart must replay exactly."""
    rng = random.Random(20261129)
    attempted: list[str] = []
    acked: list[str] = []
    proc.start()
    boot_names = _read_log_names(log_path)
    for round_no in range(KILL_ROUNDS):
        thread = threading.Thread(
            target=_stream, args=(proc.socket, f"r{round_no}", attempted, acked), daemon=True
        )
        crash_point = None
        if machine is not None and round_no % 5 == 4:
            crash_point = rng.choice(["before_extend", "after_extend"])
            machine.crash(crash_point)
        thread.start()
        if crash_point is None:
            time.sleep(rng.uniform(0.0, 0.06))
            proc.kill()
        else:
            assert proc.proc is not None
            proc.proc.wait(timeout=20)
            assert proc.proc.returncode == -9, proc.output()
        thread.join(timeout=20)
        proc.start()  # start-up recovery runs here; it raises on an irreparable log
        quote = _quote_consistent(proc)
        names = _read_log_names(log_path)
        runtime = RuntimeEventLog(log_path)
        assert runtime.pending() == ()
        assert runtime.replay() == quote.report.rtmr3
        if machine is not None:
            assert machine.registers().rtmrs[3] == quote.report.rtmr3
        assert names[: len(boot_names)] == boot_names
        emitted = names[len(boot_names):]
        assert emitted == [n for n in attempted if n in set(emitted)]  # in order, no strays
        assert set(acked) <= set(emitted)  # nothing acknowledged was lost
    proc.stop()
    return proc.output()


class TestCrashDurability:
    def test_sigkill_during_emit_stream_tdx(self):
        """50 SIGKILLs (some exactly before/after the extend) never break the log on tdx."""
        workdir = short_tempdir("ftdx")
        try:
            machine = FakeTdxMachine.create(workdir / "tree")
            proc = machine.agent(workdir=workdir)
            output = _kill_loop(proc, machine.paths.runtime_log, machine=machine)
            assert "recovered after a crash: committed" in output
            assert "recovered after a crash: discarded" in output
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def test_sigkill_during_emit_stream_simulator(self):
        """50 SIGKILLs at random points never break the simulator's log either."""
        proc = AgentProcess("simulator")
        try:
            _kill_loop(proc, proc.state_dir / "runtime_events.log", machine=None)
        finally:
            if proc.proc is not None:
                proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)
