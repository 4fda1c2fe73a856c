"""The configfs-tsm report client (``dstack_core.tsm``) against the fake TDX kernel.

The provider here is a neutral test profile with the name ``tdx_guest``, so that what is
pinned is the client's protocol and messages, not one plugin's texts (the plugins' own tests
pin those).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from dstack_core.errors import InvalidRequest, PlatformBusy, PlatformError
from dstack_core.kernel_errors import PERMISSION_DENIED, ErrnoTable
from dstack_core.quote import TdxQuote
from dstack_core.testing.fake_tee import FakeKernelIO, FakeSnpMachine, FakeTdxMachine
from dstack_core.tsm import (
    ENTRY_PREFIX,
    RACE_ATTEMPTS,
    REPORT_DIR,
    TSM_ERRNOS,
    ProviderProbe,
    TsmProvider,
    TsmReportClient,
    entry_failure,
)

RD = bytes(range(64))
ERRNOS: ErrnoTable = {
    errno.EBUSY: (PlatformBusy, "the test service is busy"),
    errno.EACCES: (PlatformError, "the provider's own EACCES"),
}


def _report_data(quote: bytes, _outblob: Path) -> bytes | None:
    return TdxQuote.from_bytes(quote).report_data


PROVIDER = TsmProvider(
    name=b"tdx_guest",
    label="TEST",
    blob="blob",
    guest="a test guest",
    errnos=ERRNOS,
    report_data_of=_report_data,
    empty_hint="the test host failed",
)


@pytest.fixture
def machine(tmp_path: Path) -> FakeTdxMachine:
    return FakeTdxMachine.create(tmp_path / "tree")


@pytest.fixture
def io(machine: FakeTdxMachine) -> FakeKernelIO:
    return machine.io()


def _client(
    io: FakeKernelIO, provider: TsmProvider = PROVIDER, commit_timeout: float = 0.2
) -> TsmReportClient:
    return TsmReportClient(io, io.paths.report_dir, provider, commit_timeout=commit_timeout)


@pytest.fixture
def client(io: FakeKernelIO) -> TsmReportClient:
    return _client(io)


def _calls(io: FakeKernelIO, start: int = 0) -> list[tuple[str, str, int]]:
    """``io.calls`` from ``start``, with report entry names replaced by ``E``."""
    prefix = REPORT_DIR.as_posix() + "/"
    calls = []
    for op, path, size in io.calls[start:]:
        if path.startswith(prefix):
            _, _, rest = path[len(prefix):].partition("/")
            path = "/".join(p for p in ("E", rest) if p)
        calls.append((op, path, size))
    return calls


class TestProtocol:
    def test_syscall_sequence(self, client, io):
        """mkdir, provider, generation, one 64-byte inblob write, generation, outblob,
        generation, rmdir: the recommended protocol, nothing more."""
        blob = client.report(RD)
        assert TdxQuote.from_bytes(blob).report_data == RD
        assert [(op, path) for op, path, _ in _calls(io)] == [
            ("mkdir", "E"), ("read", "E/provider"), ("read", "E/generation"),
            ("write", "E/inblob"), ("read", "E/generation"), ("read", "E/outblob"),
            ("read", "E/generation"), ("rmdir", "E"),
        ]
        assert [size for op, _, size in _calls(io) if op == "write"] == [64]

    def test_private_entries_removed(self, client, io, machine):
        """Each request makes its own ``dstack-agent-<pid>-<random>`` entry and removes it."""
        client.report(RD)
        client.report(RD)
        names = [Path(path).name for op, path, _ in io.calls if op == "mkdir"]
        assert len(set(names)) == 2
        assert all(name.startswith(f"{ENTRY_PREFIX}-{os.getpid()}-") for name in names)
        assert machine.entries() == []

    @pytest.mark.parametrize("size", [0, 63, 65])
    def test_report_data_must_be_64_bytes(self, client, io, size):
        """Anything but 64 bytes is InvalidRequest, naming the label, before any syscall."""
        expected = f"TEST report data must be exactly 64 bytes, got {size}"
        with pytest.raises(InvalidRequest, match=expected):
            client.report(bytes(size))
        assert io.calls == []

    def test_outblob_read_to_eof(self, client, machine):
        """An outblob over 8 KiB is returned whole."""
        machine.set_outblob_size(20_000)
        assert len(client.report(RD)) == 20_000

    def test_attributes_written_before_inblob(self, tmp_path):
        """Attributes are written in order before the inblob, and the generation must move by
        the number of writes (an SNP guest at VMPL 2 with privlevel)."""
        machine = FakeSnpMachine.create(tmp_path / "snp", vmpl=2)
        io = machine.io()
        provider = TsmProvider(name=b"sev_guest", label="TEST", blob="blob",
                               guest="a test guest", errnos={},
                               report_data_of=lambda blob, _path: None, shows_privlevel=True)
        client = TsmReportClient(io, machine.paths.report_dir, provider, commit_timeout=0.2)
        assert client.report(RD, attributes={"privlevel": b"2\n"})
        writes = [(path, size) for op, path, size in _calls(io) if op == "write"]
        assert writes == [("E/privlevel", 2), ("E/inblob", 64)]
        assert machine.entries() == []

    def test_attribute_the_provider_hides(self, client, io, machine):
        """Writing an attribute the entry does not have fails with its errno and path."""
        with pytest.raises(PlatformError, match=r"ENOENT writing .*/privlevel\)$"):
            client.report(RD, attributes={"privlevel": b"1\n"})
        assert machine.entries() == []

    def test_requests_serialised(self, machine):
        """Concurrent requests never have two report entries at once."""

        class Tracking(FakeKernelIO):
            active = 0
            most = 0
            lock = threading.Lock()

            def mkdir(self, path):
                super().mkdir(path)
                with self.lock:
                    type(self).active += 1
                    type(self).most = max(type(self).most, type(self).active)

            def rmdir(self, path):
                with self.lock:
                    type(self).active -= 1
                super().rmdir(path)

            def read(self, path):
                time.sleep(0.002)
                return super().read(path)

        client = _client(Tracking(machine.root))
        threads = [threading.Thread(target=client.report, args=(bytes([i]) * 64,))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert Tracking.most == 1 and machine.entries() == []


class TestGeneration:
    def test_dropped_commit_is_busy(self, client, machine):
        """A commit the kernel dropped (write() succeeded) is PlatformBusy, naming inblob."""
        machine.inject("commit", errno.EBUSY)
        with pytest.raises(PlatformBusy, match=r"^TEST blob failed: the kernel did not commit "
                           r"the report data within 0.2 s \(generation stayed at 0\).*/inblob\)$"):
            client.report(RD)
        assert machine.entries() == []

    def test_deferred_commit_is_polled(self, client, io, machine):
        """A commit that shows late is waited for."""
        machine.defer_commit(4)
        assert TdxQuote.from_bytes(client.report(RD)).report_data == RD
        assert sum(1 for _, path, _ in _calls(io) if path == "E/generation") >= 5

    @pytest.mark.parametrize("stage", ["inblob", "outblob"])
    def test_race_retries_with_a_fresh_entry(self, client, io, machine, stage):
        """A writer racing on the entry costs one retry with a new entry, not a wrong blob."""
        machine.race(stage)
        assert TdxQuote.from_bytes(client.report(RD)).report_data == RD
        assert sum(1 for op, _, _ in io.calls if op == "mkdir") == 2
        assert machine.entries() == []

    def test_persistent_race_is_busy(self, client, io, machine, caplog):
        """Racing on every attempt is PlatformBusy after RACE_ATTEMPTS entries, each logged."""
        machine.race("inblob", RACE_ATTEMPTS)
        with caplog.at_level(logging.WARNING, logger="dstack_core.tsm"):
            with pytest.raises(PlatformBusy, match=r"^TEST blob failed: another writer raced .* "
                               r"3 times in a row \(generation went from 0 to 2 over one "
                               r"inblob write\); retry later$"):
                client.report(RD)
        assert sum(1 for op, _, _ in io.calls if op == "mkdir") == RACE_ATTEMPTS
        assert caplog.text.count("raced, retrying") == RACE_ATTEMPTS
        assert machine.entries() == []

    def test_generation_not_a_number(self, machine):
        """A generation that does not parse is a PlatformError naming the file."""

        class Garbled(FakeKernelIO):
            def read(self, path):
                return b"many\n" if path.name == "generation" else super().read(path)

        with pytest.raises(PlatformError, match=r"generation holds b'many\\n', not a number$"):
            _client(Garbled(machine.root)).report(RD)
        assert machine.entries() == []


class TestOutblob:
    def test_empty_outblob_is_failure(self, client, machine):
        """An empty outblob is a failure, with the provider's hint and the path."""
        machine.empty_outblob()
        with pytest.raises(PlatformError, match=r"^TEST blob failed: the kernel returned an empty "
                           r"blob \(the test host failed; reading .*/outblob\)$"):
            client.report(RD)
        assert machine.entries() == []

    def test_empty_outblob_without_hint(self, io, machine):
        """Without a hint the message names only the path."""
        machine.empty_outblob()
        provider = TsmProvider(name=b"tdx_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=_report_data)
        with pytest.raises(PlatformError, match=r"empty blob \(reading .*/outblob\)$"):
            _client(io, provider).report(RD)

    def test_other_report_data_is_a_race(self, io, machine):
        """A blob over someone else's report data counts as a race, then PlatformBusy."""
        provider = TsmProvider(name=b"tdx_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=lambda blob, _path: bytes(64))
        with pytest.raises(PlatformBusy, match="the blob carries report data other than ours"):
            _client(io, provider).report(RD)
        assert sum(1 for op, _, _ in io.calls if op == "mkdir") == RACE_ATTEMPTS
        assert machine.entries() == []

    def test_unknown_format_is_not_checked(self, io):
        """report_data_of None (a format without known report data) returns the blob."""
        provider = TsmProvider(name=b"tdx_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=lambda blob, _path: None)
        assert _client(io, provider).report(RD)

    def test_malformed_blob_error_passes_through(self, io, machine):
        """A PlatformError from report_data_of reaches the caller; the entry is removed."""

        def malformed(blob: bytes, outblob: Path) -> bytes:
            raise PlatformError(f"malformed ({outblob.name})")

        provider = TsmProvider(name=b"tdx_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=malformed)
        with pytest.raises(PlatformError, match=r"^malformed \(outblob\)$"):
            _client(io, provider).report(RD)
        assert machine.entries() == []


class TestKernelErrors:
    def test_provider_table_first(self, client, machine):
        """The provider's own meaning of an errno wins, in the shared message shape."""
        machine.inject("outblob", errno.EBUSY)
        with pytest.raises(PlatformBusy) as caught:
            client.report(RD)
        message = caught.value.message
        assert message.startswith("TEST blob failed: the test service is busy (EBUSY reading ")
        assert message.endswith("/outblob)")

    def test_provider_overrides_shared_entry(self, client, machine):
        """A provider's EACCES replaces the shared one."""
        machine.inject("provider", errno.EACCES)
        with pytest.raises(PlatformError, match=r"the provider's own EACCES \(EACCES reading"):
            client.report(RD)

    def test_shared_table_fills_in(self, io, machine):
        """Errnos the provider does not list fall back to TSM_ERRNOS."""
        provider = TsmProvider(name=b"tdx_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=_report_data)
        machine.inject("provider", errno.EACCES)
        with pytest.raises(PlatformError, match=f"{PERMISSION_DENIED} \\(EACCES reading"):
            _client(io, provider).report(RD)
        assert TSM_ERRNOS[errno.EEXIST][0] is PlatformBusy

    def test_unlisted_errno_uses_strerror(self, client, machine):
        """An errno no table lists is a PlatformError with the kernel's strerror."""
        machine.inject("mkdir", errno.ENOSPC)
        with pytest.raises(PlatformError) as caught:
            client.report(RD)
        assert type(caught.value) is PlatformError
        message = caught.value.message
        assert message.startswith(f"TEST blob failed: {os.strerror(errno.ENOSPC)}")
        assert " (ENOSPC creating " in message

    def test_no_provider_registered(self, client, machine):
        """ENXIO on mkdir is mapped with the action "creating"."""
        machine.set_provider(None)
        with pytest.raises(PlatformError, match="ENXIO creating"):
            client.report(RD)

    def test_failed_rmdir_is_logged(self, client, io, machine, caplog):
        """A failed rmdir is logged; the blob is still returned."""
        machine.inject("rmdir", errno.EBUSY)
        with caplog.at_level(logging.WARNING, logger="dstack_core.tsm"):
            assert client.report(RD)
        assert "could not remove configfs-tsm report entry" in caplog.text
        machine.clear_faults()
        for name in machine.entries():
            io.rmdir(machine.paths.report_dir / name)

    def test_wrong_provider(self, client, machine):
        """An entry of another provider is refused, saying which."""
        machine.set_provider("sev_guest")
        with pytest.raises(PlatformError, match=r"^TEST blob failed: the configfs-tsm provider is "
                           r"'sev_guest', not 'tdx_guest': this is not a test guest$"):
            client.report(RD)
        assert machine.entries() == []


class TestProbe:
    def test_probe_hidden_privlevel(self, client, io, machine):
        """A provider without privlevel: the name only, no privlevel_floor lookup, no entry left."""
        assert client.probe() == ProviderProbe(provider=b"tdx_guest", privlevel_floor=None)
        assert [op for op, _, _ in io.calls] == ["mkdir", "read", "rmdir"]
        assert machine.entries() == []

    def test_probe_reports_any_provider(self, client, machine):
        """The probe reports another provider rather than refusing it."""
        machine.set_provider("sev_guest")
        assert client.probe().provider == b"sev_guest"

    def test_probe_raw_oserror(self, client, machine):
        """No provider: the probe raises the kernel's OSError (ENXIO) for the plugin to word."""
        machine.set_provider(None)
        with pytest.raises(OSError) as caught:
            client.probe()
        assert caught.value.errno == errno.ENXIO

    def test_probe_privlevel_floor(self, tmp_path):
        """A provider that shows privlevel: privlevel_floor is read (SNP at VMPL 1)."""
        machine = FakeSnpMachine.create(tmp_path / "snp", vmpl=1)
        provider = TsmProvider(name=b"sev_guest", label="TEST", blob="blob", guest="g",
                               errnos={}, report_data_of=lambda blob, _path: None,
                               shows_privlevel=True)
        client = TsmReportClient(machine.io(), machine.paths.report_dir, provider)
        assert client.probe() == ProviderProbe(provider=b"sev_guest", privlevel_floor=1)
        assert machine.entries() == []

    def test_entry_failure(self, tmp_path):
        """entry_failure names the directory, strerror and errno."""
        exc = OSError(errno.EACCES, "Permission denied")
        assert entry_failure(tmp_path, exc) == (
            f"cannot create a configfs-tsm report entry in {tmp_path}: Permission denied (EACCES)"
        )


class TestProvider:
    def test_failure_and_mismatch(self):
        """failure and mismatch are the message pieces both plugins share."""
        assert PROVIDER.failure == "TEST blob failed"
        assert PROVIDER.mismatch(b"sev_guest\xff") == (
            "the configfs-tsm provider is 'sev_guest\ufffd', not 'tdx_guest': "
            "this is not a test guest"
        )

    def test_name_required(self):
        """An empty provider name is refused."""
        with pytest.raises(ValueError):
            TsmProvider(name=b"", label="T", blob="b", guest="g", errnos={},
                        report_data_of=_report_data)
