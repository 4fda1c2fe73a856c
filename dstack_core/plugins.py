"""Finding and loading the one platform plugin, failing closed; finding verifier plugins.

Platforms are registered in the entry-point group ``dstack_core.platforms`` (built-in ones
exactly like third-party ones). Selection is explicit: the caller names a platform, and an
unknown, duplicated, unimportable or incomplete plugin stops start-up with a message that
names what is installed. There is no fallback, ever.

Verifier plugins are registered in ``dstack_core.verifiers``, one per evidence format (the
entry point's name); :mod:`dstack_core.verify.host` loads them. The agent only needs to
know, without importing anything, that the format of its platform's evidence has exactly
one (:func:`require_verifier`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "VERIFIER_ENTRY_POINT_GROUP",
    "InstalledPlatform",
    "InstalledVerifier",
    "installed_platforms",
    "installed_verifiers",
    "load_platform",
    "require_verifier",
    "verifiers_summary",
]

ENTRY_POINT_GROUP = "dstack_core.platforms"
VERIFIER_ENTRY_POINT_GROUP = "dstack_core.verifiers"
TRACE_ENV = "DSTACK_TRACE_PLUGINS"

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class InstalledPlatform:
    """An entry point in ``dstack_core.platforms``, not yet imported."""

    name: str
    value: str
    distribution: str

    @classmethod
    def from_entry_point(cls, ep: EntryPoint) -> InstalledPlatform:
        dist = ep.dist
        where = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        return cls(name=ep.name, value=ep.value, distribution=where)

    def describe(self) -> str:
        return f"{self.name} ({self.value}, from {self.distribution})"


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def installed_platforms() -> list[InstalledPlatform]:
    """Every registered platform entry point, sorted by name; nothing is imported."""
    return _sorted_platforms(_entry_points())


def _sorted_platforms(eps: Sequence[EntryPoint]) -> list[InstalledPlatform]:
    return sorted(
        (InstalledPlatform.from_entry_point(ep) for ep in eps),
        key=lambda p: (p.name, p.distribution),
    )


def _installed_summary(eps: Sequence[EntryPoint]) -> str:
    platforms = _sorted_platforms(eps)
    if not platforms:
        return "no platform plugins are installed (group dstack_core.platforms)"
    return "installed: " + ", ".join(p.describe() for p in platforms)


def load_platform(name: str | None) -> pluggy.PluginManager:
    """Load the platform called ``name`` into a fresh plugin manager.

    :returns: a plugin manager with the hook specs and exactly that one plugin registered.
    :raises PluginError: no name given, no such platform, several distributions provide the
        name, the plugin fails to import or to instantiate, or it lacks a required hook.
    """
    # One scan of the installed distributions serves the choice and every message: each
    # scan reads every distribution's metadata, a few milliseconds of each start.
    eps = _entry_points()
    if not name:
        raise PluginError(
            "no platform selected: pass --platform NAME, set DSTACK_PLATFORM or 'platform' "
            f"in the config file; {_installed_summary(eps)}"
        )
    matches = [ep for ep in eps if ep.name == name]
    if not matches:
        raise PluginError(f"unknown platform {name!r}; {_installed_summary(eps)}")
    if len(matches) > 1:
        # pluggy would silently keep one of them; a choice by install order is not a choice.
        providers = ", ".join(InstalledPlatform.from_entry_point(ep).describe() for ep in matches)
        raise PluginError(f"conflicting plugins for platform {name!r}, provided by: {providers}")
    (ep,) = matches
    where = InstalledPlatform.from_entry_point(ep).describe()
    try:
        loaded = ep.load()
    except Exception as exc:
        raise PluginError(
            f"platform plugin {where} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return plugin_manager(loaded, specs=hookspecs, kind="platform", name=name, where=where)


def plugin_manager(
    obj: object, *, specs: ModuleType, kind: str, name: str, where: str
) -> pluggy.PluginManager:
    """A plugin manager holding ``specs`` and exactly one plugin: ``obj``, instantiated if it
    is a class. Shared by the platform and the verifier loaders.

    :param specs: the hook-spec module (``PROJECT_NAME``, ``REQUIRED_HOOKS`` and the specs).
    :param kind: ``platform`` or ``verifier``, for the messages.
    :param where: the entry point and distribution, for the messages.
    :raises PluginError: the plugin fails to instantiate, violates the specs or lacks a
        required hook.
    """
    try:
        plugin = obj() if isinstance(obj, type) else obj
    except Exception as exc:
        raise PluginError(
            f"{kind} plugin {where} failed to initialise: {type(exc).__name__}: {exc}"
        ) from exc
    pm = pluggy.PluginManager(specs.PROJECT_NAME)
    pm.add_hookspecs(specs)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{kind} plugin {where} is invalid: {exc}") from exc
    missing = [h for h in specs.REQUIRED_HOOKS if not getattr(pm.hook, h).get_hookimpls()]
    if missing:
        raise PluginError(
            f"{kind} plugin {where} does not implement required hooks: {', '.join(missing)}"
        )
    if os.environ.get(TRACE_ENV) == "1":
        pm.add_hookcall_monitoring(_trace_call, _trace_result)
    return pm


@attrs.frozen(kw_only=True)
class InstalledVerifier:
    """An entry point in ``dstack_core.verifiers``, not yet imported.

    :ivar evidence_format: the entry point's name: the format it verifies.
    :ivar value: ``module:object``.
    :ivar distribution: the distribution's name, or ``unknown``.
    :ivar version: the distribution's version, or ``""``.
    """

    evidence_format: str
    value: str
    distribution: str
    version: str = ""

    @classmethod
    def from_entry_point(cls, ep: EntryPoint) -> InstalledVerifier:
        dist = ep.dist
        return cls(
            evidence_format=ep.name,
            value=ep.value,
            distribution=dist.name if dist is not None else "unknown",
            version=dist.version if dist is not None else "",
        )

    @property
    def plugin(self) -> str:
        """``<distribution> <version>``: how results name the plugin."""
        return f"{self.distribution} {self.version}".strip()

    def describe(self) -> str:
        return f"{self.evidence_format} ({self.value}, from {self.plugin})"


def _verifier_entry_points() -> list[EntryPoint]:
    return list(entry_points(group=VERIFIER_ENTRY_POINT_GROUP))


def installed_verifiers() -> list[InstalledVerifier]:
    """Every registered verifier entry point, sorted by format; nothing is imported."""
    return _sorted_verifiers(_verifier_entry_points())


def _sorted_verifiers(eps: Sequence[EntryPoint]) -> list[InstalledVerifier]:
    return sorted(
        (InstalledVerifier.from_entry_point(ep) for ep in eps),
        key=lambda v: (v.evidence_format, v.distribution),
    )


def verifiers_summary(verifiers: list[InstalledVerifier] | None = None) -> str:
    """``installed: tdx (...), sev-snp (...)``, or that none is."""
    found = installed_verifiers() if verifiers is None else verifiers
    if not found:
        return f"no verifier plugins are installed (group {VERIFIER_ENTRY_POINT_GROUP})"
    return "installed: " + ", ".join(v.describe() for v in found)


def require_verifier(evidence_format: str, *, platform: str = "") -> InstalledVerifier:
    """The one verifier plugin installed for ``evidence_format``, found without importing it.

    :param platform: the platform whose evidence it is, for the message.
    :raises PluginError: none is installed (the message names what is), or several
        distributions register the format.
    """
    # Only the matches are described (each reads its distribution's metadata), and the
    # rest only for the message when there is no match.
    eps = _verifier_entry_points()
    matches = _sorted_verifiers([ep for ep in eps if ep.name == evidence_format])
    whose = f"platform {platform!r} produces" if platform else "the agent produces"
    if not matches:
        found = _sorted_verifiers(eps)
        raise PluginError(
            f"{whose} evidence format {evidence_format!r}, but no verifier plugin for it is "
            f"installed, so nobody could verify its attestations; {verifiers_summary(found)}. "
            "Install the platform's package with its verifier, or start with "
            "--allow-missing-verifier (config allow_missing_verifier = true) on an image "
            "that deliberately leaves the verifier out"
        )
    if len(matches) > 1:
        providers = ", ".join(v.describe() for v in matches)
        raise PluginError(
            f"conflicting verifier plugins for evidence format {evidence_format!r}, provided "
            f"by: {providers}"
        )
    return matches[0]
# Hooks whose results are key material: traced by type only, whatever the plugin returns.
_SECRET_RESULTS = frozenset({"derive_root_key"})


def _trace_call(hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, object]) -> None:
    log.debug("pluggy: %s(%s)", hook_name, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))


def _trace_result(outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[Any],
                  kwargs: Mapping[str, object]) -> None:
    if outcome.exception is not None:
        log.debug("pluggy: %s raised %s", hook_name, type(outcome.exception).__name__)
    elif hook_name in _SECRET_RESULTS:
        log.debug("pluggy: %s --> a %s", hook_name, type(outcome.get_result()).__name__)
    else:
        log.debug("pluggy: %s --> %r", hook_name, outcome.get_result())
