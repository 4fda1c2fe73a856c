"""The fake Intel TDX guest: configfs-tsm with the ``tdx_guest`` provider, the sysfs
measurement registers, the ACPI CCEL, ``/dev/tdx_guest`` and dstack's boot (spec sections
1-3 and 6.3). Re-exported by :mod:`dstack_core.testing.fake_tee`, which says more.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import signal
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final

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
from dstack_core.mockpki import MOCK_XFAM, SEED_SIZE, MockIntelPki, mock_td_report
from dstack_core.osimage import OsImagePolicy
from dstack_core.types import KeyProvider, Measurements, RootKey, TrustBundle

from ._guest import (
    _default_app_compose,
    _GuestAgent,
    _GuestKernelIO,
    _GuestKind,
    _GuestMachine,
    _GuestPaths,
    _oserror,
    _take,
    _take_counter,
)

FAKE_TDX_USER_DATA: Final = b"DSTACK-FAKE-TDX".ljust(20, b"\0")
"""The 20-byte quote header user data of every fake quote (signed, not checked by dcap-qvl)."""

STATE_DIR: Final = ".fake-tdx"

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

REGISTER_SIZE: Final = 48
ZERO_REGISTER: Final = bytes(REGISTER_SIZE)

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
DEFAULT_XFAM: Final = MOCK_XFAM
CCEL_LAML: Final = 0x10000
CCEL_LASA: Final = 0x7F000000
MR_CONFIG_ID_V1: Final = b"\x01"

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
class FakeTdxPaths(_GuestPaths):
    """Where everything lives in a fake tree (the same relative paths as on a TD)."""

    _state_dir = STATE_DIR
    _device = "dev/tdx_guest"

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
    def appkeys(self) -> Path:
        return self.host_shared / ".appkeys.json"

    def register_file(self, index: int) -> Path:
        return self.measurements_dir / f"rtmr{index}:sha384"


_TDX: Final = _GuestKind(
    provider="tdx_guest",
    label="TDX",
    machine="FakeTdxMachine",
    paths=FakeTdxPaths,
    profiles=KERNEL_PROFILES,
    profile_noun="kernel profile",
    fault_ops=FAULT_OPS,
    platform="tdx",
    blob_noun="report",
)


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



_PKI_CACHE: dict[bytes, MockIntelPki] = {}


def _pki(seed_hex: str) -> MockIntelPki:
    seed = bytes.fromhex(seed_hex)
    pki = _PKI_CACHE.get(seed)
    if pki is None:
        pki = _PKI_CACHE[seed] = MockIntelPki.from_seed(seed)
    return pki


class FakeKernelIO(_GuestKernelIO):
    """A :class:`~dstack_core.sysio.SysIO` over a fake TDX tree: real syscalls plus the
    kernel's side effects (see the module docstring and the spec's section 6.3 table).

    Paths outside ``root`` get the plain :class:`~dstack_core.sysio.OsSysIO` behaviour.

    :ivar calls: ``(operation, path relative to root, byte count)`` of every call made
        through this object, so tests can assert e.g. "inblob written once, 64 bytes".
    """

    _kind = _TDX
    _attribute_modes = _ATTRIBUTE_MODES
    _entry_fields: ClassVar[Mapping[str, Any]] = {"outblob": None}

    paths: FakeTdxPaths
    profile: KernelProfile

    def _register(self, path: Path) -> str | None:
        absolute = Path(os.path.realpath(path))
        if absolute.parent == self.paths.measurements_dir.resolve():
            return absolute.name
        return None

    # --- configfs-tsm: tdx_report_new ---

    def _cached_blobs(self, entry: dict[str, Any]) -> Mapping[str, bytes] | None:
        return None if entry["outblob"] is None else {"outblob": bytes.fromhex(entry["outblob"])}

    def _cache_blobs(self, entry: dict[str, Any], blobs: Mapping[str, bytes] | None) -> None:
        entry["outblob"] = None if blobs is None else blobs["outblob"].hex()

    def _report_new(
        self, state: dict[str, Any], entry: dict[str, Any], path: Path, inblob: bytes
    ) -> dict[str, bytes]:
        if _take_counter(state, "counters", "empty_outblob"):
            blob = b""  # a failed GetQuote with out_len 0 reads as EOF
        else:
            blob = self._quote(state, inblob)
            blob = blob.ljust(state["outblob_size"], b"\0")
        return {"outblob": blob}

    @staticmethod
    def _quote(state: dict[str, Any], report_data: bytes) -> bytes:
        rtmrs = [bytes.fromhex(r) for r in state["rtmrs"]]
        report = mock_td_report(
            mr_td=bytes.fromhex(state["mrtd"]),
            rtmrs=rtmrs,
            report_data=report_data,
            mr_config_id=bytes.fromhex(state["mrconfigid"]),
            mr_owner=bytes.fromhex(state["mrowner"]),
            mr_owner_config=bytes.fromhex(state["mrownerconfig"]),
        )
        return _pki(state["pki_seed"]).sign_quote(
            report, user_data=FAKE_TDX_USER_DATA, version=state["quote_version"]
        )

    # --- sysfs measurement registers ---

    def _read_file(self, path: Path) -> bytes:
        if (register := self._register(path)) is not None:
            return self._read_register(Path(path), register)
        return super()._read_file(path)

    def _read_register(self, path: Path, name: str) -> bytes:
        with self._store.transaction() as state:
            self._check_mode(path, read=True)
            if (code := _take(state, "rtmr_read")) is not None:
                raise _oserror(code, path, "injected")
            value = _register_value(state, name)
            if value is not None:
                self._mirror(path, value)
            return self._os_read(path)  # under the lock: a concurrent mirror truncates first

    def _write_file(self, path: Path, data: bytes) -> None:
        if (register := self._register(path)) is not None:
            return self._extend_register(Path(path), register, bytes(data))
        return super()._write_file(path, data)

    def _extend_register(self, path: Path, name: str, data: bytes) -> None:
        with self._store.transaction() as state:
            self._check_mode(path, write=True)
            if not name.startswith("rtmr"):
                return self._os_write(path, data)
            crash = self._extend_or_crash(state, path, int(name[4]), data)
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)

    def _extend_or_crash(self, state: dict[str, Any], path: Path, index: int, data: bytes) -> bool:
        """Extend unless a crash point kills the caller first; whether it is to be killed."""
        if _take_counter(state, "crashes", "before_extend"):
            return True
        self._extend(state, path, index, data)
        return _take_counter(state, "crashes", "after_extend")

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

    # --- /dev/tdx_guest ---

    def _device_ioctl(
        self, state: dict[str, Any], device: Path, request: int, arg: bytearray
    ) -> bool:
        if request == TDX_CMD_GET_REPORT0:
            if len(arg) < REPORT_REQ_SIZE:
                raise _oserror(errno.EFAULT, device, "buffer shorter than tdx_report_req")
            arg[TDREPORT_OFFSET:REPORT_REQ_SIZE] = _tdreport(state, bytes(arg[:64]))
            return False
        if request == self.profile.extend_ioctl and request is not None:
            if len(arg) < EXTEND_REQ.size:
                raise _oserror(errno.EFAULT, device, "buffer shorter than tdx_extend_rtmr_req")
            data, index = EXTEND_REQ.unpack_from(arg, 0)
            if index < 2:
                raise _oserror(errno.EPERM, device, "RTMR0 and RTMR1 belong to BIOS and kernel")
            return self._extend_or_crash(state, device, index, data)
        raise _oserror(errno.ENOTTY, device, f"unknown ioctl {request:#x}")


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


class FakeTdxAgent(_GuestAgent):
    """An :class:`~dstack_core.testing.AgentProcess` serving ``--platform tdx`` on a fake tree.

    :ivar machine: the fake machine.
    :ivar input_files: the agent's inputs by their simulator state-dir names
        (``appkeys.json``, ``app-compose.json``, ``sys-config.json``), so tests written for
        the simulator find them.
    """

    machine: FakeTdxMachine


class FakeTdxMachine(_GuestMachine[FakeKernelIO, FakeTdxAgent]):
    """A fake TDX guest rooted in a directory: build with :meth:`create`, reopen with the
    constructor (in any process), flip failure switches, read the registers.

    For tests only; see the module docstring.
    """

    _kind = _TDX
    _io_type = FakeKernelIO
    _agent_type = FakeTdxAgent

    paths: FakeTdxPaths
    profile: KernelProfile

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
        event_log_version: int = 1,
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
        :param event_log_version: the boot's runtime-event digest version, 1 or 2 (upstream's
            app-compose ``event_log_version``).
        """
        cls._check_kernel(kernel)
        profile = KERNEL_PROFILES[kernel]
        root = cls._new_tree(root)
        paths = FakeTdxPaths(root)
        seed = secrets.token_bytes(SEED_SIZE) if pki_seed is None else pki_seed
        if len(seed) != SEED_SIZE:
            raise ValueError(f"pki_seed must be {SEED_SIZE} bytes")
        if ccel is None:
            ccel = default_boot_log()
        ccel_data = ccel.build(pad_to=CCEL_LAML) if isinstance(ccel, Tcg2LogBuilder) else ccel
        compose_text = _default_app_compose() if app_compose is None else app_compose
        compose_hash = hashlib.sha256(compose_text.encode()).digest()
        state = cls._new_state(
            kernel,
            pki_seed=seed.hex(),
            quote_version=quote_version,
            mrtd=mrtd.hex(),
            mrconfigid=(MR_CONFIG_ID_V1 + compose_hash).ljust(48, b"\0").hex(),
            mrowner=ZERO_REGISTER.hex(),
            mrownerconfig=ZERO_REGISTER.hex(),
            rtmrs=[r.hex() for r in _boot_registers(ccel_data)],
            crashes={},
            outblob_size=0,
        )
        cls._lay_out(root, state, app_compose=compose_text, sys_config=sys_config)

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
        if profile.ccel:
            paths.ccel_data.parent.mkdir(parents=True, exist_ok=True)
            paths.ccel_data.write_bytes(ccel_data)
            paths.ccel_table.write_bytes(build_ccel_table(len(ccel_data), CCEL_LASA))
            os.chmod(paths.ccel_data, 0o400)
            os.chmod(paths.ccel_table, 0o400)

        if isinstance(appkeys, RootKey):
            appkeys_text = appkeys.to_appkeys_json()
        elif appkeys is None:
            appkeys_text = _new_app_keys().to_appkeys_json()
        else:
            appkeys_text = appkeys.decode() if isinstance(appkeys, bytes) else appkeys
        paths.appkeys.write_text(appkeys_text)
        os.chmod(paths.appkeys, 0o600)

        machine = cls(root)
        if dstack_boot:
            machine.boot_dstack(version=event_log_version)
        return machine

    # --- what dstack-util does at boot ---

    def boot_events(self, version: int = 1) -> list[RuntimeEvent]:
        """dstack's boot events for this tree's inputs, in the order dstack-util emits them,
        with digest ``version`` 1 or 2."""
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
        return [
            RuntimeEvent(event=name, payload=payload, version=version) for name, payload in events
        ]

    def boot_dstack(self, version: int = 1) -> None:
        """Extend dstack's boot events into RTMR3 and log them, as dstack-util does."""
        io = self.io()
        log = RuntimeEventLog(self.paths.runtime_log)
        for event in self.boot_events(version):
            log.begin(event)
            if self.profile.measurements:
                io.write(self.paths.register_file(3), event.digest)
            else:
                with self._store.transaction() as state:
                    current = bytes.fromhex(state["rtmrs"][3])
                    state["rtmrs"][3] = hashlib.sha384(current + event.digest).hexdigest()
            log.commit(event)

    # --- hardware ---

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
        """What a verifier must be given to accept this machine's quotes, with the OS image
        policy of what it booted: its sys-config's ``os_image_hash`` for its MRTD and
        RTMR0-2 (None when the sys-config names no image)."""
        pki = self.pki()
        sys_config = json.loads(self.paths.sys_config.read_text())
        vm_config = json.loads(sys_config.get("vm_config") or "{}")
        policy = None
        if vm_config.get("os_image_hash"):
            measured = self.registers()
            image = OsImagePolicy.single(
                bytes.fromhex(vm_config["os_image_hash"]),
                measured.mrtd,
                measured.rtmrs,
                label="fake TDX image",
            )
            policy = json.dumps(image.to_json(), indent=2)
        return TrustBundle(
            root_ca_pem=pki.root_ca_pem,
            collateral_json=pki.collateral_json(),
            os_image_policy_json=policy,
        )

    # --- failure switches ---

    def crash(self, point: str, times: int = 1) -> None:
        """SIGKILL the process making the next ``times`` extends, at ``point``.

        :param point: ``before_extend`` (the register does not move) or ``after_extend``
            (it moves, and the syscall never returns).
        """
        if point not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {sorted(CRASH_POINTS)}")
        self._add("crashes", point, times)

    def set_outblob_size(self, size: int) -> None:
        """Pad every quote with zeros to at least ``size`` bytes (e.g. over 8 KiB)."""
        with self._store.transaction() as state:
            state["outblob_size"] = int(size)

    def set_registers_writable(self, writable: bool) -> None:
        """Make the RTMR sysfs files 0644 (as upstream) or read-only 0444."""
        mode = 0o644 if writable else 0o444
        for index in range(4):
            register_file = self.paths.register_file(index)
            if register_file.exists():
                os.chmod(register_file, mode)

    def clear_faults(self) -> None:
        """Remove every injected fault, race, crash and counter; restore provider and modes."""
        super().clear_faults()
        if self.profile.measurements:
            self.set_registers_writable(True)

    def _clear(self, state: dict[str, Any]) -> None:
        state["crashes"] = {}
        state["outblob_size"] = 0

    # --- running an agent on it ---

    def _agent_inputs(self) -> dict[str, Path]:
        return {"appkeys.json": self.paths.appkeys, **super()._agent_inputs()}
