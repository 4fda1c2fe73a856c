"""Public test kit for dstack-core and platform plugin authors.

* :mod:`dstack_core.testing.agent`: run a real agent in a subprocess on a temporary socket.
"""

from __future__ import annotations

from .agent import AgentProcess, short_tempdir, uds_request

__all__ = ["AgentProcess", "short_tempdir", "uds_request"]
