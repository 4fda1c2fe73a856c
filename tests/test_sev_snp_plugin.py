"""The sev-snp-stub platform plugin against the fake SEV-SNP kernel (in process), and the
fake itself: configfs and ioctl paths, the real struct marshalling, CPython's small-buffer
rule, errors, the derived root key, and no runtime registers (through a live agent too).
"""

from __future__ import annotations

import ctypes
import errno
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from dstack_sev_snp_stub import (
    APP_KEY_LABEL,
    KEY_PROVIDER_NAME,
    SevSnpStubOptions,
    SevSnpStubPlatform,
)
from dstack_sev_snp_stub.abi import (
    GUEST_FIELDS,
    IOCTL_BUFFER_SIZE,
    SNP_GET_DERIVED_KEY,
    SNP_GET_REPORT,
    SnpDerivedKeyReq,
    SnpDerivedKeyResp,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
)

from dstack_core import certs
from dstack_core.envelope import Envelope
from dstack_core.errors import (
    ConfigurationError,
    InvalidRequest,
    PlatformBusy,
    PlatformError,
    PlatformUnsupported,
)
from dstack_core.keys import derive_key
from dstack_core.plugins import load_platform
from dstack_core.snp import SnpReport
from dstack_core.testing import short_tempdir
from dstack_core.testing.fake_tee import (
    SEV_RET_INVALID_PARAM,
    SNP_GUEST_VMM_ERR_BUSY,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    FakeSnpAgent,
    FakeSnpKernelIO,
    FakeSnpMachine,
)
from dstack_core.tsm import ENTRY_PREFIX
from dstack_core.types import PlatformConfig

RD = bytes(range(64))


def _config(machine: FakeSnpMachine, tmp_path: Path, **options: str) -> PlatformConfig:
    return machine.platform_config(tmp_path / "state", commit_timeout="0.2", **options)


def _platform(machine: FakeSnpMachine, tmp_path: Path, io: FakeSnpKernelIO | None = None,
              **options: str) -> SevSnpStubPlatform:
    platform = SevSnpStubPlatform(io or machine.io())
    platform.configure(_config(machine, tmp_path, **options))
    return platform


@pytest.fixture
def machine(tmp_path: Path) -> FakeSnpMachine:
    return FakeSnpMachine.create(tmp_path / "tree")


@pytest.fixture
def legacy(tmp_path: Path) -> FakeSnpMachine:
    """A 5.19 guest: /dev/sev-guest only, no configfs-tsm."""
    return FakeSnpMachine.create(tmp_path / "legacy", kernel="5.19")


@pytest.fixture
def io(machine: FakeSnpMachine) -> FakeSnpKernelIO:
    return machine.io()


@pytest.fixture
def snp(machine: FakeSnpMachine, io: FakeSnpKernelIO, tmp_path: Path) -> SevSnpStubPlatform:
    return _platform(machine, tmp_path, io)


def _last_report_calls(io: FakeSnpKernelIO) -> list[tuple[str, str, int]]:
    """The calls of the last configfs report, with entry names replaced by ``E``."""
    start = max(i for i, (op, _, _) in enumerate(io.calls) if op == "mkdir")
    calls = []
    for op, path, size in io.calls[start:]:
        parts = path.split("/")
        if len(parts) >= 6 and parts[:5] == ["sys", "kernel", "config", "tsm", "report"]:
            path = "/".join(["E", *parts[6:]])
        calls.append((op, path, size))
    return calls


def _raw_ioctl(io: FakeSnpKernelIO, request: int, buffer: bytearray) -> None:
    io.ioctl(io.paths.device, request, buffer)


class TestPlatformInfo:
    def test_info(self):
        """Tag and format sev-snp, not simulated, no runtime registers."""
        info = SevSnpStubPlatform().platform_info()
        assert (info.name, info.tag, info.evidence_format) == ("sev-snp-stub", "sev-snp", "sev-snp")
        assert info.simulated is False and info.runtime_registers is False

    def test_entry_point_loads(self):
        """The plugin is registered as sev-snp-stub in dstack_core.platforms."""
        pm = load_platform("sev-snp-stub")
        assert pm.hook.platform_info().name == "sev-snp-stub"


class TestOptions:
    def test_defaults(self):
        """root /, report auto, VCEK, policy+measurement (bits 0 and 3), vmpl from the kernel."""
        options = SevSnpStubOptions.parse({})
        assert (options.root, options.report, options.root_key) == (Path("/"), "auto", "vcek")
        assert options.field_select == 0b1001 and options.vmpl is None

    @pytest.mark.parametrize(
        ("key", "value"),
        [("report", "sysfs"), ("vmpl", "4"), ("vmpl", "-1"), ("root_key", "vlek"),
         ("key_fields", "policy"), ("key_fields", "measurement,colour"),
         ("commit_timeout", "0"), ("sysio", "mock"), ("root", ""), ("colour", "blue")],
    )
    def test_bad_values_refused(self, key, value):
        """Unknown options and bad values are ConfigurationError naming the option."""
        with pytest.raises(ConfigurationError, match=key):
            SevSnpStubOptions.parse({key: value})

    def test_key_fields_must_bind_the_measurement(self):
        """A key not bound to the launch measurement is refused with the reason."""
        with pytest.raises(ConfigurationError, match="must include measurement"):
            SevSnpStubOptions.parse({"key_fields": "policy,guest_svn"})

    def test_fake_kernel_refused_without_the_env(self, machine, tmp_path, monkeypatch):
        """sysio=fake is refused unless DSTACK_ALLOW_FAKE_KERNEL=1."""
        monkeypatch.delenv("DSTACK_ALLOW_FAKE_KERNEL", raising=False)
        with pytest.raises(ConfigurationError, match="for tests only"):
            SevSnpStubPlatform().configure(_config(machine, tmp_path, sysio="fake"))
        monkeypatch.setenv("DSTACK_ALLOW_FAKE_KERNEL", "1")
        platform = SevSnpStubPlatform()
        platform.configure(_config(machine, tmp_path, sysio="fake"))
        assert platform.get_quote(RD).format == "sev-snp"


class TestConfigure:
    def test_no_device_fails_closed(self, tmp_path):
        """Without /dev/sev-guest configure fails, naming the device."""
        root = tmp_path / "empty"
        root.mkdir()
        config = PlatformConfig(state_dir=tmp_path / "s", runtime_log=tmp_path / "rl",
                                app_compose=tmp_path / "a", sys_config=tmp_path / "b",
                                options={"root": str(root)})
        with pytest.raises(ConfigurationError, match="dev/sev-guest"):
            SevSnpStubPlatform().configure(config)

    def test_appkeys_refused(self, machine, tmp_path):
        """Keys come from the firmware: --appkeys is a configuration error."""
        config = attrs.evolve(_config(machine, tmp_path), appkeys=tmp_path / "appkeys.json")
        with pytest.raises(ConfigurationError, match="appkeys"):
            SevSnpStubPlatform(machine.io()).configure(config)

    def test_auto_prefers_configfs(self, snp):
        """With configfs-tsm and provider sev_guest, reports go through configfs."""
        assert snp.method == "configfs"

    def test_auto_falls_back_to_the_ioctl(self, legacy, tmp_path):
        """Without configfs-tsm (5.19) reports go through SNP_GET_REPORT."""
        assert _platform(legacy, tmp_path).method == "ioctl"

    def test_auto_falls_back_without_a_provider(self, machine, tmp_path):
        """configfs without a registered provider (ENXIO) falls back to the ioctl."""
        machine.set_provider(None)
        assert _platform(machine, tmp_path).method == "ioctl"

    def test_report_configfs_demands_configfs(self, legacy, tmp_path):
        """report=configfs on a kernel without it fails, naming the directory."""
        with pytest.raises(ConfigurationError, match="tsm/report"):
            _platform(legacy, tmp_path, report="configfs")

    def test_report_ioctl_is_honoured(self, machine, tmp_path):
        """report=ioctl uses the device even where configfs exists."""
        assert _platform(machine, tmp_path, report="ioctl").method == "ioctl"

    def test_other_provider_refused(self, machine, tmp_path):
        """A tdx_guest provider means this is not an SNP guest: configure refuses."""
        machine.set_provider("tdx_guest")
        with pytest.raises(ConfigurationError, match="tdx_guest"):
            _platform(machine, tmp_path)

    def test_default_vmpl_is_the_floor_on_both_paths(self, tmp_path):
        """Under an SVSM (VMPL 1) both report methods request VMPL 1, so the keys agree."""
        machine = FakeSnpMachine.create(tmp_path / "svsm", vmpl=1)
        configfs = _platform(machine, tmp_path)
        ioctl = _platform(machine, tmp_path, report="ioctl")
        assert SnpReport.from_bytes(ioctl.get_quote(RD).data).vmpl == 1
        assert configfs.derive_root_key() == ioctl.derive_root_key()

    def test_vmpl_below_floor_refused(self, tmp_path):
        """Under an SVSM (VMPL 2), asking for VMPL 1 is refused at start-up."""
        machine = FakeSnpMachine.create(tmp_path / "svsm", vmpl=2)
        with pytest.raises(ConfigurationError, match="below the guest's own VMPL 2"):
            _platform(machine, tmp_path, vmpl="1")

    def test_firmware_failure_at_start_fails_closed(self, machine, tmp_path):
        """A firmware refusal of the start-up key request stops configure with its status."""
        machine.firmware_status(SEV_RET_INVALID_PARAM, request="key")
        with pytest.raises(ConfigurationError, match="INVALID_PARAM"):
            _platform(machine, tmp_path)


class TestConfigfsPath:
    def test_syscall_sequence(self, snp, io):
        """mkdir, provider, generation, one 64-byte inblob write, generation, outblob,
        generation, rmdir: the recommended protocol; privlevel untouched at VMPL 0."""
        quote = snp.get_quote(RD)
        assert quote.format == "sev-snp" and len(quote.data) == 1184
        ops = [(op, path) for op, path, _ in _last_report_calls(io)]
        assert ops == [
            ("mkdir", "E"), ("read", "E/provider"), ("read", "E/generation"),
            ("write", "E/inblob"), ("read", "E/generation"), ("read", "E/outblob"),
            ("read", "E/generation"), ("rmdir", "E"),
        ]
        assert [size for op, _, size in _last_report_calls(io) if op == "write"] == [64]
        assert SnpReport.from_bytes(quote.data).report_data == RD

    def test_privlevel_written_under_an_svsm(self, tmp_path):
        """At VMPL 2 the plugin writes privlevel=2 before the inblob; the report says VMPL 2."""
        machine = FakeSnpMachine.create(tmp_path / "svsm", vmpl=2)
        io = machine.io()
        platform = _platform(machine, tmp_path, io)
        report = SnpReport.from_bytes(platform.get_quote(RD).data)
        assert report.vmpl == 2
        writes = [(path, size) for op, path, size in _last_report_calls(io) if op == "write"]
        assert writes == [("E/privlevel", 2), ("E/inblob", 64)]

    def test_svsm_attributes_visible_only_above_vmpl0(self, tmp_path):
        """The kernel shows service_* and manifestblob only under an SVSM (6.10+)."""
        plain = FakeSnpMachine.create(tmp_path / "a")
        svsm = FakeSnpMachine.create(tmp_path / "b", vmpl=1)
        for machine, expected in ((plain, False), (svsm, True)):
            io = machine.io()
            entry = machine.paths.report_dir / "probe"
            io.mkdir(entry)
            names = {p.name for p in entry.iterdir()}
            assert ("manifestblob" in names) is expected
            assert {"privlevel", "privlevel_floor", "auxblob", "inblob", "outblob"} <= names
            io.rmdir(entry)

    def test_entries_removed(self, snp, machine, io):
        """Each request uses its own entry, named after the agent, and removes it."""
        snp.get_quote(RD)
        snp.get_quote(RD)
        names = [Path(p).name for op, p, _ in io.calls if op == "mkdir"]
        assert len(set(names)) == len(names)
        assert all(n.startswith(ENTRY_PREFIX) for n in names)
        assert machine.entries() == []

    @pytest.mark.parametrize(
        ("op", "code", "error", "text"),
        [
            ("outblob", errno.EBUSY, PlatformBusy, "EBUSY"),
            ("outblob", errno.EIO, PlatformError, "EIO"),
            ("outblob", errno.ETIMEDOUT, PlatformBusy, "60 s"),
            ("mkdir", errno.ENOSPC, PlatformError, "ENOSPC"),
            ("provider", errno.EACCES, PlatformError, "root"),
        ],
    )
    def test_kernel_errors_are_mapped(self, snp, machine, op, code, error, text):
        """Each errno becomes its error class, the message names errno and path; no entry
        is left behind."""
        machine.inject(op, code)
        with pytest.raises(error, match=text) as caught:
            snp.get_quote(RD)
        assert "tsm/report" in caught.value.message
        assert machine.entries() == []
        assert snp.get_quote(RD).data

    def test_firmware_status_reads_as_einval(self, snp, machine):
        """A firmware INVALID_PARAM surfaces as EINVAL from the outblob read."""
        machine.firmware_status(SEV_RET_INVALID_PARAM, request="report")
        with pytest.raises(PlatformError, match="EINVAL reading"):
            snp.get_quote(RD)

    def test_other_firmware_status_reads_as_enxio(self, snp, machine):
        """Any other non-zero firmware status surfaces as ENXIO."""
        machine.firmware_status(0x05, request="report")
        with pytest.raises(PlatformError, match="ENXIO"):
            snp.get_quote(RD)

    def test_empty_outblob_is_an_error(self, snp, machine):
        """An empty report is a failure, never returned."""
        machine.empty_outblob()
        with pytest.raises(PlatformError, match="empty report"):
            snp.get_quote(RD)

    def test_race_is_retried(self, snp, machine):
        """Another writer on the entry: the plugin retries with a fresh entry."""
        machine.race("inblob")
        machine.race("outblob")
        assert SnpReport.from_bytes(snp.get_quote(RD).data).report_data == RD

    def test_persistent_race_is_busy(self, snp, machine):
        """Racing every time gives PlatformBusy after the retries."""
        machine.race("inblob", times=10)
        with pytest.raises(PlatformBusy, match="raced"):
            snp.get_quote(RD)

    def test_deferred_commit_is_waited_for(self, snp, machine):
        """A commit that shows in generation only later is polled for."""
        machine.defer_commit(3)
        assert SnpReport.from_bytes(snp.get_quote(RD).data).report_data == RD

    def test_dropped_commit_times_out_busy(self, snp, machine):
        """A commit error (dropped by configfs) leaves generation still: PlatformBusy."""
        machine.inject("commit", errno.EBUSY)
        with pytest.raises(PlatformBusy, match="did not commit"):
            snp.get_quote(RD)

    def test_vmpck_disabled_after_transport_failure(self, snp, machine):
        """A transport failure disables the VMPCK: later reports fail (ENOTTY) until reboot."""
        machine.inject_guest_error(fw_error=0x16, code=errno.EIO)
        with pytest.raises(PlatformError, match="EIO"):
            snp.get_quote(RD)
        assert machine.vmpck_disabled
        with pytest.raises(PlatformError, match="VMPCK"):
            snp.get_quote(RD)
        machine.reboot()
        assert snp.get_quote(RD).data

    def test_report_data_must_be_64_bytes(self, snp):
        """Short report data never reaches the kernel."""
        with pytest.raises(InvalidRequest):
            snp.get_quote(b"short")


class TestIoctlPath:
    @pytest.fixture
    def snp(self, legacy, tmp_path) -> SevSnpStubPlatform:
        return _platform(legacy, tmp_path)

    def test_report_through_the_device(self, snp, legacy):
        """SNP_GET_REPORT gives the bare report, bound to the report data, signed by the fake."""
        report = SnpReport.from_bytes(snp.get_quote(RD).data)
        assert report.report_data == RD and report.measurement == legacy.measurement
        report.verify_signature(legacy.vcek_public_key())

    def test_buffer_passed_directly(self, legacy, tmp_path):
        """Every ioctl hands the kernel a 4096-byte buffer (over CPython's 1024-byte copy)."""
        io = legacy.io()
        platform = _platform(legacy, tmp_path, io)
        platform.get_quote(RD)
        sizes = {size for op, _, size in io.calls if op == "ioctl"}
        assert sizes == {IOCTL_BUFFER_SIZE} and IOCTL_BUFFER_SIZE > 1024

    def test_fw_error_survives_thanks_to_the_large_buffer(self, snp, legacy):
        """A failed request's exitinfo2 (fw_error, vmm_error) reaches the error message."""
        legacy.inject_guest_error(fw_error=0x16, vmm_error=0, code=errno.EIO)
        with pytest.raises(PlatformError) as caught:
            snp.get_quote(RD)
        assert "fw_error 0x16, vmm_error 0x0" in caught.value.message
        assert "EIO" in caught.value.message and "dev/sev-guest" in caught.value.message

    def test_vmm_busy_is_platform_busy(self, snp, legacy):
        """vmm_error BUSY (the kernel's 60 s of retries ran out) is PlatformBusy."""
        legacy.inject_guest_error(vmm_error=SNP_GUEST_VMM_ERR_BUSY, code=errno.ETIMEDOUT)
        with pytest.raises(PlatformBusy, match="busy"):
            snp.get_quote(RD)

    def test_vmpck_disabled_then_enotty(self, snp, legacy):
        """After a transport failure every request is ENOTTY with exitinfo2 0xff; reboot heals."""
        legacy.inject_guest_error(fw_error=1)
        with pytest.raises(PlatformError):
            snp.get_quote(RD)
        with pytest.raises(PlatformError, match="VMPCK.*ENOTTY; exitinfo2 0xff"):
            snp.get_quote(RD)
        legacy.reboot()
        assert snp.get_quote(RD).data

    def test_firmware_status_is_checked(self, snp, legacy):
        """status != 0 in MSG_REPORT_RSP (the ioctl itself succeeds) is an error."""
        legacy.firmware_status(SEV_RET_INVALID_PARAM, request="report")
        with pytest.raises(PlatformError, match=r"INVALID_PARAM \(0x16\)"):
            snp.get_quote(RD)
        assert not legacy.vmpck_disabled

    def test_plain_errno_is_mapped(self, snp, legacy):
        """An errno before the kernel reads the request (no exitinfo2) is still named."""
        legacy.inject("ioctl", errno.EACCES)
        with pytest.raises(PlatformError, match="root.*EACCES"):
            snp.get_quote(RD)


class TestFakeDevice:
    """The fake /dev/sev-guest against hand-marshalled structs: what a plugin must get right."""

    def _outer(self, size: int, request_obj: ctypes.Structure, response_obj: ctypes.Structure,
               msg_version: int = 1) -> bytearray:
        buffer = bytearray(size)
        struct.pack_into("<B7xQQQ", buffer, 0, msg_version, ctypes.addressof(request_obj),
                         ctypes.addressof(response_obj), 0)
        return buffer

    def test_struct_layouts(self):
        """The plugin's ctypes structs have the uapi sizes and offsets; the numbers match."""
        assert [ctypes.sizeof(s) for s in (SnpGuestRequestIoctl, SnpReportReq, SnpReportResp,
                                           SnpDerivedKeyReq, SnpDerivedKeyResp)] == [32, 96, 4000, 32, 64]
        assert (SnpGuestRequestIoctl.req_data.offset, SnpGuestRequestIoctl.resp_data.offset,
                SnpGuestRequestIoctl.exitinfo2.offset) == (8, 16, 24)
        assert (SNP_GET_REPORT, SNP_GET_DERIVED_KEY) == (0xC0205300, 0xC0205301)
        assert GUEST_FIELDS["measurement"] == 1 << 3

    def test_report_response_layout(self, machine):
        """MSG_REPORT_RSP: status 0, size 0x4A0, report at 32, the rest of 4000 bytes zero."""
        request, response = SnpReportReq(), SnpReportResp()
        ctypes.memmove(request.user_data, RD, 64)
        buffer = self._outer(4096, request, response)
        _raw_ioctl(machine.io(), SNP_GET_REPORT, buffer)
        raw = bytes(response)
        assert struct.unpack_from("<II", raw, 0) == (0, 0x4A0)
        assert SnpReport.from_bytes(raw[32:32 + 0x4A0]).report_data == RD
        assert not any(raw[32 + 0x4A0:])
        assert struct.unpack_from("<Q", buffer, 24)[0] == 0  # success: nothing copied back

    def test_key_response_layout(self, machine):
        """MSG_KEY_RSP: status 0, the 32-byte key at 0x20."""
        request = SnpDerivedKeyReq(guest_field_select=GUEST_FIELDS["measurement"])
        response = SnpDerivedKeyResp()
        _raw_ioctl(machine.io(), SNP_GET_DERIVED_KEY, self._outer(4096, request, response))
        raw = bytes(response)
        assert struct.unpack_from("<I", raw, 0)[0] == 0
        assert not any(raw[4:0x20]) and any(raw[0x20:0x40])

    def test_msg_version_zero_is_einval(self, machine):
        """msg_version 0 is refused with EINVAL, before anything is copied back."""
        request, response = SnpReportReq(), SnpReportResp()
        buffer = self._outer(4096, request, response, msg_version=0)
        with pytest.raises(OSError) as caught:
            _raw_ioctl(machine.io(), SNP_GET_REPORT, buffer)
        assert caught.value.errno == errno.EINVAL
        assert struct.unpack_from("<Q", buffer, 24)[0] == 0

    def test_unknown_request_is_enotty(self, machine):
        """Another ioctl number is ENOTTY."""
        request, response = SnpReportReq(), SnpReportResp()
        with pytest.raises(OSError) as caught:
            _raw_ioctl(machine.io(), SNP_GET_REPORT | 0x7, self._outer(4096, request, response))
        assert caught.value.errno == errno.ENOTTY

    @pytest.mark.parametrize(("size", "copyback", "kept"), [
        (32, "success-only", False), (32, "always", True), (4096, "success-only", True),
    ])
    def test_small_buffer_pitfall(self, machine, size, copyback, kept):
        """With a 32-byte buffer, new CPython loses the exitinfo2 of a failed request; a
        buffer over 1024 bytes always keeps it."""
        machine.set_copyback(copyback)
        machine.inject_guest_error(fw_error=0x27, vmm_error=0, disable_vmpck=False)
        request, response = SnpReportReq(), SnpReportResp()
        buffer = self._outer(size, request, response)
        with pytest.raises(OSError):
            _raw_ioctl(machine.io(), SNP_GET_REPORT, buffer)
        exitinfo2 = struct.unpack_from("<Q", buffer, 24)[0]
        assert exitinfo2 == (0x27 if kept else 0)

    def test_ext_report_certificate_length_dance(self, machine):
        """SNP_GET_EXT_REPORT: EIO + INVALID_LEN + the needed length written back; page
        alignment and the 16 KiB limit are EINVAL; with room, the table is copied."""

        class ExtReq(ctypes.Structure):
            _fields_ = [("data", SnpReportReq), ("certs_address", ctypes.c_uint64),
                        ("certs_len", ctypes.c_uint32)]

        assert ctypes.sizeof(ExtReq) == 112
        table = b"\xab" * 5000
        machine.set_certs(table)
        certs_buffer = (ctypes.c_uint8 * 16384)()
        io = machine.io()
        for bad in (100, 5 * 4096):
            request = ExtReq(certs_address=ctypes.addressof(certs_buffer), certs_len=bad)
            with pytest.raises(OSError) as caught:
                _raw_ioctl(io, 0xC0205302, self._outer(4096, request, SnpReportResp()))
            assert caught.value.errno == errno.EINVAL
        request = ExtReq(certs_address=ctypes.addressof(certs_buffer), certs_len=4096)
        buffer = self._outer(4096, request, SnpReportResp())
        with pytest.raises(OSError) as caught:
            _raw_ioctl(io, 0xC0205302, buffer)
        assert caught.value.errno == errno.EIO
        assert struct.unpack_from("<Q", buffer, 24)[0] == SNP_GUEST_VMM_ERR_INVALID_LEN << 32
        assert request.certs_len == 8192 and not machine.vmpck_disabled
        response = SnpReportResp()
        _raw_ioctl(io, 0xC0205302, self._outer(4096, request, response))
        assert bytes(certs_buffer)[:5000] == table and not any(bytes(certs_buffer)[5000:8192])
        assert SnpReport.from_bytes(bytes(response)[32:32 + 1184]).report_data == bytes(64)


class TestDerivedKey:
    def test_stable_across_instances(self, machine, tmp_path):
        """A new plugin instance (an agent restart) derives the same root key, CA included."""
        first = _platform(machine, tmp_path).derive_root_key()
        second = _platform(machine, tmp_path).derive_root_key()
        assert first == second
        assert first.ca_cert_pem == second.ca_cert_pem

    def test_same_on_both_paths(self, machine, tmp_path):
        """configfs or ioctl reports, the derived key is the same."""
        a = _platform(machine, tmp_path).derive_root_key()
        b = _platform(machine, tmp_path, report="ioctl").derive_root_key()
        assert a == b

    def test_bound_to_the_measurement(self, machine, tmp_path):
        """Another launch measurement (another image) gives another app key and CA key."""
        before = _platform(machine, tmp_path).derive_root_key()
        machine.relaunch(measurement=b"\x42" * 48)
        after = _platform(machine, tmp_path).derive_root_key()
        assert after.k256_key != before.k256_key
        assert after.key_provider.key_pem != before.key_provider.key_pem
        assert after.key_provider.id == (b"\x42" * 48).hex()

    def test_bound_to_host_data_and_policy(self, machine, tmp_path):
        """Another HOST_DATA (app config) or guest policy gives another key."""
        keys = {_platform(machine, tmp_path).derive_root_key().k256_key}
        machine.relaunch(host_data=b"\x01" * 32)
        keys.add(_platform(machine, tmp_path).derive_root_key().k256_key)
        machine.relaunch(policy=0x30000 | 1 << 20)
        keys.add(_platform(machine, tmp_path).derive_root_key().k256_key)
        assert len(keys) == 3

    def test_app_key_is_hkdf_of_the_firmware_key(self, machine, tmp_path):
        """k256_key = HKDF(derived key, label || HOST_DATA) of the firmware's key for
        VCEK, policy+measurement, VMPL 0."""
        io = machine.io()
        platform = _platform(machine, tmp_path, io)
        from dstack_sev_snp_stub.device import SevGuestDevice

        derived = SevGuestDevice(io, machine.paths.device).derived_key(
            root_key=0, fields=0b1001, vmpl=0)
        expected = derive_key(derived, [APP_KEY_LABEL, machine.host_data])
        assert platform.derive_root_key().k256_key == expected

    def test_key_options_change_the_key(self, tmp_path):
        """root_key=vmrk (when installed), key_fields and vmpl each give a different key."""
        machine = FakeSnpMachine.create(tmp_path / "vmrk", vmrk=True)
        keys = {
            _platform(machine, tmp_path, **options).derive_root_key().k256_key
            for options in ({}, {"root_key": "vmrk"}, {"key_fields": "measurement"},
                            {"key_fields": "measurement,guest_svn,tcb_version"}, {"vmpl": "1"})
        }
        assert len(keys) == 5

    def test_vmrk_without_a_vmrk_fails_closed(self, machine, tmp_path):
        """Asking for the VMRK when none is installed stops start-up with INVALID_KEY."""
        with pytest.raises(ConfigurationError, match="INVALID_KEY"):
            _platform(machine, tmp_path, root_key="vmrk")

    def test_ca_and_key_provider(self, snp, machine):
        """The CA is a valid self-signed P-256 CA matching its key, valid to 9999; the key
        provider is sev-snp-derived with the measurement as id."""
        root = snp.derive_root_key()
        ca = certs.CertificateAuthority.from_pem(root.ca_cert_pem, root.key_provider.key_pem)
        ca.cert.verify_directly_issued_by(ca.cert)
        assert ca.cert.not_valid_after_utc.year == 9999
        assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert (root.key_provider.kind, root.key_provider.name) == ("Local", KEY_PROVIDER_NAME)
        assert root.key_provider.id == machine.measurement.hex()
        assert json.loads(root.key_provider.event_payload()) == {
            "name": "sev-snp-derived", "id": machine.measurement.hex()}
        assert root.k256_signature == b""


class TestNoRuntimeRegisters:
    def test_extend_is_unsupported(self, snp):
        """extend_rtmr says SNP has no runtime registers; it never pretends."""
        with pytest.raises(PlatformUnsupported, match="no runtime measurement registers"):
            snp.extend_rtmr(3, bytes(48))

    def test_read_measurements_is_unsupported(self, snp):
        """read_measurements is PlatformUnsupported (HTTP 501)."""
        with pytest.raises(PlatformUnsupported) as caught:
            snp.read_measurements()
        assert caught.value.http_status == 501

    def test_boot_log_empty_and_attest(self, snp):
        """The boot log is empty; attest is the report with no boot events and no extra."""
        assert snp.boot_event_log() == ()
        evidence = snp.attest(RD)
        assert evidence.quote.format == "sev-snp" and evidence.boot_events == ()
        assert evidence.extra == {}

    def test_unconfigured_is_platform_error(self):
        """Hooks before configure fail as DstackErrors."""
        platform = SevSnpStubPlatform()
        with pytest.raises(PlatformError):
            platform.get_quote(RD)
        with pytest.raises(ConfigurationError):
            platform.derive_root_key()


@pytest.fixture
def live() -> Iterator[FakeSnpAgent]:
    workdir = short_tempdir("fsnp")
    machine = FakeSnpMachine.create(workdir / "tree")
    agent = machine.agent(workdir=workdir).start()
    yield agent
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class TestLiveAgent:
    def test_emit_event_is_501_and_agent_keeps_serving(self, live):
        """EmitEvent answers 501 platform_unsupported; GetQuote and Info still work after."""
        status, body = live.call("EmitEvent", {"event": "app-event", "payload": "00"})
        assert (status, body["code"]) == (501, "platform_unsupported")
        assert "runtime measurement registers" in body["error"]
        status, body = live.call("GetQuote", {"report_data": RD.hex()})
        assert status == 200
        evidence = Envelope.from_cbor(bytes.fromhex(body["attestation"])).quote
        assert body["quote"] == "" and SnpReport.from_bytes(evidence).report_data == RD
        assert live.call("Info")[0] == 200

    def test_kernel_errors_reach_the_client_and_agent_recovers(self, live):
        """An injected EBUSY is 503 platform_busy; a firmware refusal 500; then it serves."""
        live.machine.inject("outblob", errno.EBUSY)
        status, body = live.call("GetQuote", {"report_data": RD.hex()})
        assert (status, body["code"]) == (503, "platform_busy")
        live.machine.firmware_status(SEV_RET_INVALID_PARAM, request="report")
        status, body = live.call("GetQuote", {"report_data": RD.hex()})
        assert (status, body["code"]) == (500, "platform_error")
        assert live.call("GetQuote", {"report_data": RD.hex()})[0] == 200

    def test_agent_refuses_to_start_without_the_device(self):
        """An agent on a tree without /dev/sev-guest exits with the reason."""
        workdir = short_tempdir("fsnp")
        try:
            machine = FakeSnpMachine.create(workdir / "tree")
            machine.paths.device.unlink()
            agent = machine.agent(workdir=workdir)
            with pytest.raises(RuntimeError, match="dev/sev-guest"):
                agent.start()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
