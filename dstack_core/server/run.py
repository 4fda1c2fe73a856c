"""Running the agent: start the platform, bind the sockets, serve until SIGTERM.

Start-up order matters for failing closed: the socket paths are checked first (a live
agent on one must refuse us before our platform touches the state dir it may share), then
the platform is loaded and configured, and the runtime log repaired, *before* any socket
exists, so a failed start leaves nothing behind.

Listeners: the dstack API on ``--socket`` (or systemd's ``dstack`` socket), optionally also
on ``--listen``; the legacy Tappd API alone on ``--tappd-socket`` (or systemd's ``tappd``
socket); upstream's external surface on ``--external-listen``. Under systemd's watchdog a
:class:`~dstack_core.server.watchdog.Watchdog` pings while the API answers.
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
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import Settings
from ..errors import ConfigurationError, PluginError
from ..inputs import AppComposeFlags
from ..platform import Platform
from ..plugins import load_platform, require_verifier
from ..service import AgentService, ServiceFiles, ServiceOptions
from . import systemd
from .app import API_METHODS, create_app, create_tappd_app
from .connections import (
    LISTEN_BACKLOG,
    ConnectionManager,
    listening_sockets,
    raise_open_file_limit,
)
from .heaptrim import HeapTrimmer
from .metrics import AgentMetrics
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..policy import Policy

# Optional features (the caller policy, the audit log: the guard; the external port) load
# their modules only when they are configured, so a plain ``serve`` starts faster
# (docs/performance.md).

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
        # Read-only: flock needs no write access, and a descriptor open for writing would
        # keep the state dir's file system from being remounted read-only (a storage fault
        # the agent must survive, and start under, with its state intact).
        fd = os.open(state_dir / STATE_LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


def _start_service(platform: Platform, settings: Settings) -> AgentService:
    options = ServiceOptions(
        attestation_format="upstream" if settings.attestation_format == "upstream" else "dstack-core",
        kms_timeout=settings.kms_timeout,
    )
    try:
        return AgentService.start(platform, settings.platform_config(), ServiceFiles(), options)
    except BaseException:
        platform.close()
        raise


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; the socket file is removed on the way out.

    :raises ConfigurationError / PluginError / StateError: start-up failed (nothing bound).
    """
    # A bad policy stops start-up before anything is touched.
    policy = None
    if settings.policy:
        from ..policy import load_policy

        policy = load_policy(settings.policy, methods=API_METHODS)
    activated = systemd.activated_sockets()
    if activated.dstack is None:
        prepare_socket_path(settings.socket)
    if activated.tappd is None and settings.tappd_socket is not None:
        prepare_socket_path(settings.tappd_socket)
    # Loading the plugin touches no disk; a platform that fails to load leaves nothing.
    platform = Platform.from_plugin_manager(load_platform(settings.platform))
    _check_verifier(platform, settings)
    with state_dir_lock(settings.state_dir):
        await _serve_locked(platform, settings, ready, activated, policy)


def _check_verifier(platform: Platform, settings: Settings) -> None:
    """Refuse a platform whose evidence nobody here could verify: its format needs exactly
    one verifier plugin installed (found by entry point, not imported), unless the image
    deliberately leaves it out (``allow_missing_verifier``).

    :raises PluginError: none (the message names what is installed), or several.
    """
    evidence_format = platform.info.evidence_format
    try:
        found = require_verifier(evidence_format, platform=platform.name)
    except PluginError:
        if not settings.allow_missing_verifier:
            raise
        log.warning(
            "no verifier plugin for evidence format %r is installed; starting anyway "
            "(allow_missing_verifier): verify this agent's attestations elsewhere",
            evidence_format,
        )
        return
    log.debug("evidence format %s is verified by %s", evidence_format, found.describe())


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A Unix socket at ``path``, bound with its final mode and listening."""
    prepare_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that already gives the final mode: no window in which the
    # socket is more open than configured.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot bind {path}: {exc}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot set the mode of {path}: {exc}") from None
    return sock


class _Listeners:
    """The runners and socket files of one agent, for an orderly cleanup; every socket is
    served through one :class:`~dstack_core.server.connections.ConnectionManager`."""

    def __init__(self, connections: ConnectionManager) -> None:
        self.connections = connections
        self.runners: list[web.AppRunner] = []
        self.bound: list[Path] = []
        self.described: list[str] = []

    async def tcp(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        host, port = address
        try:
            sockets = listening_sockets(host, port)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
        for sock in sockets:
            await self.connections.site(runner, sock).start()

    async def runner(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None)
        self.runners.append(runner)
        await runner.setup()
        return runner

    async def unix(
        self, runner: web.AppRunner, activated: socket.socket | None, path: Path, mode: int,
        what: str,
    ) -> Path | None:
        """Serve on systemd's socket if passed, else bind ``path``; the path to probe."""
        if activated is not None:
            # systemd owns the socket file and its mode; we only serve on it.
            await self.connections.site(runner, activated).start()
            name = activated.getsockname()
            self.described.append(f"{what} on the systemd-activated socket {name}")
            return Path(name) if isinstance(name, str) and name.startswith("/") else None
        sock = _bind_unix(path, mode)
        self.bound.append(path)
        await self.connections.site(runner, sock).start()
        self.described.append(f"{what} on {path}")
        return path

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        for path in self.bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def _serve_locked(
    platform: Platform,
    settings: Settings,
    ready: asyncio.Event | None,
    activated: systemd.ActivatedSockets,
    policy: Policy | None,
) -> None:
    service = await asyncio.to_thread(_start_service, platform, settings)
    tcp_guarded = settings.listen is not None and not service.platform.info.simulated
    guard = None
    if policy is not None or settings.audit_log is not None or tcp_guarded:
        from ..policy import Policy
        from .guard import Guard

        policy = policy or Policy()
        guard = Guard(policy=policy, tcp_guarded=tcp_guarded, audit_path=settings.audit_log,
                      platform=service.platform.name)
    # From here on a signal must not kill us between binding and unlinking the socket.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    flags = AppComposeFlags.from_text(service.app_compose)
    metrics = AgentMetrics(
        service, public_sysinfo=flags.public_sysinfo, data_disks=settings.data_disks
    )
    raise_open_file_limit()
    listeners = _Listeners(ConnectionManager(settings.limits))
    watchdog: Watchdog | None = None
    trimming: asyncio.Task[None] | None = None
    try:
        runner = await listeners.runner(
            create_app(service, max_body=settings.max_body_size, guard=guard, metrics=metrics)
        )
        probe = await listeners.unix(
            runner, activated.dstack, settings.socket, settings.socket_mode, "the dstack API"
        )
        if settings.listen is not None:
            from ..policy import Policy
            from .guard import tcp_notice

            await listeners.tcp(runner, settings.listen)
            address = "{}:{}".format(*settings.listen)
            listeners.described.append(f"the dstack API on {address}")
            log.warning(tcp_notice(policy or Policy(), simulated=service.platform.info.simulated,
                                   platform=service.platform.name, address=address))
        if activated.tappd is not None or settings.tappd_socket is not None:
            tappd = await listeners.runner(create_tappd_app(
                service, max_body=settings.max_body_size, guard=guard, metrics=metrics
            ))
            await listeners.unix(
                tappd, activated.tappd, settings.tappd_socket or Path(), settings.socket_mode,
                "the Tappd API",
            )
        if activated.external is not None or settings.external_listen is not None:
            from .external import create_external_app

            external = await listeners.runner(create_external_app(service, metrics))
            if activated.external is not None:
                await listeners.connections.site(external, activated.external).start()
                host, port = activated.external.getsockname()[:2]
            else:
                assert settings.external_listen is not None
                await listeners.tcp(external, settings.external_listen)
                host, port = settings.external_listen
            listeners.described.append(f"the external port on {host}:{port}")
        log.warning(
            "dstack-agent serving platform %s: %s",
            service.platform.name,
            "; ".join(listeners.described),
        )
        service.warm_up()
        systemd.notify("READY=1")
        interval = systemd.watchdog_interval()
        if interval is not None:
            watchdog = Watchdog(
                interval=interval,
                platform=service.platform,
                loop=loop,
                probe_socket=probe,
                on_ping=metrics.watchdog_pings.inc,
                on_failure=lambda _reason: metrics.watchdog_failures.inc(),
            )
            watchdog.start()
        trimmer = HeapTrimmer.for_this_libc()
        if trimmer is not None:
            trimming = asyncio.create_task(trimmer.run(), name="heap-trim")
        if ready is not None:
            ready.set()
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.warning("dstack-agent shutting down")
    finally:
        if trimming is not None:
            trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimming
        if watchdog is not None:
            await asyncio.to_thread(watchdog.stop)
        await listeners.close()
        await service.aclose()
        service.platform.close()
