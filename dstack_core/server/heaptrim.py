"""Give the C heap's free pages back to the system once the agent goes idle (glibc only).

Answers of megabytes (GetQuote, Info, Attest and GetTlsKey carry the whole runtime log)
are buffers glibc serves from its heap once its dynamic mmap threshold has risen above
them; freed, they leave holes that glibc keeps, so resident memory stays at its peak.
``malloc_trim(0)`` hands the free pages of every arena back (``madvise``), holes
included. Fixing the mmap threshold instead would map and fault in every large answer
afresh, which costs long-log answers most of their rate (docs/performance.md), so the
heap is trimmed only when nobody is waiting: after the process has used CPU for a while
and then stayed (nearly) idle for a few check intervals in a row. Nothing on a request's path
changes; the check is a ``process_time`` reading per interval on the event loop, the trim
runs in a worker thread.

Elsewhere (musl, macOS) there is nothing to do, and :meth:`HeapTrimmer.for_this_libc`
returns None.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Final

__all__ = ["HeapTrimmer", "glibc_malloc_trim"]

log = logging.getLogger(__name__)

CHECK_INTERVAL: Final = 0.5
"""Seconds between idleness checks."""
IDLE_CPU: Final = 0.01
"""CPU seconds within one interval below which the agent counts as idle (2%)."""
IDLE_CHECKS: Final = 4
"""Idle intervals in a row before a trim (2 s): a pause within a burst of requests is
shorter, and a trim then would only make the burst's next large answers fault their
pages in again."""
BUSY_CPU: Final = 0.2
"""CPU seconds since the last trim after which the heap is worth trimming again: a few
requests' worth of garbage is not, and an idle agent must not trim over and over."""


def glibc_malloc_trim() -> int:
    """Call glibc's ``malloc_trim(0)``; returns its result (1 if memory was released).

    ctypes is imported here, not at start-up: only a trim needs it.
    """
    import ctypes

    libc = ctypes.CDLL(None)  # the process's own C library; ctypes releases the GIL
    return int(libc.malloc_trim(0))


def _resident_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Decides, one check per interval, when to trim, and trims.

    :param trim: what trims (:func:`glibc_malloc_trim`).
    :param clock: the process's CPU seconds (:func:`time.process_time`).
    """

    def __init__(
        self,
        trim: Callable[[], int],
        *,
        interval: float = CHECK_INTERVAL,
        idle_cpu: float = IDLE_CPU,
        idle_checks: int = IDLE_CHECKS,
        busy_cpu: float = BUSY_CPU,
        clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._trim = trim
        self.interval = interval
        self.idle_cpu = idle_cpu
        self.idle_checks = idle_checks
        self._idle_run = 0
        self.busy_cpu = busy_cpu
        self._clock = clock
        self._last_check = clock()
        self._since_trim = 0.0  # start-up's garbage counts too
        self.trims = 0

    @classmethod
    def for_this_libc(cls) -> HeapTrimmer | None:
        """A trimmer on glibc; None on any other C library (nothing to trim there)."""
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION")
        except (ValueError, OSError, AttributeError):
            return None
        return cls(glibc_malloc_trim) if libc and libc.startswith("glibc") else None

    def due(self) -> bool:
        """One check: True if the process was busy since the last trim and has been idle
        for ``idle_checks`` intervals in a row, this one included."""
        now = self._clock()
        self._idle_run = self._idle_run + 1 if now - self._last_check < self.idle_cpu else 0
        self._last_check = now
        return self._idle_run >= self.idle_checks and now - self._since_trim >= self.busy_cpu

    def trimmed(self) -> None:
        """Note a trim: its own CPU time does not count as work to trim after."""
        self._last_check = self._since_trim = self._clock()
        self._idle_run = 0
        self.trims += 1

    async def run(self) -> None:
        """Check every interval, trimming in a worker thread when due; runs until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            if not self.due():
                continue
            before = _resident_kib()
            try:
                await asyncio.to_thread(self._trim)
            except (OSError, AttributeError) as exc:  # no malloc_trim after all: stop trying
                log.debug("heap trim unavailable: %s", exc)
                return
            self.trimmed()
            log.debug("idle: heap trimmed, resident %.1f -> %.1f MB", before / 1024,
                      _resident_kib() / 1024)
