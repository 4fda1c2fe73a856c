"""Kernel errnos to dstack-core errors (``dstack_core.kernel_errors``)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dstack_core.errors import PlatformBusy, PlatformError, PlatformUnsupported
from dstack_core.kernel_errors import ErrnoTable, errno_name, explain, kernel_error

TABLE: ErrnoTable = {
    errno.EBUSY: (PlatformBusy, "the device is busy; retry later"),
    errno.ENOTTY: (PlatformUnsupported, "the kernel has no such ioctl"),
}


class TestErrnoName:
    @pytest.mark.parametrize(
        ("code", "name"),
        [(errno.EBUSY, "EBUSY"), (errno.ENXIO, "ENXIO"), (None, "no errno"),
         (99999, "errno 99999")],
    )
    def test_names(self, code, name):
        """Known codes by name, unknown ones by number, None as "no errno"."""
        assert errno_name(code) == name


class TestExplain:
    def test_listed(self):
        """A listed errno gives its class and explanation."""
        assert explain(TABLE, OSError(errno.ENOTTY, "x")) == TABLE[errno.ENOTTY]

    def test_unlisted_uses_strerror(self):
        """An unlisted errno is a PlatformError with the kernel's strerror."""
        assert explain(TABLE, OSError(errno.EIO, "Input/output error")) == (
            PlatformError, "Input/output error"
        )

    def test_no_errno(self):
        """An OSError without an errno is a PlatformError described by its text."""
        assert explain(TABLE, OSError("short write")) == (PlatformError, "short write")


class TestKernelError:
    def test_message_shape(self):
        """<failure>: <explanation> (<ERRNO> <action> <path>), of the table's class."""
        exc = OSError(errno.EBUSY, "Device or resource busy")
        error = kernel_error(TABLE, "Widget failed", exc, "reading", Path("/sys/widget"))
        assert type(error) is PlatformBusy
        assert error.message == (
            "Widget failed: the device is busy; retry later (EBUSY reading /sys/widget)"
        )

    def test_unlisted(self):
        """An unlisted errno keeps the shape, with strerror as the explanation."""
        error = kernel_error(TABLE, "Widget failed", OSError(errno.EIO, "Input/output error"),
                             "on WIDGET_IOCTL", Path("/dev/widget"))
        assert type(error) is PlatformError
        assert error.message == (
            "Widget failed: Input/output error (EIO on WIDGET_IOCTL /dev/widget)"
        )
