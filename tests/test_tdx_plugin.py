"""The tdx platform plugin against the fake kernel (in process), its CLI, and real hardware.

Tests marked ``tdx_hardware`` run only inside a real TDX guest (configfs-tsm provider
``tdx_guest``); everything else runs anywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

import attrs
import pytest
from dstack_tdx import TdxOptions, TdxPlatform
from dstack_tdx.configfs import TDX_GUEST
from dstack_tdx.paths import TdxPaths
from dstack_tdx.registers import MeasurementRegisters

from dstack_core.ccel import Tcg2LogBuilder, build_ccel_table, parse_ccel
from dstack_core.errors import (
    ConfigurationError,
    InvalidRequest,
    PlatformBusy,
    PlatformError,
    PlatformUnsupported,
)
from dstack_core.eventlog import EV_NO_ACTION, replay
from dstack_core.quote import TdxQuote
from dstack_core.sysio import OsSysIO
from dstack_core.testing import short_tempdir
from dstack_core.testing.fake_tee import (
    TDX_CMD_EXTEND_RTMR_IOR,
    TDX_CMD_EXTEND_RTMR_IOW,
    TDX_CMD_GET_REPORT0,
    FakeKernelIO,
    FakeTdxMachine,
)
from dstack_core.tsm import ENTRY_PREFIX, TsmReportClient
from dstack_core.types import PlatformConfig, RootKey

from .conftest import run_cli

DATA = Path(__file__).parent / "data"
SAMPLE_CCEL = (DATA / "ccel.bin").read_bytes()
RD = bytes(range(64))


def _config(machine: FakeTdxMachine, tmp_path: Path, **options: str) -> PlatformConfig:
    return machine.platform_config(tmp_path / "state", **{"commit_timeout": "0.2", **options})


def _platform(machine: FakeTdxMachine, tmp_path: Path, io: FakeKernelIO | None = None,
              **options: str) -> TdxPlatform:
    platform = TdxPlatform(io or machine.io())
    platform.configure(_config(machine, tmp_path, **options))
    return platform


@pytest.fixture
def machine(tmp_path: Path) -> FakeTdxMachine:
    return FakeTdxMachine.create(tmp_path / "tree")


@pytest.fixture
def io(machine: FakeTdxMachine) -> FakeKernelIO:
    return machine.io()


@pytest.fixture
def tdx(machine: FakeTdxMachine, io: FakeKernelIO, tmp_path: Path) -> TdxPlatform:
    return _platform(machine, tmp_path, io)


def _quote_calls(io: FakeKernelIO) -> list[tuple[str, str, int]]:
    """The calls of the last quote, with entry names replaced by ``E``."""
    start = max(i for i, (op, _, _) in enumerate(io.calls) if op == "mkdir")
    calls = []
    for op, path, size in io.calls[start:]:
        parts = path.split("/")
        if len(parts) >= 6 and parts[:5] == ["sys", "kernel", "config", "tsm", "report"]:
            path = "/".join(["E", *parts[6:]])
        calls.append((op, path, size))
    return calls


class TestQuoteProtocol:
    def test_syscall_sequence(self, tdx, io):
        """mkdir, provider, generation, one 64-byte inblob write, generation, outblob,
        generation, rmdir: exactly the recommended protocol."""
        tdx.get_quote(RD)
        ops = [(op, path) for op, path, _ in _quote_calls(io)]
        assert ops == [
            ("mkdir", "E"), ("read", "E/provider"), ("read", "E/generation"),
            ("write", "E/inblob"), ("read", "E/generation"), ("read", "E/outblob"),
            ("read", "E/generation"), ("rmdir", "E"),
        ]
        writes = [size for op, path, size in _quote_calls(io) if op == "write"]
        assert writes == [64]

    def test_private_entry_removed(self, tdx, io, machine):
        """Each request uses its own entry, named after the agent, and removes it."""
        tdx.get_quote(RD)
        tdx.get_quote(RD)
        made = [path for op, path, _ in io.calls if op == "mkdir"]
        names = [Path(p).name for p in made]
        assert len(set(names)) == len(names)
        assert all(n.startswith(f"{ENTRY_PREFIX}-{os.getpid()}-") for n in names)
        assert machine.entries() == []

    def test_quote_binds_report_data_and_registers(self, tdx, machine):
        """The quote carries our report data and the live registers."""
        quote = TdxQuote.from_bytes(tdx.get_quote(RD).data)
        assert quote.report_data == RD
        assert quote.report.rtmrs == machine.registers().rtmrs

    @pytest.mark.parametrize("size", [0, 32, 63, 65])
    def test_report_data_must_be_64_bytes(self, tdx, io, size):
        """Anything but 64 bytes is refused before any syscall."""
        before = len(io.calls)
        with pytest.raises(InvalidRequest):
            tdx.get_quote(bytes(size))
        assert len(io.calls) == before

    def test_ignored_commit_error(self, tdx, io, machine):
        """A dropped commit (write() succeeded) is caught by the generation check: busy."""
        machine.inject("commit", errno.EBUSY)
        with pytest.raises(PlatformBusy, match="did not commit"):
            tdx.get_quote(RD)
        assert [s for op, p, s in io.calls if op == "write"] == [64]
        assert machine.entries() == []

    def test_deferred_commit_is_polled(self, tdx, io, machine):
        """A commit that shows late (deferred fput) is waited for."""
        machine.defer_commit(4)
        assert TdxQuote.from_bytes(tdx.get_quote(RD).data).report_data == RD
        generation_reads = [p for op, p, _ in _quote_calls(io) if p == "E/generation"]
        assert len(generation_reads) >= 5

    @pytest.mark.parametrize("stage", ["inblob", "outblob"])
    def test_concurrent_writer_race_retries(self, tdx, io, machine, stage):
        """A writer racing on our entry costs one retry with a fresh entry, not a wrong quote."""
        machine.race(stage)
        start = len(io.calls)
        quote = TdxQuote.from_bytes(tdx.get_quote(RD).data)
        assert quote.report_data == RD
        assert sum(1 for op, _, _ in io.calls[start:] if op == "mkdir") == 2
        assert machine.entries() == []

    def test_persistent_race_is_busy(self, tdx, machine):
        """Racing on every attempt ends in PlatformBusy."""
        machine.race("inblob", 3)
        with pytest.raises(PlatformBusy, match="raced"):
            tdx.get_quote(RD)
        assert machine.entries() == []

    def test_outblob_larger_than_8k(self, tdx, machine):
        """Quotes over 8 KiB are read whole (no single 8192-byte read)."""
        machine.set_outblob_size(12_345)
        quote = tdx.get_quote(RD).data
        assert len(quote) == 12_345 and TdxQuote.from_bytes(quote).report_data == RD

    def test_empty_outblob_is_failure(self, tdx, machine):
        """An empty outblob is a failed GetQuote, not an empty quote."""
        machine.empty_outblob()
        with pytest.raises(PlatformError, match="empty quote"):
            tdx.get_quote(RD)
        assert machine.entries() == []

    @pytest.mark.parametrize(
        ("code", "cls", "fragment"),
        [
            (errno.EBUSY, PlatformBusy, "busy"),
            (errno.EAGAIN, PlatformBusy, "busy"),
            (errno.EIO, PlatformError, "GetQuote"),
            (errno.ETIMEDOUT, PlatformError, "30 s"),
            (errno.EINTR, PlatformError, "interrupted"),
            (errno.EINVAL, PlatformError, "64 bytes"),
            (errno.EFBIG, PlatformError, "newer kernel"),
            (errno.ENOMEM, PlatformError, "memory"),
            (errno.ENXIO, PlatformError, "no TEE quote provider"),
            (errno.EACCES, PlatformError, "root"),
        ],
    )
    def test_outblob_errno_mapping(self, tdx, machine, code, cls, fragment):
        """Each kernel errno from report generation maps to our class, naming errno and path."""
        machine.inject("outblob", code)
        with pytest.raises(cls) as exc:
            tdx.get_quote(RD)
        assert type(exc.value) is cls
        message = exc.value.message
        assert message.startswith("TDX quote failed: ") and fragment in message
        assert f"({errno.errorcode[code]} reading " in message and message.endswith("/outblob)")
        assert machine.entries() == []

    @pytest.mark.parametrize(
        ("op", "code"),
        [("mkdir", errno.EACCES), ("provider", errno.EIO), ("generation", errno.EIO),
         ("inblob", errno.ENOMEM), ("outblob", errno.EIO), ("rmdir", errno.EBUSY)],
    )
    def test_entry_removed_on_every_path(self, tdx, io, machine, op, code):
        """Whatever syscall fails, every entry created is removed (or an rmdir is attempted)."""
        machine.inject(op, code)
        start = len(io.calls)
        try:
            tdx.get_quote(RD)
        except PlatformError:
            pass
        made = sum(1 for o, _, _ in io.calls[start:] if o == "mkdir")
        removed = sum(1 for o, _, _ in io.calls[start:] if o == "rmdir")
        if op == "mkdir":
            assert (made, removed) == (1, 0)  # nothing was created, so nothing to remove
        else:
            assert made == removed == 1
        if op == "rmdir":  # a failed rmdir is logged, the quote still returned
            machine.clear_faults()
            for name in machine.entries():
                io.rmdir(machine.paths.report_dir / name)
        assert machine.entries() == []

    def test_provider_gone(self, tdx, machine):
        """mkdir ENXIO (driver unloaded) says the provider is missing."""
        machine.set_provider(None)
        with pytest.raises(PlatformError, match="no TEE quote provider.*ENXIO creating"):
            tdx.get_quote(RD)

    def test_wrong_provider(self, tdx, machine):
        """A provider other than tdx_guest is refused."""
        machine.set_provider("sev_guest")
        with pytest.raises(PlatformError, match="'sev_guest', not 'tdx_guest'"):
            tdx.get_quote(RD)
        assert machine.entries() == []

    def test_quote_requests_serialised(self, machine, tmp_path):
        """Concurrent get_quote calls never have two report entries at once."""

        class Tracking(FakeKernelIO):
            active = 0
            most = 0
            lock = threading.Lock()

            def mkdir(self, path):
                super().mkdir(path)
                if path.parent == self.paths.report_dir:
                    with self.lock:
                        type(self).active += 1
                        type(self).most = max(type(self).most, type(self).active)

            def rmdir(self, path):
                if path.parent == self.paths.report_dir:
                    with self.lock:
                        type(self).active -= 1
                super().rmdir(path)

            def read(self, path):
                time.sleep(0.002)
                return super().read(path)

        io = Tracking(machine.root)
        tdx = _platform(machine, tmp_path, io, quote_queue="5")  # all six wait their turn
        Tracking.most = 0
        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(tdx.get_quote(bytes([i]) * 64).data))
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Tracking.most == 1
        assert sorted(TdxQuote.from_bytes(q).report_data[0] for q in results) == list(range(6))

    def test_attest_carries_quote_and_boot_log(self, tdx):
        """attest = a quote over the report data plus the CCEL boot events."""
        evidence = tdx.attest(RD)
        assert TdxQuote.from_bytes(evidence.quote.data).report_data == RD
        assert evidence.boot_events == tdx.boot_event_log()


class TestRtmr:
    def test_extend_rtmr3(self, tdx, machine):
        """extend_rtmr(3, d) does RTMR3 = SHA384(RTMR3 || d) in the TDX module."""
        before = machine.registers().rtmrs[3]
        tdx.extend_rtmr(index=3, digest=b"\x42" * 48)
        assert machine.registers().rtmrs[3] == hashlib.sha384(before + b"\x42" * 48).digest()
        assert tdx.read_measurements() == machine.registers()

    @pytest.mark.parametrize("index", [0, 1, 2, 4, -1])
    def test_only_rtmr3(self, tdx, io, machine, index):
        """Any other index is refused without touching the kernel (upstream would allow it)."""
        before = machine.registers()
        calls = len(io.calls)
        with pytest.raises(InvalidRequest, match="only RTMR3"):
            tdx.extend_rtmr(index=index, digest=bytes(48))
        assert machine.registers() == before and len(io.calls) == calls

    @pytest.mark.parametrize("size", [0, 32, 47, 64])
    def test_digest_must_be_48_bytes(self, tdx, machine, size):
        """Digests are SHA-384: anything else is refused."""
        with pytest.raises(InvalidRequest):
            tdx.extend_rtmr(index=3, digest=bytes(size))

    @pytest.mark.parametrize(
        ("code", "cls", "fragment"),
        [
            (errno.ENXIO, PlatformError, "rejected the extend"),
            (errno.EBUSY, PlatformBusy, "busy"),
            (errno.EIO, PlatformError, "failed the extend"),
            (errno.EINVAL, PlatformError, "48 bytes at offset 0"),
        ],
    )
    def test_extend_errno_mapping(self, tdx, machine, code, cls, fragment):
        """Each errno of the register write maps to our class; the register does not move."""
        before = machine.registers()
        machine.inject("extend", code)
        with pytest.raises(cls) as exc:
            tdx.extend_rtmr(index=3, digest=bytes(48))
        assert type(exc.value) is cls
        assert exc.value.message.startswith("RTMR3 extend failed: ") and fragment in exc.value.message
        assert f"({errno.errorcode[code]} writing " in exc.value.message
        assert machine.registers() == before

    def test_read_only_registers(self, tdx, machine):
        """A read-only rtmr3 file (EACCES) says so."""
        machine.set_registers_writable(False)
        with pytest.raises(PlatformError, match="read-only"):
            tdx.extend_rtmr(index=3, digest=bytes(48))

    def test_write_without_effect_is_an_error(self, machine, tmp_path):
        """A kernel that accepts the write but does not extend is caught by the read-back."""

        class Swallowing(FakeKernelIO):
            def write(self, path, data):
                if path.name != "rtmr3:sha384":
                    super().write(path, data)

        tdx = _platform(machine, tmp_path, Swallowing(machine.root))
        with pytest.raises(PlatformError, match="did not change"):
            tdx.extend_rtmr(index=3, digest=bytes(48))

    def test_failed_read_back_does_not_undo_the_extend(self, machine, tmp_path):
        """Once the write succeeded the extend happened: a failed read-back is only logged."""

        class FailingReadBack(FakeKernelIO):
            written = False

            def write(self, path, data):
                super().write(path, data)
                self.written = True

            def read(self, path):
                if self.written:
                    raise OSError(errno.EIO, "injected read-back failure", str(path))
                return super().read(path)

        before = machine.registers().rtmrs[3]
        tdx = _platform(machine, tmp_path, FailingReadBack(machine.root))
        tdx.extend_rtmr(index=3, digest=b"\x01" * 48)
        assert machine.registers().rtmrs[3] == hashlib.sha384(before + b"\x01" * 48).digest()

    def test_sysfs_preferred_over_ioctl(self, machine, io, tmp_path):
        """With sysfs present, legacy_ioctl=1 changes nothing: no ioctl is issued."""
        tdx = _platform(machine, tmp_path, io, legacy_ioctl="1")
        tdx.extend_rtmr(index=3, digest=bytes(48))
        tdx.read_measurements()
        assert not [c for c in io.calls if c[0] == "ioctl"]

    def test_legacy_ioctl_fallback(self, tmp_path):
        """On an Intel out-of-tree kernel, legacy_ioctl=1 extends via TDX_CMD_EXTEND_RTMR
        (_IOW first, then _IOR, remembered) and reads the registers via GET_REPORT0."""
        machine = FakeTdxMachine.create(tmp_path / "tree", kernel="intel-oot")
        io = machine.io()
        tdx = _platform(machine, tmp_path, io, legacy_ioctl="1")
        before = machine.registers().rtmrs[3]
        tdx.extend_rtmr(index=3, digest=b"\x01" * 48)
        tdx.extend_rtmr(index=3, digest=b"\x02" * 48)
        expected = hashlib.sha384(hashlib.sha384(before + b"\x01" * 48).digest() + b"\x02" * 48)
        assert machine.registers().rtmrs[3] == expected.digest()
        assert tdx.read_measurements() == machine.registers()
        requests = [c for c in io.calls if c[0] == "ioctl" and c[2] == 49]
        assert len(requests) == 3  # _IOW (ENOTTY), _IOR, then _IOR only
        assert TDX_CMD_EXTEND_RTMR_IOW != TDX_CMD_EXTEND_RTMR_IOR != TDX_CMD_GET_REPORT0

    def test_legacy_ioctl_needs_opt_in(self, tmp_path):
        """Without sysfs registers and without legacy_ioctl=1, configure names both."""
        machine = FakeTdxMachine.create(tmp_path / "tree", kernel="intel-oot")
        with pytest.raises(ConfigurationError, match="rtmr3:sha384.*legacy_ioctl=1"):
            _platform(machine, tmp_path)

    def test_legacy_ioctl_on_mainline_is_unsupported(self, tmp_path):
        """legacy_ioctl=1 on a mainline 6.7 kernel: extend fails as unsupported (ENOTTY)."""
        machine = FakeTdxMachine.create(tmp_path / "tree", kernel="6.7")
        tdx = _platform(machine, tmp_path, legacy_ioctl="1")
        assert tdx.read_measurements() == machine.registers()
        with pytest.raises(PlatformUnsupported, match="no RTMR extend ioctl.*ENOTTY"):
            tdx.extend_rtmr(index=3, digest=bytes(48))


def _independent_replay(ccel: bytes) -> list[bytes]:
    """RTMR0-2 from a CCEL, walked here from the TCG spec, sharing no code with the parser."""
    registers = [bytes(48)] * 3
    (spec_size,) = struct.unpack_from("<I", ccel, 28)
    offset = 32 + spec_size
    while struct.unpack_from("<I", ccel, offset)[0] != 0xFFFFFFFF:
        mr, event_type, count = struct.unpack_from("<III", ccel, offset)
        offset += 12
        digest = None
        for _ in range(count):
            (alg,) = struct.unpack_from("<H", ccel, offset)
            size = {0x4: 20, 0xB: 32, 0xC: 48, 0xD: 64}[alg]
            if alg == 0xC:
                digest = ccel[offset + 2 : offset + 2 + size]
            offset += 2 + size
        (event_size,) = struct.unpack_from("<I", ccel, offset)
        offset += 4 + event_size
        if mr and event_type != EV_NO_ACTION:
            registers[mr - 1] = hashlib.sha384(registers[mr - 1] + digest).digest()
    return registers


class TestBootLog:
    def test_boot_log_is_the_ccel_in_order(self, tdx, machine):
        """boot_event_log is the parsed CCEL, in log order, and replays to RTMR0-2."""
        events = tdx.boot_event_log()
        assert events == parse_ccel(machine.paths.ccel_data.read_bytes())
        assert [e.imr for e in events] != sorted(e.imr for e in events)  # interleaved, kept
        assert [replay(events, i) for i in range(3)] == list(machine.registers().rtmrs[:3])

    def test_real_ccel(self, tmp_path):
        """dstack's real CCEL parses (18 events) and replays to independently computed RTMR0-2,
        which a quote from a TD booted with it carries."""
        machine = FakeTdxMachine.create(tmp_path / "tree", ccel=SAMPLE_CCEL)
        tdx = _platform(machine, tmp_path)
        events = tdx.boot_event_log()
        assert len(events) == 18
        assert [e.event for e in events if e.event] == ["acpi-loader", "acpi-rsdp", "acpi-tables"]
        expected = _independent_replay(SAMPLE_CCEL)
        assert [replay(events, i) for i in range(3)] == expected
        assert expected[0].hex().startswith("274c2344116db7c6") and expected[2] == bytes(48)
        quote = TdxQuote.from_bytes(tdx.get_quote(RD).data)
        assert list(quote.report.rtmrs[:3]) == expected

    def test_malformed_ccel_fails_configure(self, machine, tmp_path):
        """A CCEL that does not parse stops configure, naming the file and the offset."""
        data = bytearray(machine.paths.ccel_data.read_bytes())
        (spec_size,) = struct.unpack_from("<I", data, 28)
        first_record = 32 + spec_size
        struct.pack_into("<H", data, first_record + 12, 0x0099)  # an unknown digest algorithm
        os.chmod(machine.paths.ccel_data, 0o600)
        machine.paths.ccel_data.write_bytes(bytes(data))
        with pytest.raises(ConfigurationError, match="malformed.*offset"):
            _platform(machine, tmp_path)

    def test_ccel_table_of_another_tee(self, machine, tmp_path):
        """An ACPI CCEL table with CC type 1 (SEV) is refused."""
        os.chmod(machine.paths.ccel_table, 0o600)
        machine.paths.ccel_table.write_bytes(build_ccel_table(0x10000, 0, cc_type=1))
        with pytest.raises(ConfigurationError, match="CC type 1, not TDX"):
            _platform(machine, tmp_path)

    def test_mismatching_boot_log_is_logged(self, tmp_path, caplog):
        """A CCEL that does not replay to RTMR0-2 starts, with an error naming the register."""
        machine = FakeTdxMachine.create(tmp_path / "tree")
        log = Tcg2LogBuilder().add(1, 0x80000007, b"something else").build(pad_to=0x10000)
        os.chmod(machine.paths.ccel_data, 0o600)
        machine.paths.ccel_data.write_bytes(log)
        _platform(machine, tmp_path)
        assert "does not replay to RTMR0" in caplog.text


class TestConfigure:
    def test_empty_root_names_everything_missing(self, tmp_path):
        """On a machine without TDX, configure names each missing interface, in one message."""
        root = tmp_path / "empty"
        root.mkdir()
        config = PlatformConfig(
            state_dir=tmp_path / "s", runtime_log=tmp_path / "log", app_compose=tmp_path / "c",
            sys_config=tmp_path / "y", options={"root": str(root)},
        )
        with pytest.raises(ConfigurationError) as exc:
            TdxPlatform(OsSysIO()).configure(config)
        message = exc.value.message
        assert message.startswith("platform tdx cannot start")
        for missing in ("sys/kernel/config/tsm/report",
                        "sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384",
                        "sys/firmware/acpi/tables/data/CCEL", "dstack/.host-shared/.appkeys.json"):
            assert str(root / missing) in message

    @pytest.mark.parametrize(
        ("remove", "named"),
        [
            ("sys/kernel/config/tsm/report", "Linux 6.7+"),
            ("sys/devices/virtual/misc/tdx_guest/measurements", "Linux 6.16+"),
            ("sys/firmware/acpi/tables/data/CCEL", "Linux 6.4+"),
            ("dstack/.host-shared/.appkeys.json", "app keys"),
        ],
    )
    def test_each_missing_piece_is_named(self, machine, tmp_path, remove, named):
        """Remove one interface: configure fails naming exactly that one."""
        target = machine.root / remove
        if target.is_dir():
            for child in target.iterdir():
                child.unlink()
            target.rmdir()
        else:
            target.unlink()
        with pytest.raises(ConfigurationError) as exc:
            _platform(machine, tmp_path)
        assert str(target) in exc.value.message and named in exc.value.message
        others = {"sys/kernel/config/tsm/report", "tdx_guest/measurements",
                  "acpi/tables/data/CCEL", ".appkeys.json"}
        assert [o for o in others if o in exc.value.message] == [o for o in others if o in remove]

    def test_no_provider(self, machine, tmp_path):
        """No registered provider (ENXIO on mkdir) is a start-up error saying so."""
        machine.set_provider(None)
        with pytest.raises(ConfigurationError, match="no TEE quote provider.*ENXIO"):
            _platform(machine, tmp_path)

    def test_provider_of_another_tee(self, machine, tmp_path):
        """provider sev_guest: not a TDX guest."""
        machine.set_provider("sev_guest")
        with pytest.raises(ConfigurationError, match="'sev_guest', not 'tdx_guest'"):
            _platform(machine, tmp_path)
        assert machine.entries() == []

    def test_fake_sysio_refused_without_env(self, machine, tmp_path, monkeypatch):
        """sysio=fake is refused unless DSTACK_ALLOW_FAKE_KERNEL=1: config alone cannot select it."""
        monkeypatch.delenv("DSTACK_ALLOW_FAKE_KERNEL", raising=False)
        with pytest.raises(ConfigurationError, match="tests only"):
            TdxPlatform().configure(_config(machine, tmp_path, sysio="fake"))
        monkeypatch.setenv("DSTACK_ALLOW_FAKE_KERNEL", "true")
        with pytest.raises(ConfigurationError, match="tests only"):
            TdxPlatform().configure(_config(machine, tmp_path, sysio="fake"))
        monkeypatch.setenv("DSTACK_ALLOW_FAKE_KERNEL", "1")
        tdx = TdxPlatform()
        tdx.configure(_config(machine, tmp_path, sysio="fake"))
        assert tdx.read_measurements() == machine.registers()

    @pytest.mark.parametrize(
        ("options", "fragment"),
        [
            ({"colour": "blue"}, "unknown tdx options"),
            ({"legacy_ioctl": "maybe"}, "legacy_ioctl must be 0 or 1"),
            ({"commit_timeout": "-1"}, "commit_timeout"),
            ({"commit_timeout": "soon"}, "commit_timeout"),
            ({"quote_queue": "-1"}, "quote_queue"),
            ({"quote_queue": "many"}, "quote_queue"),
            ({"quote_queue": "100000"}, "quote_queue"),
            ({"sysio": "fuse"}, "sysio must be"),
            ({"root": ""}, "root must not be empty"),
        ],
    )
    def test_bad_options(self, options, fragment):
        """Unknown options and bad values are start-up errors."""
        with pytest.raises(ConfigurationError, match=fragment):
            TdxOptions.parse(options)

    def test_root_key_from_appkeys(self, tdx, machine):
        """The root key is the app keys' k256 key, never a built-in default."""
        expected = RootKey.from_appkeys_json(machine.paths.appkeys.read_bytes())
        assert tdx.derive_root_key() == expected

    def test_appkeys_option_and_override(self, machine, tmp_path):
        """option appkeys is below root; the core's --appkeys wins and is taken as is."""
        other = RootKey.from_appkeys_json((DATA / "upstream_simulator_appkeys.json").read_bytes())
        (machine.root / "keys.json").write_text(other.to_appkeys_json())
        tdx = _platform(machine, tmp_path, appkeys="/keys.json")
        assert tdx.derive_root_key().k256_key == other.k256_key
        tdx = TdxPlatform(machine.io())
        config = _config(machine, tmp_path)
        tdx.configure(attrs.evolve(config, appkeys=DATA / "upstream_simulator_appkeys.json"))
        assert tdx.derive_root_key().k256_key == other.k256_key

    def test_invalid_appkeys(self, machine, tmp_path):
        """Malformed app keys stop start-up."""
        machine.paths.appkeys.write_text("{}")
        with pytest.raises(ConfigurationError, match="appkeys"):
            _platform(machine, tmp_path)

    def test_runtime_log_missing_while_rtmr3_extended(self, machine, tmp_path):
        """RTMR3 moved at boot but no runtime log given: the error names the production path."""
        config = _config(machine, tmp_path)
        config = attrs.evolve(config, runtime_log=tmp_path / "nope.log")
        with pytest.raises(ConfigurationError, match="/run/log/dstack/runtime_events.log"):
            TdxPlatform(machine.io()).configure(config)

    def test_info(self):
        """platform_info: real hardware, tag tdx, TDX evidence, runtime registers."""
        info = TdxPlatform().platform_info()
        assert (info.name, info.tag, info.evidence_format) == ("tdx", "tdx", "tdx")
        assert not info.simulated and info.runtime_registers


class TestStartupCli:
    def _serve(self, root: Path) -> tuple[object, Path]:
        work = short_tempdir("tdxcli")
        sock = work / "d.sock"
        result = run_cli("serve", "--platform", "tdx", "--socket", str(sock),
                         "--state-dir", str(work / "state"), "--platform-option", f"root={root}",
                         check=False)
        return result, sock

    def test_serve_without_tdx_stops_at_once(self, tmp_path):
        """serve --platform tdx on a machine without TDX: one clear line, exit 2, no socket."""
        result, sock = self._serve(tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert lines[0].startswith("dstack-agent: error: platform tdx cannot start")
        assert "sys/kernel/config/tsm/report" in lines[0]
        assert not sock.exists()

    @pytest.mark.skipif(Path("/sys/kernel/config/tsm/report").exists(), reason="has configfs-tsm")
    def test_serve_on_this_machine(self):
        """The default root (/) on this non-TDX machine gives the same one-line refusal."""
        result, sock = self._serve(Path("/"))
        assert result.returncode == 2 and "/sys/kernel/config/tsm/report" in result.stderr
        assert not sock.exists()

    def test_fake_refused_from_cli_without_env(self, machine):
        """sysio=fake from the command line alone is refused (exit 2, one line)."""
        env_backup = os.environ.pop("DSTACK_ALLOW_FAKE_KERNEL", None)
        try:
            result = run_cli("serve", "--platform", "tdx", "--socket", "/tmp/never-bound.sock",
                             *machine.agent_args(), check=False)
        finally:
            if env_backup is not None:
                os.environ["DSTACK_ALLOW_FAKE_KERNEL"] = env_backup
        assert result.returncode == 2 and "tests only" in result.stderr
        assert not Path("/tmp/never-bound.sock").exists()


class TestEventlogCli:
    def test_show_sample(self):
        """eventlog show --ccel prints 18 JSON events then RTMR0-2, replayed correctly."""
        result = run_cli("eventlog", "show", "--ccel", str(DATA / "ccel.bin"))
        lines = result.stdout.splitlines()
        events = [json.loads(line) for line in lines[:-3]]
        assert len(events) == 18 and events[0]["imr"] == 0
        assert set(events[0]) == {"imr", "event_type", "digest", "event", "event_payload"}
        expected = _independent_replay(SAMPLE_CCEL)
        assert lines[-3:] == [f"rtmr{i}: {expected[i].hex()}" for i in range(3)]

    def test_show_json(self):
        """--json prints one document with the events and the replayed registers."""
        doc = json.loads(run_cli("eventlog", "show", "--json", "--ccel", str(DATA / "ccel.bin")).stdout)
        assert len(doc["events"]) == 18
        expected = _independent_replay(SAMPLE_CCEL)
        assert doc["rtmrs"] == {f"rtmr{i}": expected[i].hex() for i in range(3)}

    def test_show_machine_ccel(self, machine):
        """Without --ccel it reads ROOT/sys/firmware/acpi/tables/data/CCEL."""
        doc = json.loads(run_cli("eventlog", "show", "--json", "--root", str(machine.root)).stdout)
        rtmrs = machine.registers().rtmrs
        assert doc["rtmrs"] == {f"rtmr{i}": rtmrs[i].hex() for i in range(3)}
        assert doc["events"] == [e.to_json() for e in parse_ccel(machine.paths.ccel_data.read_bytes())]

    @pytest.mark.parametrize("what", ["missing", "garbage"])
    def test_errors_are_one_line(self, tmp_path, what):
        """A missing or malformed CCEL is one error line and exit 2."""
        path = tmp_path / "ccel"
        if what == "garbage":
            path.write_bytes(b"\x01" * 100)
        result = run_cli("eventlog", "show", "--ccel", str(path), check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert str(path) in result.stderr and "Traceback" not in result.stderr


def _real_tdx() -> bool:
    report = Path("/sys/kernel/config/tsm/report")
    if not report.is_dir() or os.geteuid() != 0:
        return False
    entry = report / f"dstack-probe-{os.getpid()}"
    try:
        os.mkdir(entry)
    except OSError:
        return False
    try:
        return (entry / "provider").read_bytes().strip() == b"tdx_guest"
    except OSError:
        return False
    finally:
        os.rmdir(entry)


real_tdx = pytest.mark.skipif(not _real_tdx(), reason="needs a real Intel TDX guest")


@pytest.mark.tdx_hardware
@real_tdx
class TestRealHardware:
    """Read-only checks on a real TD (RTMR3 is never extended: that would break its log)."""

    @pytest.fixture
    def hardware(self) -> tuple[TsmReportClient, MeasurementRegisters]:
        paths = TdxPaths(Path("/"))
        io = OsSysIO()
        measurements = paths.measurements_dir if io.exists(paths.measurements_dir) else None
        return (TsmReportClient(io, paths.report_dir, TDX_GUEST),
                MeasurementRegisters(io, measurements_dir=measurements, device=paths.device))

    def test_quote_binds_report_data(self, hardware):
        """A real quote carries our report data and the live registers."""
        quotes, registers = hardware
        quote = TdxQuote.from_bytes(quotes.report(RD))
        assert quote.report_data == RD
        assert quote.report.rtmrs == registers.read().rtmrs

    def test_ccel_replays_to_rtmr0_2(self, hardware):
        """The machine's CCEL replays to its RTMR0-2."""
        _, registers = hardware
        ccel = Path("/sys/firmware/acpi/tables/data/CCEL").read_bytes()
        assert _independent_replay(ccel) == list(registers.read().rtmrs[:3])


class TestQuoteQueue:
    """Quotes go to configfs-tsm one at a time; a full queue is refused at once."""

    def test_full_queue_is_busy_at_once(self, machine, io, tmp_path):
        """With quote_queue=1 and a slow quote service, of 6 concurrent requests one is
        served, one waits, and the rest get PlatformBusy without waiting; nothing races."""
        tdx = _platform(machine, tmp_path, io, quote_queue="1", commit_timeout="5")
        machine.defer_commit(20)  # each quote polls generation ~20 times: about 0.2 s
        results: list[tuple[str, float]] = []
        start = time.monotonic()

        def ask(n: int) -> None:
            try:
                tdx.get_quote(bytes([n]) * 64)
                results.append(("ok", time.monotonic() - start))
            except PlatformBusy as exc:
                assert "busy" in str(exc)
                results.append(("busy", time.monotonic() - start))

        threads = [threading.Thread(target=ask, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served = sorted(t for kind, t in results if kind == "ok")
        refused = [t for kind, t in results if kind == "busy"]
        assert len(served) == 2 and len(refused) == 4
        assert max(refused) < served[0]  # refused before the first quote was done
        assert machine.entries() == []

    def test_queue_drains_and_serves_again(self, machine, io, tmp_path):
        """After a burst the queue is empty again: the next request is served."""
        tdx = _platform(machine, tmp_path, io, quote_queue="0")
        machine.defer_commit(5)
        threads = [threading.Thread(target=self._try, args=(tdx,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        machine.defer_commit(0)
        assert TdxQuote.from_bytes(tdx.get_quote(bytes(64)).data).report_data == bytes(64)

    @staticmethod
    def _try(tdx: TdxPlatform) -> None:
        try:
            tdx.get_quote(bytes(64))
        except PlatformBusy:
            pass

