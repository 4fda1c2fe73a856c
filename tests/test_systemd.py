"""systemd integration: socket activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dstack_core.testing import AgentProcess, short_tempdir, uds_request
from dstack_core.testing.logscan import log_file


def recv_states(sock: socket.socket, want: str, timeout: float = 30) -> list[str]:
    """Datagrams received until one equals ``want``."""
    states: list[str] = []
    deadline = time.monotonic() + timeout
    while want not in states:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        states.append(sock.recv(4096).decode())
    return states


class TestNotify:
    def test_ready_and_stopping(self):
        """With NOTIFY_SOCKET set the agent sends READY=1 once serving and STOPPING=1 on SIGTERM."""
        workdir = short_tempdir()
        notify_path = workdir / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify_path))
            agent = AgentProcess("simulator", workdir=workdir, env={"NOTIFY_SOCKET": str(notify_path)})
            agent.start()
            try:
                assert "READY=1" in recv_states(listener, "READY=1")
                status, _, _ = uds_request(agent.socket, "GET", "/Version")
                assert status == 200
            finally:
                assert agent.stop() == 0
            assert "STOPPING=1" in recv_states(listener, "STOPPING=1")
        shutil.rmtree(workdir, ignore_errors=True)


ACTIVATE = textwrap.dedent("""
    import os, socket, sys
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o666)
    listener.listen(16)
    os.dup2(listener.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-m", "dstack_core.cli", *sys.argv[2:]])
""")


class TestSocketActivation:
    def test_serves_on_the_passed_socket_and_leaves_it(self):
        """An activated agent serves on fd 3, never binds its own path, and leaves systemd's file."""
        workdir = short_tempdir()
        activated = workdir / "run-dstack.sock"
        own_path = workdir / "unused.sock"
        log_path = log_file("agent-activated")
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(activated), "serve", "--platform", "simulator",
             "--socket", str(own_path), "--state-dir", str(workdir / "state")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    status, _, body = uds_request(activated, "POST", "/GetKey", b'{"path":"a"}')
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail(log_path.read_text())
                    time.sleep(0.1)
            assert status == 200 and len(bytes.fromhex(json.loads(body)["key"])) == 32
            assert not own_path.exists()
            assert oct(os.stat(activated).st_mode & 0o777) == oct(0o666)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            log.close()
        assert activated.exists(), "the socket file belongs to systemd, not to the agent"
        assert "systemd-activated socket" in log_path.read_text()
        shutil.rmtree(workdir, ignore_errors=True)

    def test_activation_for_another_process_is_ignored(self):
        """LISTEN_FDS meant for another PID is ignored: the agent binds its own socket."""
        agent = AgentProcess("simulator", env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
        agent.start()
        try:
            assert agent.socket.exists()
        finally:
            assert agent.stop() == 0
        shutil.rmtree(agent.workdir, ignore_errors=True)
