"""The log scanner finds a secret in every form a log call could print it, and fails a run.

The whole suite runs under :mod:`dstack_core.testing.logscan_plugin` (tests/conftest.py):
these tests show that the scanner behind it cannot silently pass, by leaking keys on
purpose, in-process and in a pytest run of its own.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dstack_core.testing import AgentProcess, logscan
from dstack_core.testing.agent import TEMP_BASE_ENV
from dstack_core.testing.logscan import Needles, scan_text, secrets_of_key_file

from .conftest import UPSTREAM_APPKEYS

SECRET = bytes.fromhex("d6e88992cdeeee35fe70b5db61ab66cdb191fb9b6ec9313757ef162dd7214d5d")
OTHER = bytes.fromhex("4f3cf0a19a0444674c8e51222afd395b8df9fad2ba3cd7956f640a4b3c046db6")


def needles(*secrets: bytes) -> Needles:
    return Needles.of({s: f"secret-{i}" for i, s in enumerate(secrets)})


def pem_of(scalar: bytes, fmt: serialization.PrivateFormat) -> str:
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, fmt,
                             serialization.NoEncryption()).decode()


LEAKS = {
    "hex": f"derived key {SECRET.hex()}",
    "upper hex": f"KEY={SECRET.hex().upper()}",
    "0x hex": f"0x{SECRET.hex()}",
    "hex at an odd offset": f"blob 5{SECRET.hex()}77",
    "inside a longer hex": f"{os.urandom(40).hex()}{SECRET.hex()}{os.urandom(40).hex()}",
    "first half in hex": f"prefix {SECRET[:16].hex()} (truncated)",
    "last half in hex": f"...{SECRET[16:].hex()}",
    "base64": base64.b64encode(SECRET).decode(),
    "url-safe base64": base64.urlsafe_b64encode(SECRET).decode(),
    "base64 after 1 byte": base64.b64encode(b"\x01" + SECRET + b"tail").decode(),
    "base64 after 2 bytes": base64.b64encode(b"\x01\x02" + SECRET).decode(),
    "bytes repr": f"RootKey(k256_key={SECRET!r})",
    "repr in a dict": repr({"k256_key": SECRET, "other": 1}),
    "PKCS#8 PEM": pem_of(SECRET, serialization.PrivateFormat.PKCS8),
    "SEC1 PEM": pem_of(SECRET, serialization.PrivateFormat.TraditionalOpenSSL),
    "PEM in a JSON string": json.dumps({"key": pem_of(SECRET, serialization.PrivateFormat.PKCS8)}),
    "PEM in a log line": "2026 ERROR x: key " + pem_of(SECRET, serialization.PrivateFormat.PKCS8),
    "traceback": "Traceback (most recent call last):\n  ...\nValueError: bad key "
                 f"{SECRET!r}\n",
}


class TestScanner:
    @pytest.mark.parametrize("form", LEAKS)
    def test_finds_every_form(self, form):
        """A secret printed in any of these forms is found, and named by its label."""
        hits = scan_text(LEAKS[form], needles(OTHER, SECRET), source="log")
        assert hits, form
        assert {h.label for h in hits} == {"secret-1"}

    @pytest.mark.parametrize("form", LEAKS)
    def test_no_false_alarm(self, form):
        """The same text is clean when that secret is not registered."""
        assert scan_text(LEAKS[form], needles(OTHER)) == []

    def test_public_key_and_certificate_are_not_secrets(self):
        """The public key of a registered private key, as PEM and hex, is no hit."""
        key = ec.derive_private_key(int.from_bytes(SECRET, "big"), ec.SECP256R1())
        public = key.public_key()
        text = public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        text += public.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.CompressedPoint).hex()
        assert scan_text(text, needles(SECRET)) == []

    def test_short_fragment_is_not_a_hit(self):
        """Fifteen bytes of a key are below the window and do not count (no chance hits)."""
        assert scan_text(SECRET[:15].hex(), needles(SECRET)) == []

    def test_reports_the_line(self):
        """A hit names the line it is on; a PEM block is reported at its first line."""
        text = "one\ntwo " + SECRET.hex() + "\nthree\n" + pem_of(
            SECRET, serialization.PrivateFormat.PKCS8
        )
        lines = {h.line for h in scan_text(text, needles(SECRET))}
        assert 2 in lines and 5 in lines


class TestKeyFiles:
    def test_appkeys_secrets(self):
        """An appkeys.json yields its k256, disk and env keys and its CA key's scalar."""
        doc = json.loads(UPSTREAM_APPKEYS.read_text())
        found = dict(secrets_of_key_file(UPSTREAM_APPKEYS))
        values = set(found.values())
        for field in ("k256_key", "disk_crypt_key", "env_crypt_key"):
            assert bytes.fromhex(doc[field]) in values
        ca = serialization.load_pem_private_key(doc["key_provider"]["None"]["key"].encode(), None)
        assert isinstance(ca, ec.EllipticCurvePrivateKey)
        assert ca.private_numbers().private_value.to_bytes(32, "big") in values
        assert bytes.fromhex(doc["k256_signature"]) not in values

    def test_seed_file_yields_the_mock_pki_keys(self, tmp_path):
        """A 32-byte .seed file yields itself and the mock PKI keys derived from it."""
        seed = tmp_path / "mock-pki.seed"
        seed.write_bytes(bytes(range(32)))
        labels = [label for label, _ in secrets_of_key_file(seed)]
        assert labels[0] == "mock-pki.seed" and any("root-ca" in label for label in labels)

    def test_agent_keys_and_answers_are_registered(self, agent):
        """The kit registers an agent's app keys and every private key it answered."""
        registered = logscan.registered_secrets()
        doc = json.loads((agent.state_dir / "appkeys.json").read_text())
        assert bytes.fromhex(doc["k256_key"]) in registered
        status, answer = agent.call("GetKey", {"path": "logscan", "purpose": "test"})
        assert status == 200
        assert bytes.fromhex(answer["key"]) in logscan.registered_secrets()
        status, answer = agent.call("GetTlsKey", {"subject": "logscan"})
        key = serialization.load_pem_private_key(answer["key"].encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        assert scalar in logscan.registered_secrets()

    def test_agent_log_is_in_the_scanned_directory(self, agent):
        """Agents started by the kit log into the session's log directory."""
        assert isinstance(agent, AgentProcess)
        assert agent.log_path.parent == Path(os.environ[logscan.LOG_DIR_ENV])


LEAKY_TEST = '''
import logging
import subprocess
import sys

from dstack_core.testing import logscan

KEY = bytes.fromhex("{key}")


def test_leak():
    logscan.register_secret(KEY, "the test key")
    {leak}
'''

LEAKS_IN_A_RUN = {
    "in-process debug log": 'logging.getLogger("leaky").debug("key %s", KEY.hex())',
    "in-process traceback": (
        'try:\n        raise ValueError(KEY)\n    except ValueError:\n'
        '        logging.getLogger("leaky").exception("failed")'
    ),
    "a subprocess's log file": 'logscan.log_file("child").write_text("k=" + KEY.hex())',
    "a subprocess's stderr": (
        'out = subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write(repr(%r))" '
        '% KEY], capture_output=True, text=True)\n    logscan.record_output("child", out.stderr)'
    ),
}


def run_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run pytest with the scan plugin on one test file, outside this session's scan."""
    (tmp_path / "test_inner.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in (logscan.LOG_DIR_ENV, TEMP_BASE_ENV)}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "dstack_core.testing.logscan_plugin", "--rootdir", str(tmp_path),
         str(tmp_path / "test_inner.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )


class TestPlugin:
    @pytest.mark.parametrize("where", LEAKS_IN_A_RUN)
    def test_a_leak_fails_the_run(self, tmp_path, where):
        """A passing test that leaks a registered key makes the run fail, naming the key."""
        source = LEAKY_TEST.format(key=OTHER.hex(), leak=LEAKS_IN_A_RUN[where])
        result = run_pytest(tmp_path, source)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "1 passed" in result.stdout
        assert "secrets in logs" in result.stdout and "the test key" in result.stdout
        assert OTHER.hex() not in result.stdout  # the report never prints the secret

    def test_key_file_left_in_basetemp_is_found(self, tmp_path):
        """An appkeys.json a test leaves in tmp_path is registered at the end, unasked."""
        source = textwrap.dedent(f'''
            import logging
            from pathlib import Path

            def test_writes_keys(tmp_path):
                text = Path({str(UPSTREAM_APPKEYS)!r}).read_text()
                (tmp_path / "appkeys.json").write_text(text)
                logging.getLogger("x").info("keys: %s", text)
        ''')
        result = run_pytest(tmp_path, source)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "appkeys.json k256_key" in result.stdout

    def test_a_clean_run_passes(self, tmp_path):
        """Without a leak the run passes and says what it scanned."""
        source = LEAKY_TEST.format(key=OTHER.hex(), leak='logging.getLogger("x").info("ok")')
        result = run_pytest(tmp_path, source)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no secret logged" in result.stdout


def test_root_logger_records_debug():
    """The session records DEBUG lines (the scan sees what nobody displays)."""
    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
