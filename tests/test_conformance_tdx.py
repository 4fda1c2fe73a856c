"""The platform conformance suite against the TDX plugin on the kernel-faithful fake."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack_core.testing.conformance import *  # noqa: F403 (the suite is collected by name)
from dstack_core.testing.fake_tee import FakeTdxMachine
from dstack_core.testing.pytest_plugin import PlatformEnv


@pytest.fixture(scope="session")
def dstack_platform_name() -> str:
    """The platform under test."""
    return "tdx"


@pytest.fixture
def dstack_platform_env(tmp_path: Path) -> Iterator[PlatformEnv]:
    """A fresh fake TD (configfs-tsm, sysfs RTMRs, CCEL, provisioned inputs) per test."""
    yield FakeTdxMachine.create(tmp_path / "td").platform_env()
