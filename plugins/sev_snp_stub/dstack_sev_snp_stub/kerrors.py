"""Kernel errnos, ``exitinfo2`` and firmware status codes to dstack-core errors.

The same errno means different things on the two interfaces, so each has its own table
(:func:`dstack_core.kernel_errors.kernel_error` builds the configfs messages). Every message
names the errno (and, for the device, ``fw_error``/``vmm_error``) and the path, so an
operator can match it with the kernel's documentation. Sources: spec
``linux-tee-interfaces.md`` sections 1.3, 4.1 and 4.4.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

from dstack_core.errors import DstackError, PlatformBusy, PlatformError, PlatformUnsupported
from dstack_core.kernel_errors import PERMISSION_DENIED, ErrnoTable, errno_name, explain

from .abi import (
    SEV_RET_NAMES,
    SNP_GUEST_VMM_ERR_BUSY,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    split_exitinfo2,
)

__all__ = ["CONFIGFS_ERRNOS", "firmware_status_error", "ioctl_error", "status_name"]

_VMPCK: Final = (
    "the kernel has disabled the guest's VMPCK after an earlier failed request: every SNP "
    "request fails until the guest reboots"
)
_NOT_REACHED: Final = 0xFF
"""The ``exitinfo2`` the kernel starts with: still 0xff means the firmware was not reached."""

CONFIGFS_ERRNOS: Final[ErrnoTable] = {
    errno.EBUSY: (PlatformBusy, "the report entry is busy (its generation would wrap); retry"),
    errno.EAGAIN: (PlatformBusy, "the SEV guest request service is busy; retry later"),
    errno.ETIMEDOUT: (
        PlatformBusy,
        "the host stayed busy for the kernel's 60 s; the kernel then disables the VMPCK",
    ),
    errno.EINVAL: (
        PlatformError,
        ("the kernel or firmware rejected the request as invalid (sev_guest needs exactly 64 "
        "bytes of inblob, a privlevel at or above privlevel_floor; firmware INVALID_PARAM or "
        "INVALID_KEY also read as EINVAL)"),
    ),
    errno.ENXIO: (
        PlatformError,
        ("no TSM provider is registered (the sev-guest driver is not loaded), or the firmware "
        "failed the report request"),
    ),
    errno.ENOTTY: (PlatformError, _VMPCK),
    errno.EIO: (PlatformError, "the guest request to the firmware failed"),
    errno.ENOMEM: (PlatformError, "the report is larger than the kernel's buffer"),
    errno.EFBIG: (PlatformError, "the report is larger than configfs-tsm can return"),
    errno.EINTR: (PlatformError, "the report request was interrupted by a signal"),
}
"""configfs-tsm report entries of ``sev_guest`` (``dstack_core.tsm.TSM_ERRNOS`` has the rest)."""

_IOCTL: Final[ErrnoTable] = {
    errno.EINVAL: (
        PlatformError,
        ("the kernel rejected the request as malformed (msg_version 0, a missing buffer, or a "
        "certificate length that is not page-aligned or over 16 KiB)"),
    ),
    errno.ENOTTY: (PlatformError, _VMPCK + " (or this kernel lacks the ioctl)"),
    errno.ETIMEDOUT: (
        PlatformBusy,
        "the host stayed busy for the kernel's 60 s; the kernel then disables the VMPCK",
    ),
    errno.EAGAIN: (PlatformBusy, "the host is busy; retry later"),
    errno.EBUSY: (PlatformBusy, "the host is busy; retry later"),
    errno.EIO: (PlatformError, "the guest request failed in the host or the firmware"),
    errno.EFAULT: (PlatformError, "the kernel could not access the request buffers"),
    errno.ENOMEM: (PlatformError, "the kernel ran out of memory"),
    errno.EACCES: (PlatformError, PERMISSION_DENIED),
    errno.EPERM: (PlatformError, PERMISSION_DENIED),
    errno.ENOENT: (PlatformUnsupported, "there is no /dev/sev-guest: not an SEV-SNP guest"),
    errno.ENODEV: (PlatformUnsupported, "there is no SEV guest device: not an SEV-SNP guest"),
    errno.ENXIO: (PlatformUnsupported, "the SEV guest device is not available"),
}


def status_name(status: int) -> str:
    """``INVALID_PARAM (0x16)`` for a firmware status code."""
    return f"{SEV_RET_NAMES.get(status, 'status')} ({status:#x})"


def ioctl_error(exc: OSError, exitinfo2: int, what: str, device: Path) -> DstackError:
    """The error for a failed ``/dev/sev-guest`` ioctl.

    :param exitinfo2: what the kernel copied back into the request (0 when it copied
        nothing): the firmware error in the low 32 bits, the VMM's in the high 32 bits.
    :param what: the request, e.g. ``"SNP_GET_REPORT"``.
    """
    cls, explanation = explain(_IOCTL, exc)
    fw_error, vmm_error = split_exitinfo2(exitinfo2)
    details = [errno_name(exc.errno)]
    if exitinfo2 == _NOT_REACHED:
        details.append("exitinfo2 0xff: the request did not reach the firmware")
    elif exitinfo2:
        if vmm_error == SNP_GUEST_VMM_ERR_BUSY:
            cls, explanation = PlatformBusy, "the host (VMM) is busy; retry later"
        elif vmm_error == SNP_GUEST_VMM_ERR_INVALID_LEN:
            explanation = "the host needs a larger certificate buffer"
        elif fw_error:
            explanation = (
                "the firmware failed the guest request; the kernel then disables the VMPCK "
                "until reboot"
            )
        details.append(f"fw_error {fw_error:#x}, vmm_error {vmm_error:#x}")
    return cls(f"{what} failed: {explanation} ({'; '.join(details)} on {device})")


def firmware_status_error(status: int, what: str) -> DstackError:
    """The error for a response whose firmware ``status`` is not SUCCESS (the ioctl
    itself succeeded: a payload error does not disable the VMPCK)."""
    hints = {
        0x16: "the firmware rejected a parameter (a VMPL below the guest's own, a guest SVN "
        "or TCB version above the launch values, reserved bits set)",
        0x27: "the firmware has no such key (e.g. no VM root key was installed at launch)",
    }
    hint = hints.get(status, "the firmware refused the request")
    return PlatformError(f"{what} failed: {hint} (firmware status {status_name(status)})")
