"""The agent's life: socket handling, shutdown, restarts, crashes and durable state.

Everything runs ``dstack-agent`` as a real subprocess on a real Unix socket. The durability
classes share one simulated machine whose state dir goes through a chain of restarts
(clean, SIGKILL, ``--reset-state``, new app-compose); each stage is a module fixture that
records what the agent answered before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import dcap_qvl
import pytest
from dstack_simulator import SimulatorPlatform

from dstack_core import __version__
from dstack_core.config import MAX_SOCKET_PATH, Settings
from dstack_core.eventlog import RuntimeEventLog, TdxEvent, events_from_json, replay_rtmrs
from dstack_core.quote import TdxQuote
from dstack_core.testing import AgentProcess, short_tempdir, uds_request

from .conftest import Bundle, run_cli, trust_bundle_for

UPSTREAM_TEST_PATH_KEY = "b9fbb7171185c421c58610a2acba8ceae93623ae47815618cbad1e98fc042cb7"


def ok(answer: tuple[int, Any]) -> Any:
    status, body = answer
    assert status == 200, body
    return body


def verify_status(quote: bytes, bundle: Bundle) -> str:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(bundle.collateral_json)
    return dcap_qvl.verify_with_root_ca(quote, collateral, bundle.root_ca_der, int(time.time())).status


@attrs.frozen
class Observation:
    """What an agent answered to GetKey, Info and GetQuote at one moment."""

    key: str
    info: dict[str, Any]
    quote: bytes
    events: tuple[TdxEvent, ...]

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return TdxQuote.from_bytes(self.quote).report.rtmrs

    @property
    def runtime(self) -> list[tuple[str, bytes]]:
        """RTMR3 events as (name, payload), boot events included."""
        return [(e.event, e.event_payload) for e in self.events if e.imr == 3]

    def named(self, name: str) -> list[bytes]:
        return [payload for event, payload in self.runtime if event == name]


def observe(agent: AgentProcess) -> Observation:
    key = ok(agent.call("GetKey", {"path": "/durable", "purpose": "test"}))["key"]
    info = ok(agent.call("Info"))
    quote = ok(agent.call("GetQuote", {"report_data": "ab" * 32}))
    return Observation(
        key=key, info=info, quote=bytes.fromhex(quote["quote"]),
        events=events_from_json(quote["event_log"]),
    )


def emit(agent: AgentProcess, event: str, payload: bytes) -> None:
    ok(agent.call("EmitEvent", {"event": event, "payload": payload.hex()}))


def serve_cli(socket_path: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``serve`` on the simulator for a start-up expected to fail."""
    return run_cli("serve", "--platform", "simulator", "--socket", str(socket_path),
                   "--state-dir", str(state_dir), *args, check=False)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a clean start-up failure (exit 2, no traceback); return the error line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dstack-agent: error: ")
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir("lfc")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the machine that lives through restarts ---


@attrs.frozen
class GracefulRestart:
    first: Observation
    emitted: Observation
    exit_code: int
    socket_left: bool
    restarted: Observation


@attrs.frozen
class CrashRestart:
    acked: list[bytes]
    exit_code: int
    restarted: Observation


@attrs.frozen
class ResetRestart:
    bundle_before: Bundle
    bundle_after: Bundle
    reset: Observation
    restarted: Observation


@attrs.frozen
class ComposeChange:
    before: Observation
    compose: bytes
    rebooted: Observation


@pytest.fixture(scope="module")
def machine() -> Iterator[AgentProcess]:
    proc = AgentProcess("simulator")
    yield proc
    if proc.proc is not None:
        proc.stop()
    shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def graceful(machine: AgentProcess) -> GracefulRestart:
    machine.start()
    first = observe(machine)
    emit(machine, "deploy", b"v1")
    emit(machine, "deploy", b"v2")
    emitted = observe(machine)
    code = machine.stop()
    socket_left = machine.socket.exists()
    machine.start()
    return GracefulRestart(first, emitted, code, socket_left, observe(machine))


@pytest.fixture(scope="module")
def crash(machine: AgentProcess, graceful: GracefulRestart) -> CrashRestart:
    acked: list[bytes] = []

    def hammer() -> None:
        for i in range(10_000):
            payload = str(i).encode()
            try:
                status, _ = machine.call("EmitEvent", {"event": "load", "payload": payload.hex()})
            except (OSError, ValueError, IndexError):
                return  # the agent died under us
            if status != 200:
                return
            acked.append(payload)

    worker = threading.Thread(target=hammer)
    worker.start()
    deadline = time.monotonic() + 30
    while len(acked) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    code = machine.stop(signal.SIGKILL)
    worker.join(30)
    machine.start()
    return CrashRestart(list(acked), code, observe(machine))


@pytest.fixture(scope="module")
def reset(machine: AgentProcess, crash: CrashRestart) -> ResetRestart:
    before = trust_bundle_for(machine.state_dir)
    machine.stop()
    machine.extra_args = ["--reset-state"]
    machine.start()
    machine.extra_args = []
    after_reset = observe(machine)
    after = trust_bundle_for(machine.state_dir)
    machine.stop()
    machine.start()
    return ResetRestart(before, after, after_reset, observe(machine))


@pytest.fixture(scope="module")
def recompose(machine: AgentProcess, reset: ResetRestart) -> ComposeChange:
    emit(machine, "before-recompose", b"x")
    before = observe(machine)
    machine.stop()
    path = machine.state_dir / "app-compose.json"
    compose = json.loads(path.read_text())
    compose["name"] = "recomposed-app"
    path.write_text(json.dumps(compose))
    machine.start()
    return ComposeChange(before, path.read_bytes(), observe(machine))


class TestShutdown:
    """SIGTERM stops the agent with exit status 0 and removes its socket file."""

    def test_sigterm_exits_zero_and_unlinks_socket(self, graceful):
        """The clean stop before the restart exited 0 and left no socket behind."""
        assert graceful.exit_code == 0
        assert not graceful.socket_left

    def test_sigint_is_a_clean_stop_too(self, workdir):
        """SIGINT (Ctrl-C) is handled like SIGTERM."""
        proc = AgentProcess("simulator", workdir=workdir).start()
        assert proc.stop(signal.SIGINT) == 0
        assert not proc.socket.exists()


class TestRestart:
    """A clean restart continues the same app instance: keys, identity, RTMR3 and log."""

    def test_same_app_key(self, graceful):
        """GetKey answers the same key after the restart."""
        assert graceful.restarted.key == graceful.first.key

    def test_same_identity(self, graceful):
        """app_id, instance_id and compose_hash survive the restart."""
        for field in ("app_id", "instance_id", "compose_hash"):
            assert graceful.restarted.info[field] == graceful.first.info[field]

    def test_registers_survive(self, graceful):
        """MRTD/RTMR0..3 after the restart equal those before it, emitted events included."""
        assert graceful.emitted.rtmrs[3] != graceful.first.rtmrs[3]
        assert graceful.restarted.rtmrs == graceful.emitted.rtmrs

    def test_emitted_events_survive_and_replay(self, graceful):
        """The two events emitted before the restart are in the log, which replays to RTMR3."""
        assert graceful.restarted.named("deploy") == [b"v1", b"v2"]
        assert graceful.restarted.runtime == graceful.emitted.runtime
        assert replay_rtmrs(graceful.restarted.events) == graceful.restarted.rtmrs


class TestCrash:
    """SIGKILL while EmitEvents are in flight: the restarted agent continues consistently."""

    def test_killed(self, crash):
        """The agent really died by SIGKILL after acknowledging events."""
        assert crash.exit_code == -signal.SIGKILL
        assert len(crash.acked) >= 10

    def test_acknowledged_events_survive(self, crash):
        """Every acknowledged event is logged, in order; at most the in-flight one follows."""
        logged = crash.restarted.named("load")
        assert logged[: len(crash.acked)] == crash.acked
        assert len(logged) - len(crash.acked) in (0, 1)

    def test_log_replays_to_quote(self, crash, graceful):
        """After recovery the log (earlier events too) replays to the quote's registers."""
        assert crash.restarted.named("deploy") == [b"v1", b"v2"]
        assert replay_rtmrs(crash.restarted.events) == crash.restarted.rtmrs

    def test_same_keys_and_identity(self, crash, graceful):
        """Keys and instance_id survive the crash."""
        assert crash.restarted.key == graceful.first.key
        assert crash.restarted.info["instance_id"] == graceful.first.info["instance_id"]


class TestResetState:
    """--reset-state boots a fresh machine with new keys, under the same mock Intel root."""

    def test_new_keys(self, reset, graceful):
        """GetKey answers a different key after the reset."""
        assert reset.reset.key != graceful.first.key

    def test_fresh_event_log(self, reset):
        """Events emitted before the reset are gone; only the boot events remain."""
        assert reset.reset.named("deploy") == [] and reset.reset.named("load") == []
        assert [name for name, _ in reset.reset.runtime][-1] == "system-ready"
        assert replay_rtmrs(reset.reset.events) == reset.reset.rtmrs

    def test_new_instance(self, reset, graceful):
        """The instance id changes (a new machine) while the app id stays."""
        assert reset.reset.info["instance_id"] != graceful.first.info["instance_id"]
        assert reset.reset.info["app_id"] == graceful.first.info["app_id"]

    def test_same_trust_root(self, reset):
        """The trust bundle's root CA is unchanged and still verifies the new quotes."""
        assert reset.bundle_after == reset.bundle_before
        assert verify_status(reset.reset.quote, reset.bundle_before) == "UpToDate"

    def test_reset_happens_once(self, reset):
        """A later restart without the flag keeps the reset machine's keys and log."""
        assert reset.restarted.key == reset.reset.key
        assert reset.restarted.runtime == reset.reset.runtime


class TestComposeChange:
    """A changed app-compose file re-boots the simulated machine on the next start."""

    def test_new_compose_hash(self, recompose):
        """Info's compose_hash is the SHA-256 of the new file."""
        expected = hashlib.sha256(recompose.compose).hexdigest()
        assert recompose.rebooted.info["compose_hash"] == expected
        assert recompose.before.info["compose_hash"] != expected
        assert recompose.rebooted.info["app_name"] == "recomposed-app"

    def test_fresh_boot_log(self, recompose):
        """Events from before the change are gone; the boot events measure the new compose."""
        assert recompose.before.named("before-recompose") == [b"x"]
        assert recompose.rebooted.named("before-recompose") == []
        compose_hash = hashlib.sha256(recompose.compose).digest()
        assert recompose.rebooted.named("compose-hash") == [compose_hash]
        assert replay_rtmrs(recompose.rebooted.events) == recompose.rebooted.rtmrs

    def test_keys_unchanged(self, recompose):
        """The app keys are not a function of the compose file: GetKey is unchanged."""
        assert recompose.rebooted.key == recompose.before.key


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


class CrashingBootSimulator(SimulatorPlatform):
    """The simulator, dying as its boot events are extended (before or after RTMR3 moved)."""

    def __init__(self, after: bool) -> None:
        super().__init__()
        self.after = after

    def extend_rtmr_many(self, index: int, digests: tuple[bytes, ...]) -> None:
        if self.after:
            super().extend_rtmr_many(index=index, digests=digests)
        raise _Crash


class TestInterruptedBoot:
    """A crash during the simulated boot makes the next start boot again, completely."""

    @pytest.mark.parametrize("after", [False, True], ids=["before-extend", "after-extend"])
    def test_half_booted_machine_is_booted_again(self, workdir, after):
        """After dying mid-boot, the agent serves a full boot log that replays to RTMR3."""
        state = workdir / "state"
        config = Settings(platform="simulator", state_dir=state).platform_config()
        with pytest.raises(_Crash):
            CrashingBootSimulator(after).configure(config)
        half = RuntimeEventLog(config.runtime_log)
        assert half.read() == () and len(half.pending()) == 7
        proc = AgentProcess("simulator", workdir=workdir, state_dir=state).start()
        try:
            booted = observe(proc)
        finally:
            assert proc.stop() == 0
        assert [name for name, _ in booted.runtime] == [
            "system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done",
            "key-provider", "system-ready",
        ]
        assert booted.named("instance-id") == [bytes.fromhex(booted.info["instance_id"])]
        assert replay_rtmrs(booted.events) == booted.rtmrs


class TestSocketFile:
    """The socket path: default mode, stale sockets, refusals and the 107-byte limit."""

    def test_default_mode_0660(self, agent):
        """Without --socket-mode the socket file is mode 0660."""
        assert stat.S_ISSOCK(agent.socket.stat().st_mode)
        assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o660

    def test_stale_socket_is_replaced(self, workdir):
        """A socket file nobody listens on (a crashed agent's) is removed and rebound."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(workdir / "dstack.sock"))
        stale.close()
        assert stat.S_ISSOCK((workdir / "dstack.sock").lstat().st_mode)
        proc = AgentProcess("simulator", workdir=workdir).start()
        try:
            assert ok(proc.get("Version"))["version"] == __version__
        finally:
            assert proc.stop() == 0

    def test_regular_file_is_refused(self, workdir):
        """A regular file at the socket path: exit 2 and the file is untouched."""
        victim = workdir / "dstack.sock"
        victim.write_text("precious")
        line = error_line(serve_cli(victim, workdir / "state"))
        assert "exists and is not a socket" in line
        assert victim.read_text() == "precious"

    def test_second_agent_is_refused(self, agent):
        """A second agent on a live socket exits 2; the first keeps serving."""
        key = ok(agent.call("GetKey", {"path": "a", "purpose": "b"}))["key"]
        line = error_line(serve_cli(agent.socket, short_tempdir("second") / "state"))
        assert "already serving" in line
        assert ok(agent.call("GetKey", {"path": "a", "purpose": "b"}))["key"] == key

    def test_refused_second_agent_leaves_shared_state_alone(self, agent):
        """Refused on the live socket, a --reset-state agent on the same state dir wipes nothing."""
        files = {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.is_file()}
        result = serve_cli(agent.socket, agent.state_dir, "--reset-state")
        assert "already serving" in error_line(result)
        assert "resetting" not in result.stderr
        assert {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.is_file()} == files

    def test_shared_state_dir_is_refused(self, agent, workdir):
        """A second agent on another socket but the same state dir exits 2 and wipes nothing."""
        files = {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.is_file()}
        result = serve_cli(workdir / "other.sock", agent.state_dir, "--reset-state")
        assert "already using the state directory" in error_line(result)
        assert not (workdir / "other.sock").exists()
        assert {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.is_file()} == files

    def test_too_long_path_is_refused(self, workdir):
        """A socket path of 108 bytes is refused before anything starts, naming the limit."""
        path = workdir / ("s" * (MAX_SOCKET_PATH + 1 - len(os.fsencode(workdir)) - 1))
        assert len(os.fsencode(path)) == MAX_SOCKET_PATH + 1
        line = error_line(serve_cli(path, workdir / "state"))
        assert f"socket path is longer than {MAX_SOCKET_PATH} bytes" in line
        assert not path.exists() and not (workdir / "state").exists()

    def test_longest_path_serves(self, workdir):
        """A socket path of exactly 107 bytes works."""
        proc = AgentProcess("simulator", workdir=workdir)
        proc.socket = workdir / ("s" * (MAX_SOCKET_PATH - len(os.fsencode(workdir)) - 1))
        assert len(os.fsencode(proc.socket)) == MAX_SOCKET_PATH
        proc.start()
        assert proc.stop() == 0
        assert not proc.socket.exists()

    def test_unusable_socket_directory_is_refused(self, workdir):
        """A socket path below a regular file fails cleanly with exit 2."""
        (workdir / "file").write_text("")
        assert "cannot use socket path" in error_line(
            serve_cli(workdir / "file" / "dstack.sock", workdir / "state")
        )

    def test_unusable_state_dir_is_refused(self, workdir):
        """A state dir below a regular file fails cleanly with exit 2 and leaves no socket."""
        (workdir / "file").write_text("")
        line = error_line(serve_cli(workdir / "dstack.sock", workdir / "file" / "state"))
        assert "cannot use state directory" in line
        assert not (workdir / "dstack.sock").exists()


@pytest.fixture(scope="module")
def tcp_agent() -> Iterator[tuple[AgentProcess, int]]:
    """An agent with --socket-mode 0600 that also listens on a free TCP port."""
    port = free_port()
    proc = AgentProcess("simulator", extra_args=[
        "--socket-mode", "0600", "--listen", f"127.0.0.1:{port}",
    ]).start()
    yield proc, port
    proc.stop()
    shutil.rmtree(proc.workdir, ignore_errors=True)


class TestListenOptions:
    """--socket-mode sets the socket's permissions; --listen adds an HTTP TCP listener."""

    def test_socket_mode_honoured(self, tcp_agent):
        """--socket-mode 0600 gives a 0600 socket file."""
        proc, _ = tcp_agent
        assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o600

    def test_tcp_serves_the_same_api(self, tcp_agent):
        """GetKey over TCP answers what it answers over the Unix socket."""
        proc, port = tcp_agent
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/GetKey", method="POST",
            data=json.dumps({"path": "p", "purpose": "x"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            over_tcp = json.loads(response.read())
        assert over_tcp == ok(proc.call("GetKey", {"path": "p", "purpose": "x"}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/Version", timeout=10) as response:
            assert json.loads(response.read())["version"] == __version__

    def test_busy_port_fails_cleanly(self, tcp_agent, workdir):
        """A TCP address in use: exit 2 with one error line and the socket file removed."""
        _, port = tcp_agent
        result = serve_cli(workdir / "dstack.sock", workdir / "state",
                           "--listen", f"127.0.0.1:{port}")
        assert f"cannot listen on 127.0.0.1:{port}" in error_line(result)
        assert not (workdir / "dstack.sock").exists()

    @pytest.mark.parametrize(("flag", "value", "needle"), [
        ("--socket-mode", "rw", "socket mode must be octal"),
        ("--socket-mode", "1777", "out of range"),
        ("--listen", "localhost", "must be HOST:PORT"),
    ])
    def test_bad_values_fail_cleanly(self, workdir, flag, value, needle):
        """Invalid --socket-mode or --listen values: exit 2 before anything starts."""
        line = error_line(serve_cli(workdir / "dstack.sock", workdir / "state", flag, value))
        assert needle in line
        assert not (workdir / "state").exists()


class TestAppKeys:
    """--appkeys takes upstream's file; a corrupt one stops start-up cleanly."""

    def test_upstream_file_gives_known_key(self, upstream_agent):
        """With upstream's simulator appkeys, /test/path derives upstream's known key."""
        body = ok(upstream_agent.call("GetKey", {"path": "/test/path", "purpose": "test-purpose"}))
        assert body["key"] == UPSTREAM_TEST_PATH_KEY
        assert not (upstream_agent.state_dir / "appkeys.json").exists()

    @pytest.mark.parametrize("content", [b"{not json", b'{"k256_key": "00"}', b"[]", b""])
    def test_corrupt_appkeys_flag_fails_cleanly(self, workdir, content):
        """A corrupt --appkeys file: exit 2, one error line, no socket."""
        appkeys = workdir / "appkeys.json"
        appkeys.write_bytes(content)
        line = error_line(serve_cli(workdir / "dstack.sock", workdir / "state",
                                    "--appkeys", str(appkeys)))
        assert f"{appkeys}: invalid appkeys.json" in line
        assert not (workdir / "dstack.sock").exists()

    def test_missing_appkeys_flag_fails_cleanly(self, workdir):
        """A nonexistent --appkeys file: exit 2 naming it."""
        missing = workdir / "nope.json"
        line = error_line(serve_cli(workdir / "dstack.sock", workdir / "state",
                                    "--appkeys", str(missing)))
        assert str(missing) in line

    def test_generated_appkeys_are_private(self, agent):
        """Without --appkeys the simulator generates appkeys.json with mode 0600."""
        assert stat.S_IMODE((agent.state_dir / "appkeys.json").stat().st_mode) == 0o600

    def test_corrupt_generated_appkeys_fails_cleanly(self, workdir):
        """A corrupt appkeys.json in the state dir is not silently regenerated: exit 2."""
        state = workdir / "state"
        state.mkdir()
        (state / "appkeys.json").write_text("garbage")
        assert f"{state / 'appkeys.json'}: invalid appkeys.json" in error_line(
            serve_cli(workdir / "dstack.sock", state)
        )
        assert (state / "appkeys.json").read_text() == "garbage"


class TestTrustBundle:
    """`simulator trust-bundle` works before any agent ran and while one serves."""

    def test_bundle_before_first_run_verifies_later_quotes(self, workdir):
        """A bundle written for a new state dir verifies the quotes of the agent started later."""
        state = workdir / "state"
        out = workdir / "bundle"
        result = run_cli("simulator", "trust-bundle", "--state-dir", str(state), "--out", str(out))
        assert "root_ca.pem" in result.stdout
        assert (out / "root_ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        json.loads((out / "collateral.json").read_text())
        early = trust_bundle_for(state)
        proc = AgentProcess("simulator", workdir=workdir, state_dir=state).start()
        try:
            quote = bytes.fromhex(ok(proc.call("GetQuote", {"report_data": "00"}))["quote"])
            assert verify_status(quote, early) == "UpToDate"
            assert trust_bundle_for(state) == early
        finally:
            assert proc.stop() == 0

    def test_bundle_while_serving(self, agent):
        """While an agent serves, the bundle for its state dir verifies its quotes."""
        bundle = trust_bundle_for(agent.state_dir)
        quote = bytes.fromhex(ok(agent.call("GetQuote", {"report_data": "01"}))["quote"])
        assert verify_status(quote, bundle) == "UpToDate"

    def test_unwritable_out_fails_cleanly(self, workdir):
        """--out naming a regular file: exit 2 with one error line."""
        (workdir / "out").write_text("")
        result = run_cli("simulator", "trust-bundle", "--state-dir", str(workdir / "state"),
                         "--out", str(workdir / "out"), check=False)
        assert "cannot write the trust bundle" in error_line(result)

    def test_unusable_state_dir_fails_cleanly(self, workdir):
        """--state-dir below a regular file: exit 2 with one error line, no traceback."""
        (workdir / "file").write_text("")
        result = run_cli("simulator", "trust-bundle", "--state-dir", str(workdir / "file" / "s"),
                         "--out", str(workdir / "out"), check=False)
        assert "cannot use state dir" in error_line(result)
        assert len(result.stderr.strip().splitlines()) == 1

    def test_other_state_dir_does_not_verify(self, agent, workdir):
        """Another state dir's mock root does not verify this agent's quotes."""
        other = trust_bundle_for(workdir / "other")
        quote = bytes.fromhex(ok(agent.call("GetQuote", {"report_data": "02"}))["quote"])
        with pytest.raises(ValueError, match="Failed to verify certificate chain"):
            verify_status(quote, other)


class TestCommandLine:
    """Every command and subcommand has --help; --version prints the version."""

    @pytest.mark.parametrize("command", [
        [], ["serve"], ["platforms"], ["simulator"], ["simulator", "trust-bundle"],
    ])
    def test_help(self, command):
        """--help exits 0 with a usage line naming the command."""
        result = run_cli(*command, "--help")
        assert result.stdout.startswith(f"usage: {' '.join(['dstack-agent', *command])}")

    def test_version(self):
        """--version prints 'dstack-agent VERSION'."""
        assert run_cli("--version").stdout.strip() == f"dstack-agent {__version__}"

    @pytest.mark.parametrize("command", [[], ["simulator"], ["serve", "--bogus"]])
    def test_usage_errors_exit_2(self, command):
        """A missing subcommand or an unknown flag is a usage error (exit 2)."""
        result = run_cli(*command, check=False)
        assert result.returncode == 2
        assert "usage:" in result.stderr and "Traceback" not in result.stderr


class TestRawSocket:
    """The socket speaks plain HTTP/1.1 to any client."""

    def test_uds_request_version(self, agent):
        """A raw GET /Version over the socket answers JSON with a Content-Length."""
        status, headers, body = uds_request(agent.socket, "GET", "/Version")
        assert status == 200 and int(headers["content-length"]) == len(body)
        assert json.loads(body)["version"] == __version__
