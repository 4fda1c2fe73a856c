"""The platform conformance suite (dstack_core.testing.conformance) against the simulator.

This is how every platform plugin is held to the contract: the suite's classes are
re-exported here and the platform fixture pins ``simulator``.
"""

from __future__ import annotations

import pytest

from dstack_core.testing.conformance import *  # noqa: F403 (the suite is collected by name)


@pytest.fixture(scope="session")
def dstack_platform_name() -> str:
    """The platform under test."""
    return "simulator"
