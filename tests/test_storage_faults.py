"""Storage faults of the state directory, injected into a real agent: full, read-only,
forbidden and failing disks, and the fault removed again.

Each scenario runs on two disks: a tiny tmpfs (the real kernel fills up and goes
read-only; skipped where mounting is not allowed) and the fault-injecting file-system seam
of :mod:`dstack_core.testing.faultfs` (always). For each: every answer is the documented
JSON (503 ``storage_error``, no path and no exception text), quotes stay consistent (the
log returned replays to the quote's registers), no acknowledged event is lost, the agent
heals without a restart once the fault is gone, and it starts again with its state intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack_core.eventlog import RuntimeEventLog, events_from_json, replay_rtmrs
from dstack_core.quote import TdxQuote
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.testing.faultfs import FaultControl

HEAL_TIMEOUT = 30.0
LOG_NAME = "runtime_events.log"
TALLY: dict[str, int] = {"faults": 0, "requests": 0, "acknowledged": 0, "lost": 0, "quotes": 0}
"""Figures for docs/reliability.md (printed with DSTACK_FAULT_TALLY=1)."""


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class Disk:
    """A state directory whose storage a test can break and repair."""

    kind = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"

    def agent(self, workdir: Path) -> AgentProcess:
        return AgentProcess("simulator", workdir=workdir, state_dir=self.state_dir)

    def fill(self) -> None:
        """From now on, writes that need space fail (ENOSPC)."""
        raise NotImplementedError

    def read_only(self) -> None:
        raise NotImplementedError

    def repair(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TmpfsDisk(Disk):
    """A 2 MiB tmpfs: the kernel's own ENOSPC and EROFS."""

    kind = "tmpfs"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(root)],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.state_dir.mkdir()
        self.filler = root / "filler"

    def fill(self) -> None:
        with contextlib.suppress(OSError), self.filler.open("ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)

    def repair(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.root)], check=True)
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


class SeamAgent(AgentProcess):
    """An agent whose file system calls below ``root`` go through the fault seam."""

    def __init__(self, control: FaultControl, root: Path, **kwargs: Any) -> None:
        super().__init__("simulator", **kwargs)
        self.control, self.root = control, root

    @property
    def command(self) -> list[str]:
        command = super().command
        at = command.index("dstack_core.cli")
        return [*command[:at], "dstack_core.testing.faultfs", str(self.control.path),
                str(self.root), *command[at + 1:]]


class SeamDisk(Disk):
    """The fault-injecting seam: ENOSPC on appends to the log (the in-place write-ahead
    record and register file need no space), EROFS on everything."""

    kind = "seam"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.state_dir.mkdir(parents=True)
        self.control = FaultControl(root.parent / "faults.json")

    def agent(self, workdir: Path) -> AgentProcess:
        return SeamAgent(self.control, self.root, workdir=workdir, state_dir=self.state_dir)

    def fill(self) -> None:
        self.control.inject(errno.ENOSPC, LOG_NAME)

    def fail(self, code: int, *names: str) -> None:
        self.control.inject(code, *names)

    def read_only(self) -> None:
        self.control.inject(errno.EROFS)

    def repair(self) -> None:
        self.control.clear()


@pytest.fixture(params=["tmpfs", "seam"])
def disk(request: pytest.FixtureRequest) -> Iterator[Disk]:
    if request.param == "tmpfs" and not can_mount():
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    base = short_tempdir("sf")
    made: Disk = (TmpfsDisk if request.param == "tmpfs" else SeamDisk)(base / "disk")
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def seam() -> Iterator[SeamDisk]:
    base = short_tempdir("sf")
    try:
        yield SeamDisk(base / "disk")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[None]:
    yield
    if os.environ.get("DSTACK_FAULT_TALLY") == "1":
        print(f"\nstorage fault tally: {json.dumps(TALLY)}", file=sys.__stderr__)


# --- helpers ---


_TALLY_LOCK = threading.Lock()


def count(key: str, n: int = 1) -> None:
    with _TALLY_LOCK:
        TALLY[key] += n


def call(agent: AgentProcess, method: str, args: dict[str, Any] | None = None) -> tuple[int, Any]:
    count("requests")
    return agent.call(method, args or {})


def emit(agent: AgentProcess, name: str, payload: bytes = b"") -> tuple[int, Any]:
    status, body = call(agent, "EmitEvent", {"event": name, "payload": payload.hex()})
    count("acknowledged", status == 200)
    return status, body


def assert_storage_error(status: int, body: Any, disk: Disk) -> None:
    """A 503 storage_error whose message carries no path and no exception text."""
    assert (status, body.get("code")) == (503, "storage_error"), body
    message = body["error"]
    assert str(disk.root) not in message and "/" not in message
    assert "Errno" not in message and "Error:" not in message and "Traceback" not in message


def consistent_quote(agent: AgentProcess) -> tuple[TdxQuote, list[str]]:
    """A GetQuote whose log replays to its registers; the runtime event names."""
    status, body = call(agent, "GetQuote", {"report_data": "01"})
    assert status == 200, body
    quote = TdxQuote.from_bytes(bytes.fromhex(body["quote"]))
    events = events_from_json(body["event_log"])
    assert replay_rtmrs(events) == quote.report.rtmrs
    return quote, [e.event for e in events if e.imr == 3]


class QuoteWatcher:
    """Asks for quotes without pause from a second connection while a scenario runs, and
    checks every one: served (200) and its log replaying to its registers."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.checked = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = self.agent.call("GetQuote", {"report_data": "03"})
            except Exception as exc:  # a dead thread must not pass for a clean run
                self.failures.append(f"GetQuote failed: {exc!r}")
                return
            if status != 200:
                self.failures.append(f"GetQuote answered {status}: {body}")
                continue
            quote = TdxQuote.from_bytes(bytes.fromhex(body["quote"]))
            if replay_rtmrs(events_from_json(body["event_log"])) != quote.report.rtmrs:
                self.failures.append(f"quote {self.checked}: the log does not replay to RTMR3")
            self.checked += 1

    def __enter__(self) -> QuoteWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        count("quotes", self.checked)
        assert not self.failures, self.failures[:3]
        assert self.checked > 0


def wait_healed(agent: AgentProcess, name: str) -> None:
    deadline = time.monotonic() + HEAL_TIMEOUT
    while True:
        status, body = emit(agent, name)
        if status == 200:
            return
        assert (status, body.get("code")) == (503, "storage_error"), body
        assert time.monotonic() < deadline, "the agent did not heal without a restart"
        time.sleep(0.1)


def logged(disk: Disk) -> list[str]:
    return [e.event for e in RuntimeEventLog(disk.state_dir / LOG_NAME).read()]


def check_nothing_lost(disk: Disk, acknowledged: list[str]) -> None:
    names = logged(disk)
    missing = [n for n in acknowledged if n not in names]
    TALLY["lost"] += len(missing)
    assert not missing
    assert len(names) == len(set(names)), "an event was logged twice"


def restart(agent: AgentProcess) -> None:
    assert agent.stop() == 0, agent.output()
    agent.start()


@contextlib.contextmanager
def running(disk: Disk) -> Iterator[AgentProcess]:
    workdir = short_tempdir("sfa")
    agent = disk.agent(workdir).start()
    try:
        yield agent
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- scenarios ---


class TestFullDisk:
    def test_failed_append_is_repaired_in_process(self, disk: Disk) -> None:
        """Disk full after RTMR3 moved: 503 storage_error, EmitEvent refused until the
        append succeeds, quotes consistent throughout, healed without a restart, the
        incident logged once, nothing acknowledged lost, and the agent restarts."""
        with running(disk) as agent:
            with QuoteWatcher(agent):  # every quote, during the fault too
                acknowledged = []
                for i in range(3):
                    assert emit(agent, f"before-{i}")[0] == 200
                    acknowledged.append(f"before-{i}")
                disk.fill()
                TALLY["faults"] += 1
                failed = None
                for i in range(5000):
                    status, body = emit(agent, f"during-{i}")
                    if status == 200:
                        acknowledged.append(f"during-{i}")
                        continue
                    assert_storage_error(status, body, disk)
                    assert "may still be recorded" in body["error"]
                    failed = f"during-{i}"
                    break
                assert failed is not None, "the disk never filled up"
                for i in range(20):
                    started = time.monotonic()
                    status, body = emit(agent, f"refused-{i}")
                    assert_storage_error(status, body, disk)
                    assert time.monotonic() - started < 5
                _, names = consistent_quote(agent)
                assert failed in names  # measured, written ahead: quotes carry it
                for method in ("Info", "Attest"):
                    assert call(agent, method, {"report_data": "02"})[0] == 200
                disk.repair()
                wait_healed(agent, "after")
                acknowledged.append("after")
                _, names = consistent_quote(agent)
                assert names.count(failed) == 1 and not any(n.startswith("refused") for n in names)
                check_nothing_lost(disk, acknowledged)
                output = agent.output()
                assert output.count("cannot append to the runtime event log") == 1, output
                assert output.count("writable again") == 1
                assert "EmitEvent failed" not in output and "Traceback" not in output
            restart(agent)
            consistent_quote(agent)
            check_nothing_lost(disk, acknowledged)

    def test_failed_write_ahead_measures_nothing(self, disk: Disk) -> None:
        """When even the write-ahead record cannot be written, the event is refused with
        503 storage_error, RTMR3 does not move, and the next event works once healed."""
        with running(disk) as agent, QuoteWatcher(agent):
            before, names_before = consistent_quote(agent)
            if isinstance(disk, SeamDisk):
                disk.fail(errno.ENOSPC, LOG_NAME + ".wal")
            else:
                disk.fill()
            TALLY["faults"] += 1
            # A payload far larger than the record in place needs new space.
            status, body = emit(agent, "doomed", os.urandom(60_000))
            assert_storage_error(status, body, disk)
            assert "nothing was measured" in body["error"]
            after, names_after = consistent_quote(agent)
            assert after.report.rtmr3 == before.report.rtmr3 and names_after == names_before
            disk.repair()
            wait_healed(agent, "healed")
            assert "doomed" not in logged(disk)
            check_nothing_lost(disk, ["healed"])


    def test_concurrent_events_through_a_full_disk(self, disk: Disk) -> None:
        """Sixteen clients emit events while the disk fills up and is repaired: every
        event is acknowledged, refused with "nothing was measured", or refused with "may
        still be recorded"; the acknowledged and the measured ones all end up in the log
        (once each), the refused-unmeasured ones never; every quote replays throughout."""
        outcomes: dict[str, str] = {}
        stop = threading.Event()

        def client(agent: AgentProcess, k: int) -> None:
            i = 0
            while not stop.is_set():
                name = f"c{k}-{i}"
                i += 1
                status, body = emit(agent, name, b"\x02" * 200)
                if status == 200:
                    outcomes[name] = "acknowledged"
                    continue
                assert_storage_error(status, body, disk)
                if "nothing was measured" in body["error"]:
                    outcomes[name] = "unmeasured"
                elif "may still be recorded" in body["error"]:
                    outcomes[name] = "measured"
                else:  # refused at once while a measured event waits for its append
                    outcomes[name] = "refused"
                time.sleep(0.01)

        with running(disk) as agent:
            with QuoteWatcher(agent):
                threads = [threading.Thread(target=client, args=(agent, k), daemon=True)
                           for k in range(16)]
                for t in threads:
                    t.start()
                time.sleep(0.5)
                disk.fill()
                count("faults")
                deadline = time.monotonic() + 20
                while not {"measured", "unmeasured"} & set(outcomes.values()):
                    assert time.monotonic() < deadline, "no event ever failed"
                    time.sleep(0.05)
                time.sleep(0.5)  # let the clients run into the fault for a while
                disk.repair()
                wait_healed(agent, "healed")
                time.sleep(0.3)  # and again once it healed
                stop.set()
                for t in threads:
                    t.join(30)
                    assert not t.is_alive()
                wait_healed(agent, "final")  # nothing measured still waits for its append
            names = logged(disk)
            _, quoted = consistent_quote(agent)
        assert names == quoted  # the durable log is what quotes carry
        acknowledged = [n for n, o in outcomes.items() if o == "acknowledged"]
        check_nothing_lost(disk, [*acknowledged, "healed", "final"])
        assert [n for n, o in outcomes.items() if o == "measured" and n not in names] == []
        assert [n for n, o in outcomes.items() if o in ("unmeasured", "refused") and n in names] == []
        assert len(acknowledged) > 16


class TestReadOnly:
    def test_read_only_state_dir_serves_heals_and_starts(self, disk: Disk) -> None:
        """A state dir remounted read-only: EmitEvent 503, quotes 200; a restart while it
        is read-only still starts (state intact); writable again, EmitEvent works."""
        with running(disk) as agent:
            assert emit(agent, "kept")[0] == 200
            disk.read_only()
            TALLY["faults"] += 1
            try:
                assert_storage_error(*emit(agent, "refused"), disk)
                consistent_quote(agent)
                restart(agent)
                consistent_quote(agent)
                assert_storage_error(*emit(agent, "refused-again"), disk)
            finally:
                disk.repair()
            wait_healed(agent, "healed")
            check_nothing_lost(disk, ["kept", "healed"])
            assert "refused" not in logged(disk)


class TestSeamOnly:
    """Faults the tmpfs cannot produce: permission, I/O errors, one file at a time."""

    @pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
    def test_unwritable_state_dir(self, seam: SeamDisk, code: int) -> None:
        """An unwritable state dir refuses EmitEvent (nothing measured) and heals."""
        with running(seam) as agent, QuoteWatcher(agent):
            seam.fail(code)
            TALLY["faults"] += 1
            before, _ = consistent_quote(agent)
            assert_storage_error(*emit(agent, "refused"), seam)
            assert consistent_quote(agent)[0].report.rtmr3 == before.report.rtmr3
            seam.repair()
            wait_healed(agent, "healed")
            check_nothing_lost(seam, ["healed"])

    def test_io_error_on_append(self, seam: SeamDisk) -> None:
        """EIO while appending is repaired like a full disk."""
        with running(seam) as agent, QuoteWatcher(agent):
            seam.fail(errno.EIO, LOG_NAME)
            TALLY["faults"] += 1
            status, body = emit(agent, "eio")
            assert_storage_error(status, body, seam)
            assert "input-output error" in body["error"]
            consistent_quote(agent)
            seam.repair()
            wait_healed(agent, "healed")
            check_nothing_lost(seam, ["healed"])
            assert logged(seam).count("eio") == 1

    @pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
    def test_simulator_register_save_fault(self, seam: SeamDisk, code: int) -> None:
        """The simulator cannot save its register: 503 storage_error, RTMR3 and the log
        unchanged; after a clean stop, with or without the fault, the agent starts."""
        with running(seam) as agent:
            assert emit(agent, "kept")[0] == 200
            before, names = consistent_quote(agent)
            seam.fail(code, "simulator-machine.bin")
            TALLY["faults"] += 1
            for i in range(5):
                assert_storage_error(*emit(agent, f"unsaved-{i}"), seam)
            after, names_after = consistent_quote(agent)
            assert after.report.rtmr3 == before.report.rtmr3 and names_after == names
            assert agent.output().count("cannot save the simulated registers") == 1
            restart(agent)  # fault still there: the state is intact, so it starts
            assert consistent_quote(agent)[0].report.rtmr3 == before.report.rtmr3
            seam.repair()
            wait_healed(agent, "healed")
            restart(agent)
            consistent_quote(agent)
            check_nothing_lost(seam, ["kept", "healed"])

    def test_killed_while_repairing_starts_and_repairs(self, seam: SeamDisk) -> None:
        """SIGKILL while events wait for their append; restarted with the fault still on,
        the agent starts (not wedged), serves quotes with those events, refuses EmitEvent,
        and appends them as soon as the fault is gone."""
        with running(seam) as agent:
            seam.fill()
            TALLY["faults"] += 1
            assert_storage_error(*emit(agent, "pending"), seam)
            agent.stop(signal.SIGKILL)
            agent.start()
            _, names = consistent_quote(agent)
            assert "pending" in names and "pending" not in logged(seam)
            assert_storage_error(*emit(agent, "refused"), seam)
            assert "cannot repair the runtime event log" in agent.output()
            seam.repair()
            wait_healed(agent, "healed")
            assert logged(seam)[-2:] == ["pending", "healed"]
            check_nothing_lost(seam, ["healed"])


class TestLogLimits:
    def test_full_log_refuses_with_409_and_loses_nothing(self) -> None:
        """Events that do not fit in the 4 MiB log are refused with 409 event_log_full
        (nothing measured); everything acknowledged stays, quotes stay consistent, and a
        restarted agent still refuses."""
        workdir = short_tempdir("sfl")
        agent = AgentProcess("simulator", workdir=workdir).start()
        try:
            acknowledged = []
            big = os.urandom(64 * 1024)
            for i in range(200):
                status, body = emit(agent, f"big-{i}", big)
                if status != 200:
                    break
                acknowledged.append(f"big-{i}")
            assert (status, body["code"]) == (409, "event_log_full"), body
            consistent_quote(agent)
            for i in range(200):  # what is left still takes smaller events
                status, body = emit(agent, f"small-{i}", b"x" * 1000)
                if status != 200:
                    break
                acknowledged.append(f"small-{i}")
            assert (status, body["code"]) == (409, "event_log_full")
            tiny = 0  # the smallest event there is, until not even that fits
            while (status := emit(agent, "t")[0]) == 200:
                tiny += 1
            assert status == 409 and emit(agent, "t")[0] == 409
            log_path = agent.state_dir / LOG_NAME
            assert log_path.stat().st_size <= 4 * 1024 * 1024
            names = [e.event for e in RuntimeEventLog(log_path).read()]
            assert [n for n in acknowledged if n not in names] == []
            assert names.count("t") == tiny
            restart(agent)
            consistent_quote(agent)
            assert emit(agent, "after-restart")[0] == 409
        finally:
            agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    @pytest.mark.parametrize(
        ("payload", "status", "code"),
        [(64 * 1024, 200, None), (64 * 1024 + 1, 413, "event_payload_too_large")],
    )
    def test_payload_limit(self, agent: AgentProcess, payload: int, status: int, code: Any) -> None:
        """A payload of 64 KiB is accepted; one byte more is 413 event_payload_too_large."""
        got, body = emit(agent, "sized", b"\x01" * payload)
        assert got == status, body
        if code:
            assert body["code"] == code
