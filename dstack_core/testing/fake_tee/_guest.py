"""What every fake guest shares, whatever its TEE.

* :class:`_StateStore`, the hardware state file under an ``flock``, and the fault
  switchboard that consumes what tests injected into it (:func:`_take` and friends).
* :class:`_GuestKernelIO`, the configfs-tsm report subsystem of ``report.c`` and
  ``fs/configfs/file.c`` (spec section 1.3) parameterised by the provider: attribute
  visibility, commit-at-close with its errors dropped, the generation counters, the
  report cache, text options, size limits; plus the plain-file mode checks. A provider
  subclass adds its ``report_new`` and its device.
* :class:`_GuestMachine`, the test-facing switches every guest has, the host-shared inputs,
  and the ``dstack-agent serve`` command line; :class:`_GuestAgent` runs it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Protocol, TypeVar

import attrs

from dstack_core.sysio import OsSysIO

from ...inputs import app_compose_document, document_text, sys_config_document
from ...platform_options import ALLOW_FAKE_KERNEL_ENV
from ...types import PlatformConfig, TrustBundle
from ..agent import AgentProcess

if TYPE_CHECKING:
    from ..pytest_plugin import PlatformEnv

FAKE_OS_IMAGE_HASH: Final = hashlib.sha256(b"dstack-core fake TDX os image").hexdigest()
"""The ``os_image_hash`` of the default sys-config's ``vm_config``."""

STATE_FILE: Final = "state.json"
LOCK_FILE: Final = "lock"
STATE_VERSION: Final = 1

INBLOB_MAX: Final = 64
U64_MASK: Final = (1 << 64) - 1

_TEXT_OPTIONS: Final = frozenset(
    {"privlevel", "service_provider", "service_guid", "service_manifest_version"}
)
_PRIVLEVEL_MAX: Final = 3
_RACE_STAGES: Final = ("inblob", "outblob")
HANG_COUNTER: Final = "hang_reports_until"
HANG_POLL: Final = 0.05


class _Profile(Protocol):
    """What the shared code needs of a kernel profile."""

    @property
    def configfs(self) -> bool: ...

    @property
    def outblob_max(self) -> int: ...


@attrs.frozen
class _GuestPaths:
    """The paths every fake guest tree has (the same relative paths as in a guest)."""

    _state_dir: ClassVar[str]
    _device: ClassVar[str]

    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / self._state_dir

    @property
    def device(self) -> Path:
        return self.root / self._device

    @property
    def report_dir(self) -> Path:
        return self.root / "sys/kernel/config/tsm/report"

    @property
    def host_shared(self) -> Path:
        return self.root / "dstack/.host-shared"

    @property
    def app_compose(self) -> Path:
        return self.host_shared / "app-compose.json"

    @property
    def sys_config(self) -> Path:
        return self.host_shared / ".sys-config.json"

    @property
    def runtime_log(self) -> Path:
        return self.root / "run/log/dstack/runtime_events.log"


@attrs.frozen(kw_only=True)
class _GuestKind:
    """One TEE's parameters of the shared machinery.

    :ivar provider: the configfs-tsm provider name (``tdx_guest``).
    :ivar label: the TEE in messages (``TDX``).
    :ivar machine: the machine class's name, for the hint in "not a fake tree".
    :ivar paths: the tree's paths class.
    :ivar profiles: kernel profiles by name.
    :ivar profile_noun: how messages call a profile (``kernel profile``).
    :ivar fault_ops: where ``inject`` can make a syscall fail.
    :ivar platform: the platform plugin an agent on the tree runs.
    :ivar blob_noun: how an oversize outblob is called in its EFBIG message.
    """

    provider: str
    label: str
    machine: str
    paths: type[_GuestPaths]
    profiles: Mapping[str, _Profile]
    profile_noun: str
    fault_ops: frozenset[str]
    platform: str
    blob_noun: str

    def store(self, root: Path) -> _StateStore:
        """The state store of the tree at ``root``."""
        hint = f"not a fake {self.label} tree (build one with {self.machine}.create)"
        return _StateStore(self.paths(root).state_dir, hint)


def _oserror(code: int, path: Path | str, detail: str = "") -> OSError:
    message = os.strerror(code) + (f" ({detail})" if detail else "")
    return OSError(code, message, str(path))


class _StateStore:
    """The hardware state file, shared across processes under an ``flock``."""

    _thread_lock = threading.Lock()

    def __init__(self, state_dir: Path, missing_hint: str) -> None:
        self.dir = state_dir
        self.path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE
        self.missing_hint = missing_hint

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Load the state under the lock; save it on exit if it changed (even on error)."""
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    before = self.path.read_text()
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{self.path} does not exist: {self.missing_hint}"
                    ) from None
                state = json.loads(before)
                try:
                    yield state
                finally:
                    after = json.dumps(state, indent=1, sort_keys=True)
                    if after != before:
                        self._save(after)
            finally:
                os.close(fd)

    def _save(self, text: str) -> None:
        # Atomic against a crash of the process (rename); no fsync: this is not hardware.
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def write_initial(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._save(json.dumps(state, indent=1, sort_keys=True))


def _consume(
    queue: list[dict[str, Any]], matches: Callable[[dict[str, Any]], bool] = lambda _: True
) -> dict[str, Any] | None:
    """The first injected item ``matches`` accepts, used once (``times=-1``: forever)."""
    for item in queue:
        if matches(item):
            if item["times"] > 0:
                item["times"] -= 1
                if item["times"] == 0:
                    queue.remove(item)
            return item
    return None


def _take(state: dict[str, Any], op: str) -> int | None:
    """Consume one injected fault for ``op``; returns its errno."""
    fault = _consume(state["faults"], lambda f: f["op"] == op)
    return None if fault is None else int(fault["errno"])


def _take_counter(state: dict[str, Any], table: str, key: str) -> bool:
    counters = state[table]
    if counters.get(key, 0) > 0:
        counters[key] -= 1
        return True
    return False


def _advance(entry: dict[str, Any]) -> None:
    """``try_advance_write_generation`` once it is known not to wrap."""
    entry["wgen"] = (entry["wgen"] + 1) & U64_MASK


def _would_wrap(entry: dict[str, Any]) -> bool:
    """The next write generation would land on an unread report (EBUSY)."""
    return bool(entry["wgen"] == (entry["rgen"] - 1) & U64_MASK)


def _default_app_compose() -> str:
    return document_text(app_compose_document("dstack-fake-tdx-app"))


def _default_sys_config() -> str:
    return document_text(
        sys_config_document(os_image_hash=FAKE_OS_IMAGE_HASH, cpu_count=2, memory_size=4294967296)
    )


class _GuestKernelIO(OsSysIO):
    """A :class:`~dstack_core.sysio.SysIO` over a fake guest tree: real syscalls plus the
    configfs-tsm report subsystem's side effects, the same for every provider.

    A provider subclass sets :attr:`_kind`, :attr:`_attribute_modes` and
    :attr:`_entry_fields`, and implements :meth:`_report_new` (with its cache layout) and
    :meth:`_device_ioctl`. Paths outside ``root`` get the plain
    :class:`~dstack_core.sysio.OsSysIO` behaviour.

    :ivar calls: ``(operation, path relative to root, byte count)`` of every call made
        through this object, so tests can assert e.g. "inblob written once, 64 bytes".
    """

    _kind: ClassVar[_GuestKind]
    _attribute_modes: ClassVar[Mapping[str, int]]
    """The attributes the provider's ``*_attr_visible`` shows, with the kernel's modes."""
    _entry_fields: ClassVar[Mapping[str, Any]]
    """The provider's per-entry state besides the generations, inblob and deferral."""

    paths: _GuestPaths
    profile: _Profile

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.paths = self._kind.paths(self.root)
        self._store = self._kind.store(self.root)
        self.calls: list[tuple[str, str, int]] = []
        with self._store.transaction() as state:
            self.profile = self._kind.profiles[state["kernel"]]

    # --- provider hooks ---

    def _attributes(self, state: dict[str, Any]) -> Mapping[str, int]:
        """The attributes a new entry shows, with their modes."""
        return self._attribute_modes

    def _known_attributes(self) -> frozenset[str]:
        """Every attribute configfs may have created, which it removes on ``rmdir``."""
        return frozenset(self._attribute_modes)

    def _privlevel_floor(self, state: dict[str, Any]) -> int:
        return 0

    def _report_new(
        self, state: dict[str, Any], entry: dict[str, Any], path: Path, inblob: bytes
    ) -> dict[str, bytes]:
        """The provider's ``report_new``: the blobs by attribute name, or raise."""
        raise NotImplementedError

    def _cached_blobs(self, entry: dict[str, Any]) -> Mapping[str, bytes] | None:
        """The entry's cached blobs (from its state, in the provider's layout), if any."""
        raise NotImplementedError

    def _cache_blobs(self, entry: dict[str, Any], blobs: Mapping[str, bytes] | None) -> None:
        """Cache ``blobs`` in the entry's state, or drop the cache (None)."""
        raise NotImplementedError

    def _device_ioctl(
        self, state: dict[str, Any], device: Path, request: int, arg: bytearray
    ) -> bool:
        """Serve an ioctl on the guest device; returns whether to SIGKILL the caller once
        the state is saved."""
        raise NotImplementedError

    # --- path classification ---

    def _relative(self, path: Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _entry(self, path: Path) -> tuple[str, str] | None:
        """``(entry name, attribute)`` for a path inside a report entry."""
        absolute = Path(os.path.abspath(path))
        if absolute.parent.parent == self.paths.report_dir:
            return absolute.parent.name, absolute.name
        return None

    def _is_device(self, path: Path) -> bool:
        return Path(os.path.abspath(path)) == self.paths.device

    def _record(self, op: str, path: Path, size: int = 0) -> None:
        self.calls.append((op, self._relative(path) or str(path), size))

    @staticmethod
    def _check_mode(path: Path, *, read: bool = False, write: bool = False) -> None:
        """Enforce owner permission bits: tests run as root, the kernel would still refuse."""
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise _oserror(errno.EISDIR, path)
        if read and not mode & stat.S_IRUSR:
            raise _oserror(errno.EACCES, path, f"mode {stat.S_IMODE(mode):04o}")
        if write and not mode & stat.S_IWUSR:
            raise _oserror(errno.EACCES, path, f"mode {stat.S_IMODE(mode):04o}")

    @staticmethod
    def _mirror(path: Path, data: bytes) -> None:
        """Make the real file show what the kernel would return (for humans and ``cat``)."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _os_read(self, path: Path) -> bytes:
        """The plain ``read``, without the kernel model."""
        return super().read(path)

    def _os_write(self, path: Path, data: bytes) -> None:
        """The plain ``write``, without the kernel model."""
        super().write(path, data)

    # --- SysIO ---

    def exists(self, path: Path) -> bool:
        self._record("exists", path)
        return super().exists(path)

    def mkdir(self, path: Path) -> None:
        self._record("mkdir", path)
        absolute = Path(os.path.abspath(path))
        if absolute.parent != self.paths.report_dir:
            return super().mkdir(path)
        with self._store.transaction() as state:
            if state["provider"] is None:
                raise _oserror(errno.ENXIO, path, "no TSM provider registered")
            if (code := _take(state, "mkdir")) is not None:
                raise _oserror(code, path, "injected")
            super().mkdir(path)
            attributes = self._attributes(state)
            for name, mode in attributes.items():
                (absolute / name).touch()
                os.chmod(absolute / name, mode)
            self._mirror(absolute / "generation", b"0\n")
            self._mirror(absolute / "provider", state["provider"].encode() + b"\n")
            if "privlevel_floor" in attributes:
                self._mirror(absolute / "privlevel_floor", b"%d\n" % self._privlevel_floor(state))
            state["entries"][absolute.name] = {
                "wgen": 0, "rgen": 0, "inblob": None, "deferred": None, **self._entry_fields
            }

    def rmdir(self, path: Path) -> None:
        self._record("rmdir", path)
        absolute = Path(os.path.abspath(path))
        if absolute.parent != self.paths.report_dir:
            return super().rmdir(path)
        with self._store.transaction() as state:
            if (code := _take(state, "rmdir")) is not None:
                raise _oserror(code, path, "injected")
            if absolute.is_dir():
                known = self._known_attributes()
                for child in absolute.iterdir():
                    if child.name in known:
                        child.unlink()  # configfs removes the attributes itself
            super().rmdir(path)
            state["entries"].pop(absolute.name, None)

    def read(self, path: Path) -> bytes:
        located = self._entry(path)
        if located is not None:
            if located[1] == "outblob":
                self._wait_while_hung()
            data = self._read_attribute(Path(path), *located)
        else:
            data = self._read_file(path)
        self._record("read", path, len(data))
        return data

    def _wait_while_hung(self) -> None:
        """A hung quote service: the read blocks (outside the state lock, so a test can
        end it) until the deadline :meth:`_GuestMachine.hang_reports` set, or its clearing."""
        while True:
            with self._store.transaction() as state:
                until = float(state["counters"].get(HANG_COUNTER, 0))
            if time.time() >= until:
                return
            time.sleep(HANG_POLL)

    def _read_file(self, path: Path) -> bytes:
        """Any file outside a report entry: inside the tree, the kernel's modes hold."""
        if self._relative(path) is not None and os.path.exists(path):
            self._check_mode(Path(path), read=True)
        return self._os_read(path)

    def _read_attribute(self, path: Path, name: str, attribute: str) -> bytes:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in self._attributes(state):
                return self._os_read(path)
            self._check_mode(path, read=True)
            if attribute == "generation":
                self._poll_deferred(entry)
                if (code := _take(state, "generation")) is not None:
                    raise _oserror(code, path, "injected")
                self._mirror(path, b"%d\n" % entry["wgen"])
                return self._os_read(path)
            if attribute == "provider":
                if state["provider"] is None:
                    raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
                if (code := _take(state, "provider")) is not None:
                    raise _oserror(code, path, "injected")
                return self._os_read(path)
            if attribute == "privlevel_floor":
                return self._os_read(path)
            blob = self._blob(state, entry, path, attribute)
            limit = self.profile.outblob_max
            if len(blob) > limit:
                raise _oserror(errno.EFBIG, path, f"{self._kind.blob_noun} exceeds {limit}")
            self._mirror(path, blob)
            return self._os_read(path)

    def _blob(
        self, state: dict[str, Any], entry: dict[str, Any], path: Path, attribute: str
    ) -> bytes:
        """``tsm_report_read``: generate a report unless the cached one is current."""
        if not entry["inblob"]:
            raise _oserror(errno.EINVAL, path, "inblob was never written")
        if state["provider"] is None:
            raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
        cached = self._cached_blobs(entry)
        if cached is not None and entry["rgen"] == entry["wgen"]:
            return cached[attribute]
        self._cache_blobs(entry, None)
        if (code := _take(state, "outblob")) is not None:
            raise _oserror(code, path, "injected")
        inblob = bytes.fromhex(entry["inblob"])
        if len(inblob) != INBLOB_MAX:
            raise _oserror(
                errno.EINVAL, path, f"{self._kind.provider} needs {INBLOB_MAX} bytes of inblob"
            )
        blobs = self._report_new(state, entry, path, inblob)
        self._cache_blobs(entry, blobs)
        entry["rgen"] = entry["wgen"]
        if _take_counter(state, "races", "outblob"):
            _advance(entry)
            entry["inblob"] = (b"\xee" * INBLOB_MAX).hex()
        return blobs[attribute]

    @staticmethod
    def _poll_deferred(entry: dict[str, Any]) -> None:
        deferred = entry["deferred"]
        if deferred is None:
            return
        deferred["polls"] -= 1
        if deferred["polls"] <= 0:
            entry["deferred"] = None
            _advance(entry)
            entry["inblob"] = deferred["inblob"]

    def write(self, path: Path, data: bytes) -> None:
        self._record("write", path, len(data))
        located = self._entry(path)
        if located is not None:
            return self._write_attribute(Path(path), *located, bytes(data))
        return self._write_file(path, data)

    def _write_file(self, path: Path, data: bytes) -> None:
        """Any file outside a report entry: inside the tree, the kernel's modes hold."""
        if self._relative(path) is not None and os.path.exists(path):
            self._check_mode(Path(path), write=True)
        return self._os_write(path, data)

    def _write_attribute(self, path: Path, name: str, attribute: str, data: bytes) -> None:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in self._attributes(state):
                return self._os_write(path, data)
            self._check_mode(path, write=True)
            if attribute in _TEXT_OPTIONS:
                return self._write_option(state, entry, path, attribute, data)
            # configfs_bin_write_iter marks the write in progress before its checks, so
            # even a failed write() is followed by a commit of the (empty) buffer at close.
            if len(data) > INBLOB_MAX:
                self._commit(state, entry, b"")
                raise _oserror(errno.EFBIG, path, f"inblob holds at most {INBLOB_MAX} bytes")
            if (code := _take(state, "inblob")) is not None:
                self._commit(state, entry, b"")
                raise _oserror(code, path, "injected")
            self._os_write(path, data)
            self._commit(state, entry, data)

    @staticmethod
    def _commit(state: dict[str, Any], entry: dict[str, Any], data: bytes) -> None:
        """``tsm_report_inblob_write`` at close: errors here are dropped by configfs."""
        if _take(state, "commit") is not None:
            return
        if _would_wrap(entry):
            return  # EBUSY: the generation would wrap onto an unread report
        deferred = state["counters"].get("defer_commit", 0)
        if deferred > 0:
            entry["deferred"] = {"polls": deferred, "inblob": data.hex()}
            return
        _advance(entry)
        entry["inblob"] = data.hex()
        if _take_counter(state, "races", "inblob"):
            _advance(entry)
            entry["inblob"] = (b"\xdd" * INBLOB_MAX).hex()

    def _write_option(
        self, state: dict[str, Any], entry: dict[str, Any], path: Path, attribute: str,
        data: bytes,
    ) -> None:
        """A text attribute: checked and stored during ``write(2)``, errors returned there."""
        if attribute == "privlevel" and (code := _take(state, "privlevel")) is not None:
            raise _oserror(code, path, "injected")
        text = data.decode("ascii", "replace").strip()
        if attribute == "privlevel":
            try:
                value: Any = int(text, 10)
            except ValueError:
                raise _oserror(errno.EINVAL, path, "not an integer") from None
            floor = self._privlevel_floor(state)
            if not floor <= value <= _PRIVLEVEL_MAX:
                raise _oserror(errno.EINVAL, path, f"privlevel outside {floor}..3")
        elif attribute == "service_provider":
            if text != "svsm":
                raise _oserror(errno.EINVAL, path, "only 'svsm' is supported")
            value = text
        elif attribute == "service_guid":
            try:
                value = str(uuid.UUID(text))
            except ValueError:
                raise _oserror(errno.EINVAL, path, "not a GUID") from None
        else:
            try:
                value = int(text, 10)
            except ValueError:
                raise _oserror(errno.EINVAL, path, "not an integer") from None
        if _would_wrap(entry):
            raise _oserror(errno.EBUSY, path, "write generation would wrap")
        entry[attribute] = value
        _advance(entry)
        self._cache_blobs(entry, None)

    def ioctl(self, device: Path, request: int, arg: bytearray) -> int:
        self._record("ioctl", device, len(arg))
        if not self._is_device(device):
            return super().ioctl(device, request, arg)
        with self._store.transaction() as state:
            self._check_mode(Path(device), read=True, write=True)
            if (code := _take(state, "ioctl")) is not None:
                raise _oserror(code, device, "injected")
            crash = self._device_ioctl(state, Path(device), request, arg)
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0


_IoT = TypeVar("_IoT", bound=_GuestKernelIO)
_AgentT = TypeVar("_AgentT", bound="_GuestAgent")


class _GuestMachine(Generic[_IoT, _AgentT]):
    """A fake guest rooted in a directory: reopened with the constructor (in any process);
    the switches every guest has, and the agent command line.

    A TEE subclass sets :attr:`_kind`, :attr:`_io_type` and :attr:`_agent_type`, and builds
    its tree with :meth:`_new_tree`, :meth:`_new_state` and :meth:`_lay_out`.
    """

    _kind: ClassVar[_GuestKind]
    _io_type: type[_IoT]
    _agent_type: type[_AgentT]

    paths: _GuestPaths
    profile: _Profile

    def __init__(self, root: Path) -> None:
        """Open an existing fake tree.

        :raises FileNotFoundError: ``root`` holds no fake state of this TEE.
        """
        self.root = Path(root).absolute()
        self.paths = self._kind.paths(self.root)
        self._store = self._kind.store(self.root)
        with self._store.transaction() as state:
            self.kernel = state["kernel"]
        self.profile = self._kind.profiles[self.kernel]

    # --- building a tree ---

    @classmethod
    def _check_kernel(cls, kernel: str) -> None:
        profiles = cls._kind.profiles
        if kernel not in profiles:
            raise ValueError(
                f"unknown {cls._kind.profile_noun} {kernel!r}; known: {sorted(profiles)}"
            )

    @classmethod
    def _new_tree(cls, root: Path) -> Path:
        """``root``, absolute, after checking it holds no tree yet."""
        root = Path(root).absolute()
        if (cls._kind.paths(root).state_dir / STATE_FILE).exists():
            raise FileExistsError(f"{root} already holds a fake {cls._kind.label} tree")
        return root

    @classmethod
    def _new_state(cls, kernel: str, **hardware: Any) -> dict[str, Any]:
        """The state of a fresh machine: ``hardware``, no faults, no entries."""
        return {
            "version": STATE_VERSION,
            "kernel": kernel,
            "provider": cls._kind.provider,
            **hardware,
            "faults": [],
            "counters": {},
            "races": {},
            "entries": {},
        }

    @classmethod
    def _lay_out(
        cls, root: Path, state: dict[str, Any], *, app_compose: str, sys_config: str | None
    ) -> None:
        """Save the state and create what every guest has: the configfs report directory
        (if the kernel has it), the guest device, the host-shared inputs (``sys_config``
        None: the default), the runtime log's directory."""
        paths = cls._kind.paths(root)
        cls._kind.store(root).write_initial(state)
        if cls._kind.profiles[state["kernel"]].configfs:
            paths.report_dir.mkdir(parents=True, exist_ok=True)
        paths.device.parent.mkdir(parents=True, exist_ok=True)
        paths.device.touch()
        os.chmod(paths.device, 0o600)
        paths.host_shared.mkdir(parents=True, exist_ok=True)
        paths.app_compose.write_text(app_compose)
        paths.sys_config.write_text(_default_sys_config() if sys_config is None else sys_config)
        paths.runtime_log.parent.mkdir(parents=True, exist_ok=True)

    # --- hardware ---

    def io(self) -> _IoT:
        """A fresh kernel I/O object (:class:`~dstack_core.sysio.SysIO`) over this tree."""
        return self._io_type(self.root)

    def entries(self) -> list[str]:
        """Report entries present in the configfs report directory."""
        if not self.paths.report_dir.exists():
            return []
        return sorted(p.name for p in self.paths.report_dir.iterdir())

    # --- failure switches ---

    def inject(self, op: str, code: int, times: int = 1) -> None:
        """Make the next ``times`` syscalls at ``op`` fail with ``code`` (``times=-1``: all).

        :param op: one of the TEE's fault ops (:data:`FAULT_OPS`, :data:`SNP_FAULT_OPS`).
        """
        ops = self._kind.fault_ops
        if op not in ops:
            raise ValueError(f"unknown fault op {op!r}; known: {sorted(ops)}")
        with self._store.transaction() as state:
            state["faults"].append({"op": op, "errno": int(code), "times": int(times)})

    def _add(self, table: str, key: str, times: int) -> None:
        with self._store.transaction() as state:
            state[table][key] = state[table].get(key, 0) + times

    def set_provider(self, name: str | None) -> None:
        """Register a TSM provider by name (``tdx_guest``, ``sev_guest``) or none.

        With none, ``mkdir`` of a report entry fails with ENXIO, as without a TEE driver.
        """
        with self._store.transaction() as state:
            state["provider"] = name

    def empty_outblob(self, times: int = 1) -> None:
        """The next ``times`` configfs reports are empty (e.g. a failed GetQuote with
        ``out_len`` 0)."""
        self._add("counters", "empty_outblob", times)

    def hang_reports(self, seconds: float) -> None:
        """Every report generation (the ``outblob`` read) blocks for the next ``seconds``,
        as when the host's quote service stops answering; :meth:`clear_faults` (or
        ``hang_reports(0)``) ends the hang at once."""
        with self._store.transaction() as state:
            state["counters"][HANG_COUNTER] = time.time() + seconds if seconds > 0 else 0

    def defer_commit(self, polls: int) -> None:
        """Delay every inblob commit until ``generation`` has been read ``polls`` times
        (the kernel defers ``fput`` while another process holds the descriptor); 0 = off."""
        with self._store.transaction() as state:
            state["counters"]["defer_commit"] = int(polls)

    def race(self, stage: str, times: int = 1) -> None:
        """Another writer races on the next ``times`` report entries.

        :param stage: ``inblob`` (it writes right after our inblob commit) or ``outblob``
            (it writes right after our outblob was generated).
        """
        if stage not in _RACE_STAGES:
            raise ValueError("race stage must be 'inblob' or 'outblob'")
        self._add("races", stage, times)

    def clear_faults(self) -> None:
        """Remove every injected fault and switch; restore the provider."""
        with self._store.transaction() as state:
            state["faults"] = []
            state["counters"] = {}
            state["races"] = {}
            state["provider"] = self._kind.provider
            self._clear(state)

    def _clear(self, state: dict[str, Any]) -> None:
        """Reset the TEE's own switches (inside :meth:`clear_faults`' transaction)."""

    # --- running an agent on it ---

    def agent_options(self, **extra: str) -> dict[str, str]:
        """``--platform-option`` values that point the platform plugin at this tree."""
        return {"root": str(self.root), "sysio": "fake", **extra}

    def platform_config(self, state_dir: Path, **options: str) -> PlatformConfig:
        """A :class:`~dstack_core.types.PlatformConfig` for configuring a plugin in-process
        on this tree (pass :meth:`io` to the plugin yourself; ``root`` is set here)."""
        return PlatformConfig(
            state_dir=state_dir,
            runtime_log=self.paths.runtime_log,
            app_compose=self.paths.app_compose,
            sys_config=self.paths.sys_config,
            options={"root": str(self.root), **options},
        )

    def agent_args(self, **options: str) -> list[str]:
        """``serve`` arguments (besides ``--platform``) for an agent on this tree."""
        args = [
            "--app-compose", str(self.paths.app_compose),
            "--sys-config", str(self.paths.sys_config),
            "--runtime-log", str(self.paths.runtime_log),
        ]
        for key, value in self.agent_options(**options).items():
            args += ["--platform-option", f"{key}={value}"]
        return args

    @staticmethod
    def agent_env() -> dict[str, str]:
        """The environment that lets the plugin accept ``sysio=fake``."""
        return {ALLOW_FAKE_KERNEL_ENV: "1"}

    def trust_bundle(self) -> TrustBundle:
        """The anchors that verify this machine's evidence (its mock PKI's)."""
        raise NotImplementedError

    def platform_env(self, **options: str) -> PlatformEnv:
        """The test kit's :class:`~dstack_core.testing.pytest_plugin.PlatformEnv` for the
        platform on this tree: the fake kernel allowed and selected, the tree's inputs and
        runtime log, and :meth:`trust_bundle`."""
        from ..pytest_plugin import PlatformEnv

        return PlatformEnv(
            env=self.agent_env(),
            options=self.agent_options(**options),
            app_compose=self.paths.app_compose,
            sys_config=self.paths.sys_config,
            runtime_log=self.paths.runtime_log,
            trust_bundle=self.trust_bundle(),
        )

    def _agent_inputs(self) -> dict[str, Path]:
        """The agent's inputs in the tree, by their simulator state-dir names."""
        return {
            "app-compose.json": self.paths.app_compose,
            "sys-config.json": self.paths.sys_config,
        }

    def agent(
        self,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        options: Mapping[str, str] | None = None,
    ) -> _AgentT:
        """An (unstarted) ``dstack-agent serve`` of the TEE's platform on this tree."""
        return self._agent_type(self, workdir=workdir, extra_args=extra_args, options=options)


class _GuestAgent(AgentProcess):
    """An :class:`~dstack_core.testing.AgentProcess` serving a fake machine's platform.

    :ivar machine: the fake machine.
    :ivar input_files: the agent's inputs by their simulator state-dir names
        (``app-compose.json``, ``sys-config.json``, ...), so tests written for the
        simulator find them.
    """

    def __init__(
        self,
        machine: _GuestMachine[Any, Any],
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            machine._kind.platform,
            workdir=workdir,
            extra_args=[*machine.agent_args(**dict(options or {})), *extra_args],
            env=machine.agent_env(),
        )
        self.machine = machine
        self.input_files = machine._agent_inputs()
