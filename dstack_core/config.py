"""Agent settings: command-line flags over environment over config files over defaults.

A config file is JSON (``.json``) or TOML (anything else) in one of two shapes:

* ours: the flag names as keys, underscored (``state_dir``, ``socket_mode``, ...) and a
  ``platform_options`` table; unknown keys are an error;
* upstream's ``dstack.toml`` (or the ``agent.json`` dstack-util writes), recognised by its
  profile tables (``default``, ``internal``, ``internal-v0``, ``external``, ...): see
  :func:`translate_upstream_config`. Keys that have no meaning here are reported in the
  log and otherwise ignored, so upstream's file works unchanged.

Several files may be given; later ones override earlier ones key by key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from .errors import ConfigurationError
from .types import PlatformConfig

__all__ = [
    "ConnectionLimits",
    "Settings",
    "load_settings",
    "translate_upstream_config",
    "PLATFORM_ENV",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE_DIR",
]

log = logging.getLogger(__name__)

PLATFORM_ENV: Final = "DSTACK_PLATFORM"
DEFAULT_SOCKET: Final = Path("/var/run/dstack.sock")
DEFAULT_STATE_DIR: Final = Path("/var/lib/dstack-core")
DEFAULT_SOCKET_MODE: Final = 0o660
DEFAULT_MAX_BODY: Final = 10 * 1024 * 1024
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107

_PATH_KEYS: Final = (
    "socket", "state_dir", "appkeys", "app_compose", "sys_config", "runtime_log", "policy",
    "audit_log", "tappd_socket",
)
ATTESTATION_FORMATS: Final = ("dstack-core", "upstream")
DEFAULT_KMS_TIMEOUT: Final = 10.0
"""Seconds a whole KMS SignCert exchange (connect, TLS, request, answer) may take."""
MAX_KMS_TIMEOUT: Final = 300.0
DEFAULT_DATA_DISKS: Final = (Path("/"),)
# A string "false" must not turn into a truthy reset_state, so file values are type-checked.
_KEY_TYPES: Final[Mapping[str, type | tuple[type, ...]]] = {
    **dict.fromkeys(_PATH_KEYS, str),
    "platform": str,
    "socket_mode": (str, int),
    "listen": str,
    "max_body_size": int,
    "platform_options": dict,
    "reset_state": bool,
    "external_listen": str,
    "attestation_format": str,
    "kms_timeout": (int, float),
    "data_disks": list,
    "allow_missing_verifier": bool,
    "idle_timeout": (int, float),
    "header_timeout": (int, float),
    "body_timeout": (int, float),
    "send_timeout": (int, float),
    "max_connections": int,
}
_TIMEOUT_KEYS: Final = ("idle_timeout", "header_timeout", "body_timeout", "send_timeout")
MAX_TIMEOUT: Final = 86400.0


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """How long a client connection may take and how many may be open at once.

    The server's defence against idle, slow and too many connections (docs/api.md,
    "Connections"); every value has a ``serve`` flag and a config file key of its name.

    :ivar idle_timeout: seconds a connection may wait for its first or next request.
    :ivar header_timeout: seconds from a request's first byte to the end of its head.
    :ivar body_timeout: seconds from the end of the head to the end of the body.
    :ivar send_timeout: seconds an answer may wait for a client that reads none of it.
    :ivar max_connections: connections open at once; the agent lowers it further to fit
        its open-file limit (RLIMIT_NOFILE).
    """

    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    max_connections: int = 1024


# Upstream's dstack.toml: figment profiles. [default] applies to every listener, each
# listener reads its own profile over it, [global] overrides all.
_UPSTREAM_PROFILES: Final = ("default", "global", "internal", "internal-v0", "external", "guest-api")
_UPSTREAM_CORE_KEYS: Final = {
    "keys_file": "appkeys",
    "compose_file": "app_compose",
    "sys_config_file": "sys_config",
    "data_disks": "data_disks",
}
# Rocket server settings upstream's image sets: they tune Rocket, which we do not run.
_ROCKET_KEYS: Final = frozenset({
    "workers", "max_blocking", "ident", "temp_dir", "keep_alive", "log_level", "limits",
    "cli_colors", "ip_header", "proxy_proto_header", "shutdown", "reuse",
})


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
    tappd_socket: Path | None = None
    external_listen: tuple[str, int] | None = None
    attestation_format: str = "dstack-core"
    kms_timeout: float = DEFAULT_KMS_TIMEOUT
    data_disks: tuple[Path, ...] = DEFAULT_DATA_DISKS
    allow_missing_verifier: bool = False
    """Start even when no verifier plugin for the platform's evidence format is installed."""
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)

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


def _parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{flag} must be HOST:PORT, got {value!r}")
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


def _parse_limits(merged: Mapping[str, Any]) -> ConnectionLimits:
    values: dict[str, Any] = {}
    for key in _TIMEOUT_KEYS:
        if key in merged:
            value = merged[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 < value <= MAX_TIMEOUT
            ):
                raise ConfigurationError(
                    f"{key} must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {value!r}"
                )
            values[key] = float(value)
    if "max_connections" in merged:
        count = merged["max_connections"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"max_connections must be a positive integer, got {count!r}")
        values["max_connections"] = count
    return ConnectionLimits(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from None
    import tomllib  # only with a config file, so a plain ``serve`` starts faster

    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"config file {path} must hold a table/object")
    if any(key in _UPSTREAM_PROFILES for key in doc):
        ours = {k: v for k, v in doc.items() if k in _KEY_TYPES}
        translated, ignored, unknown_upstream = translate_upstream_config(doc)
        unknown_upstream += [k for k in doc if k not in _KEY_TYPES and k not in _UPSTREAM_PROFILES]
        if ignored:
            log.info("config file %s: upstream settings with no effect here: %s",
                     path, ", ".join(ignored))
        if unknown_upstream:
            log.warning("config file %s: unknown keys ignored: %s", path, ", ".join(unknown_upstream))
        return {**_check_keys(path, ours), **_check_keys(path, translated)}
    return _check_keys(path, doc)


def _check_keys(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
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
    if not all(isinstance(v, str) for v in doc.get("data_disks", [])):
        raise ConfigurationError(f"config file {path}: data_disks must be a list of paths")
    return doc


def _table(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigurationError(f"upstream config: {where} must be a table")
    return value


def _unix_or_tcp(profile: Mapping[str, Any], name: str) -> tuple[str, str | None]:
    """A Rocket listener: ``("unix", path)`` or ``("tcp", "host:port")``."""
    address = profile.get("address")
    if not isinstance(address, str):
        raise ConfigurationError(f"upstream config: [{name}] address must be a string")
    if address.startswith("unix:"):
        return "unix", address.removeprefix("unix:")
    port = profile.get("port")
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigurationError(f"upstream config: [{name}] needs an integer port")
    host = f"[{address}]" if ":" in address else address
    return "tcp", f"{host}:{port}"


def translate_upstream_config(doc: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Map upstream's ``dstack.toml`` profiles onto our keys.

    * ``[default.core]`` (``[global.core]`` over it): ``keys_file`` -> ``appkeys``,
      ``compose_file`` -> ``app_compose``, ``sys_config_file`` -> ``sys_config``,
      ``data_disks`` -> ``data_disks``;
    * ``[internal]`` ``address = "unix:PATH"`` -> ``socket`` (a TCP address -> ``listen``);
    * ``[internal-v0]`` ``address = "unix:PATH"`` -> ``tappd_socket``;
    * ``[external]`` ``address`` + ``port`` -> ``external_listen``.

    :returns: our keys, the upstream keys that have no effect here (Rocket tuning, the
        vsock guest API), and the keys nobody knows; the last two as dotted paths.
    :raises ConfigurationError: a mapped key with the wrong type.
    """
    ours: dict[str, Any] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    core: dict[str, tuple[Any, str]] = {}
    listeners: dict[str, dict[str, Any]] = {}
    base = {**_table(doc, "default", "[default]")}
    top = {**_table(doc, "global", "[global]")}
    for profile in _UPSTREAM_PROFILES:
        table = _table(doc, profile, f"[{profile}]")
        for key, value in table.items():
            where = f"{profile}.{key}"
            if key == "core" and profile in ("default", "global"):
                core.update(
                    {k: (v, f"{where}.{k}") for k, v in _table(table, "core", f"[{where}]").items()}
                )
            elif key in ("address", "port"):
                pass
            elif key in _ROCKET_KEYS:
                ignored.append(where)
            else:
                unknown.append(where)
        if profile not in ("default", "global"):
            listeners[profile] = {
                k: v for k, v in {**base, **table, **top}.items() if k in ("address", "port")
            }
    for key, (value, where) in core.items():
        target = _UPSTREAM_CORE_KEYS.get(key)
        if target is None:
            unknown.append(where)
            continue
        if target == "data_disks":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigurationError(f"upstream config: {where} must be a list of paths")
        elif not isinstance(value, str):
            raise ConfigurationError(f"upstream config: {where} must be a string")
        ours[target] = value
    for profile, target in (("internal", "socket"), ("internal-v0", "tappd_socket"),
                            ("external", "external_listen")):
        if profile not in doc or "address" not in listeners[profile]:
            continue
        kind, value = _unix_or_tcp(listeners[profile], profile)
        if profile == "external" and kind == "unix":
            raise ConfigurationError("upstream config: [external] must be a TCP address")
        if profile == "internal" and kind == "tcp":
            target = "listen"
        elif profile == "internal-v0" and kind == "tcp":
            raise ConfigurationError("upstream config: [internal-v0] must be a unix: address")
        ours[target] = value
    if "guest-api" in doc:
        ignored.append("guest-api (the vsock guest API is not served by dstack-core)")
    return ours, ignored, unknown


def load_settings(
    flags: Mapping[str, Any],
    *,
    config_file: Path | Sequence[Path] | None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flag values (``None`` = not given) over ``DSTACK_PLATFORM`` over the files
    (later files over earlier ones).

    :raises ConfigurationError: on an unreadable file, unknown keys or invalid values.
    """
    env = os.environ if environ is None else environ
    files = [config_file] if isinstance(config_file, Path) else list(config_file or ())
    merged: dict[str, Any] = {}
    for path in files:
        doc = _read_config_file(path)
        options = {**merged.get("platform_options", {}), **doc.get("platform_options", {})}
        merged.update(doc)
        if options:
            merged["platform_options"] = options
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
    values["allow_missing_verifier"] = bool(merged.get("allow_missing_verifier", False))
    if merged.get("external_listen"):
        values["external_listen"] = _parse_listen(
            str(merged["external_listen"]), "--external-listen"
        )
    if "attestation_format" in merged:
        if merged["attestation_format"] not in ATTESTATION_FORMATS:
            raise ConfigurationError(
                f"attestation_format must be one of {', '.join(ATTESTATION_FORMATS)}, "
                f"got {merged['attestation_format']!r}"
            )
        values["attestation_format"] = merged["attestation_format"]
    if "kms_timeout" in merged:
        timeout = merged["kms_timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= MAX_KMS_TIMEOUT
        ):
            raise ConfigurationError(f"kms_timeout must be seconds in (0, {MAX_KMS_TIMEOUT:g}]")
        values["kms_timeout"] = float(timeout)
    if merged.get("data_disks") is not None:
        values["data_disks"] = tuple(Path(d) for d in merged["data_disks"])
    values["limits"] = _parse_limits(merged)
    settings = Settings(**values)
    for socket_path in (settings.socket, settings.tappd_socket):
        if socket_path is not None and len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise ConfigurationError(
                f"socket path is longer than {MAX_SOCKET_PATH} bytes: {socket_path}"
            )
    if settings.tappd_socket is not None and settings.tappd_socket == settings.socket:
        raise ConfigurationError("--tappd-socket must differ from --socket")
    return settings
