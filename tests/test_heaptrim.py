"""The idle heap trim: when it trims (CPU clock), that glibc's ``malloc_trim`` really gives
freed heap holes back, and that a serving agent trims once it goes idle."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from dstack_core.server.heaptrim import HeapTrimmer
from dstack_core.testing import AgentProcess, short_tempdir


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


glibc_only = pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")


class Clock:
    """CPU seconds the test hands out."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def trimmer(clock: Clock, idle_checks: int = 1) -> HeapTrimmer:
    return HeapTrimmer(lambda: 1, interval=0.5, idle_cpu=0.01, idle_checks=idle_checks,
                       busy_cpu=0.2, clock=clock)


class TestWhen:
    def test_busy_then_idle_trims_once(self):
        clock = Clock()
        t = trimmer(clock)
        clock.spend(0.3)
        assert not t.due()  # busy during this interval
        assert t.due()  # then an idle interval
        t.trimmed()
        assert not t.due() and not t.due()  # idle on: nothing new to give back

    def test_only_after_idle_intervals_in_a_row(self):
        """A pause within a burst does not trim; a long enough quiet does, once."""
        clock = Clock()
        t = trimmer(clock, idle_checks=3)
        clock.spend(0.3)
        assert [t.due(), t.due(), t.due()] == [False, False, False]  # busy, idle, idle
        clock.spend(0.05)  # the burst goes on
        assert [t.due(), t.due(), t.due(), t.due()] == [False, False, False, True]
        t.trimmed()
        assert not any(t.due() for _ in range(10))

    def test_never_while_busy(self):
        clock = Clock()
        t = trimmer(clock)
        for _ in range(20):
            clock.spend(0.05)  # a steady trickle of 10% CPU
            assert not t.due()

    def test_a_little_work_is_not_worth_a_trim(self):
        clock = Clock()
        t = trimmer(clock)
        clock.spend(0.3)
        t.due()
        assert t.due()
        t.trimmed()
        clock.spend(0.15)  # below busy_cpu since the trim
        assert not t.due()
        assert not t.due()
        clock.spend(0.1)
        assert not t.due()  # now enough, but this interval was busy
        assert t.due()

    def test_the_trims_own_cpu_does_not_count(self):
        clock = Clock()
        t = trimmer(clock)
        clock.spend(0.3)
        t.due()
        assert t.due()
        clock.spend(0.5)  # a slow trim
        t.trimmed()
        assert not t.due()

    def test_run_trims_in_a_thread_and_stops_when_unavailable(self):
        clock = Clock()
        calls: list[int] = []

        def trim() -> int:
            calls.append(1)
            raise AttributeError("no malloc_trim")

        t = HeapTrimmer(trim, interval=0.01, clock=clock)
        clock.spend(1.0)
        asyncio.run(asyncio.wait_for(t.run(), 5))  # returns: trimming is unavailable
        assert calls == [1]
        assert t.trims == 0


@glibc_only
def test_malloc_trim_returns_freed_heap_holes():
    """Megabyte buffers served from the heap (glibc's mmap threshold raised by one freed
    mapped block), pinned by blocks between them: freeing them leaves resident memory
    where it was; the trim gives most of it back. In a subprocess, with a heap of its own."""
    script = textwrap.dedent("""
        from dstack_core.server.heaptrim import _resident_kib, glibc_malloc_trim
        big = bytes(4 << 20); del big
        keep, bufs = [], []
        for _ in range(64):
            bufs.append(bytearray(1 << 20))
            keep.append(bytearray(200_000))
        bufs.clear()
        freed = _resident_kib()
        glibc_malloc_trim()
        print(freed, _resident_kib())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    freed, trimmed = map(int, out.split())
    assert freed - trimmed > 32 * 1024, (freed, trimmed)


@glibc_only
def test_for_this_libc_on_glibc():
    assert HeapTrimmer.for_this_libc() is not None


@glibc_only
def test_serving_agent_trims_when_idle():
    """A real agent, after answers carrying its log, trims its heap once left idle."""
    workdir = short_tempdir("trim")
    agent = AgentProcess("simulator", workdir=workdir, extra_args=["--debug"]).start()
    try:
        for n in range(50):
            status, _ = agent.call("EmitEvent", {"event": f"e{n}", "payload": "00"})
            assert status == 200
        for _ in range(100):
            assert agent.call("GetQuote", {"report_data": "00"})[0] == 200
        deadline = time.monotonic() + 20
        while "heap trimmed" not in agent.output():
            assert time.monotonic() < deadline, agent.output()[-2000:]
            time.sleep(0.1)
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
