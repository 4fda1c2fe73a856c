"""Agent settings: command-line flags over environment over config file over defaults.

The config file is JSON (``.json``) or TOML (anything else) with the flag names as keys,
underscored (``state_dir``, ``socket_mode``, ...) and a ``platform_options`` table.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from .errors import ConfigurationError
from .types import PlatformConfig

__all__ = ["Settings", "load_settings", "PLATFORM_ENV", "DEFAULT_SOCKET", "DEFAULT_STATE_DIR"]

PLATFORM_ENV: Final = "DSTACK_PLATFORM"
DEFAULT_SOCKET: Final = Path("/var/run/dstack.sock")
DEFAULT_STATE_DIR: Final = Path("/var/lib/dstack-core")
DEFAULT_SOCKET_MODE: Final = 0o660
DEFAULT_MAX_BODY: Final = 10 * 1024 * 1024
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107

_PATH_KEYS: Final = (
    "socket", "state_dir", "appkeys", "app_compose", "sys_config", "runtime_log", "policy",
    "audit_log",
)
# A string "false" must not turn into a truthy reset_state, so file values are type-checked.
_KEY_TYPES: Final[Mapping[str, type | tuple[type, ...]]] = {
    **dict.fromkeys(_PATH_KEYS, str),
    "platform": str,
    "socket_mode": (str, int),
    "listen": str,
    "max_body_size": int,
    "platform_options": dict,
    "reset_state": bool,
}


@attrs.frozen(kw_only=True)
class Settings:
    """Everything ``serve`` needs, resolved and validated."""

    platform: str | None
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = DEFAULT_SOCKET_MODE
    state_dir: Path = DEFAULT_STATE_DIR
    appkeys: Path | None = None
    app_compose: Path | None = None
    sys_config: Path | None = None
    runtime_log: Path | None = None
    listen: tuple[str, int] | None = None
    max_body_size: int = DEFAULT_MAX_BODY
    platform_options: Mapping[str, str] = attrs.field(factory=dict)
    reset_state: bool = False
    policy: Path | None = None
    """The caller policy file (docs/security.md); None: everyone who can connect may call
    everything."""
    audit_log: Path | None = None
    """The audit log (JSON lines, hash-chained); None: no audit log."""

    def platform_config(self) -> PlatformConfig:
        """Paths for the platform; unset inputs default to files in the state dir."""
        return PlatformConfig(
            state_dir=self.state_dir,
            runtime_log=self.runtime_log or self.state_dir / "runtime_events.log",
            appkeys=self.appkeys,
            app_compose=self.app_compose or self.state_dir / "app-compose.json",
            sys_config=self.sys_config or self.state_dir / "sys-config.json",
            options=dict(self.platform_options),
            reset=self.reset_state,
        )


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parse_mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigurationError(f"socket mode must be octal, got {value!r}") from None
    else:
        raise ConfigurationError(f"socket mode must be octal, got {value!r}")
    if not 0 <= mode <= 0o777:
        raise ConfigurationError(f"socket mode out of range: {oct(mode)}")
    return mode


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"config file {path} must hold a table/object")
    unknown = set(doc) - set(_KEY_TYPES)
    if unknown:
        raise ConfigurationError(f"config file {path} has unknown keys: {sorted(unknown)}")
    for key, value in doc.items():
        if not isinstance(value, _KEY_TYPES[key]):
            raise ConfigurationError(
                f"config file {path}: {key} has the wrong type ({type(value).__name__})"
            )
    options = doc.get("platform_options", {})
    if not all(isinstance(v, str) for v in options.values()):
        raise ConfigurationError(f"config file {path}: platform_options values must be strings")
    return doc


def load_settings(
    flags: Mapping[str, Any], *, config_file: Path | None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge flag values (``None`` = not given) over ``DSTACK_PLATFORM`` over the file.

    :raises ConfigurationError: on an unreadable file, unknown keys or invalid values.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    if env.get(PLATFORM_ENV):
        merged["platform"] = env[PLATFORM_ENV]
    options = dict(merged.get("platform_options") or {})
    options.update(flags.get("platform_options") or {})
    merged.update({k: v for k, v in flags.items() if v is not None and k != "platform_options"})
    values: dict[str, Any] = {"platform": merged.get("platform"), "platform_options": options}
    for key in _PATH_KEYS:
        if merged.get(key) is not None:
            values[key] = Path(merged[key])
    if "socket_mode" in merged:
        values["socket_mode"] = _parse_mode(merged["socket_mode"])
    if merged.get("listen"):
        values["listen"] = _parse_listen(str(merged["listen"]))
    if "max_body_size" in merged:
        size = merged["max_body_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1024:
            raise ConfigurationError("max_body_size must be an integer of at least 1024")
        values["max_body_size"] = size
    values["reset_state"] = bool(merged.get("reset_state", False))
    settings = Settings(**values)
    if len(os.fsencode(settings.socket)) > MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"socket path is longer than {MAX_SOCKET_PATH} bytes: {settings.socket}"
        )
    return settings
