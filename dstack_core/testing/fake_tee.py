"""Fakes of the Linux Intel TDX and AMD SEV-SNP guest kernel interfaces, for tests only.

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

The SEV-SNP side (spec sections 1, 4 and 6.3) follows the same pattern:

* :class:`FakeSnpMachine` lays out an SNP guest's ``/``: configfs-tsm with the ``sev_guest``
  provider (``privlevel``, ``privlevel_floor``, ``auxblob``; the SVSM attributes under a
  VMPL above 0), ``/dev/sev-guest``, and the host-shared app-compose and sys-config. Its
  state lives in ``<root>/.fake-snp/state.json``.
* :class:`FakeSnpKernelIO` adds the kernel's side effects: configfs reports are the bare
  1184-byte SNP report; the ``SNP_GET_REPORT``, ``SNP_GET_DERIVED_KEY`` and
  ``SNP_GET_EXT_REPORT`` ioctls decode the real 32-byte ``snp_guest_request_ioctl`` and
  dereference its pointers with ctypes, answer MSG_REPORT_RSP / MSG_KEY_RSP, refuse
  ``msg_version`` 0 with EINVAL, copy ``exitinfo2`` back on failure (subject to CPython's
  small-buffer rule), and disable the VMPCK after a transport failure, as the kernel does.
* Reports are signed by a test P-384 key derived from the machine's seed (never AMD's) and
  carry ``family_id`` ``DSTACK-FAKE-SNP``.
"""

from __future__ import annotations

import contextlib
import ctypes
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
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

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
    "DEFAULT_SNP_MEASUREMENT",
    "FAKE_SNP_FAMILY_ID",
    "FAKE_TDX_USER_DATA",
    "FAULT_OPS",
    "KERNEL_PROFILES",
    "SEV_GUEST_PROVIDER",
    "SEV_RET_INVALID_KEY",
    "SEV_RET_INVALID_PARAM",
    "SNP_FAULT_OPS",
    "SNP_GET_DERIVED_KEY",
    "SNP_GET_EXT_REPORT",
    "SNP_GET_REPORT",
    "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "SNP_KERNEL_PROFILES",
    "TDX_CMD_EXTEND_RTMR_IOR",
    "TDX_CMD_EXTEND_RTMR_IOW",
    "TDX_CMD_GET_REPORT0",
    "FakeKernelIO",
    "FakeSnpAgent",
    "FakeSnpKernelIO",
    "FakeSnpMachine",
    "FakeSnpPaths",
    "FakeTdxAgent",
    "FakeTdxMachine",
    "FakeTdxPaths",
    "KernelProfile",
    "SnpKernelProfile",
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
    state_dir: str = STATE_DIR
    missing_hint: str = "not a fake TDX tree (build one with FakeTdxMachine.create)"

    def __init__(self, root: Path) -> None:
        self.dir = root / self.state_dir
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
                mrtd=bytes.fromhex(state["mrtd"]), rtmrs=(r0, r1, r2, r3)
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


# --- AMD SEV-SNP --------------------------------------------------------------------------
#
# The SNP side of the fake: a guest whose kernel offers configfs-tsm with the ``sev_guest``
# provider and ``/dev/sev-guest`` (spec section 4). It shares the helpers above but not the
# TDX state: its hardware lives in ``<root>/.fake-snp/state.json``. Layouts are written out
# here from the spec, independently of dstack_core.snp, so the fake does not share code with
# the parser under test.

SNP_STATE_DIR: Final = ".fake-snp"
SEV_GUEST_PROVIDER: Final = "sev_guest"
FAKE_SNP_FAMILY_ID: Final = b"DSTACK-FAKE-SNP\0"
"""The family_id (set by the guest owner at launch) of every fake SNP report."""

SNP_GUEST_REQUEST_SIZE: Final = 32
SNP_GET_REPORT: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 0
SNP_GET_DERIVED_KEY: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 1
SNP_GET_EXT_REPORT: Final = (3 << 30) | (SNP_GUEST_REQUEST_SIZE << 16) | (ord("S") << 8) | 2
assert (SNP_GET_REPORT, SNP_GET_DERIVED_KEY, SNP_GET_EXT_REPORT) == (
    0xC0205300, 0xC0205301, 0xC0205302)

_SNP_GUEST_REQUEST: Final = struct.Struct("<B7xQQQ")
"""``struct snp_guest_request_ioctl``: u8 msg_version, pad, u64 req_data, resp_data, exitinfo2."""
_SNP_EXITINFO2_OFFSET: Final = 24
_SNP_REPORT_REQ: Final = struct.Struct("<64sI28s")
"""``struct snp_report_req``: user_data[64], u32 vmpl, rsvd[28] (96 bytes)."""
_SNP_DERIVED_KEY_REQ: Final = struct.Struct("<IIQIIQ")
"""``struct snp_derived_key_req``: root_key_select, rsvd, guest_field_select, vmpl,
guest_svn, tcb_version (32 bytes)."""
_SNP_EXT_REPORT_REQ: Final = struct.Struct("<96sQI4x")
"""``struct snp_ext_report_req``: the report request, u64 certs_address, u32 certs_len (112)."""
_SNP_REPORT_RESP_SIZE: Final = 4000
"""``struct snp_report_resp``: the kernel copies all 4000 bytes to ``resp_data``."""
_SNP_DERIVED_KEY_RESP_SIZE: Final = 64
_MSG_RSP_HEADER: Final = struct.Struct("<II24x")
"""MSG_REPORT_RSP: u32 status, u32 report_size, 24 reserved bytes; the report at 32."""
_MSG_KEY_RSP: Final = struct.Struct("<I28x32s")
"""MSG_KEY_RSP: u32 status, 28 reserved bytes, the 32-byte key at 0x20."""
_FCNTL_STACK_BUFFER: Final = 1024
"""CPython's ``fcntl.ioctl`` copies buffers up to this size through a temporary."""

SEV_RET_SUCCESS: Final = 0
SEV_RET_INVALID_PARAM: Final = 0x16
SEV_RET_INVALID_KEY: Final = 0x27
SNP_GUEST_VMM_ERR_INVALID_LEN: Final = 1
SNP_GUEST_VMM_ERR_BUSY: Final = 2
SEV_FW_BLOB_MAX_SIZE: Final = 0x4000
_PAGE_SIZE: Final = 4096
_GUEST_FIELD_SELECT_BITS: Final = 0x3F
"""policy, image_id, family_id, measurement, guest_svn, tcb_version (bits 0-5)."""

_SNP_REPORT_SIZE: Final = 0x4A0
_SNP_SIGNED_SIZE: Final = 0x2A0
_SNP_REPORT_VERSION: Final = 3
_SNP_DEFAULT_POLICY: Final = (1 << 17) | (1 << 16)
"""The must-be-one bit and SMT allowed; DEBUG (bit 19) clear."""
_SNP_DEFAULT_TCB: Final = 0xD315000000000304
"""A Milan-shaped TCB_VERSION: microcode 0xD3, SNP 0x15, TEE 3, boot loader 4 (made up)."""
DEFAULT_SNP_MEASUREMENT: Final = hashlib.sha384(b"dstack-core fake SEV-SNP launch (not hardware)").digest()

SNP_FAULT_OPS: Final = frozenset(
    {"mkdir", "rmdir", "provider", "generation", "inblob", "commit", "privlevel", "outblob",
     "ioctl"}
)
"""Where :meth:`FakeSnpMachine.inject` can make a syscall fail (as :data:`FAULT_OPS`;
``privlevel`` fails that text attribute's ``write(2)``; ``ioctl`` fails an ioctl before the
kernel reads its argument, so nothing is copied back)."""
SNP_FIRMWARE_REQUESTS: Final = frozenset({"report", "key", "any"})

_SNP_ATTRIBUTE_MODES: Final = {
    "generation": 0o444,
    "provider": 0o444,
    "privlevel": 0o200,
    "privlevel_floor": 0o444,
    "inblob": 0o200,
    "outblob": 0o444,
    "auxblob": 0o444,
}
_SVSM_ATTRIBUTE_MODES: Final = {
    "service_provider": 0o200,
    "service_guid": 0o200,
    "service_manifest_version": 0o200,
    "manifestblob": 0o444,
}
_SNP_BLOBS: Final = frozenset({"outblob", "auxblob", "manifestblob"})
_SNP_TEXT_OPTIONS: Final = frozenset(
    {"privlevel", "service_provider", "service_guid", "service_manifest_version"}
)
_PRIVLEVEL_MAX: Final = 3


@attrs.frozen(kw_only=True)
class SnpKernelProfile:
    """What a kernel version offers an SEV-SNP guest (spec sections 1.7, 4 and 7).

    :ivar configfs: configfs-tsm with the ``sev_guest`` provider (6.7+).
    :ivar svsm: the ``service_*`` and ``manifestblob`` attributes when running under an
        SVSM (VMPL above 0; 6.10+).
    :ivar outblob_max: ``TSM_REPORT_OUTBLOB_MAX``.
    """

    configfs: bool
    svsm: bool = False
    outblob_max: int = 32 * 1024


SNP_KERNEL_PROFILES: Final[Mapping[str, SnpKernelProfile]] = {
    "5.19": SnpKernelProfile(configfs=False),
    "6.7": SnpKernelProfile(configfs=True),
    "6.10": SnpKernelProfile(configfs=True, svsm=True),
    "7.0": SnpKernelProfile(configfs=True, svsm=True, outblob_max=16 << 20),
}
"""SNP kernel profiles by name: ``5.19`` has only ``/dev/sev-guest``."""


@attrs.frozen
class FakeSnpPaths:
    """Where everything lives in a fake SNP tree (the same relative paths as in a guest)."""

    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / SNP_STATE_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / "sys/kernel/config/tsm/report"

    @property
    def device(self) -> Path:
        return self.root / "dev/sev-guest"

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


class _SnpStateStore(_StateStore):
    state_dir = SNP_STATE_DIR
    missing_hint = "not a fake SEV-SNP tree (build one with FakeSnpMachine.create)"


_VCEK_CACHE: dict[bytes, ec.EllipticCurvePrivateKey] = {}


def _fake_vcek(seed_hex: str) -> ec.EllipticCurvePrivateKey:
    """The machine's test P-384 "VCEK": derived from its seed, never AMD's."""
    seed = bytes.fromhex(seed_hex)
    key = _VCEK_CACHE.get(seed)
    if key is None:
        order = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                    "581a0db248b0a77aecec196accc52973", 16)
        scalar = int.from_bytes(hashlib.sha384(b"fake-snp-vcek" + seed).digest(), "big")
        key = _VCEK_CACHE[seed] = ec.derive_private_key(scalar % (order - 1) + 1, ec.SECP384R1())
    return key


def _snp_report(state: dict[str, Any], report_data: bytes, vmpl: int) -> bytes:
    """A 1184-byte report laid out as spec 4.2, signed with the fake VCEK if enabled."""
    report = bytearray(_SNP_REPORT_SIZE)
    version = int(state["report_version"])
    tcb = int(state["tcb"])
    struct.pack_into("<IIQ", report, 0x000, version, int(state["guest_svn"]), int(state["policy"]))
    report[0x010:0x020] = bytes.fromhex(state["family_id"])
    report[0x020:0x030] = bytes.fromhex(state["image_id"])
    # vmpl, signature_algo (1 = ECDSA P-384/SHA-384), current_tcb, platform_info (SMT on),
    # signer_info (signing key 0 = VCEK).
    struct.pack_into("<IIQQI", report, 0x030, vmpl, 1, tcb, 1, 0)
    report[0x050:0x090] = report_data
    report[0x090:0x0C0] = bytes.fromhex(state["measurement"])
    report[0x0C0:0x0E0] = bytes.fromhex(state["host_data"])
    report[0x140:0x160] = bytes.fromhex(state["report_id"])
    report[0x160:0x180] = b"\xff" * 32  # report_id_ma: no migration agent
    struct.pack_into("<Q", report, 0x180, tcb)
    if version >= 3:
        report[0x188:0x18B] = bytes((0x19, 0x01, 0x01))  # family 19h, model 1, stepping 1
    report[0x1A0:0x1E0] = bytes.fromhex(state["chip_id"])
    struct.pack_into("<Q", report, 0x1E0, tcb)
    report[0x1E8:0x1EB] = bytes((0x15, 0x37, 0x01))  # firmware 1.55 build 0x15
    report[0x1EC:0x1EF] = bytes((0x15, 0x37, 0x01))
    struct.pack_into("<Q", report, 0x1F0, tcb)
    if state["sign"]:
        der = _fake_vcek(state["seed"]).sign(
            bytes(report[:_SNP_SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())
        )
        r, s = decode_dss_signature(der)
        report[0x2A0:0x2E8] = r.to_bytes(72, "little")
        report[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(report)


def _snp_derived_key(state: dict[str, Any], root_key_select: int, field_select: int,
                     vmpl: int, guest_svn: int, tcb_version: int) -> bytes:
    """The firmware's derived key: the selected root secret mixed with the selected fields."""
    root = "vmrk" if root_key_select & 1 else "seed"
    material = [
        b"fake-snp-derived-key", bytes.fromhex(state[root]),
        struct.pack("<IQ", vmpl, field_select),
    ]
    for bit, value in (
        (0, struct.pack("<Q", int(state["policy"]))),
        (1, bytes.fromhex(state["image_id"])),
        (2, bytes.fromhex(state["family_id"])),
        (3, bytes.fromhex(state["measurement"])),
        (4, struct.pack("<I", guest_svn)),
        (5, struct.pack("<Q", tcb_version)),
    ):
        if field_select >> bit & 1:
            material.append(value)
    return hashlib.sha256(b"".join(material)).digest()


class _GuestRequestFailed(Exception):
    """An ioctl failure: the errno, and the exitinfo2 the kernel copies back (0: none)."""

    def __init__(self, code: int, exitinfo2: int, detail: str) -> None:
        super().__init__(detail)
        self.code, self.exitinfo2, self.detail = code, exitinfo2, detail


class FakeSnpKernelIO(OsSysIO):
    """A :class:`~dstack_core.sysio.SysIO` over a fake SEV-SNP tree: real syscalls plus the
    kernel's side effects (configfs-tsm with the ``sev_guest`` provider, ``/dev/sev-guest``).

    The ioctl handler decodes the real 32-byte ``snp_guest_request_ioctl`` from the buffer
    it is given and **dereferences** ``req_data``/``resp_data`` (and ``certs_address``) as
    the kernel does, with ctypes, so a plugin's marshalling is exercised for real: the
    kernel copies 4000 bytes to a report's ``resp_data`` and 64 to a key's, whatever the
    caller allocated. Buffers of up to 1024 bytes behave as CPython's ``fcntl.ioctl``
    treats them: copied through a temporary, copied back only on success (the newest
    CPython; :meth:`FakeSnpMachine.set_copyback` selects the older "always").

    :ivar calls: ``(operation, path relative to root, byte count)`` of every call.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.paths = FakeSnpPaths(self.root)
        self._store = _SnpStateStore(self.root)
        self.calls: list[tuple[str, str, int]] = []
        with self._store.transaction() as state:
            self.profile = SNP_KERNEL_PROFILES[state["kernel"]]

    # --- path classification ---

    def _relative(self, path: Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _entry(self, path: Path) -> tuple[str, str] | None:
        absolute = Path(os.path.abspath(path))
        if absolute.parent.parent == self.paths.report_dir:
            return absolute.parent.name, absolute.name
        return None

    def _record(self, op: str, path: Path, size: int = 0) -> None:
        self.calls.append((op, self._relative(path) or str(path), size))

    def _attributes(self, state: dict[str, Any]) -> dict[str, int]:
        """The attributes ``sev_report_attr_visible`` shows for this guest."""
        modes = dict(_SNP_ATTRIBUTE_MODES)
        if self.profile.svsm and state["vmpl"] > 0:
            modes.update(_SVSM_ATTRIBUTE_MODES)
        return modes

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
            for name, mode in self._attributes(state).items():
                (absolute / name).touch()
                os.chmod(absolute / name, mode)
            FakeKernelIO._mirror(absolute / "generation", b"0\n")
            FakeKernelIO._mirror(absolute / "provider", state["provider"].encode() + b"\n")
            FakeKernelIO._mirror(absolute / "privlevel_floor", b"%d\n" % state["vmpl"])
            state["entries"][absolute.name] = {
                "wgen": 0, "rgen": 0, "inblob": None, "deferred": None, "privlevel": 0,
                "service_provider": None, "blobs": None,
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
                known = set(_SNP_ATTRIBUTE_MODES) | set(_SVSM_ATTRIBUTE_MODES)
                for child in absolute.iterdir():
                    if child.name in known:
                        child.unlink()  # configfs removes the attributes itself
            super().rmdir(path)
            state["entries"].pop(absolute.name, None)

    def read(self, path: Path) -> bytes:
        located = self._entry(path)
        if located is not None:
            data = self._read_attribute(Path(path), *located)
        else:
            if self._relative(path) is not None and os.path.exists(path):
                FakeKernelIO._check_mode(Path(path), read=True)
            data = super().read(path)
        self._record("read", path, len(data))
        return data

    def _read_attribute(self, path: Path, name: str, attribute: str) -> bytes:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in self._attributes(state):
                return super().read(path)
            FakeKernelIO._check_mode(path, read=True)
            if attribute == "generation":
                FakeKernelIO._poll_deferred(entry)
                if (code := _take(state, "generation")) is not None:
                    raise _oserror(code, path, "injected")
                FakeKernelIO._mirror(path, b"%d\n" % entry["wgen"])
                return super().read(path)
            if attribute == "provider":
                if state["provider"] is None:
                    raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
                if (code := _take(state, "provider")) is not None:
                    raise _oserror(code, path, "injected")
                return super().read(path)
            if attribute == "privlevel_floor":
                return super().read(path)
            blob = self._blob(state, entry, path, attribute)
            if len(blob) > self.profile.outblob_max:
                raise _oserror(errno.EFBIG, path, f"blob exceeds {self.profile.outblob_max}")
            FakeKernelIO._mirror(path, blob)
            return super().read(path)

    def _blob(self, state: dict[str, Any], entry: dict[str, Any], path: Path,
              attribute: str) -> bytes:
        """``tsm_report_read``: generate (``sev_report_new``) unless the cache is current."""
        if not entry["inblob"]:
            raise _oserror(errno.EINVAL, path, "inblob was never written")
        if state["provider"] is None:
            raise _oserror(errno.ENXIO, path, "TSM provider unregistered")
        if entry["blobs"] is None or entry["rgen"] != entry["wgen"]:
            entry["blobs"] = None
            if (code := _take(state, "outblob")) is not None:
                raise _oserror(code, path, "injected")
            inblob = bytes.fromhex(entry["inblob"])
            if len(inblob) != 64:
                raise _oserror(errno.EINVAL, path, "sev_guest needs 64 bytes of inblob")
            try:
                FakeSnpKernelIO._send(state)
            except _GuestRequestFailed as failure:
                raise _oserror(failure.code, path, failure.detail) from None
            status = _firmware_status(state, "report", entry["privlevel"])
            if status in (SEV_RET_INVALID_PARAM, SEV_RET_INVALID_KEY):
                raise _oserror(errno.EINVAL, path, f"firmware status {status:#x}")
            if status != SEV_RET_SUCCESS:
                raise _oserror(errno.ENXIO, path, f"firmware status {status:#x}")
            if _take_counter(state, "counters", "empty_outblob"):
                report = b""
            else:
                report = _snp_report(state, inblob, entry["privlevel"])
            certs = bytes.fromhex(state["certs"]) if state["certs"] else b""
            entry["blobs"] = {"outblob": report.hex(), "auxblob": certs.hex(), "manifestblob": ""}
            entry["rgen"] = entry["wgen"]
            if _take_counter(state, "races", "outblob"):
                entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
                entry["inblob"] = (b"\xee" * 64).hex()
        return bytes.fromhex(entry["blobs"][attribute])

    def write(self, path: Path, data: bytes) -> None:
        self._record("write", path, len(data))
        located = self._entry(path)
        if located is not None:
            return self._write_attribute(Path(path), *located, bytes(data))
        if self._relative(path) is not None and os.path.exists(path):
            FakeKernelIO._check_mode(Path(path), write=True)
        return super().write(path, data)

    def _write_attribute(self, path: Path, name: str, attribute: str, data: bytes) -> None:
        with self._store.transaction() as state:
            entry = state["entries"].get(name)
            if entry is None or attribute not in self._attributes(state):
                return super().write(path, data)
            FakeKernelIO._check_mode(path, write=True)
            if attribute in _SNP_TEXT_OPTIONS:
                return self._write_option(state, entry, path, attribute, data)
            # inblob: buffered, committed at close with the errors dropped (as for TDX).
            if len(data) > INBLOB_MAX:
                FakeKernelIO._commit(state, entry, b"")
                raise _oserror(errno.EFBIG, path, f"inblob holds at most {INBLOB_MAX} bytes")
            if (code := _take(state, "inblob")) is not None:
                FakeKernelIO._commit(state, entry, b"")
                raise _oserror(code, path, "injected")
            super().write(path, data)
            FakeKernelIO._commit(state, entry, data)

    @staticmethod
    def _write_option(state: dict[str, Any], entry: dict[str, Any], path: Path,
                      attribute: str, data: bytes) -> None:
        """A text attribute: checked and stored during ``write(2)``, errors returned there."""
        if attribute == "privlevel" and (code := _take(state, "privlevel")) is not None:
            raise _oserror(code, path, "injected")
        text = data.decode("ascii", "replace").strip()
        if attribute == "privlevel":
            try:
                value: Any = int(text, 10)
            except ValueError:
                raise _oserror(errno.EINVAL, path, "not an integer") from None
            if not state["vmpl"] <= value <= _PRIVLEVEL_MAX:
                raise _oserror(errno.EINVAL, path, f"privlevel outside {state['vmpl']}..3")
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
        if entry["wgen"] == (entry["rgen"] - 1) & U64_MASK:
            raise _oserror(errno.EBUSY, path, "write generation would wrap")
        entry[attribute] = value
        entry["wgen"] = (entry["wgen"] + 1) & U64_MASK
        entry["blobs"] = None

    # --- /dev/sev-guest ---

    def ioctl(self, device: Path, request: int, arg: bytearray) -> int:
        self._record("ioctl", device, len(arg))
        if Path(os.path.abspath(device)) != self.paths.device:
            return super().ioctl(device, request, arg)
        with self._store.transaction() as state:
            FakeKernelIO._check_mode(Path(device), read=True, write=True)
            if (code := _take(state, "ioctl")) is not None:
                raise _oserror(code, device, "injected")
            # What fcntl.ioctl hands the kernel: the buffer itself when larger than 1024
            # bytes, else a temporary copy that CPython copies back afterwards.
            direct = len(arg) > _FCNTL_STACK_BUFFER
            user = arg if direct else bytearray(arg)
            try:
                self._guest_ioctl(state, request, user)
            except _GuestRequestFailed as failure:
                if failure.exitinfo2 and len(user) >= SNP_GUEST_REQUEST_SIZE:
                    struct.pack_into("<Q", user, _SNP_EXITINFO2_OFFSET, failure.exitinfo2)
                if not direct and state["copyback"] == "always":
                    arg[:] = user
                raise _oserror(failure.code, device, failure.detail) from None
            if not direct:
                arg[:] = user
            return 0

    def _guest_ioctl(self, state: dict[str, Any], request: int, user: bytearray) -> None:
        """``snp_guest_ioctl``: copy in 32 bytes, exitinfo2 = 0xff, dispatch, copy back the
        struct when exitinfo2 is non-zero (done by the caller)."""
        if len(user) < SNP_GUEST_REQUEST_SIZE:
            raise _GuestRequestFailed(errno.EFAULT, 0, "argument shorter than 32 bytes")
        msg_version, req_data, resp_data, _ = _SNP_GUEST_REQUEST.unpack_from(user, 0)
        if msg_version == 0:
            raise _GuestRequestFailed(errno.EINVAL, 0, "msg_version must be non-zero")
        if request not in (SNP_GET_REPORT, SNP_GET_DERIVED_KEY, SNP_GET_EXT_REPORT):
            raise _GuestRequestFailed(errno.ENOTTY, 0xFF, f"unknown ioctl {request:#x}")
        if not req_data or not resp_data:
            raise _GuestRequestFailed(errno.EINVAL, 0xFF, "req_data and resp_data are required")
        if request == SNP_GET_DERIVED_KEY:
            self._derived_key(state, req_data, resp_data)
        elif request == SNP_GET_REPORT:
            request_bytes = ctypes.string_at(req_data, _SNP_REPORT_REQ.size)
            self._report(state, request_bytes, resp_data)
        else:
            self._ext_report(state, req_data, resp_data)

    @staticmethod
    def _send(state: dict[str, Any]) -> None:
        """``snp_send_guest_request``: a disabled VMPCK, or an injected transport failure
        (which disables the VMPCK unless it is the non-fatal INVALID_LEN)."""
        if state["vmpck_disabled"]:
            raise _GuestRequestFailed(errno.ENOTTY, 0xFF, "VMPCK is disabled until reboot")
        failure = _take_guest_error(state)
        if failure is not None:
            if failure["disable_vmpck"]:
                state["vmpck_disabled"] = True
            exitinfo2 = (failure["vmm_error"] << 32) | failure["fw_error"]
            raise _GuestRequestFailed(failure["errno"], exitinfo2, "injected guest request failure")

    def _report(self, state: dict[str, Any], request_bytes: bytes, resp_data: int) -> None:
        user_data, vmpl, reserved = _SNP_REPORT_REQ.unpack(request_bytes)
        self._send(state)
        status = _firmware_status(state, "report", vmpl)
        if any(reserved):
            status = status or SEV_RET_INVALID_PARAM
        response = bytearray(_SNP_REPORT_RESP_SIZE)
        if status == SEV_RET_SUCCESS:
            _MSG_RSP_HEADER.pack_into(response, 0, SEV_RET_SUCCESS, _SNP_REPORT_SIZE)
            response[32 : 32 + _SNP_REPORT_SIZE] = _snp_report(state, user_data, vmpl)
        else:
            _MSG_RSP_HEADER.pack_into(response, 0, status, 0)
        ctypes.memmove(resp_data, bytes(response), len(response))

    def _derived_key(self, state: dict[str, Any], req_data: int, resp_data: int) -> None:
        fields = _SNP_DERIVED_KEY_REQ.unpack(ctypes.string_at(req_data, _SNP_DERIVED_KEY_REQ.size))
        root_key_select, reserved, field_select, vmpl, guest_svn, tcb_version = fields
        self._send(state)
        status = _firmware_status(state, "key", vmpl)
        if status == SEV_RET_SUCCESS and (
            root_key_select & ~1 or reserved or field_select & ~_GUEST_FIELD_SELECT_BITS
            or guest_svn > state["guest_svn"] or tcb_version > state["tcb"]
        ):
            status = SEV_RET_INVALID_PARAM
        if status == SEV_RET_SUCCESS and root_key_select & 1 and state["vmrk"] is None:
            status = SEV_RET_INVALID_KEY  # no VMRK installed (approximated; unverified)
        key = bytes(32)
        if status == SEV_RET_SUCCESS:
            key = _snp_derived_key(state, root_key_select, field_select, vmpl, guest_svn,
                                   tcb_version)
        ctypes.memmove(resp_data, _MSG_KEY_RSP.pack(status, key), _SNP_DERIVED_KEY_RESP_SIZE)

    def _ext_report(self, state: dict[str, Any], req_data: int, resp_data: int) -> None:
        """``get_ext_report``: a plain report without a certificate buffer; else the
        certificate-length dance (page-aligned, at most 16 KiB, EIO + INVALID_LEN)."""
        raw = ctypes.string_at(req_data, _SNP_EXT_REPORT_REQ.size)
        report_request, certs_address, certs_len = _SNP_EXT_REPORT_REQ.unpack(raw)
        if not certs_address or not certs_len:
            return self._report(state, report_request, resp_data)
        if certs_len > SEV_FW_BLOB_MAX_SIZE or certs_len % _PAGE_SIZE:
            raise _GuestRequestFailed(errno.EINVAL, 0xFF, "certs_len not page-aligned or too big")
        certs = bytes.fromhex(state["certs"]) if state["certs"] else b""
        needed = -(-len(certs) // _PAGE_SIZE) * _PAGE_SIZE
        if certs_len < needed:
            ctypes.memmove(
                req_data, _SNP_EXT_REPORT_REQ.pack(report_request, certs_address, needed),
                _SNP_EXT_REPORT_REQ.size,
            )
            raise _GuestRequestFailed(
                errno.EIO, SNP_GUEST_VMM_ERR_INVALID_LEN << 32, "certificate buffer too small"
            )
        self._report(state, report_request, resp_data)
        ctypes.memmove(certs_address, certs.ljust(certs_len, b"\0"), certs_len)


def _take_guest_error(state: dict[str, Any]) -> dict[str, Any] | None:
    errors = state["guest_errors"]
    if not errors:
        return None
    failure = errors[0]
    if failure["times"] > 0:
        failure["times"] -= 1
        if failure["times"] == 0:
            errors.pop(0)
    return dict(failure)


def _firmware_status(state: dict[str, Any], request: str, vmpl: int) -> int:
    """The payload status the firmware answers: injected, else INVALID_PARAM for a VMPL
    below the guest's own or above 3, else success."""
    for entry in state["firmware_status"]:
        if entry["request"] in (request, "any"):
            if entry["times"] > 0:
                entry["times"] -= 1
                if entry["times"] == 0:
                    state["firmware_status"].remove(entry)
            return int(entry["status"])
    if not state["vmpl"] <= vmpl <= _PRIVLEVEL_MAX:
        return SEV_RET_INVALID_PARAM
    return SEV_RET_SUCCESS


class FakeSnpMachine:
    """A fake SEV-SNP guest rooted in a directory: build with :meth:`create`, reopen with
    the constructor (in any process), flip failure switches, change the launch measurement.

    For tests only: its reports are signed (if at all) by a P-384 key derived from the
    machine's seed (:meth:`vcek_public_key`), and carry ``family_id`` ``DSTACK-FAKE-SNP``.
    """

    def __init__(self, root: Path) -> None:
        """Open an existing fake tree.

        :raises FileNotFoundError: ``root`` holds no fake SNP state.
        """
        self.root = Path(root).absolute()
        self.paths = FakeSnpPaths(self.root)
        self._store = _SnpStateStore(self.root)
        with self._store.transaction() as state:
            self.kernel = state["kernel"]
        self.profile = SNP_KERNEL_PROFILES[self.kernel]

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        kernel: str = "6.10",
        vmpl: int = 0,
        measurement: bytes = DEFAULT_SNP_MEASUREMENT,
        host_data: bytes | None = None,
        policy: int = _SNP_DEFAULT_POLICY,
        guest_svn: int = 0,
        report_version: int = _SNP_REPORT_VERSION,
        sign: bool = True,
        seed: bytes | None = None,
        vmrk: bool = False,
        app_compose: str | None = None,
        sys_config: str | None = None,
    ) -> FakeSnpMachine:
        """Lay out a freshly launched SNP guest under ``root`` (which must hold no tree).

        :param kernel: a :data:`SNP_KERNEL_PROFILES` name.
        :param vmpl: the VMPL the guest runs at (``privlevel_floor``; above 0 under an SVSM).
        :param measurement: the 48-byte launch measurement.
        :param host_data: the 32 bytes the host bound at launch (default: SHA-256 of the
            app-compose, a stand-in for dstack's MrConfigV3 binding).
        :param policy: the guest policy (default: SMT allowed, DEBUG clear).
        :param sign: sign reports with the fake VCEK (else the signature field is zero).
        :param seed: 32 bytes from which the chip secret and the fake VCEK derive.
        :param vmrk: whether a VM root key is installed (else VMRK derivation fails).
        """
        if kernel not in SNP_KERNEL_PROFILES:
            raise ValueError(
                f"unknown SNP kernel profile {kernel!r}; known: {sorted(SNP_KERNEL_PROFILES)}"
            )
        if not 0 <= vmpl <= _PRIVLEVEL_MAX:
            raise ValueError("vmpl must be 0..3")
        if len(measurement) != 48:
            raise ValueError("measurement must be 48 bytes")
        root = Path(root).absolute()
        paths = FakeSnpPaths(root)
        if (paths.state_dir / STATE_FILE).exists():
            raise FileExistsError(f"{root} already holds a fake SEV-SNP tree")
        seed = secrets.token_bytes(32) if seed is None else seed
        if len(seed) != 32:
            raise ValueError("seed must be 32 bytes")
        compose_text = _default_app_compose() if app_compose is None else app_compose
        if host_data is None:
            host_data = hashlib.sha256(compose_text.encode()).digest()
        if len(host_data) != 32:
            raise ValueError("host_data must be 32 bytes")
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "kernel": kernel,
            "provider": SEV_GUEST_PROVIDER,
            "vmpl": vmpl,
            "seed": seed.hex(),
            "vmrk": hashlib.sha256(b"fake-snp-vmrk" + seed).hexdigest() if vmrk else None,
            "measurement": measurement.hex(),
            "host_data": host_data.hex(),
            "policy": policy,
            "guest_svn": guest_svn,
            "family_id": FAKE_SNP_FAMILY_ID.hex(),
            "image_id": bytes(16).hex(),
            "report_version": report_version,
            "report_id": hashlib.sha256(b"fake-snp-report-id" + seed).hexdigest(),
            "chip_id": hashlib.sha512(b"fake-snp-chip-id" + seed).hexdigest(),
            "tcb": _SNP_DEFAULT_TCB,
            "sign": sign,
            "certs": None,
            "copyback": "success-only",
            "vmpck_disabled": False,
            "faults": [],
            "guest_errors": [],
            "firmware_status": [],
            "counters": {},
            "races": {},
            "entries": {},
        }
        _SnpStateStore(root).write_initial(state)
        if SNP_KERNEL_PROFILES[kernel].configfs:
            paths.report_dir.mkdir(parents=True, exist_ok=True)
        paths.device.parent.mkdir(parents=True, exist_ok=True)
        paths.device.touch()
        os.chmod(paths.device, 0o600)
        paths.host_shared.mkdir(parents=True, exist_ok=True)
        paths.app_compose.write_text(compose_text)
        paths.sys_config.write_text(_default_sys_config() if sys_config is None else sys_config)
        paths.runtime_log.parent.mkdir(parents=True, exist_ok=True)
        return cls(root)

    # --- hardware ---

    def io(self) -> FakeSnpKernelIO:
        """A fresh :class:`FakeSnpKernelIO` over this tree."""
        return FakeSnpKernelIO(self.root)

    def report(self, report_data: bytes, *, vmpl: int | None = None) -> bytes:
        """A report as the firmware would make it now (no kernel interface involved)."""
        with self._store.transaction() as state:
            return _snp_report(state, report_data, state["vmpl"] if vmpl is None else vmpl)

    def vcek_public_key(self) -> ec.EllipticCurvePublicKey:
        """The fake VCEK's public key (P-384): what verifies this machine's signatures."""
        with self._store.transaction() as state:
            return _fake_vcek(state["seed"]).public_key()

    @property
    def measurement(self) -> bytes:
        with self._store.transaction() as state:
            return bytes.fromhex(state["measurement"])

    @property
    def host_data(self) -> bytes:
        with self._store.transaction() as state:
            return bytes.fromhex(state["host_data"])

    @property
    def vmpck_disabled(self) -> bool:
        """Whether a transport failure has disabled the VMPCK (every request: ENOTTY)."""
        with self._store.transaction() as state:
            return bool(state["vmpck_disabled"])

    def entries(self) -> list[str]:
        """Report entries present in the configfs report directory."""
        if not self.paths.report_dir.exists():
            return []
        return sorted(p.name for p in self.paths.report_dir.iterdir())

    def relaunch(self, *, measurement: bytes | None = None, host_data: bytes | None = None,
                 policy: int | None = None) -> None:
        """Launch the guest again, optionally with another image, host data or policy.

        Clears a disabled VMPCK (a new launch has fresh keys), as a reboot does.
        """
        with self._store.transaction() as state:
            if measurement is not None:
                if len(measurement) != 48:
                    raise ValueError("measurement must be 48 bytes")
                state["measurement"] = measurement.hex()
            if host_data is not None:
                if len(host_data) != 32:
                    raise ValueError("host_data must be 32 bytes")
                state["host_data"] = host_data.hex()
            if policy is not None:
                state["policy"] = int(policy)
            state["vmpck_disabled"] = False

    # --- failure switches ---

    def inject(self, op: str, code: int, times: int = 1) -> None:
        """Make the next ``times`` syscalls at ``op`` fail with ``code`` (``times=-1``: all).

        :param op: one of :data:`SNP_FAULT_OPS`.
        """
        if op not in SNP_FAULT_OPS:
            raise ValueError(f"unknown fault op {op!r}; known: {sorted(SNP_FAULT_OPS)}")
        with self._store.transaction() as state:
            state["faults"].append({"op": op, "errno": int(code), "times": int(times)})

    def inject_guest_error(
        self,
        *,
        fw_error: int = 0,
        vmm_error: int = 0,
        code: int = errno.EIO,
        times: int = 1,
        disable_vmpck: bool | None = None,
    ) -> None:
        """Fail the next ``times`` guest requests at the transport level.

        The ioctl fails with ``code`` and copies back ``exitinfo2 = vmm_error << 32 |
        fw_error``; the configfs path fails the report read with ``code``.

        :param disable_vmpck: whether the kernel then disables the VMPCK (every later
            request: ENOTTY until :meth:`reboot`); default: unless ``vmm_error`` is
            ``SNP_GUEST_VMM_ERR_INVALID_LEN``, the only non-fatal failure.
        """
        if disable_vmpck is None:
            disable_vmpck = vmm_error != SNP_GUEST_VMM_ERR_INVALID_LEN
        with self._store.transaction() as state:
            state["guest_errors"].append({
                "fw_error": int(fw_error), "vmm_error": int(vmm_error), "errno": int(code),
                "times": int(times), "disable_vmpck": bool(disable_vmpck),
            })

    def firmware_status(self, status: int, *, request: str = "any", times: int = 1) -> None:
        """The firmware answers the next ``times`` requests with a non-zero payload status
        (the ioctl succeeds, the response's ``status`` says it failed).

        :param request: ``report``, ``key`` or ``any``.
        """
        if request not in SNP_FIRMWARE_REQUESTS:
            raise ValueError(f"request must be one of {sorted(SNP_FIRMWARE_REQUESTS)}")
        with self._store.transaction() as state:
            state["firmware_status"].append(
                {"status": int(status), "request": request, "times": int(times)}
            )

    def reboot(self) -> None:
        """Re-enable a disabled VMPCK (the kernel only does so on reboot)."""
        with self._store.transaction() as state:
            state["vmpck_disabled"] = False

    def set_provider(self, name: str | None) -> None:
        """Register a TSM provider by name (``sev_guest``, ``tdx_guest``) or none."""
        with self._store.transaction() as state:
            state["provider"] = name

    def set_certs(self, table: bytes | None) -> None:
        """The certificate table the host supplies (auxblob, SNP_GET_EXT_REPORT), or none."""
        with self._store.transaction() as state:
            state["certs"] = None if table is None else table.hex()

    def set_copyback(self, mode: str) -> None:
        """How ``fcntl.ioctl`` treats buffers of up to 1024 bytes after a *failed* ioctl:
        ``success-only`` (CPython main, 2025+: the kernel's exitinfo2 is lost) or
        ``always`` (CPython 3.13 and older)."""
        if mode not in ("success-only", "always"):
            raise ValueError("copyback must be 'success-only' or 'always'")
        with self._store.transaction() as state:
            state["copyback"] = mode

    def empty_outblob(self, times: int = 1) -> None:
        """The next ``times`` configfs reports are empty."""
        with self._store.transaction() as state:
            state["counters"]["empty_outblob"] = state["counters"].get("empty_outblob", 0) + times

    def defer_commit(self, polls: int) -> None:
        """Delay every inblob commit until ``generation`` has been read ``polls`` times."""
        with self._store.transaction() as state:
            state["counters"]["defer_commit"] = int(polls)

    def race(self, stage: str, times: int = 1) -> None:
        """Another writer races on the next ``times`` report entries (``inblob``/``outblob``)."""
        if stage not in ("inblob", "outblob"):
            raise ValueError("race stage must be 'inblob' or 'outblob'")
        with self._store.transaction() as state:
            state["races"][stage] = state["races"].get(stage, 0) + times

    def clear_faults(self) -> None:
        """Remove every injected fault and switch; re-enable the VMPCK and the provider."""
        with self._store.transaction() as state:
            state["faults"] = []
            state["guest_errors"] = []
            state["firmware_status"] = []
            state["counters"] = {}
            state["races"] = {}
            state["vmpck_disabled"] = False
            state["provider"] = SEV_GUEST_PROVIDER

    # --- running an agent on it ---

    def agent_options(self, **extra: str) -> dict[str, str]:
        """``--platform-option`` values that point the ``sev-snp-stub`` plugin at this tree."""
        return {"root": str(self.root), "sysio": "fake", **extra}

    def agent_args(self, **options: str) -> list[str]:
        """``serve`` arguments (besides ``--platform sev-snp-stub``) for an agent on this tree."""
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
    ) -> FakeSnpAgent:
        """An (unstarted) ``dstack-agent serve --platform sev-snp-stub`` on this tree."""
        return FakeSnpAgent(self, workdir=workdir, extra_args=extra_args, options=options)


class FakeSnpAgent(AgentProcess):
    """An :class:`~dstack_core.testing.AgentProcess` serving ``--platform sev-snp-stub`` on
    a fake SNP tree.

    :ivar machine: the fake machine.
    :ivar input_files: ``app-compose.json`` and ``sys-config.json`` in the tree.
    """

    def __init__(
        self,
        machine: FakeSnpMachine,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            "sev-snp-stub",
            workdir=workdir,
            extra_args=[*machine.agent_args(**dict(options or {})), *extra_args],
            env=machine.agent_env(),
        )
        self.machine = machine
        self.input_files = {
            "app-compose.json": machine.paths.app_compose,
            "sys-config.json": machine.paths.sys_config,
        }
