"""Crash-safe small files for durable state: write-then-rename, fsync'd, private modes;
and what a failed write of durable state tells the caller."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from .errors import StateError, StorageError
from .kernel_errors import errno_name

__all__ = [
    "STORAGE_ERRNOS",
    "atomic_write",
    "fsync_dir",
    "is_storage_fault",
    "read_or_create_secret",
    "storage_error",
]

STORAGE_ERRNOS: Final[Mapping[int, str]] = MappingProxyType({
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "input-output error",
    errno.EFBIG: "file too large",
})
"""Faults of the state directory the agent survives and repairs in-process."""


def is_storage_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the storage (:data:`STORAGE_ERRNOS`), not a bug."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def storage_error(exc: OSError, what: str) -> StorageError:
    """The wire error for a failed write of durable state.

    :param what: what could not be done, for people (``"the runtime event log could not
        be written"``); never a path. The errno's fixed description follows, never the
        exception's text, which carries paths.
    """
    reason = STORAGE_ERRNOS.get(exc.errno or 0, "storage failure")
    return StorageError(f"{what}: {reason} ({errno_name(exc.errno)})")


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    # Unique per writer (process and thread), so concurrent writers never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_or_create_secret(path: Path, size: int) -> bytes:
    """Read a ``size``-byte secret, creating it (mode 0600) if absent.

    Creation is exclusive, so two processes racing on a fresh state dir agree on one value.

    :raises StateError: the file exists with the wrong length.
    """
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        atomic_write(tmp, os.urandom(size), mode=0o600)
        try:
            # link() fails if the name exists: the first writer wins, whole, never half-written.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    data = path.read_bytes()
    if len(data) != size:
        raise StateError(f"{path} must hold exactly {size} bytes, found {len(data)}")
    return data
