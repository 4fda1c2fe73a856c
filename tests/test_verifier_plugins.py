"""Verifier plugins: found by entry point per evidence format, exactly one each, held to
their contract by the host; and the agent refusing a platform nobody could verify.

Distributions are real (a ``dist-info`` with ``entry_points.txt`` and a module) written to a
temporary directory and put on a subprocess's ``PYTHONPATH``, as tests/test_plugins.py does
for platforms.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack_core import EvidenceError, PluginError, hookimpl
from dstack_core.errors import VerifierPluginError
from dstack_core.plugins import VERIFIER_ENTRY_POINT_GROUP
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.types import REPORT_DATA_LENGTH
from dstack_core.verify import (
    CHECK_NAMES,
    CORE_CHECKS,
    SNP_CHECK_NAMES,
    CheckResult,
    PlatformReport,
    PlatformVerification,
    VerifierHost,
    VerifierInfo,
    VerifyOptions,
    default_host,
    load_evidence,
    verify_evidence,
)

from .test_plugins import agent_cli, fake_distribution, pythonpath, serve

NOW = 1_800_000_000

NOVER_PLATFORM = """\
import attrs

from dstack_core import hookimpl
from dstack_simulator import SimulatorPlatform


class NoVerifierPlatform(SimulatorPlatform):
    @hookimpl
    def platform_info(self):
        info = super().platform_info()
        return attrs.evolve(info, name="nover", tag="nover-sim", evidence_format="acme-cc")
"""

SECOND_TDX_VERIFIER = """\
from dstack_tdx.verifier import TdxVerifier


class OtherTdxVerifier(TdxVerifier):
    pass
"""


@pytest.fixture(scope="module")
def nover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A platform ``nover`` whose evidence format, ``acme-cc``, no installed plugin verifies."""
    site = tmp_path_factory.mktemp("nover")
    fake_distribution(site, "fake-nover", {"nover": "fake_nover:NoVerifierPlatform"},
                      {"fake_nover": NOVER_PLATFORM})
    return site


@pytest.fixture(scope="module")
def second_tdx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second distribution registering a ``tdx`` verifier."""
    site = tmp_path_factory.mktemp("tdx2")
    fake_distribution(site, "fake-tdx-verifier",
                      {"tdx": "fake_tdx2:OtherTdxVerifier"}, {"fake_tdx2": SECOND_TDX_VERIFIER},
                      group=VERIFIER_ENTRY_POINT_GROUP)
    return site


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir("vpl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestAgentStartUp:
    def test_platform_without_a_verifier_does_not_start(self, nover, workdir):
        """A platform whose evidence format has no verifier plugin stops start-up: exit 2,
        one line naming the format and what is installed, nothing created."""
        result = serve(workdir, "--platform", "nover", env=pythonpath(nover))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        installed = (
            "installed: sev-snp (dstack_sev_snp_stub.verifier:SnpVerifier, from "
            "dstack-sev-snp-stub 0.1.0), tdx (dstack_tdx.verifier:TdxVerifier, from "
            "dstack-tdx 0.1.0)"
        )
        for part in ("platform 'nover' produces evidence format 'acme-cc'",
                     "no verifier plugin for it is installed", installed,
                     "--allow-missing-verifier"):
            assert part in lines[0], lines[0]
        assert not (workdir / "dstack.sock").exists() and not (workdir / "state").exists()

    def test_the_override_flag_starts_it(self, nover):
        """--allow-missing-verifier starts it anyway, with a warning, and it serves."""
        agent = AgentProcess("nover", extra_args=["--allow-missing-verifier"],
                             env=pythonpath(nover))
        try:
            agent.start()
            assert agent.call("GetKey", {"path": "p"})[0] == 200
            assert "no verifier plugin for evidence format 'acme-cc'" in agent.output()
        finally:
            agent.stop()
            shutil.rmtree(agent.workdir, ignore_errors=True)

    def test_the_override_config_key_starts_it(self, nover, tmp_path):
        """``allow_missing_verifier = true`` in a config file does the same."""
        config = tmp_path / "agent.toml"
        config.write_text("allow_missing_verifier = true\n")
        agent = AgentProcess("nover", extra_args=["--config", str(config)], env=pythonpath(nover))
        try:
            agent.start()
            assert agent.call("Version", {})[0] == 200
        finally:
            agent.stop()
            shutil.rmtree(agent.workdir, ignore_errors=True)

    def test_conflicting_verifiers_stop_start_up(self, second_tdx, workdir):
        """Two distributions registering the simulator's format stop start-up, naming both."""
        result = serve(workdir, "--platform", "simulator", env=pythonpath(second_tdx))
        assert result.returncode == 2, result.stderr
        assert "conflicting verifier plugins for evidence format 'tdx', provided by:" in result.stderr
        assert "from fake-tdx-verifier 0.1" in result.stderr
        assert "from dstack-tdx 0.1.0" in result.stderr


class TestListing:
    def test_verifiers_lists_the_installed_plugins(self):
        """``dstack-agent verifiers --json`` lists each format's plugin, checks and options."""
        result = agent_cli("verifiers", "--json")
        assert result.returncode == 0, result.stderr
        listed = {v["evidence_format"]: v for v in json.loads(result.stdout)}
        assert set(listed) == {"tdx", "sev-snp"}
        assert listed["tdx"]["distribution"] == "dstack-tdx"
        assert listed["tdx"]["checks"] == list(CHECK_NAMES[1:1 + len(listed["tdx"]["checks"])])
        assert "kds_url" in listed["sev-snp"]["options"]

    def test_builtin_plugins_declare_the_documented_check_lists(self):
        """The tdx and sev-snp plugins' checks, between the core's, are CHECK_NAMES and
        SNP_CHECK_NAMES (names are stable API)."""
        host = default_host()
        for fmt, names in (("tdx", CHECK_NAMES), ("sev-snp", SNP_CHECK_NAMES)):
            info = host.get(fmt).info
            assert ("evidence", *info.checks, *CORE_CHECKS[1:]) == names

    def test_conflicting_verifiers_stop_the_verifier(self, second_tdx, tmp_path):
        """``dstack-agent verify`` with two plugins for one format: exit 2, both named."""
        evidence = tmp_path / "e"
        evidence.write_bytes(b"x")
        result = agent_cli("verify", str(evidence), env=pythonpath(second_tdx))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "conflicting verifier plugins for evidence format 'tdx'" in result.stderr
        assert "fake-tdx-verifier 0.1" in result.stderr

    def test_unknown_verifier_option_is_refused(self, tmp_path):
        """A --verifier-option key its plugin does not take: exit 2 listing the accepted."""
        evidence = tmp_path / "e"
        evidence.write_bytes(b"x")
        result = agent_cli("verify", str(evidence), "--verifier-option", "sev-snp:nope=1")
        assert result.returncode == 2
        assert "unknown verifier option(s) nope for evidence format 'sev-snp'" in result.stderr
        assert "kds_url" in result.stderr


# --- the contract, in process ----------------------------------------------------------------

INFO = VerifierInfo(
    evidence_format="probe-cc",
    checks=("probe_signature", "probe_policy"),
    authenticated_by=("probe_signature",),
    quote_verified_by=("probe_signature", "probe_policy"),
)


def probe_report(raw: bytes) -> PlatformReport:
    return PlatformReport(evidence_format="probe-cc", raw=raw, platform="probe-cc",
                          report_data=raw[:REPORT_DATA_LENGTH].ljust(REPORT_DATA_LENGTH, b"\0"),
                          description="a probe report")


class ProbeVerifier:
    """A minimal verifier: the signature 'passes' when the report starts with ``ok``."""

    simulated = False

    @hookimpl
    def verifier_info(self) -> VerifierInfo:
        return INFO

    @hookimpl
    def decode_evidence(self, evidence: bytes) -> PlatformReport:
        return probe_report(evidence)

    @hookimpl
    def verify_platform(self, report: PlatformReport) -> PlatformVerification:
        signed = report.raw.startswith(b"ok")
        return PlatformVerification(
            checks=(
                CheckResult(name="probe_signature", status="pass" if signed else "fail",
                            detail="probe", mandatory=True),
                CheckResult(name="probe_policy", status="pass", detail="probe", mandatory=True),
            ),
            simulated=self.simulated,
        )


def host_of(plugin: object) -> VerifierHost:
    return VerifierHost.from_plugins({"probe-cc": plugin}, distribution="probe-dist", version="9")


def envelope(raw: bytes) -> bytes:
    from dstack_core.envelope import Envelope

    return Envelope(platform="probe-cc", evidence_format="probe-cc", quote=raw,
                    report_data=raw[:REPORT_DATA_LENGTH].ljust(REPORT_DATA_LENGTH, b"\0")).to_cbor()


def verify_with(plugin: object, raw: bytes, **options: Any):
    host = host_of(plugin)
    return verify_evidence(load_evidence(envelope(raw), host=host),
                           VerifyOptions(now=NOW, **options), host=host)


class TestContract:
    def test_a_plugin_verifies_its_format(self):
        """A minimal plugin's format verifies through the core: its checks between the
        core's, the plugin named with its version, no identity (no registers)."""
        result = verify_with(ProbeVerifier(), b"ok probe")
        assert result.verdict == "pass", result.reason
        assert [c.name for c in result.checks] == ["evidence", "probe_signature", "probe_policy",
                                                    *CORE_CHECKS[1:]]
        assert result.verifier is not None
        assert (result.verifier.plugin, result.verifier.version) == ("probe-dist", "9")
        assert result.to_json()["verifier"]["checks"] == ["probe_signature", "probe_policy"]
        assert not result.identity_bound and result.check("event_log").status == "skipped"
        assert verify_with(ProbeVerifier(), b"no probe").verdict == "fail"

    def test_format_without_a_plugin_is_unsupported(self):
        """Evidence of a format no plugin verifies is unsupported_evidence, naming what is."""
        with pytest.raises(EvidenceError) as info:
            load_evidence(envelope(b"ok"), host=VerifierHost.from_plugins({}))
        assert info.value.code == "unsupported_evidence"
        assert "no verifier plugin for evidence format 'probe-cc' is installed" in info.value.message

    def test_simulated_evidence_needs_the_opt_in_whatever_the_plugin_says(self):
        """A plugin that passes its authenticating checks on simulated evidence without
        allow_simulator is overruled: the core fails the first authenticating check."""
        lax = ProbeVerifier()
        lax.simulated = True
        result = verify_with(lax, b"ok probe")
        assert result.verdict == "fail" and result.simulated
        assert result.reason.startswith("probe_signature: the evidence is simulated")
        assert verify_with(lax, b"ok probe", allow_simulator=True).verdict == "pass"

    def test_missing_required_hooks_are_named(self):
        """A plugin without decode_evidence or verify_platform does not load."""

        class Incomplete:
            @hookimpl
            def verifier_info(self) -> VerifierInfo:
                return INFO

        with pytest.raises(PluginError, match="does not implement required hooks: "
                                              "decode_evidence, verify_platform"):
            host_of(Incomplete()).get("probe-cc")

    def test_info_for_another_format_is_refused(self):
        """A plugin registered as probe-cc that says it verifies tdx does not load."""

        class Liar(ProbeVerifier):
            @hookimpl
            def verifier_info(self) -> VerifierInfo:
                return VerifierInfo(evidence_format="tdx", checks=INFO.checks,
                                    authenticated_by=INFO.authenticated_by,
                                    quote_verified_by=INFO.quote_verified_by)

        with pytest.raises(PluginError, match="says it verifies evidence format 'tdx'"):
            host_of(Liar()).get("probe-cc")

    def test_wrong_answers_are_contract_violations(self):
        """A decode that answers a dict, or checks other than the declared ones, fails the
        verification with verifier_plugin_error."""

        class DictDecoder(ProbeVerifier):
            @hookimpl
            def decode_evidence(self, evidence: bytes) -> Any:
                return {"report_data": evidence}

        with pytest.raises(VerifierPluginError, match="returned dict from decode_evidence"):
            load_evidence(envelope(b"ok"), host=host_of(DictDecoder()))

        class Skipper(ProbeVerifier):
            @hookimpl
            def verify_platform(self, report: PlatformReport) -> PlatformVerification:
                return PlatformVerification(checks=(
                    CheckResult(name="probe_policy", status="pass", detail="", mandatory=True),))

        with pytest.raises(VerifierPluginError, match="broke its contract"):
            verify_with(Skipper(), b"ok")

    def test_a_plugin_bug_leaks_no_exception_text(self, caplog):
        """A foreign exception becomes verifier_plugin_error naming the plugin, never the
        exception's text; the traceback goes to the log."""

        class Crasher(ProbeVerifier):
            @hookimpl
            def verify_platform(self, report: PlatformReport) -> PlatformVerification:
                raise RuntimeError("/secret/path/key.pem not found")

        with pytest.raises(VerifierPluginError) as info:
            verify_with(Crasher(), b"ok")
        assert info.value.code == "verifier_plugin_error" and info.value.http_status == 500
        assert "secret" not in info.value.message and "probe-dist" in info.value.message
        assert "/secret/path/key.pem" in caplog.text

    def test_undeclared_check_names_cannot_be_results(self):
        """A check result's name is the core's or a declared plugin check: a typo is caught."""
        with pytest.raises(ValueError, match="unknown check name"):
            CheckResult(name="probe_signatrue", status="pass", detail="")

    def test_conflicting_plugins_for_a_format(self):
        """Two installed plugins for one format: the host refuses the format, naming both."""
        from dstack_core.plugins import InstalledVerifier

        installed = [InstalledVerifier(evidence_format="probe-cc", value=f"m{i}:V",
                                       distribution=f"dist-{i}", version="1") for i in (1, 2)]
        host = VerifierHost({"probe-cc": installed}, lambda found: ProbeVerifier)
        with pytest.raises(PluginError, match="conflicting verifier plugins for evidence format "
                                              "'probe-cc', provided by: probe-cc \\(m1:V, from "
                                              "dist-1 1\\), probe-cc \\(m2:V"):
            host.get("probe-cc")


class TestCheckedResult:
    """checked_result fills a CheckResult's slots directly; it must be the validating
    constructor's value, and refuse what it refuses."""

    @pytest.mark.parametrize("mandatory", [True, False])
    @pytest.mark.parametrize("status", ["pass", "fail", "skipped"])
    def test_is_the_validated_one(self, status: str, mandatory: bool) -> None:
        from dstack_core.verify.checks import checked_result

        fast = checked_result("event_log", status, "detail", mandatory)
        validated = CheckResult(name="event_log", status=status, detail="detail",
                                mandatory=mandatory)
        assert fast == validated and hash(fast) == hash(validated) and repr(fast) == repr(validated)

    @pytest.mark.parametrize(
        ("name", "status"), [("no_such_check", "pass"), ("event_log", "passed")]
    )
    def test_refuses_what_the_constructor_refuses(self, name: str, status: str) -> None:
        from dstack_core.verify.checks import checked_result

        with pytest.raises(ValueError):
            checked_result(name, status, "detail", False)
