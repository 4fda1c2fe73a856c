"""Running the agent: start the platform, bind the sockets, serve until SIGTERM.

Start-up order matters for failing closed: the socket path is checked first (a live agent
on it must refuse us before our platform touches the state dir it may share), then the
platform is loaded and configured, and the runtime log repaired, *before* any socket exists,
so a failed start leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from aiohttp import web

from ..config import Settings
from ..errors import ConfigurationError
from ..platform import Platform
from ..plugins import load_platform
from ..service import AgentService, ServiceFiles
from .app import create_app

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


def _start_service(settings: Settings) -> AgentService:
    pm = load_platform(settings.platform)
    platform = Platform.from_plugin_manager(pm)
    try:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        platform.close()
        raise ConfigurationError(f"cannot create state directory: {exc}") from None
    try:
        return AgentService.start(platform, settings.platform_config(), ServiceFiles())
    except BaseException:
        platform.close()
        raise


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; the socket file is removed on the way out.

    :raises ConfigurationError / PluginError / StateError: start-up failed (nothing bound).
    """
    prepare_socket_path(settings.socket)
    service = await asyncio.to_thread(_start_service, settings)
    # From here on a signal must not kill us between binding and unlinking the socket.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(service, max_body=settings.max_body_size), access_log=None)
    bound = False
    try:
        await runner.setup()
        prepare_socket_path(settings.socket)
        try:
            await web.UnixSite(runner, os.fspath(settings.socket)).start()
        except OSError as exc:
            raise ConfigurationError(f"cannot bind {settings.socket}: {exc}") from None
        bound = True
        os.chmod(settings.socket, settings.socket_mode)
        if settings.listen is not None:
            host, port = settings.listen
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
        log.warning(
            "dstack-agent serving platform %s on %s%s",
            service.platform.name,
            settings.socket,
            f" and {settings.listen[0]}:{settings.listen[1]}" if settings.listen else "",
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.warning("dstack-agent shutting down")
    finally:
        await runner.cleanup()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                settings.socket.unlink()
        service.platform.close()
