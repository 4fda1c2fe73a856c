"""Kernel errnos to dstack-core errors, with messages that say what went wrong and where.

The same errno means different things on different files (``ENXIO`` is "no provider" on a
configfs ``mkdir`` and "invalid operand" from the TDX module on an extend), so each kind of
operation has its own table. Every message names the errno and the path, so an operator can
match it with the kernel's documentation.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

from dstack_core.errors import DstackError, PlatformBusy, PlatformError, PlatformUnsupported

__all__ = ["errno_name", "extend_error", "quote_error", "register_error"]

_Entry = tuple[type[PlatformError], str]

_PERMISSION: Final = "permission denied: the agent must run as root"

_QUOTE: Final[dict[int, _Entry]] = {
    errno.EBUSY: (
        PlatformBusy,
        ("the TDX quote service is busy (a previous request is still in flight); retry later"),
    ),
    errno.EAGAIN: (PlatformBusy, "the TDX quote service is busy; retry later"),
    errno.EIO: (
        PlatformError,
        (
            "the host failed the GetQuote request; is the quote generation "
            "service (QGS) running on the host?"
        ),
    ),
    errno.ETIMEDOUT: (
        PlatformError,
        ("the host's quote generation service did not answer within the kernel's 30 s"),
    ),
    errno.EINTR: (PlatformError, "quote generation was interrupted by a signal"),
    errno.EINVAL: (
        PlatformError,
        (
            "the kernel rejected the quote request as invalid (TDX "
            "needs exactly 64 bytes of report data)"
        ),
    ),
    errno.ENXIO: (
        PlatformError,
        (
            "no TEE quote provider is registered with configfs-tsm: the "
            "tdx_guest driver is not loaded"
        ),
    ),
    errno.EFBIG: (
        PlatformError,
        (
            "the quote is larger than this kernel can return; a newer "
            "kernel is needed (Linux 7.0 raised the limit)"
        ),
    ),
    errno.ENOMEM: (PlatformError, "the kernel ran out of memory generating the quote"),
    errno.EACCES: (PlatformError, _PERMISSION),
    errno.EPERM: (PlatformError, _PERMISSION),
    errno.ENOENT: (
        PlatformError,
        ("the configfs-tsm interface is missing (is configfs mounted at /sys/kernel/config?)"),
    ),
    errno.EEXIST: (PlatformBusy, "a report entry of that name already exists; retry"),
}

_EXTEND: Final[dict[int, _Entry]] = {
    errno.EINVAL: (
        PlatformError,
        (
            "the kernel rejected the write as malformed (RTMR writes "
            "are exactly 48 bytes at offset 0)"
        ),
    ),
    errno.ENXIO: (PlatformError, "the TDX module rejected the extend (invalid operand)"),
    errno.EBUSY: (PlatformBusy, "the TDX module is busy; retry later"),
    errno.EAGAIN: (PlatformBusy, "the TDX module is busy; retry later"),
    errno.EIO: (PlatformError, "the TDX module failed the extend"),
    errno.EACCES: (
        PlatformError,
        ("permission denied: the register is read-only on this kernel, or the agent is not root"),
    ),
    errno.EPERM: (PlatformError, "the kernel does not allow user space to extend this register"),
    errno.ENOTTY: (PlatformUnsupported, "the kernel has no RTMR extend ioctl"),
    errno.ENOENT: (PlatformUnsupported, "the RTMR interface is missing"),
}

_REGISTER: Final[dict[int, _Entry]] = {
    errno.EBUSY: (PlatformBusy, "the TDX module is busy; retry later"),
    errno.EIO: (PlatformError, "the TDX module failed to report the registers"),
    errno.ENXIO: (PlatformError, "the TDX module rejected the report request"),
    errno.EACCES: (PlatformError, _PERMISSION),
    errno.EPERM: (PlatformError, _PERMISSION),
    errno.ENOTTY: (PlatformUnsupported, "the kernel has no TDX_CMD_GET_REPORT0 ioctl"),
    errno.ENOENT: (PlatformUnsupported, "the measurement register interface is missing"),
}


def errno_name(code: int | None) -> str:
    """``"EBUSY"`` for ``errno.EBUSY``; ``"errno N"`` for codes without a name."""
    if code is None:
        return "no errno"
    return errno.errorcode.get(code, f"errno {code}")


def _map(table: dict[int, _Entry], what: str, exc: OSError, action: str, path: Path) -> DstackError:
    cls, explanation = table.get(
        exc.errno if exc.errno is not None else -1, (PlatformError, exc.strerror or str(exc))
    )
    return cls(f"{what}: {explanation} ({errno_name(exc.errno)} {action} {path})")


def quote_error(exc: OSError, action: str, path: Path) -> DstackError:
    """The error for a failed configfs-tsm syscall while producing a quote.

    :param action: what was done, e.g. ``"reading"``, ``"creating"``.
    """
    return _map(_QUOTE, "TDX quote failed", exc, action, path)


def extend_error(exc: OSError, action: str, path: Path) -> DstackError:
    """The error for a failed RTMR extension (sysfs write or ioctl)."""
    return _map(_EXTEND, "RTMR3 extend failed", exc, action, path)


def register_error(exc: OSError, action: str, path: Path) -> DstackError:
    """The error for a failed read of the measurement registers."""
    return _map(_REGISTER, "reading the TDX measurement registers failed", exc, action, path)
