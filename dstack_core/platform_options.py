"""Parsing the ``--platform-option KEY=VALUE`` settings that platform plugins share.

Each helper takes the plugin's name for its messages (``"tdx option root must not be
empty"``) and raises :class:`~dstack_core.errors.ConfigurationError`, so a plugin's
``Options.parse`` checks each option in its own order and stays a list of one-line calls.

It also holds the gate of ``sysio=fake``: the fake kernel of
:mod:`dstack_core.testing.fake_tee` is for tests only, so configuration alone can never
select it: the environment must also set :data:`ALLOW_FAKE_KERNEL_ENV` to ``1``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Final

from .errors import ConfigurationError
from .sysio import OsSysIO, SysIO

__all__ = [
    "ALLOW_FAKE_KERNEL_ENV",
    "SYSIO_CHOICES",
    "check_known",
    "open_sysio",
    "parse_count",
    "parse_flag",
    "parse_root",
    "parse_seconds",
    "parse_sysio",
]

ALLOW_FAKE_KERNEL_ENV: Final = "DSTACK_ALLOW_FAKE_KERNEL"
"""Only with this set to ``1`` does ``sysio=fake`` select the test-only fake kernel."""
SYSIO_CHOICES: Final = ("os", "fake")
"""Values of the ``sysio`` option: the real syscalls, or the test-only fake kernel."""

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})

log = logging.getLogger(__name__)


def check_known(plugin: str, options: Mapping[str, str], known: Collection[str]) -> None:
    """:raises ConfigurationError: ``options`` has a key not in ``known`` (all are named)."""
    unknown = set(options) - set(known)
    if unknown:
        raise ConfigurationError(
            f"unknown {plugin} options: {sorted(unknown)}; known: {sorted(known)}"
        )


def parse_root(plugin: str, value: str) -> Path:
    """The ``root`` option: the directory the kernel paths hang off.

    :raises ConfigurationError: an empty value.
    """
    if not value:
        raise ConfigurationError(f"{plugin} option root must not be empty")
    return Path(value)


def parse_flag(plugin: str, name: str, value: str) -> bool:
    """A boolean option: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``/empty,
    in any case.

    :raises ConfigurationError: anything else.
    """
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigurationError(f"{plugin} option {name} must be 0 or 1, got {value!r}")


def parse_seconds(plugin: str, name: str, value: str, *, maximum: float) -> float:
    """A duration option, in seconds.

    :returns: a number in ``(0, maximum]``.
    :raises ConfigurationError: not a number, or out of that range (NaN included).
    """
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= maximum:
        raise ConfigurationError(
            f"{plugin} option {name} must be seconds in (0, {maximum:g}], got {value!r}"
        )
    return seconds


def parse_count(plugin: str, name: str, value: str, *, maximum: int) -> int:
    """A count option: a decimal integer.

    :returns: a number in ``[0, maximum]``.
    :raises ConfigurationError: not a decimal integer, or out of that range.
    """
    count = int(value) if value.isascii() and value.isdigit() else -1
    if not 0 <= count <= maximum:
        raise ConfigurationError(
            f"{plugin} option {name} must be an integer in [0, {maximum}], got {value!r}"
        )
    return count


def parse_sysio(plugin: str, value: str) -> str:
    """The ``sysio`` option.

    :returns: one of :data:`SYSIO_CHOICES`.
    :raises ConfigurationError: anything else.
    """
    if value not in SYSIO_CHOICES:
        raise ConfigurationError(
            f"{plugin} option sysio must be 'os' or 'fake', got {value!r}"
        )
    return value


def open_sysio(plugin: str, sysio: str, root: Path, fake: Callable[[Path], SysIO]) -> SysIO:
    """The syscall seam the ``sysio`` option selects.

    :param sysio: ``os`` or ``fake`` (as :func:`parse_sysio` returns).
    :param fake: opens the plugin's fake kernel under ``root``; called only once the gate
        is passed, so it may import :mod:`dstack_core.testing` lazily. It raises
        :class:`FileNotFoundError` when ``root`` holds no fake machine.
    :returns: :class:`~dstack_core.sysio.OsSysIO` for ``os``; the fake kernel, with a
        warning in the log, for ``fake``.
    :raises ConfigurationError: ``fake`` without :data:`ALLOW_FAKE_KERNEL_ENV` set to ``1``,
        or no fake machine under ``root``.
    """
    if sysio != "fake":
        return OsSysIO()
    if os.environ.get(ALLOW_FAKE_KERNEL_ENV) != "1":
        raise ConfigurationError(
            f"{plugin} option sysio=fake selects the fake kernel of dstack_core.testing, "
            "which is for tests only; refusing it (a test environment sets "
            f"{ALLOW_FAKE_KERNEL_ENV}=1)"
        )
    try:
        io = fake(root)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{plugin} option sysio=fake: {exc}") from None
    log.warning(
        "TEST ONLY: platform %s runs on the FAKE kernel under %s, not on hardware", plugin, root
    )
    return io
