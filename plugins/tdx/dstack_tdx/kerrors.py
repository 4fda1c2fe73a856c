"""What kernel errnos mean on the TDX guest's interfaces, as dstack-core errors.

The same errno means different things on different files (``ENXIO`` is "no provider" on a
configfs ``mkdir`` and "invalid operand" from the TDX module on an extend), so each kind of
operation has its own table; :func:`dstack_core.kernel_errors.kernel_error` builds the
messages, which name the errno and the path.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

from dstack_core.errors import PlatformBusy, PlatformError, PlatformUnsupported
from dstack_core.kernel_errors import PERMISSION_DENIED, ErrnoTable, kernel_error

__all__ = ["QUOTE_ERRNOS", "extend_error", "register_error"]

QUOTE_ERRNOS: Final[ErrnoTable] = {
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
}
"""configfs-tsm report entries of ``tdx_guest`` (``dstack_core.tsm.TSM_ERRNOS`` has the rest)."""

_EXTEND: Final[ErrnoTable] = {
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

_REGISTER: Final[ErrnoTable] = {
    errno.EBUSY: (PlatformBusy, "the TDX module is busy; retry later"),
    errno.EIO: (PlatformError, "the TDX module failed to report the registers"),
    errno.ENXIO: (PlatformError, "the TDX module rejected the report request"),
    errno.EACCES: (PlatformError, PERMISSION_DENIED),
    errno.EPERM: (PlatformError, PERMISSION_DENIED),
    errno.ENOTTY: (PlatformUnsupported, "the kernel has no TDX_CMD_GET_REPORT0 ioctl"),
    errno.ENOENT: (PlatformUnsupported, "the measurement register interface is missing"),
}


def extend_error(exc: OSError, action: str, path: Path) -> PlatformError:
    """The error for a failed RTMR extension (sysfs write or ioctl)."""
    return kernel_error(_EXTEND, "RTMR3 extend failed", exc, action, path)


def register_error(exc: OSError, action: str, path: Path) -> PlatformError:
    """The error for a failed read of the measurement registers."""
    return kernel_error(
        _REGISTER, "reading the TDX measurement registers failed", exc, action, path
    )
