"""Kernel errnos to :mod:`dstack_core.errors`, for plugins that talk to Linux interfaces.

A :class:`~dstack_core.sysio.SysIO` raises the kernel's :class:`OSError` as is, because
only the plugin knows what an errno means on the file it touched (``ENXIO`` is "no
provider" on a configfs ``mkdir`` and "invalid operand" from the TDX module on an RTMR
extend). A plugin therefore keeps one :data:`ErrnoTable` per kind of operation and builds
its errors with :func:`kernel_error`, so that every message has the same shape and names
the errno, the action and the path: an operator can match it with the kernel's
documentation.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeAlias

from .errors import PlatformError

__all__ = [
    "PERMISSION_DENIED",
    "ErrnoEntry",
    "ErrnoTable",
    "errno_name",
    "explain",
    "kernel_error",
]

ErrnoEntry: TypeAlias = tuple[type[PlatformError], str]
"""The error class an errno maps to, and the explanation its message gives."""
ErrnoTable: TypeAlias = Mapping[int, ErrnoEntry]
"""What each errno means for one kind of operation."""

PERMISSION_DENIED: Final = "permission denied: the agent must run as root"
"""The explanation for ``EACCES``/``EPERM`` on root-only kernel files."""

_NO_ERRNO: Final = -1


def errno_name(code: int | None) -> str:
    """``"EBUSY"`` for ``errno.EBUSY``; ``"errno N"`` for codes without a name.

    :returns: ``"no errno"`` for None, never an empty string.
    """
    if code is None:
        return "no errno"
    return errno.errorcode.get(code, f"errno {code}")


def explain(table: ErrnoTable, exc: OSError) -> ErrnoEntry:
    """The class and explanation ``table`` gives ``exc``'s errno.

    :returns: for an errno the table does not list (or none), :class:`PlatformError` with
        the kernel's own ``strerror``.
    """
    code = exc.errno if exc.errno is not None else _NO_ERRNO
    return table.get(code, (PlatformError, exc.strerror or str(exc)))


def kernel_error(
    table: ErrnoTable, failure: str, exc: OSError, action: str, path: Path
) -> PlatformError:
    """The error for a failed syscall: ``"<failure>: <explanation> (<ERRNO> <action> <path>)"``.

    :param failure: what failed, e.g. ``"TDX quote failed"``.
    :param action: what was done to ``path``, e.g. ``"reading"``, ``"creating"``,
        ``"on TDX_CMD_GET_REPORT0"``.
    :returns: an instance of the class :func:`explain` chooses; the caller raises it
        ``from exc``.
    """
    cls, explanation = explain(table, exc)
    return cls(f"{failure}: {explanation} ({errno_name(exc.errno)} {action} {path})")
