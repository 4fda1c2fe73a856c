"""pytest plugin: fixtures for testing a dstack-core platform plugin.

Registered through the ``pytest11`` entry point ``dstack_core``, so it is active in every
pytest run of an environment where dstack-core is installed (``-p no:dstack_core`` turns it
off). It adds three command-line options and one ini option:

* ``--dstack-platform NAME`` (ini ``dstack_platform``): the platform under test, as it is
  registered in the ``dstack_core.platforms`` entry-point group. There is no default: a
  fixture that needs a platform fails with a message naming the option.
* ``--dstack-platform-option KEY=VALUE`` (repeatable): platform options, exactly as
  ``dstack-agent serve --platform-option`` takes them.
* ``--dstack-agent-policy FILE``: run :func:`dstack_agent` under this caller policy, with
  an audit log whose chain is verified after each test.

A plugin author runs the conformance suite against an installed plugin by naming it::

    pytest --dstack-platform myplat --pyargs dstack_core.testing.conformance

Fixtures (all function-scoped except the name, so any of them can be overridden in a
``conftest.py`` at any scope):

* :func:`dstack_platform_name`: the platform's name.
* :func:`dstack_platform_env`: a :class:`PlatformEnv`, the prepared environment (fake
  hardware, input files, environment variables, trust anchors), per test: what a platform
  package's :func:`~dstack_core.testing.pytest_hooks.pytest_dstack_platform_env` hook
  answers (the kit answers for a fake tree named by ``root=DIR`` and ``sysio=fake``), else
  empty.
* :func:`dstack_platform_options`: the ``options`` mapping of the platform's config.
* :func:`dstack_platform_config`: a :class:`~dstack_core.types.PlatformConfig` on a fresh
  temporary state directory.
* :func:`dstack_plugin_manager`: the plugin manager :func:`~dstack_core.plugins.load_platform`
  returns for the platform (with :attr:`PlatformEnv.env` applied to ``os.environ``).
* :func:`dstack_platform_info`: the platform's :class:`~dstack_core.types.PlatformInfo`,
  without configuring it.
* :func:`dstack_platform`: the configured :class:`~dstack_core.platform.Platform` façade,
  closed after the test.
* :func:`dstack_agent_policy`: the caller policy file :func:`dstack_agent` runs under, or
  None (``--dstack-agent-policy``; :func:`conformance_policy` writes one that suffices).
* :func:`dstack_agent`: a running ``dstack-agent serve`` subprocess for the platform on a
  temporary Unix socket (a :class:`PlatformAgent`), stopped after the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import pluggy
import pytest

from ..audit import verify_audit_log
from ..inputs import app_compose_document, sys_config_document
from ..platform import Platform
from ..plugins import load_platform
from ..types import PlatformConfig, PlatformInfo, TrustBundle
from .agent import TEMP_BASE_ENV, AgentProcess, short_tempdir

__all__ = [
    "DEFAULT_APP_COMPOSE",
    "DEFAULT_SYS_CONFIG",
    "PlatformAgent",
    "PlatformEnv",
    "configured_platform",
    "conformance_policy",
    "dstack_agent",
    "dstack_agent_policy",
    "dstack_platform",
    "dstack_platform_config",
    "dstack_platform_env",
    "dstack_platform_info",
    "dstack_platform_name",
    "dstack_platform_options",
    "dstack_plugin_manager",
]

_SESSION_TEMP: Final = pytest.StashKey[str]()
PLATFORM_OPTION: Final = "--dstack-platform"
PLATFORM_INI: Final = "dstack_platform"
OPTION_OPTION: Final = "--dstack-platform-option"
POLICY_OPTION: Final = "--dstack-agent-policy"

CONFORMANCE_METHODS: Final = ("Version", "Info", "GetQuote", "Attest", "EmitEvent", "GetKey")
"""The methods the conformance suite's agent tests call."""
CONFORMANCE_KEY_PATHS: Final = ("conformance/",)
"""The key path prefixes under which they derive keys."""

# The suite is imported by test modules that re-export it; rewrite its asserts there too.
pytest.register_assert_rewrite("dstack_core.testing.conformance")

DEFAULT_APP_COMPOSE: Final[Mapping[str, Any]] = app_compose_document("dstack-conformance-app")
"""The app-compose the kit writes when :attr:`PlatformEnv.app_compose` is not set."""

DEFAULT_SYS_CONFIG: Final[Mapping[str, Any]] = sys_config_document(os_image_hash="00" * 32)
"""The sys-config the kit writes when :attr:`PlatformEnv.sys_config` is not set."""


def _str_mapping(value: Mapping[str, str]) -> dict[str, str]:
    out = dict(value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
        raise TypeError("PlatformEnv env and options must map str to str")
    return out


def _optional_path(value: Path | str | None) -> Path | None:
    return None if value is None else Path(value)


@attrs.frozen(kw_only=True)
class PlatformEnv:
    """The prepared environment a platform runs in under test.

    What :func:`dstack_platform_env` returns. The default is empty, which suits platforms
    that need nothing but a state directory (the simulator). A platform on fake hardware
    returns the fake's settings, and every fixture (the in-process façade and the agent
    subprocess alike) then runs on that fake.

    :ivar env: environment variables for the plugin: set with ``monkeypatch`` around the
        in-process plugin manager, and passed to the agent subprocess. Plugins should read
        them in ``configure``, not at import time (a module is imported once per process).
    :ivar options: platform options (``--platform-option``); :func:`dstack_platform_options`
        starts from these.
    :ivar appkeys: an upstream ``appkeys.json`` to hand to the platform, or None.
    :ivar app_compose: the app-compose file; None writes :data:`DEFAULT_APP_COMPOSE` to a
        temporary file.
    :ivar sys_config: the sys-config file; None writes :data:`DEFAULT_SYS_CONFIG`.
    :ivar runtime_log: the runtime (RTMR3) event log; None puts it in the state directory.
        Set it when the fake hardware's RTMR3 already carries boot events from a log it wrote.
    :ivar trust_bundle: the anchors that verify the platform's quotes in tests (fake
        hardware signed by a mock PKI). None when the platform publishes its own (the
        ``trust_bundle`` hook) or its quotes need real collateral.
    """

    env: Mapping[str, str] = attrs.field(factory=dict, converter=_str_mapping)
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_str_mapping)
    appkeys: Path | None = attrs.field(default=None, converter=_optional_path)
    app_compose: Path | None = attrs.field(default=None, converter=_optional_path)
    sys_config: Path | None = attrs.field(default=None, converter=_optional_path)
    runtime_log: Path | None = attrs.field(default=None, converter=_optional_path)
    trust_bundle: TrustBundle | None = None

    def platform_config(
        self, workdir: Path, options: Mapping[str, str] | None = None, *, reset: bool = False
    ) -> PlatformConfig:
        """A config with its state directory at ``workdir/state``; writes default inputs.

        :param workdir: a directory the caller owns; the state dir and default input files
            are created inside it.
        :param options: the platform options; :attr:`options` when None.
        """
        state_dir = workdir / "state"
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return PlatformConfig(
            state_dir=state_dir,
            runtime_log=self.runtime_log or state_dir / "runtime_events.log",
            appkeys=self.appkeys,
            app_compose=self.app_compose
            or _write_json(workdir / "app-compose.json", DEFAULT_APP_COMPOSE),
            sys_config=self.sys_config
            or _write_json(workdir / "sys-config.json", DEFAULT_SYS_CONFIG),
            options=dict(self.options if options is None else options),
            reset=reset,
        )

    def serve_args(self, workdir: Path, options: Mapping[str, str] | None = None) -> list[str]:
        """``dstack-agent serve`` flags (besides ``--platform``, ``--socket`` and
        ``--state-dir``) that give an agent in ``workdir`` the same config."""
        config = self.platform_config(workdir, options)
        args = [
            "--app-compose", str(config.app_compose),
            "--sys-config", str(config.sys_config),
            "--runtime-log", str(config.runtime_log),
        ]
        if config.appkeys is not None:
            args += ["--appkeys", str(config.appkeys)]
        for key, value in config.options.items():
            args += ["--platform-option", f"{key}={value}"]
        return args


def _write_json(path: Path, doc: Mapping[str, Any]) -> Path:
    if not path.exists():
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def conformance_policy(uid: int) -> str:
    """A restrictive policy that suffices for the conformance suite's agent tests.

    Default deny; the caller with ``uid`` (the test process) gets exactly
    :data:`CONFORMANCE_METHODS`, with keys under :data:`CONFORMANCE_KEY_PATHS` only.
    """
    return (
        'default = "deny"\n\n[[rule]]\n'
        f"match = {{ uid = {uid} }}\n"
        f"methods = {json.dumps(list(CONFORMANCE_METHODS))}\n"
        f"key_paths = {json.dumps(list(CONFORMANCE_KEY_PATHS))}\n"
    )


class PlatformAgent(AgentProcess):
    """The :func:`dstack_agent` fixture's agent: an :class:`AgentProcess` that knows its
    :class:`~dstack_core.types.PlatformConfig` (input files, runtime log, options).

    With a ``policy`` file it serves under that caller policy and keeps an audit log at
    :attr:`audit_log` (None without a policy).
    """

    def __init__(
        self,
        platform: str,
        *,
        env: PlatformEnv,
        options: Mapping[str, str],
        policy: Path | None = None,
    ) -> None:
        workdir = short_tempdir("dsa")
        args = env.serve_args(workdir, options)
        self.audit_log = workdir / "audit.log" if policy is not None else None
        if policy is not None:
            args += ["--policy", str(policy), "--audit-log", str(self.audit_log)]
        super().__init__(platform, workdir=workdir, extra_args=args, env=env.env)
        self.config = env.platform_config(workdir, options)


@contextlib.contextmanager
def configured_platform(pm: pluggy.PluginManager, config: PlatformConfig) -> Iterator[Platform]:
    """Wrap ``pm`` in a :class:`Platform`, configure it with ``config``, close it after.

    Restart a platform by calling this twice, each time with a fresh
    ``load_platform(name)``, on the same config.
    """
    platform = Platform.from_plugin_manager(pm)
    try:
        platform.configure(config)
        yield platform
    finally:
        platform.close()


def _parse_option(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise pytest.UsageError(f"{OPTION_OPTION} expects KEY=VALUE, got {value!r}")
    return key, val


def pytest_configure(config: pytest.Config) -> None:
    """Give the session one short temporary directory for agents' sockets and state."""
    if TEMP_BASE_ENV not in os.environ:
        base = tempfile.mkdtemp(prefix="dsk-", dir="/tmp")
        os.environ[TEMP_BASE_ENV] = base
        config.stash[_SESSION_TEMP] = base


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's temporary directory (agents are stopped by then)."""
    base = config.stash.get(_SESSION_TEMP, None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
        os.environ.pop(TEMP_BASE_ENV, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dstack", "dstack-core platform plugins")
    group.addoption(
        PLATFORM_OPTION,
        dest="dstack_platform",
        metavar="NAME",
        default=None,
        help="platform plugin under test (entry point in dstack_core.platforms); "
        f"overrides the ini option {PLATFORM_INI}",
    )
    group.addoption(
        OPTION_OPTION,
        dest="dstack_platform_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="platform option for the platform under test (repeatable)",
    )
    group.addoption(
        POLICY_OPTION,
        dest="dstack_agent_policy",
        metavar="FILE",
        default=None,
        help="run the dstack_agent fixture's agent under this caller policy, with an audit "
        "log verified after each test",
    )
    parser.addini(PLATFORM_INI, help="platform plugin under test (see --dstack-platform)")


@pytest.fixture(scope="session")
def dstack_platform_name(pytestconfig: pytest.Config) -> str:
    """The name of the platform under test: ``--dstack-platform``, else the ini option.

    Fails the test when neither names one: the kit never picks a platform by itself.
    Override it in a ``conftest.py`` (or a test module) to pin a platform.
    """
    name = pytestconfig.getoption("dstack_platform") or pytestconfig.getini(PLATFORM_INI)
    if not name:
        pytest.fail(
            f"no platform under test: pass {PLATFORM_OPTION} NAME, set '{PLATFORM_INI}' in the "
            "pytest ini options, or override the dstack_platform_name fixture",
            pytrace=False,
        )
    return str(name)


def _command_line_options(config: pytest.Config) -> dict[str, str]:
    return dict(_parse_option(v) for v in config.getoption("dstack_platform_options"))


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add :func:`~dstack_core.testing.pytest_hooks.pytest_dstack_platform_env`."""
    from . import pytest_hooks

    pluginmanager.add_hookspecs(pytest_hooks)


@pytest.hookimpl(trylast=True)
def pytest_dstack_platform_env(
    request: pytest.FixtureRequest, platform: str, options: Mapping[str, str]
) -> PlatformEnv | None:
    """A fake TEE tree of :mod:`dstack_core.testing.fake_tee` named on the command line
    (``--dstack-platform-option root=DIR --dstack-platform-option sysio=fake``): its
    environment, inputs, runtime log and trust anchors, shared by every test."""
    root = options.get("root")
    if options.get("sysio") != "fake" or not root:
        return None
    from .fake_tee import open_machine

    try:
        machine = open_machine(root)
    except FileNotFoundError:
        return None
    return machine.platform_env()


@pytest.fixture
def dstack_platform_env(
    request: pytest.FixtureRequest, dstack_platform_name: str
) -> PlatformEnv:
    """The environment the platform runs in, per test.

    It is what :func:`~dstack_core.testing.pytest_hooks.pytest_dstack_platform_env`
    answers (a platform package's pytest plugin prepares its device there, from the
    command line's ``--dstack-platform-option`` values), else empty. Or override the
    fixture to prepare one, for example fake hardware built per test::

        @pytest.fixture
        def dstack_platform_env(tmp_path):
            machine = FakeTdxMachine.create(tmp_path / "tdx")
            return PlatformEnv(env=machine.agent_env(), options=machine.agent_options(), ...)

    A yield fixture may tear the environment down after the test.
    """
    env = request.config.hook.pytest_dstack_platform_env(
        request=request, platform=dstack_platform_name,
        options=_command_line_options(request.config),
    )
    return PlatformEnv() if env is None else env


@pytest.fixture
def dstack_platform_options(
    pytestconfig: pytest.Config, dstack_platform_env: PlatformEnv
) -> dict[str, str]:
    """Platform options: :attr:`PlatformEnv.options`, then each ``--dstack-platform-option``.

    Override it to set options directly.
    """
    return {**dstack_platform_env.options, **_command_line_options(pytestconfig)}


@pytest.fixture
def dstack_platform_config(
    dstack_platform_env: PlatformEnv, dstack_platform_options: dict[str, str]
) -> Iterator[PlatformConfig]:
    """A :class:`~dstack_core.types.PlatformConfig` on a fresh temporary state directory,
    with the environment's input files and the options; removed after the test."""
    workdir = short_tempdir("dsc")
    try:
        yield dstack_platform_env.platform_config(workdir, dstack_platform_options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def dstack_plugin_manager(
    dstack_platform_name: str, dstack_platform_env: PlatformEnv, monkeypatch: pytest.MonkeyPatch
) -> pluggy.PluginManager:
    """A fresh plugin manager with the platform loaded (and a fresh plugin instance).

    :attr:`PlatformEnv.env` is in ``os.environ`` for the rest of the test. A plugin that
    cannot be loaded fails the test with the :class:`~dstack_core.errors.PluginError`.
    """
    for key, value in dstack_platform_env.env.items():
        monkeypatch.setenv(key, value)
    return load_platform(dstack_platform_name)


@pytest.fixture
def dstack_platform_info(dstack_plugin_manager: pluggy.PluginManager) -> PlatformInfo:
    """The platform's :class:`~dstack_core.types.PlatformInfo`, read without configuring it."""
    return Platform.from_plugin_manager(dstack_plugin_manager).info


@pytest.fixture
def dstack_platform(
    dstack_plugin_manager: pluggy.PluginManager, dstack_platform_config: PlatformConfig
) -> Iterator[Platform]:
    """The platform's façade, configured with :func:`dstack_platform_config`.

    Built on :func:`dstack_plugin_manager` (so hooks can also be called directly through
    it) and closed after the test. Its methods are async: ``asyncio.run(p.get_quote(rd))``.
    """
    with configured_platform(dstack_plugin_manager, dstack_platform_config) as platform:
        yield platform


@pytest.fixture
def dstack_agent_policy(pytestconfig: pytest.Config) -> Path | None:
    """The caller policy file the :func:`dstack_agent` runs under: ``--dstack-agent-policy``,
    else None (no policy: every caller may call everything).

    Override it to run the agent tests under a policy, e.g. one from
    :func:`conformance_policy` written to a temporary file.
    """
    value = pytestconfig.getoption("dstack_agent_policy")
    return Path(value) if value else None


@pytest.fixture
def dstack_agent(
    dstack_platform_name: str,
    dstack_platform_env: PlatformEnv,
    dstack_platform_options: dict[str, str],
    dstack_agent_policy: Path | None,
) -> Iterator[PlatformAgent]:
    """A running ``dstack-agent serve --platform NAME`` on a temporary Unix socket.

    It has its own state directory (not :func:`dstack_platform_config`'s) and the same
    environment, inputs and options. After the test it gets SIGTERM; if it was still
    running and does not exit 0, the test errors with the agent's log. Tests may
    ``stop()`` and ``start()`` it to restart on the same state.

    Under a :func:`dstack_agent_policy` it keeps an audit log, and the test errors unless
    that log's hash chain verifies after the agent stopped.
    """
    agent = PlatformAgent(dstack_platform_name, env=dstack_platform_env,
                          options=dstack_platform_options, policy=dstack_agent_policy)
    audit = None
    try:
        agent.start()
        yield agent
    finally:
        was_running = agent.proc is not None and agent.proc.poll() is None
        code = agent.stop() if agent.proc is not None else 0
        output = agent.output()
        if agent.audit_log is not None and agent.audit_log.exists():
            audit = verify_audit_log(agent.audit_log)
        shutil.rmtree(agent.workdir, ignore_errors=True)
    if was_running and code != 0:
        pytest.fail(f"agent exited with {code} on SIGTERM:\n{output}", pytrace=False)
    if audit is not None and not audit.intact:
        pytest.fail(f"the agent's audit log does not verify: {audit.problem}", pytrace=False)
