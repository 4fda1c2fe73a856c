"""The vendor path end to end: a third-party platform package, installed the way a vendor's
users install it, listed, selected by name, served, and held to the conformance suite.

A module-scoped fixture writes a minimal platform package, ``acme-dstack`` (module
``dstack_acme``, entry point ``acme`` in ``dstack_core.platforms``; quotes signed with
:mod:`dstack_core.mockpki`; it does not import the simulator), to a temporary directory, and
installs it with dstack-core from this checkout (and dstack-core's ``test`` extra, for the
conformance run) into a fresh virtualenv: ``python -m venv`` without system site-packages,
then one ``pip install <dstack-core> <acme-dstack>`` that resolves every dependency from the
package index (PyPI in CI).

Why a full install: it measured about 16 s (9 s without the test extra) against a local
index, well under the ~60 s at which we would have fallen back to ``pip install --no-deps``
plus a ``.pth`` file onto this venv's site-packages. So the venv holds exactly what
``pip install`` gives a vendor's users, and nothing of this checkout's environment (no
simulator). dstack-core is installed from a copy of its sources (``pyproject.toml``,
``README.md``, ``dstack_core/``) so that building it leaves nothing in the checkout.

The plugin that ``docs/plugins/writing.md`` builds is installed from the guide's own code
blocks (those with a ``title``) and held to the same suite, so the guide cannot rot.

The broken, colliding and guide packages are installed with ``pip install --no-deps --target`` into
directories of their own and put on ``PYTHONPATH`` for one command, so the shared venv stays
as the vendor left it. The tests need a package index, hence the ``network`` marker; CI has
one and runs them (deselect offline with ``-m "not network"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from dstack_core.quote import TdxQuote
from dstack_core.testing import AgentProcess, short_tempdir, uds_request
from dstack_core.testing.logscan import record_output
from dstack_core.testing.pytest_plugin import PlatformEnv

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "plugins" / "writing.md"
GUIDE_FILE = re.compile(
    r'^```\w+ title="(?P<path>[^"]+)"\n(?P<body>.*?)^```$', re.MULTILINE | re.DOTALL
)
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 120

ACME_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "acme-dstack"
version = "0.1.0"
description = "Acme's software TEE platform for dstack-core (a test fixture, not hardware)"
requires-python = ">=3.11"
dependencies = ["dstack-core"]

[project.entry-points."dstack_core.platforms"]
acme = "dstack_acme:AcmePlatform"

[tool.setuptools]
packages = ["dstack_acme"]
"""

ACME_MODULE = '''\
"""Acme's dstack platform: quotes from a software TEE signed by a mock Intel PKI.

No measurement registers: EmitEvent is unsupported, and says so.
"""

from __future__ import annotations

import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path

from dstack_core import certs
from dstack_core import (
    ConfigurationError,
    KeyProvider,
    Measurements,
    PlatformConfig,
    PlatformEvidence,
    PlatformInfo,
    PlatformUnsupported,
    Quote,
    RootKey,
    hookimpl,
)
from dstack_core.eventlog import TdxEvent
from dstack_core.mockpki import MOCK_TD_ATTRIBUTES, SEED_SIZE, MockIntelPki
from dstack_core.quote import TdReport
from dstack_core.statefile import atomic_write, read_or_create_secret
from dstack_core.types import TrustBundle

USER_DATA = b"ACME-SOFT-TEE".ljust(20, b"\\0")
PKI_SEED = "acme-pki.seed"
APPKEYS = "appkeys.json"


class AcmePlatform:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pki: MockIntelPki | None = None
        self._root_key: RootKey | None = None

    @hookimpl
    def platform_info(self) -> PlatformInfo:
        return PlatformInfo(
            name="acme", tag="acme-soft", evidence_format="tdx", simulated=True,
            runtime_registers=False, description="Acme software TEE", version="0.1.0",
        )

    @hookimpl
    def configure(self, config: PlatformConfig) -> None:
        try:
            config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot use state dir {config.state_dir}: {exc}") from None
        self._pki = self._load_pki(config.state_dir)
        self._root_key = self._load_root_key(config.appkeys or config.state_dir / APPKEYS)

    @staticmethod
    def _load_root_key(path: Path) -> RootKey:
        if path.exists():
            return RootKey.from_appkeys_json(path.read_bytes())
        ca_key = certs.new_tls_key()
        root_key = RootKey(
            k256_key=secrets.token_bytes(32),
            ca_cert_pem=certs.new_app_ca(ca_key, now=datetime.now(timezone.utc)).cert_pem,
            key_provider=KeyProvider(kind="None", name="none",
                                     key_pem=certs.private_key_pem(ca_key)),
        )
        atomic_write(path, root_key.to_appkeys_json().encode(), mode=0o600)
        return root_key

    @staticmethod
    def _load_pki(state_dir: Path) -> MockIntelPki:
        return MockIntelPki.from_seed(read_or_create_secret(state_dir / PKI_SEED, SEED_SIZE))

    def _configured(self) -> tuple[MockIntelPki, RootKey]:
        if self._pki is None or self._root_key is None:
            raise ConfigurationError("acme platform used before configure")
        return self._pki, self._root_key

    @hookimpl
    def derive_root_key(self) -> RootKey:
        return self._configured()[1]

    @hookimpl
    def get_quote(self, report_data: bytes) -> Quote:
        pki, _ = self._configured()
        zero = bytes(48)
        report = TdReport(
            tee_tcb_svn=bytes(16), mr_seam=zero, mr_signer_seam=zero, seam_attributes=bytes(8),
            td_attributes=MOCK_TD_ATTRIBUTES, xfam=bytes.fromhex("e702060000000000"),
            mr_td=zero, mr_config_id=zero, mr_owner=zero, mr_owner_config=zero,
            rtmr0=zero, rtmr1=zero, rtmr2=zero, rtmr3=zero, report_data=report_data,
        )
        with self._lock:
            return Quote(format="tdx", data=pki.sign_quote(report, user_data=USER_DATA))

    @hookimpl
    def attest(self, report_data: bytes) -> PlatformEvidence:
        return PlatformEvidence(quote=self.get_quote(report_data))

    @hookimpl
    def boot_event_log(self) -> tuple[TdxEvent, ...]:
        return ()

    @hookimpl
    def read_measurements(self) -> Measurements:
        raise PlatformUnsupported("acme has no measurement registers")

    @hookimpl
    def extend_rtmr(self, index: int, digest: bytes) -> None:
        raise PlatformUnsupported("acme has no runtime measurement registers")

    @hookimpl
    def trust_bundle(self, state_dir: Path) -> TrustBundle:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki = self._load_pki(state_dir)
        return TrustBundle(root_ca_pem=pki.root_ca_pem, collateral_json=pki.collateral_json())
'''

BROKEN_MODULE = """\
raise ImportError("libacme_attest.so.1: cannot open shared object file")
"""

CLONE_MODULE = """\
from dstack_acme import AcmePlatform


class AcmeClone(AcmePlatform):
    pass
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything that would leak the parent venv in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DSTACK_PLATFORM")}
    return {**env, **extra}


def run(cmd: list[str], *, timeout: float = RUN_TIMEOUT,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion, capturing text output (the caller checks the status)."""
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    record_output("vendor", result.stderr)
    return result


def write_package(root: Path, name: str, module: str, source: str,
                  entry_points: Mapping[str, str]) -> Path:
    """A setuptools project ``name`` with one module and platform entry points."""
    root.mkdir(parents=True)
    (root / f"{module}.py").write_text(source)
    lines = "\n".join(f'"{k}" = "{v}"' for k, v in entry_points.items())
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"
        dependencies = []

        [project.entry-points."dstack_core.platforms"]
        """) + lines + f'\n\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    return root


@attrs.frozen
class Venv:
    root: Path
    work: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def pip(self, *args: str) -> None:
        result = run([str(self.bin / "python"), "-m", "pip", "--disable-pip-version-check",
                      "install", "--quiet", *args], timeout=INSTALL_TIMEOUT, env=clean_env())
        assert result.returncode == 0, result.stdout + result.stderr

    def target_with(self, name: str, module: str, source: str,
                    entry_points: Mapping[str, str]) -> Path:
        """Install a package into a directory of its own; returns it (for ``PYTHONPATH``)."""
        project = write_package(self.work / f"src-{name}", name, module, source, entry_points)
        return self.target(project)

    def target(self, project: Path) -> Path:
        """Install ``project`` alone into a directory of its own; returns the directory."""
        target = self.work / f"site-{project.name}"
        self.pip("--no-deps", "--target", str(target), str(project))
        return target

    def conformance(self, platform: str, cwd: Path,
                    pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
        """The conformance suite against ``platform``, run by the venv's pytest."""
        env = clean_env(**({"PYTHONPATH": str(pythonpath)} if pythonpath else {}))
        return run([str(self.bin / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    "-rs", "--dstack-platform", platform, "--pyargs",
                    "dstack_core.testing.conformance"], cwd=cwd, env=env, timeout=600)

    def agent(self, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = clean_env(**({"PYTHONPATH": str(pythonpath)} if pythonpath else {}))
        return run([str(self.bin / "dstack-agent"), *args], env=env)


class VenvAgent(AgentProcess):
    """``dstack-agent serve`` from the vendor venv's console script."""

    def __init__(self, venv: Venv, platform: str) -> None:
        workdir = short_tempdir("vnd")
        super().__init__(platform, workdir=workdir,
                         extra_args=PlatformEnv().serve_args(workdir), env={"PYTHONPATH": ""})
        self.venv = venv

    @property
    def command(self) -> list[str]:
        return [str(self.venv.bin / "dstack-agent"), "serve", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), "--platform", str(self.platform),
                *self.extra_args]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtualenv with dstack-core[test] from this checkout and acme-dstack."""
    work = tmp_path_factory.mktemp("vendor")
    core = work / "dstack-core"
    core.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, core / name)
    shutil.copytree(REPO / "dstack_core", core / "dstack_core",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    acme = work / "acme-dstack"
    (acme / "dstack_acme").mkdir(parents=True)
    (acme / "pyproject.toml").write_text(ACME_PYPROJECT)
    (acme / "dstack_acme" / "__init__.py").write_text(ACME_MODULE)
    result = run([sys.executable, "-m", "venv", str(work / "venv")], env=clean_env())
    assert result.returncode == 0, result.stderr
    env = Venv(work / "venv", work)
    env.pip(f"{core}[test]", str(acme))
    return env


@pytest.fixture
def acme_agent(venv: Venv) -> Iterator[VenvAgent]:
    agent = VenvAgent(venv, "acme")
    agent.start()
    yield agent
    code, output = agent.stop(), agent.output()
    shutil.rmtree(agent.workdir, ignore_errors=True)
    assert code == 0, output


@pytest.fixture
def serve_args() -> Iterator[list[str]]:
    """``serve`` arguments but ``--platform``, on a short temporary directory."""
    workdir = short_tempdir("vnd")
    yield ["serve", "--socket", str(workdir / "dstack.sock"), "--state-dir",
           str(workdir / "state"), *PlatformEnv().serve_args(workdir)]
    shutil.rmtree(workdir, ignore_errors=True)


class TestVendorPlugin:
    def test_venv_is_fresh(self, venv):
        """The venv sees neither this checkout's environment nor its simulator."""
        probe = "import sys, importlib.util as u;print(sys.prefix,u.find_spec('dstack_simulator'))"
        result = run([str(venv.bin / "python"), "-c", probe], env=clean_env())
        prefix, simulator = result.stdout.split()
        assert Path(prefix) == venv.root and simulator == "None"

    def test_platforms_lists_it(self, venv):
        """``dstack-agent platforms`` lists the vendor's platform and nothing else."""
        result = venv.agent("platforms", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [
            {"name": "acme", "value": "dstack_acme:AcmePlatform",
             "distribution": "acme-dstack 0.1.0"}
        ]

    def test_selected_by_name_and_serves(self, acme_agent):
        """``serve --platform acme`` answers GetQuote (binding the report data) and GetKey."""
        status, _, body = uds_request(acme_agent.socket, "POST", "/GetQuote",
                                      json.dumps({"report_data": b"vendor".hex()}).encode())
        assert status == 200, body
        quote = TdxQuote.from_bytes(bytes.fromhex(json.loads(body)["quote"]))
        assert quote.report_data == b"vendor".ljust(64, b"\0")
        assert quote.header.user_data.startswith(b"ACME-SOFT-TEE")
        status, body = acme_agent.call("GetKey", {"path": "p", "purpose": "q"})
        assert status == 200 and len(bytes.fromhex(body["key"])) == 32

    def test_no_platform_named_fails_closed(self, venv, serve_args):
        """Without --platform the agent refuses to start and names what is installed."""
        result = venv.agent(*serve_args)
        assert result.returncode == 2
        assert "no platform selected" in result.stderr
        assert "acme (dstack_acme:AcmePlatform" in result.stderr

    def test_plugin_failing_to_import_stops_startup(self, venv, serve_args):
        """A selected plugin that fails to import stops start-up: exit 2, its name, its error."""
        site = venv.target_with("acme-broken", "dstack_acme_broken", BROKEN_MODULE,
                                {"acme-broken": "dstack_acme_broken:Platform"})
        result = venv.agent(*serve_args, "--platform", "acme-broken", pythonpath=site)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        for part in ("acme-broken (dstack_acme_broken:Platform, from acme-broken 0.1.0)",
                     "failed to import", "ImportError",
                     "libacme_attest.so.1: cannot open shared object file"):
            assert part in result.stderr

    def test_colliding_name_stops_startup(self, venv, serve_args):
        """A second distribution registering ``acme`` stops start-up, naming both distributions."""
        site = venv.target_with("acme-clone", "dstack_acme_clone", CLONE_MODULE,
                                {"acme": "dstack_acme_clone:AcmeClone"})
        listed = venv.agent("platforms", "--json", pythonpath=site)
        assert sorted(p["distribution"] for p in json.loads(listed.stdout)) == [
            "acme-clone 0.1.0", "acme-dstack 0.1.0"]
        result = venv.agent(*serve_args, "--platform", "acme", pythonpath=site)
        assert result.returncode == 2, result.stderr
        assert "conflicting plugins for platform 'acme', provided by:" in result.stderr
        assert "from acme-dstack 0.1.0" in result.stderr
        assert "from acme-clone 0.1.0" in result.stderr

    def test_passes_the_conformance_suite(self, venv, tmp_path):
        """``pytest --dstack-platform acme --pyargs dstack_core.testing.conformance`` passes."""
        result = venv.conformance("acme", tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " passed" in result.stdout and "failed" not in result.stdout
        assert "has no runtime registers" in result.stdout


class TestWritingGuide:
    def test_guide_plugin_is_served_and_conforms(self, venv, tmp_path):
        """The plugin docs/plugins/writing.md builds installs, is listed, and passes the suite."""
        files = {m["path"]: m["body"] for m in GUIDE_FILE.finditer(GUIDE.read_text())}
        assert set(files) == {"pyproject.toml", "dstack_softtee/__init__.py"}
        project = tmp_path / "dstack-softtee"
        for path, body in files.items():
            (project / path).parent.mkdir(parents=True, exist_ok=True)
            (project / path).write_text(body)
        site = venv.target(project)
        listed = json.loads(venv.agent("platforms", "--json", pythonpath=site).stdout)
        assert {"name": "softtee", "value": "dstack_softtee:SoftTeePlatform",
                "distribution": "dstack-softtee 0.1.0"} in listed
        result = venv.conformance("softtee", tmp_path, pythonpath=site)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " passed" in result.stdout and "failed" not in result.stdout
