"""Who is at the other end of a connection: peer credentials and cgroup.

On a Unix socket the kernel records the connecting process's pid, uid and gid when it
calls ``connect()`` (SO_PEERCRED); no later ``setuid`` or fd passing changes them. The
cgroup is read from ``/proc/<pid>/cgroup``. Because a pid can be reused once its process
has exited, the read is bracketed by a pidfd of the connecting process itself
(SO_PEERPIDFD, Linux 6.5+): a cgroup is only believed if that very process is still alive
after the read. On older kernels the read is made without that check (documented in
docs/security.md). Anything else is the caller ``tcp``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Final, Protocol

from .policy import Caller

__all__ = [
    "PROC_ROOT",
    "SO_PEERPIDFD",
    "caller_of_socket",
    "parse_cgroup_file",
    "peer_cgroup",
    "read_cgroup",
]

PROC_ROOT: Final = Path("/proc")
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
"""``<asm-generic/socket.h>``: a pidfd of the peer process (Linux 6.5)."""
UCRED: Final = struct.Struct("=iII")
"""``struct ucred { pid_t pid; uid_t uid; gid_t gid; }``."""
PIDFD_SIZE: Final = 4
UNIFIED_HIERARCHY: Final = "0"
SYSTEMD_CONTROLLER: Final = "name=systemd"
ROOT_CGROUP: Final = "/"


class SocketLike(Protocol):
    """What is needed of a socket: ``socket.socket`` and asyncio's ``TransportSocket``."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getpeername(self) -> object: ...


def parse_cgroup_file(text: str) -> str | None:
    """The cgroup path a ``/proc/<pid>/cgroup`` file places the process in.

    Lines are ``hierarchy-id:controllers:path``; cgroup v2 has the single line
    ``0::/path``. The path is the most specific of, in order: the unified (v2) path, the
    ``name=systemd`` v1 path, the other v1 paths as listed; the first that is not ``/``
    wins, so that a v1 or hybrid host (where a container runtime may leave the unified
    path at the root) still names the container. ``/`` if every path is the root; None
    when the text has no valid line.
    """
    unified: list[str] = []
    systemd: list[str] = []
    others: list[str] = []
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2 and path.startswith("/")):
            continue
        if hierarchy == UNIFIED_HIERARCHY and not controllers:
            unified.append(path)
        elif SYSTEMD_CONTROLLER in controllers.split(","):
            systemd.append(path)
        else:
            others.append(path)
    paths = unified + systemd + others
    return next((p for p in paths if p != ROOT_CGROUP), paths[0] if paths else None)


def read_cgroup(pid: int, *, proc_root: Path = PROC_ROOT) -> str | None:
    """The cgroup path of ``pid`` (see :func:`parse_cgroup_file`); None if unreadable."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return parse_cgroup_file(text)


def _peer_pidfd(sock: SocketLike) -> int | None:
    """A pidfd of the process that connected; None when the kernel has no SO_PEERPIDFD.

    :raises ProcessLookupError: the process has already exited.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, PIDFD_SIZE)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise ProcessLookupError(exc.errno, "peer process has exited") from None
    return int.from_bytes(raw, sys.byteorder, signed=True)


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; we only may not signal it
    return True


def peer_cgroup(sock: SocketLike, pid: int, *, proc_root: Path = PROC_ROOT) -> str | None:
    """The cgroup of the process that connected ``sock`` (pid ``pid``), or None when it
    cannot be established: the process exited, its pid is not visible (0), or /proc
    cannot be read."""
    if pid <= 0:
        return None
    try:
        pidfd = _peer_pidfd(sock)
    except ProcessLookupError:
        return None
    try:
        cgroup = read_cgroup(pid, proc_root=proc_root)
        if pidfd is not None and not _alive(pidfd):
            return None
        return cgroup
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def caller_of_socket(
    sock: SocketLike, *, with_cgroup: bool, proc_root: Path = PROC_ROOT
) -> Caller:
    """The caller on ``sock``: peer credentials (and cgroup when asked) on a Unix socket,
    the caller ``tcp`` otherwise.

    :raises OSError: the credentials cannot be read (the connection is gone).
    """
    if sock.family != socket.AF_UNIX:
        try:
            peer = _address(sock.getpeername())
        except OSError:
            peer = None
        return Caller(tcp=True, peer=peer)
    pid, uid, gid = UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    )
    cgroup = peer_cgroup(sock, pid, proc_root=proc_root) if with_cgroup else None
    return Caller(pid=pid, uid=uid, gid=gid, cgroup=cgroup)
