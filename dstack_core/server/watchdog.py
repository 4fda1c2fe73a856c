"""systemd's watchdog: ``WATCHDOG=1`` only while the agent really answers.

A thread of its own (so a blocked event loop cannot keep it alive) wakes every half
``WATCHDOG_USEC`` and runs a self-probe; only when the probe passes does it send
``WATCHDOG=1``. The probe fails, and the pings stop, when

* the API does not answer: ``GET /Version`` over the agent's own Unix socket gets no HTTP
  answer (or a 5xx) within half an interval (event loop blocked, listener gone, HTTP stack wedged); or
* a platform hook hangs: a call into the platform (a quote, a register read, an extend)
  has been running for longer than one interval, e.g. because the host's quote service
  stopped answering and every GetQuote, Attest and GetTlsKey now hangs with it.

systemd then restarts the agent after ``WatchdogSec``. Probing resumes every interval, so
an agent that recovers on its own (the hook returns) starts pinging again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..platform import Platform
from . import systemd

__all__ = ["Watchdog", "probe_unix_socket"]

log = logging.getLogger(__name__)

PROBE_REQUEST: Final = b"GET /Version HTTP/1.1\r\nHost: dstack\r\nConnection: close\r\n\r\n"
STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) ")
SERVER_ERROR: Final = 500
MIN_INTERVAL: Final = 0.05
PROBE_SHARE: Final = 0.5
"""The probe may use half an interval, so pings keep their cadence even when it is slow."""


def probe_unix_socket(path: Path, timeout: float) -> str | None:
    """``GET /Version`` over the Unix socket at ``path``; None if an HTTP answer below 500
    came within ``timeout`` seconds, else why not. (A caller policy may refuse the agent's
    own uid with 403: the API still answers, which is what the probe asks.)"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(PROBE_REQUEST)
            head = sock.recv(64)
    except TimeoutError:
        return f"the API did not answer within {timeout:g}s"
    except OSError as exc:
        return f"the API is not reachable: {exc.strerror or exc}"
    match = STATUS_LINE.match(head)
    if match is None or int(match[1]) >= SERVER_ERROR:
        return f"the API answered {head[:16]!r}"
    return None


class Watchdog:
    """Pings systemd every ``interval`` seconds while :meth:`probe` passes.

    :param probe_socket: the agent's own API socket, or None to probe the event loop only
        (an activated socket without a path).
    :param loop: the event loop serving the API.
    :param on_ping: called after each ``WATCHDOG=1`` (metrics).
    :param on_failure: called with the reason of each failed probe (metrics).
    """

    def __init__(
        self,
        *,
        interval: float,
        platform: Platform,
        loop: asyncio.AbstractEventLoop,
        probe_socket: Path | None,
        on_ping: Callable[[], None] = lambda: None,
        on_failure: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.interval = max(interval, MIN_INTERVAL)
        self._platform = platform
        self._loop = loop
        self._probe_socket = probe_socket
        self._on_ping = on_ping
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dstack-watchdog", daemon=True)
        self._failing: str | None = None

    def start(self) -> None:
        log.info("systemd watchdog: self-probe and WATCHDOG=1 every %.3gs", self.interval)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)

    def probe(self) -> str | None:
        """None when the agent answers and no platform call hangs, else the reason."""
        stalled = self._platform.stalled_call()
        if stalled is not None and stalled[1] > self.interval:
            hook, seconds = stalled
            return f"platform hook {hook} has not returned for {seconds:.1f}s"
        timeout = self.interval * PROBE_SHARE
        if self._probe_socket is not None:
            return probe_unix_socket(self._probe_socket, timeout)
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(timeout)
        except TimeoutError:
            return f"the event loop did not run within {timeout:g}s"
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            tick = time.monotonic()
            reason = self.probe()
            if self._stop.is_set():
                return
            if reason is None:
                systemd.notify("WATCHDOG=1")
                self._on_ping()
                if self._failing is not None:
                    log.warning("watchdog self-probe passes again; pinging systemd")
                self._failing = None
            else:
                self._on_failure(reason)
                if self._failing is None:
                    log.error("watchdog self-probe failed, withholding WATCHDOG=1: %s", reason)
                self._failing = reason
            self._stop.wait(max(0.0, tick + self.interval - time.monotonic()))
