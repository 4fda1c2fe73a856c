"""``/dev/sev-guest``: SNP_GET_REPORT and SNP_GET_DERIVED_KEY (Linux 5.19+).

Each request builds the uapi structs as ctypes objects, points ``req_data``/``resp_data``
at them, and hands the 32-byte ``snp_guest_request_ioctl`` to the kernel at the start of a
4096-byte buffer, so that CPython passes the buffer itself and the ``exitinfo2`` the kernel
writes back on failure is not lost (spec 5.2). The response buffers are full-size (4000
and 64 bytes): the kernel copies that much whatever the caller allocated.

Requests are checked before they are sent: a request the firmware would reject at the
transport level disables the guest's VMPCK until reboot (spec 4.1), so nothing malformed
may leave here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Final

from dstack_core.errors import InvalidRequest, PlatformError
from dstack_core.snp import REPORT_SIZE
from dstack_core.sysio import SysIO
from dstack_core.types import REPORT_DATA_LENGTH

from .abi import (
    GUEST_FIELDS,
    IOCTL_BUFFER_SIZE,
    KEY_RESPONSE,
    MSG_VERSION,
    REPORT_RESPONSE_HEADER,
    ROOT_KEY_VCEK,
    ROOT_KEY_VMRK,
    SNP_GET_DERIVED_KEY,
    SNP_GET_REPORT,
    SnpDerivedKeyReq,
    SnpDerivedKeyResp,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
)
from .kerrors import firmware_status_error, ioctl_error

__all__ = ["MAX_VMPL", "SevGuestDevice"]

MAX_VMPL: Final = 3
_ALL_FIELDS: Final = sum(GUEST_FIELDS.values())
_STATUS_SUCCESS: Final = 0


class SevGuestDevice:
    """Guest requests through ``/dev/sev-guest``. Not thread-safe: callers serialise.

    :param io: the syscall seam.
    :param path: ``<root>/dev/sev-guest``.
    """

    def __init__(self, io: SysIO, path: Path) -> None:
        self.io = io
        self.path = path

    def _request(
        self, request: int, what: str, req: ctypes.Structure, resp: ctypes.Structure
    ) -> None:
        buffer = bytearray(IOCTL_BUFFER_SIZE)
        outer = SnpGuestRequestIoctl.from_buffer(buffer)
        outer.msg_version = MSG_VERSION
        outer.req_data = ctypes.addressof(req)
        outer.resp_data = ctypes.addressof(resp)
        outer.exitinfo2 = 0
        try:
            self.io.ioctl(self.path, request, buffer)
        except OSError as exc:
            raise ioctl_error(exc, outer.exitinfo2, what, self.path) from exc

    def report(self, report_data: bytes, *, vmpl: int) -> bytes:
        """An attestation report over ``report_data`` at ``vmpl`` (SNP_GET_REPORT).

        :returns: the bare 1184-byte report (the MSG_REPORT_RSP header stripped).
        :raises InvalidRequest: report data that is not 64 bytes, a VMPL outside 0..3.
        :raises PlatformError: the kernel or firmware failed (the message names which).
        """
        if len(report_data) != REPORT_DATA_LENGTH:
            raise InvalidRequest(
                f"SNP report data must be exactly {REPORT_DATA_LENGTH} bytes, "
                f"got {len(report_data)}"
            )
        if not 0 <= vmpl <= MAX_VMPL:
            raise InvalidRequest(f"VMPL must be 0..{MAX_VMPL}, got {vmpl}")
        req = SnpReportReq()
        ctypes.memmove(req.user_data, report_data, REPORT_DATA_LENGTH)
        req.vmpl = vmpl
        resp = SnpReportResp()
        self._request(SNP_GET_REPORT, "SNP_GET_REPORT", req, resp)
        raw = bytes(resp.data)
        status, size = REPORT_RESPONSE_HEADER.unpack_from(raw, 0)
        if status != _STATUS_SUCCESS:
            raise firmware_status_error(status, "SNP_GET_REPORT")
        start = REPORT_RESPONSE_HEADER.size
        if size != REPORT_SIZE:
            raise PlatformError(
                f"SNP_GET_REPORT failed: the firmware says the report is {size} bytes, "
                f"not {REPORT_SIZE}"
            )
        return raw[start : start + size]

    def derived_key(
        self,
        *,
        root_key: int,
        fields: int,
        vmpl: int,
        guest_svn: int = 0,
        tcb_version: int = 0,
    ) -> bytes:
        """A 32-byte key the firmware derives (SNP_GET_DERIVED_KEY).

        :param root_key: :data:`~.abi.ROOT_KEY_VCEK` or :data:`~.abi.ROOT_KEY_VMRK`.
        :param fields: ``guest_field_select``: which guest fields are mixed in.
        :param vmpl: at or above the guest's VMPL.
        :param guest_svn: at most the launch SVN (mixed in only when selected).
        :param tcb_version: at most the committed TCB (mixed in only when selected).
        :raises InvalidRequest: a value that would make the firmware reject the request.
        :raises PlatformError: the kernel or firmware failed.
        """
        if root_key not in (ROOT_KEY_VCEK, ROOT_KEY_VMRK):
            raise InvalidRequest(f"root key select must be VCEK (0) or VMRK (1), got {root_key}")
        if fields & ~_ALL_FIELDS:
            raise InvalidRequest(f"unknown guest_field_select bits {fields & ~_ALL_FIELDS:#x}")
        if not 0 <= vmpl <= MAX_VMPL:
            raise InvalidRequest(f"VMPL must be 0..{MAX_VMPL}, got {vmpl}")
        req = SnpDerivedKeyReq(
            root_key_select=root_key,
            guest_field_select=fields,
            vmpl=vmpl,
            guest_svn=guest_svn,
            tcb_version=tcb_version,
        )
        resp = SnpDerivedKeyResp()
        self._request(SNP_GET_DERIVED_KEY, "SNP_GET_DERIVED_KEY", req, resp)
        status, key = KEY_RESPONSE.unpack(bytes(resp.data))
        if status != _STATUS_SUCCESS:
            raise firmware_status_error(status, "SNP_GET_DERIVED_KEY")
        return bytes(key)
