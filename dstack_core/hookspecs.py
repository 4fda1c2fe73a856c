"""The platform contract: every hook a dstack-core platform plugin implements.

A platform plugin is an object (usually a class, instantiated once by the core with no
arguments) registered in the entry-point group ``dstack_core.platforms``. Its methods are
marked with :data:`dstack_core.hookimpl` and are **synchronous**: the core runs them in a
worker thread, so they may block on kernel interfaces. A hook must not return a coroutine.

Exactly one platform is loaded per agent. Hooks that answer are ``firstresult=True``; the
core checks at start-up that the selected platform implements each required hook. New
arguments are only ever added as new names, so older plugins keep working.

Errors: a hook raises a :class:`~dstack_core.errors.DstackError` subclass it chooses
(:class:`~dstack_core.errors.InvalidRequest` for input the platform cannot accept,
:class:`~dstack_core.errors.PlatformBusy`, :class:`~dstack_core.errors.PlatformUnsupported`,
:class:`~dstack_core.errors.PlatformError`). Anything else that escapes is wrapped by the core
as ``PlatformError`` and logged with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from .eventlog import TdxEvent
    from .types import (
        Measurements,
        PlatformConfig,
        PlatformEvidence,
        PlatformInfo,
        Quote,
        RootKey,
        TrustBundle,
    )

PROJECT_NAME = "dstack_core"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

NONBLOCKING_ATTR: Final = "dstack_core_nonblocking"
"""The attribute :func:`nonblocking` sets on a hook implementation."""

_F = TypeVar("_F", bound=Callable[..., Any])


def nonblocking(function: _F) -> _F:
    """Mark a hook implementation as quick and free of blocking I/O.

    The core then calls it on its event loop instead of in a worker thread, which saves a
    thread hand-off per call (for a software platform, most of a quote's cost). Only for
    hooks that never wait for a device, a file or the network and finish in well under a
    millisecond; everything else keeps the default. Thread safety is still required: other
    hooks of the same plugin run in worker threads at the same time. Put it under
    ``@hookimpl``::

        @hookimpl
        @nonblocking
        def get_quote(self, report_data: bytes) -> Quote: ...

    .. versionadded:: 0.2
    """
    setattr(function, NONBLOCKING_ATTR, True)
    return function

__all__ = [
    "PROJECT_NAME",
    "REQUIRED_HOOKS",
    "hookspec",
    "platform_info",
    "configure",
    "unconfigure",
    "derive_root_key",
    "get_quote",
    "attest",
    "boot_event_log",
    "read_measurements",
    "extend_rtmr",
    "extend_rtmr_many",
    "nonblocking",
    "trust_bundle",
]


@hookspec(firstresult=True)
def platform_info() -> PlatformInfo:
    """Describe the platform.

    Called once, before :func:`configure`.

    :returns: a :class:`~dstack_core.types.PlatformInfo`; never None. A simulated platform
        sets ``simulated=True`` and a tag that no hardware platform uses.

    .. versionadded:: 0.1
    """


@hookspec
def configure(config: PlatformConfig) -> None:
    """Prepare the platform for serving, once, before any other hook but ``platform_info``.

    Open devices, load or create durable state below ``config.state_dir``, and (for a
    platform that simulates the boot process) append dstack's boot events to
    ``config.runtime_log``. Fail here, not on the first request, when the platform cannot
    work (missing device, wrong kernel).

    :param config: paths and options resolved by the core.
    :raises ConfigurationError: the platform cannot run on this machine or with this config.

    .. versionadded:: 0.1
    """


@hookspec
def unconfigure() -> None:
    """Release what :func:`configure` acquired. Called once at clean shutdown.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def derive_root_key() -> RootKey:
    """Return the app's root key material.

    Every GetKey, Sign and GetTlsKey result derives from it, so it must be stable for the
    life of the app instance (the same bytes after a restart).

    :returns: a :class:`~dstack_core.types.RootKey`; never None.
    :raises ConfigurationError: no key material was provisioned.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def get_quote(report_data: bytes) -> Quote:
    """Produce hardware evidence binding ``report_data``.

    The quote must carry the current measurement registers, so that replaying the event log
    read under the same lock reproduces them.

    :param report_data: exactly 64 bytes (the core pads shorter input with zeros).
    :returns: a :class:`~dstack_core.types.Quote` whose report data equals ``report_data``;
        never None.
    :raises PlatformBusy: the quote service is busy; the caller may retry.
    :raises PlatformError: the quote could not be produced.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def attest(report_data: bytes) -> PlatformEvidence:
    """Produce the platform's part of an attestation envelope for ``report_data``.

    Usually the quote of :func:`get_quote` plus the boot event log; platforms with extra
    evidence (an SNP certificate chain) put it in ``extra``.

    :param report_data: exactly 64 bytes.
    :returns: a :class:`~dstack_core.types.PlatformEvidence`; never None.
    :raises PlatformError: the evidence could not be produced.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def boot_event_log() -> tuple[TdxEvent, ...]:
    """Return the firmware/boot event log (RTMR0..2), in measurement order.

    :returns: a tuple of :class:`~dstack_core.eventlog.TdxEvent` with full payloads (possibly
        empty for platforms without a boot log); never None.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def read_measurements() -> Measurements:
    """Read the current MRTD and RTMR0..3.

    Used at start-up to repair the runtime log after a crash and for Info.

    :returns: a :class:`~dstack_core.types.Measurements`; never None.
    :raises PlatformUnsupported: the platform has no such registers.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def extend_rtmr(index: int, digest: bytes) -> None:
    """Extend a runtime measurement register: ``RTMR[index] = SHA384(RTMR[index] || digest)``.

    The core only ever asks for RTMR3, and a platform must refuse any other index. The
    extension must be durable when the hook returns (it survives an agent restart).

    :param index: the register, always 3.
    :param digest: the 48-byte SHA-384 event digest.
    :raises InvalidRequest: an index other than 3 or a digest that is not 48 bytes.
    :raises PlatformUnsupported: the platform has no runtime registers.
    :raises PlatformError: the kernel refused the extension.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def extend_rtmr_many(index: int, digests: tuple[bytes, ...]) -> None:
    """Extend a runtime measurement register by several digests, in order, in one call.

    Optional: without it the core calls :func:`extend_rtmr` once per digest. The core
    commits concurrent EmitEvents in batches; a platform whose extension costs a durable
    write per call (the simulator saves its register) implements this hook to pay that once
    per batch. Every extension must be durable when the hook returns. If it raises, any
    prefix of ``digests`` may have been applied: the core reads the register back
    (:func:`read_measurements`) and keeps exactly the events it holds.

    :param index: the register, always 3.
    :param digests: one or more 48-byte SHA-384 event digests, in extend order.
    :raises InvalidRequest: an index other than 3 or a digest that is not 48 bytes.
    :raises PlatformUnsupported: the platform has no runtime registers.
    :raises StorageError: the platform's own durable state could not be written; the
        register did not move.
    :raises PlatformError: the kernel refused an extension.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def trust_bundle(state_dir: Path, options: Mapping[str, str]) -> TrustBundle | None:
    """Publish the trust anchors a verifier needs for this platform's evidence, if any.

    Optional. A simulated platform, whose quotes a mock PKI signs, returns that PKI's root
    and collateral. A hardware platform returns None ("no bundle": its evidence verifies
    against the hardware vendor's own roots), or the anchors of the test-only fake hardware
    its ``options`` select. Called without :func:`configure` (by ``dstack-agent
    trust-bundle``), possibly while an agent serves from the same ``state_dir``: read what
    is there, create missing anchors atomically, change nothing else.

    :param state_dir: the state directory the agent uses (or will use).
    :param options: the platform options (``--platform-option KEY=VALUE``), as
        :func:`configure` gets them in ``PlatformConfig.options``.
    :returns: a :class:`~dstack_core.types.TrustBundle`, or None when the platform
        publishes none.
    :raises ConfigurationError: options the platform cannot use.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``options``; returning None means "no bundle".
    """


REQUIRED_HOOKS = (
    "platform_info",
    "derive_root_key",
    "get_quote",
    "attest",
    "boot_event_log",
    "read_measurements",
    "extend_rtmr",
)
"""Hooks the selected platform must implement; ``configure``/``unconfigure`` are optional."""
