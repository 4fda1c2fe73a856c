"""Run a real ``dstack-agent serve`` in a subprocess on a temporary Unix socket.

Tests talk to it exactly as apps do (the official SDK, curl, raw HTTP), so what they pin is
the behaviour of the whole house: socket, handler, façade, plugin, crypto.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import logscan

__all__ = ["AgentProcess", "TEMP_BASE_ENV", "short_tempdir", "uds_request"]

START_TIMEOUT = 30.0


TEMP_BASE_ENV = "DSTACK_TEST_TMPDIR"
"""Where :func:`short_tempdir` creates directories (default ``/tmp``); the pytest plugin
points it at one directory per session and removes that directory at the end."""


def short_tempdir(prefix: str = "dsk") -> Path:
    """A fresh directory short enough for a Unix socket path inside it (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get(TEMP_BASE_ENV, "/tmp")))


def uds_request(
    socket_path: Path,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request over a Unix socket: ``(status, headers, body)``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(socket_path))
        lines = [f"{method} {path} HTTP/1.1", "Host: dstack", "Connection: close"]
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    logscan.register_answer(payload)  # keys the agent answered are secrets for a log scan
    return int(status_line.split()[1]), parsed, payload


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


class AgentProcess:
    """A ``dstack-agent serve`` subprocess.

    :param platform: the platform name to select.
    :param workdir: where the socket and (by default) the state dir live.
    :param extra_args: more ``serve`` flags.
    :param env: extra environment variables.
    :param preexec_fn: run in the child before the agent starts (e.g. to lower its
        RLIMIT_NOFILE with :func:`resource.setrlimit`).
    """

    def __init__(
        self,
        platform: str | None = "simulator",
        *,
        workdir: Path | None = None,
        state_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.workdir = workdir or short_tempdir()
        self.socket = self.workdir / "dstack.sock"
        self.state_dir = state_dir or self.workdir / "state"
        self.platform = platform
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.preexec_fn = preexec_fn
        # With a log scan on, the log outlives the workdir (which tests remove).
        self.log_path = (
            logscan.log_file(f"agent-{self.workdir.name}")
            if os.environ.get(logscan.LOG_DIR_ENV)
            else self.workdir / "agent.log"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "dstack_core.cli", "serve", "--socket", str(self.socket),
               "--state-dir", str(self.state_dir)]
        if self.platform is not None:
            cmd += ["--platform", self.platform]
        return cmd + self.extra_args

    def _register_key_files(self) -> None:
        """Let a log scan know this agent's keys (its inputs and its state dir)."""
        keyfiles = [Path(a) for a in self.command if a.endswith((".json", ".seed"))]
        logscan.register_key_files(*keyfiles, self.state_dir)

    def start(self, *, wait: bool = True) -> AgentProcess:
        self._register_key_files()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # The caller's preexec_fn must be async-signal-safe (setrlimit is).
            env={**os.environ, **self.env}, preexec_fn=self.preexec_fn,  # noqa: PLW1509
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the socket answers; raise with the agent's log if it died.

        A 403 counts as an answer: a caller policy may deny this process ``Version``.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, _ = uds_request(self.socket, "GET", "/Version", timeout=2)
                if status in (200, 403):
                    self._register_key_files()  # the agent has made its keys by now
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent did not become ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the agent and wait for it; returns its exit code."""
        assert self.proc is not None
        self._register_key_files()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._keep_audit_log()
        return self.proc.returncode

    def _keep_audit_log(self) -> None:
        """An audit log is a log too: a log scan gets a copy (the workdir may be removed)."""
        command = self.command
        if "--audit-log" in command[:-1]:
            path = Path(command[command.index("--audit-log") + 1])
            with contextlib.suppress(OSError):
                logscan.record_output("audit", path.read_bytes())

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def call(self, method: str, args: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """POST ``args`` as JSON to ``/<method>``; returns ``(status, parsed JSON)``."""
        status, _, body = uds_request(self.socket, "POST", f"/{method}", json.dumps(args or {}).encode())
        return status, json.loads(body)

    def get(self, method: str, query: Mapping[str, str] | None = None) -> tuple[int, Any]:
        path = f"/{method}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        status, _, body = uds_request(self.socket, "GET", path)
        return status, json.loads(body)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
