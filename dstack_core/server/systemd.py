"""The two systemd conventions an agent in a CVM lives with, without libsystemd.

* Socket activation (``sd_listen_fds``): upstream's image starts the agent from a
  ``.socket`` unit that owns ``/run/dstack.sock``; the listening socket arrives as fd 3
  with ``LISTEN_FDS``/``LISTEN_PID`` set. The agent serves on it and leaves the file alone.
* Readiness (``sd_notify``): with ``Type=notify`` the agent sends ``READY=1`` once it
  answers and ``STOPPING=1`` when it begins to shut down.
"""

from __future__ import annotations

import os
import socket
from typing import Final

from ..errors import ConfigurationError

__all__ = ["LISTEN_FDS_START", "activated_socket", "notify"]

LISTEN_FDS_START: Final = 3
_ACTIVATION_ENV: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def activated_socket() -> socket.socket | None:
    """The listening Unix socket systemd passed to this process, or None.

    The variables are consumed (removed from the environment) so that no child process
    mistakes the socket for its own.

    :raises ConfigurationError: the passed descriptor is not a listening Unix stream socket.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0")
    for name in _ACTIVATION_ENV:
        os.environ.pop(name, None)
    if not count.isdigit() or int(count) < 1:
        return None
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise ConfigurationError(f"socket activation: fd {LISTEN_FDS_START} is unusable: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigurationError(
            f"socket activation: fd {LISTEN_FDS_START} is not a Unix stream socket"
        )
    return sock


def notify(state: str) -> None:
    """Send ``state`` (e.g. ``READY=1``) to systemd's notify socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract-namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            # Readiness is advisory: a missing manager must not stop the agent.
            pass
