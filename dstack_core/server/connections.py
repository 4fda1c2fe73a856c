"""Connection handling: timeouts, a cap on open connections, and accept() that survives.

aiohttp parses HTTP well, but a server built on ``loop.create_server`` keeps an idle
connection for an hour, has no deadline for a request head or body, no cap on connections,
and at the open-file limit logs every failed ``accept()`` with a traceback while clients
wait in the backlog. This module owns the listening sockets and each accepted connection.

Each connection is in one phase, with a deadline:

========  ==========================================  =====================================
phase     from                                        at the deadline
========  ==========================================  =====================================
idle      accept, or the end of the previous answer   closed quietly (``idle_timeout``)
head      the first byte of a request                 408 and closed (``header_timeout``)
body      the end of the head, until the last byte    408 and closed (``body_timeout``)
busy      the whole request is in                     none: the platform may be slow
========  ==========================================  =====================================

An answer the client does not read for ``send_timeout`` (its socket buffer stays full)
aborts the connection, whatever the phase.

At most ``max_connections`` connections are open. Beyond it, each new connection evicts
the one that has waited longest without a request being handled (an idle, slow or unread
connection), unless that one is in its first :data:`EVICTION_GRACE` seconds: then the new
connection is kept as well, up to the ceiling the open-file limit (RLIMIT_NOFILE) allows
after :data:`RESERVED_FDS` for the agent's own files. At the ceiling accepting waits, until
a connection may be evicted or one finishes. A client that sends its request promptly is
therefore served while others hold connections open, at worst after the connections queued
before it. ``accept()`` failing for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM)
evicts such a connection to free a descriptor and retries with exponential back-off from
:data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`.

Whatever an attacker does, the log grows by a bounded amount: each kind of event is logged
at most :data:`LOG_BURST` times a minute, the rest are counted in one summary line.

The HTTP layer's own answers (requests the parser rejects, an unknown ``Expect``) get the
JSON error shape here too, through :func:`~dstack_core.server.errors.http_layer_error`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import functools
import logging
import math
import resource
import socket
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from ..config import ConnectionLimits
from ..errors import MalformedHttp, RequestTimeout
from .codec import to_json_bytes
from .errors import (
    MAX_HEADER_FIELD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    error_response,
    http_exception_response,
    http_layer_error,
)

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "LOG_BURST",
    "RESERVED_FDS",
    "ConnectionManager",
    "ManagedRequestHandler",
    "ManagedSite",
    "connection_ceiling",
    "listening_sockets",
    "raise_open_file_limit",
]

log = logging.getLogger(__name__)

RESERVED_FDS: Final = 64
"""Descriptors kept free of client connections for the agent's own files and threads."""
MIN_CONNECTIONS: Final = 4
OPEN_FILES_WANTED: Final = 65536
"""The soft open-file limit the agent raises itself to, when the hard limit allows."""
BACKOFF_MIN: Final = 0.01
BACKOFF_MAX: Final = 1.0
ACCEPT_BATCH: Final = 32
"""Connections accepted per readiness event, so one listener cannot starve the loop."""
LISTEN_BACKLOG: Final = 4096
"""Connections the kernel queues for accept() (it caps this at net.core.somaxconn)."""
EVICTION_GRACE: Final = 0.25
"""Seconds a connection is safe from eviction after it connected or began a request: a
client sending its request promptly is never cut off, and evictions happen at most
``max_connections / EVICTION_GRACE`` times a second."""
LINGER_TIME: Final = 2.0
"""Seconds aiohttp keeps reading a body nobody wanted before closing (after an error)."""
LOG_WINDOW: Final = 60.0
INCIDENT_QUIET: Final = 2.0
"""Seconds without an accept() failure that end an incident (one line when it starts, one
a minute while it lasts, one when it ends)."""
LOG_BURST: Final = 3
# accept() errors that are about the resources of this host, not one connection.
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that concern one connection that already went away.
_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH}
)


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``, as far as the hard limit allows.

    The soft limit is often kept low (1024) for programs that use ``select()``; asyncio uses
    epoll, and every connection costs a descriptor. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit to %d: %s", target, exc)
    return soft


def connection_ceiling(fd_limit: int | None = None) -> float:
    """How many connections the open-file limit (the soft RLIMIT_NOFILE unless ``fd_limit``
    is given) allows after :data:`RESERVED_FDS`; infinite without a limit."""
    if fd_limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return math.inf
        fd_limit = soft
    return max(MIN_CONNECTIONS, fd_limit - RESERVED_FDS)


class _LogLimiter:
    """At most :data:`LOG_BURST` lines per kind of event and :data:`LOG_WINDOW`; the rest of
    a window's events of that kind become one summary line when it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # kind -> [window start, lines logged, events suppressed, level]
        self._windows: dict[str, list[Any]] = {}
        self._flush: asyncio.TimerHandle | None = None

    def log(self, kind: str, level: int, msg: str, *args: object) -> None:
        now = self._loop.time()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= LOG_WINDOW:
            if window is not None:
                self._summarise(kind, window)
            window = self._windows[kind] = [now, 0, 0, level]
        if window[1] < LOG_BURST:
            window[1] += 1
            log.log(level, msg, *args)
            return
        window[2] += 1
        log.debug(msg, *args)  # every one, for --debug
        if self._flush is None:
            self._flush = self._loop.call_at(window[0] + LOG_WINDOW, self.flush)

    def flush(self) -> None:
        """Summarise every window that has ended."""
        self._flush = None
        now = self._loop.time()
        for kind, window in list(self._windows.items()):
            if now - window[0] >= LOG_WINDOW:
                del self._windows[kind]
                self._summarise(kind, window)
        pending = [w[0] + LOG_WINDOW for w in self._windows.values() if w[2]]
        if pending:
            self._flush = self._loop.call_at(min(pending), self.flush)

    def close(self) -> None:
        """Summarise every window (at shutdown)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for kind, window in self._windows.items():
            self._summarise(kind, window)
        self._windows.clear()

    def _summarise(self, kind: str, window: list[Any]) -> None:
        start, _, suppressed, level = window
        if suppressed:
            log.log(level, "%d more %s events in %.0f s (not logged one by one)",
                    suppressed, kind, self._loop.time() - start)
            window[2] = 0


class _Phase(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    BUSY = "busy"
    LINGER = "linger"
    """The answer is out but the body was not read to its end; aiohttp drains or closes."""


def _raw_response(exc: RequestTimeout) -> bytes:
    body = to_json_bytes(exc.to_json())
    return (
        f"HTTP/1.1 {exc.http_status} Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


_HEAD_TIMEOUT_RESPONSE: Final = _raw_response(RequestTimeout("request head not received in time"))


class _BrokenBody(MalformedHttp, TimeoutError):
    """A body whose framing broke: it will never complete (a :class:`TimeoutError` to
    aiohttp, as :class:`~dstack_core.errors.RequestTimeout` is)."""


class ManagedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with phases, deadlines and JSON for its own errors.

    Created by :class:`ConnectionManager` for each accepted connection. It overrides the
    asyncio protocol callbacks and aiohttp's documented hooks (``handle_error``,
    ``finish_response``, ``log_access``, which aiohttp calls once per answer sent), and
    reads one private detail (the message queue, in :meth:`_check_body_framing`); tests pin
    each behaviour, so an aiohttp upgrade that changes them fails loudly.
    """

    __slots__ = (
        "_connections",
        "_deadline",
        "_payload",
        "_phase",
        "_request_start",
        "_stalled_at",
        "_timer",
        "evicted",
        "waiting_since",
    )

    def __init__(self, manager: web.Server, connections: ConnectionManager, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._phase = _Phase.IDLE
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None
        self._stalled_at: float | None = None
        self._request_start = b""
        self.evicted = False
        self.waiting_since = 0.0

    # --- phases -------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # fires first and re-arms for the later deadline (cheaper than cancel)
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _enter(self, phase: _Phase, timeout: float | None) -> float:
        """Enter ``phase`` with a deadline ``timeout`` seconds from now; returns now."""
        self._phase = phase
        now = self._loop.time()
        if timeout is None:
            self._deadline = math.inf
        else:
            self._deadline = now + timeout
            # Idle, wake up no later than a head's deadline would be: a request starting
            # then needs no earlier timer (no cancel and re-arm per request).
            self._arm(now + min(timeout, self._connections.limits.header_timeout))
        return now

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        limits = self._connections.limits
        if self._stalled_at is not None and now >= self._stalled_at + limits.send_timeout:
            self._connections.note("send_timeout", "closed a connection that read none of its "
                                   "answer for %g s", limits.send_timeout)
            self.transport.abort()
            return
        if now < self._deadline:
            self._arm(self._deadline)
        elif self._phase is _Phase.IDLE:
            self._connections.stats["idle_closed"] += 1
            self.force_close()
        elif self._phase is _Phase.HEAD:
            self._connections.note("header_timeout", "closed a connection that sent no "
                                   "complete request head in %g s", limits.header_timeout)
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
            self.force_close()
        elif self._phase is _Phase.BODY:
            self._connections.note("body_timeout", "closed a connection that sent no "
                                   "complete request body in %g s", limits.body_timeout)
            self._enter(_Phase.LINGER, None)
            assert self._payload is not None
            # The handler reading the body answers 408 (RequestTimeout is a TimeoutError, which
            # also ends aiohttp's draining of the body); the connection closes after it.
            self._payload.set_exception(RequestTimeout("request body not received in time"))
        if self._stalled_at is not None and self.transport is not None:
            self._arm(self._stalled_at + limits.send_timeout)

    def request_started(self, payload: StreamReader) -> None:
        """The head is parsed and a handler is about to run (called by the request factory)."""
        self._payload = payload
        if payload.is_eof():
            self._enter(_Phase.BUSY, None)
            self._connections.busy(self)
        else:
            self._enter(_Phase.BODY, self._connections.limits.body_timeout)
            payload.on_eof(self._body_received)

    def _body_received(self) -> None:
        if self._phase is _Phase.BODY:
            self._enter(_Phase.BUSY, None)
            self._connections.busy(self)
        elif self._phase is _Phase.LINGER:
            self._enter(_Phase.IDLE, self._connections.limits.idle_timeout)

    # --- asyncio protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.waiting(self, self._enter(_Phase.IDLE,
                                                    self._connections.limits.idle_timeout))

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._payload = None
        self._connections.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is _Phase.IDLE and data:
            self._request_start = data[:32]
            now = self._enter(_Phase.HEAD, self._connections.limits.header_timeout)
            self._connections.waiting(self, now)  # youngest again: a request is starting
        super().data_received(data)
        if phase is _Phase.BODY:
            self._check_body_framing()

    def _check_body_framing(self) -> None:
        # aiohttp's C parser queues broken framing inside a body (a bad chunk size) as the
        # next message, while the handler waits for the rest of the body forever. Hand the
        # error to the body's reader instead; the endpoint answers it and closes.
        messages = self._messages
        error = messages[-1][0] if messages else None
        if isinstance(error, _ErrInfo) and self._payload is not None:
            messages.pop()
            self._payload.set_exception(_BrokenBody(http_layer_error(error.exc).message))

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stalled_at = self._loop.time()
        self._arm(self._stalled_at + self._connections.limits.send_timeout)
        self._connections.waiting(self, self._stalled_at)  # reads nothing: may be evicted

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled_at = None
        if self._phase is _Phase.BUSY:
            self._connections.busy(self)

    # --- aiohttp extension points -------------------------------------------------------

    def log_access(self, request: BaseRequest, response: web.StreamResponse,
                   time: float | None) -> None:
        # Called once per answer, after its last byte was handed to the transport.
        payload, self._payload = self._payload, None
        if payload is not None and not payload.is_eof():
            now = self._enter(_Phase.LINGER, None)
        else:
            now = self._enter(_Phase.IDLE, self._connections.limits.idle_timeout)
        self._connections.waiting(self, now)
        super().log_access(request, response, time)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse or handle: our JSON error."""
        error = http_layer_error(exc, self._request_start)
        if error.http_status >= 500:
            log.error("error handling a request", exc_info=exc)
        else:
            self._connections.note("rejected_http", "rejected a request the HTTP parser "
                                   "refused (%s): %s", type(exc).__name__, error.code)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; cannot send an error")
        response = error_response(error)
        response.force_close()
        return response

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # Not async itself: the caller awaits aiohttp's coroutine, one frame less per answer.
        if isinstance(resp, web.HTTPException):
            # Only the Expect handler raises outside the handlers.
            resp = http_exception_response(resp)
        return super().finish_response(request, resp, start_time)


class ConnectionManager:
    """Every listening socket and client connection of the agent, whichever app serves it:
    the cap and the open-file ceiling are for the whole process.

    :param limits: timeouts and the connection cap.
    :param fd_limit: the open-file limit to fit (default: the process's soft RLIMIT_NOFILE).

    Use :meth:`site` to serve an app's runner on a bound, listening socket.
    """

    def __init__(self, limits: ConnectionLimits, *, fd_limit: int | None = None) -> None:
        self.limits = limits
        self.ceiling = connection_ceiling(fd_limit)
        self.max_connections = int(min(limits.max_connections, self.ceiling))
        self.stats: collections.Counter[str] = collections.Counter()
        """How many of each event (``evicted``, ``header_timeout``, ...) so far."""
        self._loop = asyncio.get_running_loop()
        self._log = _LogLimiter(self._loop)
        self._open = 0  # accepted, not yet lost
        self._aborting = 0  # evicted, not yet lost
        # Connections with no request being handled, longest-waiting first (dicts keep order).
        self._waiting: dict[ManagedRequestHandler, None] = {}
        self._listeners: dict[socket.socket, web.Server] = {}
        self._at_cap = False
        self._cap_timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = 0.0
        self._incident: _AcceptIncident | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: set[web.Server] = set()
        log.info(
            "connection limits: %d open at most (newest briefly beyond, up to %g), timeouts "
            "idle %gs, head %gs, body %gs, send %gs", self.max_connections, self.ceiling,
            limits.idle_timeout, limits.header_timeout, limits.body_timeout, limits.send_timeout,
        )

    def site(self, runner: web.BaseRunner, sock: socket.socket) -> ManagedSite:
        """A site serving ``runner`` (set up) on ``sock`` (bound and listening)."""
        server = runner.server
        assert server is not None, "set the runner up first"
        if server not in self._servers:
            self._servers.add(server)
            factory = server.request_factory

            def request_factory(message: Any, payload: StreamReader, protocol: RequestHandler,
                                writer: Any, task: asyncio.Task[None]) -> BaseRequest:
                if isinstance(protocol, ManagedRequestHandler):
                    protocol.request_started(payload)
                return factory(message, payload, protocol, writer, task)

            server.request_factory = request_factory
        return ManagedSite(runner, sock, self)

    @property
    def open_connections(self) -> int:
        return self._open - self._aborting

    def note(self, kind: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        """Count and (rate-limited) log an event of ``kind``."""
        self.stats[kind] += 1
        self._log.log(kind, level, msg, *args)

    # --- bookkeeping called by the connections ------------------------------------------

    def waiting(self, conn: ManagedRequestHandler, now: float) -> None:
        """``conn`` has no request being handled (or stalls its answer) since ``now``:
        evictable, and the youngest."""
        waiting = self._waiting
        waiting.pop(conn, None)
        waiting[conn] = None
        conn.waiting_since = now
        if self._at_cap and self._cap_timer is None:
            self._resume_accepting()  # paused with every connection busy: one is not now

    def busy(self, conn: ManagedRequestHandler) -> None:
        self._waiting.pop(conn, None)

    def closed(self, conn: ManagedRequestHandler) -> None:
        self._waiting.pop(conn, None)
        self._open -= 1
        if conn.evicted:
            self._aborting -= 1
        if self._at_cap:
            self._resume_accepting()

    # --- accepting ----------------------------------------------------------------------

    def listen(self, sock: socket.socket, server: web.Server) -> None:
        sock.setblocking(False)
        self._listeners[sock] = server
        if self._retry is None and not self._at_cap:
            self._loop.add_reader(sock.fileno(), self._accept, sock, server)

    def unlisten(self, sock: socket.socket) -> None:
        if self._listeners.pop(sock, None) is not None:
            self._loop.remove_reader(sock.fileno())
        if not self._listeners:
            for timer in (self._retry, self._cap_timer):
                if timer is not None:
                    timer.cancel()
            self._retry = self._cap_timer = None
            if self._incident is not None:
                self._incident.close()
            self._log.close()

    def _pause_accepting(self) -> None:
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())

    def _resume_accepting(self) -> None:
        self._at_cap = False
        if self._cap_timer is not None:
            self._cap_timer.cancel()
            self._cap_timer = None
        if self._retry is not None:
            return
        for sock, server in self._listeners.items():
            self._loop.add_reader(sock.fileno(), self._accept, sock, server)

    def _evict(self) -> float | None:
        """Abort the connection that has waited longest for a request.

        :returns: None when one was aborted, else the seconds until one may be (infinite
            when every connection is busy with a request).
        """
        for conn in self._waiting:
            wait = conn.waiting_since + EVICTION_GRACE - self._loop.time()
            if wait > 0:
                return wait
            del self._waiting[conn]
            conn.evicted = True
            self._aborting += 1
            self.note("evicted", "closed the connection waiting longest for a request to make "
                      "room (%d open, at most %d)", self.open_connections, self.max_connections)
            if conn.transport is not None:
                conn.transport.abort()
            return None
        return math.inf

    def _pause_at_cap(self, wait: float) -> None:
        self._at_cap = True
        self._pause_accepting()
        if math.isinf(wait):
            self.note("at_cap", "%d connections open, all busy: accepting paused until one "
                      "finishes", self.max_connections, level=logging.WARNING)
        else:
            self._cap_timer = self._loop.call_later(wait, self._resume_accepting)

    def _accept(self, sock: socket.socket, server: web.Server) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open_connections >= self.max_connections:
                # Close the longest-waiting connection; when all are too young for that,
                # take the new one too, up to what the open-file limit allows. When every
                # one is busy with a request, wait for one to finish.
                wait = self._evict()
                if wait is not None and (wait == math.inf or self.open_connections >= self.ceiling):
                    self._pause_at_cap(wait)
                    return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                self._accept_failed(exc)
                return
            self._accepted(conn, server)

    def _accepted(self, conn: socket.socket, server: web.Server) -> None:
        self._backoff = 0.0
        self._open += 1
        protocol = functools.partial(self._protocol, server)
        task = self._loop.create_task(self._loop.connect_accepted_socket(protocol, conn))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._connected, conn))

    def _connected(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            self._open -= 1
            conn.close()
            log.debug("could not set up an accepted connection: %s", exc)

    def _protocol(self, server: web.Server) -> ManagedRequestHandler:
        limits = self.limits
        return ManagedRequestHandler(
            server,
            self,
            loop=self._loop,
            # Our idle timer closes idle connections; aiohttp's is only a backstop.
            keepalive_timeout=limits.idle_timeout + limits.header_timeout + 1,
            access_log=None,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_FIELD,
            max_headers=MAX_HEADERS,
            lingering_time=LINGER_TIME,
            auto_decompress=False,
        )

    def _accept_failed(self, exc: OSError) -> None:
        self.stats["accept_failures"] += 1
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
        if self._incident is None:
            self._incident = _AcceptIncident(self._loop, exc, self.open_connections,
                                             self._incident_over)
        else:
            self._incident.failed()
        if exc.errno in _RESOURCE_ERRNOS:
            # The evicted connection's descriptor is closed on the next loop iteration.
            delay = 0.0 if self._evict() is None else self._backoff
        else:
            delay = self._backoff
        self._pause_accepting()
        self._retry = self._loop.call_later(delay, self._retry_accept)

    def _incident_over(self) -> None:
        self._incident = None

    def _retry_accept(self) -> None:
        self._retry = None
        if not self._at_cap:
            self._resume_accepting()


class _AcceptIncident:
    """accept() failing, from the first failure to :data:`INCIDENT_QUIET` seconds after the
    last: logged when it starts, once a minute while it lasts, and when it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, exc: OSError, open_connections: int,
                 on_over: Callable[[], None]) -> None:
        self._loop = loop
        self._on_over = on_over
        self.start = self.last = self.reported = loop.time()
        self.failures = 1
        cause = exc.strerror or str(exc)
        if exc.errno in _RESOURCE_ERRNOS:
            cause += f" ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
        log.warning("accept() failed: %s with %d connections open; freeing an idle one and "
                    "retrying with back-off", cause, open_connections)
        self._timer = loop.call_at(self.last + INCIDENT_QUIET, self._check)

    def failed(self) -> None:
        self.failures += 1
        self.last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        if now - self.last >= INCIDENT_QUIET:
            self.close(over=True)
            return
        if now - self.reported >= LOG_WINDOW:
            self.reported = now
            log.warning("accept() still failing: %d failures in %.0f s", self.failures,
                        now - self.start)
        self._timer = self._loop.call_at(self.last + INCIDENT_QUIET, self._check)

    def close(self, *, over: bool = False) -> None:
        """End the incident: accept() works again (``over``), or the agent stops."""
        self._timer.cancel()
        log.warning("accept() %s: %d failures in %.1f s", "works again" if over else "failed",
                    self.failures, self.last - self.start)
        self._on_over()


class ManagedSite(web.BaseSite):
    """An aiohttp site on a bound, listening socket, accepted by a connection manager."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, connections: ConnectionManager
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._connections = connections
        self._app_runner = runner

    @property
    def name(self) -> str:
        return f"{self._sock.getsockname()}"

    async def start(self) -> None:
        await super().start()
        assert self._app_runner.server is not None
        self._connections.listen(self._sock, self._app_runner.server)

    async def stop(self) -> None:
        self._connections.unlisten(self._sock)
        self._sock.close()
        await super().stop()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening TCP sockets for every address ``host`` resolves to.

    :raises OSError: when resolving or binding fails (nothing is left open).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in _unique(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _unique(infos: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for info in infos:
        key = (info[0], info[4])
        if key not in seen:
            seen.add(key)
            out.append(info)
    return out

