"""A plain ``dstack-agent serve`` does not import the modules of features it was not asked
for (docs/performance.md, "Startup"): each costs start-up time, and a top-level import
added anywhere on serve's path would bring it back silently.

The agent runs as a real subprocess with ``PYTHONPROFILEIMPORTTIME`` (``-X importtime``),
which writes one line per module imported to its log; the modules are read from there
after it has answered every default method, not only at start-up.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator

import pytest

from dstack_core.testing import AgentProcess, short_tempdir

from .test_lifecycle import free_port

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(?P<module>[\w.]+)\s*$", re.MULTILINE)

OPTIONAL: dict[str, str] = {
    "dstack_core.policy": "caller policy (--policy)",
    "dstack_core.peercred": "caller policy and audit log (the guard identifies callers)",
    "dstack_core.server.guard": "caller policy and audit log",
    "dstack_core.audit": "audit log (--audit-log; dstack-agent audit verify)",
    "dstack_core.upstream": "upstream attestation format (--attestation-format upstream)",
    "dstack_core.server.external": "the external port (--external-listen)",
    "dstack_core.kms": "KMS key provider",
    "dstack_core.ccel": "dstack-agent eventlog show",
    "dstack_core.verify": "dstack-agent verify / verifier",
    "dstack_core.collateral": "dstack-agent verify / verifier",
    "dstack_core.server.verifier": "dstack-agent verifier",
    "dstack_core.osimage": "trust bundles and verifiers",
    "dcap_qvl": "dstack-agent verify / verifier",
    "tomllib": "TOML config files (--config, --policy)",
}
"""Module -> the feature that needs it, all off in a plain ``serve``."""

DEFAULT_CALLS: tuple[tuple[str, dict[str, object]], ...] = (
    ("GetKey", {"path": "lazy"}),
    ("Sign", {"algorithm": "ed25519", "data": "00"}),
    ("GetQuote", {"report_data": "00"}),
    ("GetTlsKey", {"subject": "lazy", "usage_ra_tls": True}),
    ("Attest", {"report_data": "00"}),
    ("EmitEvent", {"event": "lazy", "payload": "00"}),
    ("Info", {}),
)


def imported_modules(agent: AgentProcess) -> set[str]:
    modules = {m["module"] for m in IMPORT_LINE.finditer(agent.output())}
    assert "dstack_core.service" in modules, "no import trace in the agent's log"
    return modules


def run_agent(*extra_args: str) -> Iterator[AgentProcess]:
    workdir = short_tempdir("lazy")
    agent = AgentProcess("simulator", workdir=workdir, extra_args=list(extra_args),
                         env={"PYTHONPROFILEIMPORTTIME": "1"}).start()
    try:
        for method, args in DEFAULT_CALLS:
            status, body = agent.call(method, args)
            assert status == 200, (method, body)
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_agent() -> Iterator[AgentProcess]:
    yield from run_agent()


@pytest.fixture(scope="module")
def featured_agent() -> Iterator[AgentProcess]:
    workdir = short_tempdir("lazyf")
    policy = workdir / "policy.toml"
    policy.write_text(f'[[rule]]\nmatch = {{ uid = {os.getuid()} }}\nmethods = ["*"]\n')
    yield from run_agent("--attestation-format", "upstream", "--audit-log",
                         str(workdir / "audit.log"), "--policy", str(policy),
                         "--external-listen", f"127.0.0.1:{free_port()}")
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_plain_serve_does_not_import(plain_agent, module):
    """After start-up and one call of every default method, the optional feature's module
    has not been imported."""
    assert module not in imported_modules(plain_agent), OPTIONAL[module]


@pytest.mark.parametrize("module", [
    "dstack_core.policy", "dstack_core.peercred", "dstack_core.server.guard",
    "dstack_core.audit", "dstack_core.upstream", "dstack_core.server.external", "tomllib",
])
def test_features_import_their_modules(featured_agent, module):
    """The control: with the caller policy, the audit log, upstream's format and the
    external port switched on, their modules do load, so the trace above would show them."""
    assert module in imported_modules(featured_agent)


def test_serve_imports_pause_the_gc_and_resume_it():
    """``serve`` imports its server with the cyclic GC paused: inside the block it is off,
    afterwards on again (also after an error), and what the block made is frozen."""
    import gc

    from dstack_core.cli import gc_paused_and_frozen

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with gc_paused_and_frozen():
            assert not gc.isenabled()
            made = [[] for _ in range(100)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
        with pytest.raises(RuntimeError), gc_paused_and_frozen():
            raise RuntimeError("import failed")
        assert gc.isenabled()
    finally:
        gc.unfreeze()
