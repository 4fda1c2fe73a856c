"""Tests for `dstack-agent verify`: flags, output document, exit status."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dstack_core.cli import main
from dstack_core.verify import CHECK_NAMES

from .conftest import Bundle, run_cli

APP_DATA = b"cli-content"


@pytest.fixture(scope="module")
def files(agent, bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Evidence and trust files written once from the module's simulator agent."""
    root = tmp_path_factory.mktemp("verify-cli")
    trust = root / "bundle"
    trust.mkdir()
    (trust / "collateral.json").write_text(bundle.collateral_json)
    pem = x509.load_der_x509_certificate(bundle.root_ca_der).public_bytes(Encoding.PEM)
    (trust / "root_ca.pem").write_bytes(pem)
    assert bundle.os_image_policy_json is not None
    (trust / "os_image_policy.json").write_text(bundle.os_image_policy_json)
    report_data = hashlib.sha512(b"app-data:" + APP_DATA).digest()
    _, attest = agent.call("Attest", {"report_data": report_data.hex()})
    status, quote = agent.call("GetQuote", {"report_data": "0c11"})
    assert status == 200, quote
    _, tls = agent.call("GetTlsKey", {"subject": "cli", "usage_ra_tls": True})
    (root / "attest.bin").write_bytes(bytes.fromhex(attest["attestation"]))
    (root / "attest.hex").write_text(attest["attestation"] + "\n")
    (root / "quote.json").write_text(json.dumps(quote))
    (root / "cert.pem").write_text("".join(tls["certificate_chain"]))
    (root / "garbage").write_bytes(b"\x01\x02garbage")
    return {"trust": trust, "root": root}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``dstack-agent verify ARGS`` in-process: (exit status, stdout JSON, stderr)."""
    code = main(["verify", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def trusted(files: dict[str, Path]) -> list[str]:
    return ["--trust-bundle", str(files["trust"]), "--allow-simulator"]


class TestVerdicts:
    def test_pass_prints_checks_and_values(self, files, capsys):
        """Simulator evidence with the trust bundle and opt-in: exit 0, full document."""
        code, doc, err = run(
            capsys,
            str(files["root"] / "attest.bin"),
            *trusted(files),
            "--allow-tcb-status",
            "SWHardeningNeeded",
            "--reject-advisory",
            "INTEL-SA-00001",
        )
        assert code == 0, doc["reason"]
        assert doc["verdict"] == "pass" and doc["simulated"] is True
        assert list(doc["checks"]) == list(CHECK_NAMES)
        assert all(set(c) == {"status", "detail", "mandatory"} for c in doc["checks"].values())
        for key in (
            "platform",
            "tcb_status",
            "rtmrs",
            "app_id",
            "compose_hash",
            "instance_id",
            "key_provider",
            "os_image_hash",
            "mr_aggregated",
        ):
            assert key in doc
        assert doc["platform"] == "simulator" and len(doc["rtmrs"]) == 4
        assert "WARNING: simulated evidence" in err

    def test_fail_without_opt_in_exits_1(self, files, capsys):
        """The same evidence without --allow-simulator: verdict fail, exit 1."""
        code, doc, err = run(
            capsys,
            str(files["root"] / "attest.bin"),
            "--collateral",
            str(files["trust"] / "collateral.json"),
            "--root-ca",
            str(files["trust"] / "root_ca.pem"),
        )
        assert code == 1
        assert doc["checks"]["simulator_policy"]["status"] == "fail"
        assert "verdict fail: simulator_policy" in err

    @pytest.mark.parametrize("name", ["attest.hex", "quote.json", "cert.pem"])
    def test_every_input_form(self, files, capsys, name):
        """Hex envelope, GetQuote JSON and a PEM chain all verify from a file."""
        code, doc, _ = run(capsys, str(files["root"] / name), *trusted(files))
        assert code == 0, doc["reason"]

    def test_expected_content_and_report_data(self, files, capsys):
        """--expect-content hashes like the agent; --expect-report-data compares raw."""
        evidence = str(files["root"] / "attest.bin")
        code, doc, _ = run(capsys, evidence, *trusted(files), "--expect-content", APP_DATA.hex())
        assert code == 0 and doc["checks"]["report_data"]["status"] == "pass"
        raw = hashlib.sha512(b"app-data:" + APP_DATA).hexdigest()
        code, doc, _ = run(capsys, evidence, *trusted(files), "--expect-report-data", raw)
        assert code == 0
        code, doc, _ = run(capsys, evidence, *trusted(files), "--expect-report-data", "00")
        assert code == 1 and doc["checks"]["report_data"]["status"] == "fail"

    def test_now_pins_the_verification_time(self, files, capsys):
        """--now before the collateral was issued fails collateral; in its window passes."""
        evidence = str(files["root"] / "attest.bin")
        code, doc, _ = run(capsys, evidence, *trusted(files), "--now", "1500000000")
        assert code == 1 and doc["checks"]["collateral"]["status"] == "fail"
        assert doc["verified_at"] == 1500000000
        code, doc, _ = run(capsys, evidence, *trusted(files), "--now", "1700000000")
        assert code == 0

    def test_no_collateral_says_why(self, files, capsys):
        """Without collateral the quote checks are skipped with a hint; exit 1."""
        code, doc, _ = run(
            capsys,
            str(files["root"] / "attest.bin"),
            "--allow-simulator",
            "--root-ca",
            str(files["trust"] / "root_ca.pem"),
        )
        assert code == 1
        assert "--collateral" in doc["checks"]["quote_signature"]["detail"]


class TestOsImage:
    def test_expected_registers(self, files, capsys):
        """--expect-mrtd/--expect-rtmr for one image: the simulator's registers pass with
        os_image mandatory; another MRTD fails os_image (exit 1)."""
        evidence = str(files["root"] / "attest.bin")
        bundle = ["--root-ca", str(files["trust"] / "root_ca.pem"), "--collateral",
                  str(files["trust"] / "collateral.json"), "--allow-simulator"]
        code, doc, err = run(capsys, evidence, *bundle)
        assert code == 0 and doc["os_image_verified"] is False and doc["os_image_hash"] == ""
        assert "OS IMAGE UNVERIFIED" in err
        pinned = ["--expect-mrtd", doc["mrtd"]] + [
            arg for i in range(3) for arg in ("--expect-rtmr", f"{i}={doc['rtmrs'][i]}")
        ]
        code, doc, err = run(capsys, evidence, *bundle, *pinned)
        assert code == 0 and doc["checks"]["os_image"]["status"] == "pass"
        assert doc["checks"]["os_image"]["mandatory"] and "OS IMAGE" not in err
        code, doc, _ = run(capsys, evidence, *bundle, "--expect-mrtd", "00" * 48)
        assert code == 1 and doc["reason"].startswith("os_image:")

    def test_policy_file(self, files, capsys, tmp_path):
        """--os-image-policy FILE: the bundle's file passes; a file of another image fails."""
        evidence = str(files["root"] / "attest.bin")
        bundle = ["--root-ca", str(files["trust"] / "root_ca.pem"), "--collateral",
                  str(files["trust"] / "collateral.json"), "--allow-simulator"]
        policy = str(files["trust"] / "os_image_policy.json")
        code, doc, _ = run(capsys, evidence, *bundle, "--os-image-policy", policy)
        assert code == 0 and doc["os_image_verified"] is True and doc["os_image_hash"]
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"version": 1, "images": {
            "11" * 32: {"mrtd": "22" * 48, "rtmr0": "33" * 48, "rtmr1": "33" * 48, "rtmr2": "33" * 48}
        }}))
        code, doc, _ = run(capsys, evidence, *bundle, "--os-image-policy", str(other))
        assert code == 1 and doc["reason"].startswith("os_image:") and doc["os_image_hash"] == ""


class TestErrors:
    def test_garbage_exits_2_with_json_error(self, files, capsys):
        """Unrecognisable evidence: exit 2, {"verdict": "fail", "error", "code"} on stdout."""
        code, doc, err = run(capsys, str(files["root"] / "garbage"), *trusted(files))
        assert code == 2
        assert doc["verdict"] == "fail" and doc["code"] == "malformed_evidence"
        assert "unrecognised evidence" in doc["error"] and "error:" in err

    @pytest.mark.parametrize(
        "args",
        [
            ["--root-ca", "/nonexistent/root.pem"],
            ["--collateral", "/nonexistent/collateral.json"],
            ["--expect-report-data", "zz"],
            ["--expect-report-data", "00" * 65],
            ["--expect-content", "00", "--content-hash", "md5"],
            ["--now", "-5"],
            ["--expect-report-data", ""],
            ["--expect-mrtd", "zz"],
            ["--expect-mrtd", "00" * 47],
            ["--expect-rtmr", "3=" + "00" * 48],
            ["--expect-rtmr", "0"],
            ["--os-image-policy", "/nonexistent/policy.json"],
            ["--trust-anchor", "/nonexistent/ca.pem"],
        ],
    )
    def test_bad_flags_exit_2(self, files, capsys, args):
        """Unusable flags are an error (exit 2), never a verdict."""
        code, doc, _ = run(capsys, str(files["root"] / "attest.bin"), *args)
        assert code == 2 and doc["error"]

    def test_missing_file_exits_2(self, capsys):
        """A missing evidence file is an error."""
        code, doc, _ = run(capsys, "/nonexistent/evidence")
        assert code == 2 and "cannot read evidence" in doc["error"]


class TestSubprocess:
    def test_stdin_and_exit_status(self, files):
        """`dstack-agent verify -` reads stdin; the real process exits 0 on pass."""
        hex_text = (files["root"] / "attest.hex").read_bytes()
        result = run_cli("verify", "-", "--compact", *trusted(files), input=hex_text, check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["verdict"] == "pass"
        assert len(result.stdout.strip().splitlines()) == 1

    def test_help_names_the_flags(self):
        """The documented flags exist under these names."""
        text = run_cli("verify", "--help").stdout
        for flag in (
            "--collateral",
            "--pccs-url",
            "--root-ca",
            "--allow-simulator",
            "--now",
            "--expect-report-data",
            "--allow-tcb-status",
        ):
            assert flag in text
        assert "--listen" in run_cli("verifier", "--help").stdout
