"""Running the agent: start the platform, bind the sockets, serve until SIGTERM.

Start-up order matters for failing closed: the socket path is checked first (a live agent
on it must refuse us before our platform touches the state dir it may share), then the
platform is loaded and configured, and the runtime log repaired, *before* any socket exists,
so a failed start leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import Settings
from ..errors import ConfigurationError
from ..platform import Platform
from ..plugins import load_platform
from ..policy import Policy, load_policy
from ..service import AgentService, ServiceFiles
from . import systemd
from .app import API_METHODS, create_app
from .guard import Guard, tcp_notice

__all__ = ["serve", "prepare_socket_path"]

log = logging.getLogger(__name__)


def prepare_socket_path(path: Path) -> None:
    """Make ``path`` free for binding: remove a stale socket, refuse anything else.

    :raises ConfigurationError: another process answers on the socket, the path is not a
        socket (we never delete a regular file), or it cannot be used at all.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create socket directory: {exc}") from None
        return
    except OSError as exc:
        raise ConfigurationError(f"cannot use socket path {path}: {exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigurationError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ConfigurationError(f"cannot probe existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ConfigurationError(f"another process is already serving on {path}")


STATE_LOCK_FILE = "agent.lock"


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state dir: two agents must never share one.

    :raises ConfigurationError: the directory cannot be created, or another agent holds it.
    """
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(state_dir / STATE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot use state directory {state_dir}: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another agent is already using the state directory {state_dir}"
            ) from None
        yield
    finally:
        os.close(fd)


class _MalformedHttpFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP with a traceback; it is the client's error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.info("rejected malformed HTTP from a client: %s", exc)
            return False
        return True


def _start_service(platform: Platform, settings: Settings) -> AgentService:
    try:
        return AgentService.start(platform, settings.platform_config(), ServiceFiles())
    except BaseException:
        platform.close()
        raise


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; the socket file is removed on the way out.

    :raises ConfigurationError / PluginError / StateError: start-up failed (nothing bound).
    """
    # A bad policy stops start-up before anything is touched.
    policy = load_policy(settings.policy, methods=API_METHODS) if settings.policy else None
    activated = systemd.activated_socket()
    if activated is None:
        prepare_socket_path(settings.socket)
    # Loading the plugin touches no disk; a platform that fails to load leaves nothing.
    platform = Platform.from_plugin_manager(load_platform(settings.platform))
    with state_dir_lock(settings.state_dir):
        await _serve_locked(platform, settings, ready, activated, policy)


async def _bind_unix(runner: web.AppRunner, settings: Settings) -> None:
    prepare_socket_path(settings.socket)
    # Bind under a umask that already gives the final mode: no window in which the
    # socket is more open than configured.
    old_umask = os.umask(0o777 & ~settings.socket_mode)
    try:
        await web.UnixSite(runner, os.fspath(settings.socket)).start()
    except OSError as exc:
        raise ConfigurationError(f"cannot bind {settings.socket}: {exc}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(settings.socket, settings.socket_mode)
    except OSError as exc:
        settings.socket.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot set the mode of {settings.socket}: {exc}") from None


async def _serve_locked(
    platform: Platform,
    settings: Settings,
    ready: asyncio.Event | None,
    activated: socket.socket | None,
    policy: Policy | None,
) -> None:
    service = await asyncio.to_thread(_start_service, platform, settings)
    tcp_guarded = settings.listen is not None and not service.platform.info.simulated
    guard = None
    if policy is not None or settings.audit_log is not None or tcp_guarded:
        policy = policy or Policy()
        guard = Guard(policy=policy, tcp_guarded=tcp_guarded, audit_path=settings.audit_log,
                      platform=service.platform.name)
    logging.getLogger("aiohttp.server").addFilter(_MalformedHttpFilter())
    # From here on a signal must not kill us between binding and unlinking the socket.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(service, max_body=settings.max_body_size, guard=guard)
    runner = web.AppRunner(app, access_log=None)
    bound = False
    try:
        await runner.setup()
        if activated is not None:
            # systemd owns the socket file and its mode; we only serve on it.
            await web.SockSite(runner, activated).start()
            where = f"the systemd-activated socket {activated.getsockname()}"
        else:
            await _bind_unix(runner, settings)
            bound = True
            where = os.fspath(settings.socket)
        if settings.listen is not None:
            host, port = settings.listen
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
            log.warning(tcp_notice(policy or Policy(), simulated=service.platform.info.simulated,
                                   platform=service.platform.name, address=f"{host}:{port}"))
        log.warning(
            "dstack-agent serving platform %s on %s%s",
            service.platform.name,
            where,
            f" and {settings.listen[0]}:{settings.listen[1]}" if settings.listen else "",
        )
        systemd.notify("READY=1")
        if ready is not None:
            ready.set()
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.warning("dstack-agent shutting down")
    finally:
        await runner.cleanup()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                settings.socket.unlink()
        service.platform.close()
