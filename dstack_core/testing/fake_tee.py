"""A fake of the Linux Intel TDX guest kernel interfaces, for tests only.

**Nothing here is secure or meant for production.** It lets a TDX platform plugin run end to
end on a machine without TDX, against a kernel model derived from the kernel sources (see
the project note ``linux-tee-interfaces.md``, sections 1-3 and 6):

* :class:`FakeTdxMachine` lays out a real directory tree that looks like a TDX guest's ``/``:
  the configfs-tsm report directory, the sysfs measurement registers (Linux 6.16+), the ACPI
  CCEL table and log area (built with :class:`~dstack_core.ccel.Tcg2LogBuilder`),
  ``/dev/tdx_guest``, and dstack's host-shared inputs (app keys, app-compose, sys-config)
  with dstack's boot events already extended into RTMR3 and written to the runtime log, as
  dstack-util does at boot.
* :class:`FakeKernelIO` is a :class:`~dstack_core.sysio.SysIO` that performs the real
  filesystem syscalls on that tree and adds the kernel's side effects at the same syscall:
  ``mkdir`` of a report entry creates its attribute files; an ``inblob`` write is committed
  at close, its errors dropped, and moves the generation counter; reading ``outblob``
  generates a quote with the real v4 (or v5) layout, the current registers and the inblob
  as report data; writing a register file does the SHA-384 extend; file modes are enforced
  (tests run as root, the kernel would refuse).
* Switches inject the kernel's failures (:meth:`FakeTdxMachine.inject` and friends).

The hardware state (MRTD, RTMR0-3, the mock PKI seed, the injected faults, the report
entries' generation counters) lives in ``<root>/.fake-tdx/state.json`` under an ``flock``,
so an agent *subprocess* started with ``--platform-option root=<root> --platform-option
sysio=fake`` (and ``DSTACK_ALLOW_FAKE_KERNEL=1`` in its environment) sees the same registers
across restarts, and a test can flip a switch that the agent observes on its next syscall.

Quotes are signed by a :class:`~dstack_core.mockpki.MockIntelPki` seeded per machine; their
header user data says ``DSTACK-FAKE-TDX``. A verifier accepts them only when given
:meth:`FakeTdxMachine.trust_bundle`, never with Intel's root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import signal
import stat
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs

from dstack_core import certs
from dstack_core.ccel import (
    EV_EVENT_TAG,
    EV_NO_ACTION,
    EV_PLATFORM_CONFIG_FLAGS,
    Tcg2LogBuilder,
    build_ccel_table,
)
from dstack_core.eventlog import RuntimeEvent, RuntimeEventLog
from dstack_core.mockpki import MOCK_TD_ATTRIBUTES, SEED_SIZE, MockIntelPki
from dstack_core.quote import TdReport
from dstack_core.sysio import OsSysIO
from dstack_core.types import KeyProvider, Measurements, RootKey, TrustBundle

from .agent import AgentProcess

__all__ = [
    "ALLOW_FAKE_KERNEL_ENV",
    "CRASH_POINTS",
    "FAKE_TDX_USER_DATA",
    "FAULT_OPS",
    "KERNEL_PROFILES",
    "TDX_CMD_EXTEND_RTMR_IOR",
    "TDX_CMD_EXTEND_RTMR_IOW",
    "TDX_CMD_GET_REPORT0",
    "FakeKernelIO",
    "FakeTdxAgent",
    "FakeTdxMachine",
    "FakeTdxPaths",
    "KernelProfile",
    "default_boot_log",
]

ALLOW_FAKE_KERNEL_ENV: Final = "DSTACK_ALLOW_FAKE_KERNEL"
"""A plugin must refuse ``sysio=fake`` unless this environment variable is ``1``."""

FAKE_TDX_USER_DATA: Final = b"DSTACK-FAKE-TDX".ljust(20, b"\0")
"""The 20-byte quote header user data of every fake quote (signed, not checked by dcap-qvl)."""

STATE_DIR: Final = ".fake-tdx"
STATE_FILE: Final = "state.json"
LOCK_FILE: Final = "lock"
STATE_VERSION: Final = 1

FAULT_OPS: Final = frozenset(
    {"mkdir", "rmdir", "provider", "generation", "inblob", "commit", "outblob", "extend",
     "rtmr_read", "ioctl"}
)
"""Where :meth:`FakeTdxMachine.inject` can make a syscall fail.

``inblob`` fails the ``write(2)`` itself (the buffer is still committed, empty, at close,
as configfs does); ``commit`` fails the close-time commit, whose error the kernel drops (the
generation does not move); ``outblob`` fails report generation, i.e. the ``read(2)``;
``extend`` fails a register write or the extend ioctl; ``ioctl`` fails any ioctl."""

CRASH_POINTS: Final = frozenset({"before_extend", "after_extend"})
"""Where :meth:`FakeTdxMachine.crash` SIGKILLs the process doing the syscall."""

INBLOB_MAX: Final = 64
REGISTER_SIZE: Final = 48
ZERO_REGISTER: Final = bytes(REGISTER_SIZE)
U64_MASK: Final = (1 << 64) - 1

# ioctl numbers: dir << 30 | size << 16 | type << 8 | nr (asm-generic/ioctl.h).
TDX_CMD_GET_REPORT0: Final = (3 << 30) | (1088 << 16) | (ord("T") << 8) | 1
TDX_CMD_EXTEND_RTMR_IOW: Final = (1 << 30) | (49 << 16) | (ord("T") << 8) | 3
TDX_CMD_EXTEND_RTMR_IOR: Final = (2 << 30) | (49 << 16) | (ord("T") << 8) | 3
assert (TDX_CMD_GET_REPORT0, TDX_CMD_EXTEND_RTMR_IOW, TDX_CMD_EXTEND_RTMR_IOR) == (
    0xC4405401, 0x40315403, 0x80315403)

REPORT_REQ_SIZE: Final = 1088
TDREPORT_OFFSET: Final = 64
"""``struct tdx_report_req``: reportdata[64], then the 1024-byte TDREPORT."""
TDREPORT_TYPE_TDX: Final = 0x81
TDREPORT_REPORTDATA: Final = 128
TDREPORT_TDINFO_MRS: Final = 528
"""TDINFO from 512: attributes, xfam, then mrtd, mrconfigid, mrowner, mrownerconfig,
rtmr0..3 (48 bytes each) from offset 528."""
EXTEND_REQ: Final = struct.Struct("<48sB")
"""Intel out-of-tree ``struct tdx_extend_rtmr_req { u8 data[48]; u8 index; }``."""

TDX_ATTRIBUTES: Final = ("generation", "provider", "inblob", "outblob")
_ATTRIBUTE_MODES: Final = {"generation": 0o444, "provider": 0o444, "inblob": 0o200, "outblob": 0o444}
_MEASUREMENT_FILES: Final = {
    "mrtd:sha384": 0o444,
    "mrconfigid": 0o444,
    "mrowner": 0o444,
    "mrownerconfig": 0o444,
    **{f"rtmr{i}:sha384": 0o644 for i in range(4)},
}

DEFAULT_MRTD: Final = hashlib.sha384(b"dstack-core fake TDX firmware (not hardware)").digest()
DEFAULT_XFAM: Final = bytes.fromhex("e702060000000000")
CCEL_LAML: Final = 0x10000
CCEL_LASA: Final = 0x7F000000
MR_CONFIG_ID_V1: Final = b"\x01"
FAKE_OS_IMAGE_HASH: Final = hashlib.sha256(b"dstack-core fake TDX os image").hexdigest()

_EV_SEPARATOR: Final = 0x00000004
_EV_EFI_VARIABLE_DRIVER_CONFIG: Final = 0x80000001
_EV_EFI_BOOT_SERVICES_APPLICATION: Final = 0x80000003
_EV_EFI_ACTION: Final = 0x80000007
_EV_EFI_HANDOFF_TABLES2: Final = 0x8000000B
_TPM_ALG_SHA384: Final = 0x000C
_TCG_DIGEST_SIZES: Final = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64, 0x0012: 32}


@attrs.frozen(kw_only=True)
class KernelProfile:
    """What a kernel version offers a TDX guest (spec section 7).

    :ivar configfs: configfs-tsm report entries (6.7+).
    :ivar measurements: sysfs measurement registers (6.16+).
    :ivar ccel: ``/sys/firmware/acpi/tables/data/CCEL`` (6.4+).
    :ivar extend_ioctl: the out-of-tree extend ioctl number the driver accepts, if any.
    :ivar outblob_max: ``TSM_REPORT_OUTBLOB_MAX``: a longer outblob reads as EFBIG.
    """

    configfs: bool
    measurements: bool
    ccel: bool
    extend_ioctl: int | None = None
    outblob_max: int = 32 * 1024


KERNEL_PROFILES: Final[Mapping[str, KernelProfile]] = {
    "6.2": KernelProfile(configfs=False, measurements=False, ccel=False),
    "6.7": KernelProfile(configfs=True, measurements=False, ccel=True),
    "6.16": KernelProfile(configfs=True, measurements=True, ccel=True),
    "7.0": KernelProfile(configfs=True, measurements=True, ccel=True, outblob_max=16 << 20),
    "intel-oot": KernelProfile(
        configfs=True, measurements=False, ccel=True, extend_ioctl=TDX_CMD_EXTEND_RTMR_IOR
    ),
}
"""Kernel profiles by name. ``intel-oot`` is an Intel out-of-tree kernel: no sysfs
registers, but ``TDX_CMD_EXTEND_RTMR`` with the ``_IOR`` encoding dstack and DCAP use."""


@attrs.frozen
class FakeTdxPaths:
    """Where everything lives in a fake tree (the same relative paths as on a TD)."""

    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / "sys/kernel/config/tsm/report"

    @property
    def measurements_dir(self) -> Path:
        return self.root / "sys/devices/virtual/misc/tdx_guest/measurements"

    @property
    def class_link(self) -> Path:
        return self.root / "sys/class/misc/tdx_guest"

    @property
    def ccel_table(self) -> Path:
        return self.root / "sys/firmware/acpi/tables/CCEL"

    @property
    def ccel_data(self) -> Path:
        return self.root / "sys/firmware/acpi/tables/data/CCEL"

    @property
    def device(self) -> Path:
        return self.root / "dev/tdx_guest"

    @property
    def host_shared(self) -> Path:
        return self.root / "dstack/.host-shared"

    @property
    def appkeys(self) -> Path:
        return self.host_shared / ".appkeys.json"

    @property
    def app_compose(self) -> Path:
        return self.host_shared / "app-compose.json"

    @property
    def sys_config(self) -> Path:
        return self.host_shared / ".sys-config.json"

    @property
    def runtime_log(self) -> Path:
        return self.root / "run/log/dstack/runtime_events.log"

    def register_file(self, index: int) -> Path:
        return self.measurements_dir / f"rtmr{index}:sha384"


def default_boot_log() -> Tcg2LogBuilder:
    """A TDVF-shaped boot log: RTMR0 tables, variables and the ACPI DATA events, RTMR1
    boot loader and kernel, RTMR2 command line and initrd (deterministic contents)."""
    builder = Tcg2LogBuilder()
    builder.add(0, EV_NO_ACTION, b"SP800-155 Event3 (fake)")
    for mr_index, event_type, event, measured in (
        (1, _EV_EFI_HANDOFF_TABLES2, b"\x09TdxTable", b"fake TD HOB"),
        (1, _EV_EFI_VARIABLE_DRIVER_CONFIG, b"SecureBoot\0", b"SecureBoot=0"),
        (1, _EV_EFI_VARIABLE_DRIVER_CONFIG, b"PK\0", b"PK="),
        (1, _EV_SEPARATOR, bytes(4), bytes(4)),
        (1, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA", b"fake etc/table-loader"),
        (1, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA", b"fake acpi/rsdp"),
        (1, EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA", b"fake etc/acpi/tables"),
        (2, _EV_EFI_BOOT_SERVICES_APPLICATION, b"\\EFI\\BOOT\\BOOTX64.EFI", b"fake kernel"),
        (2, _EV_EFI_ACTION, b"Calling EFI Application from Boot Option",
         b"Calling EFI Application from Boot Option"),
        (2, _EV_SEPARATOR, bytes(4), bytes(4)),
        (3, EV_EVENT_TAG, b"LOADED_IMAGE::LoadOptions", b"console=ttyS0 dstack.fake=1"),
        (3, EV_EVENT_TAG, b"Linux initrd", b"fake initrd"),
        (2, _EV_EFI_ACTION, b"Exit Boot Services Invocation", b"Exit Boot Services Invocation"),
    ):
        builder.add(mr_index, event_type, event, digest=hashlib.sha384(measured).digest())
    return builder


def _boot_registers(ccel_data: bytes) -> list[bytes]:
    """RTMR0..3 after the firmware's extends, walked independently of dstack_core.ccel.

    The "hardware" must not share code with the parser under test: this is the TCG2 walk
    of the spec, done from scratch (MR index n >= 1 is RTMR n-1; EV_NO_ACTION is skipped).
    """
    (header_size,) = struct.unpack_from("<I", ccel_data, 28)
    offset = 32 + header_size
    registers = [ZERO_REGISTER] * 4
    while offset + 4 <= len(ccel_data):
        (mr_index,) = struct.unpack_from("<I", ccel_data, offset)
        if mr_index == 0xFFFFFFFF:
            break
        event_type, count = struct.unpack_from("<II", ccel_data, offset + 4)
        cursor = offset + 12
        sha384 = None
        for _ in range(count):
            (alg,) = struct.unpack_from("<H", ccel_data, cursor)
            size = _TCG_DIGEST_SIZES[alg]
            if alg == _TPM_ALG_SHA384:
                sha384 = ccel_data[cursor + 2 : cursor + 2 + size]
            cursor += 2 + size
        (event_size,) = struct.unpack_from("<I", ccel_data, cursor)
        offset = cursor + 4 + event_size
        if mr_index == 0 or event_type == EV_NO_ACTION or sha384 is None:
            continue
        registers[mr_index - 1] = hashlib.sha384(registers[mr_index - 1] + sha384).digest()
    return registers


def _oserror(code: int, path: Path | str, detail: str = "") -> OSError:
    message = os.strerror(code) + (f" ({detail})" if detail else "")
    return OSError(code, message, str(path))


class _StateStore:
    """The hardware state file, shared across processes under an ``flock``."""

    _thread_lock = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.dir = root / STATE_DIR
        self.path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE

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
                        f"{self.path} does not exist: not a fake TDX tree "
                        "(build one with FakeTdxMachine.create)"
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


def _take(state: dict[str, Any], op: str) -> int | None:
    """Consume one injected fault for ``op``; returns its errno."""
    for fault in state["faults"]:
        if fault["op"] == op:
            code = int(fault["errno"])
            if fault["times"] > 0:
                fault["times"] -= 1
                if fault["times"] == 0:
                    state["faults"].remove(fault)
            return code
    return None


def _take_counter(state: dict[str, Any], table: str, key: str) -> bool:
    counters = state[table]
    if counters.get(key, 0) > 0:
        counters[key] -= 1
        return True
    return False


_PKI_CACHE: dict[bytes, MockIntelPki] = {}


def _pki(seed_hex: str) -> MockIntelPki:
    seed = bytes.fromhex(seed_hex)
    pki = _PKI_CACHE.get(seed)
    if pki is None:
        pki = _PKI_CACHE[seed] = MockIntelPki.from_seed(seed)
    return pki


class FakeKernelIO(OsSysIO):
    """A :class:`~dstack_core.sysio.SysIO` over a fake TDX tree: real syscalls plus the
    kernel's side effects (see the module docstring and the spec's section 6.3 table).

    Paths outside ``root`` get the plain :class:`~dstack_core.sysio.OsSysIO` behaviour.

    :ivar calls: ``(operation, path relative to root, byte count)`` of every call made
        through this object, so tests can assert e.g. "inblob written once, 64 bytes".
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.paths = FakeTdxPaths(self.root)
        self._store = _StateStore(self.root)
        self.calls: list[tuple[str, str, int]] = []
        with self._store.transaction() as state:
            self.profile = KERNEL_PROFILES[state["kernel"]]

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

    def _register(self, path: Path) -> str | None:
        absolute = Path(os.path.realpath(path))
        if absolute.parent == self.paths.measurements_dir.resolve():
            return absolute.name
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
            for name in TDX_ATTRIBUTES:
                (absolute / name).touch()
                os.chmod(absolute / name, _ATTRIBUTE_MODES[name])
            self._mirror(absolute / "generation", b"0\n")
            self._mirror(absolute / "provider", state["provider"].encode() + b"\n")
            state["entries"][absolute.name] = {
                "wgen": 0, "rgen": 0, "inblob": None, "outblob": None, "deferred": None
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
                for child in absolute.iterdir():
                    if child.name in TDX_ATTRIBUTES:
                        child.unlink()  # configfs removes the attributes itself
            super().rmdir(path)
            state["entries"].pop(absolute.name, None)

    def read(self, path: Path) -> bytes:
        located = self._entry(path)
        if located is not None:
            data = self._read_attribute(Path(path), *located)
        elif (register := self._register(path)) is not None:
            data = self._read_register(Path(path), register)
        else:
            if self._relative(path) is not None and os.path.exists(path):
                self._check_mode(Path(path), read=True)
            data = super().read(path)
        self._record("read", path, len(data))
        return data

    def _read_attribute(self, path: Path, name: str, attribute: str) -> bytes:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in TDX_ATTRIBUTES:
                return super().read(path)
            self._check_mode(path, read=True)
            if attribute == "generation":
                self._poll_deferred(entry)
                if (code := _take(state, "generation")) is not None:
                    raise _oserror(code, path, "injected")
                text = b"%d\n" % entry["wgen"]
                self._mirror(path, text)
                return super().read(path)
            if attribute == "provider":
                if state["provider"] is None:
                    raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
                if (code := _take(state, "provider")) is not None:
                    raise _oserror(code, path, "injected")
                return super().read(path)
            blob = self._outblob(state, entry, path)
            if len(blob) > self.profile.outblob_max:
                raise _oserror(errno.EFBIG, path, f"report exceeds {self.profile.outblob_max}")
            self._mirror(path, blob)
            return super().read(path)

    def _outblob(self, state: dict[str, Any], entry: dict[str, Any], path: Path) -> bytes:
        """``tsm_report_read``: generate a report unless the cached one is current."""
        if not entry["inblob"]:
            raise _oserror(errno.EINVAL, path, "inblob was never written")
        if state["provider"] is None:
            raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
        if entry["outblob"] is not None and entry["rgen"] == entry["wgen"]:
            return bytes.fromhex(entry["outblob"])
        entry["outblob"] = None
        if (code := _take(state, "outblob")) is not None:
            raise _oserror(code, path, "injected")
        inblob = bytes.fromhex(entry["inblob"])
        if len(inblob) != INBLOB_MAX:
            raise _oserror(errno.EINVAL, path, f"tdx_guest needs {INBLOB_MAX} bytes of inblob")
        if _take_counter(state, "counters", "empty_outblob"):
            blob = b""  # a failed GetQuote with out_len 0 reads as EOF
        else:
            blob = self._quote(state, inblob)
            blob = blob.ljust(state["outblob_size"], b"\0")
        entry["outblob"] = blob.hex()
        entry["rgen"] = entry["wgen"]
        if _take_counter(state, "races", "outblob"):
            entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
            entry["inblob"] = (b"\xee" * INBLOB_MAX).hex()
        return blob

    @staticmethod
    def _poll_deferred(entry: dict[str, Any]) -> None:
        deferred = entry["deferred"]
        if deferred is None:
            return
        deferred["polls"] -= 1
        if deferred["polls"] <= 0:
            entry["deferred"] = None
            entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
            entry["inblob"] = deferred["inblob"]

    @staticmethod
    def _quote(state: dict[str, Any], report_data: bytes) -> bytes:
        rtmrs = [bytes.fromhex(r) for r in state["rtmrs"]]
        report = TdReport(
            tee_tcb_svn=bytes(16),
            mr_seam=bytes(48),
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=MOCK_TD_ATTRIBUTES,
            xfam=DEFAULT_XFAM,
            mr_td=bytes.fromhex(state["mrtd"]),
            mr_config_id=bytes.fromhex(state["mrconfigid"]),
            mr_owner=bytes.fromhex(state["mrowner"]),
            mr_owner_config=bytes.fromhex(state["mrownerconfig"]),
            rtmr0=rtmrs[0],
            rtmr1=rtmrs[1],
            rtmr2=rtmrs[2],
            rtmr3=rtmrs[3],
            report_data=report_data,
        )
        return _pki(state["pki_seed"]).sign_quote(
            report, user_data=FAKE_TDX_USER_DATA, version=state["quote_version"]
        )

    def _read_register(self, path: Path, name: str) -> bytes:
        with self._store.transaction() as state:
            self._check_mode(path, read=True)
            if (code := _take(state, "rtmr_read")) is not None:
                raise _oserror(code, path, "injected")
            value = _register_value(state, name)
            if value is not None:
                self._mirror(path, value)
            return super().read(path)  # under the lock: a concurrent mirror truncates first

    def write(self, path: Path, data: bytes) -> None:
        self._record("write", path, len(data))
        located = self._entry(path)
        if located is not None:
            return self._write_attribute(Path(path), *located, bytes(data))
        if (register := self._register(path)) is not None:
            return self._extend_register(Path(path), register, bytes(data))
        if self._relative(path) is not None and os.path.exists(path):
            self._check_mode(Path(path), write=True)
        return super().write(path, data)

    def _write_attribute(self, path: Path, name: str, attribute: str, data: bytes) -> None:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in TDX_ATTRIBUTES:
                return super().write(path, data)
            self._check_mode(path, write=True)
            # configfs_bin_write_iter marks the write in progress before its checks, so
            # even a failed write() is followed by a commit of the (empty) buffer at close.
            if len(data) > INBLOB_MAX:
                self._commit(state, entry, b"")
                raise _oserror(errno.EFBIG, path, f"inblob holds at most {INBLOB_MAX} bytes")
            if (code := _take(state, "inblob")) is not None:
                self._commit(state, entry, b"")
                raise _oserror(code, path, "injected")
            super().write(path, data)
            self._commit(state, entry, data)

    @staticmethod
    def _commit(state: dict[str, Any], entry: dict[str, Any], data: bytes) -> None:
        """``tsm_report_inblob_write`` at close: errors here are dropped by configfs."""
        if _take(state, "commit") is not None:
            return
        if entry["wgen"] == (entry["rgen"] - 1) & U64_MASK:
            return  # EBUSY: the generation would wrap onto an unread report
        deferred = state["counters"].get("defer_commit", 0)
        if deferred > 0:
            entry["deferred"] = {"polls": deferred, "inblob": data.hex()}
            return
        entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
        entry["inblob"] = data.hex()
        if _take_counter(state, "races", "inblob"):
            entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
            entry["inblob"] = (b"\xdd" * INBLOB_MAX).hex()

    def _extend_register(self, path: Path, name: str, data: bytes) -> None:
        crash = False
        with self._store.transaction() as state:
            self._check_mode(path, write=True)
            if not name.startswith("rtmr"):
                return super().write(path, data)
            if _take_counter(state, "crashes", "before_extend"):
                crash = True
            else:
                self._extend(state, path, int(name[4]), data)
                crash = _take_counter(state, "crashes", "after_extend")
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)

    def _extend(self, state: dict[str, Any], path: Path, index: int, data: bytes) -> None:
        """``tm_digest_write`` then TDG.MR.RTMR.EXTEND: all-or-nothing, 48 bytes at 0."""
        if len(data) != REGISTER_SIZE:
            raise _oserror(errno.EINVAL, path, "writes must be 48 bytes at offset 0")
        if (code := _take(state, "extend")) is not None:
            raise _oserror(code, path, "injected")
        if not 0 <= index <= 3:
            raise _oserror(errno.ENXIO, path, "invalid operand")
        current = bytes.fromhex(state["rtmrs"][index])
        state["rtmrs"][index] = hashlib.sha384(current + data).hexdigest()
        if self.profile.measurements:
            register_file = self.paths.register_file(index)
            self._mirror(register_file, bytes.fromhex(state["rtmrs"][index]))

    def ioctl(self, device: Path, request: int, arg: bytearray) -> int:
        self._record("ioctl", device, len(arg))
        if not self._is_device(device):
            return super().ioctl(device, request, arg)
        crash = False
        with self._store.transaction() as state:
            self._check_mode(Path(device), read=True, write=True)
            if (code := _take(state, "ioctl")) is not None:
                raise _oserror(code, device, "injected")
            if request == TDX_CMD_GET_REPORT0:
                if len(arg) < REPORT_REQ_SIZE:
                    raise _oserror(errno.EFAULT, device, "buffer shorter than tdx_report_req")
                arg[TDREPORT_OFFSET:REPORT_REQ_SIZE] = _tdreport(state, bytes(arg[:64]))
                return 0
            if request == self.profile.extend_ioctl and request is not None:
                if len(arg) < EXTEND_REQ.size:
                    raise _oserror(errno.EFAULT, device, "buffer shorter than tdx_extend_rtmr_req")
                data, index = EXTEND_REQ.unpack_from(arg, 0)
                if index < 2:
                    raise _oserror(errno.EPERM, device, "RTMR0 and RTMR1 belong to BIOS and kernel")
                if _take_counter(state, "crashes", "before_extend"):
                    crash = True
                else:
                    self._extend(state, Path(device), index, data)
                    crash = _take_counter(state, "crashes", "after_extend")
            else:
                raise _oserror(errno.ENOTTY, device, f"unknown ioctl {request:#x}")
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0


def _register_value(state: dict[str, Any], name: str) -> bytes | None:
    if name.startswith("rtmr") and name.endswith(":sha384"):
        return bytes.fromhex(state["rtmrs"][int(name[4])])
    key = {"mrtd:sha384": "mrtd", "mrconfigid": "mrconfigid", "mrowner": "mrowner",
           "mrownerconfig": "mrownerconfig"}.get(name)
    return bytes.fromhex(state[key]) if key else None


def _tdreport(state: dict[str, Any], report_data: bytes) -> bytes:
    """A 1024-byte TDREPORT (spec 2.1): type 0x81, reportdata at 128, TDINFO MRs from 528."""
    report = bytearray(1024)
    report[0] = TDREPORT_TYPE_TDX
    report[TDREPORT_REPORTDATA : TDREPORT_REPORTDATA + 64] = report_data
    registers = [state["mrtd"], state["mrconfigid"], state["mrowner"], state["mrownerconfig"],
                 *state["rtmrs"]]
    for i, value in enumerate(registers):
        start = TDREPORT_TDINFO_MRS + i * REGISTER_SIZE
        report[start : start + REGISTER_SIZE] = bytes.fromhex(value)
    return bytes(report)


def _new_app_keys() -> RootKey:
    ca_key = certs.new_tls_key()
    ca = certs.new_app_ca(ca_key, now=datetime.now(UTC))
    return RootKey(
        k256_key=secrets.token_bytes(32),
        disk_crypt_key=secrets.token_bytes(32),
        env_crypt_key=secrets.token_bytes(32),
        ca_cert_pem=ca.cert_pem,
        key_provider=KeyProvider(kind="None", name="none", key_pem=certs.private_key_pem(ca_key)),
    )


def _default_app_compose() -> str:
    doc = {
        "manifest_version": 2,
        "name": "dstack-fake-tdx-app",
        "runner": "docker-compose",
        "docker_compose_file": "services: {}\n",
        "kms_enabled": False,
        "gateway_enabled": False,
        "public_logs": True,
        "public_sysinfo": True,
        "public_tcbinfo": True,
    }
    return json.dumps(doc, indent=2) + "\n"


def _default_sys_config() -> str:
    vm_config = {"os_image_hash": FAKE_OS_IMAGE_HASH, "cpu_count": 2, "memory_size": 4294967296}
    doc = {
        "kms_urls": [],
        "gateway_urls": [],
        "pccs_url": "",
        "docker_registry": "",
        "host_api_url": "",
        "vm_config": json.dumps(vm_config, separators=(",", ":")),
    }
    return json.dumps(doc, indent=2) + "\n"


class FakeTdxMachine:
    """A fake TDX guest rooted in a directory: build with :meth:`create`, reopen with the
    constructor (in any process), flip failure switches, read the registers.

    For tests only; see the module docstring.
    """

    def __init__(self, root: Path) -> None:
        """Open an existing fake tree.

        :raises FileNotFoundError: ``root`` holds no fake TDX state.
        """
        self.root = Path(root).absolute()
        self.paths = FakeTdxPaths(self.root)
        self._store = _StateStore(self.root)
        with self._store.transaction() as state:
            self.kernel = state["kernel"]
        self.profile = KERNEL_PROFILES[self.kernel]

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        kernel: str = "6.16",
        ccel: bytes | Tcg2LogBuilder | None = None,
        mrtd: bytes = DEFAULT_MRTD,
        pki_seed: bytes | None = None,
        appkeys: str | bytes | RootKey | None = None,
        app_compose: str | None = None,
        sys_config: str | None = None,
        dstack_boot: bool = True,
        quote_version: int = 4,
    ) -> FakeTdxMachine:
        """Lay out a freshly booted TD under ``root`` (which may exist but must hold no tree).

        :param kernel: a :data:`KERNEL_PROFILES` name: which interfaces exist.
        :param ccel: the CCEL log area (raw bytes, e.g. a real sample) or a builder; default
            :func:`default_boot_log`. RTMR0..2 start as its replay, as on hardware.
        :param mrtd: the TD's MRTD.
        :param pki_seed: the 32-byte mock PKI seed (default random).
        :param appkeys: the app keys dstack's boot provisions (default fresh, provider None).
        :param app_compose: the app-compose text (default a minimal app).
        :param sys_config: the sys-config text (default with a fake ``os_image_hash``).
        :param dstack_boot: extend dstack's boot events into RTMR3 and write the runtime log.
        :param quote_version: 4 or 5.
        """
        if kernel not in KERNEL_PROFILES:
            raise ValueError(f"unknown kernel profile {kernel!r}; known: {sorted(KERNEL_PROFILES)}")
        profile = KERNEL_PROFILES[kernel]
        root = Path(root).absolute()
        paths = FakeTdxPaths(root)
        if (paths.state_dir / STATE_FILE).exists():
            raise FileExistsError(f"{root} already holds a fake TDX tree")
        seed = secrets.token_bytes(SEED_SIZE) if pki_seed is None else pki_seed
        if len(seed) != SEED_SIZE:
            raise ValueError(f"pki_seed must be {SEED_SIZE} bytes")
        if ccel is None:
            ccel = default_boot_log()
        ccel_data = ccel.build(pad_to=CCEL_LAML) if isinstance(ccel, Tcg2LogBuilder) else ccel
        compose_text = _default_app_compose() if app_compose is None else app_compose
        compose_hash = hashlib.sha256(compose_text.encode()).digest()
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "kernel": kernel,
            "provider": "tdx_guest",
            "pki_seed": seed.hex(),
            "quote_version": quote_version,
            "mrtd": mrtd.hex(),
            "mrconfigid": (MR_CONFIG_ID_V1 + compose_hash).ljust(48, b"\0").hex(),
            "mrowner": ZERO_REGISTER.hex(),
            "mrownerconfig": ZERO_REGISTER.hex(),
            "rtmrs": [r.hex() for r in _boot_registers(ccel_data)],
            "faults": [],
            "counters": {},
            "races": {},
            "crashes": {},
            "outblob_size": 0,
            "entries": {},
        }
        _StateStore(root).write_initial(state)

        if profile.configfs:
            paths.report_dir.mkdir(parents=True, exist_ok=True)
        device_dir = paths.measurements_dir.parent
        device_dir.mkdir(parents=True, exist_ok=True)
        if profile.measurements:
            paths.measurements_dir.mkdir()
            for name, mode in _MEASUREMENT_FILES.items():
                file = paths.measurements_dir / name
                file.write_bytes(_register_value(state, name) or b"")
                os.chmod(file, mode)
        paths.class_link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(device_dir, paths.class_link.parent), paths.class_link)
        paths.device.parent.mkdir(parents=True, exist_ok=True)
        paths.device.touch()
        os.chmod(paths.device, 0o600)
        if profile.ccel:
            paths.ccel_data.parent.mkdir(parents=True, exist_ok=True)
            paths.ccel_data.write_bytes(ccel_data)
            paths.ccel_table.write_bytes(build_ccel_table(len(ccel_data), CCEL_LASA))
            os.chmod(paths.ccel_data, 0o400)
            os.chmod(paths.ccel_table, 0o400)

        paths.host_shared.mkdir(parents=True, exist_ok=True)
        if isinstance(appkeys, RootKey):
            appkeys_text = appkeys.to_appkeys_json()
        elif appkeys is None:
            appkeys_text = _new_app_keys().to_appkeys_json()
        else:
            appkeys_text = appkeys.decode() if isinstance(appkeys, bytes) else appkeys
        paths.appkeys.write_text(appkeys_text)
        os.chmod(paths.appkeys, 0o600)
        paths.app_compose.write_text(compose_text)
        paths.sys_config.write_text(_default_sys_config() if sys_config is None else sys_config)
        paths.runtime_log.parent.mkdir(parents=True, exist_ok=True)

        machine = cls(root)
        if dstack_boot:
            machine.boot_dstack()
        return machine

    # --- what dstack-util does at boot ---

    def boot_events(self) -> list[RuntimeEvent]:
        """dstack's boot events for this tree's inputs, in the order dstack-util emits them."""
        compose_hash = hashlib.sha256(self.paths.app_compose.read_bytes()).digest()
        root_key = RootKey.from_appkeys_json(self.paths.appkeys.read_bytes())
        sys_config = json.loads(self.paths.sys_config.read_text())
        vm_config = json.loads(sys_config.get("vm_config") or "{}")
        app_id = compose_hash[:20]
        instance_id = hashlib.sha256(secrets.token_bytes(20) + app_id).digest()[:20]
        events = [
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", compose_hash),
            ("instance-id", instance_id),
            ("boot-mr-done", b""),
            ("os-image-hash", bytes.fromhex(vm_config.get("os_image_hash", ""))),
            ("key-provider", root_key.key_provider.event_payload()),
            ("storage-fs", b"ext4"),
            ("system-ready", b""),
        ]
        return [RuntimeEvent(event=name, payload=payload) for name, payload in events]

    def boot_dstack(self) -> None:
        """Extend dstack's boot events into RTMR3 and log them, as dstack-util does."""
        io = self.io()
        log = RuntimeEventLog(self.paths.runtime_log)
        for event in self.boot_events():
            log.begin(event)
            if self.profile.measurements:
                io.write(self.paths.register_file(3), event.digest)
            else:
                with self._store.transaction() as state:
                    current = bytes.fromhex(state["rtmrs"][3])
                    state["rtmrs"][3] = hashlib.sha384(current + event.digest).hexdigest()
            log.commit(event)

    # --- hardware ---

    def io(self) -> FakeKernelIO:
        """A fresh :class:`FakeKernelIO` over this tree."""
        return FakeKernelIO(self.root)

    def registers(self) -> Measurements:
        """MRTD and RTMR0..3 as the hardware holds them now."""
        with self._store.transaction() as state:
            r0, r1, r2, r3 = (bytes.fromhex(r) for r in state["rtmrs"])
            return Measurements(
                mrtd=bytes.fromhex(state["mrtd"]), rtmrs=(r0, r1, r2, r3)  # type: ignore[arg-type]
            )

    def pki(self) -> MockIntelPki:
        """The mock Intel PKI that signs this machine's quotes."""
        with self._store.transaction() as state:
            return _pki(state["pki_seed"])

    def trust_bundle(self) -> TrustBundle:
        """What a verifier must be given to accept this machine's quotes."""
        pki = self.pki()
        return TrustBundle(root_ca_pem=pki.root_ca_pem, collateral_json=pki.collateral_json())

    def entries(self) -> list[str]:
        """Report entries present in the configfs report directory."""
        if not self.paths.report_dir.exists():
            return []
        return sorted(p.name for p in self.paths.report_dir.iterdir())

    # --- failure switches ---

    def inject(self, op: str, code: int, times: int = 1) -> None:
        """Make the next ``times`` syscalls at ``op`` fail with ``code`` (``times=-1``: all).

        :param op: one of :data:`FAULT_OPS`.
        """
        if op not in FAULT_OPS:
            raise ValueError(f"unknown fault op {op!r}; known: {sorted(FAULT_OPS)}")
        with self._store.transaction() as state:
            state["faults"].append({"op": op, "errno": int(code), "times": int(times)})

    def crash(self, point: str, times: int = 1) -> None:
        """SIGKILL the process making the next ``times`` extends, at ``point``.

        :param point: ``before_extend`` (the register does not move) or ``after_extend``
            (it moves, and the syscall never returns).
        """
        if point not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {sorted(CRASH_POINTS)}")
        with self._store.transaction() as state:
            state["crashes"][point] = state["crashes"].get(point, 0) + times

    def set_provider(self, name: str | None) -> None:
        """Register a TSM provider by name (``tdx_guest``, ``sev_guest``) or none.

        With none, ``mkdir`` of a report entry fails with ENXIO, as without a TEE driver.
        """
        with self._store.transaction() as state:
            state["provider"] = name

    def empty_outblob(self, times: int = 1) -> None:
        """The next ``times`` reports are empty (a failed GetQuote with ``out_len`` 0)."""
        with self._store.transaction() as state:
            state["counters"]["empty_outblob"] = state["counters"].get("empty_outblob", 0) + times

    def set_outblob_size(self, size: int) -> None:
        """Pad every quote with zeros to at least ``size`` bytes (e.g. over 8 KiB)."""
        with self._store.transaction() as state:
            state["outblob_size"] = int(size)

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
        if stage not in ("inblob", "outblob"):
            raise ValueError("race stage must be 'inblob' or 'outblob'")
        with self._store.transaction() as state:
            state["races"][stage] = state["races"].get(stage, 0) + times

    def set_registers_writable(self, writable: bool) -> None:
        """Make the RTMR sysfs files 0644 (as upstream) or read-only 0444."""
        mode = 0o644 if writable else 0o444
        for index in range(4):
            register_file = self.paths.register_file(index)
            if register_file.exists():
                os.chmod(register_file, mode)

    def clear_faults(self) -> None:
        """Remove every injected fault, race, crash and counter; restore provider and modes."""
        with self._store.transaction() as state:
            state["faults"] = []
            state["counters"] = {}
            state["races"] = {}
            state["crashes"] = {}
            state["outblob_size"] = 0
            state["provider"] = "tdx_guest"
        if self.profile.measurements:
            self.set_registers_writable(True)

    # --- running an agent on it ---

    def agent_options(self, **extra: str) -> dict[str, str]:
        """``--platform-option`` values that point the ``tdx`` plugin at this tree."""
        return {"root": str(self.root), "sysio": "fake", **extra}

    def agent_args(self, **options: str) -> list[str]:
        """``serve`` arguments (besides ``--platform tdx``) for an agent on this tree."""
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

    def agent(
        self,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        options: Mapping[str, str] | None = None,
    ) -> FakeTdxAgent:
        """An (unstarted) ``dstack-agent serve --platform tdx`` on this tree."""
        return FakeTdxAgent(self, workdir=workdir, extra_args=extra_args, options=options)


class FakeTdxAgent(AgentProcess):
    """An :class:`~dstack_core.testing.AgentProcess` serving ``--platform tdx`` on a fake tree.

    :ivar machine: the fake machine.
    :ivar input_files: the agent's inputs by their simulator state-dir names
        (``appkeys.json``, ``app-compose.json``, ``sys-config.json``), so tests written for
        the simulator find them.
    """

    def __init__(
        self,
        machine: FakeTdxMachine,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            "tdx",
            workdir=workdir,
            extra_args=[*machine.agent_args(**dict(options or {})), *extra_args],
            env=machine.agent_env(),
        )
        self.machine = machine
        self.input_files = {
            "appkeys.json": machine.paths.appkeys,
            "app-compose.json": machine.paths.app_compose,
            "sys-config.json": machine.paths.sys_config,
        }
