"""Clients that misbehave, for testing that an agent stays up and keeps serving.

* :class:`ConnectionFlood`: holds many connections open, re-opening each one the server
  closes: idle (an fd-exhaustion attack), or trickling a request head byte by byte
  (slow-loris), a body (slow POST), or pipelining requests whose answers it never reads.
* :class:`Prober`: a well-behaved client sending one request at a time, counting what
  was answered and how fast, to run during an attack.
* :data:`MALFORMED_REQUESTS`: raw requests the HTTP parser must refuse, with the status
  and code the agent answers.

They speak raw HTTP over the agent's Unix socket, so nothing in them hides a misbehaviour
of the server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Self

import attrs

from ..server.connections import raise_open_file_limit
from .agent import uds_request

__all__ = [
    "MALFORMED_REQUESTS",
    "ConnectionFlood",
    "Malformed",
    "ProbeResult",
    "Prober",
    "log_growth",
    "read_answer",
    "send_raw",
]


@attrs.define
class _Conn:
    sock: socket.socket
    sent: int = 0


class ConnectionFlood:
    """Keep ``count`` connections to ``socket_path`` open from a background thread.

    :param send: bytes each connection sends, ``chunk`` bytes every ``interval`` seconds;
        empty for idle connections. The bytes are sent once per connection, then it idles.
    :param read: read (and discard) what the server sends; False leaves answers unread.

    Connections the server closes are re-opened at once, so the server always faces
    ``count`` of them. :attr:`opened` counts connections made, :attr:`closed_by_server`
    those the server ended, :attr:`refused` connect attempts that failed.
    """

    def __init__(
        self,
        socket_path: Path,
        count: int,
        *,
        send: bytes = b"",
        chunk: int = 1,
        interval: float = 1.0,
        read: bool = True,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.count = count
        self.send = send
        self.chunk = chunk
        self.interval = interval
        self.read = read
        self.opened = 0
        self.closed_by_server = 0
        self.refused = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._poller = select.poll()
        # Unread answers must not wake us: then only a hang-up does.
        self._events = (select.POLLIN if read else 0) | select.POLLRDHUP
        self._conns: dict[int, _Conn] = {}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        raise_open_file_limit(self.count + 256)
        self._thread.start()

    def wait_open(self, count: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``count`` (default all) connections are open."""
        deadline = time.monotonic() + timeout
        while self.open < (self.count if count is None else count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.open} of {self.count} connections opened")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.socket_path)
        except OSError:
            # EAGAIN: the listen backlog is full; ECONNREFUSED: nobody listens.
            sock.close()
            self.refused += 1
            return False
        self.opened += 1
        self._conns[sock.fileno()] = _Conn(sock)
        self._poller.register(sock, self._events)
        return True

    def _drop(self, conn: _Conn) -> None:
        self._poller.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        conn.sock.close()

    def _run(self) -> None:
        next_send = time.monotonic()
        try:
            while not self._stop.is_set():
                while len(self._conns) < self.count and self._connect():
                    pass
                timeout = max(0.0, min(next_send - time.monotonic(), 0.05))
                for fd, event in self._poller.poll(timeout * 1000) if self._conns else ():
                    conn = self._conns[fd]
                    if not self.read:
                        data = b""  # only a hang-up wakes us
                    else:
                        try:
                            data = conn.sock.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                    if data:
                        self.received += len(data)
                    else:
                        self.closed_by_server += 1
                        self._drop(conn)
                if not self._conns:
                    time.sleep(0.005)  # the backlog is full: let the server catch up
                if self.send and time.monotonic() >= next_send:
                    next_send = time.monotonic() + self.interval
                    for conn in list(self._conns.values()):
                        piece = self.send[conn.sent:conn.sent + self.chunk]
                        if not piece:
                            continue
                        try:
                            conn.sent += conn.sock.send(piece)
                        except BlockingIOError:
                            pass
                        except OSError:
                            self.closed_by_server += 1
                            self._drop(conn)
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)


@attrs.define
class ProbeResult:
    """What a :class:`Prober` saw."""

    answered: int = 0
    failed: int = 0
    latencies: list[float] = attrs.field(factory=list)
    errors: dict[str, int] = attrs.field(factory=dict)

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)


class Prober:
    """Send ``GET path`` over and over (one connection per request, as the SDKs' simple
    clients do) and count answers with status 200."""

    def __init__(self, socket_path: Path, path: str = "/Version", timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.path = path
        self.timeout = timeout
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def once(self) -> bool:
        started = time.monotonic()
        try:
            status, _, body = uds_request(self.socket_path, "GET", self.path, timeout=self.timeout)
            ok = status == 200 and bool(json.loads(body))
            reason = f"HTTP {status}"
        except OSError as exc:
            ok = False
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        if ok:
            self.result.answered += 1
            self.result.latencies.append(time.monotonic() - started)
        else:
            self.result.failed += 1
            self.result.errors[reason] = self.result.errors.get(reason, 0) + 1
        return ok

    def _run(self) -> None:
        while not self._stop.is_set():
            self.once()
            time.sleep(0.01)


def send_raw(socket_path: Path, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; return the first answer (or all bytes sent back
    before the server closed). Raises :class:`TimeoutError` when no answer comes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
                if _complete(raw):
                    break
    return raw


def _complete(raw: bytes) -> bool:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


def read_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first HTTP answer in ``raw``: ``(status, lower-cased headers, body)``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    length = int(headers.get("content-length", len(rest)))
    return int(status_line.split()[1]), headers, rest[:length]


@attrs.frozen
class Malformed:
    """A raw request the agent must refuse, and how."""

    name: str
    request: bytes
    status: int
    code: str


def _post(headers: str, body: bytes) -> bytes:
    return (f"POST /GetKey HTTP/1.1\r\nHost: x\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


MALFORMED_REQUESTS: Final[tuple[Malformed, ...]] = (
    Malformed("unknown verb", b"FOO /GetKey HTTP/1.1\r\nHost: x\r\n\r\n", 405,
              "method_not_allowed"),
    Malformed("unknown verb with body",
              b"BREW /Info HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405,
              "method_not_allowed"),
    Malformed("lower-case verb", b"get /Version HTTP/1.1\r\nHost: x\r\n\r\n", 405,
              "method_not_allowed"),
    Malformed("binary garbage", b"\x00\xffNOT HTTP AT ALL\r\n\r\n", 400, "malformed_http"),
    Malformed("TLS handshake", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400,
              "malformed_http"),
    Malformed("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed_http"),
    Malformed("bad version", b"GET /Version HTTP/9.9\r\nHost: x\r\n\r\n", 400, "malformed_http"),
    Malformed("no version", b"GET /Version FOO\r\nHost: x\r\n\r\n", 400, "malformed_http"),
    Malformed("long request line", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
              "uri_too_long"),
    Malformed("long header", b"GET /Version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000
              + b"\r\n\r\n", 431, "header_too_large"),
    Malformed("too many headers", b"GET /Version HTTP/1.1\r\nHost: x\r\n"
              + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431,
              "header_too_large"),
    Malformed("space in header name", b"GET /Version HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
              400, "malformed_http"),
    Malformed("header without colon", b"GET /Version HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400,
              "malformed_http"),
    Malformed("control byte in header", b"GET /Version HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
              400, "malformed_http"),
    Malformed("obsolete line folding", b"GET /Version HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
              400, "malformed_http"),
    Malformed("no Host", b"GET /Version HTTP/1.1\r\n\r\n", 400, "malformed_http"),
    Malformed("two Content-Lengths", b"POST /GetKey HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
              b"Content-Length: 3\r\n\r\n{}", 400, "malformed_http"),
    Malformed("negative Content-Length", b"POST /GetKey HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: -1\r\n\r\n", 400, "malformed_http"),
    Malformed("Content-Length and chunked", b"POST /GetKey HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400,
              "malformed_http"),
    Malformed("unknown Transfer-Encoding", b"POST /GetKey HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: gzip\r\n\r\n", 400, "malformed_http"),
    Malformed("bad chunk size", b"POST /GetKey HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
              b"\r\n\r\nZZ\r\n", 400, "malformed_http"),
    Malformed("unknown Expect", b"POST /GetKey HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n"
              b"Content-Length: 2\r\n\r\n{}", 417, "expectation_failed"),
    Malformed("gzip that is not gzip", _post("Content-Encoding: gzip\r\n", b'{"path": "a"}'), 400,
              "invalid_content_encoding"),
    Malformed("truncated gzip", _post("Content-Encoding: gzip\r\n", b"\x1f\x8b\x08\x00" + bytes(6)),
              400, "invalid_content_encoding"),
    Malformed("deflate that is not deflate", _post("Content-Encoding: deflate\r\n", b"\xff" * 8),
              400, "invalid_content_encoding"),
    Malformed("brotli", _post("Content-Encoding: br\r\n", b"{}"), 415,
              "unsupported_content_encoding"),
    Malformed("zstd", _post("Content-Encoding: zstd\r\n", b"{}"), 415,
              "unsupported_content_encoding"),
    Malformed("unknown coding", _post("Content-Encoding: foo\r\n", b"{}"), 415,
              "unsupported_content_encoding"),
    Malformed("gzip then unknown", _post("Content-Encoding: gzip, foo\r\n", b"{}"), 415,
              "unsupported_content_encoding"),
)


@contextlib.contextmanager
def log_growth(path: Path) -> Iterator[list[int]]:
    """Measure how many bytes a log file grows by inside the block: ``[bytes]`` after it."""
    before = path.stat().st_size if path.exists() else 0
    grown = [0]
    try:
        yield grown
    finally:
        grown[0] = (path.stat().st_size if path.exists() else 0) - before

