"""A fault-injecting file system for tests of the real daemon: the kernel's side of a full,
read-only, forbidden or failing state directory, without mounting anything.

Where a test may mount a tiny tmpfs it should (the real kernel fills up and goes
read-only); where it may not (CI without ``CAP_SYS_ADMIN``), this module stands in. It
wraps the :mod:`os` calls that change files (``open`` for writing, ``write``, ``pwrite``,
``ftruncate``, ``fsync``, ``fdatasync``, ``fchmod``, ``rename``, ``replace``, ``link``,
``unlink``, ``mkdir``) so that, for files below one directory, they fail with the errno a
control file names, where the kernel would report it: ENOSPC, EDQUOT and EIO fail writes
and syncs (opening and renaming still work); EACCES and EPERM fail opening for writing and
changes to directory entries (descriptors already open keep working); EROFS fails all of
them. Reads are never failed, and an operation the kernel would refuse anyway (``mkdir``
of an existing directory, ``unlink`` of a missing file) gets the kernel's own error. The agent's code is not touched: it runs as in production and
meets the errors where the kernel would raise them.

Run the agent through it::

    python -m dstack_core.testing.faultfs CONTROL ROOT serve --platform simulator ...

and steer it from the test with :class:`FaultControl`. The control file holds JSON
``{"errno": "ENOSPC", "names": ["runtime_events.log"]}`` (``names``: file names to fail,
empty for every file below ``ROOT``); a missing or empty file means no fault.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["FaultControl", "install", "main"]

_WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_DATA: Final = "data"  # write, sync and truncate on an open descriptor
_ENTRY: Final = "entry"  # open for writing, create, rename, link, unlink
_KINDS: Final = {
    errno.ENOSPC: {_DATA},
    errno.EDQUOT: {_DATA},
    errno.EIO: {_DATA},
    errno.EACCES: {_ENTRY},
    errno.EPERM: {_ENTRY},
    errno.EROFS: {_DATA, _ENTRY},
}


class FaultControl:
    """The test's handle on a control file.

    :param path: the control file (outside the faulty directory).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clear()

    def inject(self, code: int, *names: str) -> None:
        """Fail changes to ``names`` (all files when none) with ``code`` from now on."""
        self._write({"errno": errno.errorcode[code], "names": list(names)})

    def clear(self) -> None:
        """Remove the fault."""
        self._write({})

    def _write(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)


class _Faults:
    def __init__(self, control: Path, root: Path) -> None:
        self.control = control
        self.root = os.path.abspath(root) + os.sep
        self.fds: dict[int, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._fault: tuple[int, frozenset[str]] | None = None

    def current(self) -> tuple[int, frozenset[str]] | None:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                doc = json.loads(Path(self.control).read_text() or "{}")
            except ValueError:
                doc = {}
            code = getattr(errno, doc.get("errno", ""), None) if doc.get("errno") else None
            self._fault = None if code is None else (code, frozenset(doc.get("names", ())))
        return self._fault

    def check(self, path: str | None, kind: str) -> None:
        if path is None or not path.startswith(self.root):
            return
        fault = self.current()
        if fault is None:
            return
        code, names = fault
        if kind not in _KINDS.get(code, {_DATA, _ENTRY}):
            return
        if not names or os.path.basename(path) in names:
            raise OSError(code, os.strerror(code), path)


def _path(value: Any) -> str | None:
    if isinstance(value, int):
        return None
    try:
        return os.path.abspath(os.fsdecode(value))
    except TypeError:
        return None


def install(control: Path, root: Path) -> None:
    """Wrap this process's :mod:`os` calls so that changes below ``root`` obey ``control``."""
    faults = _Faults(control, root)
    real: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        real[name] = getattr(os, name)
        setattr(os, name, make(real[name]))

    def wrap_open(original: Callable[..., Any]) -> Callable[..., Any]:
        def open_(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
            target = _path(path)
            creates = flags & os.O_CREAT and target is not None and not os.path.lexists(target)
            if flags & _WRITE_FLAGS or creates:
                faults.check(target, _ENTRY)
            fd: int = original(path, flags, mode, *args, **kwargs)
            if target is not None and target.startswith(faults.root):
                faults.fds[fd] = target
            return fd
        return open_

    def wrap_close(original: Callable[..., Any]) -> Callable[..., Any]:
        def close(fd: int) -> None:
            faults.fds.pop(fd, None)
            original(fd)
        return close

    def on_fd(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(fd: int, *args: Any, **kwargs: Any) -> Any:
            faults.check(faults.fds.get(fd), _DATA)
            return original(fd, *args, **kwargs)
        return call

    def on_paths(count: int, *, exists: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``exists``: the kernel's own error comes first when the first path does (not)
        exist (``mkdir`` of a directory that is there, ``unlink`` of a file that is not)."""
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                first = _path(args[0]) if args else None
                if first is not None and os.path.lexists(first) == exists:
                    for value in args[:count]:
                        faults.check(_path(value), _ENTRY)
                return original(*args, **kwargs)
            return call
        return make

    wrap("open", wrap_open)
    wrap("close", wrap_close)
    for name in ("write", "pwrite", "ftruncate", "fsync", "fdatasync", "fchmod"):
        wrap(name, on_fd)
    for name in ("rename", "replace", "link"):
        wrap(name, on_paths(2, exists=True))
    for name in ("unlink", "remove", "rmdir"):
        wrap(name, on_paths(1, exists=True))
    wrap("mkdir", on_paths(1, exists=False))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dstack_core.testing.faultfs CONTROL ROOT AGENT-ARGS...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    install(Path(args[0]), Path(args[1]))
    from dstack_core.cli import main as agent_main

    return agent_main(args[2:])


if __name__ == "__main__":
    sys.exit(main())
