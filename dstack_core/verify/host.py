"""The verifier plugin host: loads one plugin per evidence format and is the only caller of
the verifier hooks (:mod:`dstack_core.verifier_hookspecs`).

Plugins are found in the entry-point group ``dstack_core.verifiers`` (built-in ones exactly
like a vendor's) and imported on first use of their format. Every plugin must be the only
one for its format, implement the required hooks, and say (in :class:`VerifierInfo`) the
format it is registered under. Every answer is checked: a wrong type, a format other than
the one asked for, or checks other than the declared ones is a contract violation, and
an exception that is not a :class:`~dstack_core.errors.DstackError` is a plugin bug; both
fail the verification with :class:`~dstack_core.errors.VerifierPluginError`, whose message
names the plugin and never the exception (the traceback goes to the log).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

import pluggy

from .. import verifier_hookspecs
from ..errors import (
    ConfigurationError,
    DstackError,
    EvidenceError,
    PluginError,
    VerifierPluginError,
)
from ..plugins import (
    TRACE_ENV,
    VERIFIER_ENTRY_POINT_GROUP,
    InstalledVerifier,
    plugin_manager,
    verifiers_summary,
)
from .options import VerifyOptions
from .result import VerifierIdentity
from .types import PlatformReport, PlatformVerification, TrustInputs, VerifierInfo

__all__ = ["LoadedVerifier", "VerifierHost", "default_host"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoadedVerifier:
    """One loaded verifier plugin, with typed, checked calls to its hooks.

    :ivar info: what the plugin said about itself (checked against its entry point).
    :ivar installed: its entry point and distribution.
    """

    def __init__(self, pm: pluggy.PluginManager, installed: InstalledVerifier) -> None:
        self._pm = pm
        self.installed = installed
        self._impls: dict[str, tuple[Callable[..., Any], tuple[str, ...]] | None] = {}
        for hook in verifier_hookspecs.__all__:
            caller = getattr(pm.hook, hook, None)
            if not isinstance(caller, pluggy.HookCaller):
                continue
            impls = caller.get_hookimpls()
            # Exactly one plugin per manager: call its function directly (pluggy's dispatch
            # is a measurable share of a verification), unless hook calls are traced.
            self._impls[hook] = (impls[0].function, tuple(impls[0].argnames)) if impls else None
        self._traced = os.environ.get(TRACE_ENV) == "1"
        self.info = self._checked("verifier_info", self._call("verifier_info"), VerifierInfo)
        if self.info.evidence_format != installed.evidence_format:
            raise PluginError(
                f"verifier plugin {installed.describe()} says it verifies evidence format "
                f"{self.info.evidence_format!r}, but is registered for "
                f"{installed.evidence_format!r}"
            )
        self.identity = VerifierIdentity(
            evidence_format=installed.evidence_format,
            plugin=installed.distribution,
            version=installed.version,
            checks=self.info.checks,
        )
        """How results name this plugin (:attr:`VerificationResult.verifier`)."""

    @property
    def evidence_format(self) -> str:
        return self.info.evidence_format

    @property
    def plugin(self) -> str:
        """``<distribution> <version>`` of the plugin, as results name it."""
        return self.installed.plugin

    def implements(self, hook: str) -> bool:
        return self._impls.get(hook) is not None

    def _call(self, hook: str, **kwargs: Any) -> Any:
        found = self._impls.get(hook)
        if found is None:
            return None
        try:
            if self._traced:
                return getattr(self._pm.hook, hook)(**kwargs)
            function, argnames = found
            return function(*[kwargs[name] for name in argnames])
        except DstackError:
            raise
        except Exception as exc:
            log.exception("verifier plugin %s: hook %s raised", self.installed.describe(), hook)
            raise VerifierPluginError(
                f"the {self.installed.evidence_format} verifier plugin ({self.plugin}) failed "
                f"in {hook}"
            ) from exc

    def _checked(self, hook: str, value: Any, expected: type[T]) -> T:
        if not isinstance(value, expected):
            log.error("verifier hook %s of %s returned %r", hook, self.installed.describe(), value)
            raise VerifierPluginError(
                f"the {self.installed.evidence_format} verifier plugin ({self.plugin}) "
                f"returned {type(value).__name__} from {hook}, expected {expected.__name__}"
            )
        return value

    def _violation(self, what: str) -> VerifierPluginError:
        log.error("verifier plugin %s broke its contract: %s", self.installed.describe(), what)
        return VerifierPluginError(
            f"the {self.installed.evidence_format} verifier plugin ({self.plugin}) broke "
            f"its contract: {what}"
        )

    def decode(self, evidence: bytes, extra: Mapping[str, Any]) -> PlatformReport:
        """``decode_evidence``, checked.

        :raises EvidenceError: the evidence is malformed.
        """
        report = self._checked(
            "decode_evidence",
            self._call("decode_evidence", evidence=evidence, extra=extra),
            PlatformReport,
        )
        if report.evidence_format != self.evidence_format:
            raise self._violation(f"decoded {report.evidence_format!r} evidence")
        return report

    def load_collateral(self, document: bytes) -> object | None:
        """``load_collateral``: the parsed document, or None when it is not this format's.

        :raises EvidenceError: the document is this format's but unusable.
        """
        value: object | None = self._call("load_collateral", document=document)
        return value

    def fetch_collateral(self, report: PlatformReport, trust: TrustInputs, now: int) -> object | None:
        """``fetch_collateral`` (may block on I/O): collateral, or None.

        :raises EvidenceError: fetching failed (code ``collateral_unavailable``).
        """
        value: object | None = self._call("fetch_collateral", report=report, trust=trust, now=now)
        return value

    def verify(
        self,
        report: PlatformReport,
        collateral: object | None,
        options: VerifyOptions,
        collateral_error: str | None,
    ) -> PlatformVerification:
        """``verify_platform``, checked: exactly the declared checks, in order."""
        result = self._checked(
            "verify_platform",
            self._call(
                "verify_platform",
                report=report,
                collateral=collateral,
                options=options,
                collateral_error=collateral_error,
            ),
            PlatformVerification,
        )
        names = tuple(c.name for c in result.checks)
        if names != self.info.checks:
            raise self._violation(
                f"verify_platform answered checks {list(names)}, not {list(self.info.checks)}"
            )
        return result

    def check_options(self, options: Mapping[str, str]) -> None:
        """Refuse ``--verifier-option`` keys this plugin does not declare.

        :raises ConfigurationError: an unknown key (the message lists the accepted ones).
        """
        unknown = sorted(set(options) - set(self.info.options))
        if unknown:
            accepted = ", ".join(sorted(self.info.options)) or "none"
            raise ConfigurationError(
                f"unknown verifier option(s) {', '.join(unknown)} for evidence format "
                f"{self.evidence_format!r} (accepted: {accepted})"
            )


def _load(installed: InstalledVerifier, obj: object) -> LoadedVerifier:
    where = installed.describe()
    pm = plugin_manager(
        obj, specs=verifier_hookspecs, kind="verifier", name=installed.evidence_format,
        where=where,
    )
    try:
        return LoadedVerifier(pm, installed)
    except (ValueError, TypeError, VerifierPluginError) as exc:
        raise PluginError(f"verifier plugin {where} is invalid: {exc}") from exc


class VerifierHost:
    """The verifier plugins of one process, one per evidence format, loaded on first use.

    Build it with :meth:`from_entry_points` (what the CLI, the service and
    :func:`default_host` do) or, in tests, :meth:`from_plugins`. Thread-safe.
    """

    def __init__(
        self,
        installed: Mapping[str, list[InstalledVerifier]],
        importer: Callable[[InstalledVerifier], object],
    ) -> None:
        self._installed = {fmt: list(found) for fmt, found in installed.items()}
        self._importer = importer
        self._loaded: dict[str, LoadedVerifier] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_entry_points(cls) -> VerifierHost:
        """Every plugin registered in ``dstack_core.verifiers`` (none imported yet)."""
        found: dict[str, list[InstalledVerifier]] = {}
        eps = {}
        for ep in entry_points(group=VERIFIER_ENTRY_POINT_GROUP):
            installed = InstalledVerifier.from_entry_point(ep)
            found.setdefault(ep.name, []).append(installed)
            eps[installed] = ep

        def importer(installed: InstalledVerifier) -> object:
            try:
                return eps[installed].load()
            except Exception as exc:
                raise PluginError(
                    f"verifier plugin {installed.describe()} failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

        return cls(found, importer)

    @classmethod
    def from_plugins(
        cls, plugins: Mapping[str, object], *, distribution: str = "test", version: str = ""
    ) -> VerifierHost:
        """A host of the given plugin objects (or classes), by format: for tests and tools
        that do not go through entry points."""
        found = {
            fmt: [InstalledVerifier(evidence_format=fmt, value=repr(obj),
                                    distribution=distribution, version=version)]
            for fmt, obj in plugins.items()
        }
        return cls(found, lambda installed: plugins[installed.evidence_format])

    def installed(self) -> list[InstalledVerifier]:
        """What is installed, sorted by format (nothing is imported)."""
        return sorted(
            (v for found in self._installed.values() for v in found),
            key=lambda v: (v.evidence_format, v.distribution),
        )

    def formats(self) -> tuple[str, ...]:
        """The evidence formats some plugin is installed for."""
        return tuple(sorted(self._installed))

    def get(self, evidence_format: str) -> LoadedVerifier:
        """The plugin for ``evidence_format``, loaded once.

        :raises EvidenceError: ``code="unsupported_evidence"``: no plugin for the format
            (the message names what is installed).
        :raises PluginError: several plugins register it, or it fails to load.
        """
        loaded = self._loaded.get(evidence_format)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._loaded.get(evidence_format)
            if loaded is not None:
                return loaded
            candidates = self._installed.get(evidence_format, [])
            if not candidates:
                raise EvidenceError(
                    f"no verifier plugin for evidence format {evidence_format!r} is installed; "
                    f"{verifiers_summary(self.installed())}",
                    code="unsupported_evidence",
                )
            if len(candidates) > 1:
                providers = ", ".join(v.describe() for v in candidates)
                raise PluginError(
                    f"conflicting verifier plugins for evidence format {evidence_format!r}, "
                    f"provided by: {providers}"
                )
            (installed,) = candidates
            loaded = _load(installed, self._importer(installed))
            self._loaded[evidence_format] = loaded
            return loaded

    def load_all(self) -> tuple[LoadedVerifier, ...]:
        """Load every installed plugin (a service does at start-up, to fail there).

        :raises PluginError: any of them is conflicting or broken.
        """
        return tuple(self.get(fmt) for fmt in self.formats())


@functools.cache
def default_host() -> VerifierHost:
    """The process's host over the installed entry points, made on first use (not at import)."""
    return VerifierHost.from_entry_points()
