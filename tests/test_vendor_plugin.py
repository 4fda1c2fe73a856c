"""The vendor path end to end: a third-party platform package with an evidence format of its
own and the verifier plugin of that format, installed the way a vendor's users install it,
listed, selected by name, served, its attestations verified by ``dstack-agent verify`` and
``POST /verify``, and held to the conformance suite (its verifier part included).

The package is the guide's second worked example, ``dstack-acme`` (docs/plugins/writing.md:
module ``dstack_acme``, platform ``acme`` in ``dstack_core.platforms``, verifier ``acme-cc``
in ``dstack_core.verifiers``; Acme CC reports signed by a simulated chip key under Acme's
root; it does not import the simulator or any other plugin), written from the guide's code
blocks to a temporary directory and installed with dstack-core from this checkout (and
dstack-core's ``test`` extra, for the conformance run) into a fresh virtualenv: ``python
-m venv`` without system site-packages, then one ``pip install <dstack-core> <dstack-acme>``
that resolves every dependency from the package index (PyPI in CI).

Why a full install: it measured about 16 s (9 s without the test extra) against a local
index, well under the ~60 s at which we would have fallen back to ``pip install --no-deps``
plus a ``.pth`` file onto this venv's site-packages. So the venv holds exactly what
``pip install`` gives a vendor's users, and nothing of this checkout's environment (no
simulator). dstack-core is installed from a copy of its sources (``pyproject.toml``,
``README.md``, ``dstack_core/``) so that building it leaves nothing in the checkout.

The guide's first plugin, ``softtee`` (TDX-format quotes), is installed from its code blocks
too, beside ``dstack-tdx`` from this checkout (the verifier of its format, which it depends
on), and held to the same suite, so the guide cannot rot.

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
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from dstack_core.envelope import Envelope
from dstack_core.testing import AgentProcess, short_tempdir
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

GUIDE_ACME = "dstack-acme/"


def guide_files() -> dict[str, str]:
    """The guide's titled code blocks: path -> content."""
    return {m["path"]: m["body"] for m in GUIDE_FILE.finditer(GUIDE.read_text())}


def write_project(root: Path, files: Mapping[str, str]) -> Path:
    for path, body in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(body)
    return root


TRIAL_MODULE = """\
import attrs

from dstack_core import hookimpl
from dstack_acme import AcmePlatform


class TrialPlatform(AcmePlatform):
    \"\"\"The vendor trial's first package: a platform of a new format, and no verifier.\"\"\"

    @hookimpl
    def platform_info(self):
        return attrs.evolve(super().platform_info(), name="acme-trial", evidence_format="acme-trial")
"""

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
                    pythonpath: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """The conformance suite against ``platform``, run by the venv's pytest."""
        env = clean_env(**({"PYTHONPATH": str(pythonpath)} if pythonpath else {}))
        return run([str(self.bin / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    "-rs", "--dstack-platform", platform, "--pyargs",
                    "dstack_core.testing.conformance"], cwd=cwd, env=env, timeout=600)

    def agent(self, *args: str, pythonpath: str | Path | None = None
              ) -> subprocess.CompletedProcess[str]:
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
    """A fresh virtualenv with dstack-core[test] from this checkout and the guide's
    dstack-acme."""
    work = tmp_path_factory.mktemp("vendor")
    core = work / "dstack-core"
    core.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, core / name)
    shutil.copytree(REPO / "dstack_core", core / "dstack_core",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    acme = write_project(work / "dstack-acme", {
        path.removeprefix(GUIDE_ACME): body for path, body in guide_files().items()
        if path.startswith(GUIDE_ACME)})
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
             "distribution": "dstack-acme 0.1.0"}
        ]

    def test_verifiers_lists_its_verifier(self, venv):
        """``dstack-agent verifiers`` lists the vendor's verifier plugin and nothing else:
        installing dstack-core alone verifies no format."""
        result = venv.agent("verifiers", "--json")
        assert result.returncode == 0, result.stderr
        (listed,) = json.loads(result.stdout)
        assert (listed["evidence_format"], listed["distribution"], listed["checks"]) == (
            "acme-cc", "dstack-acme", ["acme_chip", "acme_signature", "acme_debug"])

    def test_selected_by_name_and_serves(self, acme_agent):
        """``serve --platform acme`` answers Attest (an acme-cc envelope binding the report
        data) and GetKey."""
        status, body = acme_agent.call("Attest", {"report_data": b"vendor".hex()})
        assert status == 200, body
        envelope = Envelope.from_cbor(bytes.fromhex(body["attestation"]))
        assert (envelope.platform, envelope.evidence_format) == ("acme-sim", "acme-cc")
        assert envelope.report_data == b"vendor".ljust(64, b"\0")
        assert envelope.report_data in envelope.quote
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
            "acme-clone 0.1.0", "dstack-acme 0.1.0"]
        result = venv.agent(*serve_args, "--platform", "acme", pythonpath=site)
        assert result.returncode == 2, result.stderr
        assert "conflicting plugins for platform 'acme', provided by:" in result.stderr
        assert "from dstack-acme 0.1.0" in result.stderr
        assert "from acme-clone 0.1.0" in result.stderr

    def test_passes_the_conformance_suite(self, venv, tmp_path):
        """``pytest --dstack-platform acme --pyargs dstack_core.testing.conformance`` passes."""
        result = venv.conformance("acme", tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " passed" in result.stdout and "failed" not in result.stdout
        assert "has no runtime registers" in result.stdout


@attrs.frozen
class Verified:
    """One Attest output of the vendor's agent and the trust bundle its platform publishes."""

    attest: Path
    bundle: Path
    report_data: bytes


@pytest.fixture(scope="module")
def verified(venv: Venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Verified]:
    """Attest from a running ``acme`` agent, and ``dstack-agent trust-bundle --platform
    acme`` for its state dir, both through the venv's console script."""
    out = tmp_path_factory.mktemp("acme-out")
    agent = VenvAgent(venv, "acme")
    agent.start()
    try:
        report_data = b"relying-party"
        status, body = agent.call("Attest", {"report_data": report_data.hex()})
        assert status == 200, body
        (out / "attest.json").write_text(json.dumps(body))
        bundle = venv.agent("trust-bundle", "--platform", "acme", "--state-dir",
                            str(agent.state_dir), "--out", str(out / "bundle"))
        assert bundle.returncode == 0, bundle.stderr
    finally:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)
    yield Verified(out / "attest.json", out / "bundle", report_data)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestVendorVerifier:
    def test_attest_verifies_pass_with_dstack_agent_verify(self, venv, verified):
        """``dstack-agent verify`` passes the vendor's Attest output under its trust bundle
        with --allow-simulator, names the vendor's plugin, and fails it without the opt-in."""
        flags = ["verify", str(verified.attest), "--trust-bundle", str(verified.bundle),
                 "--expect-report-data", verified.report_data.hex()]
        result = venv.agent(*flags, "--allow-simulator")
        assert result.returncode == 0, result.stdout + result.stderr
        doc = json.loads(result.stdout)
        assert doc["verdict"] == "pass" and doc["evidence_format"] == "acme-cc"
        assert {k: doc["checks"][k]["status"] for k in ("acme_chip", "acme_signature",
                                                        "report_data")} == dict.fromkeys(
            ("acme_chip", "acme_signature", "report_data"), "pass")
        assert doc["verifier"] == {"evidence_format": "acme-cc", "plugin": "dstack-acme",
                                   "version": "0.1.0",
                                   "checks": ["acme_chip", "acme_signature", "acme_debug"]}
        refused = venv.agent(*flags)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "verdict fail: acme_chip:" in refused.stderr

    def test_attest_verifies_pass_with_post_verify(self, venv, verified):
        """``dstack-agent verifier`` configured with the bundle answers POST /verify of the
        Attest body with verdict pass (is_valid stays false: no OS image policy can apply
        to a format without registers)."""
        port = _free_port()
        proc = subprocess.Popen(
            [str(venv.bin / "dstack-agent"), "verifier", "--listen", f"127.0.0.1:{port}",
             "--trust-bundle", str(verified.bundle), "--allow-simulator"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(),
        )
        try:
            body = json.dumps({"attestation": json.loads(verified.attest.read_text())
                               ["attestation"]}).encode()
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(urllib.request.Request(
                            f"http://127.0.0.1:{port}/verify", data=body,
                            headers={"Content-Type": "application/json"}), timeout=10) as answer:
                        doc = json.loads(answer.read())
                    break
                except (ConnectionError, urllib.error.URLError):
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        proc.stderr.read().decode() if proc.stderr else "")
                    time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert doc["verdict"] == "pass", doc["reason"]
        assert doc["details"]["tee_variant"] == "acme-cc"
        assert doc["details"]["report_data"] == verified.report_data.ljust(64, b"\0").hex()
        assert doc["verifier"]["plugin"] == "dstack-acme"

    def test_a_platform_without_its_verifier_does_not_start(self, venv, serve_args):
        """The vendor trial's finding: a platform of a new evidence format with no verifier
        plugin installed stops start-up, naming the format and what is installed."""
        site = venv.target_with("acme-trial", "dstack_acme_trial", TRIAL_MODULE,
                                {"acme-trial": "dstack_acme_trial:TrialPlatform"})
        result = venv.agent(*serve_args, "--platform", "acme-trial", pythonpath=site)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        named = "platform 'acme-trial' produces evidence format 'acme-trial', but no verifier"
        installed = "installed: acme-cc (dstack_acme.verifier:AcmeVerifier, from dstack-acme"
        for part in (named, installed, "--allow-missing-verifier"):
            assert part in result.stderr


class TestWritingGuide:
    def test_guide_shows_both_packages(self):
        """The guide's complete files are softtee's and dstack-acme's, and nothing else."""
        assert set(guide_files()) == {
            "pyproject.toml", "dstack_softtee/__init__.py", "dstack-acme/pyproject.toml",
            "dstack-acme/dstack_acme/__init__.py", "dstack-acme/dstack_acme/verifier.py"}

    def test_guide_plugin_is_served_and_conforms(self, venv, tmp_path):
        """The plugin docs/plugins/writing.md builds first (softtee, TDX-format quotes)
        installs beside dstack-tdx (its format's verifier), is listed, and passes the suite."""
        files = {p: b for p, b in guide_files().items() if not p.startswith(GUIDE_ACME)}
        site = venv.target(write_project(tmp_path / "dstack-softtee", files))
        tdx = tmp_path / "dstack-tdx"
        shutil.copytree(REPO / "plugins" / "tdx", tdx,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        path = os.pathsep.join([str(site), str(venv.target(tdx))])
        listed = json.loads(venv.agent("platforms", "--json", pythonpath=path).stdout)
        assert {"name": "softtee", "value": "dstack_softtee:SoftTeePlatform",
                "distribution": "dstack-softtee 0.1.0"} in listed
        result = venv.conformance("softtee", tmp_path, pythonpath=path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " passed" in result.stdout and "failed" not in result.stdout
