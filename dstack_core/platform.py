"""The platform façade: the only code that calls ``pm.hook``.

It gives the rest of the core a typed, async API over the synchronous hooks, runs each
hook in a worker thread (or inline on the event loop, for implementations marked
:func:`~dstack_core.hookspecs.nonblocking`), checks what comes back, and turns foreign exceptions into
:class:`~dstack_core.errors.PlatformError` so a plugin bug becomes a clean 500 with its
traceback in the log rather than an unexplained crash.

What a client sees of a plugin bug is generic: the hook's name and a stable code, never the
exception's text (a driver message may carry paths or secrets). A hook that returns the
wrong type is described in the log by type and size only, never by value: the value may be
key material (``derive_root_key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import pluggy

from .errors import DstackError, InvalidRequest, PlatformError
from .eventlog import TdxEvent
from .hookspecs import NONBLOCKING_ATTR
from .types import (
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

__all__ = ["Platform", "RUNTIME_RTMR"]

RUNTIME_RTMR = 3

log = logging.getLogger(__name__)
T = TypeVar("T")

CallObserver = Callable[[str, float, bool], None]
"""Told ``(hook, seconds, succeeded)`` after every request-time hook call."""

_PLAIN_HOOKEXEC: Final = pluggy.PluginManager("probe")._inner_hookexec
"""What a plugin manager runs hooks with until tracing or call monitoring wraps it."""


class Platform:
    """Typed access to the one loaded platform plugin.

    Construct with :meth:`from_plugin_manager`; call :meth:`configure` once before use and
    :meth:`close` at shutdown.
    """

    def __init__(self, pm: pluggy.PluginManager, info: PlatformInfo) -> None:
        self._pm = pm
        self.info = info
        self._inline = frozenset(
            name
            for name in pm.hook.__dict__
            if _all_nonblocking(pm.hook.__dict__[name].get_hookimpls())
        )
        self._observers: list[CallObserver] = []
        # Request-time hook calls now running: id -> (hook, monotonic start).
        self._in_flight: dict[int, tuple[str, float]] = {}
        self._call_ids = itertools.count()

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Platform:
        """Wrap a manager made by :func:`dstack_core.plugins.load_platform`."""
        info = cls._check("platform_info", _call_sync(pm, "platform_info"), PlatformInfo)
        return cls(pm, info)

    @property
    def name(self) -> str:
        return self.info.name

    # --- lifecycle (synchronous: start-up and shutdown happen outside the event loop) ---

    def configure(self, config: PlatformConfig) -> None:
        """Run every ``configure`` hook; errors propagate (start-up fails closed)."""
        _call_sync(self._pm, "configure", config=config)

    def close(self) -> None:
        """Run every ``unconfigure`` hook, logging (not raising) failures."""
        try:
            _call_sync(self._pm, "unconfigure")
        except DstackError as exc:
            log.warning("platform %s failed to unconfigure: %s", self.name, exc)

    def derive_root_key_sync(self) -> RootKey:
        return self._check("derive_root_key", _call_sync(self._pm, "derive_root_key"), RootKey)

    def read_measurements_sync(self) -> Measurements:
        return self._check(
            "read_measurements", _call_sync(self._pm, "read_measurements"), Measurements
        )

    def boot_event_log_sync(self) -> tuple[TdxEvent, ...]:
        return self._check_events(_call_sync(self._pm, "boot_event_log"))

    def trust_bundle_sync(
        self, state_dir: Path, options: Mapping[str, str] | None = None
    ) -> TrustBundle | None:
        """The platform's trust anchors, or None when it publishes none (no hook, or the
        hook answers None)."""
        if not self._pm.hook.trust_bundle.get_hookimpls():
            return None
        bundle = _call_sync(
            self._pm, "trust_bundle", state_dir=state_dir, options=dict(options or {})
        )
        return None if bundle is None else self._check("trust_bundle", bundle, TrustBundle)

    # --- request-time hooks (async, off the event loop) ---

    async def get_quote(self, report_data: bytes) -> Quote:
        _check_report_data(report_data)
        quote = self._check(
            "get_quote", await self._call("get_quote", report_data=report_data), Quote
        )
        return quote

    async def attest(self, report_data: bytes) -> PlatformEvidence:
        _check_report_data(report_data)
        return self._check(
            "attest", await self._call("attest", report_data=report_data), PlatformEvidence
        )

    async def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return self._check_events(await self._call("boot_event_log"))

    def _check_events(self, events: Any) -> tuple[TdxEvent, ...]:
        if not isinstance(events, tuple | list) or not all(
            isinstance(e, TdxEvent) for e in events
        ):
            raise self._bad_result("boot_event_log", events, "a tuple of TdxEvent")
        return events if isinstance(events, tuple) else tuple(events)

    async def read_measurements(self) -> Measurements:
        return self._check(
            "read_measurements", await self._call("read_measurements"), Measurements
        )

    async def extend_rtmr(self, digest: bytes) -> None:
        """Extend RTMR3 (the only register the core ever extends) by a 48-byte digest."""
        if len(digest) != RTMR_LENGTH:
            raise InvalidRequest(f"an RTMR digest is {RTMR_LENGTH} bytes, got {len(digest)}")
        await self._call("extend_rtmr", index=RUNTIME_RTMR, digest=digest)

    def extend_rtmr_many_sync(self, digests: Sequence[bytes]) -> None:
        """Extend RTMR3 by each digest in order: one ``extend_rtmr_many`` call when the
        platform has it, else ``extend_rtmr`` per digest. Blocking (call it off the loop).

        If it raises, a prefix of ``digests`` may have been applied; read the register.
        """
        for digest in digests:
            if len(digest) != RTMR_LENGTH:
                raise InvalidRequest(f"an RTMR digest is {RTMR_LENGTH} bytes, got {len(digest)}")
        if not digests:
            return
        if self._pm.hook.extend_rtmr_many.get_hookimpls():
            with self._tracked("extend_rtmr_many"):
                _call_sync(
                    self._pm, "extend_rtmr_many", index=RUNTIME_RTMR, digests=tuple(digests)
                )
            return
        for digest in digests:
            with self._tracked("extend_rtmr"):
                _call_sync(self._pm, "extend_rtmr", index=RUNTIME_RTMR, digest=digest)

    # --- plumbing ---

    def add_call_observer(self, observer: CallObserver) -> None:
        """Have ``observer`` told the duration and outcome of every request-time hook call
        (metrics). Observers must be cheap and must not raise."""
        self._observers.append(observer)

    def stalled_call(self) -> tuple[str, float] | None:
        """The oldest request-time hook call still running, ``(hook, seconds so far)``, or
        None when none is. A hook that hangs (a wedged kernel interface) shows here."""
        # Called from the watchdog's thread: take a snapshot first (atomic under the GIL).
        running = tuple(self._in_flight.values())
        if not running:
            return None
        hook, started = min(running, key=lambda item: item[1])
        return hook, time.monotonic() - started

    async def _call(self, hook: str, **kwargs: Any) -> Any:
        # As _tracked, written out: this is on every quote's path.
        call_id = next(self._call_ids)
        started = time.monotonic()
        self._in_flight[call_id] = (hook, started)
        succeeded = False
        try:
            if hook in self._inline:
                result = _call_sync(self._pm, hook, **kwargs)
            else:
                result = await asyncio.to_thread(_call_sync, self._pm, hook, **kwargs)
            succeeded = True
            return result
        finally:
            self._finished(call_id, hook, started, succeeded)

    @contextlib.contextmanager
    def _tracked(self, hook: str) -> Iterator[None]:
        """Shown by :meth:`stalled_call` while it runs, told to the observers after."""
        call_id = next(self._call_ids)
        started = time.monotonic()
        self._in_flight[call_id] = (hook, started)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            self._finished(call_id, hook, started, succeeded)

    def _finished(self, call_id: int, hook: str, started: float, succeeded: bool) -> None:
        del self._in_flight[call_id]
        elapsed = time.monotonic() - started
        for observer in self._observers:
            observer(hook, elapsed, succeeded)

    @classmethod
    def _check(cls, hook: str, value: Any, expected: type[T]) -> T:
        if not isinstance(value, expected):
            raise cls._bad_result(hook, value, expected.__name__)
        return value

    @staticmethod
    def _bad_result(hook: str, value: Any, expected: str) -> PlatformError:
        log.error("platform hook %s returned %s, expected %s", hook, _describe(value), expected)
        return PlatformError(
            f"platform hook {hook} returned {type(value).__name__}, expected {expected}",
            code="platform_contract_violation",
        )


def _all_nonblocking(impls: Sequence[pluggy.HookImpl]) -> bool:
    return bool(impls) and all(getattr(i.function, NONBLOCKING_ATTR, False) for i in impls)


def _describe(value: Any) -> str:
    """A value's type and size, never its content."""
    try:
        size = f" of length {len(value)}"
    except TypeError:
        size = ""
    return f"a {type(value).__name__}{size}"


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_LENGTH:
        raise InvalidRequest(f"report data must be {REPORT_DATA_LENGTH} bytes here")


def _hook(pm: pluggy.PluginManager, hook: str) -> Callable[..., Any]:
    """The hook, or its one plain implementation itself: pluggy's dispatch costs several
    microseconds per call, a measurable part of a simulated quote. A plugin manager that
    traces or monitors its calls (``DSTACK_TRACE_PLUGINS=1``, ``add_hookcall_monitoring``)
    always goes through pluggy."""
    caller = getattr(pm.hook, hook)
    impls = caller.get_hookimpls()
    plain = pm._inner_hookexec is _PLAIN_HOOKEXEC
    if not plain or len(impls) != 1 or impls[0].hookwrapper or impls[0].wrapper:
        return caller  # type: ignore[no-any-return]
    function, names = impls[0].function, impls[0].argnames
    return lambda **kwargs: function(**{name: kwargs[name] for name in names})


def _call_sync(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> Any:
    try:
        result = _hook(pm, hook)(**kwargs)
    except DstackError:
        raise
    except Exception as exc:
        # The text stays in the log: a driver's message may hold paths or secrets.
        log.exception("platform hook %s raised an unexpected exception", hook)
        raise PlatformError(f"platform hook {hook} failed") from exc
    if inspect.isawaitable(result):
        # pluggy has no async hooks; a coroutine would be silently taken as the answer.
        if inspect.iscoroutine(result):
            result.close()
        raise PlatformError(
            f"platform hook {hook} returned an awaitable; hook implementations are synchronous",
            code="platform_contract_violation",
        )
    return result
