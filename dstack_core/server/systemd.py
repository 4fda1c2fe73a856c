"""The systemd conventions an agent in a CVM lives with, without libsystemd.

* Socket activation (``sd_listen_fds_with_names``): upstream's image starts the agent from
  a ``.socket`` unit that owns ``/run/dstack.sock`` and ``/run/tappd.sock``; the listening
  sockets arrive from fd 3 on with ``LISTEN_FDS``/``LISTEN_PID`` set. Sockets named
  ``dstack`` and ``tappd`` in ``LISTEN_FDNAMES`` (``FileDescriptorName=``) are taken by name;
  without distinct names (one unit, systemd names every fd after it) they are taken by
  position, as upstream does: the first is ``dstack``, the second ``tappd``. A TCP socket
  named ``external`` serves the external port. The agent serves on them and leaves the
  files alone.
* Readiness (``sd_notify``): with ``Type=notify`` the agent sends ``READY=1`` once it
  answers and ``STOPPING=1`` when it begins to shut down.
* The watchdog (``sd_watchdog_enabled``): with ``WatchdogSec=`` systemd sets
  ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``); :func:`watchdog_interval` says how often to
  send ``WATCHDOG=1`` (half the timeout). What decides whether to send it is
  :mod:`dstack_core.server.watchdog`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

import attrs

from ..errors import ConfigurationError

__all__ = [
    "LISTEN_FDS_START",
    "SOCKET_NAMES",
    "ActivatedSockets",
    "activated_sockets",
    "notify",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

LISTEN_FDS_START: Final = 3
SOCKET_NAMES: Final = ("dstack", "tappd")
"""Unix sockets' ``FileDescriptorName=`` values, in upstream's positional order."""
EXTERNAL_NAME: Final = "external"
"""The ``FileDescriptorName=`` of a TCP socket for the external port."""
_ACTIVATION_ENV: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_USEC: Final = 1_000_000


@attrs.frozen
class ActivatedSockets:
    """The listening sockets systemd passed, by role (None where none was passed)."""

    dstack: socket.socket | None = None
    tappd: socket.socket | None = None
    external: socket.socket | None = None


def _listener(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigurationError(f"socket activation: fd {fd} ({name}) is unusable: {exc}") from None
    tcp = name == EXTERNAL_NAME
    families = (socket.AF_INET, socket.AF_INET6) if tcp else (socket.AF_UNIX,)
    if sock.family not in families or sock.type != socket.SOCK_STREAM:
        kind = "a TCP" if tcp else "a Unix"
        raise ConfigurationError(f"socket activation: fd {fd} ({name}) is not {kind} stream socket")
    return sock


def activated_sockets() -> ActivatedSockets:
    """The sockets systemd passed to this process, by role.

    The variables are consumed (removed from the environment) so that no child process
    mistakes the sockets for its own.

    :raises ConfigurationError: a passed descriptor is not a listening Unix stream socket,
        names that are distinct but not ``dstack``/``tappd``, or more sockets than roles.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return ActivatedSockets()
    count_text = os.environ.get("LISTEN_FDS", "0")
    names_text = os.environ.get("LISTEN_FDNAMES", "")
    for variable in _ACTIVATION_ENV:
        os.environ.pop(variable, None)
    count = int(count_text) if count_text.isdigit() else 0
    if count < 1:
        return ActivatedSockets()
    names = names_text.split(":") if names_text else []
    known = {*SOCKET_NAMES, EXTERNAL_NAME}
    if len(names) == count and set(names) <= known and len(set(names)) == count:
        roles = names
    elif len(set(names)) <= 1 and count <= len(SOCKET_NAMES):
        roles = list(SOCKET_NAMES[:count])  # unnamed: upstream's order
    else:
        raise ConfigurationError(
            f"socket activation: cannot tell the sockets apart: LISTEN_FDS={count}, "
            f"LISTEN_FDNAMES={names_text!r}; name them {', '.join(SOCKET_NAMES)} (and "
            f"{EXTERNAL_NAME} for a TCP socket) with FileDescriptorName=, or pass the first "
            "two in that order"
        )
    sockets = {role: _listener(LISTEN_FDS_START + i, role) for i, role in enumerate(roles)}
    return ActivatedSockets(**sockets)


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


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when
    systemd runs no watchdog for this process (unset, invalid, or for another PID)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid is not None and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / _USEC
