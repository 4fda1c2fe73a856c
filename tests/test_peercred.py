"""Caller identity: peer credentials and cgroups of real processes (peercred.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack_core.peercred import caller_of_socket, parse_cgroup_file, read_cgroup
from dstack_core.testing import short_tempdir

V2 = "0::/system.slice/docker-0123abcd.scope\n"
HYBRID = (
    "12:memory:/docker/0123abcd\n"
    "1:name=systemd:/docker/0123abcd\n"
    "0::/\n"
)
HYBRID_SYSTEMD = (
    "9:name=systemd:/system.slice/docker-0123abcd.scope\n"
    "4:memory:/system.slice/docker-0123abcd.scope\n"
    "0::/system.slice/docker-0123abcd.scope\n"
)
V1_ONLY = "11:pids:/docker/feed\n5:cpu,cpuacct:/docker/feed\n"


def cgroup2_mount() -> Path | None:
    """Where a writable cgroup v2 hierarchy is mounted, if any."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype == "cgroup2" and "rw" in fields[5].split(","):
            return Path(fields[4])
    return None


@pytest.fixture
def real_cgroup() -> Iterator[tuple[Path, str]]:
    """A new cgroup v2 directory (and its path as /proc shows it), removed afterwards."""
    mount = cgroup2_mount()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("needs root and a writable cgroup v2 mount to place a process in a cgroup")
    own_v2 = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::")), "/")
    name = f"dstack-test-{os.getpid()}"
    directory = mount / own_v2.lstrip("/") / name
    try:
        directory.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc.strerror}")
    try:
        yield directory, f"{own_v2.rstrip('/')}/{name}"
    finally:
        directory.rmdir()


class TestParse:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (V2, "/system.slice/docker-0123abcd.scope"),
            (HYBRID, "/docker/0123abcd"),
            (HYBRID_SYSTEMD, "/system.slice/docker-0123abcd.scope"),
            (V1_ONLY, "/docker/feed"),
            ("0::/\n", "/"),
            ("9:name=systemd:/\n4:memory:/\n0::/\n", "/"),
            ("", None),
            ("garbage\n0:/x\n", None),
        ],
    )
    def test_most_specific_path(self, text: str, expected: str | None) -> None:
        """The unified path wins unless it is the root; then systemd's, then other v1 paths."""
        assert parse_cgroup_file(text) == expected

    def test_proc_root_seam(self, tmp_path: Path) -> None:
        """read_cgroup reads <proc_root>/<pid>/cgroup; an unreadable one is None."""
        (tmp_path / "42").mkdir()
        (tmp_path / "42" / "cgroup").write_text(V2)
        assert read_cgroup(42, proc_root=tmp_path) == "/system.slice/docker-0123abcd.scope"
        assert read_cgroup(43, proc_root=tmp_path) is None


class TestPeerCredentials:
    def test_socketpair_names_this_process(self) -> None:
        """SO_PEERCRED gives our own pid, uid and gid; the cgroup is read from /proc."""
        a, b = socket.socketpair()
        with a, b:
            caller = caller_of_socket(a, with_cgroup=True)
            assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
            assert caller.cgroup == read_cgroup(os.getpid()) and not caller.tcp
            assert caller_of_socket(a, with_cgroup=False).cgroup is None

    def test_credentials_are_those_at_connect(self) -> None:
        """A process that connected and exited keeps its credentials, but its cgroup is not
        believed: its pid could belong to another process by now."""
        path = short_tempdir("pc") / "s"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen()
        child = subprocess.Popen([sys.executable, "-c",
                                  f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"])
        conn, _ = server.accept()
        child.wait()
        with server, conn:
            caller = caller_of_socket(conn, with_cgroup=True)
        assert caller.pid == child.pid and caller.uid == os.getuid()
        assert caller.cgroup is None

    def test_tcp_is_the_caller_tcp(self) -> None:
        """A TCP peer is the caller 'tcp', with its address kept for the audit log."""
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with server, client, conn:
            caller = caller_of_socket(conn, with_cgroup=True)
            port = client.getsockname()[1]
        assert caller.tcp and caller.to_json() == "tcp"
        assert caller.peer == f"127.0.0.1:{port}"
        assert caller.uid is None and caller.cgroup is None

    def test_real_cgroup(self, real_cgroup: tuple[Path, str]) -> None:
        """A process placed in a real cgroup v2 group is identified by that group's path."""
        directory, expected = real_cgroup
        path = short_tempdir("pc") / "s"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen()
        script = (f"import os, socket, sys; open({str(directory / 'cgroup.procs')!r}, 'w')"
                  f".write(str(os.getpid())); s = socket.socket(socket.AF_UNIX); "
                  f"s.connect({str(path)!r}); sys.stdin.read()")
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
        try:
            conn, _ = server.accept()
            with conn:
                caller = caller_of_socket(conn, with_cgroup=True)
        finally:
            child.communicate(b"")
            server.close()
        assert caller.pid == child.pid
        assert caller.cgroup == expected
