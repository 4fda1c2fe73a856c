"""The TDX measurement registers: read MRTD and RTMR0..3, extend RTMR3.

Two kernel interfaces (spec 2.1, 2.2, 2.4):

* **sysfs** (mainline, Linux 6.16+): ``.../tdx_guest/measurements/{mrtd,rtmr0..3}:sha384``
  read as 48 raw bytes; writing exactly 48 bytes at offset 0 to ``rtmrN:sha384`` extends it.
* **ioctl** (legacy, opt-in): ``TDX_CMD_GET_REPORT0`` (mainline since 6.2) gives a TDREPORT
  with the registers; ``TDX_CMD_EXTEND_RTMR`` exists only on Intel out-of-tree kernels,
  with ``_IOW`` or ``_IOR`` encodings depending on the variant, so both are tried.

Only RTMR3 is ever extended, whatever the caller asks: RTMR0..2 belong to firmware and
kernel, and the upstream kernel would let root write them.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import struct
import threading
from pathlib import Path
from typing import Final, Literal

from dstack_core.errors import InvalidRequest, PlatformError
from dstack_core.sysio import SysIO
from dstack_core.types import RTMR_LENGTH, Measurements

from .kerrors import extend_error, register_error

__all__ = [
    "RUNTIME_RTMR",
    "TDX_CMD_EXTEND_RTMR_IOR",
    "TDX_CMD_EXTEND_RTMR_IOW",
    "TDX_CMD_GET_REPORT0",
    "ExtendMethod",
    "MeasurementRegisters",
]

RUNTIME_RTMR: Final = 3
"""The only register the plugin extends."""


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

TDX_REPORT_REQ: Final = struct.Struct("<64s1024s")
"""``struct tdx_report_req { u8 reportdata[64]; u8 tdreport[1024]; }``."""
TDX_EXTEND_RTMR_REQ: Final = struct.Struct("<48sB")
"""Intel out-of-tree ``struct tdx_extend_rtmr_req { u8 data[48]; u8 index; }``."""
TDX_CMD_GET_REPORT0: Final = _ioc(_IOC_READ | _IOC_WRITE, "T", 1, TDX_REPORT_REQ.size)
TDX_CMD_EXTEND_RTMR_IOW: Final = _ioc(_IOC_WRITE, "T", 3, TDX_EXTEND_RTMR_REQ.size)
TDX_CMD_EXTEND_RTMR_IOR: Final = _ioc(_IOC_READ, "T", 3, TDX_EXTEND_RTMR_REQ.size)

TDREPORT_MRTD: Final = 528
"""Offset of MRTD in the TDREPORT (TDINFO starts at 512: attributes, xfam, mrtd, ...)."""
TDREPORT_RTMR0: Final = 720
"""Offset of RTMR0 in the TDREPORT; RTMR1..3 follow, 48 bytes each."""

ExtendMethod = Literal["sysfs", "ioctl"]

log = logging.getLogger(__name__)


class MeasurementRegisters:
    """Reads the TD's registers and extends RTMR3 through one kernel interface.

    :param io: the syscall seam.
    :param measurements_dir: the sysfs directory, or None when the kernel has none.
    :param device: ``/dev/tdx_guest`` (used when ``measurements_dir`` is None).
    """

    def __init__(self, io: SysIO, *, measurements_dir: Path | None, device: Path) -> None:
        self.io = io
        self.measurements_dir = measurements_dir
        self.device = device
        self.method: ExtendMethod = "sysfs" if measurements_dir is not None else "ioctl"
        self._extend_requests = [TDX_CMD_EXTEND_RTMR_IOW, TDX_CMD_EXTEND_RTMR_IOR]
        self._lock = threading.Lock()

    # --- reading ---

    def read(self) -> Measurements:
        """MRTD and RTMR0..3, as the TDX module holds them now.

        :raises PlatformError: the kernel failed the read (message names errno and path).
        """
        if self.measurements_dir is not None:
            mrtd = self._read_file(self.measurements_dir / "mrtd:sha384")
            r0, r1, r2, r3 = (self._read_file(self._rtmr_file(i)) for i in range(4))
            return Measurements(mrtd=mrtd, rtmrs=(r0, r1, r2, r3))
        report = self._tdreport()
        r0, r1, r2, r3 = (
            report[TDREPORT_RTMR0 + i * RTMR_LENGTH : TDREPORT_RTMR0 + (i + 1) * RTMR_LENGTH]
            for i in range(4)
        )
        return Measurements(
            mrtd=report[TDREPORT_MRTD : TDREPORT_MRTD + RTMR_LENGTH],
            rtmrs=(r0, r1, r2, r3),
        )

    def read_rtmr3(self) -> bytes:
        """RTMR3 alone (one sysfs read, or one TDREPORT)."""
        if self.measurements_dir is not None:
            return self._read_file(self._rtmr_file(RUNTIME_RTMR))
        return self.read().rtmrs[RUNTIME_RTMR]

    def _rtmr_file(self, index: int) -> Path:
        assert self.measurements_dir is not None
        return self.measurements_dir / f"rtmr{index}:sha384"

    def _read_file(self, path: Path) -> bytes:
        try:
            value = self.io.read(path)
        except OSError as exc:
            raise register_error(exc, "reading", path) from exc
        if len(value) != RTMR_LENGTH:
            raise PlatformError(
                f"reading the TDX measurement registers failed: {path} gave {len(value)} "
                f"bytes, not {RTMR_LENGTH}"
            )
        return value

    def _tdreport(self) -> bytes:
        request = bytearray(TDX_REPORT_REQ.size)
        try:
            self.io.ioctl(self.device, TDX_CMD_GET_REPORT0, request)
        except OSError as exc:
            raise register_error(exc, "on TDX_CMD_GET_REPORT0", self.device) from exc
        return bytes(request[64:])

    # --- extending ---

    def extend(self, index: int, digest: bytes) -> None:
        """``RTMR3 = SHA384(RTMR3 || digest)``, then read back to confirm.

        :raises InvalidRequest: an index other than 3 or a digest that is not 48 bytes.
        :raises PlatformBusy: the TDX module is busy.
        :raises PlatformError: the kernel refused; the register did not move.
        """
        if index != RUNTIME_RTMR:
            raise InvalidRequest(
                f"only RTMR{RUNTIME_RTMR} may be extended at runtime, not RTMR{index}: "
                "RTMR0-2 hold the firmware and kernel measurements"
            )
        if len(digest) != RTMR_LENGTH:
            raise InvalidRequest(f"an RTMR digest is {RTMR_LENGTH} bytes, got {len(digest)}")
        with self._lock:
            before = self.read_rtmr3()
            if self.method == "sysfs":
                self._extend_sysfs(bytes(digest))
            else:
                self._extend_ioctl(bytes(digest))
            self._confirm(before, bytes(digest))

    def _extend_sysfs(self, digest: bytes) -> None:
        path = self._rtmr_file(RUNTIME_RTMR)
        try:
            self.io.write(path, digest)
        except OSError as exc:
            raise extend_error(exc, "writing", path) from exc

    def _extend_ioctl(self, digest: bytes) -> None:
        last: OSError | None = None
        for request in list(self._extend_requests):
            arg = bytearray(TDX_EXTEND_RTMR_REQ.pack(digest, RUNTIME_RTMR))
            try:
                self.io.ioctl(self.device, request, arg)
            except OSError as exc:
                if exc.errno == errno.ENOTTY:
                    last = exc
                    continue
                raise extend_error(exc, f"on TDX_CMD_EXTEND_RTMR {request:#x}", self.device) from exc
            self._extend_requests = [request]  # remember the encoding this kernel speaks
            return
        assert last is not None
        raise extend_error(last, "on TDX_CMD_EXTEND_RTMR (_IOW and _IOR)", self.device) from last

    def _confirm(self, before: bytes, digest: bytes) -> None:
        """Best effort: the extend succeeded, so a failed read-back must not undo it."""
        try:
            after = self.read_rtmr3()
        except PlatformError as exc:
            log.warning("RTMR3 extended but could not be read back: %s", exc)
            return
        expected = hashlib.sha384(before + digest).digest()
        if hmac.compare_digest(after, expected):
            return
        if hmac.compare_digest(after, before):
            raise PlatformError(
                "RTMR3 extend failed: the kernel accepted the write but RTMR3 did not change"
            )
        log.error(
            "RTMR3 moved by more than our extend (someone else extended it concurrently): "
            "expected %s, read %s; the runtime event log can no longer replay to it",
            expected.hex(), after.hex(),
        )
