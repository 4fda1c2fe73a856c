"""The fake TDX kernel behaves like the kernel (spec linux-tee-interfaces.md, 1.3, 2.4, 3, 6.3).

Also pins :class:`~dstack_core.sysio.OsSysIO`, the real syscalls, against a plain directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dstack_core.ccel import CC_TYPE_TDX, parse_ccel, parse_ccel_table
from dstack_core.eventlog import RuntimeEventLog, replay
from dstack_core.quote import TdxQuote
from dstack_core.sysio import OsSysIO, SysIO
from dstack_core.testing.fake_tee import (
    FAKE_TDX_USER_DATA,
    TDX_CMD_EXTEND_RTMR_IOR,
    TDX_CMD_EXTEND_RTMR_IOW,
    TDX_CMD_GET_REPORT0,
    FakeKernelIO,
    FakeTdxMachine,
)

DATA = Path(__file__).parent / "data"
NOW = int(time.time())


@pytest.fixture
def machine(tmp_path: Path) -> FakeTdxMachine:
    return FakeTdxMachine.create(tmp_path / "tree")


@pytest.fixture
def io(machine: FakeTdxMachine) -> FakeKernelIO:
    return machine.io()


@pytest.fixture
def entry(machine: FakeTdxMachine, io: FakeKernelIO) -> Path:
    path = machine.paths.report_dir / "test-entry"
    io.mkdir(path)
    return path


class TestOsSysIO:
    def test_is_a_sysio(self, machine):
        """Both implementations satisfy the SysIO protocol."""
        assert isinstance(OsSysIO(), SysIO) and isinstance(machine.io(), SysIO)

    def test_read_to_eof_without_cap(self, tmp_path):
        """read() returns files larger than one chunk whole, and empty files as b''."""
        big = os.urandom(200_000)
        (tmp_path / "big").write_bytes(big)
        (tmp_path / "empty").write_bytes(b"")
        assert OsSysIO().read(tmp_path / "big") == big
        assert OsSysIO().read(tmp_path / "empty") == b""

    def test_write_never_creates(self, tmp_path):
        """write() opens without O_CREAT: a missing attribute is ENOENT, not a new file."""
        with pytest.raises(FileNotFoundError):
            OsSysIO().write(tmp_path / "missing", b"x")
        assert not (tmp_path / "missing").exists()

    def test_write_replaces_from_offset_zero(self, tmp_path):
        """write() writes at offset 0 of a fresh descriptor (no append, no truncate)."""
        (tmp_path / "f").write_bytes(b"abcdef")
        OsSysIO().write(tmp_path / "f", b"XY")
        assert (tmp_path / "f").read_bytes() == b"XYcdef"

    def test_errors_propagate_with_errno(self, tmp_path):
        """mkdir/rmdir/read errors surface as OSError with the kernel's errno."""
        io = OsSysIO()
        io.mkdir(tmp_path / "d")
        with pytest.raises(OSError) as exc:
            io.mkdir(tmp_path / "d")
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(OSError) as exc:
            io.read(tmp_path / "d")
        assert exc.value.errno == errno.EISDIR
        io.rmdir(tmp_path / "d")
        assert not io.exists(tmp_path / "d")

    def test_ioctl_on_a_regular_file_is_enotty(self, tmp_path):
        """ioctl() goes to the kernel: a regular file answers ENOTTY."""
        (tmp_path / "dev").write_bytes(b"")
        with pytest.raises(OSError) as exc:
            OsSysIO().ioctl(tmp_path / "dev", TDX_CMD_GET_REPORT0, bytearray(1088))
        assert exc.value.errno == errno.ENOTTY


class TestTree:
    def test_layout(self, machine):
        """The tree has the mainline paths, with the kernel's modes."""
        p = machine.paths
        assert p.report_dir.is_dir() and list(p.report_dir.iterdir()) == []
        assert stat.S_IMODE(p.ccel_data.stat().st_mode) == 0o400
        assert stat.S_IMODE(p.register_file(3).stat().st_mode) == 0o644
        assert stat.S_IMODE((p.measurements_dir / "mrtd:sha384").stat().st_mode) == 0o444
        assert (p.class_link / "measurements" / "rtmr3:sha384").exists()
        assert p.device.exists()

    def test_ccel_table_and_data_agree(self, machine):
        """The CCEL table has a valid checksum, CC type 2 and LAML = the log area's size."""
        table = parse_ccel_table(machine.paths.ccel_table.read_bytes())
        data = machine.paths.ccel_data.read_bytes()
        assert table.cc_type == CC_TYPE_TDX and table.laml == len(data) == 0x10000

    def test_boot_registers_replay_from_ccel(self, machine):
        """RTMR0..2 are the replay of the CCEL (as hardware and firmware agree)."""
        events = parse_ccel(machine.paths.ccel_data.read_bytes())
        rtmrs = machine.registers().rtmrs
        assert [replay(events, i) for i in range(3)] == list(rtmrs[:3])
        assert all(rtmrs[:3]) and rtmrs[0] != rtmrs[1]

    def test_dstack_boot_events_in_rtmr3_and_log(self, machine):
        """dstack's boot events are in the runtime log, which replays to RTMR3."""
        log = RuntimeEventLog(machine.paths.runtime_log)
        names = [e.event for e in log.read()]
        assert names[0] == "system-preparing" and names[-1] == "system-ready"
        assert {"app-id", "compose-hash", "instance-id", "key-provider"} <= set(names)
        assert log.replay() == machine.registers().rtmrs[3]

    def test_mrconfigid_is_compose_hash(self, machine, io):
        """mrconfigid = 0x01 || sha256(app-compose), zero-padded, as dstack sets it."""
        compose_hash = hashlib.sha256(machine.paths.app_compose.read_bytes()).digest()
        value = io.read(machine.paths.measurements_dir / "mrconfigid")
        assert value == (b"\x01" + compose_hash).ljust(48, b"\0")

    def test_real_ccel_sample(self, tmp_path):
        """A tree built on dstack's real CCEL sample starts with its RTMR0-2."""
        sample = (DATA / "ccel.bin").read_bytes()
        machine = FakeTdxMachine.create(tmp_path / "tree", ccel=sample)
        assert machine.registers().rtmrs[0].hex().startswith("274c2344116db7c6")
        assert machine.registers().rtmrs[2] == bytes(48)

    @pytest.mark.parametrize("kernel", ["6.2", "6.7", "intel-oot"])
    def test_profiles(self, tmp_path, kernel):
        """Older kernels lack configfs-tsm (6.2) or the sysfs registers (< 6.16)."""
        machine = FakeTdxMachine.create(tmp_path / "tree", kernel=kernel)
        assert machine.paths.report_dir.exists() == (kernel != "6.2")
        assert not machine.paths.measurements_dir.exists()
        assert RuntimeEventLog(machine.paths.runtime_log).replay() == machine.registers().rtmrs[3]


class TestConfigfsReport:
    def test_mkdir_creates_exactly_the_tdx_attributes(self, machine, entry):
        """mkdir creates generation, provider, inblob, outblob with the kernel's modes."""
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()}
        assert modes == {"generation": 0o444, "provider": 0o444, "inblob": 0o200, "outblob": 0o444}

    def test_mkdir_without_provider_is_enxio(self, machine, io):
        """With no TSM provider registered, mkdir fails with ENXIO and creates nothing."""
        machine.set_provider(None)
        with pytest.raises(OSError) as exc:
            io.mkdir(machine.paths.report_dir / "e")
        assert exc.value.errno == errno.ENXIO
        assert machine.entries() == []

    def test_provider_and_initial_generation(self, io, entry):
        """provider reads 'tdx_guest\\n', generation '0\\n'."""
        assert io.read(entry / "provider") == b"tdx_guest\n"
        assert io.read(entry / "generation") == b"0\n"

    def test_generation_moves_on_each_close(self, io, entry):
        """Each open/write/close of inblob is one commit; reads never move the generation."""
        io.write(entry / "inblob", bytes(64))
        io.write(entry / "inblob", bytes(64))
        assert int(io.read(entry / "generation")) == 2
        io.read(entry / "outblob")
        io.read(entry / "outblob")
        assert int(io.read(entry / "generation")) == 2

    def test_outblob_before_inblob_is_einval(self, io, entry):
        """Reading outblob before anything was written to inblob: EINVAL."""
        with pytest.raises(OSError) as exc:
            io.read(entry / "outblob")
        assert exc.value.errno == errno.EINVAL

    def test_short_inblob_is_einval_at_read(self, io, entry):
        """TDX needs exactly 64 bytes: a 32-byte inblob commits, then outblob is EINVAL."""
        io.write(entry / "inblob", bytes(32))
        assert int(io.read(entry / "generation")) == 1
        with pytest.raises(OSError) as exc:
            io.read(entry / "outblob")
        assert exc.value.errno == errno.EINVAL

    def test_oversize_inblob_is_efbig_and_still_commits(self, io, entry):
        """A 65-byte write fails with EFBIG, yet configfs commits the empty buffer at close."""
        with pytest.raises(OSError) as exc:
            io.write(entry / "inblob", bytes(65))
        assert exc.value.errno == errno.EFBIG
        assert int(io.read(entry / "generation")) == 1
        with pytest.raises(OSError) as exc:
            io.read(entry / "outblob")
        assert exc.value.errno == errno.EINVAL

    def test_outblob_is_cached_until_next_write(self, io, entry):
        """Repeated reads return the cached report; a new write makes the next read fresh."""
        io.write(entry / "inblob", b"a" * 64)
        first = io.read(entry / "outblob")
        assert io.read(entry / "outblob") == first
        io.write(entry / "inblob", b"b" * 64)
        second = io.read(entry / "outblob")
        assert second != first and TdxQuote.from_bytes(second).report_data == b"b" * 64

    def test_attribute_modes_enforced(self, io, entry):
        """inblob is write-only and outblob read-only, even for root."""
        with pytest.raises(PermissionError):
            io.read(entry / "inblob")
        with pytest.raises(PermissionError):
            io.write(entry / "outblob", b"x")

    def test_rmdir_removes_entry_and_attributes(self, machine, io, entry):
        """rmdir removes the item and its attribute files."""
        io.rmdir(entry)
        assert not entry.exists() and machine.entries() == []

    def test_ignored_commit_error(self, machine, io, entry):
        """An injected commit error is dropped: write() succeeds, the generation stays."""
        machine.inject("commit", errno.EBUSY)
        io.write(entry / "inblob", bytes(64))
        assert int(io.read(entry / "generation")) == 0
        io.write(entry / "inblob", bytes(64))
        assert int(io.read(entry / "generation")) == 1

    def test_deferred_commit_shows_after_polls(self, machine, io, entry):
        """A deferred commit shows in generation only after some polls."""
        machine.defer_commit(3)
        io.write(entry / "inblob", bytes(64))
        seen = [int(io.read(entry / "generation")) for _ in range(3)]
        assert seen == [0, 0, 1]

    def test_concurrent_writer_race(self, machine, io, entry):
        """A racing writer moves the generation by two and replaces the report data."""
        machine.race("inblob")
        io.write(entry / "inblob", b"m" * 64)
        assert int(io.read(entry / "generation")) == 2
        assert TdxQuote.from_bytes(io.read(entry / "outblob")).report_data != b"m" * 64

    def test_wrap_is_an_invisible_ebusy(self, machine, io, entry):
        """write_generation == read_generation - 1 (mod 2^64) refuses the commit silently."""
        with machine._store.transaction() as state:
            state["entries"][entry.name].update(wgen=5, rgen=6)
        io.write(entry / "inblob", bytes(64))
        assert int(io.read(entry / "generation")) == 5

    @pytest.mark.parametrize(
        "code", [errno.EBUSY, errno.EIO, errno.ETIMEDOUT, errno.EINTR, errno.ENOMEM]
    )
    def test_injected_outblob_errors(self, machine, io, entry, code):
        """Injected provider errors come back from read(), once, then the quote works."""
        machine.inject("outblob", code)
        io.write(entry / "inblob", bytes(64))
        with pytest.raises(OSError) as exc:
            io.read(entry / "outblob")
        assert exc.value.errno == code
        assert TdxQuote.from_bytes(io.read(entry / "outblob")).report_data == bytes(64)

    def test_persistent_fault(self, machine, io, entry):
        """times=-1 fails every call until the faults are cleared."""
        machine.inject("outblob", errno.EIO, times=-1)
        io.write(entry / "inblob", bytes(64))
        for _ in range(3):
            with pytest.raises(OSError):
                io.read(entry / "outblob")
        machine.clear_faults()
        assert io.read(entry / "outblob")

    def test_empty_outblob(self, machine, io, entry):
        """A failed GetQuote can read as an empty blob (EOF at once)."""
        machine.empty_outblob()
        io.write(entry / "inblob", bytes(64))
        assert io.read(entry / "outblob") == b""

    def test_outblob_limits_per_kernel(self, tmp_path):
        """Over 32 KiB is EFBIG before 7.0; 7.0 returns it (16 MiB limit)."""
        for kernel, ok in (("6.16", False), ("7.0", True)):
            machine = FakeTdxMachine.create(tmp_path / kernel, kernel=kernel)
            machine.set_outblob_size(40_000)
            io = machine.io()
            entry = machine.paths.report_dir / "e"
            io.mkdir(entry)
            io.write(entry / "inblob", bytes(64))
            if ok:
                assert len(io.read(entry / "outblob")) == 40_000
            else:
                with pytest.raises(OSError) as exc:
                    io.read(entry / "outblob")
                assert exc.value.errno == errno.EFBIG

    def test_provider_unregistered_after_mkdir(self, machine, io, entry):
        """A provider that goes away makes provider and outblob reads ENXIO."""
        io.write(entry / "inblob", bytes(64))
        machine.set_provider(None)
        for name in ("provider", "outblob"):
            with pytest.raises(OSError) as exc:
                io.read(entry / name)
            assert exc.value.errno == errno.ENXIO


class TestQuote:
    def test_v4_layout_with_current_registers(self, machine, io, entry):
        """The outblob is a v4 quote: report data at 568, the live RTMRs, our user data."""
        io.write(entry / "inblob", bytes(range(64)))
        raw = io.read(entry / "outblob")
        quote = TdxQuote.from_bytes(raw)
        assert raw[:8] == bytes.fromhex("0400020081000000")
        assert raw[568:632] == bytes(range(64))
        assert quote.header.user_data == FAKE_TDX_USER_DATA
        registers = machine.registers()
        assert quote.report.rtmrs == registers.rtmrs and quote.report.mr_td == registers.mrtd

    def test_quote_sees_extends(self, machine, io, entry):
        """After an extend through sysfs, the next quote carries the new RTMR3."""
        before = machine.registers().rtmrs[3]
        io.write(machine.paths.register_file(3), b"\x07" * 48)
        io.write(entry / "inblob", bytes(64))
        quote = TdxQuote.from_bytes(io.read(entry / "outblob"))
        assert quote.report.rtmr3 == hashlib.sha384(before + b"\x07" * 48).digest()

    def test_verifies_with_trust_bundle_only(self, machine, io, entry):
        """dcap-qvl accepts the quote under the fake's root, and rejects it under Intel's."""
        io.write(entry / "inblob", bytes(64))
        raw = io.read(entry / "outblob")
        bundle = machine.trust_bundle()
        root = x509.load_pem_x509_certificate(bundle.root_ca_pem).public_bytes(Encoding.DER)
        collateral = dcap_qvl.QuoteCollateralV3.from_json(bundle.collateral_json)
        assert dcap_qvl.verify_with_root_ca(raw, collateral, root, NOW).status == "UpToDate"
        with pytest.raises(ValueError):
            dcap_qvl.verify(raw, collateral, NOW)

    def test_version_5(self, tmp_path):
        """quote_version=5 gives v5 quotes with report data at 574."""
        machine = FakeTdxMachine.create(tmp_path / "tree", quote_version=5)
        io = machine.io()
        entry = machine.paths.report_dir / "e"
        io.mkdir(entry)
        io.write(entry / "inblob", b"\x05" * 64)
        raw = io.read(entry / "outblob")
        assert TdxQuote.from_bytes(raw).version == 5 and raw[574:638] == b"\x05" * 64


class TestSysfsRegisters:
    def test_extend_arithmetic(self, machine, io):
        """A 48-byte write is RTMR = SHA384(RTMR || data); reads give 48 raw bytes."""
        path = machine.paths.register_file(3)
        before = io.read(path)
        io.write(path, b"\x01" * 48)
        after = io.read(path)
        assert len(after) == 48 and after == hashlib.sha384(before + b"\x01" * 48).digest()
        assert path.read_bytes() == after  # the real file mirrors the register

    @pytest.mark.parametrize("size", [0, 47, 49, 64])
    def test_partial_writes_are_einval(self, machine, io, size):
        """Writes that are not exactly 48 bytes fail with EINVAL and change nothing."""
        before = machine.registers()
        with pytest.raises(OSError) as exc:
            io.write(machine.paths.register_file(3), b"\x01" * size)
        assert exc.value.errno == errno.EINVAL
        assert machine.registers() == before

    def test_class_symlink_path(self, machine, io):
        """/sys/class/misc/tdx_guest/measurements is the same register."""
        before = machine.registers().rtmrs[2]
        io.write(machine.paths.class_link / "measurements" / "rtmr2:sha384", b"\x02" * 48)
        assert machine.registers().rtmrs[2] == hashlib.sha384(before + b"\x02" * 48).digest()

    def test_mrtd_is_read_only(self, machine, io):
        """mrtd:sha384 is 0444: writing it is EACCES."""
        with pytest.raises(PermissionError):
            io.write(machine.paths.measurements_dir / "mrtd:sha384", bytes(48))
        assert io.read(machine.paths.measurements_dir / "mrtd:sha384") == machine.registers().mrtd

    def test_read_only_switch(self, machine, io):
        """set_registers_writable(False) makes every RTMR file refuse writes."""
        machine.set_registers_writable(False)
        with pytest.raises(PermissionError):
            io.write(machine.paths.register_file(3), bytes(48))
        machine.set_registers_writable(True)
        io.write(machine.paths.register_file(3), bytes(48))

    @pytest.mark.parametrize("code", [errno.ENXIO, errno.EBUSY, errno.EIO])
    def test_injected_extend_errors(self, machine, io, code):
        """Injected TDX-module errors fail the write and leave the register alone."""
        before = machine.registers()
        machine.inject("extend", code)
        with pytest.raises(OSError) as exc:
            io.write(machine.paths.register_file(3), bytes(48))
        assert exc.value.errno == code and machine.registers() == before


class TestIoctl:
    def test_get_report0_layout(self, machine, io):
        """TDX_CMD_GET_REPORT0 fills the TDREPORT: type 0x81, reportdata at 128, MRs at 528."""
        arg = bytearray(1088)
        arg[:64] = b"\x09" * 64
        assert io.ioctl(machine.paths.device, TDX_CMD_GET_REPORT0, arg) == 0
        report = bytes(arg[64:])
        registers = machine.registers()
        assert report[0] == 0x81 and report[128:192] == b"\x09" * 64
        assert report[528:576] == registers.mrtd
        assert [report[720 + 48 * i : 768 + 48 * i] for i in range(4)] == list(registers.rtmrs)

    def test_unknown_request_is_enotty(self, machine, io):
        """Mainline has no extend ioctl: both encodings are ENOTTY."""
        for request in (TDX_CMD_EXTEND_RTMR_IOW, TDX_CMD_EXTEND_RTMR_IOR, 0x1234):
            with pytest.raises(OSError) as exc:
                io.ioctl(machine.paths.device, request, bytearray(49))
            assert exc.value.errno == errno.ENOTTY

    def test_intel_oot_extend(self, tmp_path):
        """The out-of-tree driver extends RTMR2/3 through _IOR, refuses RTMR0/1 with EPERM."""
        machine = FakeTdxMachine.create(tmp_path / "tree", kernel="intel-oot")
        io = machine.io()
        before = machine.registers().rtmrs[3]
        with pytest.raises(OSError) as exc:
            io.ioctl(machine.paths.device, TDX_CMD_EXTEND_RTMR_IOW, bytearray(b"\x01" * 48 + b"\x03"))
        assert exc.value.errno == errno.ENOTTY
        io.ioctl(machine.paths.device, TDX_CMD_EXTEND_RTMR_IOR, bytearray(b"\x01" * 48 + b"\x03"))
        assert machine.registers().rtmrs[3] == hashlib.sha384(before + b"\x01" * 48).digest()
        with pytest.raises(OSError) as exc:
            io.ioctl(machine.paths.device, TDX_CMD_EXTEND_RTMR_IOR, bytearray(b"\x01" * 48 + b"\x01"))
        assert exc.value.errno == errno.EPERM


SUBPROCESS_EXTEND = """
import sys
from pathlib import Path
from dstack_core.testing.fake_tee import FakeTdxMachine
machine = FakeTdxMachine(Path(sys.argv[1]))
machine.io().write(machine.paths.register_file(3), bytes.fromhex(sys.argv[2]))
print("returned")
"""


class TestSharedState:
    def test_state_is_shared_across_processes(self, machine):
        """An extend in another process is seen here (the state lives in the tree)."""
        before = machine.registers().rtmrs[3]
        subprocess.run([sys.executable, "-c", SUBPROCESS_EXTEND, str(machine.root), "11" * 48],
                       check=True, capture_output=True)
        assert machine.registers().rtmrs[3] == hashlib.sha384(before + b"\x11" * 48).digest()

    def test_switch_flipped_here_is_seen_there(self, machine):
        """A fault injected in this process fails the other process's next syscall."""
        machine.inject("extend", errno.EBUSY)
        result = subprocess.run([sys.executable, "-c", SUBPROCESS_EXTEND, str(machine.root), "11" * 48],
                                capture_output=True, text=True, check=False)
        assert result.returncode != 0 and "Device or resource busy" in result.stderr

    @pytest.mark.parametrize(("point", "moved"), [("before_extend", False), ("after_extend", True)])
    def test_crash_points(self, machine, point, moved):
        """crash() SIGKILLs the extending process before or after the register moves."""
        before = machine.registers().rtmrs[3]
        machine.crash(point)
        result = subprocess.run([sys.executable, "-c", SUBPROCESS_EXTEND, str(machine.root), "11" * 48],
                                capture_output=True, text=True, check=False)
        assert result.returncode == -signal.SIGKILL and "returned" not in result.stdout
        assert (machine.registers().rtmrs[3] != before) == moved

    def test_reopen(self, machine):
        """FakeTdxMachine(root) reopens a tree; a directory without one is refused."""
        assert FakeTdxMachine(machine.root).registers() == machine.registers()
        with pytest.raises(FileNotFoundError):
            FakeTdxMachine(machine.root / "sys")
        with pytest.raises(FileExistsError):
            FakeTdxMachine.create(machine.root)
