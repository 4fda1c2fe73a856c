"""Public test kit for dstack-core and platform plugin authors.

* :mod:`dstack_core.testing.agent`: run a real agent in a subprocess on a temporary socket.
* :mod:`dstack_core.testing.pytest_plugin`: pytest fixtures (registered as the ``pytest11``
  plugin ``dstack_core``): plugin manager, configured platform, running agent.
* :mod:`dstack_core.testing.conformance`: the conformance suite every platform passes
  (``pytest --dstack-platform NAME --pyargs dstack_core.testing.conformance``).
* :mod:`dstack_core.testing.fake_tee`: kernel-faithful fakes of the TDX (and SEV-SNP)
  guest interfaces for tests without TEE hardware.
"""

from __future__ import annotations

from .agent import AgentProcess, short_tempdir, uds_request

__all__ = ["AgentProcess", "short_tempdir", "uds_request"]
