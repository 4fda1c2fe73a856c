"""EmitEvent's commit path: group commit, size limits and in-process repair.

Concurrent EmitEvents share their durable writes. Each call validates its event, reserves
room for it under the :class:`EventLimits`, queues it and waits; one committer task takes
everything queued as a batch and

1. writes the batch ahead (:meth:`RuntimeEventLog.write_ahead`: one write, one fdatasync);
2. adds it to the :class:`~dstack_core.measured.MeasuredLog`, then extends RTMR3 with each
   digest in order (:meth:`Platform.extend_rtmr_many_sync`); a quote that carries any of the new
   register values finds the log that replays to it;
3. appends the events the register holds to the log (one write, one fdatasync) and only
   then acknowledges them;
4. clears the write-ahead record (not durable: recovery recognises a stale one).

Faults: a failed write-ahead changes nothing (503 ``storage_error``, the next call tries
again). A failed extension is settled by reading RTMR3 back: the events it holds are
kept, the others answered with the platform's error. A failed append leaves events that
are measured and written ahead but not in the log: their callers get 503
``storage_error`` (such an event may still be recorded), every further EmitEvent is
refused with 503 until the committer, retrying with back-off, has appended them. Each
incident is logged once when it starts and once when it is over. Quotes stay consistent
throughout, because they are cut by the register they carry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final, Literal

import attrs

from .errors import DstackError, EventLogFull, PlatformBusy, PlatformError, StorageError
from .eventlog import LogBatch, RuntimeEvent, RuntimeEventLog
from .measured import MeasuredLog
from .platform import Platform
from .statefile import is_storage_fault, storage_error

__all__ = ["EventJournal", "EventLimits", "MAX_BATCH"]

log = logging.getLogger(__name__)

MAX_BATCH: Final = 1024
"""Most events committed in one batch (one write-ahead record, one append)."""
GATHER_TURNS: Final = 4
"""Event-loop turns the committer yields, at most, before taking a batch."""
RETRY_FIRST: Final = 0.05
RETRY_MAX: Final = 5.0
"""Back-off bounds, in seconds, while the committer waits for storage or the register."""


@attrs.frozen(kw_only=True)
class EventLimits:
    """Size limits of runtime events and of the runtime log (docs/api.md, EmitEvent).

    :ivar name: longest event name, in UTF-8 bytes (400 ``invalid_event``).
    :ivar payload: longest payload, in bytes (413 ``event_payload_too_large``).
    :ivar events: most lines the log may hold, boot events included (409 ``event_log_full``).
    :ivar size: most bytes the log file may hold, boot events included (409 as well).
    """

    name: int = 256
    payload: int = 64 * 1024
    events: int = 20_000
    size: int = 4 * 1024 * 1024


@attrs.frozen
class _Outcome:
    """Which step of the protocol failed for a batch (None: none did), and how."""

    failed: Literal["write-ahead", "extend", "append"] | None
    error: BaseException | None


@attrs.define
class _Pending:
    event: RuntimeEvent
    size: int
    future: asyncio.Future[None]


def _retrieve(future: asyncio.Future[None]) -> None:
    # The caller may have hung up; its answer is then read here, not reported as lost.
    if not future.cancelled():
        future.exception()


def _answer(items: Sequence[_Pending], error: BaseException | None) -> None:
    for item in items:
        if not item.future.done():
            if error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(error)


class EventJournal:
    """The only writer of the runtime log and of RTMR3 while the agent serves.

    :param platform: the platform, for extending and reading RTMR3.
    :param log: the durable log.
    :param view: the in-memory log quotes are cut from; holds what ``log`` holds.
    :param size: the log file's size in bytes (its complete lines).
    :param repair: an append start-up recovery could not make durable, or None.
    :param limits: the size limits.
    """

    def __init__(
        self,
        *,
        platform: Platform,
        log: RuntimeEventLog,
        view: MeasuredLog,
        size: int,
        repair: LogBatch | None = None,
        limits: EventLimits = EventLimits(),  # noqa: B008 (frozen value)
    ) -> None:
        self._platform = platform
        self._log = log
        self._view = view
        self.limits = limits
        self._position = view.count - (len(repair.events) if repair else 0)
        self._offset = repair.offset if repair else size
        self._extended = view.count
        self._used_events = view.count
        self._used_size = size
        self._startup_repair = repair
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._refusal: DstackError | None = None
        self._write_ahead_fault = False
        self.extending = asyncio.Lock()
        """Held while RTMR3 is being extended: quotes that cannot be matched to the log
        by the register they carry (evidence that is not a TDX quote) take it."""

    @property
    def extended(self) -> int:
        """Runtime events RTMR3 is known to hold (the appended ones and a batch in flight
        once its extension returned)."""
        return self._extended

    def start(self) -> None:
        """Start the committer (and a start-up repair); idempotent. Needs a running loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="committer")

    async def close(self) -> None:
        """Stop the committer. What is written ahead stays for start-up recovery."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        _answer(self._queue, PlatformBusy("the agent is shutting down"))
        self._queue.clear()

    async def emit(self, event: RuntimeEvent) -> None:
        """Record ``event``: measured into RTMR3 and durable in the log when this returns.

        :raises EventLogFull: no room left in the log (nothing was measured).
        :raises StorageError: the state directory failed (see the module docstring).
        :raises DstackError: the platform's error when the extension failed.
        """
        if self._refusal is not None:
            raise self._refusal
        size = len(event.to_log_line())
        if (
            self._used_events + 1 > self.limits.events
            or self._used_size + size > self.limits.size
        ):
            raise EventLogFull(
                f"the runtime event log is full ({self.limits.events} events or "
                f"{self.limits.size} bytes); no more events can be recorded until the "
                "machine is restarted"
            )
        self.start()
        assert self._wakeup is not None
        item = _Pending(event, size, asyncio.get_running_loop().create_future())
        item.future.add_done_callback(_retrieve)
        self._used_events += 1
        self._used_size += size
        self._queue.append(item)
        self._wakeup.set()
        # A client that hangs up does not take its event out of a batch in flight.
        await asyncio.shield(item.future)

    # --- the committer ---

    async def _run(self) -> None:
        assert self._wakeup is not None
        if self._startup_repair is not None:
            repair, self._startup_repair = self._startup_repair, None
            await self._make_durable(repair, [])
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._gather()
            while self._queue:
                items, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._commit(items)
                except asyncio.CancelledError:
                    _answer(items, PlatformBusy("the agent is shutting down"))
                    raise
                except Exception as exc:  # a bug: answer and keep the committer alive
                    log.exception("the event committer failed")
                    self._release(items)
                    _answer(items, exc)

    async def _gather(self) -> None:
        """Let requests that have already arrived join the batch: a few turns of the event
        loop, while the queue still grows. Costs no waiting when nothing else is ready."""
        for _ in range(GATHER_TURNS):
            queued = len(self._queue)
            await asyncio.sleep(0)
            if len(self._queue) == queued:
                return

    async def _commit(self, items: list[_Pending]) -> None:
        batch = LogBatch.at(self._position, self._offset, [i.event for i in items])
        # In the view before RTMR3 moves, so that a quote carrying a new value finds its log.
        self._view.extend(batch.events)
        async with self.extending:
            outcome = await asyncio.to_thread(self._write_extend_append, batch)
            if outcome.failed == "write-ahead":
                self._view.truncate(batch.position)
                self._release(items)
                assert isinstance(outcome.error, OSError)
                _answer(items, self._write_ahead_failed(outcome.error))
                return
            if self._write_ahead_fault:
                self._write_ahead_fault = False
                log.warning("the runtime event log's write-ahead record is writable again")
            extended = len(items)
            if outcome.failed == "extend":
                extended = await self._settle_failed_extend(batch, items, outcome.error)
            self._extended = batch.position + extended
        head = batch.head(extended)
        self._release(items[extended:])
        if outcome.failed is None:
            self._advance(head)
            _answer(items, None)
        elif head.events:
            failed_append = outcome.error if outcome.failed == "append" else None
            await self._make_durable(head, items[:extended], first_error=failed_append)
        else:
            self._log.clear_ahead()

    def _write_extend_append(self, batch: LogBatch) -> _Outcome:
        """The whole protocol for ``batch`` in one worker-thread call: which step failed."""
        try:
            self._log.write_ahead(batch)
        except OSError as exc:
            return _Outcome("write-ahead", exc)
        try:
            self._platform.extend_rtmr_many_sync([e.digest for e in batch.events])
        except Exception as exc:
            return _Outcome("extend", exc)
        try:
            self._append(batch)
        except Exception as exc:
            return _Outcome("append", exc)
        return _Outcome(None, None)

    async def _settle_failed_extend(
        self, batch: LogBatch, items: list[_Pending], exc: BaseException | None
    ) -> int:
        """After a failed extension, how many of the batch's events RTMR3 holds.

        Callers of events it does not hold are answered with the platform's error; while
        RTMR3 cannot be read back, EmitEvent is refused.
        """
        error = exc if isinstance(exc, DstackError) else PlatformError(
            f"extending RTMR3 failed: {type(exc).__name__}"
        )
        delay = RETRY_FIRST
        while (extended := await self._settle(batch)) is None:
            if self._refusal is None:
                log.error(
                    "RTMR3 cannot be read back after a failed extension; EmitEvent is "
                    "refused until it can"
                )
                self._refusal = PlatformBusy(
                    "the runtime measurement register is being reconciled after a failed "
                    "extension; retry later"
                )
                _answer(items, error)
                self._refuse_queued()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        if isinstance(self._refusal, PlatformBusy):
            log.warning("RTMR3 reconciled after a failed extension")
            self._refusal = None
        self._view.truncate(batch.position + extended)
        _answer(items[extended:], error)
        if extended:
            log.warning("extending RTMR3 failed after %d of %d events", extended, len(items))
        return extended

    async def _settle(self, batch: LogBatch) -> int | None:
        """How many of ``batch``'s events RTMR3 holds, or None while that cannot be known."""
        try:
            rtmr3 = (await self._platform.read_measurements()).rtmrs[3]
        except Exception:
            log.debug("reading RTMR3 back failed", exc_info=True)
            return None
        count = self._view.count_of(rtmr3)
        if count is None or not batch.position <= count <= batch.end_position:
            log.error("RTMR3 matches no prefix of the runtime log after a failed extension")
            return None
        return count - batch.position

    async def _make_durable(
        self, batch: LogBatch, items: list[_Pending], *, first_error: BaseException | None = None
    ) -> None:
        """Append ``batch`` and clear the record, retrying until it works; acknowledge
        ``items`` if the first attempt works, else answer them 503 at once.

        :param first_error: the failure of an attempt already made, if any.
        """
        delay = RETRY_FIRST
        error = first_error
        while True:
            if error is None:
                try:
                    await asyncio.to_thread(self._append, batch)
                    break
                except Exception as exc:
                    error = exc
            if not isinstance(self._refusal, StorageError):
                log.error(
                    "cannot append to the runtime event log %s: %s; %d measured event(s) "
                    "wait in %s, EmitEvent is refused until the append succeeds",
                    self._log.path, error, len(batch.events), self._log.wal_path,
                )
                what = "the runtime event log could not be written"
                self._refusal = (
                    storage_error(error, what) if isinstance(error, OSError)
                    else StorageError(what)
                )
                _answer(items, StorageError(
                    f"{self._refusal.message}; the event is measured and will be "
                    "appended once storage recovers, so it may still be recorded"
                ))
                self._refuse_queued()
            error = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        self._advance(batch)
        if isinstance(self._refusal, StorageError):
            log.warning("the runtime event log is writable again; %d event(s) appended",
                        len(batch.events))
            self._refusal = None
        _answer(items, None)

    def _append(self, batch: LogBatch) -> None:
        self._log.append(batch)
        self._log.clear_ahead()

    def _advance(self, batch: LogBatch) -> None:
        self._position, self._offset = batch.end_position, batch.end_offset

    # --- bookkeeping ---

    def _write_ahead_failed(self, exc: OSError) -> StorageError:
        if not self._write_ahead_fault:
            self._write_ahead_fault = True
            log.error("cannot write the runtime event log's write-ahead record %s: %s; "
                      "EmitEvent fails until it can", self._log.wal_path, exc)
        if not is_storage_fault(exc):
            log.debug("write-ahead failure", exc_info=True)
        return storage_error(exc, "the runtime event could not be recorded (nothing was measured)")

    def _release(self, items: Sequence[_Pending]) -> None:
        for item in items:
            self._used_events -= 1
            self._used_size -= item.size

    def _refuse_queued(self) -> None:
        assert self._refusal is not None
        queued, self._queue = self._queue, []
        self._release(queued)
        _answer(queued, self._refusal)
