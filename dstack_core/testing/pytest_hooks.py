"""The pytest hook dstack-core's pytest plugin adds, for platform packages to implement.

A platform package ships a pytest plugin of its own (an entry point in the ``pytest11``
group, or a module given with ``-p``, or a ``conftest.py``) and implements
:func:`pytest_dstack_platform_env` there; then ``pytest --dstack-platform NAME
--dstack-platform-option device=... --pyargs dstack_core.testing.conformance`` runs every
test on an environment the platform prepares, with no ``conftest.py`` of the user's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .pytest_plugin import PlatformEnv

__all__ = ["pytest_dstack_platform_env"]


@pytest.hookspec(firstresult=True)
def pytest_dstack_platform_env(
    request: pytest.FixtureRequest, platform: str, options: Mapping[str, str]
) -> PlatformEnv | None:
    """Prepare the environment of one test of ``platform`` (the per-test fixture
    :func:`~dstack_core.testing.pytest_plugin.dstack_platform_env` asks for it).

    Called once per test, before the platform is loaded. Use it for a device that keeps
    state between tests: reset or re-create the device here (``request.addfinalizer`` for
    what must happen after the test), or return the runtime log that belongs to the device,
    so that the log the kit hands the platform replays to the device's registers.

    :param request: the requesting test's fixture request.
    :param platform: the platform under test (``--dstack-platform``).
    :param options: the ``--dstack-platform-option`` values given on the command line.
    :returns: the :class:`~dstack_core.testing.pytest_plugin.PlatformEnv` to run the test
        in, or None to leave it to other implementations (the default is an empty
        environment).

    .. versionadded:: 0.2
    """
