"""Platform selection and plugin loading: explicit, exactly one, failing closed.

Broken plugins are real distributions (a ``dist-info`` with ``entry_points.txt`` and a
module) written to a temporary directory and put on the agent's ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import pluggy
import pytest

from dstack_core import PlatformError, PlatformInfo, PluginError, hookimpl, hookspecs
from dstack_core.hookspecs import REQUIRED_HOOKS
from dstack_core.platform import Platform
from dstack_core.plugins import ENTRY_POINT_GROUP, installed_platforms, load_platform
from dstack_core.testing import AgentProcess, short_tempdir, uds_request
from dstack_core.testing.logscan import Needles, record_output, scan_text, secrets_of_key_file

from .conftest import UPSTREAM_APPKEYS

BROKEN_IMPORT = """\
raise ImportError("libtdx_attest.so.1: cannot open shared object file")
"""

INCOMPLETE = """\
from dstack_core import hookimpl


class IncompletePlatform:
    @hookimpl
    def platform_info(self):
        raise AssertionError("never called: the plugin is rejected first")
"""

MISSPELLED_HOOK = """\
from dstack_core import hookimpl
from dstack_simulator import SimulatorPlatform


class MisspelledPlatform(SimulatorPlatform):
    @hookimpl
    def get_qoute(self, report_data):
        raise AssertionError("never called")
"""

BAD_QUOTE = """\
from dstack_core import hookimpl
from dstack_simulator import SimulatorPlatform


class BadQuotePlatform(SimulatorPlatform):
    @hookimpl
    def get_quote(self, report_data):
        return {"quote": report_data.hex()}
"""


DRIVER_MESSAGE = "TDX_CMD_GET_QUOTE on /dev/tdx_guest failed: attestation token 5ec2e7"

RAISING_QUOTE = f"""\
from dstack_core import hookimpl
from dstack_simulator import SimulatorPlatform


class RaisingPlatform(SimulatorPlatform):
    @hookimpl
    def get_quote(self, report_data):
        raise RuntimeError({DRIVER_MESSAGE!r})
"""

# derive_root_key breaking its contract with the real root key in the wrong type.
LEAKY_ROOT = """\
import os

from dstack_core import hookimpl
from dstack_simulator import SimulatorPlatform


class LeakyRootPlatform(SimulatorPlatform):
    @hookimpl
    def derive_root_key(self):
        key = super().derive_root_key().k256_key
        return {
            "dict": {"k256_key": key},
            "bytes": key,
            "hex": key.hex(),
            "list": [key, b""],
        }[os.environ["LEAKY_ROOT_SHAPE"]]
"""


def fake_distribution(
    root: Path, name: str, entry_points: Mapping[str, str], modules: Mapping[str, str],
    *, group: str = ENTRY_POINT_GROUP,
) -> None:
    """Write an installed-looking distribution ``name`` 0.1 with ``modules`` into ``root``,
    registering ``entry_points`` in ``group`` (platforms unless told)."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = [f"[{group}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


@attrs.frozen
class FakePlugins:
    zoo: Path
    """Broken, incomplete, misspelled and wrong-typed plugins, each under its own name."""
    duplicate: Path
    """A second distribution that also registers ``simulator``."""


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> FakePlugins:
    zoo = tmp_path_factory.mktemp("zoo")
    fake_distribution(zoo, "fake-broken", {"broken": "fake_broken:Platform"},
                      {"fake_broken": BROKEN_IMPORT})
    fake_distribution(zoo, "fake-incomplete", {"incomplete": "fake_incomplete:IncompletePlatform"},
                      {"fake_incomplete": INCOMPLETE})
    fake_distribution(zoo, "fake-misspelled", {"misspelled": "fake_misspelled:MisspelledPlatform"},
                      {"fake_misspelled": MISSPELLED_HOOK})
    fake_distribution(zoo, "fake-badquote", {"badquote": "fake_badquote:BadQuotePlatform"},
                      {"fake_badquote": BAD_QUOTE})
    fake_distribution(zoo, "fake-raising", {"raising": "fake_raising:RaisingPlatform"},
                      {"fake_raising": RAISING_QUOTE})
    fake_distribution(zoo, "fake-leakyroot", {"leakyroot": "fake_leakyroot:LeakyRootPlatform"},
                      {"fake_leakyroot": LEAKY_ROOT})
    duplicate = tmp_path_factory.mktemp("dup")
    fake_distribution(duplicate, "fake-dup", {"simulator": "fake_dup:Platform"},
                      {"fake_dup": "class Platform:\n    pass\n"})
    return FakePlugins(zoo=zoo, duplicate=duplicate)


def pythonpath(*dirs: Path) -> dict[str, str]:
    """Environment putting ``dirs`` first on the subprocess's ``sys.path``."""
    existing = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {"PYTHONPATH": os.pathsep.join([*map(str, dirs), *existing])}


def agent_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dstack-agent ARGS`` with extra environment; never raises on failure."""
    full_env = {k: v for k, v in os.environ.items() if k != "DSTACK_PLATFORM"}
    result = subprocess.run(
        [sys.executable, "-m", "dstack_core.cli", *args],
        capture_output=True, text=True, timeout=60, env={**full_env, **(env or {})},
        check=False,
    )
    record_output("agent-cli", result.stderr)
    return result


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir("plg")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(workdir: Path, *args: str, env: Mapping[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """``serve`` on ``workdir``'s socket and state dir; for start-ups expected to fail."""
    return agent_cli("serve", "--socket", str(workdir / "dstack.sock"),
                     "--state-dir", str(workdir / "state"), *args, env=env)


def assert_clean_failure(result: subprocess.CompletedProcess[str], workdir: Path) -> str:
    """Exit 2, one error line on stderr, no traceback, nothing left behind; returns the line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dstack-agent: error: ")
    assert not (workdir / "dstack.sock").exists()
    assert not (workdir / "state").exists()
    return lines[0]


def serves(proc: AgentProcess) -> None:
    """Start ``proc``, check it answers, stop it cleanly and remove its files."""
    try:
        proc.start()
        status, body = proc.get("Version")
        assert status == 200 and body["version"]
        assert proc.stop() == 0
    finally:
        if proc.proc is not None:
            proc.stop()
        shutil.rmtree(proc.workdir, ignore_errors=True)


class TestExplicitSelection:
    """serve never picks a platform by itself: no name, or an unknown one, stops start-up."""

    def test_no_platform_fails_closed(self, workdir):
        """Without --platform, env or config: exit 2 naming the installed platforms."""
        line = assert_clean_failure(serve(workdir), workdir)
        assert "no platform selected" in line
        assert "simulator (dstack_simulator:SimulatorPlatform" in line

    def test_unknown_platform_fails_closed(self, workdir):
        """An unknown name: exit 2, the name and the installed platforms in one line."""
        line = assert_clean_failure(serve(workdir, "--platform", "sgx"), workdir)
        assert "unknown platform 'sgx'" in line
        assert "simulator" in line

    def test_empty_env_is_no_selection(self, workdir):
        """An empty DSTACK_PLATFORM selects nothing (it is not a wildcard)."""
        line = assert_clean_failure(serve(workdir, env={"DSTACK_PLATFORM": ""}), workdir)
        assert "no platform selected" in line


class TestSelectionSources:
    """The platform comes from --platform, else DSTACK_PLATFORM, else the config file."""

    def test_env_selects(self):
        """DSTACK_PLATFORM=simulator alone selects the simulator."""
        serves(AgentProcess(None, env={"DSTACK_PLATFORM": "simulator"}))

    @pytest.mark.parametrize(("filename", "text"), [
        ("agent.toml", 'platform = "simulator"\nsocket_mode = "0640"\n'),
        ("agent.json", '{"platform": "simulator", "socket_mode": "0640"}'),
    ])
    def test_config_file_selects(self, filename, text):
        """A TOML or JSON config file's platform selects it (and its other keys apply)."""
        proc = AgentProcess(None)
        (proc.workdir / filename).write_text(text)
        proc.extra_args = ["--config", str(proc.workdir / filename)]
        try:
            proc.start()
            assert proc.socket.stat().st_mode & 0o777 == 0o640
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)

    def test_flag_beats_env_and_config(self, workdir):
        """--platform wins over DSTACK_PLATFORM and the config file."""
        config = workdir / "agent.toml"
        config.write_text('platform = "from-config"\n')
        result = serve(workdir, "--platform", "from-flag", "--config", str(config),
                       env={"DSTACK_PLATFORM": "from-env"})
        config.unlink()
        assert "unknown platform 'from-flag'" in assert_clean_failure(result, workdir)

    def test_env_beats_config(self, workdir):
        """DSTACK_PLATFORM wins over the config file."""
        config = workdir / "agent.json"
        config.write_text('{"platform": "from-config"}')
        result = serve(workdir, "--config", str(config), env={"DSTACK_PLATFORM": "from-env"})
        config.unlink()
        assert "unknown platform 'from-env'" in assert_clean_failure(result, workdir)

    def test_flag_over_env_serves(self):
        """A good --platform serves even though DSTACK_PLATFORM names an unknown platform."""
        serves(AgentProcess("simulator", env={"DSTACK_PLATFORM": "nope"}))

    @pytest.mark.parametrize(("filename", "text", "needle"), [
        ("bad.toml", "platform = simulator\n", "is not valid"),
        ("bad.json", '{"platform": "simulator", "sokcet": "/tmp/x"}', "unknown keys"),
        ("bad.json", '["simulator"]', "must hold a table"),
        ("missing.toml", None, "cannot read config file"),
        ("bad.toml", 'platform = "simulator"\nreset_state = "false"\n', "reset_state has the wrong type"),
        ("bad.json", '{"platform": "simulator", "state_dir": 5}', "state_dir has the wrong type"),
        ("bad.toml", "platform_options = { quote_version = 5 }\n", "values must be strings"),
    ])
    def test_bad_config_file_fails_closed(self, workdir, filename, text, needle):
        """An invalid, unreadable, unknown-keyed or wrongly typed config file: exit 2."""
        config = workdir / filename
        if text is not None:
            config.write_text(text)
        result = serve(workdir, "--platform", "simulator", "--config", str(config))
        config.unlink(missing_ok=True)
        assert needle in assert_clean_failure(result, workdir)


class TestBrokenPlugins:
    """A plugin that fails to import, conflicts or is incomplete stops start-up by name."""

    def test_import_error_names_plugin_and_error(self, workdir, fakes):
        """An ImportError in the plugin's module is a start-up error, not a skipped plugin."""
        result = serve(workdir, "--platform", "broken", env=pythonpath(fakes.zoo))
        line = assert_clean_failure(result, workdir)
        assert "broken (fake_broken:Platform, from fake-broken 0.1) failed to import" in line
        assert "ImportError: libtdx_attest.so.1: cannot open shared object file" in line

    def test_conflicting_distributions_are_named(self, workdir, fakes):
        """Two distributions registering 'simulator': both named, neither chosen."""
        result = serve(workdir, "--platform", "simulator", env=pythonpath(fakes.duplicate))
        line = assert_clean_failure(result, workdir)
        assert "conflicting plugins for platform 'simulator', provided by:" in line
        assert "from dstack-simulator 0.1.0" in line
        assert "fake_dup:Platform, from fake-dup 0.1" in line

    def test_missing_hooks_are_listed(self, workdir, fakes):
        """A plugin lacking required hooks is rejected with every missing hook named."""
        result = serve(workdir, "--platform", "incomplete", env=pythonpath(fakes.zoo))
        line = assert_clean_failure(result, workdir)
        assert "does not implement required hooks: " in line
        missing = line.split("required hooks: ")[1].split(", ")
        assert missing == [h for h in REQUIRED_HOOKS if h != "platform_info"]

    def test_unknown_hook_is_rejected(self, workdir, fakes):
        """A hook implementation with no spec (a typo) is a start-up error naming it."""
        result = serve(workdir, "--platform", "misspelled", env=pythonpath(fakes.zoo))
        line = assert_clean_failure(result, workdir)
        assert "misspelled" in line and "is invalid" in line and "get_qoute" in line

    def test_wrong_result_type_is_a_500_and_agent_keeps_serving(self, fakes):
        """get_quote returning a dict: GetQuote answers 500 platform_contract_violation."""
        proc = AgentProcess("badquote", env=pythonpath(fakes.zoo))
        try:
            proc.start()
            status, body = proc.call("GetQuote", {"report_data": "00"})
            assert status == 500
            assert body["code"] == "platform_contract_violation"
            assert "get_quote returned dict, expected Quote" in body["error"]
            assert proc.call("GetKey", {"path": "p", "purpose": "x"})[0] == 200
            assert proc.call("GetQuote", {"report_data": "01"})[0] == 500
            assert proc.get("Version")[0] == 200
            assert proc.stop() == 0
            # Described by type and size: a wrong-typed result may be key material.
            assert "platform hook get_quote returned a dict of length 1, expected Quote" in (
                proc.output()
            )
            assert "'quote'" not in proc.output()
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)


class TestForeignExceptions:
    """A plugin's own exceptions and broken results: generic bodies, no secret in any log."""

    def test_exception_text_stays_in_the_log(self, fakes):
        """A RuntimeError from get_quote is a generic 500; its text is only in the log."""
        proc = AgentProcess("raising", env=pythonpath(fakes.zoo))
        try:
            proc.start()
            status, _, raw = uds_request(proc.socket, "POST", "/GetQuote", b'{"report_data":"00"}')
            assert status == 500
            assert json.loads(raw) == {"error": "platform hook get_quote failed",
                                       "code": "platform_error"}
            for fragment in ("/dev/", "5ec2e7", "RuntimeError", "TDX_CMD"):
                assert fragment.encode() not in raw
            assert proc.get("Version")[0] == 200
            assert proc.stop() == 0
            assert DRIVER_MESSAGE in proc.output()  # for the operator, with the traceback
            assert "Traceback" in proc.output()
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)

    @pytest.mark.parametrize("shape", ["dict", "bytes", "hex", "list"])
    def test_root_key_contract_violation_logs_no_key(self, fakes, shape):
        """derive_root_key returning the key in a wrong type stops start-up without logging
        the key in any form (the kit registered it: the session's scan checks too)."""
        proc = AgentProcess("leakyroot", extra_args=["--appkeys", str(UPSTREAM_APPKEYS)],
                            env={**pythonpath(fakes.zoo), "LEAKY_ROOT_SHAPE": shape})
        try:
            proc.start(wait=False)
            assert proc.proc is not None and proc.proc.wait(30) == 2
            output = proc.output()
            assert "platform hook derive_root_key returned a " in output
            assert "expected RootKey" in output
            secrets = dict(secrets_of_key_file(UPSTREAM_APPKEYS))
            assert scan_text(output, Needles.of({v: k for k, v in secrets.items()})) == []
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)

    def test_facade_wraps_without_text(self, caplog):
        """In-process: the façade's PlatformError carries no exception text but chains it."""

        class Exploding:
            @hookimpl
            def platform_info(self):
                return PlatformInfo(name="exploding", tag="x", evidence_format="tdx",
                                    simulated=True)

            @hookimpl
            def get_quote(self, report_data):
                raise OSError(13, "Permission denied", "/secret/path/key.pem")

        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        pm.register(Exploding())
        platform = Platform.from_plugin_manager(pm)
        with caplog.at_level(logging.ERROR), pytest.raises(PlatformError) as raised:
            asyncio.run(platform.get_quote(bytes(64)))
        assert raised.value.to_json() == {"error": "platform hook get_quote failed",
                                          "code": "platform_error"}
        assert isinstance(raised.value.__cause__, OSError)
        assert "/secret/path/key.pem" in caplog.text


class DebugAgent(AgentProcess):
    """An agent started with the top-level ``--debug`` flag."""

    @property
    def command(self) -> list[str]:
        cmd = super().command
        return [*cmd[:3], "--debug", *cmd[3:]]


class TestTracing:
    """DSTACK_TRACE_PLUGINS=1 traces hook calls without changing behaviour."""

    def test_traced_agent_serves_and_logs_hook_calls(self):
        """With tracing on, quotes and events work and --debug shows the pluggy trace."""
        proc = DebugAgent("simulator", env={"DSTACK_TRACE_PLUGINS": "1"})
        try:
            proc.start()
            assert proc.call("GetQuote", {"report_data": "00"})[0] == 200
            assert proc.call("EmitEvent", {"event": "e", "payload": "00"})[0] == 200
            assert proc.stop() == 0
            log = proc.output()
            assert "pluggy:" in log and "get_quote" in log and "extend_rtmr" in log
        finally:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)


class TestPlatformsCommand:
    """`dstack-agent platforms` lists entry points without importing them."""

    def test_lists_simulator(self):
        """The plain listing shows the simulator and its distribution."""
        result = agent_cli("platforms")
        assert result.returncode == 0, result.stderr
        (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("simulator ")]
        assert "dstack_simulator:SimulatorPlatform" in line and "dstack-simulator" in line

    def test_json_lists_simulator(self):
        """--json is a list of {name, value, distribution}."""
        result = agent_cli("platforms", "--json")
        assert result.returncode == 0, result.stderr
        assert {"name": "simulator", "value": "dstack_simulator:SimulatorPlatform",
                "distribution": "dstack-simulator 0.1.0"} in json.loads(result.stdout)

    def test_lists_fake_plugins_without_importing(self, fakes):
        """Plugins on PYTHONPATH are listed, even one whose module cannot be imported."""
        result = agent_cli("platforms", "--json", env=pythonpath(fakes.zoo, fakes.duplicate))
        assert result.returncode == 0, result.stderr
        listed = {(p["name"], p["distribution"]) for p in json.loads(result.stdout)}
        assert {("broken", "fake-broken 0.1"), ("incomplete", "fake-incomplete 0.1"),
                ("badquote", "fake-badquote 0.1"), ("simulator", "fake-dup 0.1"),
                ("simulator", "dstack-simulator 0.1.0")} <= listed
        plain = agent_cli("platforms", env=pythonpath(fakes.zoo))
        assert "fake_broken:Platform" in plain.stdout


class TestLoadPlatform:
    """load_platform in-process: one plugin manager with exactly the selected plugin."""

    def test_loads_simulator(self):
        """The simulator loads, registered under its name, answering every required hook."""
        pm = load_platform("simulator")
        assert [name for name, _ in pm.list_name_plugin()] == ["simulator"]
        for hook in REQUIRED_HOOKS:
            assert len(getattr(pm.hook, hook).get_hookimpls()) == 1

    def test_each_call_is_a_fresh_manager(self):
        """No global manager: two loads give two managers and two plugin instances."""
        first, second = load_platform("simulator"), load_platform("simulator")
        assert first is not second
        assert first.get_plugin("simulator") is not second.get_plugin("simulator")

    @pytest.mark.parametrize("name", [None, ""])
    def test_no_name_raises(self, name):
        """No name is a PluginError naming what is installed."""
        with pytest.raises(PluginError, match=r"no platform selected.*simulator"):
            load_platform(name)

    def test_installed_platforms_sees_fakes(self, fakes, monkeypatch):
        """installed_platforms lists new distributions on sys.path, sorted, unimported."""
        monkeypatch.syspath_prepend(str(fakes.zoo))
        names = [p.name for p in installed_platforms()]
        assert names == sorted(names)
        assert {"broken", "incomplete", "misspelled", "badquote", "simulator"} <= set(names)
        assert "fake_broken" not in sys.modules

    def test_import_error_chains_the_cause(self, fakes, monkeypatch):
        """The import failure is the PluginError's __cause__."""
        monkeypatch.syspath_prepend(str(fakes.zoo))
        with pytest.raises(PluginError, match="failed to import") as info:
            load_platform("broken")
        assert isinstance(info.value.__cause__, ImportError)

    def test_conflict_raises(self, fakes, monkeypatch):
        """Two providers of one name raise, whichever comes first on sys.path."""
        monkeypatch.syspath_prepend(str(fakes.duplicate))
        with pytest.raises(PluginError, match=r"conflicting plugins .* provided by: "):
            load_platform("simulator")

    def test_incomplete_raises(self, fakes, monkeypatch):
        """A plugin missing hooks raises with them listed in spec order."""
        monkeypatch.syspath_prepend(str(fakes.zoo))
        with pytest.raises(PluginError, match="derive_root_key, get_quote, attest"):
            load_platform("incomplete")

    def test_tracing_env_enables_pluggy_trace(self, monkeypatch, caplog):
        """DSTACK_TRACE_PLUGINS=1 routes pluggy's hook trace to the debug log."""
        monkeypatch.setenv("DSTACK_TRACE_PLUGINS", "1")
        pm = load_platform("simulator")
        with caplog.at_level("DEBUG", logger="dstack_core.plugins"):
            pm.hook.platform_info()
        assert any("platform_info" in r.getMessage() for r in caplog.records)

