"""The conformance suite's agent tests with a caller policy in place (simulator).

The agent runs under :func:`~dstack_core.testing.pytest_plugin.conformance_policy`: default
deny, and the test process's uid gets exactly the methods the suite calls, with keys under
``conformance/`` only. The kit keeps an audit log and fails a test whose log does not verify.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dstack_core.audit import verify_audit_log
from dstack_core.testing.conformance import TestAgent
from dstack_core.testing.pytest_plugin import PlatformAgent, conformance_policy

__all__ = ["TestAgent", "TestPolicyInForce"]


@pytest.fixture(scope="session")
def dstack_platform_name() -> str:
    """The platform under test."""
    return "simulator"


@pytest.fixture
def dstack_agent_policy(tmp_path: Path) -> Path:
    """The restrictive policy the conformance agent tests must pass under."""
    path = tmp_path / "policy.toml"
    path.write_text(conformance_policy(os.getuid()))
    return path


class TestPolicyInForce:
    def test_policy_is_enforced_and_audited(self, dstack_agent: PlatformAgent) -> None:
        """The policy the suite passes under is really enforced, and audited."""
        assert dstack_agent.call("GetKey", {"path": "conformance/x"})[0] == 200
        for method, args in (("GetKey", {"path": "elsewhere"}), ("Sign", {"algorithm": "ed25519"}),
                             ("GetTlsKey", {}), ("Verify", {})):
            status, body = dstack_agent.call(method, args)
            assert (status, body["code"]) == (403, "forbidden"), method
        assert dstack_agent.audit_log is not None
        result = verify_audit_log(dstack_agent.audit_log)
        assert result.intact and result.records == 6  # start, the GetKey, four denials
