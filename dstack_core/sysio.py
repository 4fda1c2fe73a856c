"""The syscall seam between TEE platform plugins and the Linux kernel.

Platform plugins that talk to kernel interfaces (configfs-tsm report entries, sysfs
measurement registers, ACPI tables, guest devices) do every kernel-facing syscall through a
:class:`SysIO`. Production passes :class:`OsSysIO`, which issues exactly the syscalls those
interfaces expect; tests pass :class:`dstack_core.testing.fake_tee.FakeKernelIO`, which
performs the same syscalls on a temporary tree and adds the kernel's side effects.

The operations are deliberately raw: errors come back as :class:`OSError` with the kernel's
``errno``, and mapping them to :mod:`dstack_core.errors` is the plugin's job, since only the
plugin knows what an ``EBUSY`` means on the file it touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

__all__ = ["READ_CHUNK", "OsSysIO", "SysIO"]

READ_CHUNK: Final = 1 << 16
"""Bytes asked for per ``read(2)``; reads loop until EOF, so this is not a size limit."""


@runtime_checkable
class SysIO(Protocol):
    """Kernel-facing filesystem and device operations, one method per syscall pattern."""

    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists (``stat(2)`` succeeds, following symlinks)."""

    def mkdir(self, path: Path) -> None:
        """``mkdir(2)``; on configfs this creates an item and its attribute files.

        :raises OSError: with the kernel's errno (``ENXIO``: no provider; ``EEXIST``).
        """

    def rmdir(self, path: Path) -> None:
        """``rmdir(2)``; on configfs this removes an item and its attribute files.

        :raises OSError: with the kernel's errno.
        """

    def read(self, path: Path) -> bytes:
        """Open read-only, ``read(2)`` until EOF on that one descriptor, close.

        There is no size limit: configfs snapshots a binary attribute per descriptor and
        TDX quotes may exceed 8 KiB. An empty result is returned as ``b""``.

        :raises OSError: with the kernel's errno (a quote failure surfaces here).
        """

    def write(self, path: Path, data: bytes) -> None:
        """Open write-only (no ``O_CREAT``/``O_TRUNC``), one ``write(2)`` at offset 0, close.

        On configfs binary attributes the kernel commits at ``close(2)`` and ignores the
        commit's errors, so success here does not mean the data was accepted.

        :raises OSError: with the kernel's errno, or ``EIO`` on a short write.
        """

    def ioctl(self, device: Path, request: int, arg: bytearray) -> int:
        """Open ``device`` read-write and ``ioctl(2)`` with ``arg`` as the in/out buffer.

        :returns: the ioctl's return value; ``arg`` holds what the kernel wrote back.
        :raises OSError: with the kernel's errno (``ENOTTY``: unknown request).
        """


class OsSysIO:
    """The real syscalls (:class:`SysIO` on the running kernel)."""

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, READ_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            # configfs commits binary attributes here, and drops the commit's errors.
            os.close(fd)
        if written != len(data):
            raise OSError(errno.EIO, f"short write: {written} of {len(data)} bytes", str(path))

    def ioctl(self, device: Path, request: int, arg: bytearray) -> int:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            return int(fcntl.ioctl(fd, request, arg, True))
        finally:
            os.close(fd)
