"""Shared fixtures: real agents in subprocesses, the simulator's trust bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from dstack_core.osimage import OsImagePolicy
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.testing.logscan import record_output
from dstack_core.verify import VerifyOptions

# Every log of the session is scanned for the test keys at the end (docs/reliability.md).
pytest_plugins = ["dstack_core.testing.logscan_plugin"]

DATA = Path(__file__).parent / "data"
UPSTREAM_APPKEYS = DATA / "upstream_simulator_appkeys.json"


@attrs.frozen
class Bundle:
    root_ca_der: bytes
    collateral_json: str
    os_image_policy_json: str | None = None

    @property
    def os_image_policy(self) -> OsImagePolicy | None:
        """The bundle's OS image policy (the simulated image's MRTD and RTMR0-2)."""
        if self.os_image_policy_json is None:
            return None
        return OsImagePolicy.from_json(self.os_image_policy_json)

    def verify_options(self, now: int, **changes: Any) -> VerifyOptions:
        """Options that trust this bundle: its root CA (with the simulator opt-in) and its
        OS image policy; ``changes`` override any field."""
        fields: dict[str, Any] = {
            "now": now,
            "root_ca_der": self.root_ca_der,
            "allow_simulator": True,
            "os_image_policy": self.os_image_policy,
        }
        return VerifyOptions(**{**fields, **changes})


@attrs.frozen(kw_only=True)
class PlatformTraits:
    """What the end-to-end tests expect of the platform behind the ``agent`` fixture."""

    tag: str
    simulated: bool
    user_data_marker: bytes


SIMULATOR_TRAITS = PlatformTraits(tag="simulator", simulated=True, user_data_marker=b"DSTACK-SIMULATOR")


def input_path(agent: AgentProcess, name: str) -> Path:
    """An agent's input file by its simulator state-dir name (``appkeys.json``, ...).

    Agents on other platforms (e.g. :class:`~dstack_core.testing.fake_tee.FakeTdxAgent`) say
    where their inputs are in ``input_files``.
    """
    files = getattr(agent, "input_files", None)
    return files[name] if files else agent.state_dir / name


def run_cli(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dstack-agent ARGS`` as a subprocess, capturing text output (stderr is kept
    for the log scan)."""
    result = subprocess.run(
        [sys.executable, "-m", "dstack_core.cli", *args],
        capture_output=True, text=True, check=False, timeout=120,
        input=input.decode() if input is not None else None,
    )
    record_output("cli", result.stderr)
    if check:
        result.check_returncode()
    return result


def trust_bundle_for(state_dir: Path) -> Bundle:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out = short_tempdir("bundle")
    run_cli("simulator", "trust-bundle", "--state-dir", str(state_dir), "--out", str(out))
    root = x509.load_pem_x509_certificate((out / "root_ca.pem").read_bytes())
    policy = out / "os_image_policy.json"
    bundle = Bundle(
        root.public_bytes(Encoding.DER),
        (out / "collateral.json").read_text(),
        policy.read_text() if policy.exists() else None,
    )
    shutil.rmtree(out)
    return bundle


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    """A simulator agent with freshly generated keys, shared by a test module."""
    proc = AgentProcess("simulator").start()
    yield proc
    proc.stop()
    shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def upstream_agent() -> Iterator[AgentProcess]:
    """A simulator agent on upstream's simulator app keys (for known-answer tests)."""
    proc = AgentProcess("simulator", extra_args=["--appkeys", str(UPSTREAM_APPKEYS)]).start()
    yield proc
    proc.stop()
    shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def platform_traits() -> PlatformTraits:
    """The simulator's markers; modules running the same tests on another platform override it."""
    return SIMULATOR_TRAITS


@pytest.fixture(scope="module")
def bundle(agent: AgentProcess) -> Bundle:
    """The trust bundle published for ``agent``'s state dir, while it serves."""
    return trust_bundle_for(agent.state_dir)


@pytest.fixture
def fresh_agent() -> Iterator[AgentProcess]:
    """An agent of its own for tests that restart, kill or reconfigure it."""
    proc = AgentProcess("simulator")
    yield proc
    if proc.proc is not None:
        proc.stop()
    shutil.rmtree(proc.workdir, ignore_errors=True)


TINY_TMPFS_BYTES = 64 * 1024


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A freshly mounted 64 KiB tmpfs, to fill a file system for real (needs root)."""
    mountpoint = short_tempdir("fs")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TINY_TMPFS_BYTES},mode=0755", "tmpfs",
         str(mountpoint)],
        capture_output=True, text=True, check=False,
    ) if os.geteuid() == 0 else None
    if result is None or result.returncode != 0:
        mountpoint.rmdir()
        reason = "not root" if result is None else result.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs to fill ({reason})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()
