"""The ``/dev/sev-guest`` ABI: ioctl numbers, the uapi structs as ctypes, response layouts.

Source: ``include/uapi/linux/sev-guest.h`` (spec ``linux-tee-interfaces.md`` 4.1 and 5.1).
The structs are ctypes objects because the kernel dereferences the pointers inside
``snp_guest_request_ioctl``: ``req_data`` and ``resp_data`` must be real addresses of memory
that stays alive until the ioctl returns.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Final

__all__ = [
    "GUEST_FIELDS",
    "IOCTL_BUFFER_SIZE",
    "KEY_RESPONSE",
    "MSG_VERSION",
    "REPORT_RESPONSE_HEADER",
    "ROOT_KEY_VCEK",
    "ROOT_KEY_VMRK",
    "SEV_RET_NAMES",
    "SNP_GET_DERIVED_KEY",
    "SNP_GET_EXT_REPORT",
    "SNP_GET_REPORT",
    "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "SnpDerivedKeyReq",
    "SnpDerivedKeyResp",
    "SnpGuestRequestIoctl",
    "SnpReportReq",
    "SnpReportResp",
    "split_exitinfo2",
]


class SnpGuestRequestIoctl(ctypes.Structure):
    """``struct snp_guest_request_ioctl`` (32 bytes): msg_version at 0, 7 bytes of padding,
    req_data at 8, resp_data at 16, exitinfo2 (``fw_error`` low, ``vmm_error`` high) at 24."""

    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    ]


class SnpReportReq(ctypes.Structure):
    """``struct snp_report_req`` (96 bytes): user_data[64], vmpl, rsvd[28]."""

    _fields_ = [
        ("user_data", ctypes.c_uint8 * 64),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    ]


class SnpReportResp(ctypes.Structure):
    """``struct snp_report_resp`` (4000 bytes): the kernel copies all of it to user space."""

    _fields_ = [("data", ctypes.c_uint8 * 4000)]


class SnpDerivedKeyReq(ctypes.Structure):
    """``struct snp_derived_key_req`` (32 bytes)."""

    _fields_ = [
        ("root_key_select", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint32),
        ("guest_field_select", ctypes.c_uint64),
        ("vmpl", ctypes.c_uint32),
        ("guest_svn", ctypes.c_uint32),
        ("tcb_version", ctypes.c_uint64),
    ]


class SnpDerivedKeyResp(ctypes.Structure):
    """``struct snp_derived_key_resp`` (64 bytes): MSG_KEY_RSP."""

    _fields_ = [("data", ctypes.c_uint8 * 64)]


assert [ctypes.sizeof(s) for s in (SnpGuestRequestIoctl, SnpReportReq, SnpReportResp,
                                   SnpDerivedKeyReq, SnpDerivedKeyResp)] == [32, 96, 4000, 32, 64]
assert SnpGuestRequestIoctl.exitinfo2.offset == 24


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """``_IOC`` of asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr."""
    assert size < 1 << 14
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


_IOC_READ_WRITE: Final = 3
_REQUEST_SIZE: Final = ctypes.sizeof(SnpGuestRequestIoctl)
SNP_GET_REPORT: Final = _ioc(_IOC_READ_WRITE, "S", 0x0, _REQUEST_SIZE)
SNP_GET_DERIVED_KEY: Final = _ioc(_IOC_READ_WRITE, "S", 0x1, _REQUEST_SIZE)
SNP_GET_EXT_REPORT: Final = _ioc(_IOC_READ_WRITE, "S", 0x2, _REQUEST_SIZE)
assert (SNP_GET_REPORT, SNP_GET_DERIVED_KEY, SNP_GET_EXT_REPORT) == (
    0xC0205300, 0xC0205301, 0xC0205302)

MSG_VERSION: Final = 1
"""The SNP guest-message version; 0 is refused with EINVAL (the kernel and go-sev-guest use 1)."""

IOCTL_BUFFER_SIZE: Final = 4096
"""The 32-byte request struct is passed at the start of a buffer this large. CPython's
``fcntl.ioctl`` copies buffers of up to 1024 bytes through a temporary and, since the 2025
rewrite, copies it back only on success: the ``exitinfo2`` the kernel writes on failure
would be lost. A larger buffer is handed to the kernel directly (spec 5.2)."""

REPORT_RESPONSE_HEADER: Final = struct.Struct("<II24x")
"""MSG_REPORT_RSP: u32 status, u32 report_size, 24 reserved bytes; the report at 32."""
KEY_RESPONSE: Final = struct.Struct("<I28x32s")
"""MSG_KEY_RSP: u32 status, 28 reserved bytes, the 32-byte derived key at 0x20."""

ROOT_KEY_VCEK: Final = 0
ROOT_KEY_VMRK: Final = 1
GUEST_FIELDS: Final = {
    "policy": 1 << 0,
    "image_id": 1 << 1,
    "family_id": 1 << 2,
    "measurement": 1 << 3,
    "guest_svn": 1 << 4,
    "tcb_version": 1 << 5,
}
"""``guest_field_select`` bits: the guest fields the firmware mixes into a derived key."""

SNP_GUEST_VMM_ERR_INVALID_LEN: Final = 1
SNP_GUEST_VMM_ERR_BUSY: Final = 2

SEV_RET_NAMES: Final = {
    0x00: "SUCCESS",
    0x16: "INVALID_PARAM",
    0x27: "INVALID_KEY",
}
"""Names of the firmware status codes this plugin explains (the kernel's ``enum sev_ret_code``;
others are shown as numbers)."""


def split_exitinfo2(exitinfo2: int) -> tuple[int, int]:
    """``(fw_error, vmm_error)``: the low and high 32 bits."""
    return exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32
