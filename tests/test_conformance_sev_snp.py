"""The platform conformance suite (dstack_core.testing.conformance) against sev-snp-stub.

The suite's classes are re-exported here; the fixtures pin ``sev-snp-stub`` and give it a
fresh fake SEV-SNP guest per test (configfs-tsm and /dev/sev-guest), with the fake kernel
allowed. Tests about runtime registers are skipped by the suite itself: SNP has none.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from dstack_core.testing import short_tempdir
from dstack_core.testing.conformance import *  # noqa: F403 (the suite is collected by name)
from dstack_core.testing.fake_tee import FakeSnpMachine
from dstack_core.testing.pytest_plugin import PlatformEnv


@pytest.fixture(scope="session")
def dstack_platform_name() -> str:
    """The platform under test."""
    return "sev-snp-stub"


@pytest.fixture
def dstack_platform_env() -> Iterator[PlatformEnv]:
    """A freshly launched fake SNP guest, its inputs, and the fake kernel allowed."""
    workdir = short_tempdir("csnp")
    yield FakeSnpMachine.create(workdir / "tree").platform_env()
    shutil.rmtree(workdir, ignore_errors=True)
