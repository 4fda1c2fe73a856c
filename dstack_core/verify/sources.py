"""Collateral for each format, before verification: documents the operator gave (parsed by
the plugin whose format they are) and each plugin's own fetching (caches, vendor services).

:class:`CollateralResolver` is what the CLI and the service configure once and ask before
each verification; it never runs during one. Intel's collateral machinery itself (files,
cache, PCCS) is :mod:`dstack_core.collateral`; SEV-SNP's (AMD's KDS) ships with its plugin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from ..errors import ConfigurationError, EvidenceError
from .host import VerifierHost, default_host
from .types import PlatformReport, TrustInputs

__all__ = ["CollateralResolver", "parse_collateral_documents"]


def parse_collateral_documents(
    documents: Sequence[tuple[str, bytes]], host: VerifierHost | None = None
) -> dict[str, object]:
    """Parse each ``(name, content)`` document with the plugin whose format it is.

    Every installed plugin is asked (:func:`~dstack_core.verifier_hookspecs.load_collateral`);
    the one that recognises a document parses it.

    :returns: per evidence format, its parsed collateral.
    :raises ConfigurationError: a document no installed plugin recognises, one its plugin
        finds unusable, or two documents of one format.
    """
    host = host or default_host()
    parsed: dict[str, object] = {}
    for name, content in documents:
        claimed = []
        for verifier in host.load_all():
            try:
                value = verifier.load_collateral(content)
            except EvidenceError as exc:
                raise ConfigurationError(
                    f"invalid collateral {name}: {exc.message} ({verifier.evidence_format} "
                    "collateral)"
                ) from None
            if value is not None:
                claimed.append((verifier.evidence_format, value))
        if not claimed:
            formats = ", ".join(host.formats()) or "none installed"
            raise ConfigurationError(
                f"invalid collateral {name}: no installed verifier plugin recognises it "
                f"(formats: {formats})"
            )
        for evidence_format, value in claimed:
            if evidence_format in parsed:
                raise ConfigurationError(
                    f"two collateral documents for evidence format {evidence_format!r}"
                )
            parsed[evidence_format] = value
    return parsed


@attrs.frozen(kw_only=True)
class CollateralResolver:
    """Where each format's collateral comes from, for one configuration.

    :ivar fixed: per format, collateral used for every piece of evidence of that format
        (parsed documents; see :func:`parse_collateral_documents`).
    :ivar trust: what plugins may fetch with (cache directory, PCCS, per-format options).
    :ivar host: the plugins.
    """

    fixed: Mapping[str, object] = attrs.field(factory=dict)
    trust: TrustInputs = attrs.field(factory=TrustInputs)
    host: VerifierHost = attrs.field(factory=default_host, eq=False)

    def collateral_for(self, report: PlatformReport, *, now: int) -> tuple[object | None, str | None]:
        """``(collateral, why there is none)`` for one piece of evidence. May block on disk
        and network (a plugin's fetch): call it off the event loop.

        :raises EvidenceError: ``unsupported_evidence``, no plugin for the format.
        """
        fixed = self.fixed.get(report.evidence_format)
        if fixed is not None:
            return fixed, None
        verifier = self.host.get(report.evidence_format)
        if not verifier.implements("fetch_collateral"):
            return None, None
        try:
            return verifier.fetch_collateral(report, self.trust, now), None
        except EvidenceError as exc:
            return None, exc.message
