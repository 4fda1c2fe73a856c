"""The plugin author's test kit run the way a vendor runs it: ``pytest --dstack-platform NAME
[--dstack-platform-option K=V] --pyargs dstack_core.testing.conformance`` in a subprocess,
against a device that keeps its state between tests, through a platform package's own
``pytest_dstack_platform_env`` hook, and against a platform whose trust_bundle answers None.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dstack_core.eventlog import RuntimeEventLog
from dstack_core.testing.fake_tee import ALLOW_FAKE_KERNEL_ENV, FakeTdxMachine

TIMEOUT = 600


def _pytest(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (ALLOW_FAKE_KERNEL_ENV, "PYTEST_ADDOPTS", "DSTACK_PLATFORM")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args,
         "--pyargs", "dstack_core.testing.conformance"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )


def _install(site: Path, name: str, module: str, source: str, entry_point: str,
             verifier: str | None = None) -> None:
    """What ``pip install --target site`` leaves: the module and its dist-info, with a
    platform entry point and, if given, a verifier entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    entry_points = f"[dstack_core.platforms]\n{entry_point}\n"
    if verifier is not None:
        entry_points += f"[dstack_core.verifiers]\n{verifier}\n"
    (info / "entry_points.txt").write_text(entry_points)


class TestStatefulDevice:
    def test_conformance_on_a_device_that_keeps_state(self, tmp_path):
        """A fake TD named by --dstack-platform-option root=... sysio=fake keeps its registers
        across every test and two runs; the suite passes and leaves log and RTMR3 consistent."""
        machine = FakeTdxMachine.create(tmp_path / "td")
        start = machine.io().read(machine.paths.measurements_dir / "rtmr3:sha384")
        device = ["--dstack-platform", "tdx", "--dstack-platform-option", f"root={machine.root}",
                  "--dstack-platform-option", "sysio=fake"]
        first = _pytest(tmp_path, *device)
        assert first.returncode == 0, first.stdout + first.stderr
        assert " passed" in first.stdout and "failed" not in first.stdout
        again = _pytest(tmp_path, *device, "-k", "TestExtendRtmr or TestAgent or TestMeasurements")
        assert again.returncode == 0, again.stdout + again.stderr
        rtmr3 = machine.io().read(machine.paths.measurements_dir / "rtmr3:sha384")
        assert rtmr3 != start
        assert RuntimeEventLog(machine.paths.runtime_log).replay() == rtmr3

    def test_platform_packages_hook_prepares_each_test(self, tmp_path):
        """A -p plugin implementing pytest_dstack_platform_env is asked once per test and
        its per-test device (a fresh fake TD, removed by a finalizer) is what the tests use."""
        plugin = tmp_path / "plugin"
        plugin.mkdir()
        devices = tmp_path / "devices"
        devices.mkdir()
        (plugin / "acme_testing.py").write_text(textwrap.dedent(f"""\
            import shutil
            from pathlib import Path

            from dstack_core.testing.fake_tee import FakeTdxMachine

            LOG = Path({str(tmp_path / "calls.log")!r})
            DEVICES = Path({str(devices)!r})


            def pytest_dstack_platform_env(request, platform, options):
                assert options == {{"commit_timeout": "3"}}
                root = DEVICES / request.node.name.replace("/", "_")
                machine = FakeTdxMachine.create(root)
                with LOG.open("a") as log:
                    log.write(f"{{platform}} {{request.node.name}}\\n")
                request.addfinalizer(lambda: shutil.rmtree(root))
                return machine.platform_env()
            """))
        result = _pytest(tmp_path, "-p", "acme_testing", "--dstack-platform", "tdx",
                         "--dstack-platform-option", "commit_timeout=3", "-k",
                         "TestRootKey or test_extend_moves_only_rtmr3 or TestHookResults",
                         pythonpath=plugin)
        assert result.returncode == 0, result.stdout + result.stderr
        calls = (tmp_path / "calls.log").read_text().splitlines()
        assert len(calls) == len(set(calls)) >= 8
        assert all(call.startswith("tdx ") for call in calls)
        assert list(devices.iterdir()) == []


class TestTrustBundleHook:
    def test_none_and_an_old_signature_pass_conformance(self, tmp_path):
        """A simulated platform whose trust_bundle(state_dir) (no options) answers None passes."""
        site = tmp_path / "site"
        _install(site, "probe-dstack", "dstack_probe", """\
            from dstack_core import PlatformInfo, hookimpl
            from dstack_simulator import SimulatorPlatform


            class ProbePlatform(SimulatorPlatform):
                @hookimpl
                def platform_info(self):
                    return PlatformInfo(name="probe", tag="probe-sim", evidence_format="tdx",
                                        simulated=True)

                @hookimpl
                def trust_bundle(self, state_dir):
                    return None
            """, "probe = dstack_probe:ProbePlatform")
        # The suite's classes where trust anchors matter; the rest is the simulator's run.
        result = _pytest(tmp_path, "--dstack-platform", "probe", "-k",
                         "TestPlatformInfo or TestQuote or TestHookResults", pythonpath=site)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no trust anchors for this platform's quotes" in result.stdout

    def test_simulator_trust_bundle_is_the_generic_commands(self, tmp_path):
        """``simulator trust-bundle`` and ``trust-bundle --platform simulator`` write the same."""
        state = tmp_path / "state"
        for command, out in ((["simulator", "trust-bundle"], "old"),
                             (["trust-bundle", "--platform", "simulator"], "new")):
            result = subprocess.run(
                [sys.executable, "-m", "dstack_core.cli", *command, "--state-dir", str(state),
                 "--out", str(tmp_path / out)],
                capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr
        written = sorted(p.name for p in (tmp_path / "old").iterdir())
        assert written == sorted(p.name for p in (tmp_path / "new").iterdir())
        assert {"root_ca.pem", "collateral.json"} <= set(written)
        for name in written:
            assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()

    @pytest.mark.parametrize("platform", ["tdx", "sev-snp-stub"])
    def test_cli_writes_nothing_for_hardware(self, tmp_path, platform):
        """dstack-agent trust-bundle for hardware: exit 0, says so, writes nothing."""
        out = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, "-m", "dstack_core.cli", "trust-bundle", "--platform", platform,
             "--state-dir", str(tmp_path / "state"), "--out", str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"platform {platform} publishes no trust bundle" in result.stdout
        assert not out.exists()

    def test_cli_writes_the_fake_snp_chain_that_verifies_its_reports(self, tmp_path):
        """trust-bundle --platform sev-snp-stub on the fake kernel writes the mock AMD chain;
        the fake's reports verify with exactly those two files, and only with the fake allowed."""
        from dstack_sev_snp_stub.amd import load_certificate
        from dstack_sev_snp_stub.kds import load_collateral_file
        from dstack_sev_snp_stub.verify import SnpVerifyOptions, verify_report

        from dstack_core.testing.fake_tee import FakeSnpMachine

        machine = FakeSnpMachine.create(tmp_path / "tree", product="Genoa")
        out = tmp_path / "out"
        args = [sys.executable, "-m", "dstack_core.cli", "trust-bundle", "--platform",
                "sev-snp-stub", "--state-dir", str(tmp_path / "state"), "--out", str(out),
                *[f"--platform-option={k}={v}" for k, v in machine.agent_options().items()]]
        refused = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False,
                                 env={k: v for k, v in os.environ.items()
                                      if k != ALLOW_FAKE_KERNEL_ENV})
        assert refused.returncode == 2 and "for tests only" in refused.stderr
        assert not out.exists()
        written = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False,
                                 env={**os.environ, **machine.agent_env()})
        assert written.returncode == 0, written.stderr
        assert sorted(p.name for p in out.iterdir()) == ["collateral.json", "root_ca.pem"]
        result = verify_report(
            machine.report(bytes(64)), load_collateral_file(out / "collateral.json"),
            SnpVerifyOptions(now=int(time.time()), allow_simulator=True,
                             roots=[load_certificate((out / "root_ca.pem").read_bytes())]),
        )
        assert result.passed and result.simulated, result.reason


LAX_PACKAGE = """\
    import attrs

    from dstack_core import hookimpl
    from dstack_simulator import SimulatorPlatform
    from dstack_tdx.verifier import TdxVerifier

    FORMAT = "lax-cc"


    class LaxPlatform(SimulatorPlatform):
        @hookimpl
        def platform_info(self):
            return attrs.evolve(super().platform_info(), name="lax", evidence_format=FORMAT)


    class LaxVerifier(TdxVerifier):
        \"\"\"A careless vendor's verifier: dcap-qvl runs, its answer is ignored.\"\"\"

        @hookimpl
        def verifier_info(self):
            return attrs.evolve(super().verifier_info(), evidence_format=FORMAT)

        @hookimpl
        def decode_evidence(self, evidence):
            return attrs.evolve(super().decode_evidence(evidence), evidence_format=FORMAT)

        @hookimpl
        def verify_platform(self, report, collateral, options, collateral_error):
            real = super().verify_platform(report, collateral, options, collateral_error)
            return attrs.evolve(real, checks=tuple(attrs.evolve(c, status="pass", detail="ok")
                                                   for c in real.checks))
    """


class TestVerifierConformance:
    def test_an_unsound_verifier_fails_the_kit(self, tmp_path):
        """A platform package whose verifier plugin passes every platform check whatever the
        signature says passes the kit's start (installed, its evidence verifies) but fails
        its tampering test, so the kit cannot be passed by a verifier that does not check.
        (The mutation test, 30 random mutants, usually catches it too, but not always: it is
        not asserted here.)"""
        site = tmp_path / "site"
        _install(site, "lax-cc", "dstack_lax", LAX_PACKAGE, "lax = dstack_lax:LaxPlatform",
                 verifier="lax-cc = dstack_lax:LaxVerifier")
        result = _pytest(tmp_path, "--dstack-platform", "lax", "-k", "TestVerifier", "-rA",
                         pythonpath=site)
        outcomes = {test: outcome for outcome, test in re.findall(
            r"^(PASSED|FAILED) \S*::TestVerifier::(\w+)", result.stdout, re.MULTILINE)}
        assert result.returncode == 1, result.stdout + result.stderr
        assert set(outcomes) == {"test_verifier_plugin_is_installed",
                                 "test_attestation_verifies_pass", "test_tampered_evidence_fails",
                                 "test_mutants_are_sound"}, result.stdout
        assert outcomes["test_verifier_plugin_is_installed"] == "PASSED", result.stdout
        assert outcomes["test_attestation_verifies_pass"] == "PASSED", result.stdout
        assert outcomes["test_tampered_evidence_fails"] == "FAILED", result.stdout


class TestDebugFlag:
    @pytest.mark.parametrize("where", ["before", "after"])
    def test_debug_before_or_after_the_command(self, where):
        """--debug works before the command and after it: a traceback instead of one line."""
        serve = ["serve", "--platform", "no-such-platform"]
        args = ["--debug", *serve] if where == "before" else [*serve, "--debug"]
        result = subprocess.run([sys.executable, "-m", "dstack_core.cli", *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0
        assert "Traceback" in result.stderr and "PluginError" in result.stderr
        plain = subprocess.run([sys.executable, "-m", "dstack_core.cli", *serve],
                               capture_output=True, text=True, timeout=60, check=False)
        assert plain.returncode == 2 and "Traceback" not in plain.stderr
